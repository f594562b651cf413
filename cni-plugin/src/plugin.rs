//! The CNI verbs, wiring the stages together (CNI spec 1.1.0, "CNI operations").
//!
//! ADD: config → pod decision → ruleset → lock the netns → remove other backends' rules →
//! apply in the netns → read-back (once more after a second write against what the netns
//! holds, when the first disagrees) → probe → result. If anything after the first write
//! fails, ADD removes what it wrote before returning the error, so a pod never starts
//! half-redirected.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::{self, Backend, Xtables};
use crate::cni::result::chained_result;
use crate::cni::{CniEnv, CniVersion, Command, ErrorCode};
use crate::config::{ConfigError, NetConf};
use crate::error::Error;
use crate::lock::{self, NetnsLock};
use crate::netns::{Inside, Netns, NetnsError};
use crate::nft::NfTable;
use crate::plan::Rules;
use crate::pluginevent;
use crate::pod::{self, PodRef};
use crate::rules::nftables::NftRuleset;
use crate::rules::{Family, Ruleset};
use crate::validate;

/// Runs the verb in `env` with the network configuration `stdin`. Returns the JSON to print
/// on stdout, if any (ADD's result, VERSION's answer).
///
/// DEL never fails: it parses the configuration leniently (a bad field is logged and
/// ignored, since removing rules needs none of it) and removes what it safely can (CNI
/// spec 1.1.0, DEL: "Plugins should generally complete a DEL action without error even if
/// some resources are missing"). A DEL that failed would block the pod's teardown.
///
/// Errors: [`Error`], which carries the CNI error code.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, Error> {
    match env.command {
        Command::Version => return Ok(Some(version(stdin))),
        Command::Del => {
            del(env, stdin);
            return Ok(None);
        }
        _ => {}
    }
    let started = Instant::now();
    let conf = NetConf::parse(stdin)?;
    init_logging(env, Some(&conf));
    match env.command {
        Command::Add => {
            let added = add(env, &conf).map(Some);
            log::debug!("ADD done in {:?} in the process", started.elapsed());
            added
        }
        Command::Check => check(env, &conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        // Nothing of ours outlives a netns, so there is nothing to collect.
        Command::Gc => Ok(None),
        Command::Version | Command::Del => Ok(None),
    }
}

/// Installs the logger for this invocation: the configuration's level, file and agent
/// socket, or (without a usable configuration) info to stderr and the default agent dir.
fn init_logging(env: &CniEnv, conf: Option<&NetConf>) {
    match conf {
        Some(conf) => crate::logging::init(
            conf.log_level.filter(),
            log_context(env),
            conf.log_file.as_deref(),
            Some(&conf.agent_run_dir),
        ),
        None => crate::logging::init(
            log::LevelFilter::Info,
            log_context(env),
            None,
            Some(std::path::Path::new(crate::config::DEFAULT_AGENT_RUN_DIR)),
        ),
    }
}

/// `VERB <first 12 characters of the container ID> [namespace/name]`.
fn log_context(env: &CniEnv) -> String {
    let id: String = env
        .container_id
        .as_deref()
        .unwrap_or("-")
        .chars()
        .take(12)
        .collect();
    let mut ctx = format!("{} {id}", env.command);
    if let (Some(ns), Some(name)) = (
        env.args.get(crate::pod::ARG_POD_NAMESPACE),
        env.args.get(crate::pod::ARG_POD_NAME),
    ) {
        ctx.push_str(&format!(" {ns}/{name}"));
    }
    ctx
}

