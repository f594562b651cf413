//! Logs go to stderr, and also to a file when `plugin_log_file` is set; never to stdout,
//! which belongs to the CNI result. One line per record:
//! `2026-11-22T05:00:00.123Z INFO istio-cni[ADD abc123 default/web-0]: message`, or with
//! [`Format::Json`] (the node agent's `LOG_AS_JSON`, upstream's `global.logAsJson`) one
//! JSON object per line: `{"time", "level", "scope", "context", "msg"}`, `level` in lower
//! case as Istio's JSON logs have it.
//!
//! Each record is also sent, best effort, to the node agent's log socket
//! ([`AGENT_LOG_SOCKET`] in `cni_agent_run_dir`), so that `kubectl logs` on the agent shows
//! what ADD did. One JSON datagram per record (`{"level", "context", "msg"}`), sent
//! non-blocking: when the socket is absent or full, the record is dropped and nothing
//! waits or fails.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

/// File name of the node agent's log socket in `cni_agent_run_dir`.
pub const AGENT_LOG_SOCKET: &str = "log.sock";

/// How records are written to stderr and the log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One text line per record.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

struct Logger {
    format: Format,
    context: String,
    file: Option<Mutex<File>>,
    agent: Option<(UnixDatagram, PathBuf)>,
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
        let msg = escape_controls(&r.args().to_string());
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        let line = match self.format {
            Format::Text => format!("{time} {} istio-cni[{}]: {msg}\n", r.level(), self.context),
            Format::Json => {
                let mut l = serde_json::json!({
                    "time": time.to_string(),
                    "level": r.level().as_str().to_ascii_lowercase(),
                    "scope": "istio-cni",
                    "context": self.context,
                    "msg": msg,
                })
                .to_string();
                l.push('\n');
                l
            }
        };
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        if let Some((sock, path)) = &self.agent {
            let msg = serde_json::json!({
                "level": r.level().as_str(),
                "context": self.context,
                "msg": msg,
            });
            let _ = sock.send_to(msg.to_string().as_bytes(), path);
        }
    }

    fn flush(&self) {}
}

/// `s` with every control character (newline, carriage return, escape, …) written as a
/// Rust escape (`\n`, `\u{1b}`), so that a value from stdin, `CNI_ARGS` or the API can
/// never start a new log line or drive a terminal.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Installs the logger. `context` tags every line (e.g. `ADD 3f2a9c1b default/web-0`);
/// `file` is appended to when given (a file that cannot be opened is reported on stderr and
/// skipped); `agent_dir` is where the agent's log socket may be. Only the first call in a
/// process takes effect.
pub fn init(level: LevelFilter, context: String, file: Option<&Path>, agent_dir: Option<&Path>) {
    init_as(Format::Text, level, context, file, agent_dir);
}

/// [`init`] writing records as `format` says.
pub fn init_as(
    format: Format,
    level: LevelFilter,
    context: String,
    file: Option<&Path>,
    agent_dir: Option<&Path>,
) {
    let file = file.and_then(
        |p| match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                eprintln!("istio-cni: cannot open log file {}: {e}", p.display());
                None
            }
        },
    );
    let agent = agent_dir
        .map(|d| d.join(AGENT_LOG_SOCKET))
        .filter(|p| p.exists())
        .and_then(|p| {
            let sock = UnixDatagram::unbound().ok()?;
            sock.set_nonblocking(true).ok()?;
            Some((sock, p))
        });
    let logger = Logger {
        format,
        context: escape_controls(&context),
        file,
        agent,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_cannot_forge_lines() {
        assert_eq!(escape_controls("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            escape_controls("a\n2026-01-01 INFO forged\r\u{1b}[31m"),
            "a\\n2026-01-01 INFO forged\\r\\u{1b}[31m"
        );
    }
}
