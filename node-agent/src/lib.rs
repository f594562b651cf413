//! `istio-cni-node-agent`: the DaemonSet process that installs `istio-cni` on its node and
//! keeps it chained into the node's primary CNI configuration.

#![warn(missing_docs)]

pub mod agent;
pub mod ambient;
pub mod apiclient;
pub mod backoff;
pub mod config;
pub mod events;
pub mod http;
pub mod install;
pub mod locate;
pub mod logsink;
pub mod metrics;
pub mod readiness;
pub mod repair;
pub mod selftest;
pub mod taint;
pub mod upgrade;