/// VERSION: the supported versions, echoing the request's `cniVersion` when it has one.
fn version(stdin: &[u8]) -> Value {
    let requested = crate::config::request_version(stdin);
    json!({
        "cniVersion": requested.unwrap_or_else(|| CniVersion::LATEST.to_string()),
        "supportedVersions": CniVersion::SUPPORTED.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// The netns of the request, opened on first use and then the same handle for every step.
struct LazyNetns<'a> {
    env: &'a CniEnv,
    netns: std::cell::OnceCell<Netns>,
}

impl<'a> LazyNetns<'a> {
    fn new(env: &'a CniEnv) -> Self {
        LazyNetns {
            env,
            netns: std::cell::OnceCell::new(),
        }
    }

    fn get(&self) -> Result<&Netns, Error> {
        if let Some(n) = self.netns.get() {
            return Ok(n);
        }
        let opened = Netns::open(env_netns(self.env)?)?;
        Ok(self.netns.get_or_init(|| opened))
    }
}

/// The pod's addresses: from `prevResult` when the chain gave one; else (standalone mode,
/// multus) from the interfaces in its netns, as upstream reads them there.
fn pod_ips_of(conf: &NetConf, netns: &LazyNetns<'_>) -> Result<Vec<std::net::IpAddr>, Error> {
    if conf.prev_result.is_some() {
        return Ok(crate::cni::result::pod_ips(conf.prev_result.as_ref()));
    }
    netns
        .get()?
        .run(crate::routing::pod_addresses)?
        .map_err(|e| Error::Apply(crate::apply::ApplyError::Routing(e)))
}

/// What ADD and CHECK do for the pod of the request.
enum Plan {
    /// Nothing: not a pod of ours.
    PassThrough,
    /// Sidecar redirection: these rules, written by the plugin.
    Sidecar(PodRef, Rules),
    /// Ambient mode (netconf `ambient_enabled` and the enablement selectors match): the
    /// node agent enrols the pod.
    Ambient(PodRef),
}

/// Looks the pod up (and with `ambient_enabled`, its namespace) and decides what it
/// gets, in upstream's order (`cni/pkg/plugin/plugin.go`): the checks without the API
/// first; then, with ambient mode on, an ambient pod goes to the node agent; else the
/// sidecar decision, from the same pod read.
fn plan(env: &CniEnv, conf: &NetConf, netns: &LazyNetns<'_>) -> Result<Plan, Error> {
    let pod_ref = match pod::pre_api(conf, &env.args) {
        Ok(p) => p,
        Err(skip) => {
            log::info!("pass through: {skip}");
            return Ok(Plan::PassThrough);
        }
    };
    let start = Instant::now();
    let pod = if conf.ambient_enabled {
        let (pod, namespace_labels) = pod::PodSource::of(conf).fetch_with_namespace(&pod_ref)?;
        log::debug!(
            "read pod {pod_ref} and its namespace in {:?}",
            start.elapsed()
        );
        if conf.enablement.matches(&pod, &namespace_labels) {
            return Ok(Plan::Ambient(pod_ref));
        }
        pod
    } else {
        let pod = pod::PodSource::of(conf).fetch(&pod_ref)?;
        log::debug!("read pod {pod_ref} in {:?}", start.elapsed());
        pod
    };
    let redirect = match crate::plan::redirect_for_pod(&pod)? {
        Ok(r) => r,
        Err(skip) => {
            log::info!("pod {pod_ref}: pass through: {skip}");
            return Ok(Plan::PassThrough);
        }
    };
    let ipv6 = crate::rules::iptables::has_ipv6(&pod_ips_of(conf, netns)?);
    Ok(Plan::Sidecar(
        pod_ref,
        Rules::build(&redirect, ipv6, conf.native_nftables),
    ))
}

/// How long ADD waits for the node agent to enrol an ambient pod: the agent bounds its
/// own work to [`pluginevent::AGENT_DEADLINE`] (API read, netns checks, rules, ztunnel's
/// ack, its listeners), and answers before this; the margin covers a loaded node. Far
/// inside kubelet's `--runtime-request-timeout` (2 min), so the runtime sees our error,
/// not its own timeout.
pub const AMBIENT_ADD_WAIT: Duration = Duration::from_secs(30);

/// ADD of an ambient pod: the node agent enrols it (upstream's plugin-event socket,
/// [`pluginevent::send_add`]) and answers once ztunnel captures the pod; nothing is
/// written here. The event carries `CNI_NETNS`, the pod's name and namespace, and
/// `prevResult`'s addresses.
///
/// Errors: [`Error::Ambient`]: no agent, a refusal (with the agent's reason), or no answer
/// within [`AMBIENT_ADD_WAIT`]. The agent leaves nothing in the netns when it refuses.
fn add_ambient(env: &CniEnv, conf: &NetConf, pod_ref: &PodRef) -> Result<(), Error> {
    let start = Instant::now();
    let nets = crate::cni::result::pod_nets(conf.prev_result.as_ref());
    let event = pluginevent::AddEvent::new(
        &env_netns(env)?.to_string_lossy(),
        &pod_ref.name,
        &pod_ref.namespace,
        &nets,
    );
    pluginevent::send_add(&conf.agent_run_dir, &event, AMBIENT_ADD_WAIT)?;
    log::info!(
        "pod {pod_ref}: enrolled in ambient mode by the node agent in {:?}",
        start.elapsed()
    );
    Ok(())
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, Error> {
    let result = chained_result(conf.prev_result.as_ref(), conf.cni_version);
    let netns = LazyNetns::new(env);
    let (pod_ref, planned) = match plan(env, conf, &netns)? {
        Plan::PassThrough => return Ok(result),
        Plan::Ambient(pod_ref) => {
            add_ambient(env, conf, &pod_ref)?;
            return Ok(result);
        }
        Plan::Sidecar(pod_ref, planned) => (pod_ref, planned),
    };
    let probe = conf
        .validation
        .probe
        .then(|| Duration::from_millis(conf.validation.timeout_ms));
    // One writer per netns from here to the end of the rollback (see `lock`).
    let start = Instant::now();
    let _lock = lock_netns(conf, netns.get()?)?;
    log::debug!("netns opened and locked in {:?}", start.elapsed());
    let start = Instant::now();
    match planned {
        Rules::Iptables(ruleset) => {
            let xt = Xtables::detect()?;
            netns.get()?.run(|inside| {
                // The other backends' rules go first: never two backends' rules.
                remove_other_backends(inside, &xt)?;
                program(inside, &xt, &ruleset, probe)
            })??;
        }
        Rules::Nftables(ruleset) => {
            let xt = Xtables::detect().ok();
            netns
                .get()?
                .run(|inside| program_nft(inside, xt.as_ref(), &ruleset, probe))??;
        }
    }
    log::info!(
        "pod {pod_ref}: redirection rules written and validated in {:?}",
        start.elapsed()
    );
    Ok(result)
}

/// The per-netns lock for ADD and CHECK ([`lock`]), waiting up to [`lock::ADD_WAIT`]. A
/// lock file that cannot be used at all (a read-only or broken `cni_agent_run_dir`) does
/// not stop pods from starting: ADD then runs without it, as before the lock existed, with
/// a warning, and STATUS reports it.
///
/// Errors: [`Error::Lock`] with [`lock::LockError::Busy`] (code 11, try again later).
fn lock_netns(conf: &NetConf, netns: &Netns) -> Result<Option<NetnsLock>, Error> {
    match NetnsLock::acquire(&conf.agent_run_dir, netns.id(), lock::ADD_WAIT) {
        Ok(l) => Ok(Some(l)),
        Err(e @ lock::LockError::Busy { .. }) => Err(e.into()),
        Err(e) => {
            log::warn!("{e}; going on without the per-netns lock");
            Ok(None)
        }
    }
}

/// Deletes our nftables tables when the netns has any (a node that switched from the
/// nftables backend to iptables), so that a pod never holds both backends' rules.
/// `tables` is the kernel's table list; `None` (it could not be read: a kernel without
/// nf_tables) means there are none.
///
/// Errors: [`Error::Apply`] when they cannot be deleted.
fn remove_nft_tables(inside: &Inside<'_>, tables: Option<&[NfTable]>) -> Result<(), Error> {
    if !tables.is_some_and(|t| t.iter().any(NfTable::is_ours)) {
        return Ok(());
    }
    log::info!("removing the nftables backend's tables before writing iptables rules");
    crate::nft::remove(inside)?;
    Ok(())
}

/// Before an iptables write with `xt`: removes our nftables tables and the Istio rules of
/// the other iptables variant (`iptables-legacy` versus `iptables-nft`), when the netns
/// has any, so that a pod never holds two sets of rules (a node that switched backends,
/// or `FORCE_IPTABLES_BINARY` changed). One nfnetlink table dump decides; nothing is
/// spawned for a netns that holds nothing else.
///
/// Errors: [`Error::Apply`] when a removal fails.
fn remove_other_backends(inside: &Inside<'_>, xt: &Xtables) -> Result<(), Error> {
    let tables = crate::nft::tables(inside)
        .inspect_err(|e| log::debug!("listing nftables tables over netlink: {e}"))
        .ok();
    remove_nft_tables(inside, tables.as_deref())?;
    remove_iptables_variants(inside, Some(xt.backend()), tables.as_deref())
}

/// Removes the Istio rules of every iptables variant other than `keep` (of both with
/// `None`) that has tables in the netns: legacy when `/proc/thread-self/net/ip{,6}_tables_names`
/// lists any, iptables-nft when the kernel's table dump `tables` has an `ip`/`ip6` table.
/// With `keep` = [`Backend::Default`] (plain `iptables`, variant unknown) nothing is
/// removed. A variant whose binaries this node lacks is skipped.
///
/// Errors: [`Error::Apply`] when a removal fails.
fn remove_iptables_variants(
    inside: &Inside<'_>,
    keep: Option<Backend>,
    tables: Option<&[NfTable]>,
) -> Result<(), Error> {
    if keep == Some(Backend::Default) {
        return Ok(());
    }
    let mut first_err = None;
    for variant in [Backend::Legacy, Backend::Nft] {
        let there = keep != Some(variant)
            && match variant {
                Backend::Legacy => legacy_iptables_tables(),
                _ => tables.is_some_and(|t| t.iter().any(NfTable::is_iptables)),
            };
        if !there {
            continue;
        }
        let Ok(other) = Xtables::of_backend(variant) else {
            continue;
        };
        // A variant that cannot even list its tables (iptables-nft facing a native `ip`
        // table it cannot read) holds nothing of ours that it could have written.
        match has_iptables_rules(inside, &other) {
            Ok(false) => {}
            Ok(true) => {
                log::info!(
                    "removing the Istio rules of iptables {variant:?} (another backend wrote them)"
                );
                if let Err(e) = apply::remove(inside, &other, None) {
                    first_err.get_or_insert(Error::from(e));
                }
            }
            Err(e) => log::warn!("cannot list the rules of iptables {variant:?}: {e}"),
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// [`program`] for the nftables backend: the transaction is applied and validated
/// (read-back, probe); the iptables backend's rules, when the netns has any (a node that
/// switched backends), are removed before the probe. No process is run: the write and
/// the read-back are nfnetlink messages. On any failure everything written is removed.
///
/// Errors: [`Error::Apply`] when a write fails, [`Error::Validate`] when a check does.
pub fn program_nft(
    inside: &Inside<'_>,
    xt: Option<&Xtables>,
    ruleset: &NftRuleset,
    probe: Option<Duration>,
) -> Result<(), Error> {
    let t = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_and_read_back_nft(inside, xt, ruleset)?;
        log::debug!("applied and read back in {:?}", t.elapsed());
        if let (Some(timeout), Some(port)) = (probe, ruleset.probe_port) {
            for family in ruleset.routing_needs().families {
                validate::probe(inside, family, ruleset.proxy_uid, port, timeout)?;
            }
            log::debug!("probed after {:?}", t.elapsed());
        }
        Ok(())
    }))
    .unwrap_or_else(|panic| Err(Error::Internal(panic_message(&*panic))));
    if let Err(e) = &outcome {
        log::warn!("{e}; removing the rules written so far");
        if let Err(cleanup) = crate::nft::remove(inside) {
            log::error!("removing the nftables tables after a failed ADD also failed: {cleanup}");
        }
        if ruleset.local_delivery.is_some() {
            if let Err(cleanup) = crate::routing::remove(inside) {
                log::error!(
                    "removing the policy routing after a failed ADD also failed: {cleanup}"
                );
            }
        }
    }
    outcome
}

/// The tools of the backends that this node has. (The nftables backend needs none: it
/// speaks nfnetlink itself.)
#[derive(Debug, Clone)]
pub struct Tools {
    /// The iptables binaries, when the node has them.
    pub xt: Option<Xtables>,
}

impl Tools {
    /// Looks for the iptables binaries.
    pub fn detect() -> Tools {
        Tools {
            xt: Xtables::detect().ok(),
        }
    }

    fn xt(&self) -> Result<&Xtables, Error> {
        match &self.xt {
            Some(xt) => Ok(xt),
            None => Err(Xtables::detect().err().map_or_else(
                || Error::Internal("iptables appeared after detection".into()),
                Error::from,
            )),
        }
    }
}

/// Read-back of `rules` with their backend, for the node agent's repair loop.
///
/// Errors: [`Error::Validate`] with what is missing or wrong, [`Error::Apply`] when
/// iptables is missing for iptables rules.
pub fn read_back_rules(inside: &Inside<'_>, tools: &Tools, rules: &Rules) -> Result<(), Error> {
    match rules {
        Rules::Iptables(r) => Ok(validate::read_back(inside, tools.xt()?, r)?),
        Rules::Nftables(r) => Ok(crate::nft::read_back(inside, r)?),
    }
}

/// [`reprogram`] with either backend: writes `rules` into a running pod's netns and reads
/// them back, removing the other backend's rules first when there are any. A failure
/// removes nothing of what the pod had (each backend's write is atomic).
///
/// Errors: [`Error::Apply`] when the write fails, [`Error::Validate`] when the read-back
/// does.
pub fn reprogram_rules(inside: &Inside<'_>, tools: &Tools, rules: &Rules) -> Result<(), Error> {
    match rules {
        Rules::Iptables(r) => {
            let xt = tools.xt()?;
            remove_other_backends(inside, xt)?;
            reprogram(inside, xt, r)
        }
        Rules::Nftables(r) => write_and_read_back_nft(inside, tools.xt.as_ref(), r),
    }
}

/// The nftables backend's write and read-back, shared by ADD and repair: the legacy
/// iptables backend's rules go first when the netns has any; then one nf_tables batch,
/// the routing, and the read-back, whose table dump also shows iptables-nft's tables,
/// whose rules are removed then (with the routing put back, since removing iptables rules
/// removes the TPROXY routing too).
///
/// Errors: [`Error::Apply`] when a write fails, [`Error::Validate`] when the read-back does.
fn write_and_read_back_nft(
    inside: &Inside<'_>,
    xt: Option<&Xtables>,
    ruleset: &NftRuleset,
) -> Result<(), Error> {
    if xt.is_some() {
        let tables = crate::nft::tables(inside).ok();
        remove_iptables_variants(inside, None, tables.as_deref())?;
    }
    let written = crate::nft::apply(inside, ruleset)?;
    let needs = ruleset.routing_needs();
    crate::routing::apply_needs(inside, &needs).map_err(apply::ApplyError::Routing)?;
    crate::nft::settle_and_read_back(inside, ruleset, &written, || {
        // iptables-nft's rules that appeared meanwhile: that variant's tools remove them.
        if let Some(xt) = xt.and_then(|_| Xtables::of_backend(Backend::Nft).ok()) {
            apply::remove(inside, &xt, None)?;
        }
        crate::routing::apply_needs(inside, &needs).map_err(apply::ApplyError::Routing)
    })?;
    Ok(())
}

/// Whether the netns has tables of the legacy iptables backend, which nft does not see:
/// they are listed in `/proc/thread-self/net/ip{,6}_tables_names` (this thread is in the
/// netns). A fresh pod netns has none, so ADD then runs no `iptables-save`. (iptables-nft's
/// tables show up in the nft listing that the read-back makes anyway.)
fn legacy_iptables_tables() -> bool {
    ["ip_tables_names", "ip6_tables_names"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
            .is_ok_and(|s| !s.trim().is_empty())
    })
}

/// Whether the netns holds iptables rules of ours (an `ISTIO_` chain in either family).
fn has_iptables_rules(inside: &Inside<'_>, xt: &Xtables) -> Result<bool, Error> {
    for family in [Family::V4, Family::V6] {
        let Ok(bins) = xt.binaries(family) else {
            continue;
        };
        if bins.save_text(inside)?.contains(crate::rules::CHAIN_PREFIX) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes `ruleset` inside the netns and validates it: read-back, then, with `probe`, the
/// loopback probe with that timeout per family. On any failure removes what was written.
/// ADD uses it, and so does the node agent's repair (without the probe, since the
/// sidecar's own listener holds the capture port).
///
/// Errors: [`Error::Apply`] when the write fails, [`Error::Validate`] when a check does.
pub fn program(
    inside: &Inside<'_>,
    xt: &Xtables,
    ruleset: &Ruleset,
    probe: Option<Duration>,
) -> Result<(), Error> {
    let t = Instant::now();
    // A panic below must not skip the rollback: it is caught here, still inside the netns,
    // and treated like any other failure.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_and_validate(inside, xt, ruleset, probe, t)
    }))
    .unwrap_or_else(|panic| Err(Error::Internal(panic_message(&*panic))));
    if let Err(e) = &outcome {
        log::warn!("{e}; removing the rules written so far");
        if let Err(cleanup) = apply::remove(inside, xt, Some(ruleset)) {
            log::error!("removing the rules after a failed ADD also failed: {cleanup}");
        }
    }
    outcome
}

/// Writes `ruleset` inside the netns and reads it back, for a pod that is already running
/// (the node agent's repair). Unlike [`program`], a failure removes nothing: the pod keeps
/// whatever it had (each table is replaced atomically by `iptables-restore`, so a failed
/// write changed nothing), and a pod with one drifted rule is never left with none. No
/// probe: the sidecar's own listener holds the capture port.
///
/// Errors: [`Error::Apply`] when the write fails, [`Error::Validate`] when the read-back
/// does.
pub fn reprogram(inside: &Inside<'_>, xt: &Xtables, ruleset: &Ruleset) -> Result<(), Error> {
    write_and_validate(inside, xt, ruleset, None, Instant::now())
}

/// The text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Test seam: panic right after the rules are written (tests only).
#[cfg(test)]
static PANIC_AFTER_APPLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn write_and_validate(
    inside: &Inside<'_>,
    xt: &Xtables,
    ruleset: &Ruleset,
    probe: Option<Duration>,
    t: Instant,
) -> Result<(), Error> {
    apply::apply(inside, xt, ruleset)
        .map_err(Error::from)
        .inspect(|()| {
            #[cfg(test)]
            if PANIC_AFTER_APPLY.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("injected panic after apply");
            }
        })
        .and_then(|()| {
            log::debug!("applied in {:?}", t.elapsed());
            match validate::read_back(inside, xt, ruleset) {
                // The first write assumes a fresh netns and appends upstream's text. When
                // the netns holds more than that (e.g. a rule of other software ahead of
                // ours), write once more against what it holds, which puts ours at the
                // head of shared built-in chains, and read back again.
                Err(validate::ValidateError::Mismatch(problems)) => {
                    log::info!(
                        "read-back after the first write: {}; writing against what the netns holds",
                        problems.join("; ")
                    );
                    for f in &ruleset.families {
                        xt.binaries(f.family)?.reconcile(inside, f, &[])?;
                    }
                    validate::read_back(inside, xt, ruleset).map_err(Error::from)
                }
                other => other.map_err(Error::from),
            }
        })
        .and_then(|()| {
            log::debug!("read back after {:?}", t.elapsed());
            let Some(timeout) = probe else {
                return Ok(());
            };
            let Some(port) = ruleset.probe_port else {
                log::debug!("the pod excludes lo from capture: no loopback probe");
                return Ok(());
            };
            for f in &ruleset.families {
                validate::probe(inside, f.family, ruleset.proxy_uid, port, timeout)?;
            }
            log::debug!("probed after {:?}", t.elapsed());
            Ok(())
        })
}

