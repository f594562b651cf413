//! The `CNI_*` environment a runtime passes to a plugin (CNI spec 1.1.0, "Parameters").

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

/// The verb in `CNI_COMMAND` (CNI spec 1.1.0, "CNI operations").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Add the container to the network: here, write and validate the redirection rules.
    Add,
    /// Remove the container from the network. Idempotent.
    Del,
    /// Check that the container's networking is as ADD left it.
    Check,
    /// Report the supported spec versions.
    Version,
    /// Report whether the plugin is ready to serve ADD (spec 1.1.0).
    Status,
    /// Garbage-collect resources of attachments that no longer exist (spec 1.1.0).
    Gc,
}

impl Command {
    /// Parses the value of `CNI_COMMAND` (upper case, as the spec spells it).
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        })
    }
}

/// A required `CNI_*` variable is missing or malformed (CNI error code 4).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// The variable is unset or empty.
    #[error("environment variable {0} is required for this command but is not set")]
    Missing(&'static str),
    /// `CNI_COMMAND` names no verb of the spec.
    #[error("CNI_COMMAND={0:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC")]
    UnknownCommand(String),
    /// `CNI_ARGS` is not a `;`-separated list of `KEY=VALUE` pairs.
    #[error("CNI_ARGS entry {0:?} is not of the form KEY=VALUE")]
    BadArgs(String),
    /// A variable is set but its value is malformed.
    #[error("environment variable {var} is invalid: {reason}")]
    Invalid {
        /// The variable, e.g. `CNI_CONTAINERID`.
        var: &'static str,
        /// What is wrong with it (the value is quoted with escapes).
        reason: String,
    },
}

/// `CNI_ARGS` key of the pod's name, as Kubernetes runtimes (containerd, CRI-O) pass it.
pub const ARG_POD_NAME: &str = "K8S_POD_NAME";
/// `CNI_ARGS` key of the pod's namespace.
pub const ARG_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
/// `CNI_ARGS` key of the pod's UID.
pub const ARG_POD_UID: &str = "K8S_POD_UID";

/// Longest `CNI_CONTAINERID` accepted, in bytes. The spec sets no limit; container runtimes
/// use 64 hex digits.
pub const MAX_CONTAINER_ID_LEN: usize = 256;

/// Checks a `CNI_CONTAINERID`: "must start with an alphanumeric character, optionally
/// followed by any combination of one or more alphanumeric characters, underscore (_), dot
/// (.) or hyphen (-)" (CNI spec 1.1.0, "Parameters"), ASCII only, at most
/// [`MAX_CONTAINER_ID_LEN`] bytes.
///
/// Errors: [`EnvError::Invalid`] naming the variable.
pub fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let invalid = |reason: String| EnvError::Invalid {
        var: "CNI_CONTAINERID",
        reason,
    };
    if id.len() > MAX_CONTAINER_ID_LEN {
        return Err(invalid(format!(
            "{} bytes long, more than {MAX_CONTAINER_ID_LEN}",
            id.len()
        )));
    }
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(invalid(format!(
            "{id:?} must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
        )));
    }
    Ok(())
}

/// The parsed `CNI_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`: the runtime's container (sandbox) ID.
    pub container_id: Option<String>,
    /// `CNI_NETNS`: path to the container's network namespace, e.g. `/var/run/netns/cni-…`.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the interface name inside the container.
    pub ifname: Option<String>,
    /// `CNI_ARGS`: extra `KEY=VALUE` pairs; Kubernetes runtimes pass `K8S_POD_NAME` etc. here.
    pub args: CniArgs,
}

impl CniEnv {
    /// Reads the process environment.
    ///
    /// Errors: [`EnvError`] when `CNI_COMMAND` is missing or unknown, when a variable the
    /// command needs is missing (ADD and CHECK need `CNI_CONTAINERID`, `CNI_NETNS` and
    /// `CNI_IFNAME`; DEL needs `CNI_CONTAINERID` and `CNI_IFNAME`), or when `CNI_ARGS` is
    /// malformed.
    pub fn from_process() -> Result<CniEnv, EnvError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`CniEnv::from_process`], reading variables through `get` (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let raw = get("CNI_COMMAND").ok_or(EnvError::Missing("CNI_COMMAND"))?;
        let command = Command::parse(&raw).ok_or(EnvError::UnknownCommand(raw))?;
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS").map(PathBuf::from),
            ifname: get("CNI_IFNAME"),
            args: CniArgs::parse(get("CNI_ARGS").as_deref().unwrap_or(""))?,
        };
        env.args.validate_kubernetes()?;
        let needs_netns = matches!(command, Command::Add | Command::Check);
        let needs_container = needs_netns || command == Command::Del;
        if let Some(id) = &env.container_id {
            validate_container_id(id)?;
        }
        if needs_container {
            if env.container_id.is_none() {
                return Err(EnvError::Missing("CNI_CONTAINERID"));
            }
            if env.ifname.is_none() {
                return Err(EnvError::Missing("CNI_IFNAME"));
            }
        }
        if needs_netns && env.netns.is_none() {
            return Err(EnvError::Missing("CNI_NETNS"));
        }
        Ok(env)
    }
}

/// `CNI_ARGS`: `KEY1=VAL1;KEY2=VAL2`. Keys come in any order; unknown keys are kept but
/// ignored by the plugin. Source: CNI spec 1.1.0, "Parameters" (`CNI_ARGS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs(HashMap<String, String>);

