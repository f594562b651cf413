//! The `istio-cni` binary as a runtime and as a person call it: CNI verbs that need no
//! netns (VERSION, STATUS, GC, pass-through ADD, errors), and `istio-cni render`.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_istio-cni");

fn cni(verb: &str, args: &str, stdin: &Value) -> Output {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "/var/run/netns/does-not-matter")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "k8s", "type": "istio-cni",
           "exclude_namespaces": ["kube-system"],
           "kubernetes": {"kubeconfig": "/nonexistent/kubeconfig"},
           "prevResult": {"cniVersion": "1.0.0",
                          "interfaces": [{"name": "eth0", "sandbox": "/x"}],
                          "ips": [{"address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 0}],
                          "routes": [], "dns": {}}})
}

#[test]
fn version_lists_supported_versions() {
    let out = cni("VERSION", "", &json!({"cniVersion": "0.4.0"}));
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert_eq!(
        v["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

#[test]
fn pass_through_converts_prev_result_to_the_requested_version() {
    for (version, has_ip_version) in [
        ("0.3.1", true),
        ("0.4.0", true),
        ("1.0.0", false),
        ("1.1.0", false),
    ] {
        let out = cni(
            "ADD",
            "K8S_POD_NAME=coredns;K8S_POD_NAMESPACE=kube-system",
            &conf(version),
        );
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = stdout_json(&out);
        assert_eq!(r["cniVersion"], version);
        assert_eq!(r["ips"][0]["address"], "10.1.2.3/24");
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            has_ip_version,
            "{version}: {r}"
        );
    }
    // Not a Kubernetes pod: empty result of the version when there is no prevResult.
    let mut c = conf("1.0.0");
    c.as_object_mut().unwrap().remove("prevResult");
    let out = cni("ADD", "IgnoreUnknown=1", &c);
    assert_eq!(
        stdout_json(&out),
        json!({"cniVersion": "1.0.0", "ips": [], "dns": {}})
    );
}

#[test]
fn errors_are_cni_json_on_stdout_and_logs_stay_off_it() {
    // Missing kubeconfig: the API cannot be reached, so ADD must fail closed with 11.
    let out = cni(
        "ADD",
        "K8S_POD_NAME=web;K8S_POD_NAMESPACE=default",
        &conf("1.0.0"),
    );
    assert_eq!(out.status.code(), Some(11));
    let e = stdout_json(&out);
    assert_eq!(e["code"], 11);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/kubeconfig"),
        "{e}"
    );
    assert!(!out.stderr.is_empty(), "the failure is logged on stderr");

    let out = cni(
        "ADD",
        "",
        &json!({"cniVersion": "1.0.0", "exclude_namespaces": [1]}),
    );
    let e = stdout_json(&out);
    assert_eq!(e["code"], 7);
    assert!(
        e["msg"].as_str().unwrap().contains("exclude_namespaces"),
        "{e}"
    );
    let out = cni("ADD", "", &json!({"cniVersion": "9.9.9"}));
    assert_eq!(stdout_json(&out)["code"], 1);

    let out = Command::new(BIN)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = stdout_json(&out);
    assert_eq!(e["code"], 4);
    assert!(
        e["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{e}"
    );
}

#[test]
fn status_reports_what_blocks_add_and_gc_is_accepted() {
    let out = cni("STATUS", "", &conf("1.1.0"));
    assert_eq!(out.status.code(), Some(50));
    let e = stdout_json(&out);
    assert_eq!(e["code"], 50);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("kubeconfig /nonexistent/kubeconfig"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, "apiVersion: v1\nkind: Config\n").unwrap();
    let mut c = conf("1.1.0");
    c["kubernetes"]["kubeconfig"] = json!(kc);
    let out = cni("STATUS", "", &c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());

    // With native_nftables, STATUS needs no tool at all (the backend speaks nfnetlink
    // itself): it passes with a PATH that holds neither nft nor iptables.
    c["native_nftables"] = json!(true);
    let out = cni_raw(
        &[
            ("PATH", &dir.path().display().to_string()),
            ("CNI_COMMAND", "STATUS"),
        ],
        c.to_string().as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let mut gc = conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c1", "ifname": "eth0"}]);
    let out = cni("GC", "", &gc);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn render_prints_the_rules_or_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let pod = |annotations: Value| {
        json!({"metadata": {"name": "p", "namespace": "default", "annotations": annotations},
               "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"]}]}})
    };
    let write = |name: &str, v: Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let meshed = write("meshed.json", pod(json!({"sidecar.istio.io/status": "{}"})));
    let out = Command::new(BIN)
        .args(["render", "--pod"])
        .arg(&meshed)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("* nat") && text.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT"),
        "{text}"
    );
    assert!(
        !text.contains("IPv6"),
        "no IPv6 without an IPv6 address: {text}"
    );

    let netconf = write(
        "netconf.json",
        json!({"cniVersion": "1.0.0", "prevResult": {"ips": [{"address": "fd00::5/64"}]}}),
    );
    let out = Command::new(BIN)
        .args(["render", "--pod"])
        .arg(&meshed)
        .arg("--netconf")
        .arg(&netconf)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("# IPv6 rules") && text.contains("::1/128"),
        "{text}"
    );

    let plain = write("plain.json", pod(json!({})));
    let out = Command::new(BIN)
        .args(["render", "--pod"])
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("sidecar.istio.io/status is absent"));

    let bad = write(
        "bad.json",
        pod(
            json!({"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/includeOutboundPorts": "80;rm"}),
        ),
    );
    let out = Command::new(BIN)
        .args(["render", "--pod"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("includeOutboundPorts") && err.contains("\"80;rm\""),
        "{err}"
    );
}

