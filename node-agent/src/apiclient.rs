//! The agent's own Kubernetes API client: in-cluster (the service account token and CA,
//! `KUBERNETES_SERVICE_*`), or from `--kubeconfig`. Built from the same kubeconfig
//! document the agent writes for the plugin, so both authenticate the same way; built
//! afresh for each use, so a rotated token is always picked up.

use std::path::Path;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::install::{kubeconfig, InstallConfig};

/// A client for `cfg`'s API server, or for `kubeconfig_override` when given. Requests
/// time out after `timeout`.
///
/// Errors: a message naming the credential or kubeconfig that could not be used.
pub async fn client(
    cfg: &InstallConfig,
    kubeconfig_override: Option<&Path>,
    timeout: Duration,
) -> Result<kube::Client, String> {
    client_with_timeouts(cfg, kubeconfig_override, timeout, timeout).await
}

/// A client for long watches: connecting times out after 5 s, but a read may wait up to
/// `WATCH_READ_TIMEOUT`, longer than a watch's server-side timeout (290 s).
///
/// Errors: as [`client`].
pub async fn watch_client(
    cfg: &InstallConfig,
    kubeconfig_override: Option<&Path>,
) -> Result<kube::Client, String> {
    client_with_timeouts(
        cfg,
        kubeconfig_override,
        Duration::from_secs(5),
        WATCH_READ_TIMEOUT,
    )
    .await
}

/// How long a watch client waits for the next byte: above the 290 s watch timeout that
/// `kube-runtime` asks for, so that only a dead connection hits it.
pub const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(330);

async fn client_with_timeouts(
    cfg: &InstallConfig,
    kubeconfig_override: Option<&Path>,
    timeout: Duration,
    read_timeout: Duration,
) -> Result<kube::Client, String> {
    let kc = match kubeconfig_override {
        Some(path) => {
            Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => {
            let creds = kubeconfig::read_credentials(
                &cfg.service_account_dir,
                cfg.kube_ca_file.as_deref(),
                cfg.skip_tls_verify,
            )
            .map_err(|e| e.to_string())?;
            serde_json::from_slice(&kubeconfig::render(&cfg.server, &creds))
                .map_err(|e| format!("in-cluster kubeconfig: {e}"))?
        }
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(read_timeout);
    config.write_timeout = Some(timeout);
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
