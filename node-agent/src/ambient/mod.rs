//! Ambient mode (istio/istio `cni/pkg/nodeagent/`): the agent's side of Istio's ambient
//! data plane, where ztunnel, the node proxy, captures an ambient pod's traffic from
//! inside the pod's netns, which the agent hands it. On with `AMBIENT_ENABLED`
//! ([`start`]).
//!
//! The parts, in the order of the data flow:
//! - [`pluginevents`]: the plugin-event socket's server (`POST /cmdadd`), bounded and
//!   checked, against the plugin's own client ([`istio_cni::pluginevent::send_add`]);
//! - [`admit`]: an event checked against the API and the netns it names, then enrolled;
//! - [`enrol`]: one pod enrolled, proved (rules read back, ztunnel's ack, its listeners in
//!   the pod's netns) or undone;
//! - [`watch`]: this node's pods and the namespaces, watched: running pods enrolled and
//!   unenrolled as their labels change, deleted and terminal pods dropped from ztunnel;
//! - [`annotate`]: the pod's `ambient.istio.io/redirection` annotation;
//! - [`server`]: the pods known and each ztunnel connection's snapshot; adds to the newest
//!   connection, deletes to all;
//! - [`zds`]: the wire of ZDS, the protocol with ztunnel (messages at upstream's field
//!   numbers, one per `SOCK_SEQPACKET` packet, the netns in `SCM_RIGHTS`, acks and
//!   deadlines), tested over `socketpair`;
//! - [`listeners`]: whether ztunnel's sockets listen in a pod's netns;
//! - [`socket`]: the ZDS socket (`0600`, in a directory only root can write) and the loop
//!   that accepts ztunnel's connections.
//!
//! - [`hostrules`], [`ipset`]: the node's SNAT of kubelet's probes to ambient pods.
//!
//! Both backends write the in-pod rules (iptables, or with `NATIVE_NFTABLES` the
//! `inet istio-ambient-*` tables); the node's probe SNAT is always iptables (upstream
//! writes it with nftables on that backend).

pub mod admit;
pub mod annotate;
pub mod enrol;
pub mod hostrules;
pub mod ipset;
pub mod listeners;
pub mod pluginevents;
pub mod server;
pub mod socket;
pub mod watch;
pub mod zds;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use istio_cni::enablement::Enablement;
use istio_cni::plugin::Tools;
use istio_cni::rules::ambient::NodeSettings;

use crate::apiclient::ApiClient;
use crate::config::Exclusions;
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// How long ztunnel has to ack each request (an add, a delete, the snapshot's end).
/// ztunnel acks an add once its listeners in the pod's netns are up: milliseconds.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an ambient pod's ADD waits for a ztunnel when none serves the node: long
/// enough to ride out a ztunnel restart (a new ztunnel connects within a second of its
/// start and takes its snapshot in milliseconds), short enough that ADD fails fast with
/// code 11 ("try again later") when ztunnel is not there at all; kubelet then retries the
/// pod's sandbox with its own backoff.
pub const ZTUNNEL_WAIT: Duration = Duration::from_secs(5);

/// What ambient mode needs of the agent's settings.
#[derive(Debug, Clone)]
pub struct AmbientConfig {
    /// This node's name.
    pub node: String,
    /// The ZDS socket (`ZTUNNEL_UDS_ADDRESS`).
    pub zds_socket: PathBuf,
    /// The agent run dir: the plugin-event socket is `pluginevent.sock` in it, and the
    /// per-netns lock file.
    pub run_dir: PathBuf,
    /// DNS capture and IPv6 (`AMBIENT_DNS_CAPTURE`, `AMBIENT_IPV6`).
    pub settings: NodeSettings,
    /// `AMBIENT_ENABLEMENT_SELECTOR`, compiled.
    pub enablement: Enablement,
    /// The agent's namespace and `EXCLUDE_NAMESPACES`.
    pub exclusions: Exclusions,
    /// `HOST_ROOT`.
    pub host_root: PathBuf,
    /// `HOST_PROC_DIR`.
    pub host_proc: PathBuf,
    /// `NETNS_DIRS`: where an event's netns may be.
    pub netns_dirs: Vec<PathBuf>,
    /// `NATIVE_NFTABLES`: the in-pod rules are nftables tables (`inet istio-ambient-*`);
    /// the node's probe SNAT stays in iptables.
    pub native_nftables: bool,
    /// `AMBIENT_RECONCILE_POD_RULES_ON_STARTUP`.
    pub reconcile_on_startup: bool,
}

/// Ambient mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket could not be created where it belongs.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// The node's probe rules or sets could not be written.
    #[error(transparent)]
    HostRules(#[from] hostrules::HostRulesError),
}

