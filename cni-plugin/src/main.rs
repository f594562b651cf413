//! `istio-cni`: verb dispatch only. With `CNI_COMMAND` set it speaks CNI (stdin → stdout);
//! otherwise it is a command for people (`istio-cni render`).

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use istio_cni::cni::{CniEnv, CniVersion, ErrorCode, ErrorResult};
use istio_cni::config::{request_version, NetConf};
use istio_cni::plan::{plan_for_pod, Plan};
use istio_cni::Error;

#[derive(Parser)]
#[command(
    name = "istio-cni",
    version,
    about = "Istio CNI plugin with built-in validation. \
    Run by the container runtime with CNI_COMMAND set; these subcommands are for people."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the rules ADD would write for a pod (iptables-restore form, IPv4 then IPv6;
    /// with `native_nftables` in the netconf, the nftables transaction, as `nft -f` takes
    /// it), or why the pod gets none. Same code path as ADD, without touching any netns.
    Render {
        /// The pod as the API returns it (JSON, e.g. `kubectl get pod -o json`).
        #[arg(long)]
        pod: PathBuf,
        /// Our network configuration entry (JSON). Its prevResult decides IPv6.
        #[arg(long)]
        netconf: Option<PathBuf>,
        /// The pod's namespace as the API returns it (JSON), whose labels the ambient
        /// enablement selectors read; without it, the namespace has no labels.
        #[arg(long)]
        namespace: Option<PathBuf>,
        /// Ambient: capture DNS to ztunnel (the node-wide setting the agent keeps, chart
        /// `ambient.dnsCapture`; upstream's default, true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        ambient_dns_capture: bool,
        /// Ambient: also IPv6 rules (chart `ambient.ipv6`; upstream's default, true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        ambient_ipv6: bool,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    match Cli::parse().command {
        Cmd::Render {
            pod,
            netconf,
            namespace,
            ambient_dns_capture,
            ambient_ipv6,
        } => match render(
            &pod,
            netconf.as_deref(),
            namespace.as_deref(),
            istio_cni::rules::ambient::NodeSettings::new(ambient_dns_capture, ambient_ipv6),
        ) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("istio-cni render: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The in-pod rules the node agent writes for an ambient pod (the same builders as the
/// agent's enrolment), or `None` when the pod is not ambient: excluded namespace, the
/// agent's own namespace, or no enablement selector matches.
fn render_ambient(
    conf: &NetConf,
    pod: &k8s_openapi::api::core::v1::Pod,
    namespace_labels: &std::collections::BTreeMap<String, String>,
    node: &istio_cni::rules::ambient::NodeSettings,
) -> Result<Option<String>, String> {
    use istio_cni::rules::ambient;
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    if conf.is_excluded(ns)
        || ns == conf.pod_namespace
        || !conf.enablement.matches(pod, namespace_labels)
    {
        return Ok(None);
    }
    let overrides = ambient::PodOverrides::from_annotations(
        pod.metadata
            .annotations
            .as_ref()
            .unwrap_or(&Default::default()),
    )
    .map_err(|e| format!("{e} (the node agent would refuse to enrol the pod)"))?;
    let mut out = String::from(
        "# ambient: in-pod rules the node agent writes into the pod's netns
",
    );
    if conf.native_nftables {
        out.push_str(&ambient::nftables::build_inpod(node, &overrides).transaction());
    } else {
        out.push_str(
            &ambient::iptables::build_inpod(node, &overrides)
                .ruleset()
                .render(),
        );
    }
    Ok(Some(out))
}

/// Largest network configuration read from stdin, in bytes. A conflist entry with its
/// prevResult is a few KiB; anything near this is not a configuration.
const MAX_STDIN_BYTES: u64 = 4 << 20;

fn cni_main() -> ExitCode {
    let stdin = read_stdin();
    let is_del = std::env::var_os("CNI_COMMAND").is_some_and(|c| c == "DEL");
    let bytes = stdin.as_deref().unwrap_or_default();
    // A bug must still end in a CNI error on stdout (and, for DEL, in success).
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let stdin = stdin.as_deref().map_err(|e| Error::Stdin(clone_io(e)))?;
        let env = CniEnv::from_process()?;
        istio_cni::plugin::run(&env, stdin)
    }))
    .unwrap_or_else(|panic| Err(Error::Internal(istio_cni::plugin::panic_message(&*panic))));
    match outcome {
        Ok(out) => {
            if let Some(out) = out {
                let mut stdout = std::io::stdout().lock();
                let _ = serde_json::to_writer(&mut stdout, &out);
                let _ = writeln!(stdout);
            }
            ExitCode::SUCCESS
        }
        Err(e) if is_del => {
            // Nothing could be done safely; the rules go with the netns. Failing would
            // block the pod's teardown.
            default_logging();
            log::warn!("DEL: {e}; nothing removed, exiting 0 so that teardown goes on");
            ExitCode::SUCCESS
        }
        Err(e) => {
            default_logging();
            log::error!("{e}");
            let err = ErrorResult {
                cni_version: request_version(bytes)
                    .unwrap_or_else(|| CniVersion::LATEST.to_string()),
                code: e.code(),
                msg: e.to_string(),
                details: error_details(&e),
            };
            let _ = serde_json::to_writer(std::io::stdout().lock(), &err);
            // Codes 1–255 map to themselves; the spec only asks for non-zero.
            ExitCode::from(u8::try_from(err.code.0).unwrap_or(1).max(1))
        }
    }
}

