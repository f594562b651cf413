//! An in-repo fake Kubernetes API server, over real HTTP on loopback, for the real `kube`
//! clients of the plugin and the node agent.
//!
//! It keeps objects as JSON in a store that honours the API's semantics where tests rely
//! on them: every write bumps a global `resourceVersion`; `metadata.uid` and
//! `creationTimestamp` are set on create; GET of a missing object is a 404 `Status`;
//! create of an existing one is 409 `AlreadyExists`; an update whose `resourceVersion` does
//! not match is 409 `Conflict`. Lists carry the list's `resourceVersion`. Failure bodies are
//! `metav1.Status` objects with the reason and `details` that
//! `k8s.io/apimachinery/pkg/api/errors/errors.go` gives them (`name` and the resource as
//! `kind` for NotFound, AlreadyExists and Conflict).
//!
//! PATCH follows `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go`: a JSON
//! patch that cannot be applied, a failed `test` included, is **422 `Invalid`** with the
//! generic message and empty details (`applyJSPatch`), not 409.
//!
//! Transport: plain HTTP ([`FakeApi::start`], [`FakeApi::start_in`]), or HTTPS as a real
//! API server serves it ([`FakeApi::start_tls_in`]): a certificate for `127.0.0.1` signed
//! by the CA in [`FakeApi::ca_pem`], which a pod's service account `ca.crt` holds, so a
//! client that trusts only that CA connects (kube-apiserver serves TLS only; the
//! `kubernetes` service has no plain port).
//!
//! Faults for tests: [`FakeApi::set_fault`] makes every request slow, fail with a status,
//! or go unanswered ([`Fault::BlackHole`]); [`FakeApi::stop`] closes the listener so that
//! connections are refused. Apart from the injected fault, the server behaves as
//! kube-apiserver does: a request that the fault leaves alone is served normally.
//!
//! Watches (`?watch=true`, as `kube-runtime`'s watcher sends them): events after the given
//! `resourceVersion` are replayed from a change log, then streamed as they happen, one JSON
//! object per line; without a version (or with "0") the stream starts with an `ADDED` for
//! every current object. `fieldSelector` (`=`, `==`, `!=` on dotted paths such as
//! `spec.nodeName`) and `labelSelector` (`k=v`, `k!=v`, `k`) filter lists and watches; an
//! object that starts or stops matching arrives as `ADDED` or `DELETED`, as from a real
//! server. `allowWatchBookmarks` adds a `BOOKMARK` every [`FakeApi::set_bookmark_interval`].
//! [`FakeApi::compact`] drops the change log, so older versions get `410 Expired` and the
//! client has to list again. `timeoutSeconds` ends a watch.
//!
//! DELETE honours `preconditions` (`uid`, `resourceVersion`) in its `DeleteOptions` body:
//! a mismatch is 409 `Conflict`, as kubectl's and controllers' safe deletes expect.
//!
//! ## Each behaviour and the kube-apiserver source it follows
//!
//! Paths are in kubernetes/kubernetes; `apiserver/` is `staging/src/k8s.io/apiserver/`,
//! `errors.go` is `staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go`.
//!
//! | behaviour | source |
//! |---|---|
//! | every write bumps one global `resourceVersion` | `apiserver/pkg/storage/etcd3/store.go` (the etcd revision) |
//! | 404 `NotFound` with `details.name`/`kind` | `errors.go` `NewNotFound` |
//! | create of an existing name: 409 `AlreadyExists` | `errors.go` `NewAlreadyExists`, `apiserver/pkg/registry/generic/registry/store.go` `Create` |
//! | `generateName`: a suffix of 5 characters | `apiserver/pkg/storage/names/generate.go` `SimpleNameGenerator` |
//! | PUT with a stale `resourceVersion`: 409 `Conflict`, "the object has been modified" | `apiserver/pkg/registry/generic/registry/store.go` (`OptimisticLockErrorMsg`), `errors.go` `NewConflict` |
//! | JSON patch that cannot be applied (a failed `test` too): 422 `Invalid`, generic message, empty details | `apiserver/pkg/endpoints/handlers/patch.go` `applyJSPatch`, `errors.go` `NewGenericServerResponse` |
//! | merge patch (RFC 7386) | `patch.go` `applyJSPatch` (`jsonpatch.MergePatch`) |
//! | `status` subresource patches the same object, metadata (annotations) included | `pkg/registry/core/node/storage/storage.go` and `pkg/registry/core/pod/storage/storage.go` `StatusREST`; `pkg/registry/core/pod/strategy.go` `podStatusStrategy.PrepareForUpdate` keeps the new object's annotations |
//! | namespaces are cluster-scoped: `GET /api/v1/namespaces/{name}` | `pkg/registry/core/namespace/strategy.go` `NamespaceScoped() == false` |
//! | DELETE `preconditions` (`uid`, `resourceVersion`): 409 `Conflict` | `apiserver/pkg/storage/etcd3/store.go` `checkPreconditions` |
//! | watch from a `resourceVersion`: replay, then live events; `ADDED`/`DELETED` when an object enters or leaves the selector | `apiserver/pkg/storage/cacher/cacher.go`, `cache_watcher.go` |
//! | watch from a compacted version: `410 Expired` | `apiserver/pkg/storage/cacher/watch_cache.go` (`errors.NewResourceExpired`, "too old resource version") |
//! | `allowWatchBookmarks`: `BOOKMARK` events with the current version | `apiserver/pkg/storage/cacher/cacher.go` (bookmarks) |
//! | `fieldSelector` `spec.nodeName` (pods), `metadata.name` (any) | `pkg/registry/core/pod/strategy.go` `ToSelectableFields`, `apiserver/pkg/registry/generic/matcher.go` |
//!
//! Routes, the same under `/api/v1` (core group) and `/apis/{group}/{version}`, so that
//! later resources (nodes, events, daemonsets) slot in:
//! `GET|PUT|DELETE …/namespaces/{ns}/{resource}/{name}`, `GET|POST
//! …/namespaces/{ns}/{resource}`, `GET|POST …/{resource}` (all namespaces, or
//! cluster-scoped), `GET|PUT|DELETE …/{resource}/{name}` (cluster-scoped).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::{json, Value};