/// Runs the binary with exactly `env` (plus PATH) and raw `stdin` bytes.
fn cni_raw(env: &[(&str, &str)], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    // The plugin may stop reading early (size limit); that is its answer, not a failure.
    let _ = pipe.write_all(stdin);
    drop(pipe);
    child.wait_with_output().unwrap()
}

/// Every hostile input ends in one CNI error object on stdout with the expected code, the
/// same exit status, the request's cniVersion when it has one, and no panic. None of these
/// reaches a netns: CNI_NETNS names a path that does not exist.
#[test]
fn hostile_input_table() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // 1 MiB of a configuration that never ends.
    let big = format!(
        "{{\"cniVersion\":\"1.0.0\",\"pad\":\"{}",
        "x".repeat(1 << 20)
    );
    let huge = vec![b' '; 5 << 20];
    let good = conf("0.4.0").to_string();
    let base = |verb: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", verb),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/istio-cni-test-absent"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns",
            ),
        ]
    };
    let with = |verb: &'static str, k: &'static str, v: &'static str| {
        let mut e = base(verb);
        e.retain(|(key, _)| *key != k);
        if !v.is_empty() {
            e.push((k, v));
        }
        e
    };
    // (what, environment, stdin, expected code, expected cniVersion)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        &'a [u8],
        u64,
        Option<&'a str>,
    );
    let cases: Vec<Case> = vec![
        ("empty stdin", base("ADD"), b"", 6, None),
        ("1 MiB of stdin", base("ADD"), big.as_bytes(), 6, None),
        ("5 MiB of stdin", base("ADD"), &huge, 5, None),
        (
            "invalid UTF-8",
            base("ADD"),
            b"{\"cniVersion\":\"\xff\xfe\"}",
            6,
            None,
        ),
        ("nested JSON", base("ADD"), nested.as_bytes(), 6, None),
        ("a JSON string", base("ADD"), b"\"ADD\"", 7, None),
        (
            "unknown verb",
            with("FROB", "CNI_COMMAND", "FROB"),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "lower-case verb",
            with("add", "CNI_COMMAND", "add"),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "no CNI_NETNS",
            with("ADD", "CNI_NETNS", ""),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "no CNI_IFNAME",
            with("CHECK", "CNI_IFNAME", ""),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "multibyte CNI_CONTAINERID",
            with("ADD", "CNI_CONTAINERID", "aéééééééééééé"),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "newline in CNI_CONTAINERID",
            with("ADD", "CNI_CONTAINERID", "c1\n2026 INFO forged"),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "CNI_ARGS without =",
            with("ADD", "CNI_ARGS", "K8S_POD_NAME"),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "newline in a pod name",
            with(
                "ADD",
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web\nforged",
            ),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "a path as a pod name",
            with(
                "ADD",
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=../../nodes/n1",
            ),
            good.as_bytes(),
            4,
            Some("0.4.0"),
        ),
        (
            "CHECK before 0.4.0",
            base("CHECK"),
            conf("0.3.1").to_string().leak().as_bytes(),
            1,
            Some("0.3.1"),
        ),
    ];
    for (what, env, stdin, code, version) in cases {
        let out = cni_raw(&env, stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        let e: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "{what}: stdout is not one JSON value ({err}): {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(e["code"], code, "{what}: {e}");
        assert_eq!(out.status.code(), Some(code as i32), "{what}");
        if let Some(v) = version {
            assert_eq!(e["cniVersion"], v, "{what}");
        }
        assert!(
            !e["msg"].as_str().unwrap_or_default().contains('\n'),
            "{what}: {e}"
        );
        assert!(
            stderr.lines().all(|l| l.is_empty() || l.starts_with("20")),
            "{what}: every log line is one record: {stderr}"
        );
    }
}

