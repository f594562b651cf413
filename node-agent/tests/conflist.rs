//! Table tests of the conflist merge over real-world shapes (`tests/testdata/conflist/`):
//! Calico, Cilium, Flannel, kindnet with an old istio-cni entry, a bridge `.conf`, and
//! broken files. Every case checks that everything but our entry is preserved exactly,
//! key order included, and that chaining is idempotent and undone by unchaining.

use std::path::PathBuf;

use istio_cni_node_agent::install::conflist::{
    chain, is_chained, pick_primary, unchain, ConfError,
};
use serde_json::{json, Map, Value};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/conflist")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(testdata().join(name)).unwrap()
}

fn entry() -> Map<String, Value> {
    json!({"type": "istio-cni", "name": "istio-cni", "cni_agent_run_dir": "/var/run/istio-cni",
           "exclude_namespaces": ["kube-system"],
           "kubernetes": {"kubeconfig": "/var/run/istio-cni/istio-cni-kubeconfig"}})
    .as_object()
    .unwrap()
    .clone()
}

/// Every key path in document order, with its scalar value: equal iff the documents are
/// equal including key order.
fn flatten(v: &Value, path: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(v, format!("{path}.{k}"), out);
            }
            out.push(format!("{path}{{}}"));
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(v, format!("{path}[{i}]"), out);
            }
            out.push(format!("{path}[]"));
        }
        scalar => out.push(format!("{path}={scalar}")),
    }
}

fn flat(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    flatten(v, String::new(), &mut out);
    out
}

fn without_istio(list: &Value) -> Value {
    let mut v = list.clone();
    v["plugins"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["type"] != "istio-cni");
    v
}

#[test]
fn lists_keep_everything_and_get_our_entry_last() {
    for file in [
        "10-calico.conflist",
        "05-cilium.conflist",
        "10-flannel.conflist",
        "10-kindnet-with-istio.conflist",
    ] {
        let original: Value = serde_json::from_slice(&read(file)).unwrap();
        let out = chain(file, &read(file), &entry())
            .unwrap()
            .expect("a change");
        assert_eq!(out.file, file, "a list keeps its name");
        assert_eq!(out.replaces, None);
        let chained: Value = serde_json::from_slice(&out.content).unwrap();
        let plugins = chained["plugins"].as_array().unwrap();
        assert_eq!(plugins.last().unwrap(), &Value::Object(entry()), "{file}");
        assert_eq!(
            plugins.iter().filter(|p| p["type"] == "istio-cni").count(),
            1,
            "{file}"
        );
        assert_eq!(
            flat(&without_istio(&chained)),
            flat(&without_istio(&original)),
            "{file}: everything else kept"
        );
        assert!(is_chained(file, &out.content));
        assert_eq!(
            chain(file, &out.content, &entry()).unwrap(),
            None,
            "{file}: idempotent"
        );
        let undone = unchain(file, &out.content).expect("something to remove");
        assert_eq!(
            flat(&serde_json::from_slice(&undone).unwrap()),
            flat(&without_istio(&original)),
            "{file}"
        );
    }
}

#[test]
fn an_outdated_entry_is_replaced_in_place_of_the_last() {
    let file = "10-kindnet-with-istio.conflist";
    let out = chain(file, &read(file), &entry()).unwrap().unwrap();
    let chained: Value = serde_json::from_slice(&out.content).unwrap();
    let types: Vec<&str> = chained["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ptp", "portmap", "istio-cni"]);
    assert_eq!(
        chained["plugins"][2]["cni_agent_run_dir"],
        "/var/run/istio-cni"
    );
    assert_eq!(chained["cniVersion"], "0.3.1", "the list's version is kept");
    assert_eq!(chained["name"], "kindnet", "the network name is kept");
}

#[test]
fn a_single_conf_becomes_a_list_with_its_version_and_name() {
    let file = "10-bridge.conf";
    let original: Value = serde_json::from_slice(&read(file)).unwrap();
    let out = chain(file, &read(file), &entry()).unwrap().unwrap();
    assert_eq!(out.file, "10-bridge.conflist");
    assert_eq!(out.replaces.as_deref(), Some("10-bridge.conf"));
    let chained: Value = serde_json::from_slice(&out.content).unwrap();
    assert_eq!(chained["cniVersion"], "1.0.0");
    assert_eq!(chained["name"], "mynet");
    assert_eq!(
        flat(&chained["plugins"][0]),
        flat(&original),
        "the original plugin is unchanged"
    );
    assert_eq!(chained["plugins"][1], Value::Object(entry()));
    assert_eq!(chain(&out.file, &out.content, &entry()).unwrap(), None);
}

#[test]
fn the_first_valid_file_by_name_is_primary() {
    let names = [
        "00-invalid.conflist",
        "01-empty.conflist",
        "02-notype.conflist",
        "03-list-in.conf",
        "04-README.txt",
        "10-calico.conflist",
        "10-bridge.conf",
        "05-cilium.conflist",
    ];
    let files: Vec<(String, Vec<u8>)> = names.iter().map(|n| (n.to_string(), read(n))).collect();
    let (i, skipped) = pick_primary(&files, None).unwrap();
    assert_eq!(files[i].0, "05-cilium.conflist");
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    assert!(matches!(skipped[0], ConfError::NotJson { .. }));
    assert!(skipped[1].to_string().contains("empty"), "{}", skipped[1]);
    assert!(
        skipped[2].to_string().contains("no \"type\""),
        "{}",
        skipped[2]
    );
    assert!(
        skipped[3].to_string().contains("03-list-in.conf"),
        "{}",
        skipped[3]
    );

    // Ties between shapes are broken by the full name, as libcni sorts.
    let tie: Vec<(String, Vec<u8>)> = ["10-calico.conflist", "10-bridge.conf"]
        .iter()
        .map(|n| (n.to_string(), read(n)))
        .collect();
    assert_eq!(tie[pick_primary(&tie, None).unwrap().0].0, "10-bridge.conf");

    // CNI_CONF_NAME overrides the choice.
    let (i, _) = pick_primary(&files, Some("10-calico.conflist")).unwrap();
    assert_eq!(files[i].0, "10-calico.conflist");
    assert!(pick_primary(&files, Some("99-missing.conflist"))
        .unwrap_err()
        .is_empty());

    let broken: Vec<(String, Vec<u8>)> = names[..5]
        .iter()
        .map(|n| (n.to_string(), read(n)))
        .collect();
    assert_eq!(pick_primary(&broken, None).unwrap_err().len(), 4);
}

#[test]
fn broken_files_are_refused_not_rewritten() {
    for file in [
        "00-invalid.conflist",
        "01-empty.conflist",
        "02-notype.conflist",
    ] {
        assert!(chain(file, &read(file), &entry()).is_err(), "{file}");
        assert_eq!(unchain(file, &read(file)), None);
    }
    assert_eq!(
        unchain("10-calico.conflist", &read("10-calico.conflist")),
        None,
        "nothing to remove"
    );
}
