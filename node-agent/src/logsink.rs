//! Receives the plugin's log records on `<cni_agent_run_dir>/log.sock` (one JSON datagram
//! per record, see `istio_cni::logging`) and logs them as `plugin[ADD 3f2a9c1b
//! default/web-0]: …`, so that `kubectl logs` on the agent shows what ADD did on its node.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use istio_cni::logging::AGENT_LOG_SOCKET;
use serde_json::Value;
use tokio::net::UnixDatagram;

/// Binds the log socket in `run_dir`, replacing a stale one. Returns it and its path (to
/// remove on exit).
///
/// Errors: the I/O error of creating `run_dir` or binding.
pub fn bind(run_dir: &Path) -> std::io::Result<(UnixDatagram, PathBuf)> {
    std::fs::create_dir_all(run_dir)?;
    let path = run_dir.join(AGENT_LOG_SOCKET);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok((UnixDatagram::bind(&path)?, path))
}

/// Logs every record received on `sock`, forever. Malformed datagrams are logged as text.
pub async fn serve(sock: UnixDatagram) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                log::warn!("plugin log socket: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let (level, context, msg) = parse(&buf[..n]);
        log::log!(level, "plugin[{context}]: {msg}");
    }
}

/// (level, context, message) of one datagram.
fn parse(datagram: &[u8]) -> (log::Level, String, String) {
    let Ok(v) = serde_json::from_slice::<Value>(datagram) else {
        return (
            log::Level::Info,
            "?".into(),
            String::from_utf8_lossy(datagram).into_owned(),
        );
    };
    let field = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let level = log::Level::from_str(&field("level")).unwrap_or(log::Level::Info);
    (level, field("context"), field("msg"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_records_and_tolerates_garbage() {
        let (l, c, m) = parse(br#"{"level":"WARN","context":"ADD abc default/web","msg":"x"}"#);
        assert_eq!(
            (l, c.as_str(), m.as_str()),
            (log::Level::Warn, "ADD abc default/web", "x")
        );
        let (l, _, m) = parse(b"not json");
        assert_eq!((l, m.as_str()), (log::Level::Info, "not json"));
    }
}
