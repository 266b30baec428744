//! Connects to an agent's local API over its Unix socket.

use std::path::{Path, PathBuf};

use tonic::transport::Channel;
use uc_proto::v1::api_client::ApiClient;

use crate::context;

pub const DEFAULT_SOCKET: &str = "/var/lib/uc/api.sock";

/// The sockets to try, in order: the flag, else the current context's
/// connections, else this machine's agent.
fn candidates(flag: Option<&Path>) -> anyhow::Result<(Vec<PathBuf>, String)> {
    if let Some(p) = flag {
        return Ok((vec![p.to_path_buf()], "--socket".into()));
    }
    if let Some((name, sockets)) = context::current_sockets()? {
        return Ok((sockets, format!("context {name:?}")));
    }
    Ok((
        vec![PathBuf::from(DEFAULT_SOCKET)],
        "this machine's agent".into(),
    ))
}

pub async fn connect(flag: Option<&Path>) -> anyhow::Result<ApiClient<Channel>> {
    let (paths, source) = candidates(flag)?;
    let mut errors = Vec::new();
    for path in &paths {
        match connect_one(path).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("{}: {e:#}", path.display())),
        }
    }
    anyhow::bail!(
        "cannot reach a uc agent (from {source}):\n  {}\nis ucd running? (`uc local up` starts a local cluster)",
        errors.join("\n  ")
    )
}

async fn connect_one(path: &Path) -> anyhow::Result<ApiClient<Channel>> {
    uc_proto::client::connect_unix(path)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A gRPC status as a user-facing error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
