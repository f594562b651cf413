//! The self-test: proof that the plugin works on this node. It runs the installed binary
//! for real, ADD then CHECK then DEL, in a scratch netns with a synthetic meshed pod read
//! from a local file (no API call, so the result does not depend on cluster state). ADD
//! itself writes, reads back and probes the rules, so a pass proves that this node's
//! kernel, iptables binaries and our binary work together. Afterwards no rule, netns or
//! file of the test is left.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use istio_cni::apply::Xtables;
use istio_cni::netns::ScratchNetns;
use istio_cni::rules::Family;
use serde_json::{json, Map, Value};

/// Namespace and name of the synthetic pod.
pub const POD_NAMESPACE: &str = "istio-cni-self-test";
/// See [`POD_NAMESPACE`].
pub const POD_NAME: &str = "self-test";

/// Why the self-test failed.
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    /// The test could not be set up (netns, pod file).
    #[error("self-test setup: {0}")]
    Setup(String),
    /// A CNI verb failed.
    #[error("self-test {verb} failed (exit {exit}): {msg}")]
    Verb {
        /// ADD, CHECK or DEL.
        verb: &'static str,
        /// The plugin's exit code, or -1 when it was killed.
        exit: i32,
        /// The CNI error message, or the plugin's stderr.
        msg: String,
    },
    /// DEL left rules behind.
    #[error("self-test DEL left rules behind: {0}")]
    Leftover(String),
}

/// Runs the self-test of `plugin` (the installed binary, with `cni_bin_dir` as `CNI_PATH`)
/// with our chain `entry`, keeping its pod file in `work_dir` while it runs. Returns how
/// long it took.
///
/// Errors: [`SelfTestError`] saying which step failed and why.
pub fn run(
    plugin: &Path,
    cni_bin_dir: &Path,
    entry: &Map<String, Value>,
    work_dir: &Path,
) -> Result<Duration, SelfTestError> {
    let start = Instant::now();
    let scratch = ScratchNetns::create().map_err(|e| SelfTestError::Setup(e.to_string()))?;
    let pod_file = PodFile::write(work_dir)?;
    let mut conf = entry.clone();
    conf.insert("cniVersion".into(), json!("1.0.0"));
    conf.insert("name".into(), json!("istio-cni-self-test"));
    conf.insert("exclude_namespaces".into(), json!([]));
    conf.insert("local_pod_file".into(), json!(pod_file.0));
    conf.insert(
        "prevResult".into(),
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.255.255.2/32"}]}),
    );
    let conf = Value::Object(conf).to_string();
    for verb in ["ADD", "CHECK", "DEL"] {
        exec(plugin, cni_bin_dir, verb, scratch.path(), &conf)?;
    }
    let xt = Xtables::detect().map_err(|e| SelfTestError::Setup(e.to_string()))?;
    let left = scratch
        .netns()
        .run(|inside| xt.binaries(Family::V4).and_then(|b| b.save_text(inside)))
        .map_err(|e| SelfTestError::Setup(e.to_string()))?
        .map_err(|e| SelfTestError::Setup(e.to_string()))?;
    if let Some(line) = left.lines().find(|l| l.contains("ISTIO")) {
        return Err(SelfTestError::Leftover(line.to_owned()));
    }
    Ok(start.elapsed())
}

/// The synthetic pod: injected, with a sidecar, in a namespace of its own.
pub fn synthetic_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": POD_NAMESPACE,
                     "annotations": {"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}},
        "spec": {"containers": [{"name": "app", "image": "self-test"},
                                {"name": "istio-proxy", "image": "self-test", "args": ["proxy", "sidecar"]}]}
    })
}

/// The pod file, removed on drop.
struct PodFile(PathBuf);

impl PodFile {
    fn write(dir: &Path) -> Result<PodFile, SelfTestError> {
        let path = dir.join(format!(".istio-cni-self-test-{}.json", std::process::id()));
        std::fs::write(&path, synthetic_pod().to_string())
            .map_err(|e| SelfTestError::Setup(format!("writing {}: {e}", path.display())))?;
        Ok(PodFile(path))
    }
}

impl Drop for PodFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn exec(
    plugin: &Path,
    cni_bin_dir: &Path,
    verb: &'static str,
    netns: &Path,
    conf: &str,
) -> Result<(), SelfTestError> {
    let spawn_err = |e: std::io::Error| SelfTestError::Verb {
        verb,
        exit: -1,
        msg: format!("cannot run {}: {e}", plugin.display()),
    };
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", verb)
        .env(
            "CNI_CONTAINERID",
            format!("istio-cni-self-test-{}", std::process::id()),
        )
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={POD_NAME}"),
        )
        .env("CNI_PATH", cni_bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin that fails before reading its config closes stdin early: its exit code
        // and error output below say why, so a broken pipe here is not the error.
        match stdin.write_all(conf.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
            _ => {}
        }
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    let msg = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|e| e.get("msg").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
    Err(SelfTestError::Verb {
        verb,
        exit: out.status.code().unwrap_or(-1),
        msg,
    })
}