/// How every request misbehaves, until changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Serve normally.
    #[default]
    None,
    /// Wait this long before answering.
    Delay(Duration),
    /// Answer with this HTTP status and a `Status` body.
    Status(u16),
    /// Accept the connection and read the request, but never answer it: what a client
    /// meets when the API server's packets are dropped after the handshake, or behind a
    /// load balancer that accepts connections for a backend that is gone. No status, no
    /// headers, no close: only a client-side timeout gets the client out. A request that
    /// arrived while this was the fault stays unanswered after the fault is lifted (its
    /// connection is dead for good, as a real black hole leaves it); requests that arrive
    /// later are served. When the server stops, held requests are answered 503 so that
    /// the server can finish.
    BlackHole,
}

/// (resource, namespace or "" for cluster-scoped, name)
type Key = (String, String, String);

/// One write, as watches see it.
struct Change {
    rv: u64,
    resource: String,
    namespace: String,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    /// Every write since `log_start`, in resourceVersion order.
    log: Vec<Change>,
    /// Watches from a version below this get `410 Expired`.
    log_start: u64,
}

struct Shared {
    store: Mutex<Store>,
    /// The resourceVersion of the last change, for watches to wait on.
    changed: tokio::sync::watch::Sender<u64>,
    /// True once the server is stopping: watches end so that shutdown can finish.
    closing: tokio::sync::watch::Sender<bool>,
    bookmark_interval: Mutex<Duration>,
    resource_version: AtomicU64,
    uid_counter: AtomicU64,
    fault: Mutex<Fault>,
    requests: AtomicUsize,
    writes: AtomicUsize,
    watches: AtomicUsize,
    before_patch: Mutex<Vec<BeforePatch>>,
}

/// A one-shot mutation applied to an object just before the next PATCH of it: "another
/// writer changed it between our read and our patch".
struct BeforePatch {
    resource: String,
    name: String,
    mutate: Box<dyn FnOnce(&mut Value) + Send>,
}

