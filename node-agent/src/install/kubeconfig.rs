//! The plugin's kubeconfig (`<cni_agent_run_dir>/istio-cni-kubeconfig`), built from the
//! agent's service account (token and CA) and the API server address a pod sees
//! (`KUBERNETES_SERVICE_HOST`, `_PORT`, `_PROTOCOL`). Written as JSON, which every
//! kubeconfig reader accepts (JSON is YAML), so no value needs hand quoting.

use std::path::{Path, PathBuf};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::json;

/// File name of the kubeconfig in the agent run dir (upstream's name).
pub const KUBECONFIG_FILE: &str = "istio-cni-kubeconfig";

/// The kubeconfig cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KubeconfigError {
    /// `KUBERNETES_SERVICE_HOST` is unset: not running in a pod, and no server given.
    #[error(
        "KUBERNETES_SERVICE_HOST is not set; the agent needs the API server address a pod sees"
    )]
    NoServer,
    /// A credential file cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
    /// The token file is empty.
    #[error("service account token {0} is empty")]
    EmptyToken(PathBuf),
}

/// The API server URL from the environment a pod gets: `PROTOCOL://HOST:PORT`, with an
/// IPv6 host in brackets. Defaults: port 443, protocol https.
///
/// Errors: [`KubeconfigError::NoServer`] without `KUBERNETES_SERVICE_HOST`.
pub fn server_from_env(get: impl Fn(&str) -> Option<String>) -> Result<String, KubeconfigError> {
    let get = |k: &str| get(k).filter(|v| !v.is_empty());
    let host = get("KUBERNETES_SERVICE_HOST").ok_or(KubeconfigError::NoServer)?;
    let port = get("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
    let protocol = get("KUBERNETES_SERVICE_PROTOCOL").unwrap_or_else(|| "https".into());
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!("{protocol}://{host}:{port}"))
}

/// What the plugin authenticates and verifies with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The bearer token (the projected service account token).
    pub token: String,
    /// PEM of the CA that signs the API server's certificate; `None` with `skip_tls_verify`.
    pub ca_pem: Option<Vec<u8>>,
    /// Do not verify the server's certificate (`--skip-tls-verify`; for tests only).
    pub skip_tls_verify: bool,
}

/// Reads the token from `<sa_dir>/token` and the CA from `ca_file` (`--kube-ca-file`) or
/// `<sa_dir>/ca.crt`. With `skip_tls_verify`, no CA is read.
///
/// Errors: [`KubeconfigError::Read`] / [`KubeconfigError::EmptyToken`].
pub fn read_credentials(
    sa_dir: &Path,
    ca_file: Option<&Path>,
    skip_tls_verify: bool,
) -> Result<Credentials, KubeconfigError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| KubeconfigError::Read {
            path: p.into(),
            reason: e.to_string(),
        })
    };
    let token_path = sa_dir.join("token");
    let token = String::from_utf8_lossy(&read(&token_path)?)
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(KubeconfigError::EmptyToken(token_path));
    }
    let ca_pem = if skip_tls_verify {
        None
    } else {
        let default_ca = sa_dir.join("ca.crt");
        Some(read(ca_file.unwrap_or(&default_ca))?)
    };
    Ok(Credentials {
        token,
        ca_pem,
        skip_tls_verify,
    })
}

/// The kubeconfig document for `server` and `creds`.
pub fn render(server: &str, creds: &Credentials) -> Vec<u8> {
    let mut cluster = json!({"server": server});
    match &creds.ca_pem {
        Some(pem) if !creds.skip_tls_verify => {
            cluster["certificate-authority-data"] = json!(BASE64_STANDARD.encode(pem));
        }
        _ => cluster["insecure-skip-tls-verify"] = json!(true),
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "istio-cni", "user": {"token": creds.token}}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": "istio-cni"}}],
        "current-context": "istio-cni-context",
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("a Value always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn server_url_from_pod_env() {
        assert_eq!(server_from_env(env(&[])), Err(KubeconfigError::NoServer));
        assert_eq!(
            server_from_env(env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")])).unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            server_from_env(env(&[
                ("KUBERNETES_SERVICE_HOST", "fd00::1"),
                ("KUBERNETES_SERVICE_PORT", "6443"),
                ("KUBERNETES_SERVICE_PROTOCOL", "http"),
            ]))
            .unwrap(),
            "http://[fd00::1]:6443"
        );
    }

    #[test]
    fn credentials_and_document() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "tok.en-1\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let c = read_credentials(dir.path(), None, false).unwrap();
        assert_eq!(c.token, "tok.en-1");
        let doc: serde_json::Value = serde_json::from_slice(&render("https://a:443", &c)).unwrap();
        assert_eq!(doc["users"][0]["user"]["token"], "tok.en-1");
        assert_eq!(doc["clusters"][0]["cluster"]["server"], "https://a:443");
        assert!(doc["clusters"][0]["cluster"]["certificate-authority-data"].is_string());

        let c = read_credentials(dir.path(), None, true).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&render("https://a:443", &c)).unwrap();
        assert_eq!(
            doc["clusters"][0]["cluster"]["insecure-skip-tls-verify"],
            true
        );

        std::fs::write(dir.path().join("token"), " \n").unwrap();
        assert!(matches!(
            read_credentials(dir.path(), None, true),
            Err(KubeconfigError::EmptyToken(_))
        ));
        std::fs::write(dir.path().join("token"), "t").unwrap();
        let missing = read_credentials(dir.path(), Some(Path::new("/nonexistent/ca")), false);
        assert!(matches!(missing, Err(KubeconfigError::Read { .. })));
    }
}
