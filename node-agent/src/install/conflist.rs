//! Finding the node's primary CNI network configuration and chaining our plugin into it.
//! Pure: file names and contents in, new contents out.
//!
//! The primary config is the one the runtime uses: like libcni's `ConfFiles` (which
//! kubelet and containerd use), the files `*.conf`, `*.conflist` and `*.json` of the conf
//! dir, sorted by name; the first that is a valid network configuration wins. A `.conflist`
//! is valid when it has a non-empty `plugins` array of objects with a `type`; a `.conf` or
//! `.json` when it has a `type`. Source: CNI spec 1.1.0, "Network configuration format".
//!
//! Chaining keeps everything else exactly: other fields and plugins, their key order, the
//! list's `cniVersion` and `name`. Only our entry changes: any `istio-cni` entry is
//! dropped and ours is appended last.

use serde_json::{Map, Value};

/// The plugin type of our entry (upstream's name).
pub const PLUGIN_TYPE: &str = "istio-cni";

/// File extensions of network configurations, as libcni reads them.
pub const EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// A network configuration file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    /// Not JSON, or not a JSON object.
    #[error("{file}: not a JSON object: {reason}")]
    NotJson {
        /// The file name.
        file: String,
        /// The parser's message.
        reason: String,
    },
    /// JSON, but not a network configuration.
    #[error("{file}: {reason}")]
    Invalid {
        /// The file name.
        file: String,
        /// What is missing.
        reason: String,
    },
    /// The file cannot be read: not a regular file, larger than
    /// [`super::fsutil::CONF_LIMIT`], or an I/O error. Skipped like an invalid one.
    #[error("{reason}")]
    Unreadable {
        /// The file name.
        file: String,
        /// The reader's message, naming the file's path and what is wrong.
        reason: String,
    },
}

/// Whether a file is a single plugin's config or a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `.conf` / `.json`: one plugin object with `type`.
    Single,
    /// `.conflist`: `{name, cniVersion, plugins: [...]}`.
    List,
}

/// The shape of a file by its name, or `None` when libcni would not read it.
pub fn shape_of(file: &str) -> Option<Shape> {
    if file.ends_with(".conflist") {
        Some(Shape::List)
    } else if file.ends_with(".conf") || file.ends_with(".json") {
        Some(Shape::Single)
    } else {
        None
    }
}

/// Parses and validates a network configuration file.
///
/// Errors: [`ConfError`] naming the file and what is wrong.
pub fn parse(file: &str, content: &[u8]) -> Result<(Shape, Map<String, Value>), ConfError> {
    let shape = shape_of(file).ok_or_else(|| ConfError::Invalid {
        file: file.into(),
        reason: "not a .conf, .conflist or .json file".into(),
    })?;
    let invalid = |reason: &str| ConfError::Invalid {
        file: file.into(),
        reason: reason.into(),
    };
    let value: Value = serde_json::from_slice(content).map_err(|e| ConfError::NotJson {
        file: file.into(),
        reason: e.to_string(),
    })?;
    let Value::Object(map) = value else {
        return Err(ConfError::NotJson {
            file: file.into(),
            reason: "the top level is not an object".into(),
        });
    };
    match shape {
        Shape::List => {
            let plugins = map
                .get("plugins")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("no \"plugins\" array"))?;
            if plugins.is_empty() {
                return Err(invalid("\"plugins\" is empty"));
            }
            if !plugins
                .iter()
                .all(|p| p.get("type").and_then(Value::as_str).is_some())
            {
                return Err(invalid("a plugin has no \"type\""));
            }
        }
        Shape::Single => {
            if map.get("type").and_then(Value::as_str).is_none() {
                return Err(invalid("no \"type\" (is this a .conflist?)"));
            }
        }
    }
    Ok((shape, map))
}

