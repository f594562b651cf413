//! The agent's Kubernetes API clients, shared by every loop (taint, repair, Events, the
//! exit check): in-cluster (the service account and `KUBERNETES_SERVICE_*`), or from
//! `--kubeconfig`. They are built on first use and then reused, so their connections are
//! too. The in-cluster clients read the projected token through `tokenFile`, which `kube`
//! re-reads as it nears expiry, so a rotated token is picked up without a new client.
//!
//! Two clients, because a request and a watch need opposite read timeouts:
//!
//! - [`ApiClient::get`], for every single request (GET, LIST, PATCH, DELETE, Event): a
//!   read may wait at most [`REQUEST_TIMEOUT`] for the next byte, counted from when the
//!   request was written. A request that goes into a black hole (an API server or load
//!   balancer that accepts the connection and never answers) fails after that, its
//!   connection is dropped, and the caller retries on a new one.
//! - [`ApiClient::watch_client`], for the long-lived watch streams only: a read may wait
//!   [`WATCH_READ_TIMEOUT`], above the server-side watch timeout, since a healthy watch can
//!   be silent that long.
//!
//! `kube-runtime`'s watcher sends its LIST and its WATCH through one client, so it gets
//! the watch client, and [`watch_bounding_lists`] bounds each LIST page it makes by
//! [`REQUEST_TIMEOUT`] from outside: a list that does not arrive in time drops the watcher
//! (and with it the request and its connection) and starts a new one.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use futures::stream::BoxStream;
use futures::StreamExt as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::install::{kubeconfig, InstallConfig};

/// The server-side length of each watch (`timeoutSeconds`, set on every watcher by
/// [`watch_bounding_lists`]): 60 s. `kube-runtime` drops a watch that stays silent 5 s
/// longer, so a watch whose connection went dead mid-life (an API server that stops
/// answering) is replaced within about 65 s, where its default of 290 s took about 5
/// minutes. A new watch a minute per watcher costs the server nothing worth counting.
pub const WATCH_TIMEOUT_SECONDS: u32 = 60;

/// How long a watch read may wait for the next byte: above [`WATCH_TIMEOUT_SECONDS`] and
/// the watcher's own idle limit (that plus 5 s), so that only a dead connection the idle
/// limit missed hits it. Used by [`ApiClient::watch_client`] only.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(90);

/// How long one non-watch request (a GET, a LIST page, a PATCH, a DELETE, an Event) may
/// wait for the API server's next byte, from when it was sent; the taint loop, the Event
/// recorder, the exit check and the watchers' lists also bound each call as a whole by it.
/// Why 10 s: kubelet bounds its own node-status and lease requests (PATCHes of the same
/// Node object) by its `nodeStatusUpdateFrequency`, 10 s by default, and client-go's
/// leader election renews within 10 s; a healthy API server answers a read or a patch of
/// one object in milliseconds, so a request still unanswered after 10 s is far likelier
/// lost (a black-holed connection) than slow, and cheaper to retry on a new connection.
/// It is also what an outage costs beyond its end: a request sent into the black hole
/// fails after this, and the retry, after the loop's backoff, succeeds.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connecting and writing a request may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no client could be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiClientError {
    /// `--kubeconfig` cannot be read or used.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The service account (token, CA) or `KUBERNETES_SERVICE_*` is unusable.
    #[error("in-cluster API credentials: {0}")]
    InCluster(String),
}

/// A handle to the process's two clients (see the module docs); clones share them.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: InstallConfig,
    kubeconfig: Option<PathBuf>,
    clients: tokio::sync::OnceCell<Clients>,
}

/// The request client and the watch client, built together from one configuration.
#[derive(Clone)]
struct Clients {
    request: kube::Client,
    watch: kube::Client,
}

