//! Test support for `istio-cni`: the in-repo fake Kubernetes API server, test network
//! namespaces, and a libcni-like chain runner. The end-to-end tests live in `tests/`.

#![warn(missing_docs)]

pub mod agent;
pub mod chain;
#[cfg(feature = "cri")]
pub mod cri;
pub mod fake_api;
pub mod kubelet;
pub mod net;
pub mod node;
#[cfg(feature = "cri")]
pub mod podtemplate;
pub mod sandbox;
pub mod stats;
pub mod ztunnel;
