//! The plugin's kubeconfig (`<cni_agent_run_dir>/istio-cni-kubeconfig`), built from the
//! agent's service account (token and CA) and the API server address a pod sees
//! (`KUBERNETES_SERVICE_HOST`, `_PORT`, `_PROTOCOL`). Written as JSON, which every
//! kubeconfig reader accepts (JSON is YAML), so no value needs hand quoting.
//!
//! Also the checks of the agent's own `--kubeconfig` ([`load_agent_kubeconfig`]). Every
//! credential file is read with the bounded, regular-files-only reader of
//! [`super::fsutil`].

use std::path::{Path, PathBuf};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::json;

use super::fsutil::{self, ReadError, CA_LIMIT, KUBECONFIG_LIMIT, TOKEN_LIMIT};

/// File name of the kubeconfig in the agent run dir (upstream's name).
pub const KUBECONFIG_FILE: &str = "istio-cni-kubeconfig";

/// The kubeconfig cannot be built, or the agent's own cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// `KUBERNETES_SERVICE_HOST` is unset: not running in a pod, and no server given.
    #[error(
        "KUBERNETES_SERVICE_HOST is not set; the agent needs the API server address a pod sees"
    )]
    NoServer,
    /// A credential file (or a kubeconfig, or a file it names) cannot be read: missing,
    /// not a regular file, or larger than its limit. The message names the file.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The token file is empty.
    #[error("service account token {0} is empty")]
    EmptyToken(PathBuf),
    /// The agent's `--kubeconfig` is not a valid kubeconfig.
    #[error("kubeconfig {}: {reason}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
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
/// Both are read as [`fsutil::read_limited`] does: regular files (or symlinks to them, as
/// in a projected volume) only, non-blocking, at most [`TOKEN_LIMIT`] and [`CA_LIMIT`].
///
/// Errors: [`KubeconfigError::Read`] naming the file / [`KubeconfigError::EmptyToken`].
pub fn read_credentials(
    sa_dir: &Path,
    ca_file: Option<&Path>,
    skip_tls_verify: bool,
) -> Result<Credentials, KubeconfigError> {
    let token_path = sa_dir.join("token");
    let token = String::from_utf8_lossy(&fsutil::read_limited(&token_path, TOKEN_LIMIT)?)
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(KubeconfigError::EmptyToken(token_path));
    }
    let ca_pem = if skip_tls_verify {
        None
    } else {
        let default_ca = sa_dir.join("ca.crt");
        Some(fsutil::read_limited(
            ca_file.unwrap_or(&default_ca),
            CA_LIMIT,
        )?)
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

/// The agent's own kubeconfig (`--kubeconfig`), read and checked as `kube` will use it,
/// but safely: the file is read with [`fsutil::read_limited`] (a regular file of at most
/// [`KUBECONFIG_LIMIT`], opened non-blocking), decoded as `kube` does (UTF-8, or UTF-16
/// with a byte order mark), parsed, and its relative file references made absolute
/// against its directory (as `Kubeconfig::read_from`). Then every file that building a
/// client from its current context will read (`certificate-authority`,
/// `client-certificate`, `client-key` and `tokenFile`, each unless inline data takes
/// precedence) is read the same bounded way, so that none of them is a FIFO, a device
/// or huge: `kube`'s own reads of them cannot block or exhaust memory then.
///
/// Errors: [`KubeconfigError::Read`] naming the file (the kubeconfig or one it names),
/// [`KubeconfigError::Invalid`] when it does not parse.
pub fn load_agent_kubeconfig(path: &Path) -> Result<kube::config::Kubeconfig, KubeconfigError> {
    let bytes = fsutil::read_limited(path, KUBECONFIG_LIMIT)?;
    let invalid = |reason: String| KubeconfigError::Invalid {
        path: path.into(),
        reason,
    };
    let utf16 = |b: &[u8], from: fn([u8; 2]) -> u16| {
        let units: Vec<u16> = b
            .chunks(2)
            .map(|c| from([c[0], *c.get(1).unwrap_or(&0)]))
            .collect();
        String::from_utf16(&units).map_err(|_| invalid("invalid UTF-16".into()))
    };
    let text = match bytes.as_slice() {
        [0xFF, 0xFE, rest @ ..] => utf16(rest, u16::from_le_bytes)?,
        [0xFE, 0xFF, rest @ ..] => utf16(rest, u16::from_be_bytes)?,
        [0xEF, 0xBB, 0xBF, rest @ ..] => {
            String::from_utf8(rest.to_vec()).map_err(|_| invalid("invalid UTF-8".into()))?
        }
        b => String::from_utf8(b.to_vec()).map_err(|_| invalid("invalid UTF-8".into()))?,
    };
    let mut kc = kube::config::Kubeconfig::from_yaml(&text).map_err(|e| invalid(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let absolute = |p: &mut Option<String>| {
        if let Some(rel) = p.as_deref().filter(|f| Path::new(f).is_relative()) {
            *p = Some(dir.join(rel).to_string_lossy().into_owned());
        }
    };
    for c in kc.clusters.iter_mut().filter_map(|n| n.cluster.as_mut()) {
        absolute(&mut c.certificate_authority);
    }
    for a in kc
        .auth_infos
        .iter_mut()
        .filter_map(|n| n.auth_info.as_mut())
    {
        absolute(&mut a.client_certificate);
        absolute(&mut a.client_key);
        absolute(&mut a.token_file);
    }
    let context = kc
        .current_context
        .as_deref()
        .and_then(|name| kc.contexts.iter().find(|c| c.name == name))
        .and_then(|c| c.context.as_ref());
    let mut referenced: Vec<(&str, fsutil::Limit)> = Vec::new();
    if let Some(ctx) = context {
        let cluster = kc
            .clusters
            .iter()
            .find(|c| c.name == ctx.cluster)
            .and_then(|c| c.cluster.as_ref());
        if let Some(c) = cluster.filter(|c| c.certificate_authority_data.is_none()) {
            referenced.extend(c.certificate_authority.as_deref().map(|f| (f, CA_LIMIT)));
        }
        let user = ctx.user.as_deref().and_then(|u| {
            kc.auth_infos
                .iter()
                .find(|a| a.name == u)
                .and_then(|a| a.auth_info.as_ref())
        });
        if let Some(a) = user {
            if a.client_certificate_data.is_none() {
                referenced.extend(a.client_certificate.as_deref().map(|f| (f, CA_LIMIT)));
            }
            if a.client_key_data.is_none() {
                referenced.extend(a.client_key.as_deref().map(|f| (f, CA_LIMIT)));
            }
            if a.token.is_none() {
                referenced.extend(a.token_file.as_deref().map(|f| (f, TOKEN_LIMIT)));
            }
        }
    }
    for (file, limit) in referenced {
        fsutil::read_limited(Path::new(file), limit)?;
    }
    Ok(kc)
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
        assert!(matches!(
            server_from_env(env(&[])),
            Err(KubeconfigError::NoServer)
        ));
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
        assert!(matches!(missing, Err(KubeconfigError::Read(_))));
    }

    #[test]
    fn the_agents_kubeconfig_and_the_files_it_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        let doc = |ca: &str, user: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://a:443\n{ca}\nusers:\n- name: u\n  user:\n{user}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n"
            )
        };
        std::fs::write(dir.path().join("ca.crt"), "pem").unwrap();
        std::fs::write(dir.path().join("tok"), "t").unwrap();
        let ok = doc("    certificate-authority: ca.crt", "    tokenFile: tok");
        std::fs::write(&kc, &ok).unwrap();
        let loaded = load_agent_kubeconfig(&kc).unwrap();
        let ca = loaded.clusters[0]
            .cluster
            .as_ref()
            .unwrap()
            .certificate_authority
            .clone();
        assert_eq!(ca.unwrap(), dir.path().join("ca.crt").to_string_lossy());

        // A FIFO token file named by it is refused, naming the FIFO.
        let tok = dir.path().join("tok");
        std::fs::remove_file(&tok).unwrap();
        nix::unistd::mkfifo(&tok, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = load_agent_kubeconfig(&kc).unwrap_err().to_string();
        assert!(e.contains("tok") && e.contains("FIFO"), "{e}");
        // Unless an inline token takes precedence (kube never reads the file then).
        std::fs::write(
            &kc,
            doc(
                "    certificate-authority: ca.crt",
                "    token: x\n    tokenFile: tok",
            ),
        )
        .unwrap();
        load_agent_kubeconfig(&kc).unwrap();

        // The kubeconfig itself: not YAML, /dev/zero, too large.
        std::fs::write(&kc, "clusters: [").unwrap();
        assert!(matches!(
            load_agent_kubeconfig(&kc),
            Err(KubeconfigError::Invalid { .. })
        ));
        std::fs::remove_file(&kc).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &kc).unwrap();
        let e = load_agent_kubeconfig(&kc).unwrap_err().to_string();
        assert!(e.contains("character device"), "{e}");
        std::fs::remove_file(&kc).unwrap();
        std::fs::File::create(&kc)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let e = load_agent_kubeconfig(&kc).unwrap_err().to_string();
        assert!(
            e.contains("1 MiB") && e.contains(&kc.display().to_string()),
            "{e}"
        );
    }
}
