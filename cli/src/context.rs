//! Contexts in `~/.config/uc/config.toml`: named lists of connections to a cluster, tried in
//! order. A connection is an agent's API socket on this computer, or a machine reached over SSH
//! (where `ucd dial-stdio` bridges to the agent's socket).
//!
//! ```toml
//! current_context = "home"
//! [[contexts.home.connections]]
//! ssh = "root@203.0.113.7"
//! [[contexts.home.connections]]
//! ssh = "pi@192.168.1.20:2222"
//! ssh_key = "/home/me/.ssh/id_pi"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::target::SshTarget;

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

/// One way to reach an agent: exactly one of `unix` and `ssh`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// Path of an agent's API socket on this computer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<PathBuf>,
    /// `[USER@]HOST[:PORT]` of a cluster machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<String>,
    /// The SSH key for `ssh` (default: ssh's own choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<PathBuf>,
}

/// A connection, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conn {
    Unix(PathBuf),
    Ssh {
        target: SshTarget,
        key: Option<PathBuf>,
    },
}

impl Connection {
    pub fn check(&self) -> anyhow::Result<Conn> {
        match (&self.unix, &self.ssh) {
            (Some(p), None) if self.ssh_key.is_none() => Ok(Conn::Unix(p.clone())),
            (None, Some(s)) => Ok(Conn::Ssh {
                target: s.parse().map_err(|e: String| anyhow::anyhow!(e))?,
                key: self.ssh_key.clone(),
            }),
            _ => bail!(
                "a connection is either `unix = PATH` or `ssh = \"[USER@]HOST[:PORT]\"` (with an optional ssh_key)"
            ),
        }
    }

    pub fn ssh(target: &SshTarget, key: Option<PathBuf>) -> Connection {
        Connection {
            unix: None,
            ssh: Some(target.to_string()),
            ssh_key: key,
        }
    }
}

impl fmt::Display for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conn::Unix(p) => write!(f, "unix://{}", p.display()),
            Conn::Ssh { target, .. } => write!(f, "ssh://{target}"),
        }
    }
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

/// The current context's name and connections, if a context is selected.
pub fn current() -> anyhow::Result<Option<(String, Vec<Conn>)>> {
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
    let conns = ctx
        .connections
        .iter()
        .map(Connection::check)
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("context {name:?} in {}", path().display()))?;
    Ok(Some((name, conns)))
}

/// Adds `conn` to context `name` (made if missing; a connection it has is not added twice) and,
/// when `select`, makes it the current context.
pub fn add_connection(name: &str, conn: Connection, select: bool) -> anyhow::Result<()> {
    let mut config = load()?;
    let ctx = config.contexts.entry(name.to_string()).or_default();
    if !ctx.connections.contains(&conn) {
        ctx.connections.push(conn);
    }
    if select {
        config.current_context = Some(name.to_string());
    }
    save(&config)
}

/// Drops every connection of context `name` that reaches `host` over SSH.
pub fn remove_ssh_host(name: &str, host: &str) -> anyhow::Result<bool> {
    let mut config = load()?;
    let Some(ctx) = config.contexts.get_mut(name) else {
        return Ok(false);
    };
    let before = ctx.connections.len();
    ctx.connections
        .retain(|c| !matches!(c.check(), Ok(Conn::Ssh { target, .. }) if target.host == host));
    let changed = ctx.connections.len() != before;
    if changed {
        save(&config)?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_one_kind_each() {
        let ssh: Connection =
            toml::from_str("ssh = \"pi@10.0.0.2:2222\"\nssh_key = \"/k\"").unwrap();
        let Conn::Ssh { target, key } = ssh.check().unwrap() else {
            panic!("not ssh")
        };
        assert_eq!((target.port, key), (Some(2222), Some(PathBuf::from("/k"))));
        let unix: Connection = toml::from_str("unix = \"/var/lib/uc/api.sock\"").unwrap();
        assert_eq!(
            unix.check().unwrap(),
            Conn::Unix("/var/lib/uc/api.sock".into())
        );
        let both: Connection = toml::from_str("unix = \"/s\"\nssh = \"h\"").unwrap();
        assert!(both.check().is_err());
        let none: Connection = toml::from_str("").unwrap();
        assert!(none.check().is_err());
        let bad: Connection = toml::from_str("ssh = \"h:0\"").unwrap();
        assert!(format!("{:#}", bad.check().unwrap_err()).contains("bad port"));
        assert!(toml::from_str::<Connection>("tcp = \"x\"").is_err());
    }
}