/// Picks the primary configuration among `files` (name, content): the named one when
/// `name_override` is given (`CNI_CONF_NAME`), else the first valid one in name order.
/// Returns its index, and the reasons other candidates before it were skipped.
///
/// Errors: the reasons every candidate was skipped (empty when there was none), for the
/// caller to log while it waits for a config to appear.
pub fn pick_primary(
    files: &[(String, Vec<u8>)],
    name_override: Option<&str>,
) -> Result<(usize, Vec<ConfError>), Vec<ConfError>> {
    // `CNI_CONF_NAME=x.conf` also names `x.conflist` (and the other way round): chaining
    // turns a `.conf` into a `.conflist`, so the name the operator gave stays valid after
    // the first pass, as upstream's install-cni accepts it. The exact name wins.
    let wanted = |name: &str| match name_override {
        None => true,
        Some(n) => {
            let exact = files.iter().any(|(f, _)| f == n);
            name == n || (!exact && sibling(n).as_deref() == Some(name))
        }
    };
    let mut order: Vec<usize> = (0..files.len())
        .filter(|&i| shape_of(&files[i].0).is_some())
        .filter(|&i| wanted(&files[i].0))
        .collect();
    order.sort_by(|&a, &b| files[a].0.cmp(&files[b].0));
    let mut skipped = Vec::new();
    for i in order {
        match parse(&files[i].0, &files[i].1) {
            Ok(_) => return Ok((i, skipped)),
            Err(e) => skipped.push(e),
        }
    }
    Err(skipped)
}

/// The `.conf` ↔ `.conflist` sibling of a config file name, if it has one.
pub fn sibling(name: &str) -> Option<String> {
    if let Some(stem) = name.strip_suffix(".conflist") {
        Some(format!("{stem}.conf"))
    } else {
        name.strip_suffix(".conf")
            .map(|stem| format!("{stem}.conflist"))
    }
}

/// What chaining produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chained {
    /// The file to write (a `.conf` primary becomes `<stem>.conflist`).
    pub file: String,
    /// Its new content (pretty JSON, newline-terminated).
    pub content: Vec<u8>,
    /// The old file to remove once `file` is in place (when the name changed).
    pub replaces: Option<String>,
}

/// Chains `entry` (our plugin object, without `cniVersion`/`name`) into the primary config
/// `file` with `content`. Returns `None` when the file already ends with exactly `entry`
/// and holds no other `istio-cni` entry: nothing to write.
///
/// A list keeps its fields and plugins; earlier `istio-cni` entries are dropped and
/// `entry` is appended. A single config becomes a list named like it, with its
/// `cniVersion`, holding the original object unchanged and then `entry`.
///
/// Errors: [`ConfError`] when `content` is not a valid network configuration.
pub fn chain(
    file: &str,
    content: &[u8],
    entry: &Map<String, Value>,
) -> Result<Option<Chained>, ConfError> {
    let (shape, mut map) = parse(file, content)?;
    match shape {
        Shape::List => {
            let plugins = map
                .get_mut("plugins")
                .and_then(Value::as_array_mut)
                .expect("validated by parse");
            let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
            let already = plugins.iter().filter(|p| ours(p)).count() == 1
                && plugins.last().and_then(Value::as_object) == Some(entry);
            if already {
                return Ok(None);
            }
            plugins.retain(|p| !ours(p));
            plugins.push(Value::Object(entry.clone()));
            Ok(Some(Chained {
                file: file.to_owned(),
                content: to_bytes(&Value::Object(map)),
                replaces: None,
            }))
        }
        Shape::Single => {
            let mut list = Map::new();
            if let Some(v) = map.get("cniVersion") {
                list.insert("cniVersion".into(), v.clone());
            }
            if let Some(v) = map.get("name") {
                list.insert("name".into(), v.clone());
            }
            list.insert(
                "plugins".into(),
                Value::Array(vec![Value::Object(map), Value::Object(entry.clone())]),
            );
            let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
            Ok(Some(Chained {
                file: format!("{stem}.conflist"),
                content: to_bytes(&Value::Object(list)),
                replaces: Some(file.to_owned()),
            }))
        }
    }
}

/// Removes every `istio-cni` entry from a list. Returns `None` when there is none (nothing
/// to write) or when `content` is not a list.
pub fn unchain(file: &str, content: &[u8]) -> Option<Vec<u8>> {
    let (Shape::List, mut map) = parse(file, content).ok()? else {
        return None;
    };
    let plugins = map.get_mut("plugins")?.as_array_mut()?;
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    (plugins.len() != before).then(|| to_bytes(&Value::Object(map)))
}

/// Whether a list's last plugin is an `istio-cni` entry (the chain is in place).
pub fn is_chained(file: &str, content: &[u8]) -> bool {
    match parse(file, content) {
        Ok((Shape::List, map)) => {
            map["plugins"]
                .as_array()
                .and_then(|p| p.last())
                .and_then(|p| p.get("type"))
                .and_then(Value::as_str)
                == Some(PLUGIN_TYPE)
        }
        _ => false,
    }
}

fn to_bytes(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("a Value always serializes");
    out.push(b'\n');
    out
}
