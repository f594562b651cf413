//! The plugin-event socket: how the plugin's ADD of an ambient pod asks the node agent to
//! enrol it (upstream Istio `cni/pkg/plugin/cnieventclient.go`, the client;
//! `cni/pkg/nodeagent/cni-watcher.go`, the server).
//!
//! The wire, as upstream speaks it: HTTP/1.1 over the Unix socket
//! `<cni_agent_run_dir>/pluginevent.sock`, `POST /cmdadd` with a JSON body ([`AddEvent`],
//! Go's encoding of upstream's `CNIPluginAddEvent`: field names as Go spells them, each
//! address as Go's `net.IPNet`, `{"IP": "10.0.0.5", "Mask": "<base64 of the mask bytes>"}`);
//! `200 OK` means enrolled, any other status carries the agent's reason as text.
//!
//! The body is hostile input to the agent: anything that can reach the socket can send
//! one. [`AddEvent::parse`] bounds its size, and checks every field's shape (an absolute
//! netns path, Kubernetes names, addresses with valid masks) before anything acts on it;
//! what it names is then checked against the API and the netns itself by the agent.

use std::net::IpAddr;
use std::path::PathBuf;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The socket's file name in `cni_agent_run_dir` (upstream `CNIEventSocketName`).
pub const SOCKET_NAME: &str = "pluginevent.sock";
/// The request path of an ADD event (upstream `CNIAddEventPath`).
pub const ADD_PATH: &str = "/cmdadd";
/// How long the agent may take over one event, all of it (API reads, netns checks, rules,
/// ztunnel's ack and listeners); after it, the agent undoes what it did and answers
/// `504`. The plugin waits a little longer ([`crate::plugin::AMBIENT_ADD_WAIT`]).
pub const AGENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(25);
/// The largest body the agent reads: an event is a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// An ADD event on the wire (upstream `CNIPluginAddEvent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddEvent {
    /// `CNI_NETNS` of the ADD.
    #[serde(rename = "Netns")]
    pub netns: String,
    /// `K8S_POD_NAME`.
    #[serde(rename = "PodName")]
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(rename = "PodNamespace")]
    pub pod_namespace: String,
    /// The addresses of `prevResult` (Go writes `null` for none).
    #[serde(rename = "IPs", default)]
    pub ips: Option<Vec<IpConfig>>,
}

/// One address of an [`AddEvent`] (upstream `nodeagent.IPConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Index into `prevResult.interfaces`, when given.
    #[serde(rename = "Interface", default)]
    pub interface: Option<i64>,
    /// The address and its mask.
    #[serde(rename = "Address")]
    pub address: GoIpNet,
    /// The gateway; Go writes `""` for none.
    #[serde(rename = "Gateway", default)]
    pub gateway: Option<String>,
}

/// Go's JSON encoding of `net.IPNet`: the address as text, the mask as base64 of its bytes
/// (4 for IPv4, 16 for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoIpNet {
    /// The address (`net.IP` marshals as its text form).
    #[serde(rename = "IP")]
    pub ip: String,
    /// The mask (`net.IPMask` is a byte slice: base64).
    #[serde(rename = "Mask")]
    pub mask: String,
}

impl GoIpNet {
    /// Go's encoding of `net`.
    pub fn from_net(net: &IpNet) -> GoIpNet {
        let mask = match net.netmask() {
            IpAddr::V4(m) => m.octets().to_vec(),
            IpAddr::V6(m) => m.octets().to_vec(),
        };
        GoIpNet {
            ip: net.addr().to_string(),
            mask: base64::engine::general_purpose::STANDARD.encode(mask),
        }
    }

    /// The network it encodes: the address and the prefix length of a contiguous mask of
    /// the address's family.
    ///
    /// Errors: a message naming what does not parse.
    pub fn to_net(&self) -> Result<IpNet, String> {
        let ip: IpAddr = self
            .ip
            .parse()
            .map_err(|_| format!("{:?} is not an IP address", self.ip))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.mask)
            .map_err(|_| format!("mask {:?} is not base64", self.mask))?;
        let want = if ip.is_ipv4() { 4 } else { 16 };
        if bytes.len() != want {
            return Err(format!(
                "mask of {} has {} bytes, expected {want}",
                self.ip,
                bytes.len()
            ));
        }
        let ones: u32 = bytes.iter().map(|b| b.count_ones()).sum();
        let contiguous = bytes
            .iter()
            .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1))
            .skip(ones as usize)
            .all(|bit| !bit);
        if !contiguous {
            return Err(format!("mask of {} is not contiguous", self.ip));
        }
        IpNet::new(ip, ones as u8).map_err(|e| e.to_string())
    }
}