/// `CNI_NETNS`, which [`CniEnv`] requires for ADD and CHECK.
fn env_netns(env: &CniEnv) -> Result<&std::path::Path, Error> {
    env.netns
        .as_deref()
        .ok_or(Error::Env(crate::cni::EnvError::Missing("CNI_NETNS")))
}

/// CHECK: the rules are in place (read-back). CHECK exists from CNI 0.4.0 on; an older
/// request is refused with code 1.
fn check(env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    if conf.cni_version < CniVersion::V0_4_0 {
        return Err(Error::Config(ConfigError::Version(
            format!(
                "CHECK needs cniVersion 0.4.0 or later; this request is {}",
                conf.cni_version
            ),
            ErrorCode::INCOMPATIBLE_VERSION,
        )));
    }
    let netns = LazyNetns::new(env);
    let (pod_ref, planned) = match plan(env, conf, &netns)? {
        Plan::PassThrough => return Ok(()),
        // An ambient pod's rules are the node agent's; upstream's CHECK does not look at
        // them either.
        Plan::Ambient(pod_ref) => {
            log::info!("pod {pod_ref}: ambient; its rules are the node agent's to check");
            return Ok(());
        }
        Plan::Sidecar(pod_ref, planned) => (pod_ref, planned),
    };
    // Not halfway through another ADD's write.
    let _lock = lock_netns(conf, netns.get()?)?;
    match planned {
        Rules::Iptables(ruleset) => {
            let xt = Xtables::detect()?;
            netns
                .get()?
                .run(|inside| validate::read_back(inside, &xt, &ruleset))??;
        }
        Rules::Nftables(ruleset) => {
            netns
                .get()?
                .run(|inside| crate::nft::read_back(inside, &ruleset))??;
        }
    }
    log::info!("pod {pod_ref}: redirection rules present");
    Ok(())
}

