//! The `istio-cni` that ships is statically linked (it runs on hosts with any libc, exec'd
//! by the host's runtime with the host's files), and it works: ADD through the chain writes
//! and validates the rules, DEL removes them. `make test` builds it
//! (`--target x86_64-unknown-linux-gnu` with `+crt-static`) and passes its path in
//! `ISTIO_CNI_STATIC_BIN`. Needs root and the `file` tool.

use std::path::PathBuf;
use std::process::Command;

use istio_cni_e2e::sandbox::{injected_pod, Sandbox};
use serde_json::json;

fn static_bin() -> PathBuf {
    let path = std::env::var_os("ISTIO_CNI_STATIC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-gnu/debug/istio-cni")
        });
    assert!(
        path.is_file(),
        "{} not found: build it with `make test` (or set ISTIO_CNI_STATIC_BIN)",
        path.display()
    );
    path
}

#[test]
fn the_plugin_is_statically_linked() {
    let bin = static_bin();
    let file = Command::new("file")
        .arg("-b")
        .arg(&bin)
        .output()
        .expect("run file");
    let what = String::from_utf8_lossy(&file.stdout);
    // A static PIE keeps ASLR; `file` calls it "static-pie linked".
    assert!(
        what.contains("statically linked") || what.contains("static-pie linked"),
        "{what}"
    );
    // No program interpreter and no shared libraries at all.
    let headers = Command::new("readelf")
        .args(["--program-headers", "--dynamic", "--wide"])
        .arg(&bin)
        .output()
        .expect("run readelf");
    let headers = String::from_utf8_lossy(&headers.stdout);
    assert!(!headers.contains("INTERP"), "{headers}");
    assert!(!headers.contains("(NEEDED)"), "{headers}");
}

#[test]
fn the_static_plugin_writes_and_validates_rules() {
    let bin = static_bin();
    let mut f = Sandbox::new(injected_pod("default", "web", json!({}), json!({})));
    f.chain.cni_path[0] = bin.parent().unwrap().to_path_buf();
    let result = f.add().unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert!(!f.pod.istio_rules(false).is_empty());
    f.ours().check(&f.attachment, &result).unwrap();
    f.chain.del(&f.attachment, Some(&result)).unwrap();
    assert!(f.pod.istio_rules(false).is_empty());
}
