//! Small helpers for the benchmarks' reports.

use std::time::Duration;

/// The `q` quantile (0.0–1.0, nearest rank) of `v`, which is sorted in place.
///
/// Panics when `v` is empty.
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// `d` in milliseconds with two decimals, e.g. `10.60 ms`.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Runs `bin`'s ADD once, as a runtime does, for pod `default/{pod}` in the netns at
/// `netns` (container ID `container`), with the network configuration `conf`, from the
/// calling thread's netns, and times it from spawn to exit. Returns the time and, on
/// failure, the plugin's stdout (its CNI error).
///
/// Panics when the plugin cannot be spawned or fed (a broken bench setup).
pub fn timed_add(
    bin: &std::path::Path,
    netns: &std::path::Path,
    container: &str,
    pod: &str,
    conf: &str,
) -> (Duration, Result<(), String>) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let start = std::time::Instant::now();
    let mut child = Command::new(bin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
        )
        .env("CNI_PATH", bin.parent().expect("the plugin's dir"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("write the netconf");
    let out = child.wait_with_output().expect("wait for the plugin");
    let took = start.elapsed();
    let outcome = if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    (took, outcome)
}
