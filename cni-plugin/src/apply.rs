//! Writes a [`Ruleset`] into a netns: one `iptables-restore --noflush` run per family, from
//! inside the netns (see [`Inside`]), and the TPROXY policy routing over netlink.
//!
//! Every iptables process runs with the host's xtables lock replaced by a per-netns lock
//! (`XTABLES_LOCKFILE` set to the netns file, as upstream does), and in a private mount
//! namespace where `/etc/nsswitch.conf` is `/dev/null`, so that `--uid-owner 1337` cannot
//! trigger an NSS look-up (LDAP, sssd) on the ADD path.

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::netns::Inside;
use crate::rules::canon::SavedTables;
use crate::rules::{reconcile, Family, FamilyRules, Rule, Ruleset};

/// Env var that forces the iptables backend: `legacy` or `nft` (upstream's name).
pub const ENV_FORCE_IPTABLES_BINARY: &str = "FORCE_IPTABLES_BINARY";

/// Writing rules failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// No usable iptables binaries on this node.
    #[error("no {family} iptables binaries found: looked for {looked_for} in PATH and /usr/sbin, /sbin, /usr/bin, /bin; install iptables on the node")]
    NoBinaries {
        /// The family.
        family: Family,
        /// The binary names tried.
        looked_for: String,
    },
    /// `FORCE_IPTABLES_BINARY` has a value other than `legacy` or `nft`.
    #[error("{ENV_FORCE_IPTABLES_BINARY}={0:?} is not supported; use \"legacy\" or \"nft\"")]
    BadForce(String),
    /// A binary could not be started.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A binary exited non-zero.
    #[error("{bin} failed ({status}): {stderr}")]
    Failed {
        /// The binary.
        bin: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// An nfnetlink request failed (what, and the kernel's answer).
    #[error("nftables over netlink: {0}")]
    Netlink(String),
    /// Policy routing for TPROXY could not be set up.
    #[error("TPROXY policy routing: {0}")]
    Routing(#[from] crate::routing::RoutingError),
}

/// Which iptables implementation writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (nf_tables with xtables matches).
    Nft,
    /// Plain `iptables`, whatever the node's alternatives point at.
    Default,
}

/// The iptables binaries of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// The family.
    pub family: Family,
    /// The backend they belong to.
    pub backend: Backend,
    /// `…-save`.
    pub save: PathBuf,
    /// `…-restore`.
    pub restore: PathBuf,
}

/// The binaries of both families, chosen once per process, in the host netns.
#[derive(Debug, Clone)]
pub struct Xtables {
    v4: Binaries,
    v6: Option<Binaries>,
}

impl Xtables {
    /// Chooses the backend as upstream Istio does: `FORCE_IPTABLES_BINARY` if set; else
    /// legacy when the host already has legacy tables (kube-proxy in legacy mode), read from
    /// `/proc/net/ip{,6}_tables_names` of the calling thread's netns (call it from the host
    /// netns); else nft; else the plain binaries. IPv6 binaries are optional.
    ///
    /// Errors: [`ApplyError::BadForce`], or [`ApplyError::NoBinaries`] when no IPv4 binaries
    /// exist.
    pub fn detect() -> Result<Xtables, ApplyError> {
        let force = std::env::var(ENV_FORCE_IPTABLES_BINARY)
            .ok()
            .filter(|v| !v.is_empty());
        let force = match force.as_deref() {
            None => None,
            Some("legacy") => Some(Backend::Legacy),
            Some("nft") => Some(Backend::Nft),
            Some(other) => return Err(ApplyError::BadForce(other.to_owned())),
        };
        Ok(Xtables {
            v4: Binaries::detect(Family::V4, force)?,
            v6: Binaries::detect(Family::V6, force).ok(),
        })
    }

    /// The binaries of one iptables variant, `iptables-legacy-*` or `iptables-nft-*`
    /// (whatever `FORCE_IPTABLES_BINARY` says), to remove that variant's rules.
    ///
    /// Errors: [`ApplyError::NoBinaries`] when this node has no IPv4 binaries of it.
    pub fn of_backend(backend: Backend) -> Result<Xtables, ApplyError> {
        Ok(Xtables {
            v4: Binaries::detect(Family::V4, Some(backend))?,
            v6: Binaries::detect(Family::V6, Some(backend)).ok(),
        })
    }

    /// The variant these binaries belong to.
    pub fn backend(&self) -> Backend {
        self.v4.backend
    }

    /// The binaries of `family`.
    ///
    /// Errors: [`ApplyError::NoBinaries`] for IPv6 when `ip6tables` is not installed.
    pub fn binaries(&self, family: Family) -> Result<&Binaries, ApplyError> {
        match family {
            Family::V4 => Ok(&self.v4),
            Family::V6 => self.v6.as_ref().ok_or(ApplyError::NoBinaries {
                family,
                looked_for: "ip6tables-{legacy,nft,}-{save,restore}".into(),
            }),
        }
    }
}

