//! Installing the plugin on the node: the binary, the kubeconfig, and the chained entry
//! in the primary CNI config.

pub mod conflist;
pub mod fsutil;
pub mod kubeconfig;

use std::io::{self, Seek as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use self::conflist::{ConfError, PLUGIN_TYPE};
use self::fsutil::{
    has_content, mode_of, remove_stale_temps, write_atomic, write_atomic_with, ReadError,
    CONF_LIMIT, PLUGIN_BINARY_LIMIT,
};
use self::kubeconfig::{KubeconfigError, KUBECONFIG_FILE};

/// Name of the plugin binary in the CNI bin dir.
pub const PLUGIN_BINARY: &str = "istio-cni";
/// Default file name of the standalone (not chained) config; sorts after most primaries.
pub const STANDALONE_CONF: &str = "YYY-istio-cni.conf";
/// Mode of a config file we create (an existing primary keeps its own mode).
pub const CONF_MODE: u32 = 0o644;

/// What the plugin's entry in the chain carries (the plugin's netconf fields).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSettings {
    /// `plugin_log_level`.
    pub log_level: String,
    /// `exclude_namespaces`.
    pub exclude_namespaces: Vec<String>,
    /// `pod_namespace`: the agent's own namespace.
    pub pod_namespace: String,
    /// `validation.probe`.
    pub probe: bool,
    /// `validation.timeout_ms`, in milliseconds.
    pub probe_timeout_ms: u64,
    /// `native_nftables`: the nftables backend (written into the entry only when on).
    pub native_nftables: bool,
    /// Ambient mode: `ambient_enabled: true` and these `enablement_selectors` in the entry
    /// (both left out when off, as the plugin's defaults are off).
    pub ambient: Option<Vec<istio_cni::enablement::EnablementSelector>>,
}

/// Where and how to install.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The node's CNI conf dir as mounted in the agent (`--mounted-cni-net-dir`).
    pub conf_dir: PathBuf,
    /// The node's CNI bin dir as mounted in the agent (`--cni-bin-dir`).
    pub bin_dir: PathBuf,
    /// The agent run dir, the same path on the host and in the agent (`--cni-agent-run-dir`).
    pub agent_run_dir: PathBuf,
    /// The plugin binary to install (`--plugin-bin`).
    pub plugin_bin: PathBuf,
    /// The primary config to chain into, instead of the first valid one (`--cni-conf-name`);
    /// in standalone mode, the name of our file.
    pub conf_name: Option<String>,
    /// Chain into the primary config (default), or write a standalone config.
    pub chained: bool,
    /// Permission bits of the kubeconfig (`--kubeconfig-mode`, default 0600).
    pub kubeconfig_mode: u32,
    /// The API server URL for the plugin.
    pub server: String,
    /// The service account dir with `token` and `ca.crt` (`--service-account-dir`).
    pub service_account_dir: PathBuf,
    /// A CA file other than the service account's (`--kube-ca-file`).
    pub kube_ca_file: Option<PathBuf>,
    /// Do not verify the API server certificate (`--skip-tls-verify`).
    pub skip_tls_verify: bool,
    /// The plugin's settings.
    pub plugin: PluginSettings,
}