/// Reads stdin, at most [`MAX_STDIN_BYTES`].
fn read_stdin() -> Result<Vec<u8>, std::io::Error> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_STDIN_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {MAX_STDIN_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

fn clone_io(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

/// Logging for failures before the configuration is known: info to stderr. A no-op when
/// the plugin already installed its logger.
fn default_logging() {
    istio_cni::logging::init(log::LevelFilter::Info, "-".into(), None, None);
}

/// The cause chain below the top-level message.
fn error_details(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

fn render(
    pod: &std::path::Path,
    netconf: Option<&std::path::Path>,
    namespace: Option<&std::path::Path>,
    ambient_node: istio_cni::rules::ambient::NodeSettings,
) -> Result<String, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let conf = match netconf {
        Some(p) => NetConf::parse(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => {
            NetConf::parse(br#"{"cniVersion":"1.0.0","type":"istio-cni"}"#).expect("valid default")
        }
    };
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_slice(&read(pod)?)
        .map_err(|e| format!("{} is not a Pod: {e}", pod.display()))?;
    let invalid = |e: istio_cni::redirect::RedirectError| {
        format!(
            "{e} (ADD would fail with CNI code {})",
            ErrorCode::INVALID_POD_SETTING.0
        )
    };
    if conf.ambient_enabled {
        let labels = match namespace {
            Some(p) => {
                let ns: k8s_openapi::api::core::v1::Namespace =
                    serde_json::from_slice(&read(p)?)
                        .map_err(|e| format!("{} is not a Namespace: {e}", p.display()))?;
                ns.metadata.labels.unwrap_or_default()
            }
            None => Default::default(),
        };
        if let Some(text) = render_ambient(&conf, &pod, &labels, &ambient_node)? {
            return Ok(text);
        }
    }
    if conf.native_nftables {
        return match istio_cni::plan::plan_nft_for_pod(&conf, &pod).map_err(invalid)? {
            Plan::Skip(reason) => Ok(format!("# no rules: {reason}\n")),
            Plan::Redirect(ruleset) => Ok(ruleset.transaction()),
        };
    }
    match plan_for_pod(&conf, &pod).map_err(invalid)? {
        Plan::Skip(reason) => Ok(format!("# no rules: {reason}\n")),
        Plan::Redirect(ruleset) => Ok(ruleset.render()),
    }
}
