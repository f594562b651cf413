//! `istio-cni`: a chained CNI plugin that writes Istio's sidecar redirection rules into a
//! pod's network namespace and validates them before ADD returns, so that no
//! `istio-validation` init container is needed.
//!
//! Data flows one way through the modules, one per stage:
//! stdin → [`config`] → [`pod`] → [`redirect`] → [`rules`] → [`apply`] (iptables) or
//! [`nft`] (nftables) → [`validate`] → result. [`plan`] turns a pod into what ADD does
//! (sidecar rules, ambient hand-off, or nothing), and [`enablement`] decides which pods
//! are in ambient mode (upstream's enablement selectors).
//!
//! Beside the flow: [`cni`] holds the protocol; [`netns`] is the one place that enters a
//! network namespace, [`routing`] speaks rtnetlink inside one, and [`scratch`] makes one
//! for the node agent's self-test; [`lock`] keeps one writer per netns; [`nft_wire`] and
//! [`nfnetlink`] are the nf_tables wire format. [`plugin`] wires the verbs together.

#![warn(missing_docs)]

pub mod apply;
pub mod cni;
pub mod config;
pub mod enablement;
pub mod error;
pub mod lock;
pub mod logging;
pub mod netns;
pub mod nfnetlink;
pub mod nft;
pub mod nft_wire;
pub mod plan;
pub mod plugin;
pub mod pluginevent;
pub mod pod;
pub mod redirect;
pub mod routing;
pub mod rules;
pub mod scratch;
pub mod validate;

pub use error::Error;
