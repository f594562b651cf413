//! The CNI verbs, wiring the stages together (CNI spec 1.1.0, "CNI operations").
//!
//! ADD: config → pod decision → ruleset → apply in the netns → read-back → probe → result.
//! If anything after the first write fails, ADD removes what it wrote before returning the
//! error, so a pod never starts half-redirected.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::{self, Xtables};
use crate::cni::result::chained_result;
use crate::cni::{CniEnv, CniVersion, Command};
use crate::config::NetConf;
use crate::error::Error;
use crate::netns::{Inside, Netns, NetnsError};
use crate::plan::{plan_for_pod, Plan};
use crate::pod::{self, PodRef};
use crate::rules::{Family, Ruleset};
use crate::validate;

/// Runs the verb in `env` with the network configuration `stdin`. Returns the JSON to print
/// on stdout, if any (ADD's result, VERSION's answer).
///
/// Errors: [`Error`], which carries the CNI error code.
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, Error> {
    if env.command == Command::Version {
        return Ok(Some(version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    crate::logging::init(
        conf.log_level.filter(),
        log_context(env),
        conf.log_file.as_deref(),
        Some(&conf.agent_run_dir),
    );
    if conf.native_nftables {
        return Err(Error::Unsupported(
            "native_nftables is not supported yet; remove it or set it to false to use iptables"
                .into(),
        ));
    }
    match env.command {
        Command::Add => add(env, &conf).map(Some),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Del => {
            del(env);
            Ok(None)
        }
        Command::Status => status(&conf).map(|()| None),
        // Nothing of ours outlives a netns, so there is nothing to collect.
        Command::Gc => Ok(None),
        Command::Version => unreachable!("handled above"),
    }
}

fn log_context(env: &CniEnv) -> String {
    let id = env.container_id.as_deref().unwrap_or("-");
    let mut ctx = format!("{} {}", env.command, &id[..id.len().min(12)]);
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

/// Looks the pod up and plans its rules; `None` when it passes through.
fn plan(env: &CniEnv, conf: &NetConf) -> Result<Option<(PodRef, Ruleset)>, Error> {
    let pod_ref = match pod::pre_api(conf, &env.args) {
        Ok(p) => p,
        Err(skip) => {
            log::info!("pass through: {skip}");
            return Ok(None);
        }
    };
    let start = Instant::now();
    let pod = conf.pod_source().fetch(&pod_ref)?;
    log::debug!("read pod {pod_ref} in {:?}", start.elapsed());
    match plan_for_pod(conf, &pod)? {
        Plan::Skip(skip) => {
            log::info!("pod {pod_ref}: pass through: {skip}");
            Ok(None)
        }
        Plan::Redirect(ruleset) => Ok(Some((pod_ref, *ruleset))),
    }
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, Error> {
    let result = chained_result(conf.prev_result.as_ref(), conf.cni_version);
    let Some((pod_ref, ruleset)) = plan(env, conf)? else {
        return Ok(result);
    };
    let xt = Xtables::detect()?;
    let netns = Netns::open(env.netns.as_deref().expect("ADD has CNI_NETNS"))?;
    let start = Instant::now();
    let probe = conf
        .validation
        .probe
        .then(|| Duration::from_millis(conf.validation.timeout_ms));
    netns.run(|inside| program(inside, &xt, &ruleset, probe))??;
    log::info!(
        "pod {pod_ref}: redirection rules written and validated in {:?}",
        start.elapsed()
    );
    Ok(result)
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
    let outcome = apply::apply(inside, xt, ruleset)
        .map_err(Error::from)
        .and_then(|()| {
            log::debug!("applied in {:?}", t.elapsed());
            validate::read_back(inside, xt, ruleset).map_err(Error::from)
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
        });
    if let Err(e) = &outcome {
        log::warn!("{e}; removing the rules written so far");
        if let Err(cleanup) = apply::remove(inside, xt, Some(ruleset)) {
            log::error!("removing the rules after a failed ADD also failed: {cleanup}");
        }
    }
    outcome
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    let Some((pod_ref, ruleset)) = plan(env, conf)? else {
        return Ok(());
    };
    let xt = Xtables::detect()?;
    let netns = Netns::open(env.netns.as_deref().expect("CHECK has CNI_NETNS"))?;
    netns.run(|inside| validate::read_back(inside, &xt, &ruleset))??;
    log::info!("pod {pod_ref}: redirection rules present");
    Ok(())
}

/// DEL: removes our rules when the netns still exists. Never fails: a failed DEL would
/// block the pod's teardown, and the rules go away with the netns anyway.
fn del(env: &CniEnv) {
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
    let outcome = Xtables::detect().map_err(Error::from).and_then(|xt| {
        netns
            .run(|inside| apply::remove(inside, &xt, None))?
            .map_err(Error::from)
    });
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
    match Xtables::detect() {
        Ok(xt) => {
            if let Err(e) = xt.binaries(Family::V4) {
                problems.push(e.to_string());
            }
        }
        Err(e) => problems.push(e.to_string()),
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