impl Binaries {
    fn detect(family: Family, force: Option<Backend>) -> Result<Binaries, ApplyError> {
        let (base, names_file) = match family {
            Family::V4 => ("iptables", "/proc/net/ip_tables_names"),
            Family::V6 => ("ip6tables", "/proc/net/ip6_tables_names"),
        };
        let find = |backend: Backend| -> Option<Binaries> {
            let infix = match backend {
                Backend::Legacy => "-legacy",
                Backend::Nft => "-nft",
                Backend::Default => "",
            };
            Some(Binaries {
                family,
                backend,
                save: find_binary(&format!("{base}{infix}-save"))?,
                restore: find_binary(&format!("{base}{infix}-restore"))?,
            })
        };
        let not_found = || ApplyError::NoBinaries {
            family,
            looked_for: format!("{base}-legacy-save, {base}-nft-save, {base}-save (and -restore)"),
        };
        if let Some(backend) = force {
            return find(backend).ok_or_else(not_found);
        }
        let host_has_legacy = std::fs::read_to_string(names_file)
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false);
        let order: &[Backend] = if host_has_legacy {
            &[Backend::Legacy, Backend::Nft, Backend::Default]
        } else {
            &[Backend::Nft, Backend::Default, Backend::Legacy]
        };
        order.iter().find_map(|b| find(*b)).ok_or_else(not_found)
    }

    /// Reads the netns's current rules of this family (`…-save`, all tables).
    ///
    /// Errors: [`ApplyError::Spawn`] / [`ApplyError::Failed`].
    pub fn save(&self, inside: &Inside<'_>) -> Result<SavedTables, ApplyError> {
        Ok(SavedTables::parse(&self.save_text(inside)?, self.family))
    }

    /// The raw output of `…-save` (all tables), for diagnostics and tests.
    ///
    /// Errors: [`ApplyError::Spawn`] / [`ApplyError::Failed`].
    pub fn save_text(&self, inside: &Inside<'_>) -> Result<String, ApplyError> {
        // `-save` prints numeric owners and resolves no names: no NSS sandbox needed.
        run_tool(&self.save, &[], None, inside.path(), Sandbox::None)
    }

    /// Feeds `script` to `…-restore --noflush`. A no-op for an empty script.
    ///
    /// Errors: [`ApplyError::Spawn`] / [`ApplyError::Failed`] (then no table that failed
    /// was changed: each table commits atomically).
    pub fn restore(&self, inside: &Inside<'_>, script: &str) -> Result<(), ApplyError> {
        if script.is_empty() {
            return Ok(());
        }
        let mut args = vec!["--noflush"];
        if self.backend == Backend::Legacy {
            args.push("--wait=10");
        }
        run_tool(
            &self.restore,
            &args,
            Some(script),
            inside.path(),
            Sandbox::Nss,
        )
        .map(drop)
    }

    /// Writes `desired` into a netns that is most likely fresh, without reading it first:
    /// upstream's text creates our chains with `-N`, which fails when any of them exists,
    /// and then this falls back to [`Binaries::reconcile`]. So the common case (a new pod
    /// sandbox) costs one `-restore`, and a netns that already has rules still ends up
    /// with exactly `desired`.
    ///
    /// Errors: as [`Binaries::reconcile`].
    pub fn write(&self, inside: &Inside<'_>, desired: &FamilyRules) -> Result<(), ApplyError> {
        match self.restore(inside, &desired.restore_text()) {
            Ok(()) => Ok(()),
            Err(e) => {
                log::debug!(
                    "{} fast path failed ({e}); reconciling with the netns's rules",
                    self.family
                );
                self.reconcile(inside, desired, &[])
            }
        }
    }

    /// Makes this family's rules in the netns exactly `desired`: reads the current rules,
    /// and restores the [`reconcile::script`] that replaces ours. `also_ours` names further
    /// built-in-chain rules to remove (see [`reconcile::script`]).
    ///
    /// Errors: as [`Binaries::save`] and [`Binaries::restore`].
    pub fn reconcile(
        &self,
        inside: &Inside<'_>,
        desired: &FamilyRules,
        also_ours: &[Rule],
    ) -> Result<(), ApplyError> {
        let current = self.save(inside)?;
        self.restore(inside, &reconcile::script(desired, also_ours, &current))
    }
}

/// Writes `ruleset` into the netns: each family, then the routing ([`crate::routing`]).
///
/// Errors: [`ApplyError`]; the caller removes what was written (see [`remove`]).
pub fn apply(inside: &Inside<'_>, xt: &Xtables, ruleset: &Ruleset) -> Result<(), ApplyError> {
    for f in &ruleset.families {
        xt.binaries(f.family)?.write(inside, f)?;
    }
    // iptables-restore leaves a table's flags alone: a dormant nat table (iptables-nft)
    // would keep every rule just written from taking effect. (Legacy rules live in
    // x_tables, which nf_tables' flags do not touch.)
    if xt.backend() != Backend::Legacy {
        crate::nft::wake_dormant(inside, |t| is_table_of(ruleset, t))?;
    }
    crate::routing::apply(inside, ruleset).map_err(ApplyError::Routing)
}

