//! The one shared answer to "is the plugin installed and proven on this node, and if not,
//! why not": read by `/readyz`, the ready metric, and (next) the node taint.

use std::sync::Mutex;

/// The state of one readiness condition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Check {
    /// Not known yet.
    #[default]
    Pending,
    /// Holds.
    Ok,
    /// Does not hold, with the reason.
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    install: Check,
    self_test: Check,
    conflict: Option<String>,
    stopping: bool,
}

/// Readiness of the agent: binary, kubeconfig and chained entry in place (install), the
/// last self-test passed, no fight with another writer over the config, not shutting down.
#[derive(Debug)]
pub struct Readiness {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<()>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            state: Mutex::default(),
            changed: tokio::sync::watch::channel(()).0,
        }
    }
}

impl Readiness {
    /// A receiver that is notified after every update (for the node taint).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("readiness lock"));
        self.changed.send_replace(());
    }

    /// Records the outcome of an install pass.
    pub fn set_install(&self, check: Check) {
        self.update(|s| s.install = check);
    }

    /// Records the outcome of a self-test.
    pub fn set_self_test(&self, check: Check) {
        self.update(|s| s.self_test = check);
    }

    /// Records (or clears) a fight with another writer over the primary config.
    pub fn set_conflict(&self, conflict: Option<String>) {
        self.update(|s| s.conflict = conflict);
    }

    /// Marks the agent as shutting down: never ready again.
    pub fn set_stopping(&self) {
        self.update(|s| s.stopping = true);
    }

    /// Whether the self-test has passed since the last install change.
    pub fn self_test_passed(&self) -> bool {
        self.state.lock().expect("readiness lock").self_test == Check::Ok
    }

    /// `Ok` when ready, else every reason it is not.
    pub fn status(&self) -> Result<(), Vec<String>> {
        let s = self.state.lock().expect("readiness lock");
        let mut reasons = Vec::new();
        match &s.install {
            Check::Ok => {}
            Check::Pending => reasons.push("install: not done yet".to_owned()),
            Check::Failed(r) => reasons.push(format!("install: {r}")),
        }
        match &s.self_test {
            Check::Ok => {}
            Check::Pending => reasons.push("self-test: not run yet".to_owned()),
            Check::Failed(r) => reasons.push(format!("self-test: {r}")),
        }
        if let Some(c) = &s.conflict {
            reasons.push(format!("conflict: {c}"));
        }
        if s.stopping {
            reasons.push("the agent is shutting down".to_owned());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_everything_holds() {
        let r = Readiness::default();
        assert_eq!(r.status().unwrap_err().len(), 2);
        r.set_install(Check::Ok);
        r.set_self_test(Check::Failed("ADD failed".into()));
        assert_eq!(r.status().unwrap_err(), ["self-test: ADD failed"]);
        r.set_self_test(Check::Ok);
        assert!(r.status().is_ok());
        r.set_conflict(Some("10-calico.conflist rewritten 6 times in 60s".into()));
        assert!(r.status().is_err());
        r.set_conflict(None);
        r.set_stopping();
        assert_eq!(r.status().unwrap_err(), ["the agent is shutting down"]);
    }
}