/// DEL: removes our rules when the netns still exists. Never fails: a failed DEL would
/// block the pod's teardown, and the rules go away with the netns anyway. A configuration
/// that does not parse is logged and otherwise ignored. Never touches this process's or
/// PID 1's namespace ([`Netns::open`] refuses them).
fn del(env: &CniEnv, stdin: &[u8]) {
    let run_dir = match NetConf::parse(stdin) {
        Ok(conf) => {
            init_logging(env, Some(&conf));
            conf.agent_run_dir
        }
        Err(e) => {
            init_logging(env, None);
            log::warn!("ignoring a network configuration error for DEL: {e}");
            crate::config::DEFAULT_AGENT_RUN_DIR.into()
        }
    };
    let Some(path) = env.netns.as_deref() else {
        log::debug!("no CNI_NETNS: nothing to remove");
        return;
    };
    let netns = match Netns::open(path) {
        Ok(n) => n,
        Err(NetnsError::NotFound(_)) => {
            log::debug!("netns {} is gone: nothing to remove", path.display());
            return;
        }
        Err(e) => {
            log::warn!("{e}; leaving the rules to the netns teardown");
            return;
        }
    };
    // Wait for an ADD in flight, but not for long: DEL never blocks teardown.
    let _lock = NetnsLock::acquire_existing(&run_dir, netns.id(), lock::DEL_WAIT)
        .inspect_err(|e| log::warn!("{e}; removing the rules without the lock"))
        .ok();
    // Both backends' rules go: the configuration may have changed since ADD.
    let removed = netns
        .run(crate::nft::remove)
        .map_err(Error::from)
        .and_then(|r| r.map_err(Error::from));
    if let Err(e) = removed {
        log::warn!("removing nftables tables from {}: {e}", path.display());
    }
    // Every iptables variant that has tables there (the backend may have changed since
    // ADD), or the node's plain `iptables` when it has neither variant's binaries.
    let outcome = netns
        .run(|inside| -> Result<(), Error> {
            let variants = [Backend::Legacy, Backend::Nft]
                .iter()
                .any(|b| Xtables::of_backend(*b).is_ok());
            if !variants {
                return Ok(apply::remove(inside, &Xtables::detect()?, None)?);
            }
            let tables = crate::nft::tables(inside).ok();
            let variants = remove_iptables_variants(inside, None, tables.as_deref());
            // The TPROXY routing, whatever wrote it, also when a variant failed.
            crate::routing::remove(inside).map_err(apply::ApplyError::Routing)?;
            variants
        })
        .map_err(Error::from)
        .and_then(|r| r);
    if let Err(e) = outcome {
        log::warn!(
            "removing rules from {}: {e}; leaving them to the netns teardown",
            path.display()
        );
    }
}