impl Shared {
    fn next_rv(&self) -> String {
        (self.resource_version.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }

    /// Stores `new` under `key` (or removes the object when `None`), logs the change for
    /// watches and wakes them. `new` must already carry its new resourceVersion; a removed
    /// object gets one here. Returns the previous object.
    fn commit(&self, store: &mut Store, key: &Key, new: Option<Value>) -> Option<Value> {
        let old = match &new {
            Some(obj) => store.objects.insert(key.clone(), obj.clone()),
            None => store.objects.remove(key),
        };
        let (rv, logged_new) = match new {
            Some(obj) => (rv_of(&obj), Some(obj)),
            None => {
                let rv = self.next_rv();
                (rv.parse().expect("numeric rv"), None)
            }
        };
        if old.is_some() || logged_new.is_some() {
            let mut old_logged = old.clone();
            if logged_new.is_none() {
                // A DELETED event carries the object at the deletion's resourceVersion.
                if let Some(o) = old_logged.as_mut() {
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                }
            }
            store.log.push(Change {
                rv,
                resource: key.0.clone(),
                namespace: key.1.clone(),
                old: old_logged,
                new: logged_new,
            });
            self.changed.send_replace(rv);
        }
        old
    }
}

fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A CA (its PEM) and a TLS acceptor serving a certificate for `127.0.0.1` (and the name
/// `fake-apiserver`) that the CA signs.
fn certificates() -> (String, tokio_rustls::TlsAcceptor) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "fake-apiserver".to_owned()])
        .expect("server params")
        .signed_by(&key, &issuer)
        .expect("server certificate");
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    (
        ca.pem(),
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
    )
}

/// Serves `app` over TLS until `stop` fires: each accepted connection is handshaked and
/// served by hyper on its own task.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

/// A running fake API server. Dropping it stops the server.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    ca_pem: String,
    tls: bool,
}

