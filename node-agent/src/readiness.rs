//! The one shared answer to "is the plugin installed and proven on this node, and if not,
//! why not": read by `/readyz`, the ready metric, and the node taint. Also the answer to
//! "is the agent alive", for `/healthz`: every step of a loop that must make progress
//! (an install pass, a self-test, building the API client) is marked busy while it runs
//! ([`Readiness::busy`]), with a bound longer than any legitimate run of it; a step busy
//! beyond its bound is stuck, and the agent is not live ([`Readiness::liveness`]), so the
//! kubelet's liveness probe restarts it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    api: Option<String>,
    stopping: bool,
    ztunnel: Option<String>,
}

/// A step in progress (see [`Readiness::busy`]).
#[derive(Debug)]
struct Step {
    loop_name: &'static str,
    what: String,
    since: Instant,
    bound: Duration,
}

/// Readiness of the agent: binary, kubeconfig and chained entry in place (install), the
/// last self-test passed, no fight with another writer over the config, the agent's own
/// API credentials usable, not shutting down. And its liveness: no step stuck.
#[derive(Debug)]
pub struct Readiness {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<()>,
    /// Steps in progress, by id.
    busy: Mutex<BTreeMap<u64, Step>>,
    next_step: AtomicU64,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            state: Mutex::default(),
            changed: tokio::sync::watch::channel(()).0,
            busy: Mutex::default(),
            next_step: AtomicU64::new(0),
        }
    }
}

/// Marks a step busy until dropped (see [`Readiness::busy`]).
#[derive(Debug)]
#[must_use = "the step counts as busy only while the guard lives"]
pub struct Busy {
    readiness: Arc<Readiness>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.readiness
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}

fn whole_seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
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

    /// Records (or clears) why the agent's own API credentials (`--kubeconfig` and the
    /// files it names) cannot be used: the node then cannot be managed through the API.
    pub fn set_api(&self, problem: Option<String>) {
        self.update(|s| s.api = problem);
    }

    /// Records (or clears) a note on ambient mode: no ztunnel serves this node. It is a
    /// note, not a reason: the plugin and sidecar pods work without ztunnel, and upstream's
    /// install order (the CNI DaemonSet, then ztunnel's) must not wait on it; `/readyz`
    /// shows it either way ([`Readiness::notes`]).
    pub fn set_ztunnel(&self, note: Option<String>) {
        self.update(|s| s.ztunnel = note);
    }

    /// What `/readyz` shows besides readiness: the ambient note
    /// ([`Readiness::set_ztunnel`]).
    pub fn notes(&self) -> Vec<String> {
        let s = self.state.lock().expect("readiness lock");
        s.ztunnel.iter().map(|z| format!("ambient: {z}")).collect()
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
        if let Some(a) = &s.api {
            reasons.push(format!("api: {a}"));
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

    /// Marks a step of the loop `loop_name` (e.g. "install") as running from now, doing
    /// `what` (e.g. "an install pass"), until the returned guard is dropped. `bound` is
    /// the longest the step can legitimately take; past it the step is stuck and
    /// [`Readiness::liveness`] fails. Several steps may be busy at once.
    pub fn busy(
        self: &Arc<Self>,
        loop_name: &'static str,
        what: impl Into<String>,
        bound: Duration,
    ) -> Busy {
        let id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let step = Step {
            loop_name,
            what: what.into(),
            since: Instant::now(),
            bound,
        };
        self.busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, step);
        Busy {
            readiness: self.clone(),
            id,
        }
    }

    /// `Ok` while no step has been busy longer than its bound, else one reason per stuck
    /// step, naming its loop, what it does, and for how long (whole seconds).
    pub fn liveness(&self) -> Result<(), Vec<String>> {
        let now = Instant::now();
        let stuck: Vec<String> = self
            .busy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|s| now.duration_since(s.since) > s.bound)
            .map(|s| {
                format!(
                    "{}: {} has been running for {}, longer than the {} it may take: stuck",
                    s.loop_name,
                    s.what,
                    whole_seconds(now.duration_since(s.since)),
                    whole_seconds(s.bound)
                )
            })
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck)
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
        r.set_api(Some("kubeconfig /k: a FIFO".into()));
        assert_eq!(r.status().unwrap_err(), ["api: kubeconfig /k: a FIFO"]);
        r.set_api(None);
        r.set_ztunnel(Some("no ztunnel is connected".into()));
        assert!(
            r.status().is_ok(),
            "ztunnel's absence is a note, not a reason"
        );
        assert_eq!(r.notes(), ["ambient: no ztunnel is connected"]);
        r.set_ztunnel(None);
        assert!(r.notes().is_empty());
        r.set_stopping();
        assert_eq!(r.status().unwrap_err(), ["the agent is shutting down"]);
    }

    #[test]
    fn live_unless_a_step_overruns_its_bound() {
        let r = Arc::new(Readiness::default());
        assert!(r.liveness().is_ok());
        let pass = r.busy("install", "an install pass", Duration::from_secs(60));
        assert!(r.liveness().is_ok(), "busy within its bound is live");
        let stuck = r.busy("self-test", "the self-test", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let reasons = r.liveness().unwrap_err();
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(
            reasons[0].starts_with("self-test: the self-test has been running for 0s")
                && reasons[0].ends_with("stuck"),
            "{reasons:?}"
        );
        drop(stuck);
        assert!(r.liveness().is_ok(), "a step that finished is not stuck");
        drop(pass);
        assert!(r.status().is_err(), "liveness is not readiness");
    }
}
