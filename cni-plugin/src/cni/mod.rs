//! The CNI protocol, independent of what this plugin does: the `CNI_*` environment,
//! spec versions, the chained result and the error result (CNI spec 1.1.0).

pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use env::{CniArgs, CniEnv, Command, EnvError};
pub use error::{ErrorCode, ErrorResult};
pub use version::CniVersion;
