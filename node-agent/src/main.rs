//! `istio-cni-node-agent`: flags → library calls. `run` is the daemon; `install --once` and
//! `uninstall --once` do one pass each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;

use istio_cni_node_agent::agent::{Agent, RunOptions};
use istio_cni_node_agent::config::{AgentArgs, RunArgs};
use istio_cni_node_agent::events::Events;
use istio_cni_node_agent::metrics::Metrics;
use istio_cni_node_agent::readiness::Readiness;
use istio_cni_node_agent::repair::inspect::Exclusions;
use istio_cni_node_agent::repair::{RepairConfig, RepairController};
use istio_cni_node_agent::taint::{TaintConfig, TaintController};
use istio_cni_node_agent::upgrade::{self, OnExit};
use istio_cni_node_agent::{apiclient, http, install, logsink, selftest};

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
        run: Box<RunArgs>,
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
    let format = if args.log_as_json {
        istio_cni::logging::Format::Json
    } else {
        istio_cni::logging::Format::Text
    };
    istio_cni::logging::init_as(
        format,
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
    if let Some(host) = args.self_test_view().filter(|_| install) {
        match selftest::run(&host, &cfg.plugin_entry(), &cfg.agent_run_dir) {
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
    let repair_mode = run.effective_repair_mode();
    if run.print_config {
        let effective = serde_json::json!({
            "repair_mode": repair_mode.as_ref().map_or_else(|e| e.clone(), |m| m.to_string()),
        });
        let all = serde_json::json!({"agent": args, "run": run, "effective": effective});
        println!("{}", serde_json::to_string_pretty(&all).expect("JSON"));
        return if repair_mode.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    init_logging(args);
    let repair_mode = match repair_mode {
        Ok(m) => m,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(2);
        }
    };
    for var in run.ignored_upstream_settings() {
        log::warn!(
            "{var} has no effect here: the repair loop reads each pod's rules in its netns instead of watching an init container"
        );
    }
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
        self_test: args.self_test_view(),
        resync: Duration::from_secs(run.resync_seconds.max(1)),
        ..RunOptions::default()
    };
    let outcome: Result<(), String> = rt.block_on(async {
        let shutdown = shutdown_signal().map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
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
        // One API client for the whole process, built on first use.
        let api = apiclient::ApiClient::new(&cfg, run.kubeconfig.as_deref());
        let events = Arc::new(Events::new(
            api.clone(),
            run.node_name.as_deref().unwrap_or("unknown-node"),
        ));
        let taint = match (&run.node_name, run.taint_enabled) {
            (Some(node), true) => Some(Arc::new(TaintController::new(
                TaintConfig {
                    node: node.clone(),
                    key: run.taint_key.clone(),
                    effect: run.taint_effect.clone(),
                    grace: Duration::from_secs(run.taint_grace_seconds),
                },
                api.clone(),
                events.clone(),
                readiness.clone(),
                metrics.clone(),
            ))),
            (None, true) => {
                log::warn!("no --node-name: the node taint is not managed");
                None
            }
            (_, false) => None,
        };
        let taint_task = taint
            .clone()
            .map(|t| tokio::spawn(async move { t.run_shared().await }));
        let repair_task = match (&run.node_name, run.repair_enabled) {
            (Some(node), true) => {
                let repair = RepairController::new(
                    repair_config(node, repair_mode, args, run),
                    api.clone(),
                    events.clone(),
                    readiness.clone(),
                    metrics.clone(),
                );
                Some(tokio::spawn(repair.run()))
            }
            (None, true) => {
                log::warn!("no --node-name: the repair loop is off");
                None
            }
            (_, false) => None,
        };
        let agent = Agent::new(cfg.clone(), opts, readiness.clone(), metrics);
        let outcome = agent.run(shutdown).await;
        // Stop in order: the loops that write to the API first (and wait until they are
        // gone), only then report "stopping". Otherwise the taint controller could see the
        // agent go not ready and write IstioCNIReady=False during an upgrade.
        for task in [taint_task, repair_task].into_iter().flatten() {
            task.abort();
            let _ = task.await;
        }
        readiness.set_stopping();
        if let Some(path) = sink {
            let _ = std::fs::remove_file(path);
        }
        outcome?;
        match on_exit(&api, args, run).await {
            OnExit::Keep(why) => log::info!("keeping the plugin installed: {why}"),
            OnExit::Cleanup(why) => {
                log::info!("removing the plugin: {why}");
                if let Some(t) = &taint {
                    let tainted =
                        tokio::time::timeout(Duration::from_secs(5), t.taint_on_exit(&why)).await;
                    match tainted {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => log::warn!("tainting the node on exit: {e}"),
                        Err(_) => log::warn!("tainting the node on exit: no answer within 5s"),
                    }
                }
                let removed = tokio::task::spawn_blocking(move || install::uninstall_once(&cfg))
                    .await
                    .map_err(|e| format!("cleanup task: {e}"))?
                    .map_err(|e| format!("cleanup: {e}"))?;
                removed.iter().for_each(|r| log::info!("{r}"));
            }
        }
        Ok(())
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

use istio_cni_node_agent::repair::act::Mode;

/// The repair loop's settings from the flags.
fn repair_config(node: &str, mode: Mode, args: &AgentArgs, run: &RunArgs) -> RepairConfig {
    let selector = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    RepairConfig {
        node: node.to_owned(),
        mode,
        native_nftables: args.native_nftables,
        label_selector: selector(&run.repair_label_selectors),
        field_selector: selector(&run.repair_field_selectors),
        resync: Duration::from_secs(run.repair_resync_seconds),
        cooldown: Duration::from_secs(run.repair_cooldown_seconds),
        max_deletes_per_minute: run.repair_max_deletes_per_minute,
        label: (
            run.repair_broken_pod_label_key.clone(),
            run.repair_broken_pod_label_value.clone(),
        ),
        host_proc: run.host_proc_dir.clone(),
        netns_dirs: run.netns_dirs.clone(),
        lock_dir: args.cni_agent_run_dir.clone(),
        exclusions: Exclusions {
            agent_namespace: args.pod_namespace.clone(),
            exclude_namespaces: args.excluded_namespaces(),
        },
    }
}

/// Whether to remove the plugin now that the agent stops: never with
/// `--cleanup-on-exit=false`; as the API says (see [`upgrade`]) when the agent knows its pod
/// name; else (outside a cluster) yes.
async fn on_exit(api: &apiclient::ApiClient, args: &AgentArgs, run: &RunArgs) -> OnExit {
    if !run.cleanup_on_exit {
        return OnExit::Keep("--cleanup-on-exit=false".into());
    }
    let Some(pod) = &run.pod_name else {
        return OnExit::Cleanup("no --pod-name: not running as a DaemonSet pod".into());
    };
    let client = match api.get().await {
        Ok(c) => c,
        Err(e) => {
            return OnExit::Keep(format!(
                "no API client to ask whether this is an upgrade: {e}"
            ))
        }
    };
    // Well inside the pod's termination grace period (30 s by default).
    let deadline = Duration::from_secs(10);
    tokio::time::timeout(deadline, upgrade::decide(client, &args.pod_namespace, pod))
        .await
        .unwrap_or_else(|_| OnExit::Keep(format!("the API did not answer within {deadline:?}")))
}

/// Registers the SIGTERM (the kubelet stopping the pod) and SIGINT handlers now, before
/// any work, so that no signal can take the default action (exit without cleanup); the
/// returned future completes on the first of them.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => log::info!("SIGTERM received"),
            _ = int.recv() => log::info!("SIGINT received"),
        }
    })
}
