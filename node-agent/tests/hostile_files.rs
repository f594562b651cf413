//! `istio-cni-node-agent run` against hostile files where it reads its credentials: a FIFO
//! or `/dev/zero` instead of the service account token or the `--kubeconfig`. The agent
//! must refuse them at once, say what is wrong on `/readyz`, stay live on `/healthz`
//! (nothing is stuck), keep its memory small, and stop promptly on SIGTERM. Needs root
//! (like the other daemon tests).

use std::path::Path;
use std::time::{Duration, Instant};

use istio_cni_e2e::agent::{project_token, wait_for, Daemon, Node, AGENT_POD, PRIMARY};

fn mkfifo(p: &Path) {
    let _ = std::fs::remove_file(p);
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// Caps the agent's address space at 4 GiB right after it started, so that an unbounded
/// read makes it fail fast instead of taking the test machine's memory.
fn cap_memory(daemon: &Daemon) {
    let limit = libc::rlimit {
        rlim_cur: 4 << 30,
        rlim_max: 4 << 30,
    };
    // SAFETY: prlimit on our own child with a valid limit and no old-limit pointer.
    let rc = unsafe {
        libc::prlimit(
            daemon.child.id() as libc::pid_t,
            libc::RLIMIT_AS,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// The agent's peak resident memory so far, in KiB (`VmHWM`).
fn peak_rss_kib(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits for `/readyz` 503 with a body containing every one of `needles`.
fn wait_not_ready_saying(daemon: &Daemon, needles: &[&str]) -> String {
    wait_for(
        &format!("/readyz 503 saying {needles:?}"),
        || match daemon.readyz() {
            Some((503, body)) if needles.iter().all(|n| body.contains(n)) => Some(body),
            _ => None,
        },
    )
    .0
}

/// SIGTERM, and the agent is gone within 5 s, having logged "stopped".
fn sigterm_stops_promptly(daemon: &mut Daemon) -> String {
    let start = Instant::now();
    daemon.sigterm();
    let took = start.elapsed();
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:?}: {log}"
    );
    assert!(log.contains("stopped"), "{log}");
    log
}

/// Defect 6: the projected token (through kubelet's `..data` links) is a FIFO. The install
/// pass fails at once naming it; `/readyz` says so instead of "not done yet"; nothing is
/// stuck, so `/healthz` stays 200; a real token rotated in makes the agent ready; SIGTERM
/// stops it promptly.
#[test]
fn a_fifo_token_is_reported_and_the_agent_stays_responsive() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let token = node.sa.join("..gen_1/token");
    mkfifo(&token);
    let mut daemon = node.daemon(&["--self-test", "false"]);
    let body = wait_not_ready_saying(&daemon, &["install:", "token", "FIFO"]);
    assert!(body.contains(&node.sa.display().to_string()), "{body}");
    assert_eq!(daemon.get(daemon.ready_port, "/healthz").unwrap().0, 200);

    // The token rotates to a real one: the next pass succeeds.
    project_token(&node.sa, 2, "token-two");
    daemon.wait_ready();
    sigterm_stops_promptly(&mut daemon);
}

/// Defect 6: `--kubeconfig` is a FIFO. It is refused without waiting for a writer:
/// `/readyz` says so (the node cannot be managed through the API), the API loops never
/// start on it, `/healthz` stays 200, and SIGTERM stops the agent promptly (keeping the
/// plugin, since the API cannot say whether this is an upgrade).
#[test]
fn a_fifo_kubeconfig_is_reported_and_sigterm_still_stops_the_agent() {
    let node = Node::new("net.d");
    std::fs::create_dir(&node.net).unwrap();
    std::fs::write(node.conf(), PRIMARY).unwrap();
    let kubeconfig = node.dir.path().join("kubeconfig");
    mkfifo(&kubeconfig);
    let kc = kubeconfig.display().to_string();
    let mut daemon = node.daemon(&[
        "--self-test",
        "false",
        "--kubeconfig",
        &kc,
        "--node-name",
        "node-1",
        "--pod-name",
        AGENT_POD,
    ]);
    // Once installed, that is the only reason (the install itself is fine).
    wait_for("/readyz 503 for the kubeconfig only", || {
        match daemon.readyz() {
            Some((503, body)) if body.contains(&kc) && body.contains("FIFO") => {
                (!body.contains("install:")).then_some(())
            }
            _ => None,
        }
    });
    assert_eq!(daemon.get(daemon.ready_port, "/healthz").unwrap().0, 200);
    let log = sigterm_stops_promptly(&mut daemon);
    assert!(log.contains("keeping the plugin installed"), "{log}");
    assert!(node.bin.join("istio-cni").exists());
}

/// Defect 7: `--kubeconfig` is `/dev/zero`, then a huge (sparse) regular file. Neither is
/// read beyond the limit, on the first attempt or on any retry; `/readyz` names the file
/// (and the limit for the huge one); memory stays small; SIGTERM stops the agent promptly.
#[test]
fn a_dev_zero_or_huge_kubeconfig_is_refused_with_bounded_memory() {
    for huge in [false, true] {
        let node = Node::new("net.d");
        std::fs::create_dir(&node.net).unwrap();
        std::fs::write(node.conf(), PRIMARY).unwrap();
        let kubeconfig = node.dir.path().join("kubeconfig");
        let needle = if huge {
            std::fs::File::create(&kubeconfig)
                .unwrap()
                .set_len(2 << 30)
                .unwrap();
            "1 MiB"
        } else {
            std::os::unix::fs::symlink("/dev/zero", &kubeconfig).unwrap();
            "character device"
        };
        let kc = kubeconfig.display().to_string();
        let mut daemon = node.daemon(&[
            "--self-test",
            "false",
            "--kubeconfig",
            &kc,
            "--node-name",
            "node-1",
        ]);
        cap_memory(&daemon);
        wait_not_ready_saying(&daemon, &[&kc, needle]);
        // Retries (1 s, 2 s, …) read no more than the first attempt.
        std::thread::sleep(Duration::from_secs(4));
        let rss = peak_rss_kib(&daemon);
        assert!(rss < 128 * 1024, "huge={huge}: peak RSS {rss} KiB");
        assert_eq!(daemon.get(daemon.ready_port, "/healthz").unwrap().0, 200);
        sigterm_stops_promptly(&mut daemon);
    }
}
