//! `istio-cni-node-agent`: flags → library calls. `run` is the daemon; `install --once` and
//! `uninstall --once` do one pass each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;

use istio_cni_node_agent::agent::{Agent, RunOptions};
use istio_cni_node_agent::config::{AgentArgs, RunArgs};
use istio_cni_node_agent::metrics::Metrics;
use istio_cni_node_agent::readiness::Readiness;
use istio_cni_node_agent::{http, install, logsink, selftest};

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
    /// The daemon: install, self-test, keep the plugin chained, serve health and metrics;
    /// on SIGTERM clean up (unless --cleanup-on-exit=false).
    Run {
        #[command(flatten)]
        args: AgentArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Install the binary and kubeconfig and chain the plugin into the primary CNI config.
    Install {
        /// Do one pass and exit (the daemon is `run`).
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

fn init_logging(args: &AgentArgs) {
    istio_cni::logging::init(
        args.log_level.parse().unwrap_or(log::LevelFilter::Info),
        "node-agent".into(),
        None,
        None,
    );
}

fn main() -> ExitCode {
    let (once, args, install) = match Cli::parse().command {
        Cmd::Run { args, run } => return run_daemon(&args, &run),
        Cmd::Install { once, args } => (once, args, true),
        Cmd::Uninstall { once, args } => (once, args, false),
    };
    init_logging(&args);
    if !once {
        log::error!("install and uninstall need --once; the daemon is `run`");
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
        install::install_once(&cfg, &mut install::InstallCache::default()).map(|i| i.changes)
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

fn run_daemon(args: &AgentArgs, run: &RunArgs) -> ExitCode {
    init_logging(args);
    let cfg = match args.install_config() {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let readiness = Arc::new(Readiness::default());
    let metrics = Arc::new(Metrics::new());
    let opts = RunOptions {
        self_test: args.self_test,
        cleanup_on_exit: run.cleanup_on_exit,
        resync: Duration::from_secs(run.resync_seconds.max(1)),
        ..RunOptions::default()
    };
    let outcome: Result<Vec<String>, String> = rt.block_on(async {
        let bind = |port| tokio::net::TcpListener::bind((run.bind_address, port));
        let ready_listener = bind(run.readiness_port).await.map_err(|e| {
            format!(
                "cannot listen on readiness port {}: {e}",
                run.readiness_port
            )
        })?;
        let metrics_listener = bind(run.monitoring_port).await.map_err(|e| {
            format!(
                "cannot listen on monitoring port {}: {e}",
                run.monitoring_port
            )
        })?;
        let sink = match logsink::bind(&cfg.agent_run_dir) {
            Ok((sock, path)) => {
                tokio::spawn(logsink::serve(sock));
                Some(path)
            }
            Err(e) => {
                log::warn!(
                    "no plugin log socket in {}: {e}",
                    cfg.agent_run_dir.display()
                );
                None
            }
        };
        tokio::spawn(http::serve_readiness(ready_listener, readiness.clone()));
        tokio::spawn(http::serve_metrics(
            metrics_listener,
            metrics.clone(),
            readiness.clone(),
        ));
        log::info!(
            "serving /healthz and /readyz on {}:{}, /metrics on {}:{}",
            run.bind_address,
            run.readiness_port,
            run.bind_address,
            run.monitoring_port
        );
        let agent = Agent::new(cfg, opts, readiness, metrics);
        let outcome = agent.run(shutdown_signal()).await;
        if let Some(path) = sink {
            let _ = std::fs::remove_file(path);
        }
        outcome
    });
    match outcome {
        Ok(_) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (the kubelet stopping the pod) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot handle SIGTERM: {e}");
            std::future::pending::<()>().await;
            unreachable!()
        }
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received"),
    }
}