/// An [`AddEvent`] whose fields have the right shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedAddEvent {
    /// The netns path (absolute, no `..`).
    pub netns: PathBuf,
    /// The pod's name (a DNS-1123 subdomain).
    pub pod_name: String,
    /// The pod's namespace (a DNS-1123 label).
    pub pod_namespace: String,
    /// The pod's addresses.
    pub ips: Vec<IpNet>,
}

/// A body that is not a well-formed ADD event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Over [`MAX_BODY`].
    #[error("the event body has {0} bytes, over the {MAX_BODY}-byte limit")]
    TooLarge(usize),
    /// Not the JSON of an event.
    #[error("the event body is not a CNI ADD event: {0}")]
    Json(String),
    /// A field has the wrong shape.
    #[error("the event's {field} is invalid: {reason}")]
    Field {
        /// The field, as upstream names it.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl AddEvent {
    /// The event the plugin sends for an ADD: `CNI_NETNS`, the pod, and `prevResult`'s
    /// addresses.
    pub fn new(netns: &str, pod_name: &str, pod_namespace: &str, ips: &[IpNet]) -> AddEvent {
        AddEvent {
            netns: netns.to_owned(),
            pod_name: pod_name.to_owned(),
            pod_namespace: pod_namespace.to_owned(),
            ips: (!ips.is_empty()).then(|| {
                ips.iter()
                    .map(|net| IpConfig {
                        interface: None,
                        address: GoIpNet::from_net(net),
                        gateway: Some(String::new()),
                    })
                    .collect()
            }),
        }
    }

    /// The body as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads and checks a body, for the agent. Unknown fields are ignored, as Go's
    /// decoder does.
    ///
    /// Errors: [`EventError`] naming the first problem.
    pub fn parse(body: &[u8]) -> Result<CheckedAddEvent, EventError> {
        if body.len() > MAX_BODY {
            return Err(EventError::TooLarge(body.len()));
        }
        let event: AddEvent =
            serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
        let field = |field, reason: String| EventError::Field { field, reason };
        let netns = PathBuf::from(&event.netns);
        if !netns.is_absolute()
            || event.netns.contains('\0')
            || netns
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(field(
                "Netns",
                format!("{:?} is not an absolute path", event.netns),
            ));
        }
        check_name(&event.pod_name, 253, true).map_err(|r| field("PodName", r))?;
        check_name(&event.pod_namespace, 63, false).map_err(|r| field("PodNamespace", r))?;
        let ips = event
            .ips
            .iter()
            .flatten()
            .map(|c| c.address.to_net())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| field("IPs", r))?;
        Ok(CheckedAddEvent {
            netns,
            pod_name: event.pod_name,
            pod_namespace: event.pod_namespace,
            ips,
        })
    }
}