/// STATUS: whether ADD could work now.
fn status(conf: &NetConf) -> Result<(), Error> {
    let mut problems = Vec::new();
    if let Err(e) = std::fs::File::open(conf.kubeconfig()) {
        problems.push(format!("kubeconfig {}: {e}", conf.kubeconfig().display()));
    }
    // The nftables backend needs no tool, only a kernel that speaks nf_tables.
    if conf.native_nftables {
        if let Err(e) = crate::nft_wire::generation() {
            problems.push(format!(
                "native_nftables is on, but the kernel does not answer nf_tables requests ({e}); load the nf_tables module or turn native_nftables off"
            ));
        }
    } else {
        match Xtables::detect() {
            Ok(xt) => {
                if let Err(e) = xt.binaries(Family::V4) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if let Err(e) = NetnsLock::check(&conf.agent_run_dir) {
        problems.push(format!("{e}: ADD would run without the per-netns lock"));
    }
    for (cap, why) in REQUIRED_CAPS {
        match caps::has_cap(None, caps::CapSet::Effective, *cap) {
            Ok(true) => {}
            Ok(false) => problems.push(format!("capability {cap} missing (needed to {why})")),
            Err(e) => problems.push(format!("cannot read capabilities: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::NotAvailable(problems.join("; ")))
    }
}

/// Capabilities ADD needs, with the reason.
pub const REQUIRED_CAPS: &[(caps::Capability, &str)] = &[
    (
        caps::Capability::CAP_SYS_ADMIN,
        "enter the pod netns and sandbox iptables",
    ),
    (
        caps::Capability::CAP_NET_ADMIN,
        "write iptables rules and routes",
    ),
    (caps::Capability::CAP_NET_RAW, "run iptables"),
    (caps::Capability::CAP_SETUID, "probe as the proxy's fsuid"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan_for_pod, Plan};
    use crate::scratch::ScratchNetns;

    /// The ruleset of an injected pod with default settings (IPv4 only).
    fn meshed_ruleset() -> Box<Ruleset> {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default",
                         "annotations": {"sidecar.istio.io/status": "{}"}},
            "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"]}]}
        }))
        .unwrap();
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            panic!("meshed pod")
        };
        ruleset
    }

    /// A netns whose nat PREROUTING already holds a rule of other software: ADD's write
    /// puts ours at the head, in the order they would have alone, also with upstream's own
    /// inserts (virtual interfaces, excluded interfaces), and the read-back passes. Needs
    /// root.
    #[test]
    fn ours_go_first_in_a_shared_chain_also_with_positioned_rules() {
        let _seam = SEAM.lock().unwrap_or_else(|p| p.into_inner());
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default", "annotations": {
                "sidecar.istio.io/status": "{}",
                "istio.io/reroute-virtual-interfaces": "veth-a,veth-b",
                "traffic.sidecar.istio.io/excludeInterfaces": "eth9"}},
            "spec": {"containers": [{"name": "istio-proxy", "args": ["proxy", "sidecar"]}]}
        }))
        .unwrap();
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        let Plan::Redirect(ruleset) = plan_for_pod(&conf, &pod).unwrap() else {
            panic!("meshed pod")
        };
        let xt = Xtables::detect().unwrap();
        let scratch = ScratchNetns::create().unwrap();
        scratch
            .netns()
            .run(|inside| {
                let b = xt.binaries(Family::V4)?;
                b.restore(inside, "*nat\n-A PREROUTING -p tcp -j RETURN\nCOMMIT\n")?;
                program(inside, &xt, &ruleset, None)
            })
            .unwrap()
            .unwrap();
        let saved = scratch
            .netns()
            .run(|inside| xt.binaries(Family::V4).and_then(|b| b.save_text(inside)))
            .unwrap()
            .unwrap();
        let prerouting: Vec<&str> = saved
            .lines()
            .filter(|l| l.starts_with("-A PREROUTING"))
            .collect();
        assert_eq!(
            prerouting.last(),
            Some(&"-A PREROUTING -p tcp -j RETURN"),
            "the foreign rule comes after ours: {prerouting:?}"
        );
    }

    /// The tests that write rules share [`PANIC_AFTER_APPLY`]: one at a time.
    static SEAM: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A panic between the write and the end of validation is caught inside the netns,
    /// and the rules are removed before ADD reports it (code 105). Needs root.
    #[test]
    fn a_panic_after_the_write_still_rolls_back() {
        let _seam = SEAM.lock().unwrap_or_else(|p| p.into_inner());
        let ruleset = meshed_ruleset();
        let xt = Xtables::detect().unwrap();
        let scratch = ScratchNetns::create().unwrap();
        PANIC_AFTER_APPLY.store(true, std::sync::atomic::Ordering::SeqCst);
        let outcome = scratch
            .netns()
            .run(|inside| program(inside, &xt, &ruleset, None))
            .expect("the netns thread returns, it does not die");
        PANIC_AFTER_APPLY.store(false, std::sync::atomic::Ordering::SeqCst);
        let err = outcome.unwrap_err();
        assert_eq!(err.code(), ErrorCode::INTERNAL, "{err}");
        assert!(err.to_string().contains("injected panic"), "{err}");
        let left = scratch
            .netns()
            .run(|inside| validate::read_back(inside, &xt, &ruleset))
            .unwrap();
        assert!(left.is_err(), "the rules were removed");
        let saved = scratch
            .netns()
            .run(|inside| xt.binaries(Family::V4).and_then(|b| b.save_text(inside)))
            .unwrap()
            .unwrap();
        assert!(
            !saved.contains("ISTIO"),
            "nothing of ours is left:\n{saved}"
        );
    }

    fn istio_lines(scratch: &ScratchNetns, xt: &Xtables) -> usize {
        scratch
            .netns()
            .run(|inside| xt.binaries(Family::V4).and_then(|b| b.save_text(inside)))
            .unwrap()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("ISTIO"))
            .count()
    }

    /// Repair's policy: a failed rewrite keeps what the pod had; ADD's: it removes all.
    #[test]
    fn reprogram_keeps_what_the_pod_had_and_program_removes_all() {
        let _seam = SEAM.lock().unwrap_or_else(|p| p.into_inner());
        let ruleset = meshed_ruleset();
        // A rewrite that iptables-restore refuses: an unknown match module.
        let mut bad = (*ruleset).clone();
        bad.families[0].rules.push(crate::rules::Rule {
            table: crate::rules::Table::Nat,
            chain: "ISTIO_OUTPUT".into(),
            position: None,
            args: ["-m", "no_such_match_xyz", "-j", "RETURN"]
                .map(String::from)
                .to_vec(),
        });
        let xt = Xtables::detect().unwrap();
        let scratch = ScratchNetns::create().unwrap();
        let run = |f: &(dyn Fn(&Inside<'_>) -> Result<(), Error> + Sync)| {
            scratch.netns().run(|inside| f(inside)).unwrap()
        };
        run(&|inside| program(inside, &xt, &ruleset, None)).unwrap();
        // One rule drifts away.
        run(&|inside| {
            let b = xt.binaries(Family::V4)?;
            b.restore(inside, "*nat\n-D ISTIO_OUTPUT 1\nCOMMIT\n")?;
            Ok(())
        })
        .unwrap();
        let drifted = istio_lines(&scratch, &xt);
        assert!(drifted > 0);
        assert!(run(&|inside| reprogram(inside, &xt, &bad)).is_err());
        assert_eq!(
            istio_lines(&scratch, &xt),
            drifted,
            "repair kept what was there"
        );
        assert!(run(&|inside| program(inside, &xt, &bad, None)).is_err());
        assert_eq!(istio_lines(&scratch, &xt), 0, "ADD removed everything");
    }
}
