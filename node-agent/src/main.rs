//! `istio-cni-node-agent`: flags → library calls. `install --once` and `uninstall --once`
//! do one pass each; the daemon (`run`) comes with the watch loop.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use istio_cni_node_agent::config::AgentArgs;
use istio_cni_node_agent::{install, selftest};

#[derive(Parser)]
#[command(
    name = "istio-cni-node-agent",
    version,
    about = "Installs istio-cni on this node and keeps it chained"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the binary and kubeconfig and chain the plugin into the primary CNI config.
    Install {
        /// Do one pass and exit (required until the `run` daemon exists).
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        args: AgentArgs,
    },
    /// Remove our entry, the kubeconfig and the binary.
    Uninstall {
        /// Do one pass and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        args: AgentArgs,
    },
}

fn main() -> ExitCode {
    let (once, args, install) = match Cli::parse().command {
        Cmd::Install { once, args } => (once, args, true),
        Cmd::Uninstall { once, args } => (once, args, false),
    };
    istio_cni::logging::init(
        args.log_level.parse().unwrap_or(log::LevelFilter::Info),
        "node-agent".into(),
        None,
    );
    if !once {
        log::error!(
            "only --once is available: the watching daemon (`run`) is not part of this build yet"
        );
        return ExitCode::from(2);
    }
    let cfg = match args.install_config() {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let outcome = if install {
        install::install_once(&cfg).map(|i| i.changes)
    } else {
        install::uninstall_once(&cfg)
    };
    match outcome {
        Ok(changes) if changes.is_empty() => log::info!("nothing to change"),
        Ok(changes) => changes.iter().for_each(|c| log::info!("{c}")),
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    if install && args.self_test {
        let plugin = cfg.bin_dir.join(install::PLUGIN_BINARY);
        match selftest::run(
            &plugin,
            &cfg.bin_dir,
            &cfg.plugin_entry(),
            &cfg.agent_run_dir,
        ) {
            Ok(took) => log::info!("self-test passed in {took:?}"),
            Err(e) => {
                log::error!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
