//! The crate's error: one value per stage of the data flow, each mapped to its CNI error
//! code (CNI spec 1.1.0, "Well-known Error Codes"; 100 and up are ours).

use crate::apply::ApplyError;
use crate::cni::{EnvError, ErrorCode};
use crate::config::ConfigError;
use crate::lock::LockError;
use crate::netns::NetnsError;
use crate::pluginevent::SendError;
use crate::pod::LookupError;
use crate::redirect::RedirectError;
use crate::validate::ValidateError;

/// Any failure of a CNI verb.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `CNI_*` environment is incomplete (code 4).
    #[error(transparent)]
    Env(#[from] EnvError),
    /// Stdin could not be read (code 5).
    #[error("cannot read the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    /// The network configuration is not JSON (6), invalid (7) or of an unsupported version (1).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A configuration field asks for something this build cannot do (code 2).
    #[error("{0}")]
    Unsupported(String),
    /// The pod could not be read: API unreachable (11) or a definite API error (100).
    #[error(transparent)]
    Lookup(#[from] LookupError),
    /// An annotation or proxy setting of the pod is invalid (101).
    #[error("pod settings rejected: {0}")]
    Redirect(#[from] RedirectError),
    /// The pod netns could not be entered (102).
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The netns is held by another of our operations (11 while it is busy, 103 when the
    /// lock file cannot be used). Nothing was written.
    #[error("cannot lock the pod netns: {0}")]
    Lock(#[from] LockError),
    /// Writing the rules failed (103). They were removed again.
    #[error("writing redirection rules failed: {0}")]
    Apply(#[from] ApplyError),
    /// The rules were written but are not in effect (104). They were removed again.
    #[error("validation failed: {0}")]
    Validate(#[from] ValidateError),
    /// The node agent did not enrol an ambient pod: absent, no answer in time, or
    /// unavailable for now (HTTP 503: no ztunnel took its snapshot within the agent's
    /// wait or ztunnel left before the hand-over, or the agent's API read or annotation
    /// failed) (11); refused or the exchange failed (106). Nothing was left in the netns.
    #[error("ambient mode: {0}")]
    Ambient(#[from] SendError),
    /// STATUS: the plugin cannot serve ADD now (50).
    #[error("istio-cni is not ready: {0}")]
    NotAvailable(String),
    /// A bug: the plugin panicked (105). Whatever ADD had written was removed again.
    #[error("internal error in istio-cni (please report it): {0}")]
    Internal(String),
}

impl Error {
    /// The CNI error code of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Env(_) => ErrorCode::INVALID_ENVIRONMENT,
            Error::Stdin(_) => ErrorCode::IO_FAILURE,
            Error::Config(e) => e.code(),
            Error::Unsupported(_) => ErrorCode::UNSUPPORTED_FIELD,
            Error::Lookup(
                LookupError::Rejected { .. }
                | LookupError::LocalFile { .. }
                | LookupError::WrongPod { .. },
            ) => ErrorCode::POD_LOOKUP_FAILED,
            Error::Lookup(_) => ErrorCode::TRY_AGAIN_LATER,
            Error::Redirect(_) => ErrorCode::INVALID_POD_SETTING,
            Error::Netns(_) => ErrorCode::NETNS_FAILED,
            Error::Lock(LockError::Busy { .. }) => ErrorCode::TRY_AGAIN_LATER,
            Error::Lock(_) => ErrorCode::APPLY_FAILED,
            Error::Apply(_) => ErrorCode::APPLY_FAILED,
            Error::Validate(_) => ErrorCode::VALIDATION_FAILED,
            Error::Ambient(
                SendError::NoAgent { .. }
                | SendError::Timeout(_)
                | SendError::Refused { status: 503, .. },
            ) => ErrorCode::TRY_AGAIN_LATER,
            Error::Ambient(_) => ErrorCode::AMBIENT_NOT_ENROLLED,
            Error::NotAvailable(_) => ErrorCode::PLUGIN_NOT_AVAILABLE,
            Error::Internal(_) => ErrorCode::INTERNAL,
        }
    }
}