/// Ambient mode, running: the ZDS server and the plugin-event server on their tasks.
pub struct Ambient {
    /// The ZDS server (the pods enrolled, ztunnel's connections).
    pub server: server::ZdsServer,
    /// Enrols pods (shared with the repair loop, which repairs them).
    pub enroller: enrol::Enroller,
    /// The node's probe rules and sets.
    pub host: Option<hostrules::HostProbes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

/// Binds the ZDS socket and the plugin-event socket and serves both on their own tasks,
/// and starts the pod and namespace watches ([`watch`]), which record their Events through
/// `events`. ztunnel's connections are
/// reported as upstream's `ztunnel_connected` gauge in `metrics` and, while none serves
/// the node, as a note on `/readyz` in `readiness` (not a reason: see
/// [`Readiness::set_ztunnel`]).
///
/// Errors: [`StartError`] when a socket cannot be created where it belongs (its directory
/// missing or writable by others than root, a non-socket at the path).
pub fn start(
    cfg: AmbientConfig,
    api: ApiClient,
    events: Arc<crate::events::Events>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) -> Result<Ambient, StartError> {
    let server = server::ZdsServer::new(ACK_TIMEOUT);
    // The node's probe rules first: no pod is enrolled before kubelet can probe it.
    let host = {
        let host = hostrules::HostProbes::detect(cfg.settings.clone())?;
        host.install()?;
        log::info!(
            "ambient mode: kubelet's probes of ambient pods are SNATed on this node (nat ISTIO_POSTRT, ipsets {})",
            host.sets().iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        );
        Some(host)
    };
    let zds = socket::bind_zds(&cfg.zds_socket)?;
    let event_path = cfg.run_dir.join(istio_cni::pluginevent::SOCKET_NAME);
    let event_socket = pluginevents::bind(&event_path)?;
    let enroller = enrol::Enroller {
        node: cfg.settings.clone(),
        tools: Tools::detect(),
        lock_dir: cfg.run_dir.clone(),
        server: server.clone(),
        listener_wait: enrol::LISTENER_WAIT,
        host: host.clone(),
        pods: enrol::PodLocks::default(),
        native_nftables: cfg.native_nftables,
    };
    let (restored_tx, restored_rx) = tokio::sync::oneshot::channel();
    let shared_pods = watch::SharedPods::default();
    let watch = watch::PodWatch {
        api: api.clone(),
        node: cfg.node.clone(),
        enablement: Arc::new(cfg.enablement.clone()),
        exclusions: cfg.exclusions.clone(),
        host_proc: cfg.host_proc.clone(),
        netns_dirs: cfg.netns_dirs.clone(),
        enroller: enroller.clone(),
        reconcile_on_startup: cfg.reconcile_on_startup,
        restored: Arc::new(std::sync::Mutex::new(Some(restored_tx))),
        shared: shared_pods.clone(),
        events,
    };
    let enroller_kept = enroller.clone();
    let handler: pluginevents::Handler = admit::Admitter {
        api,
        node: cfg.node.clone(),
        enablement: Arc::new(cfg.enablement),
        exclusions: cfg.exclusions,
        host_root: cfg.host_root,
        netns_dirs: cfg.netns_dirs,
        pods: shared_pods,
        host_proc: cfg.host_proc,
        enroller,
    }
    .handler();
    log::info!(
        "ambient mode: serving ztunnel on {} and plugin events on {}",
        cfg.zds_socket.display(),
        event_path.display()
    );
    // ztunnel drops every pod its first snapshot does not name: it is served once the
    // pods enrolled before this start are restored (see `watch::PodWatch::restore`).
    let zds_task = tokio::spawn({
        let server = server.clone();
        async move {
            log::info!("ambient: serving ztunnel once this node's pods are listed");
            if restored_rx.await.is_err() {
                log::error!(
                    "ambient: the pod watch ended before its first list; ztunnel is not served"
                );
                return;
            }
            if let Err(e) = socket::accept_loop(zds, server).await {
                log::error!("ambient: the ZDS socket stopped accepting: {e}");
            }
        }
    });
    let events_task = tokio::spawn(async move {
        if let Err(e) = pluginevents::serve(event_socket, handler).await {
            log::error!("ambient: the plugin-event socket stopped: {e}");
        }
    });
    let report = tokio::spawn(report_ztunnels(server.clone(), readiness, metrics));
    let tasks = vec![zds_task, events_task, tokio::spawn(watch.run()), report];
    Ok(Ambient {
        enroller: enroller_kept,
        server,
        host,
        tasks,
        sockets: vec![cfg.zds_socket, event_path],
    })
}

/// Follows ztunnel's connections: the `ztunnel_connected` gauge, the `/readyz` note, and a
/// log line when the node loses or regains its ztunnel.
async fn report_ztunnels(
    server: server::ZdsServer,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) {
    let mut rx = server.ztunnels();
    let mut served = None;
    loop {
        let now = *rx.borrow_and_update();
        metrics.ztunnel_connected.set(now.connected as i64);
        let serves = now.synced > 0;
        if served != Some(serves) {
            if serves {
                log::info!("ambient: a ztunnel serves this node");
                readiness.set_ztunnel(None);
            } else {
                if served.is_some() {
                    log::warn!("ambient: no ztunnel serves this node any more; ambient pods cannot start until one connects");
                }
                readiness.set_ztunnel(Some(format!(
                    "no ztunnel is connected (or none has taken the agent's snapshot yet); ambient pods cannot start on this node (ADD fails with code 11 after {ZTUNNEL_WAIT:?}) until one does"
                )));
            }
            served = Some(serves);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl Ambient {
    /// Stops serving and removes both sockets: the plugin then fails ambient ADDs at once
    /// (no agent), and ztunnel keeps its pods until an agent serves the socket again.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }

    /// Removes the node's probe rules and sets: the agent is being uninstalled (not
    /// upgraded), so no pod will be enrolled here until an agent comes back.
    pub fn remove_host_rules(&self) {
        if let Some(host) = &self.host {
            match host.uninstall() {
                Ok(()) => log::info!("ambient: removed the node's probe rules and sets"),
                Err(e) => log::warn!("ambient: removing the node's probe rules and sets: {e}"),
            }
        }
    }
}
