//! Runs a CNI plugin chain the way libcni does (CNI spec 1.1.0, "Execution of Network
//! Configurations"): ADD runs the plugins in order, handing each the previous result as
//! `prevResult`; DEL runs them in reverse with the cached ADD result; CHECK runs them in
//! order with the cached result.

// A failure carries the plugin's whole output for the test report; its size does not matter.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use std::io::Write as _;

/// Where the reference plugins live (Debian `containernetworking-plugins`).
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The `istio-cni` binary under test: `$ISTIO_CNI_BIN`, or [`workspace_bin`].
pub fn istio_cni_bin() -> PathBuf {
    match std::env::var_os("ISTIO_CNI_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_bin("istio-cni"),
    }
}

/// A binary of this workspace, from the cargo target directory the running test or tool
/// was built in (build it first: `cargo build`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps, tools from target/<profile>.
    let dir = exe.parent().expect("exe dir");
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {}: run `cargo build` first",
                exe.display()
            )
        });
    found
}

/// A plugin of the chain failed.
#[derive(Debug)]
pub struct PluginFailure {
    /// The plugin type.
    pub plugin: String,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// The CNI error JSON it printed, if it parsed.
    pub error: Option<Value>,
    /// Its stderr.
    pub stderr: String,
}

impl PluginFailure {
    /// The CNI error code, if the plugin printed an error result.
    pub fn code(&self) -> Option<u64> {
        self.error.as_ref()?.get("code")?.as_u64()
    }

    /// The error message, if any.
    pub fn msg(&self) -> String {
        self.error
            .as_ref()
            .and_then(|e| e.get("msg"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }
}

/// One attachment: a container's interface in a netns.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
}

/// A network configuration list.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Network name.
    pub name: String,
    /// `cniVersion` of the list.
    pub cni_version: String,
    /// The plugin entries, in order.
    pub plugins: Vec<Value>,
    /// Directories searched for plugin binaries (`CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
    /// Run the plugins inside this `ip netns` (the "host" side of the test), if given.
    pub runtime_netns: Option<String>,
    /// Extra environment of the plugin processes (a runtime passes its own environment).
    pub env: Vec<(String, String)>,
}

impl Chain {
    /// The loopback network a runtime sets up in every sandbox before the pod network
    /// (containerd's `cni-loopback`).
    pub fn loopback() -> Chain {
        Chain {
            name: "cni-loopback".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![json!({"type": "loopback"})],
            cni_path: vec![REFERENCE_PLUGIN_DIR.into()],
            runtime_netns: None,
            env: Vec::new(),
        }
    }

    /// ADD through every plugin; returns the final result.
    pub fn add(&self, a: &Attachment) -> Result<Value, PluginFailure> {
        let mut prev: Option<Value> = None;
        for p in &self.plugins {
            let out = self.exec(p, "ADD", a, prev.as_ref())?;
            prev = Some(out.unwrap_or(Value::Null));
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// ADD through every plugin, starting from `prev` as if an earlier plugin produced it.
    pub fn add_with_prev(&self, a: &Attachment, prev: &Value) -> Result<Value, PluginFailure> {
        let mut prev = prev.clone();
        for p in &self.plugins {
            prev = self.exec(p, "ADD", a, Some(&prev))?.unwrap_or(Value::Null);
        }
        Ok(prev)
    }

    /// DEL through every plugin in reverse, with the cached ADD result.
    pub fn del(&self, a: &Attachment, cached: Option<&Value>) -> Result<(), PluginFailure> {
        for p in self.plugins.iter().rev() {
            self.exec(p, "DEL", a, cached)?;
        }
        Ok(())
    }

    /// CHECK through every plugin, with the cached ADD result.
    pub fn check(&self, a: &Attachment, cached: &Value) -> Result<(), PluginFailure> {
        for p in &self.plugins {
            self.exec(p, "CHECK", a, Some(cached))?;
        }
        Ok(())
    }

    /// The configuration one plugin sees: its entry plus `name`, `cniVersion` and
    /// `prevResult`.
    pub fn plugin_conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = json!(self.name);
        conf["cniVersion"] = json!(self.cni_version);
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    fn exec(
        &self,
        plugin: &Value,
        verb: &str,
        a: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, PluginFailure> {
        let kind = plugin["type"].as_str().expect("plugin type").to_owned();
        let bin = self
            .cni_path
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {kind} not found in {:?}", self.cni_path));
        let mut cmd = match &self.runtime_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let cni_path = std::env::join_paths(&self.cni_path).expect("CNI_PATH");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname)
            .env("CNI_ARGS", &a.args)
            .env("CNI_PATH", cni_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let conf = self.plugin_conf(plugin, prev);
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            // A plugin may fail before reading stdin; its exit and output tell why.
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe => Ok(()),
                _ => Err(e),
            })
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            return Err(PluginFailure {
                plugin: kind,
                exit_code: out.status.code(),
                error: stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(stdout)
    }
}
