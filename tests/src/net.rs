//! Test network namespaces with unique names, removed on drop (also when a test panics).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use istio_cni::netns::Netns;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, at most 15 bytes (fits an interface name):
/// `prefix` (≤ 5 bytes) + pid + counter, in hex.
pub fn unique_name(prefix: &str) -> String {
    assert!(
        prefix.len() <= 5,
        "prefix {prefix:?} too long for an interface name"
    );
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{:x}x{n:x}", std::process::id())
}

/// Runs a command and panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace (`ip netns add`) with IPv6 duplicate address detection off
/// (addresses are usable at once). Deleted on drop.
pub struct TestNetns {
    /// The `ip netns` name.
    pub name: String,
}

impl TestNetns {
    /// Creates a namespace named from `prefix`, with `lo` up.
    pub fn new(prefix: &str) -> TestNetns {
        let ns = TestNetns::bare(prefix);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Creates a namespace named from `prefix` with `lo` down, as a runtime creates a pod
    /// sandbox's (the `loopback` plugin brings it up).
    pub fn bare(prefix: &str) -> TestNetns {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = TestNetns { name };
        ns.open()
            .run(|_| {
                for conf in ["all", "default"] {
                    let key = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
                    std::fs::write(&key, "0").unwrap_or_else(|e| panic!("{key}: {e}"));
                }
            })
            .expect("enter test netns");
        ns
    }

    /// The namespace file, as a runtime passes it in `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Opens it for [`Netns::run`].
    pub fn open(&self) -> Netns {
        Netns::open(&self.path()).expect("open test netns")
    }

    /// Runs a command inside (`ip netns exec`), panicking on failure; returns stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Lines of `iptables-save` (or `ip6tables-save`) inside that mention an ISTIO chain.
    pub fn istio_rules(&self, ipv6: bool) -> Vec<String> {
        let save = if ipv6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        };
        self.exec(&[save])
            .lines()
            .filter(|l| l.contains("ISTIO"))
            .map(str::to_owned)
            .collect()
    }
}

impl TestNetns {
    /// Names of this netns's nftables tables of the nftables backend
    /// (`inet istio-proxy-*`, and ambient's `inet istio-ambient-*`), sorted.
    pub fn istio_nft_tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .exec(&["nft", "list", "tables"])
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .filter(|n| n.starts_with("istio-proxy-") || n.starts_with("istio-ambient-"))
            .map(str::to_owned)
            .collect();
        t.sort();
        t
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
