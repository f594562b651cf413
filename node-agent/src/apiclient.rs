//! The agent's one Kubernetes API client, shared by every loop (taint, repair, the exit
//! check): in-cluster (the service account and `KUBERNETES_SERVICE_*`), or from
//! `--kubeconfig`. It is built on first use and then reused, so its connections are too.
//! The in-cluster client reads the projected token through `tokenFile`, which `kube`
//! re-reads as it nears expiry, so a rotated token is picked up without a new client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::prelude::{Engine as _, BASE64_STANDARD};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

use crate::install::{kubeconfig, InstallConfig};

/// How long a read may wait for the next byte: above the 290 s watch timeout that
/// `kube-runtime` asks for, so that only a dead connection hits it. Single requests are
/// bounded by their callers (see [`REQUEST_TIMEOUT`]).
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(330);

/// How long one non-watch request (a GET, a PATCH, an Event) may take, used by the callers
/// around each call.
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

/// A handle to the process's one client; clones share it.
#[derive(Clone)]
pub struct ApiClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: InstallConfig,
    kubeconfig: Option<PathBuf>,
    client: tokio::sync::OnceCell<kube::Client>,
}

impl ApiClient {
    /// A handle for `cfg`'s API server (in-cluster), or `kubeconfig` when given. Nothing
    /// is read until [`ApiClient::get`].
    pub fn new(cfg: &InstallConfig, kubeconfig: Option<&Path>) -> ApiClient {
        ApiClient {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                kubeconfig: kubeconfig.map(Path::to_path_buf),
                client: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// The client, built on the first call that succeeds and reused after.
    ///
    /// Errors: [`ApiClientError`] naming the credential or kubeconfig that could not be
    /// used (the next call tries again).
    pub async fn get(&self) -> Result<kube::Client, ApiClientError> {
        self.inner
            .client
            .get_or_try_init(|| build(&self.inner.cfg, self.inner.kubeconfig.as_deref()))
            .await
            .cloned()
    }
}

async fn build(
    cfg: &InstallConfig,
    kubeconfig_override: Option<&Path>,
) -> Result<kube::Client, ApiClientError> {
    let kc = match kubeconfig_override {
        Some(path) => Kubeconfig::read_from(path).map_err(|e| ApiClientError::Kubeconfig {
            path: path.into(),
            reason: e.to_string(),
        })?,
        None => in_cluster(cfg)?,
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| ApiClientError::InCluster(e.to_string()))?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(WATCH_READ_TIMEOUT);
    config.write_timeout = Some(CONNECT_TIMEOUT);
    kube::Client::try_from(config).map_err(|e| ApiClientError::InCluster(e.to_string()))
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