impl FakeApi {
    /// Starts a server on `127.0.0.1` at a free port, on its own thread and runtime.
    pub fn start() -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        FakeApi::serve(listener)
    }

    /// Starts a server on `127.0.0.1` at a free port inside `netns`: it answers only
    /// there, as a cluster's API answers the processes of one test node.
    pub fn start_in(netns: &crate::net::TestNetns) -> FakeApi {
        let listener = netns
            .open()
            .run(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("enter the netns")
            .expect("bind loopback in the netns");
        FakeApi::serve(listener)
    }

    /// Starts a server on an already bound listener, e.g. one bound inside a test netns
    /// (the socket keeps its namespace, so the server answers only there).
    pub fn serve(std_listener: std::net::TcpListener) -> FakeApi {
        FakeApi::serve_with(std_listener, false)
    }

    /// Starts an HTTPS server on `127.0.0.1` at a free port (see [`FakeApi::start_tls_in`]).
    pub fn start_tls() -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        FakeApi::serve_with(listener, true)
    }

    /// Starts an HTTPS server on `127.0.0.1` at a free port inside `netns`, with a
    /// certificate for `127.0.0.1` signed by [`FakeApi::ca_pem`]'s CA.
    pub fn start_tls_in(netns: &crate::net::TestNetns) -> FakeApi {
        let listener = netns
            .open()
            .run(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("enter the netns")
            .expect("bind loopback in the netns");
        FakeApi::serve_with(listener, true)
    }

    fn serve_with(std_listener: std::net::TcpListener, tls: bool) -> FakeApi {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: tokio::sync::watch::channel(0).0,
            closing: tokio::sync::watch::channel(false).0,
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            resource_version: AtomicU64::new(1000),
            uid_counter: AtomicU64::new(0),
            fault: Mutex::new(Fault::None),
            requests: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
            before_patch: Mutex::new(Vec::new()),
        });
        let app = router(shared.clone());
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("local addr");
        // A CA, and a serving certificate for 127.0.0.1 that it signs. Without TLS the CA
        // still goes into kubeconfigs: kube then trusts only it, as with a real node
        // agent's kubeconfig, instead of loading the OS trust store on every call.
        let (ca_pem, acceptor) = certificates();
        let acceptor = tls.then_some(acceptor);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                match acceptor {
                    None => axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await
                        .expect("serve"),
                    Some(acceptor) => serve_tls(listener, app, acceptor, rx).await,
                }
            });
        });
        FakeApi {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
            ca_pem,
            tls,
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM of the CA the kubeconfig names (what a service account's `ca.crt` holds).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let ca_b64 = BASE64_STANDARD.encode(self.ca_pem.as_bytes());
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}://{}\n    certificate-authority-data: {ca_b64}\nusers:\n- name: plugin\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: plugin\ncurrent-context: fake\n",
            if self.tls { "https" } else { "http" },
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Makes every following request misbehave (or behave again with [`Fault::None`]).
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// How many requests the server has received.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// How many write requests (any method but GET) it has received.
    pub fn writes(&self) -> usize {
        self.shared.writes.load(Ordering::SeqCst)
    }

    /// The stored object, if any (`namespace` is empty for cluster-scoped objects).
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        self.shared.store.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every stored object of `resource`, in all namespaces.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Reasons of the Events (`events.k8s.io/v1`, `regarding`) recorded about the object
    /// named `name`, in creation order.
    pub fn event_reasons(&self, name: &str) -> Vec<String> {
        let mut events = self.list("events");
        events.retain(|e| e["regarding"]["name"] == name);
        events.sort_by_key(rv_of);
        events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Right before the next PATCH of `resource/name`, applies `mutate` to the stored
    /// object as another writer would (bumping its resourceVersion), once.
    pub fn before_next_patch(
        &self,
        resource: &str,
        name: &str,
        mutate: impl FnOnce(&mut Value) + Send + 'static,
    ) {
        self.shared.before_patch.lock().unwrap().push(BeforePatch {
            resource: resource.into(),
            name: name.into(),
            mutate: Box::new(mutate),
        });
    }

    /// Creates or replaces an object (`resource` is the plural, e.g. `pods`), filling
    /// `uid` (unless a new object brings its own), `resourceVersion` and
    /// `creationTimestamp`. Returns the stored object.
    pub fn put(&self, resource: &str, obj: Value) -> Value {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let mut store = self.shared.store.lock().unwrap();
        let key = (resource.to_owned(), ns, name);
        // A test may choose the uid of a new object (to match a cgroup it created).
        let existing_uid = store
            .objects
            .get(&key)
            .map(|o| o["metadata"]["uid"].clone())
            .or_else(|| Some(obj["metadata"]["uid"].clone()));
        let obj = stamp(&self.shared, obj, existing_uid);
        self.shared.commit(&mut store, &key, Some(obj.clone()));
        obj
    }

    /// Removes an object; true when it existed.
    pub fn remove(&self, resource: &str, namespace: &str, name: &str) -> bool {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        let mut store = self.shared.store.lock().unwrap();
        if !store.objects.contains_key(&key) {
            return false;
        }
        self.shared.commit(&mut store, &key, None);
        true
    }

    /// Drops the change log: watches from any version up to now get `410 Expired` and
    /// their clients must list again (what etcd compaction does to a real server).
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.log.clear();
        store.log_start = self.shared.resource_version.load(Ordering::SeqCst) + 1;
    }

    /// How often watches that allow bookmarks get one (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_interval.lock().unwrap() = every;
    }

    /// Number of watch requests served so far.
    pub fn watches(&self) -> usize {
        self.shared.watches.load(Ordering::SeqCst)
    }

    /// Stops the server: open watches end, further connections are refused.
    pub fn stop(&mut self) {
        self.shared.closing.send_replace(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stamp(shared: &Shared, mut obj: Value, existing_uid: Option<Value>) -> Value {
    let meta = obj["metadata"].as_object_mut().expect("metadata object");
    let uid = existing_uid.filter(|u| u.is_string()).unwrap_or_else(|| {
        let n = shared.uid_counter.fetch_add(1, Ordering::SeqCst);
        json!(format!("00000000-0000-4000-8000-{n:012}"))
    });
    meta.insert("uid".into(), uid);
    meta.insert("resourceVersion".into(), json!(shared.next_rv()));
    meta.entry("creationTimestamp")
        .or_insert_with(|| json!("2026-01-01T00:00:00Z"));
    obj
}

/// A `metav1.Status` failure without `details`, as `errors.NewBadRequest` and
/// `errors.NewInternalError` make them (`k8s.io/apimachinery/pkg/api/errors/errors.go`).
fn status(code: StatusCode, reason: &str, message: String) -> Response {
    status_with(code, reason, message, None)
}

/// A `metav1.Status` failure with `details` (omitted when `None`).
fn status_with(
    code: StatusCode,
    reason: &str,
    message: String,
    details: Option<Value>,
) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (code, Json(body)).into_response()
}

/// `details` of the errors about one object (`NewNotFound`, `NewAlreadyExists`,
/// `NewConflict` in `errors.go`): its name, and the resource (plural) as `kind`; the core
/// group is left out.
fn object_details(resource: &str, name: &str) -> Option<Value> {
    Some(json!({"name": name, "kind": resource}))
}

/// 404 `NotFound`, `errors.NewNotFound`.
fn not_found(resource: &str, name: &str) -> Response {
    status_with(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{resource} \"{name}\" not found"),
        object_details(resource, name),
    )
}