/// The agent did not enrol the pod.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Nothing listens on the socket: the agent is not running on this node, or ambient
    /// mode is off in it.
    #[error("the istio-cni node agent does not answer on {socket} ({source}); is its DaemonSet running on this node with ambient enabled?")]
    NoAgent {
        /// The socket.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The agent refused the pod, with its reason.
    #[error("the istio-cni node agent refused the pod (HTTP {status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The agent's message.
        reason: String,
    },
    /// No answer in time.
    #[error("the istio-cni node agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The exchange failed midway.
    #[error("talking to the istio-cni node agent on {socket}: {reason}")]
    Exchange {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Sends `event` to the agent on `<run_dir>/pluginevent.sock` (`POST /cmdadd`, as
/// upstream's plugin does) and waits for its answer, at most `timeout` in all. The answer's
/// body is read up to [`MAX_BODY`].
///
/// Errors: [`SendError`].
pub fn send_add(
    run_dir: &std::path::Path,
    event: &AddEvent,
    timeout: std::time::Duration,
) -> Result<(), SendError> {
    let socket = run_dir.join(SOCKET_NAME);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SendError::Exchange {
            socket: socket.clone(),
            reason: format!("tokio runtime: {e}"),
        })?;
    rt.block_on(async {
        tokio::time::timeout(timeout, post(&socket, event.to_json()))
            .await
            .unwrap_or(Err(SendError::Timeout(timeout)))
    })
}

async fn post(socket: &std::path::Path, body: Vec<u8>) -> Result<(), SendError> {
    use http_body_util::BodyExt as _;
    let exchange = |reason: String| SendError::Exchange {
        socket: socket.to_owned(),
        reason,
    };
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| SendError::NoAgent {
            socket: socket.to_owned(),
            source,
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| exchange(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::post(ADD_PATH)
        .header(hyper::header::HOST, "unix")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| exchange(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| exchange(e.to_string()))?;
    let status = response.status();
    let text = http_body_util::Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_else(|e| format!("(unreadable answer: {e})"));
    driver.abort();
    if status == hyper::StatusCode::OK {
        Ok(())
    } else {
        Err(SendError::Refused {
            status: status.as_u16(),
            reason: text,
        })
    }
}

/// A Kubernetes object name: lowercase alphanumerics and `-` (and `.` in a subdomain),
/// starting and ending alphanumeric, at most `max` characters (apimachinery
/// `IsDNS1123Label`, `IsDNS1123Subdomain`).
fn check_name(name: &str, max: usize, dots: bool) -> Result<(), String> {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty()
        || name.len() > max
        || !name.chars().all(ok_char)
        || !edge(name.chars().next())
        || !edge(name.chars().last())
    {
        return Err(format!("{name:?} is not a Kubernetes name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The body as upstream's plugin writes it (Go's `json.Marshal` of
    /// `CNIPluginAddEvent` with one IPv4 and one IPv6 address from a CNI 1.0 prevResult).
    #[test]
    fn reads_upstreams_body_and_writes_one_upstream_reads() {
        let go = json!({
            "Netns": "/var/run/netns/cni-1234",
            "PodName": "web-0",
            "PodNamespace": "default",
            "IPs": [
                {"Interface": 0, "Address": {"IP": "10.244.1.5", "Mask": "////AA=="}, "Gateway": "10.244.1.1"},
                {"Interface": 0, "Address": {"IP": "fd00::5", "Mask": "////////////////////AA=="}, "Gateway": ""}
            ]
        });
        let got = AddEvent::parse(go.to_string().as_bytes()).unwrap();
        assert_eq!(got.netns, PathBuf::from("/var/run/netns/cni-1234"));
        assert_eq!(
            got.ips,
            [
                "10.244.1.5/24".parse::<IpNet>().unwrap(),
                "fd00::5/120".parse().unwrap()
            ]
        );
        let ours = AddEvent::new("/var/run/netns/cni-1234", "web-0", "default", &got.ips);
        let back: serde_json::Value = serde_json::from_slice(&ours.to_json()).unwrap();
        assert_eq!(back["IPs"][0]["Address"], go["IPs"][0]["Address"]);
        assert_eq!(back["IPs"][1]["Address"], go["IPs"][1]["Address"]);
        assert_eq!(AddEvent::parse(&ours.to_json()).unwrap(), got);
        // No addresses: Go writes null.
        let none =
            json!({"Netns": "/proc/1/fd/3", "PodName": "a", "PodNamespace": "b", "IPs": null});
        assert!(AddEvent::parse(none.to_string().as_bytes())
            .unwrap()
            .ips
            .is_empty());
    }

    #[test]
    fn hostile_bodies_are_refused_with_the_field_named() {
        let base =
            json!({"Netns": "/var/run/netns/x", "PodName": "p", "PodNamespace": "n", "IPs": null});
        let with = |k: &str, v: serde_json::Value| {
            let mut b = base.clone();
            b[k] = v;
            b.to_string().into_bytes()
        };
        let ip = |ip: &str, mask: &str| json!([{"Address": {"IP": ip, "Mask": mask}}]);
        for (body, field) in [
            (with("Netns", json!("relative/path")), "Netns"),
            (with("Netns", json!("/var/run/netns/../../etc")), "Netns"),
            (with("Netns", json!("/x\u{0}y")), "Netns"),
            (with("PodName", json!("../etc")), "PodName"),
            (with("PodName", json!("UPPER")), "PodName"),
            (with("PodName", json!("")), "PodName"),
            (with("PodNamespace", json!("a.b")), "PodNamespace"),
            (with("PodNamespace", json!("x".repeat(64))), "PodNamespace"),
            (with("IPs", ip("10.0.0.1", "/w==")), "IPs"),
            (with("IPs", ip("10.0.0.1", "/wD/AA==")), "IPs"),
            (with("IPs", ip("nope", "////AA==")), "IPs"),
            (with("IPs", ip("10.0.0.1", "!!")), "IPs"),
        ] {
            let e = AddEvent::parse(&body).unwrap_err();
            assert!(
                matches!(&e, EventError::Field { field: f, .. } if *f == field),
                "{}: {e}",
                String::from_utf8_lossy(&body)
            );
        }
        assert!(matches!(
            AddEvent::parse(&vec![b' '; MAX_BODY + 1]),
            Err(EventError::TooLarge(_))
        ));
        assert!(matches!(AddEvent::parse(b"[]"), Err(EventError::Json(_))));
        assert!(matches!(
            AddEvent::parse(b"{\"Netns\": 1}"),
            Err(EventError::Json(_))
        ));
    }
}