impl InstallConfig {
    /// Where the kubeconfig is written (and where the plugin reads it).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.agent_run_dir.join(KUBECONFIG_FILE)
    }

    /// Checks [`InstallConfig::plugin_entry`] with the plugin's own parser
    /// (`istio_cni::config::NetConf::parse`), as the plugin will read it from the chain,
    /// so that nothing the plugin would reject is ever written.
    ///
    /// Errors: [`InstallError::InvalidEntry`] naming the agent setting at fault.
    pub fn validate_entry(&self) -> Result<(), InstallError> {
        let mut conf = Map::new();
        conf.insert("cniVersion".into(), json!("1.0.0"));
        conf.extend(self.plugin_entry());
        let bytes = serde_json::to_vec(&conf).unwrap_or_default();
        match istio_cni::config::NetConf::parse(&bytes) {
            Ok(_) => Ok(()),
            Err(e) => {
                let field = match &e {
                    istio_cni::config::ConfigError::InvalidField { field, .. } => field.as_str(),
                    _ => "",
                };
                let variable = match field {
                    "plugin_log_level" => "PLUGIN_LOG_LEVEL",
                    "validation.timeout_ms" => "VALIDATION_TIMEOUT_MS",
                    "validation.probe" => "VALIDATION_PROBE",
                    "exclude_namespaces" => "EXCLUDE_NAMESPACES",
                    "pod_namespace" => "POD_NAMESPACE",
                    "cni_agent_run_dir" => "CNI_AGENT_RUN_DIR",
                    _ => "a plugin setting",
                };
                Err(InstallError::InvalidEntry {
                    variable,
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Our entry in the chain.
    pub fn plugin_entry(&self) -> Map<String, Value> {
        let p = &self.plugin;
        let v = json!({
            "type": PLUGIN_TYPE,
            "name": PLUGIN_TYPE,
            "plugin_log_level": p.log_level,
            "cni_agent_run_dir": self.agent_run_dir,
            "exclude_namespaces": p.exclude_namespaces,
            "pod_namespace": p.pod_namespace,
            "kubernetes": {"kubeconfig": self.kubeconfig_path()},
            "validation": {"probe": p.probe, "timeout_ms": p.probe_timeout_ms},
        });
        let Value::Object(mut map) = v else {
            unreachable!("an object literal")
        };
        if p.native_nftables {
            map.insert("native_nftables".into(), Value::Bool(true));
        }
        if let Some(selectors) = &p.ambient {
            map.insert("ambient_enabled".into(), Value::Bool(true));
            map.insert("enablement_selectors".into(), json!(selectors));
        }
        map
    }
}

/// An install step failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No valid primary config in the conf dir (yet).
    #[error("no primary CNI config in {dir}{}", skipped_text(.skipped))]
    NoPrimary {
        /// The conf dir.
        dir: PathBuf,
        /// Why the files there were skipped.
        skipped: Vec<ConfError>,
    },
    /// The primary config is not a valid network configuration.
    #[error(transparent)]
    BadConf(#[from] ConfError),
    /// The kubeconfig cannot be built.
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    /// `CNI_CONF_NAME` names a file that is not in the conf dir (nor its `.conf` /
    /// `.conflist` sibling).
    #[error("CNI_CONF_NAME={name}: no such file in {dir} (nor {sibling})")]
    NamedConfMissing {
        /// The conf dir.
        dir: PathBuf,
        /// The name asked for.
        name: String,
        /// Its sibling name that was also accepted.
        sibling: String,
    },
    /// Our entry would not pass the plugin's own configuration parser: nothing is written.
    #[error("refusing to write the plugin's config: {variable} is invalid: {reason}")]
    InvalidEntry {
        /// The agent setting (env var) at fault.
        variable: &'static str,
        /// The plugin parser's message.
        reason: String,
    },
    /// A file to read is not a regular file, is larger than its limit, or cannot be read
    /// (the message names it).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A file operation failed.
    #[error("cannot {what} {}: {source}{}", .path.display(), read_only_hint(.source))]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or dir.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl InstallError {
    /// The `result` of upstream Istio's `istio_cni_installs_total` for this failure, by
    /// the step that failed (`cni/pkg/install/install.go` `installAll`): the plugin binary
    /// (`COPY_BINARIES_FAILURE`), the kubeconfig (`CREATE_KUBECONFIG_FAILURE`) or the CNI
    /// config (`CREATE_CNI_CONFIG_FAILURE`). `None` while no primary config exists yet:
    /// upstream waits for it without counting.
    pub fn upstream_result(&self, cfg: &InstallConfig) -> Option<&'static str> {
        Some(match self {
            InstallError::NoPrimary { .. } => return None,
            InstallError::Kubeconfig(_) => "CREATE_KUBECONFIG_FAILURE",
            InstallError::Read(e) if e.path() == cfg.plugin_bin => "COPY_BINARIES_FAILURE",
            InstallError::Io { path, .. }
                if path.starts_with(&cfg.bin_dir) || *path == cfg.plugin_bin =>
            {
                "COPY_BINARIES_FAILURE"
            }
            InstallError::Io { path, .. } if path.starts_with(&cfg.agent_run_dir) => {
                "CREATE_KUBECONFIG_FAILURE"
            }
            InstallError::BadConf(_)
            | InstallError::NamedConfMissing { .. }
            | InstallError::InvalidEntry { .. }
            | InstallError::Read(_)
            | InstallError::Io { .. } => "CREATE_CNI_CONFIG_FAILURE",
        })
    }
}

fn skipped_text(skipped: &[ConfError]) -> String {
    if skipped.is_empty() {
        " (it has no .conf, .conflist or .json file; is the primary CNI installed?)".into()
    } else {
        let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        format!(" (skipped: {})", reasons.join("; "))
    }
}

fn read_only_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(nix::errno::Errno::EROFS as i32) {
        " (the directory is mounted read-only; the agent needs it read-write)"
    } else {
        ""
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// What an install pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The config file that holds our entry.
    pub config_file: PathBuf,
    /// Whether this pass wrote our entry into the config (it was missing or outdated).
    pub wrote_entry: bool,
    /// What changed, for the log (empty when everything was already in place).
    pub changes: Vec<String>,
}

/// What earlier passes verified, so that a pass does not re-read the plugin binary (up to
/// [`PLUGIN_BINARY_LIMIT`]) when neither it nor the installed copy changed. `Default` for a first or
/// single pass.
#[derive(Debug, Clone, Default)]
pub struct InstallCache {
    /// (source, installed copy) stamps when they were last found identical.
    binary: Option<(FileStamp, FileStamp)>,
}

/// Size, modification time and inode: changes whenever the file is rewritten or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp(u64, std::time::SystemTime, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp(m.len(), m.modified().ok()?, m.ino()))
}

/// One install pass: checks our entry with the plugin's own parser ([`InstallConfig::validate_entry`];
/// nothing is written when it fails), removes stale temp files of writers that are gone, writes the
/// kubeconfig (unless identical),
/// chains our entry into the primary config (or writes the standalone config), and
/// installs the binary (unless identical). When a binary is already installed, the
/// config goes first, so that a rewrite of the primary config is undone without waiting
/// for the binary comparison; on a first install the binary goes first, so that the
/// config never names a missing plugin. Every write is atomic.
///
/// Errors: [`InstallError`] of the first step that failed.
pub fn install_once(
    cfg: &InstallConfig,
    cache: &mut InstallCache,
) -> Result<Installed, InstallError> {
    // Before any write: an entry the plugin would reject must not half-install.
    cfg.validate_entry()?;
    let mut changes = Vec::new();
    // Only temp files whose writer is gone (see `fsutil`): another agent writing here at
    // the same time (an upgrade) keeps its own.
    for dir in [&cfg.bin_dir, &cfg.conf_dir, &cfg.agent_run_dir] {
        let stale = match remove_stale_temps(dir) {
            Ok(stale) => stale,
            // The run dir is created below, on the first install.
            Err(e) if e.kind() == io::ErrorKind::NotFound && *dir == cfg.agent_run_dir => {
                Vec::new()
            }
            Err(e) => return Err(io_err("read", dir)(e)),
        };
        for file in stale {
            changes.push(format!("removed stale temp file {}", file.display()));
        }
    }
    let kubeconfig = cfg.kubeconfig_path();
    let creds = kubeconfig::read_credentials(
        &cfg.service_account_dir,
        cfg.kube_ca_file.as_deref(),
        cfg.skip_tls_verify,
    )?;
    let doc = kubeconfig::render(&cfg.server, &creds);
    if !has_content(&kubeconfig, &doc) || mode_of(&kubeconfig) != Some(cfg.kubeconfig_mode) {
        std::fs::create_dir_all(&cfg.agent_run_dir)
            .map_err(io_err("create", &cfg.agent_run_dir))?;
        write_atomic(&kubeconfig, &doc, cfg.kubeconfig_mode)
            .map_err(io_err("write the kubeconfig", &kubeconfig))?;
        changes.push(format!("wrote {}", kubeconfig.display()));
    }
    let binary = cfg.bin_dir.join(PLUGIN_BINARY);
    let binary_first = !binary.exists();
    if binary_first {
        install_binary(cfg, &binary, cache, &mut changes)?;
    }
    let before = changes.len();
    let config_file = write_config(cfg, &mut changes)?;
    let wrote_entry = changes.len() > before;
    if !binary_first {
        install_binary(cfg, &binary, cache, &mut changes)?;
    }
    Ok(Installed {
        config_file,
        wrote_entry,
        changes,
    })
}

/// Installs `cfg.plugin_bin` as `binary` unless identical: the source is opened as a
/// regular file of at most [`PLUGIN_BINARY_LIMIT`], compared and copied in chunks.
fn install_binary(
    cfg: &InstallConfig,
    binary: &Path,
    cache: &mut InstallCache,
    changes: &mut Vec<String>,
) -> Result<(), InstallError> {
    let stamps = stamp(&cfg.plugin_bin).zip(stamp(binary));
    if stamps.is_some() && stamps == cache.binary {
        return Ok(());
    }
    let source = &cfg.plugin_bin;
    let (mut src, meta) = fsutil::open_regular(source, PLUGIN_BINARY_LIMIT)?;
    let same = fsutil::same_as(binary, &mut src, meta.len())
        .map_err(io_err("read the plugin binary", source))?;
    if !same {
        src.rewind()
            .map_err(io_err("read the plugin binary", source))?;
        write_atomic_with(binary, 0o755, |out| {
            fsutil::copy_limited(&mut src, out, source, PLUGIN_BINARY_LIMIT).map(drop)
        })
        .map_err(io_err("install the plugin binary as", binary))?;
        changes.push(format!("installed {}", binary.display()));
    }
    cache.binary = stamp(&cfg.plugin_bin).zip(stamp(binary));
    Ok(())
}

fn write_config(cfg: &InstallConfig, changes: &mut Vec<String>) -> Result<PathBuf, InstallError> {
    let entry = cfg.plugin_entry();
    if !cfg.chained {
        let path = cfg
            .conf_dir
            .join(cfg.conf_name.as_deref().unwrap_or(STANDALONE_CONF));
        let mut conf = Map::new();
        conf.insert("cniVersion".into(), json!("1.0.0"));
        conf.extend(entry);
        let mut doc = serde_json::to_vec_pretty(&conf).expect("a Map always serializes");
        doc.push(b'\n');
        if !has_content(&path, &doc) {
            write_atomic(&path, &doc, CONF_MODE).map_err(io_err("write", &path))?;
            changes.push(format!("wrote standalone config {}", path.display()));
        }
        return Ok(path);
    }
    let mut files = Vec::new();
    let mut modes = Vec::new();
    let mut names = Vec::new();
    let mut unreadable = Vec::new();
    for (name, read) in read_conf_entries(&cfg.conf_dir)? {
        names.push(name.clone());
        match read {
            Ok((content, mode)) => {
                files.push((name, content));
                modes.push(mode);
            }
            Err(e) => unreadable.push(ConfError::Unreadable {
                file: name,
                reason: e.to_string(),
            }),
        }
    }
    if let Some(name) = cfg.conf_name.as_deref() {
        let sibling = conflist::sibling(name);
        let present = |n: &str| names.iter().any(|f| f == n);
        if !present(name) && !sibling.as_deref().is_some_and(present) {
            return Err(InstallError::NamedConfMissing {
                dir: cfg.conf_dir.clone(),
                name: name.to_owned(),
                sibling: sibling.unwrap_or_default(),
            });
        }
    }
    // Unreadable files are skipped like invalid ones, and named when nothing is left.
    let (i, _skipped) =
        conflist::pick_primary(&files, cfg.conf_name.as_deref()).map_err(|mut skipped| {
            skipped.extend(unreadable);
            InstallError::NoPrimary {
                dir: cfg.conf_dir.clone(),
                skipped,
            }
        })?;
    let (name, content) = &files[i];
    let primary = cfg.conf_dir.join(name);
    let Some(chained) = conflist::chain(name, content, &entry)? else {
        return Ok(primary);
    };
    let target = cfg.conf_dir.join(&chained.file);
    // The mode the primary had when read: it may be gone by now (another agent replaced
    // a `.conf` primary with its `.conflist`).
    write_atomic(&target, &chained.content, modes[i]).map_err(io_err("write", &target))?;
    changes.push(format!("chained istio-cni into {}", target.display()));
    if let Some(old) = chained.replaces {
        let old = cfg.conf_dir.join(old);
        match std::fs::remove_file(&old) {
            Ok(()) => changes.push(format!(
                "removed {} (now {})",
                old.display(),
                target.display()
            )),
            // Another agent chaining at the same time (a rolling upgrade) replaced it
            // already: what this pass wanted.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove the replaced config", &old)(e)),
        }
    }
    Ok(target)
}

/// The network configuration files of `dir` (name, content), unsorted, each read as
/// [`fsutil::read_limited`] does (a regular file of at most [`CONF_LIMIT`]). Files that
/// vanish while being read, or cannot be read, are skipped.
///
/// Errors: [`InstallError::Io`] when `dir` cannot be read.
pub fn read_conf_dir(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, InstallError> {
    Ok(read_conf_entries(dir)?
        .into_iter()
        .filter_map(|(name, read)| read.ok().map(|(content, _)| (name, content)))
        .collect())
}

/// The candidate network configuration files of `dir` (by extension; not directories,
/// nor files that vanished while being read): name, and content and permission bits or
/// why the file could not be read.
type ConfEntries = Vec<(String, Result<(Vec<u8>, u32), ReadError>)>;

fn read_conf_entries(dir: &Path) -> Result<ConfEntries, InstallError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // As libcni's `ConfFiles`: by extension, directories skipped.
        if conflist::shape_of(&name).is_none() || entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match fsutil::read_limited_meta(&entry.path(), CONF_LIMIT) {
            Ok((content, meta)) => {
                out.push((name, Ok((content, meta.permissions().mode() & 0o7777))));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => out.push((name, Err(e))),
        }
    }
    Ok(out)
}

/// One removal pass: our entry out of every list in the conf dir (or the standalone
/// config removed), then the kubeconfig and the binary (not the plugin's empty netns lock
/// file, which a running plugin may hold). Missing pieces are fine.
///
/// Errors: [`InstallError::Io`] of the first removal that failed for another reason
/// than the file being gone.
pub fn uninstall_once(cfg: &InstallConfig) -> Result<Vec<String>, InstallError> {
    let mut changes = Vec::new();
    if cfg.chained {
        for (name, read) in read_conf_entries(&cfg.conf_dir)? {
            let Ok((content, mode)) = read else { continue };
            if let Some(without) = conflist::unchain(&name, &content) {
                let path = cfg.conf_dir.join(&name);
                write_atomic(&path, &without, mode).map_err(io_err("write", &path))?;
                changes.push(format!("removed istio-cni from {}", path.display()));
            }
        }
    } else {
        let path = cfg
            .conf_dir
            .join(cfg.conf_name.as_deref().unwrap_or(STANDALONE_CONF));
        remove_if_present(&path, &mut changes)?;
    }
    remove_if_present(&cfg.kubeconfig_path(), &mut changes)?;
    remove_if_present(&cfg.bin_dir.join(PLUGIN_BINARY), &mut changes)?;
    // The plugin's per-netns lock file (`istio_cni::lock`) stays: a plugin still running
    // may hold it, and one that opened it anew after a removal would lock another inode.
    // It is empty, and the run dir is on tmpfs.
    Ok(changes)
}

fn remove_if_present(path: &Path, changes: &mut Vec<String>) -> Result<(), InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            changes.push(format!("removed {}", path.display()));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}