/// 409 `Conflict`, `errors.NewConflict`: "Operation cannot be fulfilled on {resource}
/// \"{name}\": {why}".
fn conflict(resource: &str, name: &str, why: &str) -> Response {
    status_with(
        StatusCode::CONFLICT,
        "Conflict",
        format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        object_details(resource, name),
    )
}

/// Every request passes here first: it is counted (writes: any method but GET), then the
/// current [`Fault`] applies — a delay, an injected status instead of the answer, or no
/// answer at all until the server stops ([`Fault::BlackHole`]).
async fn count_and_fault(shared: &Shared, method: &axum::http::Method) -> Option<Response> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    if method != axum::http::Method::GET {
        shared.writes.fetch_add(1, Ordering::SeqCst);
    }
    let fault = *shared.fault.lock().unwrap();
    match fault {
        Fault::None => None,
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Fault::Status(code) => {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some(status(code, "InternalError", "injected fault".into()))
        }
        Fault::BlackHole => {
            // Held whatever the fault becomes later; released only so that a stopping
            // server (which waits for its requests) can finish.
            let mut closing = shared.closing.subscribe();
            let _ = closing.wait_for(|stopping| *stopping).await;
            Some(status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is shutting down".into(),
            ))
        }
    }
}

type Shared_ = State<Arc<Shared>>;

/// The path parameters of a resource URL; the group and version are not part of the key
/// (resource plurals are unique across the groups this server serves).
#[derive(serde::Deserialize)]
struct Loc {
    ns: Option<String>,
    resource: String,
    name: Option<String>,
}

impl Loc {
    fn key(self) -> Key {
        (
            self.resource,
            self.ns.unwrap_or_default(),
            self.name.unwrap_or_default(),
        )
    }
}

fn router(shared: Arc<Shared>) -> Router {
    // The same routes for the core group (`/api/v1`) and named groups (`/apis/G/V`).
    let routes = Router::new()
        .route(
            "/namespaces/{ns}/{resource}/{name}",
            get(get_one)
                .put(put_one)
                .delete(delete_one)
                .patch(patch_one),
        )
        .route(
            "/namespaces/{ns}/{resource}/{name}/status",
            axum::routing::patch(patch_one),
        )
        .route(
            "/namespaces/{ns}/{resource}",
            get(list_some).post(create_one),
        )
        .route("/{resource}", get(list_some).post(create_one))
        .route(
            "/{resource}/{name}",
            get(get_one)
                .put(put_one)
                .delete(delete_one)
                .patch(patch_one),
        )
        .route("/{resource}/{name}/status", axum::routing::patch(patch_one));
    let for_layer = shared.clone();
    Router::new()
        .nest("/api/v1", routes.clone())
        .nest("/apis/{group}/{version}", routes)
        .with_state(shared)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let shared = for_layer.clone();
                async move {
                    match count_and_fault(&shared, req.method()).await {
                        Some(injected) => injected,
                        None => next.run(req).await,
                    }
                }
            },
        ))
}

async fn get_one(State(s): Shared_, UrlPath(loc): UrlPath<Loc>) -> Response {
    get_obj(&s, loc.key())
}

async fn put_one(
    State(s): Shared_,
    UrlPath(loc): UrlPath<Loc>,
    Json(obj): Json<Value>,
) -> Response {
    replace(&s, loc.key(), obj)
}

async fn delete_one(
    State(s): Shared_,
    UrlPath(loc): UrlPath<Loc>,
    body: axum::body::Bytes,
) -> Response {
    let options = serde_json::from_slice::<Value>(&body).ok();
    delete(&s, loc.key(), options)
}

async fn list_some(
    State(s): Shared_,
    UrlPath(loc): UrlPath<Loc>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let q = match Query::parse(&params) {
        Ok(q) => q,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };
    if q.watch {
        watch(s.clone(), loc.resource, loc.ns, q)
    } else {
        list(&s, &loc.resource, loc.ns.as_deref(), &q)
    }
}

