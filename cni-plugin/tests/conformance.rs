//! The rules must equal upstream Istio's for the same input: every case in
//! `tests/conformance/istio-plugin/` (pod + netconf → expected rules; upstream's goldens,
//! byte-identical, see its `SOURCE.md`), compared as that file says: per table, the same
//! sequence of lines; tables in any order; blank lines and `iptables-save` marker lines
//! dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use istio_cni::config::NetConf;
use istio_cni::plan::{plan_for_pod, Plan};
use istio_cni::rules::Family;

fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/istio-plugin")
}

/// Splits restore text into table → lines, as the conformance README prescribes.
fn tables(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty()
            || line == "iptables-save"
            || line == "ip6tables-save"
            || line.starts_with('#')
        {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            let t = t.trim().to_owned();
            assert!(!out.contains_key(&t), "table {t} appears twice");
            out.insert(t.clone(), Vec::new());
            current = Some(t);
        } else if line == "COMMIT" {
            current = None;
        } else {
            let t = current
                .as_ref()
                .unwrap_or_else(|| panic!("line outside a table: {line}"));
            out.get_mut(t).unwrap().push(line.to_owned());
        }
    }
    out
}

#[test]
fn all_upstream_cases_match() {
    let dir = conformance_dir();
    let netconf = std::fs::read(dir.join("netconf.json"))
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.join("netconf.json").display()));
    let conf = NetConf::parse(&netconf).unwrap();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".pod.json").map(str::to_owned)
        })
        .collect();
    cases.sort();
    assert_eq!(
        cases.len(),
        9,
        "expected nine conformance cases in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let pod =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{case}.pod.json"))).unwrap())
                .unwrap();
        let expected = std::fs::read_to_string(dir.join(format!("{case}.rules"))).unwrap();
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            failures.push(format!("{case}: pod was skipped"));
            continue;
        };
        assert!(
            ruleset.family(Family::V6).is_none(),
            "{case}: no IPv6 address, no IPv6 rules"
        );
        let got = ruleset.family(Family::V4).unwrap().restore_text();
        if tables(&got) != tables(&expected) {
            failures.push(format!("{case}:\n--- expected\n{expected}\n--- got\n{got}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
