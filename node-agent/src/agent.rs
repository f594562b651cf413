//! The daemon loop (`istio-cni-node-agent run`): install, prove, and keep the plugin
//! chained. It wakes on file events in the conf dir, the bin dir and the service account
//! dir (the projected token's `..data` symlink swap), and on a slow resync timer; it never
//! polls in a tight loop, and reads (its own included) do not wake it. After every pass
//! that changed something, the self-test runs again; a failing one is retried with
//! exponential backoff (1 s doubling to 5 min). When another writer keeps dropping our entry, the agent backs off exponentially,
//! says so in its log, its readiness and its metrics, and tries again later.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::install::{self, InstallCache, InstallConfig, InstallError};
use crate::metrics::{Metrics, Outcome, UpstreamInstall};
use crate::readiness::{Check, Readiness};
use crate::selftest;

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run the self-test after each install change, running the plugin as this view of
    /// the host says; `None`: no self-test (the node counts as proven once installed).
    pub self_test: Option<selftest::HostView>,
    /// Re-check everything at least this often, even without events.
    pub resync: Duration,
    /// More rewrites by another writer than this within [`RunOptions::conflict_window`]
    /// is a fight: back off.
    pub conflict_limit: usize,
    /// See [`RunOptions::conflict_limit`].
    pub conflict_window: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            self_test: None,
            resync: Duration::from_secs(60),
            conflict_limit: 5,
            conflict_window: Duration::from_secs(60),
        }
    }
}

/// What the file watcher watches: each wanted dir, or while it does not exist yet, its
/// nearest existing ancestor (whose events then tell when the dir appears).
#[derive(Default)]
struct Watches {
    /// wanted dir → the path watched for it.
    watched: Vec<(PathBuf, PathBuf)>,
}

impl Watches {
    fn update(&mut self, watcher: &mut notify::RecommendedWatcher, wanted: &[PathBuf]) {
        for dir in wanted {
            let target = dir
                .ancestors()
                .find(|a| a.is_dir())
                .unwrap_or(dir)
                .to_path_buf();
            let current = self.watched.iter().position(|(w, _)| w == dir);
            if current.is_some_and(|i| self.watched[i].1 == target) {
                continue;
            }
            if let Some(i) = current {
                let (_, old) = self.watched.remove(i);
                if !self.watched.iter().any(|(_, t)| *t == old) {
                    let _ = watcher.unwatch(&old);
                }
            }
            match watcher.watch(&target, RecursiveMode::NonRecursive) {
                Ok(()) if target == *dir => log::debug!("watching {}", dir.display()),
                Ok(()) => log::info!(
                    "{} does not exist yet; watching {} for it",
                    dir.display(),
                    target.display()
                ),
                Err(e) => log::warn!(
                    "cannot watch {}: {e}; relying on the resync",
                    target.display()
                ),
            }
            self.watched.push((dir.clone(), target));
        }
    }
}

/// The agent's state across passes.
pub struct Agent {
    cfg: InstallConfig,
    opts: RunOptions,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    /// When another writer's rewrite made us chain again, most recent last.
    rewrites: VecDeque<Instant>,
    /// Whether our entry has been in place at least once (later re-chains are rewrites).
    chained_before: bool,
    /// Backing off from a fight: no install before this instant.
    fight_until: Option<Instant>,
    /// The delays of that backoff, 1 s doubling to 60 s.
    fight_backoff: Backoff,
    /// What earlier passes verified (see [`InstallCache`]).
    cache: InstallCache,
    /// After a failed self-test: no new one before this instant (unless the install
    /// changed).
    self_test_retry: Option<Instant>,
    /// The delays between failing self-tests, 1 s doubling to [`SELF_TEST_BACKOFF_MAX`].
    self_test_backoff: Backoff,
}

/// Longest wait between two failing self-tests.
pub const SELF_TEST_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The longest an install pass may legitimately take; one running longer is stuck, and
/// `/healthz` fails (see [`Readiness::busy`]). A pass reads a few small files (each
/// bounded, opened non-blocking, so no read can wait), copies at most the plugin binary
/// ([`install::fsutil::PLUGIN_BINARY_LIMIT`]) and fsyncs a few files: milliseconds on a
/// healthy node, seconds on a slow disk. 60 s is far beyond that, and well inside what a
/// liveness probe tolerates before a restart would help.
pub const INSTALL_PASS_LIMIT: Duration = Duration::from_secs(60);

