//! Logs go to stderr, and also to a file when `plugin_log_file` is set; never to stdout,
//! which belongs to the CNI result. One line per record:
//! `2026-11-22T05:00:00.123Z INFO istio-cni[ADD abc123]: message`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    context: String,
    file: Option<Mutex<File>>,
}

impl Log for Logger {
    /// Our records at the configured level; libraries' (kube, hyper, rustls) at warn at most.
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        let ours = m.target().starts_with("istio_cni");
        m.level() <= log::max_level() && (ours || m.level() <= log::Level::Warn)
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "{} {} istio-cni[{}]: {}\n",
            humantime::format_rfc3339_millis(std::time::SystemTime::now()),
            r.level(),
            self.context,
            r.args()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. `context` tags every line (e.g. `ADD 3f2a9c1b`); `file` is appended
/// to when given (a file that cannot be opened is reported on stderr and skipped). Only
/// the first call in a process takes effect.
pub fn init(level: LevelFilter, context: String, file: Option<&Path>) {
    let file = file.and_then(
        |p| match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                eprintln!("istio-cni: cannot open log file {}: {e}", p.display());
                None
            }
        },
    );
    if log::set_boxed_logger(Box::new(Logger { context, file })).is_ok() {
        log::set_max_level(level);
    }
}
