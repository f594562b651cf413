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
    let (took, outcome, _) = timed_add_logged(bin, netns, container, pod, conf);
    (took, outcome)
}

/// [`timed_add`], also returning what the plugin logged on stderr.
pub fn timed_add_logged(
    bin: &std::path::Path,
    netns: &std::path::Path,
    container: &str,
    pod: &str,
    conf: &str,
) -> (Duration, Result<(), String>, String) {
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
    (
        took,
        outcome,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Parses a `Duration`'s `Debug` text: `812.3ms`, `1.2s`, `950µs`, `120ns`.
pub fn parse_debug_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "µs" | "us" => v / 1e6,
        "ns" => v / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}