async fn create_one(
    State(s): Shared_,
    UrlPath(loc): UrlPath<Loc>,
    Json(obj): Json<Value>,
) -> Response {
    create(&s, &loc.resource, loc.ns.as_deref().unwrap_or(""), obj)
}

/// PATCH: `application/json-patch+json` (RFC 6902; any failure to apply it, a failed `test`
/// included, is 422 `Invalid` as from kube-apiserver, see the module docs) or a merge patch (`merge-patch+json`; strategic merge
/// patches are treated as merge patches). The `status` subresource patches the same object.
async fn patch_one(
    State(s): Shared_,
    UrlPath(loc): UrlPath<Loc>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let key = loc.key();
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("patch is not JSON: {e}"),
            )
        }
    };
    let mut store = s.store.lock().unwrap();
    let hooks: Vec<BeforePatch> = {
        let mut all = s.before_patch.lock().unwrap();
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|h| h.resource == key.0 && h.name == key.2);
        *all = rest;
        mine
    };
    let Some(mut existing) = store.objects.get(&key).cloned() else {
        return not_found(&key.0, &key.2);
    };
    for hook in hooks {
        (hook.mutate)(&mut existing);
        existing["metadata"]["resourceVersion"] = json!(s.next_rv());
        s.commit(&mut store, &key, Some(existing.clone()));
    }
    let mut patched = existing.clone();
    if content_type.starts_with("application/json-patch+json") {
        let ops: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(p) => p,
            Err(e) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("not a JSON patch: {e}"),
                )
            }
        };
        if json_patch::patch(&mut patched, &ops).is_err() {
            // kube-apiserver: `applyJSPatch` (`staging/src/k8s.io/apiserver/pkg/endpoints/
            // handlers/patch.go`) turns any error of applying the patch, a failed `test`
            // included, into `NewGenericServerResponse(422, "", {}, "", err, 0, false)`:
            // reason `Invalid`, the generic 422 message, empty details (the cause is only
            // kept for unexpected responses). A client cannot tell a lost race from a bad
            // path by the answer.
            return status_with(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "the server rejected our request due to an error in our request".into(),
                Some(json!({})),
            );
        }
    } else {
        json_patch::merge(&mut patched, &patch);
    }
    let uid = existing["metadata"]["uid"].clone();
    let patched = stamp(&s, patched, Some(uid));
    s.commit(&mut store, &key, Some(patched.clone()));
    Json(patched).into_response()
}

fn get_obj(shared: &Shared, key: Key) -> Response {
    match shared.store.lock().unwrap().objects.get(&key) {
        Some(obj) => Json(obj.clone()).into_response(),
        None => not_found(&key.0, &key.2),
    }
}

fn create(shared: &Shared, resource: &str, ns: &str, mut obj: Value) -> Response {
    let generated = obj["metadata"]["generateName"].as_str().map(|prefix| {
        format!(
            "{prefix}{:05x}",
            shared.uid_counter.fetch_add(1, Ordering::SeqCst)
        )
    });
    let Some(name) = obj["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .or(generated)
    else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name or metadata.generateName is required".into(),
        );
    };
    obj["metadata"]["name"] = json!(name);
    if !ns.is_empty() {
        obj["metadata"]["namespace"] = json!(ns);
    }
    let mut store = shared.store.lock().unwrap();
    let key = (resource.to_owned(), ns.to_owned(), name.clone());
    if store.objects.contains_key(&key) {
        // `errors.NewAlreadyExists`.
        return status_with(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
            object_details(resource, &name),
        );
    }
    let obj = stamp(shared, obj, None);
    shared.commit(&mut store, &key, Some(obj.clone()));
    (StatusCode::CREATED, Json(obj)).into_response()
}

