//! The nftables read-back's canonical form against real `nft` output.
//!
//! `tests/nft_canon/NAME.json` holds what `nft -j list table inet …` printed (nftables
//! 1.0.6, Debian 12) after the transaction of case NAME was applied in a scratch netns:
//! every expressible upstream conformance case, and every pod of the iptables conformance
//! set rendered with `native_nftables` (IPv4, and dual-stack as `dual-NAME`). Offline, the
//! canonical form of what the builder wrote must equal that of the captured output
//! (`canonical_forms_agree_on_captured_nft_output`), and must differ from it when a rule is
//! changed, dropped or moved. With root and `nft`, the live test applies every case again
//! and compares with the kernel's answer; `ISTIO_CNI_UPDATE_NFT_GOLDENS=1` rewrites the
//! captures from it.

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use istio_cni::config::NetConf;
use istio_cni::netns::ScratchNetns;
use istio_cni::plan::{plan_nft_for_pod, Plan};
use istio_cni::rules::nft_canon::{diff, expected, from_json};
use istio_cni::rules::nftables::{self, NftRuleset, TABLES};

fn goldens() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/nft_canon")
}

/// Every ruleset to check: the expressible upstream cases and the conformance pods.
fn cases() -> Vec<(String, NftRuleset)> {
    let mut out: Vec<(String, NftRuleset)> = common::nft_cases::expressible()
        .into_iter()
        .map(|(name, r, ipv6)| (name, nftables::build(&r, ipv6)))
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/istio-plugin");
    for (prefix, prev) in [
        ("", r#"{"ips":[{"address":"10.0.0.2/24"}]}"#),
        (
            "dual-",
            r#"{"ips":[{"address":"10.0.0.2/24"},{"address":"fd00::2/64"}]}"#,
        ),
    ] {
        let conf = NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","native_nftables":true,"prevResult":{prev}}}"#)
                .as_bytes(),
        )
        .unwrap();
        let mut pods: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".pod.json"))
            .collect();
        pods.sort();
        for path in pods {
            let pod = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if let Ok(Plan::Redirect(r)) = plan_nft_for_pod(&conf, &pod) {
                let name = path.file_name().unwrap().to_string_lossy();
                out.push((
                    format!("{prefix}pod-{}", name.trim_end_matches(".pod.json")),
                    *r,
                ));
            }
        }
    }
    out
}

#[test]
fn canonical_forms_agree_on_captured_nft_output() {
    let mut checked = 0;
    for (name, ruleset) in cases() {
        let path = goldens().join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (capture it: ISTIO_CNI_UPDATE_NFT_GOLDENS=1 cargo test --test nft_canon)",
                path.display()
            )
        });
        let got = from_json(&text).unwrap();
        let want = expected(&ruleset);
        let d = diff(&want, &got);
        assert!(d.is_empty(), "{name}:\n{}", d.join("\n"));
        checked += 1;
    }
    assert!(checked >= 30, "{checked} cases");
}

#[test]
fn the_canonical_form_sees_changed_dropped_and_moved_rules() {
    let (_, ruleset) = cases()
        .into_iter()
        .find(|(n, _)| n == "dual-pod-tproxy")
        .unwrap();
    let text = std::fs::read_to_string(goldens().join("dual-pod-tproxy.json")).unwrap();
    let want = expected(&ruleset);
    assert!(diff(&want, &from_json(&text).unwrap()).is_empty());
    for (from, to, what) in [
        ("\"port\": 15001", "\"port\": 15002", "a redirect port"),
        ("\"right\": 1337", "\"right\": 1336", "a mark or UID"),
        (
            "\"target\": \"istio-redirect\"",
            "\"target\": \"istio-inbound\"",
            "a jump",
        ),
        (
            "\"right\": \"127.0.0.1\"",
            "\"right\": \"127.0.0.2\"",
            "an address",
        ),
    ] {
        assert!(text.contains(from), "the capture has no {from}");
        let tampered = text.replacen(from, to, 1);
        assert!(
            !diff(&want, &from_json(&tampered).unwrap()).is_empty(),
            "{what} changed but the forms agree"
        );
    }
    // A rule dropped, and two rules swapped, in the kernel's answer.
    let mut got = from_json(&text).unwrap();
    fn inbound(got: &mut istio_cni::rules::nft_canon::CanonTables) -> &mut Vec<Vec<String>> {
        &mut got
            .get_mut("istio-proxy-mangle")
            .unwrap()
            .get_mut("istio-inbound")
            .unwrap()
            .rules
    }
    inbound(&mut got).swap(0, 1);
    assert!(!diff(&want, &got).is_empty(), "rule order");
    inbound(&mut got).remove(0);
    assert!(!diff(&want, &got).is_empty(), "a missing rule");
}

/// Applies `ruleset` with `nft -f -` inside a new scratch netns and returns what
/// `nft -j list table` prints for each of its tables.
fn apply_and_list(nft: &str, ruleset: &NftRuleset) -> String {
    let scratch = ScratchNetns::create().unwrap();
    scratch
        .netns()
        .run(|_| {
            let mut child = Command::new(nft)
                .args(["-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(ruleset.transaction().as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "nft -f: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                ruleset.transaction()
            );
            let mut listed = String::new();
            for table in TABLES.iter().filter(|t| ruleset.table_names().contains(t)) {
                let out = Command::new(nft)
                    .args(["-j", "list", "table", "inet", table])
                    .output()
                    .unwrap();
                assert!(out.status.success());
                listed.push_str(String::from_utf8_lossy(&out.stdout).trim());
                listed.push('\n');
            }
            listed
        })
        .unwrap()
}

/// Needs root and `nft` (Debian's `nftables`).
#[test]
fn live_read_back_agrees_with_the_kernel() {
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nft not found: install nftables (make test does)");
    let update = std::env::var_os("ISTIO_CNI_UPDATE_NFT_GOLDENS").is_some();
    for (name, ruleset) in cases() {
        let listed = apply_and_list(nft, &ruleset);
        let d = diff(&expected(&ruleset), &from_json(&listed).unwrap());
        assert!(d.is_empty(), "{name}:\n{}", d.join("\n"));
        if update {
            std::fs::write(goldens().join(format!("{name}.json")), &listed).unwrap();
        }
    }
}