/// On SIGTERM during a pass, how long the pass may still run before the agent stops
/// without it (its writes are atomic, so abandoning it leaves no partial file).
pub const SHUTDOWN_PASS_GRACE: Duration = Duration::from_secs(5);

impl Agent {
    /// An agent for `cfg`, reporting into `readiness` and `metrics`.
    pub fn new(
        cfg: InstallConfig,
        opts: RunOptions,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> Agent {
        if opts.self_test.is_none() {
            // Off means never pending: readiness then flips in one step when installed.
            readiness.set_self_test(Check::Ok);
        }
        Agent {
            cfg,
            opts,
            readiness,
            metrics,
            rewrites: VecDeque::new(),
            chained_before: false,
            fight_until: None,
            fight_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            cache: InstallCache::default(),
            self_test_retry: None,
            self_test_backoff: Backoff::new(Duration::from_secs(1), SELF_TEST_BACKOFF_MAX),
        }
    }

    /// Runs until `shutdown` completes. What to remove on exit, and when readiness reports
    /// the agent as stopping, is the caller's decision (see [`crate::upgrade`]): the taint
    /// controller must be stopped first, or it would report the stop on the node. A pass
    /// in progress when `shutdown` completes gets [`SHUTDOWN_PASS_GRACE`] to finish; the
    /// file I/O of a pass runs off the async runtime, so a slow pass never delays the
    /// signal handling or the health endpoints.
    ///
    /// Errors: a message when the file watcher cannot be set up.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), String> {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads (open, close without write) change nothing, and every pass causes
            // them: reading the configs, exec'ing the plugin for the self-test. Waking on
            // them would loop.
            if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                // A full channel already holds a wake-up: events coalesce.
                let _ = tx.try_send(());
            }
        })
        .map_err(|e| format!("cannot watch files: {e}"))?;
        let mut watches = Watches::default();
        watches.update(&mut watcher, &self.watched_dirs());
        tokio::pin!(shutdown);
        let mut stopped = self.pass_unless(shutdown.as_mut()).await;
        while !stopped {
            let wake = self.next_wake();
            stopped = tokio::select! {
                _ = &mut shutdown => true,
                Some(()) = rx.recv() => {
                    // Let a burst of writes (a writer that is not atomic) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while rx.try_recv().is_ok() {}
                    watches.update(&mut watcher, &self.watched_dirs());
                    self.pass_unless(shutdown.as_mut()).await
                }
                _ = tokio::time::sleep_until(wake) => self.pass_unless(shutdown.as_mut()).await,
            };
        }
        drop(watcher);
        Ok(())
    }

    /// One [`Agent::pass`], unless `shutdown` completes first: then the pass gets
    /// [`SHUTDOWN_PASS_GRACE`] to finish. Returns whether `shutdown` completed.
    async fn pass_unless<F: Future<Output = ()>>(
        &mut self,
        shutdown: std::pin::Pin<&mut F>,
    ) -> bool {
        let pass = self.pass();
        tokio::pin!(pass);
        tokio::select! {
            () = &mut pass => false,
            () = shutdown => {
                if tokio::time::timeout(SHUTDOWN_PASS_GRACE, pass).await.is_err() {
                    log::warn!(
                        "stopping without waiting for the pass in progress (still running after {SHUTDOWN_PASS_GRACE:?})"
                    );
                }
                true
            }
        }
    }

    fn watched_dirs(&self) -> Vec<PathBuf> {
        vec![
            self.cfg.conf_dir.clone(),
            self.cfg.bin_dir.clone(),
            self.cfg.service_account_dir.clone(),
        ]
    }

    fn next_wake(&self) -> Instant {
        let resync = Instant::now() + self.opts.resync;
        [self.fight_until, self.self_test_retry]
            .into_iter()
            .flatten()
            .fold(resync, Instant::min)
    }

    /// One pass: install (unless backing off), then the self-test if something changed or
    /// it has not passed yet.
    pub async fn pass(&mut self) {
        if let Some(until) = self.fight_until {
            if Instant::now() < until {
                return;
            }
        }
        let cfg = self.cfg.clone();
        let mut cache = std::mem::take(&mut self.cache);
        let busy = self
            .readiness
            .busy("install", "an install pass", INSTALL_PASS_LIMIT);
        let (outcome, cache) = tokio::task::spawn_blocking(move || {
            let outcome = install::install_once(&cfg, &mut cache);
            (outcome, cache)
        })
        .await
        .unwrap_or_else(|e| {
            let err = InstallError::Io {
                what: "run the install task",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            };
            (Err(err), InstallCache::default())
        });
        self.cache = cache;
        drop(busy);
        self.metrics
            .install_attempts
            .get_or_create(&Outcome::of(outcome.is_ok()))
            .inc();
        let upstream = match &outcome {
            Ok(_) => Some("SUCCESS"),
            Err(e) => e.upstream_result(&self.cfg),
        };
        if let Some(result) = upstream {
            self.metrics
                .installs
                .get_or_create(&UpstreamInstall { result })
                .inc();
        }
        let installed = match outcome {
            Ok(i) => i,
            Err(e) => {
                log::warn!("install: {e}");
                self.readiness.set_install(Check::Failed(e.to_string()));
                return;
            }
        };
        for c in &installed.changes {
            log::info!("{c}");
        }
        if installed.wrote_entry && self.chained_before {
            self.record_rewrite(&installed.config_file);
        } else if !installed.wrote_entry && self.fight_until.is_some() {
            log::info!(
                "{} kept our entry: the conflict is over",
                installed.config_file.display()
            );
            self.fight_until = None;
            self.fight_backoff.reset();
            self.readiness.set_conflict(None);
            self.metrics.conflict.set(0);
        }
        self.chained_before = true;
        self.readiness.set_install(Check::Ok);
        let changed = !installed.changes.is_empty();
        let retry_due = self.self_test_retry.is_none_or(|at| Instant::now() >= at);
        if self.opts.self_test.is_some()
            && (changed || (!self.readiness.self_test_passed() && retry_due))
        {
            self.self_test().await;
        }
    }

    fn record_rewrite(&mut self, file: &std::path::Path) {
        let now = Instant::now();
        self.metrics.conflist_rewrites.inc();
        self.rewrites.push_back(now);
        while self
            .rewrites
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.opts.conflict_window)
        {
            self.rewrites.pop_front();
        }
        log::info!(
            "another writer dropped our entry from {}; chained it again",
            file.display()
        );
        if self.rewrites.len() > self.opts.conflict_limit {
            let delay = self.fight_backoff.next_delay();
            let reason = format!(
                "{} was rewritten without our entry {} times within {:?}; another agent or operator is managing it; retrying in {delay:?}",
                file.display(),
                self.rewrites.len(),
                self.opts.conflict_window
            );
            log::warn!("{reason}");
            self.readiness.set_conflict(Some(reason));
            self.metrics.conflict.set(1);
            self.fight_until = Some(now + delay);
        }
    }

    async fn self_test(&mut self) {
        let Some(host) = self.opts.self_test.clone() else {
            return;
        };
        let (entry, work) = (self.cfg.plugin_entry(), self.cfg.agent_run_dir.clone());
        let busy = self
            .readiness
            .busy("self-test", "the self-test", selftest::time_limit(&entry));
        let result = tokio::task::spawn_blocking(move || selftest::run(&host, &entry, &work))
            .await
            .unwrap_or_else(|e| Err(selftest::SelfTestError::Setup(e.to_string())));
        drop(busy);
        self.metrics
            .self_test_runs
            .get_or_create(&Outcome::of(result.is_ok()))
            .inc();
        match result {
            Ok(took) => {
                self.metrics.self_test_duration.observe(took.as_secs_f64());
                log::info!("self-test passed in {took:?}");
                self.readiness.set_self_test(Check::Ok);
                self.self_test_retry = None;
                self.self_test_backoff.reset();
            }
            Err(e) => {
                let delay = self.self_test_backoff.next_delay();
                log::error!("{e}; next self-test in {delay:?}");
                self.readiness.set_self_test(Check::Failed(e.to_string()));
                self.self_test_retry = Some(Instant::now() + delay);
            }
        }
    }
}