fn replace(shared: &Shared, key: Key, obj: Value) -> Response {
    let mut store = shared.store.lock().unwrap();
    let Some(existing) = store.objects.get(&key) else {
        return not_found(&key.0, &key.2);
    };
    let sent_rv = obj["metadata"]["resourceVersion"].as_str();
    if sent_rv.is_some_and(|rv| Some(rv) != existing["metadata"]["resourceVersion"].as_str()) {
        // The storage layer's optimistic-concurrency error (`OptimisticLockErrorMsg` in
        // `k8s.io/apiserver/pkg/registry/generic/registry/store.go`), as a Conflict.
        return conflict(
            &key.0,
            &key.2,
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    let uid = existing["metadata"]["uid"].clone();
    let obj = stamp(shared, obj, Some(uid));
    shared.commit(&mut store, &key, Some(obj.clone()));
    Json(obj).into_response()
}

/// DELETE, honouring `preconditions` in the `DeleteOptions` body. Objects go at once
/// (no graceful deletion: tests that need a terminating pod set `deletionTimestamp`).
fn delete(shared: &Shared, key: Key, options: Option<Value>) -> Response {
    let mut store = shared.store.lock().unwrap();
    let Some(existing) = store.objects.get(&key) else {
        return not_found(&key.0, &key.2);
    };
    let pre = options.as_ref().map(|o| &o["preconditions"]);
    for field in ["uid", "resourceVersion"] {
        let want = pre.and_then(|p| p[field].as_str());
        let have = existing["metadata"][field].as_str().unwrap_or_default();
        if let Some(want) = want.filter(|w| *w != have) {
            // `storage.NewInvalidObjError` for a failed precondition, a Conflict
            // (`checkPreconditions` in `k8s.io/apiserver/pkg/storage/etcd3/store.go`).
            return conflict(
                &key.0,
                &key.2,
                &format!(
                    "Precondition failed: {field} in precondition: {want}, {field} in object meta: {have}"
                ),
            );
        }
    }
    let old = shared.commit(&mut store, &key, None).expect("present");
    Json(old).into_response()
}

/// A `fieldSelector` or `labelSelector` term.
#[derive(Debug, Clone)]
struct Term {
    /// Dotted path (fields) or label key.
    key: String,
    /// `None`: the label must exist.
    value: Option<String>,
    negate: bool,
}

/// The list and watch query parameters this server understands.
#[derive(Debug, Default)]
struct Query {
    watch: bool,
    resource_version: Option<u64>,
    fields: Vec<Term>,
    labels: Vec<Term>,
    bookmarks: bool,
    timeout: Option<Duration>,
}

impl Query {
    fn parse(params: &std::collections::HashMap<String, String>) -> Result<Query, String> {
        let terms = |text: Option<&String>| -> Vec<Term> {
            text.into_iter()
                .flat_map(|t| t.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    if let Some((k, v)) = t.split_once("!=") {
                        Term {
                            key: k.into(),
                            value: Some(v.into()),
                            negate: true,
                        }
                    } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                        Term {
                            key: k.into(),
                            value: Some(v.into()),
                            negate: false,
                        }
                    } else {
                        Term {
                            key: t.into(),
                            value: None,
                            negate: false,
                        }
                    }
                })
                .collect()
        };
        let resource_version = match params.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(v) => Some(
                v.parse()
                    .map_err(|_| format!("resourceVersion {v:?} is not a number"))?,
            ),
        };
        Ok(Query {
            watch: matches!(params.get("watch").map(String::as_str), Some("true" | "1")),
            resource_version,
            fields: terms(params.get("fieldSelector")),
            labels: terms(params.get("labelSelector")),
            bookmarks: params
                .get("allowWatchBookmarks")
                .is_some_and(|v| v == "true"),
            timeout: params
                .get("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .map(Duration::from_secs),
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let field_ok = self.fields.iter().all(|t| {
            let mut v = obj;
            for part in t.key.split('.') {
                v = &v[part];
            }
            let have = v.as_str().map(str::to_owned).unwrap_or_else(|| match v {
                Value::Null => String::new(),
                other => other.to_string(),
            });
            (Some(have.as_str()) == t.value.as_deref()) != t.negate
        });
        let labels = &obj["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|t| match &t.value {
            None => !labels[&t.key].is_null(),
            Some(want) => (labels[&t.key].as_str() == Some(want)) != t.negate,
        });
        field_ok && label_ok
    }
}

fn list(shared: &Shared, resource: &str, ns: Option<&str>, q: &Query) -> Response {
    let store = shared.store.lock().unwrap();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((r, n, _), v)| r == resource && ns.is_none_or(|ns| ns == n) && q.matches(v))
        .map(|(_, v)| v.clone())
        .collect();
    let rv = shared.resource_version.load(Ordering::SeqCst).to_string();
    Json(json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}))
        .into_response()
}

