//! `istio-cni-node-agent`: flags → library calls. `run` is the daemon; `install --once` and
//! `uninstall --once` do one pass each.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;

use istio_cni_node_agent::agent::{Agent, RunOptions};
use istio_cni_node_agent::backoff::Backoff;
use istio_cni_node_agent::config::Exclusions;
use istio_cni_node_agent::config::{AgentArgs, RunArgs};
use istio_cni_node_agent::events::Events;
use istio_cni_node_agent::metrics::Metrics;
use istio_cni_node_agent::readiness::Readiness;
use istio_cni_node_agent::repair::{RepairConfig, RepairController};
use istio_cni_node_agent::taint::{TaintConfig, TaintController};
use istio_cni_node_agent::upgrade::{self, OnExit};
use istio_cni_node_agent::{ambient, apiclient, http, install, logsink, selftest};

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

/// Raises the soft limit of open files to the hard one: the repair loop keeps a socket
/// per watched pod (two for a pod with legacy IPv4 and IPv6 tables), and 1024, the usual
/// soft default, is about 500 pods; in ambient mode, the ZDS server holds each enrolled
/// pod's netns file. Only with the drift watch or ambient mode on. The processes the agent
/// runs (`iptables-save`, `iptables-restore`) inherit the higher soft limit, which they do
/// not use. A refusal is logged; the sweep still covers pods whose watch cannot open.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            // An unlimited hard limit cannot be the soft one: the kernel caps it at
            // `fs.nr_open`.
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1 << 20);
            let want = hard.min(nr_open);
            if soft < want {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, hard) {
                    log::warn!("cannot raise the open-file limit from {soft} to {want}: {e}");
                }
            }
        }
        Err(e) => log::warn!("cannot read the open-file limit: {e}"),
    }
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
    if (run.repair_enabled && run.repair_drift_watch) || args.ambient_enabled {
        raise_fd_limit();
    }
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
    let uses_api = run.node_name.is_some()
        && (run.taint_enabled || run.repair_enabled || args.ambient_enabled)
        || run.cleanup_on_exit && run.pod_name.is_some();
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
        // The loops that use the API start once its credentials are known to be safe to
        // read (see `api_credentials`).
        let (gate, gate_open) = tokio::sync::watch::channel(!uses_api);
        let gate_task = uses_api.then(|| {
            tokio::spawn(api_credentials(
                run.kubeconfig.clone(),
                api.clone(),
                readiness.clone(),
                gate,
            ))
        });
        type Loop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let after_gate = |task: Loop| {
            let mut open = gate_open.clone();
            tokio::spawn(async move {
                if open.wait_for(|o| *o).await.is_ok() {
                    task.await;
                }
            })
        };
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
            .map(|t| after_gate(Box::pin(async move { t.run_shared().await })));
        let ambient = match (&run.node_name, args.ambient_enabled) {
            (Some(node), true) => {
                let config = ambient_config(node, args, run);
                Some(
                    ambient::start(
                        config,
                        api.clone(),
                        events.clone(),
                        readiness.clone(),
                        metrics.clone(),
                    )
                    .map_err(|e| format!("ambient mode cannot start: {e}"))?,
                )
            }
            (None, true) => {
                log::warn!("no --node-name: ambient mode is off");
                None
            }
            (_, false) => None,
        };
        let repair_task = match (&run.node_name, run.repair_enabled) {
            (Some(node), true) => {
                let mut repair = RepairController::new(
                    repair_config(node, repair_mode, args, run),
                    api.clone(),
                    events.clone(),
                    readiness.clone(),
                    metrics.clone(),
                );
                if let Some(a) = &ambient {
                    repair = repair.with_ambient(a.enroller.clone());
                }
                Some(after_gate(Box::pin(repair.run())))
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
        // agent go not ready and write IstioCNIReady=False during an upgrade. A loop
        // stuck inside a blocking call cannot be aborted: it is waited for a bounded time,
        // and left behind (the runtime's shutdown does not wait for it either).
        let loops = [
            ("api-credentials", gate_task),
            ("taint", taint_task),
            ("repair", repair_task),
        ];
        for (name, task) in loops {
            let Some(mut task) = task else { continue };
            task.abort();
            if tokio::time::timeout(LOOP_STOP_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                log::warn!(
                    "the {name} loop did not stop within {LOOP_STOP_TIMEOUT:?}; going on without it"
                );
            }
        }
        if let Some(a) = &ambient {
            a.stop();
        }
        readiness.set_stopping();
        if let Some(path) = sink {
            let _ = std::fs::remove_file(path);
        }
        outcome?;
        let api_usable = *gate_open.borrow();
        match on_exit(&api, api_usable, args, run).await {
            OnExit::Keep(why) => log::info!("keeping the plugin installed: {why}"),
            OnExit::Cleanup(why) => {
                log::info!("removing the plugin: {why}");
                match taint.clone() {
                    Some(_) if !api_usable => log::warn!(
                        "not tainting the node on exit: the agent's API credentials cannot be \
                         used (see /readyz)"
                    ),
                    Some(t) => {
                        // On its own task, so that even a call that blocks its thread
                        // cannot hold up the exit past the timeout.
                        let why = why.clone();
                        let call = tokio::spawn(async move { t.taint_on_exit(&why).await });
                        match tokio::time::timeout(Duration::from_secs(5), call).await {
                            Ok(Ok(Ok(()))) => {}
                            Ok(Ok(Err(e))) => log::warn!("tainting the node on exit: {e}"),
                            Ok(Err(e)) => log::warn!("tainting the node on exit: {e}"),
                            Err(_) => log::warn!("tainting the node on exit: no answer within 5s"),
                        }
                    }
                    None => {}
                }
                if let Some(a) = ambient {
                    tokio::task::spawn_blocking(move || a.remove_host_rules())
                        .await
                        .map_err(|e| format!("cleanup task: {e}"))?;
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
    // Whatever is still running (a blocking task that never returned) must not keep the
    // process from exiting: the kubelet would SIGKILL it after the grace period.
    rt.shutdown_timeout(RUNTIME_STOP_TIMEOUT);
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
        drift_watch: run.repair_drift_watch,
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

/// Ambient mode's settings from the flags.
fn ambient_config(node: &str, args: &AgentArgs, run: &RunArgs) -> ambient::AmbientConfig {
    let enablement = istio_cni::enablement::Enablement::compile(&args.enablement_selectors())
        .unwrap_or_else(|e| {
            // Checked when the flags were parsed; not reached.
            log::error!("{e}; using upstream's default enablement selectors");
            istio_cni::enablement::Enablement::default()
        });
    ambient::AmbientConfig {
        node: node.to_owned(),
        zds_socket: run.ztunnel_uds_address.clone(),
        run_dir: args.cni_agent_run_dir.clone(),
        settings: istio_cni::rules::ambient::NodeSettings::new(
            run.ambient_dns_capture,
            run.ambient_ipv6,
        ),
        enablement,
        exclusions: Exclusions {
            agent_namespace: args.pod_namespace.clone(),
            exclude_namespaces: args.excluded_namespaces(),
        },
        host_root: run.host_root.clone(),
        host_proc: run.host_proc_dir.clone(),
        netns_dirs: run.netns_dirs.clone(),
        native_nftables: args.native_nftables,
        reconcile_on_startup: run.ambient_reconcile_pod_rules_on_startup,
    }
}

/// How long each loop may take to stop on SIGTERM (an aborted task stops at its next
/// await; only one stuck in a blocking call takes longer).
const LOOP_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the async runtime may take to shut down after everything else is done.
const RUNTIME_STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long building the API client may take before it counts as stuck on `/healthz`:
/// it reads a few small files and sets up TLS, without network I/O (milliseconds).
const API_CLIENT_BUILD_LIMIT: Duration = Duration::from_secs(60);

/// Checks the agent's own API credentials before the API loops read them through `kube`
/// (which reads files without bound, and blocks on a FIFO), then builds the API client
/// under a liveness bound, until that succeeds.
///
/// With `--kubeconfig`, the file and every file it names are checked by
/// [`install::kubeconfig::load_agent_kubeconfig`] (regular files within their limits,
/// read non-blocking): while that fails, `/readyz` says why (`api: ...`) and it is checked
/// again with backoff (1 s doubling to 60 s), so a fixed file is picked up. The first
/// success opens `gate` (the taint and repair loops wait for it). In-cluster credentials
/// are read the same bounded way by the client's own build. Building the client is
/// marked busy for [`API_CLIENT_BUILD_LIMIT`], so a build stuck on a file that changed
/// after the check makes `/healthz` fail; a failed build is tried again with the same
/// backoff (the loops log their own failures).
async fn api_credentials(
    kubeconfig: Option<std::path::PathBuf>,
    api: apiclient::ApiClient,
    readiness: Arc<Readiness>,
    gate: tokio::sync::watch::Sender<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        if let Some(path) = &kubeconfig {
            let file = path.clone();
            let checked = tokio::task::spawn_blocking(move || {
                install::kubeconfig::load_agent_kubeconfig(&file).map(drop)
            })
            .await
            .unwrap_or_else(|e| {
                Err(install::kubeconfig::KubeconfigError::Invalid {
                    path: path.clone(),
                    reason: format!("the check did not complete: {e}"),
                })
            });
            if let Err(e) = checked {
                let delay = backoff.next_delay();
                log::warn!(
                    "--kubeconfig cannot be used: {e}; the taint and repair loops wait for it (checking again in {delay:?})"
                );
                readiness.set_api(Some(e.to_string()));
                tokio::time::sleep(delay).await;
                continue;
            }
            readiness.set_api(None);
        }
        gate.send_replace(true);
        let busy = readiness.busy(
            "api-client",
            "building the API client",
            API_CLIENT_BUILD_LIMIT,
        );
        let built = api.get().await;
        drop(busy);
        match built {
            Ok(_) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                log::debug!("API client: {e}; building it again in {delay:?}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether to remove the plugin now that the agent stops: never with
/// `--cleanup-on-exit=false`; as the API says (see [`upgrade`]) when the agent knows its pod
/// name and its API credentials passed their checks (`api_usable`), keep when they did
/// not; else (outside a cluster) yes. Takes at most 10 s in all.
async fn on_exit(
    api: &apiclient::ApiClient,
    api_usable: bool,
    args: &AgentArgs,
    run: &RunArgs,
) -> OnExit {
    if !run.cleanup_on_exit {
        return OnExit::Keep("--cleanup-on-exit=false".into());
    }
    let Some(pod) = &run.pod_name else {
        return OnExit::Cleanup("no --pod-name: not running as a DaemonSet pod".into());
    };
    if !api_usable {
        return OnExit::Keep(
            "the agent's API credentials cannot be used (see /readyz), so the API cannot say \
             whether this is an upgrade"
                .into(),
        );
    }
    // Well inside the pod's termination grace period (30 s by default). On its own task,
    // so that even a call that blocks its thread cannot hold up the exit past it.
    let deadline = Duration::from_secs(10);
    let (api, namespace, pod) = (api.clone(), args.pod_namespace.clone(), pod.clone());
    let ask = tokio::spawn(async move {
        match api.get().await {
            Ok(client) => upgrade::decide(client, &namespace, &pod).await,
            Err(e) => OnExit::Keep(format!(
                "no API client to ask whether this is an upgrade: {e}"
            )),
        }
    });
    match tokio::time::timeout(deadline, ask).await {
        Ok(Ok(decided)) => decided,
        Ok(Err(e)) => OnExit::Keep(format!("asking the API whether this is an upgrade: {e}")),
        Err(_) => OnExit::Keep(format!("the API did not answer within {deadline:?}")),
    }
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
