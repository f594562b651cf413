//! The plugin-event socket, the agent's side: the plugin's ADD of an ambient pod posts
//! `POST /cmdadd` with an [`AddEvent`] body on `<cni_agent_run_dir>/pluginevent.sock`
//! (upstream `cni/pkg/nodeagent/cni-watcher.go`), and gets `200 OK` once the pod is
//! enrolled, or another status with the reason as text.
//!
//! Anything that can reach the socket can ask the agent to enter a netns, so the socket is
//! made as the ZDS socket is ([`super::socket::prepare_path`]: `0600`, in a directory only
//! root can write), bodies are bounded ([`MAX_BODY`]) and checked field by field
//! ([`AddEvent::parse`]) before the handler sees them; the handler checks what they name
//! against the API and the netns itself.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use istio_cni::pluginevent::{AddEvent, CheckedAddEvent, ADD_PATH, MAX_BODY};

use super::socket::{prepare_path, restrict, SocketError};

/// What the handler answers: `Ok` (enrolled: `200`), or the status and the reason.
pub type Answer = Result<(), (StatusCode, String)>;

/// The handler of one checked event.
pub type Handler =
    Arc<dyn Fn(CheckedAddEvent) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// Binds the socket at `path` (checked and made `0600` as the ZDS socket is).
///
/// Errors: [`SocketError`].
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    prepare_path(path)?;
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| SocketError::Sys {
        path: path.into(),
        call: "bind",
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    restrict(path)?;
    Ok(listener)
}

/// Serves plugin events on `listener` with `handler` until the task is dropped.
///
/// Errors: the server's I/O error.
pub async fn serve(listener: tokio::net::UnixListener, handler: Handler) -> std::io::Result<()> {
    let app = Router::new()
        .route(ADD_PATH, post(add))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(handler);
    axum::serve(listener, app).await
}

async fn add(State(handler): State<Handler>, body: axum::body::Bytes) -> (StatusCode, String) {
    let event = match AddEvent::parse(&body) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("plugin event refused: {e}");
            return (StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    match handler(event).await {
        Ok(()) => (StatusCode::OK, String::new()),
        Err((status, reason)) => {
            log::warn!("plugin event for pod {pod}: {reason}");
            (status, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use istio_cni::pluginevent::{send_add, SendError};
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    /// The plugin's client against this server, over a real Unix socket: an enrolled pod,
    /// a refusal with its reason, a hanging handler cut by the plugin's timeout, and no
    /// agent at all. Each ends in the error the plugin reports.
    #[test]
    fn the_plugins_client_and_the_agents_server_agree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = dir.path().join(istio_cni::pluginevent::SOCKET_NAME);
        let event = |name: &str| {
            AddEvent::new(
                "/var/run/netns/cni-1",
                name,
                "default",
                &["10.0.0.5/24".parse().unwrap()],
            )
        };
        // No agent.
        let e = send_add(dir.path(), &event("web"), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, SendError::NoAgent { .. }), "{e}");

        let rt = tokio::runtime::Runtime::new().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handler: Handler = {
            let seen = seen.clone();
            Arc::new(move |ev: CheckedAddEvent| {
                let seen = seen.clone();
                Box::pin(async move {
                    seen.lock().unwrap().push(ev.pod_name.clone());
                    match ev.pod_name.as_str() {
                        "refused" => Err((
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "ztunnel did not take the pod".into(),
                        )),
                        "slow" => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            Ok(())
                        }
                        _ => Ok(()),
                    }
                })
            })
        };
        let listener = rt.block_on(async { bind(&socket) }).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        rt.spawn(serve(listener, handler));

        send_add(dir.path(), &event("web"), Duration::from_secs(5)).unwrap();
        let e = send_add(dir.path(), &event("refused"), Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, SendError::Refused { status: 500, reason } if reason == "ztunnel did not take the pod"),
            "{e}"
        );
        let e = send_add(dir.path(), &event("slow"), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, SendError::Timeout(_)), "{e}");
        // A body that is not an event never reaches the handler.
        let mut bad = event("Bad_Name");
        bad.netns = "relative".into();
        let e = send_add(dir.path(), &bad, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(&e, SendError::Refused { status: 400, reason } if reason.contains("Netns")),
            "{e}"
        );
        assert_eq!(*seen.lock().unwrap(), ["web", "refused", "slow"]);
    }
}