#[test]
fn render_prints_the_nftables_transaction_with_native_nftables() {
    let dir = tempfile::tempdir().unwrap();
    let pod = dir.path().join("pod.json");
    std::fs::write(
        &pod,
        json!({"metadata": {"name": "p", "namespace": "default",
                            "annotations": {"sidecar.istio.io/status": "{}"}},
               "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"]}]}})
        .to_string(),
    )
    .unwrap();
    let netconf = dir.path().join("netconf.json");
    std::fs::write(
        &netconf,
        json!({"cniVersion": "1.0.0", "native_nftables": true}).to_string(),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["render", "--pod"])
        .arg(&pod)
        .arg("--netconf")
        .arg(&netconf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("add table inet istio-proxy-nat\nflush table inet istio-proxy-nat\n")
            && text
                .contains("add rule inet istio-proxy-nat istio-output counter jump istio-redirect"),
        "{text}"
    );
}

/// Rules of one golden of upstream's ambient set: the restore input (harness lines left
/// out) or the nftables transaction.
fn ambient_golden(backend: &str, name: &str) -> String {
    let path = format!(
        "{}/tests/conformance/istio-ambient/{backend}/{name}.golden",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out: String = text
        .lines()
        .filter(|l| !matches!(*l, "iptables-save" | "ip6tables-save"))
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

/// `render` with `ambient_enabled` prints, for an ambient pod, the in-pod rules the node
/// agent writes (the same builders), with the node-wide settings as flags; a pod whose
/// namespace makes it ambient needs `--namespace`; a sidecar pod still gets its sidecar
/// rules; a bad override is named.
#[test]
fn render_prints_the_ambient_in_pod_rules() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, v: Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let ambient_pod = write(
        "pod.json",
        json!({"metadata": {"name": "p", "namespace": "apps",
                            "labels": {"istio.io/dataplane-mode": "ambient"}},
               "spec": {"containers": [{"name": "app"}]}}),
    );
    let plain_pod = write(
        "plain.json",
        json!({"metadata": {"name": "q", "namespace": "apps"}, "spec": {"containers": [{"name": "app"}]}}),
    );
    let ns = write(
        "ns.json",
        json!({"metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    let render = |pod: &std::path::Path, conf: Value, extra: &[&str]| {
        let netconf = write("netconf.json", conf);
        let out = Command::new(BIN)
            .args(["render", "--pod"])
            .arg(pod)
            .arg("--netconf")
            .arg(&netconf)
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ambient = json!({"cniVersion": "1.0.0", "ambient_enabled": true});
    let without_comments = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let (ok, out, err) = render(&ambient_pod, ambient.clone(), &["--ambient-ipv6=false"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("# ambient"), "{out}");
    assert_eq!(
        without_comments(&out),
        ambient_golden("iptables", "default")
    );
    let nft = json!({"cniVersion": "1.0.0", "ambient_enabled": true, "native_nftables": true});
    let (ok, out, err) = render(&ambient_pod, nft, &["--ambient-ipv6=false"]);
    assert!(ok, "{err}");
    assert_eq!(
        without_comments(&out),
        ambient_golden("nftables", "default")
    );
    // The namespace's label: only with --namespace.
    let (_, out, _) = render(&plain_pod, ambient.clone(), &[]);
    assert!(out.starts_with("# no rules"), "{out}");
    let (_, out, _) = render(
        &plain_pod,
        ambient.clone(),
        &["--namespace", ns.to_str().unwrap()],
    );
    assert!(out.starts_with("# ambient"), "{out}");
    // Not with ambient off.
    let (_, out, _) = render(&ambient_pod, json!({"cniVersion": "1.0.0"}), &[]);
    assert!(out.starts_with("# no rules"), "{out}");
    // A bad override.
    let bad = write(
        "bad.json",
        json!({"metadata": {"name": "p", "namespace": "apps",
                            "labels": {"istio.io/dataplane-mode": "ambient"},
                            "annotations": {"ambient.istio.io/dns-capture": "maybe"}},
               "spec": {"containers": [{"name": "app"}]}}),
    );
    let (ok, _, err) = render(&bad, ambient, &[]);
    assert!(!ok && err.contains("ambient.istio.io/dns-capture"), "{err}");
}
