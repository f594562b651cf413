//! Ambient mode (istio/istio `cni/pkg/nodeagent/`): the agent's side of Istio's ambient
//! data plane, where ztunnel, the node proxy, captures an ambient pod's traffic from
//! inside the pod's netns, which the agent hands it.
//!
//! Built so far, and not yet switched on by any setting:
//! - [`zds`]: the wire of ZDS, the protocol with ztunnel (messages at upstream's field
//!   numbers, one per `SOCK_SEQPACKET` packet, the netns in `SCM_RIGHTS`, acks and
//!   deadlines), tested over `socketpair`;
//! - [`server`]: the pods known and each ztunnel connection's snapshot; adds to the newest
//!   connection, deletes to all;
//! - [`listeners`]: whether ztunnel's sockets listen in a pod's netns;
//! - [`enrol`]: one pod enrolled, proved (rules read back, ztunnel's ack, its listeners in
//!   the pod's netns) or undone;
//! - [`pluginevents`]: the plugin-event socket's server (`POST /cmdadd`), bounded and
//!   checked, against the plugin's own client ([`istio_cni::pluginevent::send_add`]);
//! - [`socket`]: the ZDS socket (`0600`, in a directory only root can write) and the loop
//!   that accepts ztunnel's connections.
//!
//! Still to come (issue 22): the enrolment decision and watches, host rules and ipsets,
//! the annotation, the settings and their wiring into `run`.

pub mod enrol;
pub mod listeners;
pub mod pluginevents;
pub mod server;
pub mod socket;
pub mod zds;
