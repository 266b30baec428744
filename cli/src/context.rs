//! Contexts in `~/.config/uc/config.toml`: named lists of connections to a
//! cluster, tried in order.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, ContextEntry>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextEntry {
    #[serde(default)]
    pub connections: Vec<Connection>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// Path of an agent's API socket on this machine.
    pub unix: PathBuf,
}

pub fn path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/root/.config"));
    base.join("uc").join("config.toml")
}

pub fn load() -> anyhow::Result<Config> {
    let p = path();
    match std::fs::read_to_string(&p) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save(config: &Config) -> anyhow::Result<()> {
    let p = path();
    let dir = p.parent().expect("config path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = p.with_extension("toml.tmp");
    std::fs::write(&tmp, toml::to_string_pretty(config)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// The current context's name and sockets, if a context is selected.
pub fn current_sockets() -> anyhow::Result<Option<(String, Vec<PathBuf>)>> {
    let config = load()?;
    let Some(name) = config.current_context.clone() else {
        return Ok(None);
    };
    let ctx = config.contexts.get(&name).with_context(|| {
        format!(
            "current context {name:?} is not defined in {}",
            path().display()
        )
    })?;
    Ok(Some((
        name,
        ctx.connections.iter().map(|c| c.unix.clone()).collect(),
    )))
}