impl CniArgs {
    /// Parses `CNI_ARGS`. Empty segments (e.g. a trailing `;`) are skipped.
    ///
    /// Errors: [`EnvError::BadArgs`] for a segment without `=`.
    pub fn parse(s: &str) -> Result<CniArgs, EnvError> {
        let mut map = HashMap::new();
        for part in s.split(';').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| EnvError::BadArgs(part.to_owned()))?;
            map.insert(k.to_owned(), v.to_owned());
        }
        Ok(CniArgs(map))
    }

    /// Checks the Kubernetes keys that the plugin uses, when present: [`ARG_POD_NAME`] must
    /// be a DNS-1123 subdomain (at most 253 bytes), [`ARG_POD_NAMESPACE`] a DNS-1123 label
    /// (at most 63 bytes), as the API server validates them
    /// (`k8s.io/apimachinery/pkg/util/validation`, `IsDNS1123Subdomain`/`IsDNS1123Label`),
    /// and [`ARG_POD_UID`] at most 64 bytes of letters, digits and `-` (UUIDs, and the
    /// hex hashes of static pods). They end up in an API path and in logs.
    ///
    /// Errors: [`EnvError::Invalid`] naming the key.
    pub fn validate_kubernetes(&self) -> Result<(), EnvError> {
        let invalid = |key: &str, v: &str, what: &str| EnvError::Invalid {
            var: "CNI_ARGS",
            reason: format!("{key}={v:?} is not {what}"),
        };
        if let Some(v) = self.get(ARG_POD_NAME) {
            if !is_dns1123_subdomain(v) {
                return Err(invalid(
                    ARG_POD_NAME,
                    v,
                    "a valid pod name (DNS-1123 subdomain)",
                ));
            }
        }
        if let Some(v) = self.get(ARG_POD_NAMESPACE) {
            if !is_dns1123_label(v) {
                return Err(invalid(
                    ARG_POD_NAMESPACE,
                    v,
                    "a valid namespace (DNS-1123 label)",
                ));
            }
        }
        if let Some(v) = self.get(ARG_POD_UID) {
            if v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(invalid(ARG_POD_UID, v, "a pod UID"));
            }
        }
        Ok(())
    }

    /// The value of `key`, if present and non-empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// A DNS-1123 label: 1 to 63 lower-case letters, digits or `-`, starting and ending with a
/// letter or digit (`IsDNS1123Label` in `k8s.io/apimachinery/pkg/util/validation`).
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(edge)
        && b.last().is_some_and(edge)
        && b.iter().all(|c| edge(c) || *c == b'-')
}

/// A DNS-1123 subdomain: at most 253 bytes of DNS-1123 labels joined by `.`
/// (`IsDNS1123Subdomain`, which checks the same characters with a regular expression).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| vars.get(k).cloned())
    }

    #[test]
    fn args_in_any_order_unknown_ignored() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;FOO=bar=baz;K8S_POD_NAME=web-0;",
        )
        .unwrap();
        assert_eq!(a.get("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(a.get("K8S_POD_NAMESPACE"), Some("default"));
        assert_eq!(a.get("FOO"), Some("bar=baz"));
        assert_eq!(a.get("K8S_POD_UID"), None);
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME"),
            Err(EnvError::BadArgs("K8S_POD_NAME".into()))
        );
    }

    #[test]
    fn required_variables_per_command() {
        assert_eq!(env(&[]), Err(EnvError::Missing("CNI_COMMAND")));
        assert_eq!(
            env(&[("CNI_COMMAND", "FROB")]),
            Err(EnvError::UnknownCommand("FROB".into()))
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert_eq!(
            env(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0")
            ]),
            Err(EnvError::Missing("CNI_NETNS"))
        );
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(del.unwrap().netns, None);
    }

    #[test]
    fn kubernetes_args_are_names() {
        let ok = CniArgs::parse("K8S_POD_NAME=web-0.x;K8S_POD_NAMESPACE=default;K8S_POD_UID=3f1c2a9e-0b1d-4c7e-9a51-1d2e3f405060").unwrap();
        assert_eq!(ok.validate_kubernetes(), Ok(()));
        for bad in [
            "K8S_POD_NAME=../../nodes/x",
            "K8S_POD_NAME=Web",
            "K8S_POD_NAME=a\nb",
            "K8S_POD_NAMESPACE=a.b",
            "K8S_POD_NAMESPACE=-a",
            "K8S_POD_UID=a/b",
        ] {
            let e = CniArgs::parse(bad)
                .unwrap()
                .validate_kubernetes()
                .unwrap_err();
            assert!(e.to_string().contains("CNI_ARGS"), "{e}");
        }
        assert!(is_dns1123_subdomain(&["a"; 127].join(".")));
        assert!(!is_dns1123_subdomain(&["ab"; 127].join(".")));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }

    #[test]
    fn container_id_as_the_spec_says() {
        for ok in ["c", "0123abcdef", "a_b.c-d", &"f".repeat(64)] {
            assert_eq!(validate_container_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            ".a",
            "a b",
            "a/b",
            "a\nINFO forged",
            "aéééééééééééé",
            "é",
            &"a".repeat(MAX_CONTAINER_ID_LEN + 1),
        ] {
            let e = validate_container_id(bad).unwrap_err();
            assert!(e.to_string().contains("CNI_CONTAINERID"), "{e}");
            assert!(!e.to_string().contains('\n'), "escaped: {e}");
        }
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "aéééééééééééé"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert!(matches!(
            e,
            Err(EnvError::Invalid {
                var: "CNI_CONTAINERID",
                ..
            })
        ));
    }
}
