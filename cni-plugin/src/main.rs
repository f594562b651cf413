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
    /// Print the rules ADD would write for a pod (iptables-restore form, IPv4 then IPv6),
    /// or why the pod gets none. Same code path as ADD, without touching any netns.
    Render {
        /// The pod as the API returns it (JSON, e.g. `kubectl get pod -o json`).
        #[arg(long)]
        pod: PathBuf,
        /// Our network configuration entry (JSON). Its prevResult decides IPv6.
        #[arg(long)]
        netconf: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        return cni_main();
    }
    match Cli::parse().command {
        Cmd::Render { pod, netconf } => match render(&pod, netconf.as_deref()) {
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

fn cni_main() -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = CniEnv::from_process().map_err(Error::from).and_then(|env| {
        std::io::stdin()
            .read_to_end(&mut stdin)
            .map_err(Error::Stdin)?;
        istio_cni::plugin::run(&env, &stdin)
    });
    match outcome {
        Ok(out) => {
            if let Some(out) = out {
                let mut stdout = std::io::stdout().lock();
                let _ = serde_json::to_writer(&mut stdout, &out);
                let _ = writeln!(stdout);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            let err = ErrorResult {
                cni_version: request_version(&stdin)
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

fn render(pod: &std::path::Path, netconf: Option<&std::path::Path>) -> Result<String, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let conf = match netconf {
        Some(p) => NetConf::parse(&read(p)?).map_err(|e| format!("{}: {e}", p.display()))?,
        None => {
            NetConf::parse(br#"{"cniVersion":"1.0.0","type":"istio-cni"}"#).expect("valid default")
        }
    };
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_slice(&read(pod)?)
        .map_err(|e| format!("{} is not a Pod: {e}", pod.display()))?;
    match plan_for_pod(&conf, &pod).map_err(|e| {
        format!(
            "{e} (ADD would fail with CNI code {})",
            ErrorCode::INVALID_POD_SETTING.0
        )
    })? {
        Plan::Skip(reason) => Ok(format!("# no rules: {reason}\n")),
        Plan::Redirect(ruleset) => Ok(ruleset.render()),
    }
}