/// The watch event a change is for a watcher with `q`, if any.
fn watch_event(q: &Query, c: &Change) -> Option<Value> {
    let was = c.old.as_ref().filter(|o| q.matches(o));
    let is = c.new.as_ref().filter(|o| q.matches(o));
    let (kind, obj) = match (was, is) {
        (None, Some(new)) => ("ADDED", new.clone()),
        (Some(_), Some(new)) => ("MODIFIED", new.clone()),
        (Some(old), None) => match &c.new {
            // It stopped matching: DELETED, with the object as it is now.
            Some(new) => ("DELETED", new.clone()),
            None => ("DELETED", old.clone()),
        },
        (None, None) => return None,
    };
    Some(json!({"type": kind, "object": obj}))
}

fn line(v: &Value) -> axum::body::Bytes {
    let mut bytes = serde_json::to_vec(v).expect("JSON");
    bytes.push(b'\n');
    bytes.into()
}

/// Serves a watch: replays the log after the requested version (or every current object),
/// then streams changes, bookmarks and finally ends at the timeout or at shutdown.
fn watch(shared: Arc<Shared>, resource: String, ns: Option<String>, q: Query) -> Response {
    shared.watches.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(256);
    let kind = kind_of(&resource);
    let in_scope =
        move |c: &Change| c.resource == resource && ns.as_ref().is_none_or(|n| *n == c.namespace);
    // What the watcher has seen: replay starts after this version.
    let mut seen: u64;
    let mut backlog = Vec::new();
    {
        let store = shared.store.lock().unwrap();
        match q.resource_version {
            Some(rv) if rv + 1 < store.log_start => {
                let expired = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", store.log_start - 1),
                    "reason": "Expired", "code": 410,
                }});
                backlog.push(line(&expired));
                seen = u64::MAX;
            }
            Some(rv) => {
                seen = rv;
                for c in store.log.iter().filter(|c| c.rv > rv && in_scope(c)) {
                    backlog.extend(watch_event(&q, c).as_ref().map(line));
                }
            }
            None => {
                for ((r, n, _), obj) in &store.objects {
                    let change = Change {
                        rv: 0,
                        resource: r.clone(),
                        namespace: n.clone(),
                        old: None,
                        new: Some(obj.clone()),
                    };
                    if in_scope(&change) {
                        backlog.extend(watch_event(&q, &change).as_ref().map(line));
                    }
                }
                seen = 0;
            }
        }
        if seen != u64::MAX {
            seen = seen.max(store.log.last().map_or(0, |c| c.rv));
        }
    }
    let mut changed = shared.changed.subscribe();
    let mut closing = shared.closing.subscribe();
    let bookmark_every = *shared.bookmark_interval.lock().unwrap();
    let deadline = tokio::time::Instant::now() + q.timeout.unwrap_or(Duration::from_secs(1800));
    tokio::spawn(async move {
        for b in backlog {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if seen == u64::MAX {
            return; // expired: the client must list again
        }
        let mut bookmark =
            tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
        loop {
            let out: Vec<axum::body::Bytes> = {
                let store = shared.store.lock().unwrap();
                let fresh: Vec<&Change> = store.log.iter().filter(|c| c.rv > seen).collect();
                if let Some(last) = fresh.last() {
                    seen = last.rv;
                }
                fresh
                    .into_iter()
                    .filter(|c| in_scope(c))
                    .filter_map(|c| watch_event(&q, c))
                    .map(|e| line(&e))
                    .collect()
            };
            for b in out {
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            if *closing.borrow() {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = closing.changed() => return,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = bookmark.tick(), if q.bookmarks => {
                    let rv = shared.resource_version.load(Ordering::SeqCst).max(seen);
                    let mark = json!({"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if tx.send(line(&mark)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from_stream(body))
        .expect("response")
}

/// The `kind` of a resource plural, for bookmarks.
fn kind_of(resource: &str) -> String {
    match resource {
        "pods" => "Pod".into(),
        "nodes" => "Node".into(),
        "events" => "Event".into(),
        "daemonsets" => "DaemonSet".into(),
        other => {
            let singular = other.strip_suffix('s').unwrap_or(other);
            let mut c = singular.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        }
    }
}