impl ApiClient {
    /// A handle for `cfg`'s API server (in-cluster), or `kubeconfig` when given. Nothing
    /// is read until [`ApiClient::get`] or [`ApiClient::watch_client`].
    pub fn new(cfg: &InstallConfig, kubeconfig: Option<&Path>) -> ApiClient {
        ApiClient {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                kubeconfig: kubeconfig.map(Path::to_path_buf),
                clients: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// The client for single requests (everything but watch streams): each read waits at
    /// most [`REQUEST_TIMEOUT`]. Built on the first call that succeeds and reused after.
    ///
    /// Errors: [`ApiClientError`] naming the credential or kubeconfig that could not be
    /// used (the next call tries again).
    pub async fn get(&self) -> Result<kube::Client, ApiClientError> {
        self.clients().await.map(|c| c.request)
    }

    /// The client for watches ([`watch_bounding_lists`]): each read waits at most
    /// [`WATCH_READ_TIMEOUT`]. Not for single requests, which it would leave hanging for
    /// minutes on a dead connection.
    ///
    /// Errors: as [`ApiClient::get`].
    pub async fn watch_client(&self) -> Result<kube::Client, ApiClientError> {
        self.clients().await.map(|c| c.watch)
    }

    async fn clients(&self) -> Result<Clients, ApiClientError> {
        self.inner
            .clients
            .get_or_try_init(|| build(&self.inner.cfg, self.inner.kubeconfig.as_deref()))
            .await
            .cloned()
    }
}

async fn build(
    cfg: &InstallConfig,
    kubeconfig_override: Option<&Path>,
) -> Result<Clients, ApiClientError> {
    let kc = match kubeconfig_override {
        // Read as every file the agent reads: non-blocking, a regular file only, bounded
        // (`install::fsutil`); off the runtime's threads.
        Some(path) => {
            let owned = path.to_owned();
            tokio::task::spawn_blocking(move || {
                crate::install::kubeconfig::load_agent_kubeconfig(&owned)
            })
            .await
            .map_err(|e| ApiClientError::Kubeconfig {
                path: path.into(),
                reason: e.to_string(),
            })?
            .map_err(|e| ApiClientError::Kubeconfig {
                path: path.into(),
                reason: e.to_string(),
            })?
        }
        None => in_cluster(cfg)?,
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| ApiClientError::InCluster(e.to_string()))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.write_timeout = Some(CONNECT_TIMEOUT);
    let client = |read_timeout: Duration| {
        let mut config = config.clone();
        config.read_timeout = Some(read_timeout);
        config.reset_reader_on_write = true;
        kube::Client::try_from(config).map_err(|e| ApiClientError::InCluster(e.to_string()))
    };
    // Both: the read timeout counts from the request's last written byte, not from when
    // its pooled connection went idle.
    Ok(Clients {
        request: client(REQUEST_TIMEOUT)?,
        watch: client(WATCH_READ_TIMEOUT)?,
    })
}

/// A LIST page of a watcher got no answer within [`REQUEST_TIMEOUT`] (see
/// [`watch_bounding_lists`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the API server did not answer the list within {0:?}; listing again on a new connection (is the API server reachable from this node?)")]
pub struct ListTimedOut(pub Duration);

/// `kube-runtime`'s watcher on `api` with `config`, whose every LIST page (the initial
/// list, and the re-list after a `410 Expired`) must arrive within [`REQUEST_TIMEOUT`].
/// The watcher lists, then watches, through `api`'s client, which must be
/// [`ApiClient::watch_client`] so that a quiet watch is not cut; that client's read
/// timeout cannot bound a list, so this does it from outside: while the watcher lists
/// (from its `Init` event to its `InitDone`), each wait for its next event is one page's
/// request, and one that takes longer drops the watcher (its request and connection with
/// it) and yields [`watcher::Error::InitialListFailed`] with [`ListTimedOut`]; the next
/// poll starts a new watcher, so a backoff on the stream applies between the two. Once
/// listed, the watch stream is left alone: the server ends it after
/// [`WATCH_TIMEOUT_SECONDS`] (set here on `config`), `kube-runtime` drops one idle for 5 s
/// longer, and [`WATCH_READ_TIMEOUT`] is the last resort.
pub fn watch_bounding_lists<K>(
    api: kube::Api<K>,
    config: watcher::Config,
) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    struct State<K: 'static> {
        api: kube::Api<K>,
        config: watcher::Config,
        inner: BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
        listing: bool,
    }
    let config = config.timeout(WATCH_TIMEOUT_SECONDS);
    let inner = watcher(api.clone(), config.clone()).boxed();
    let state = State {
        api,
        config,
        inner,
        // A new watcher starts with a list.
        listing: true,
    };
    futures::stream::unfold(state, |mut st| async move {
        let next = if st.listing {
            match tokio::time::timeout(REQUEST_TIMEOUT, st.inner.next()).await {
                Ok(next) => next,
                Err(_) => {
                    st.inner = watcher(st.api.clone(), st.config.clone()).boxed();
                    let timed_out = kube::Error::Service(Box::new(ListTimedOut(REQUEST_TIMEOUT)));
                    return Some((Err(watcher::Error::InitialListFailed(timed_out)), st));
                }
            }
        } else {
            st.inner.next().await
        };
        match &next {
            Some(Ok(watcher::Event::Init)) => st.listing = true,
            Some(Ok(watcher::Event::InitDone)) => st.listing = false,
            _ => {}
        }
        next.map(|item| (item, st))
    })
    .boxed()
}

/// The in-cluster kubeconfig: the service account's CA (or `--kube-ca-file`), and its
/// token by file, so that `kube` follows the token's rotation.
fn in_cluster(cfg: &InstallConfig) -> Result<Kubeconfig, ApiClientError> {
    let creds = kubeconfig::read_credentials(
        &cfg.service_account_dir,
        cfg.kube_ca_file.as_deref(),
        cfg.skip_tls_verify,
    )
    .map_err(|e| ApiClientError::InCluster(e.to_string()))?;
    let mut cluster = json!({"server": cfg.server});
    match &creds.ca_pem {
        Some(pem) if !creds.skip_tls_verify => {
            cluster["certificate-authority-data"] = json!(BASE64_STANDARD.encode(pem));
        }
        _ => cluster["insecure-skip-tls-verify"] = json!(true),
    }
    let token_file = cfg.service_account_dir.join("token");
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "agent", "user": {"tokenFile": token_file}}],
        "contexts": [{"name": "agent", "context": {"cluster": "local", "user": "agent"}}],
        "current-context": "agent",
    });
    serde_json::from_value(doc).map_err(|e| ApiClientError::InCluster(e.to_string()))
}
