//! A network namespace this process creates for its own use: the node agent's self-test,
//! and the tests. It sits above [`crate::netns`] (which creates and enters it) and
//! [`crate::routing`] (which brings its `lo` up), so that neither of those two needs the
//! other's help.

use std::path::Path;

use crate::netns::{Netns, NetnsError};

/// A network namespace created by this process, with `lo` up as a runtime's loopback
/// plugin leaves a new sandbox. It exists as long as this value: no bind mount pins it, so
/// nothing is left behind even if the process is killed. Other processes reach it through
/// [`ScratchNetns::path`] (`/proc/<pid>/fd/<fd>`) while it lives.
#[derive(Debug)]
pub struct ScratchNetns {
    netns: Netns,
}

impl ScratchNetns {
    /// Creates the namespace and brings its `lo` up.
    ///
    /// Errors: [`NetnsError::Open`] when `unshare(CLONE_NEWNET)` fails (needs
    /// CAP_SYS_ADMIN) or `lo` cannot be brought up; [`NetnsError::Enter`] when it cannot
    /// be entered.
    pub fn create() -> Result<ScratchNetns, NetnsError> {
        let netns = Netns::create_unpinned()?;
        netns
            .run(crate::routing::loopback_up)?
            .map_err(|e| NetnsError::Open {
                path: netns.path().to_owned(),
                reason: e.to_string(),
            })?;
        Ok(ScratchNetns { netns })
    }

    /// The namespace, to enter it.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// A path other processes can open while this value lives (`CNI_NETNS`).
    pub fn path(&self) -> &Path {
        self.netns.path()
    }
}
