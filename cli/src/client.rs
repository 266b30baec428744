//! Connects to an agent's local API over its Unix socket.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;
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
    // Fail fast with a clear error rather than letting the lazy channel retry.
    tokio::net::UnixStream::connect(path)
        .await
        .context("connecting")?;
    let path = path.to_path_buf();
    let channel = Endpoint::from_static("http://uc.local")
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    Ok(ApiClient::new(channel).max_decoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES))
}

/// A gRPC status as a user-facing error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
