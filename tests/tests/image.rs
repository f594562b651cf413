//! The image `make image` builds (`target/image/*.oci.tar`, passed in `ISTIO_CNI_IMAGE`):
//! it imports into containerd under the chart's default name, its config runs
//! `istio-cni-node-agent run`, it carries the OCI labels, and its root file system holds
//! what the agent needs (the static plugin, iptables legacy and nft, nft, CA
//! certificates) and nothing of apt, dpkg or docs; the agent and the tools run from it.
//! Run by `make e2e`. Needs root, containerd and tar.

use std::path::{Path, PathBuf};
use std::process::Command;

use istio_cni_e2e::cri::ContainerdDirs;
use istio_cni_e2e::net::TestNetns;
use serde_json::Value;

/// The chart's default image (`values.yaml` `image.repository` and the chart's appVersion).
const IMAGE: &str = "docker.io/istio-cni/istio-cni-node-agent";

fn archive() -> PathBuf {
    let p = PathBuf::from(std::env::var_os("ISTIO_CNI_IMAGE").expect("ISTIO_CNI_IMAGE"));
    assert!(p.is_file(), "{} not found: run make image", p.display());
    p
}

/// [`istio_cni_e2e::net::run`], returning stdout as text.
fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&istio_cni_e2e::net::run(cmd).stdout).into_owned()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
#[ignore = "needs the image from make image (make e2e runs it)"]
fn the_image_imports_runs_and_holds_only_what_it_needs() {
    let archive = archive();
    let version = env!("CARGO_PKG_VERSION");

    // containerd imports it; the name is the chart's default image.
    let host = TestNetns::new("im");
    let dirs = ContainerdDirs::new();
    let containerd = dirs.start(&host);
    containerd.ctr(&[
        "images",
        "import",
        "--base-name",
        IMAGE,
        archive.to_str().unwrap(),
    ]);
    let listed = containerd.ctr(&["images", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l == format!("{IMAGE}:{version}")),
        "{listed}"
    );
    drop(containerd);

    // The layout: index → manifest → config and the one layer.
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let index = json(&layout.join("index.json"));
    let manifest = json(&blob(
        &layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/istio-cni-node-agent"])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    for label in ["title", "version", "licenses", "source", "created"] {
        let key = format!("org.opencontainers.image.{label}");
        assert!(c["Labels"][&key].is_string(), "label {key}: {c}");
    }
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], version);

    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob(&layout, layers[0]["digest"].as_str().unwrap()))
        .arg("-C")
        .arg(&rootfs));
    for present in [
        "usr/local/bin/istio-cni-node-agent",
        "usr/local/bin/istio-cni",
        "usr/sbin/iptables-legacy-restore",
        "usr/sbin/iptables-nft-restore",
        "usr/sbin/ip6tables-legacy-save",
        "usr/sbin/ip6tables-nft-save",
        "usr/sbin/iptables",
        "usr/sbin/nft",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(rootfs.join(present).exists(), "{present} is missing");
    }
    for absent in [
        "usr/bin/apt",
        "usr/bin/dpkg",
        "var/lib/dpkg",
        "usr/share/doc",
        "usr/share/man",
        "usr/bin/openssl",
        "bin/sh",
        "usr/bin/bash",
    ] {
        assert!(!rootfs.join(absent).exists(), "{absent} is in the image");
    }
    let file = run(Command::new("file")
        .arg("-b")
        .arg(rootfs.join("usr/local/bin/istio-cni")));
    assert!(file.contains("static"), "the plugin is not static: {file}");

    // What the image holds runs from it, against its own libraries.
    let chrooted = |args: &[&str]| run(Command::new("chroot").arg(&rootfs).args(args));
    assert!(chrooted(&["/usr/local/bin/istio-cni-node-agent", "--version"]).contains(version));
    assert!(chrooted(&["/usr/sbin/iptables-nft", "-V"]).contains("nf_tables"));
    assert!(chrooted(&["/usr/sbin/iptables-legacy", "-V"]).contains("legacy"));
    assert!(chrooted(&["/usr/sbin/nft", "--version"]).contains("nftables"));
}
