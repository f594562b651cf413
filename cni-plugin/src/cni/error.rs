//! The CNI error result: `{cniVersion, code, msg, details}` (CNI spec 1.1.0, section
//! "Error" under "Result Types"), and the well-known error codes.

use serde::Serialize;

/// A CNI error code. Codes 0–99 are reserved by the spec; 100 and up are plugin-specific.
///
/// Source: CNI spec 1.1.0, "Error" / "Well-known Error Codes".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u32);

impl ErrorCode {
    /// 1: incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: ErrorCode = ErrorCode(1);
    /// 2: unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: ErrorCode = ErrorCode(2);
    /// 3: container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: ErrorCode = ErrorCode(3);
    /// 4: invalid necessary environment variables, such as `CNI_COMMAND` or `CNI_NETNS`.
    pub const INVALID_ENVIRONMENT: ErrorCode = ErrorCode(4);
    /// 5: I/O failure, e.g. reading stdin.
    pub const IO_FAILURE: ErrorCode = ErrorCode(5);
    /// 6: failed to decode content (stdin is not JSON).
    pub const DECODING_FAILURE: ErrorCode = ErrorCode(6);
    /// 7: invalid network config: a field has the wrong type or an invalid value.
    pub const INVALID_NETWORK_CONFIG: ErrorCode = ErrorCode(7);
    /// 11: try again later: a transient condition, here the Kubernetes API being unreachable.
    pub const TRY_AGAIN_LATER: ErrorCode = ErrorCode(11);
    /// 50: the plugin is not available (STATUS): it cannot serve ADD requests now.
    pub const PLUGIN_NOT_AVAILABLE: ErrorCode = ErrorCode(50);

    /// 100: the pod could not be read from the Kubernetes API (not found, forbidden, bad reply).
    pub const POD_LOOKUP_FAILED: ErrorCode = ErrorCode(100);
    /// 101: a pod annotation or proxy setting has an invalid value.
    pub const INVALID_POD_SETTING: ErrorCode = ErrorCode(101);
    /// 102: the pod network namespace could not be entered.
    pub const NETNS_FAILED: ErrorCode = ErrorCode(102);
    /// 103: writing the rules into the netns failed (iptables-restore or netlink).
    pub const APPLY_FAILED: ErrorCode = ErrorCode(103);
    /// 104: the rules were written but validation (read-back or probe) failed.
    pub const VALIDATION_FAILED: ErrorCode = ErrorCode(104);
    /// 105: an internal error (a bug); anything written was removed again.
    pub const INTERNAL: ErrorCode = ErrorCode(105);
    /// 106: the node agent refused to enrol an ambient pod, or the exchange with it
    /// failed; it left nothing in the netns.
    pub const AMBIENT_NOT_ENROLLED: ErrorCode = ErrorCode(106);
}

/// The JSON object a plugin prints on stdout when a verb fails (CNI spec 1.1.0, "Error").
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorResult {
    /// The version of the request (or the newest supported one when it is unknown).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The error code.
    pub code: ErrorCode,
    /// A short message for people.
    pub msg: String,
    /// Longer details (the cause chain), empty when there are none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}