/// Whether `table` is an iptables-nft table (`ip nat`, `ip6 mangle`, …) that `ruleset`
/// writes rules into.
pub fn is_table_of(ruleset: &Ruleset, table: &crate::nft::NfTable) -> bool {
    let family = match table.family {
        crate::nft::NFPROTO_IPV4 => Family::V4,
        crate::nft::NFPROTO_IPV6 => Family::V6,
        _ => return false,
    };
    ruleset
        .family(family)
        .is_some_and(|f| f.rules.iter().any(|r| r.table.name() == table.name))
}

/// Removes every rule of ours from the netns: all `ISTIO_*` chains, the built-in-chain rules
/// that jump to them, the built-in-chain rules of `written` (if given), and the TPROXY
/// routing (when `written` used it, or is unknown). Families whose binaries are missing are
/// skipped.
///
/// Errors: [`ApplyError`] from the first family that fails; later families are still tried.
pub fn remove(
    inside: &Inside<'_>,
    xt: &Xtables,
    written: Option<&Ruleset>,
) -> Result<(), ApplyError> {
    let mut first_err = None;
    for family in [Family::V4, Family::V6] {
        let Ok(bins) = xt.binaries(family) else {
            continue;
        };
        let empty = FamilyRules {
            family,
            rules: Vec::new(),
        };
        let known = written
            .and_then(|r| r.family(family))
            .map(|f| f.rules.as_slice())
            .unwrap_or(&[]);
        if let Err(e) = bins.reconcile(inside, &empty, known) {
            first_err.get_or_insert(e);
        }
    }
    if written.is_none_or(|r| r.local_delivery.is_some()) {
        if let Err(e) = crate::routing::remove(inside) {
            first_err.get_or_insert(ApplyError::Routing(e));
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// `name` in `PATH`, then in `/usr/sbin`, `/sbin`, `/usr/bin` and `/bin`.
pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether a tool runs in the NSS sandbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sandbox {
    /// As it is (tools that resolve no user or group names).
    None,
    /// In a private mount namespace with `/etc/nsswitch.conf` hidden.
    Nss,
}

/// Runs an iptables tool with the per-netns lock (and the NSS sandbox if asked), returning
/// stdout.
fn run_tool(
    bin: &Path,
    args: &[&str],
    stdin: Option<&str>,
    lock: &Path,
    sandbox: Sandbox,
) -> Result<String, ApplyError> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("XTABLES_LOCKFILE", lock)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    if sandbox == Sandbox::Nss {
        let nss = NssSandbox::new();
        // SAFETY: the closure only makes raw syscalls (unshare, mount) with pointers prepared
        // before the fork; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || {
                nss.enter();
                Ok(())
            });
        }
    }
    run_command(&mut cmd, bin, stdin)
}

/// Spawns `cmd` (whose binary is `bin`, for messages) with stdout and stderr piped, feeds
/// it `stdin` if given (stdin must then be piped), and returns its stdout when it
/// succeeds.
///
/// Errors: [`ApplyError::Spawn`] when it cannot run, [`ApplyError::Failed`] with its
/// stderr when it exits non-zero.
pub(crate) fn run_command(
    cmd: &mut Command,
    bin: &Path,
    stdin: Option<&str>,
) -> Result<String, ApplyError> {
    let spawn_err = |source| ApplyError::Spawn {
        bin: bin.into(),
        source,
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // If the tool exits before reading all of it, its status and stderr say why.
        match pipe.write_all(input.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(spawn_err(e)),
            _ => {}
        }
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ApplyError::Failed {
            bin: bin.into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A private mount namespace in which `/etc/nsswitch.conf` is `/dev/null`, entered by a
/// freshly forked child before exec. Best effort: without CAP_SYS_ADMIN, the child runs
/// with the host's files.
struct NssSandbox {
    root: CString,
    dev_null: CString,
    nsswitch: Option<CString>,
}

impl NssSandbox {
    fn new() -> Self {
        let nsswitch = "/etc/nsswitch.conf";
        NssSandbox {
            root: CString::new("/").expect("no NUL"),
            dev_null: CString::new("/dev/null").expect("no NUL"),
            nsswitch: Path::new(nsswitch)
                .exists()
                .then(|| CString::new(nsswitch).expect("no NUL")),
        }
    }

    /// Called in the child between fork and exec: async-signal-safe syscalls only.
    fn enter(&self) {
        let Some(nsswitch) = &self.nsswitch else {
            return;
        };
        // SAFETY: plain syscalls with valid NUL-terminated strings owned by `self`.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return;
            }
            let none = std::ptr::null();
            if libc::mount(
                none,
                self.root.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ) != 0
            {
                return;
            }
            libc::mount(
                self.dev_null.as_ptr(),
                nsswitch.as_ptr(),
                none,
                libc::MS_BIND,
                none.cast(),
            );
        }
    }
}
