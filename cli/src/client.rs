//! Connects to an agent's local API: over its Unix socket on this computer, or over SSH, where
//! `ucd dial-stdio` on the machine bridges to that socket (nothing listens for the API on a
//! network address).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Join, ReadBuf};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tonic::transport::{Channel, Endpoint, Uri};
use uc_proto::v1::api_client::ApiClient;

use crate::context::{self, Conn};
use crate::ssh::Ssh;
use crate::target::SshTarget;

pub const DEFAULT_SOCKET: &str = "/var/lib/uc/api.sock";

pub type Api = ApiClient<Channel>;

/// The connections to try, in order: --socket, else --ssh, else the current context's connections, else
/// this machine's agent.
fn candidates(flag: Option<&Path>, ssh: Option<&SshTarget>) -> anyhow::Result<(Vec<Conn>, String)> {
    if let Some(p) = flag {
        return Ok((vec![Conn::Unix(p.to_path_buf())], "--socket".into()));
    }
    if let Some(t) = ssh {
        // The key the current context uses for that machine (given to `uc machine init|add`
        // with -i), if any; else ssh's own choice.
        let key = context::current()
            .ok()
            .flatten()
            .into_iter()
            .flat_map(|(_, conns)| conns)
            .find_map(|c| match c {
                Conn::Ssh { target, key } if &target == t => key,
                _ => None,
            });
        return Ok((
            vec![Conn::Ssh {
                target: t.clone(),
                key,
            }],
            "--ssh".into(),
        ));
    }
    if let Some((name, conns)) = context::current()? {
        return Ok((conns, format!("context {name:?}")));
    }
    Ok((
        vec![Conn::Unix(PathBuf::from(DEFAULT_SOCKET))],
        "this machine's agent".into(),
    ))
}

/// Connects through the first connection that answers; returns it with the client.
pub async fn connect_any(
    flag: Option<&Path>,
    ssh: Option<&SshTarget>,
) -> anyhow::Result<(Api, Conn)> {
    let (conns, source) = candidates(flag, ssh)?;
    let mut errors = Vec::new();
    for conn in &conns {
        match connect(conn).await {
            Ok(c) => return Ok((c, conn.clone())),
            Err(e) => errors.push(format!("{conn}: {e:#}")),
        }
    }
    anyhow::bail!(
        "cannot reach a uc agent (from {source}):\n  {}\nis ucd running? (`uc local up` starts a local cluster; `uc machine init USER@HOST` makes one on a machine you reach over SSH)",
        errors.join("\n  ")
    )
}

pub async fn connect(conn: &Conn) -> anyhow::Result<Api> {
    match conn {
        Conn::Unix(path) => uc_proto::client::connect_unix(path)
            .await
            .map_err(|e| anyhow::anyhow!("{e}")),
        Conn::Ssh { target, key } => connect_ssh(&Ssh::new(target.clone(), key.clone())).await,
    }
}

/// The remote command that bridges to the agent: `ucd` may live in /usr/local/bin, which a
/// non-interactive shell's PATH does not always hold.
const DIAL: &str = "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH exec ucd dial-stdio";

/// How long reaching an agent over SSH may take (ssh's own connect timeout is 10 s).
const SSH_DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The API of the agent on `ssh`'s host, through `ssh HOST ucd dial-stdio`.
pub async fn connect_ssh(ssh: &Ssh) -> anyhow::Result<Api> {
    // An agent that is starting has its socket but may not answer yet: never wait forever.
    tokio::time::timeout(SSH_DIAL_TIMEOUT, dial_ssh(ssh))
        .await
        .unwrap_or_else(|_| {
            anyhow::bail!(
                "the agent on {} did not answer over SSH within {SSH_DIAL_TIMEOUT:?}",
                ssh.target
            )
        })
}

async fn dial_ssh(ssh: &Ssh) -> anyhow::Result<Api> {
    let stderr_text = Arc::new(Mutex::new(String::new()));
    let ssh2 = ssh.clone();
    let text = stderr_text.clone();
    let result = Endpoint::from_static("http://uc.ssh")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let ssh = ssh2.clone();
            let text = text.clone();
            async move { spawn_dial(&ssh, text).map(TokioIo::new) }
        }))
        .await;
    let fail = |e: &dyn std::fmt::Display| {
        let said = stderr_text.lock().map(|s| s.clone()).unwrap_or_default();
        anyhow::anyhow!("{}", dial_failure(&ssh.target, &said, e))
    };
    let channel = match result {
        Ok(c) => c,
        Err(e) => {
            // Give ssh a moment to say why it hung up.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return Err(fail(&e));
        }
    };
    let mut api =
        ApiClient::new(channel).max_decoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES);
    // The handshake can succeed against a dial-stdio that then fails: ask once.
    if let Err(e) = api.status(uc_proto::v1::StatusRequest {}).await {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        return Err(fail(&e.message()));
    }
    Ok(api)
}

fn dial_failure(target: &SshTarget, stderr: &str, e: &dyn std::fmt::Display) -> String {
    if stderr.contains("Permission denied")
        || stderr.contains("Connection")
        || stderr.contains("Host key")
        || stderr.contains("Could not resolve")
        || stderr.contains("No route")
    {
        return crate::ssh::ssh_failure(target, stderr.as_bytes());
    }
    let said = stderr.trim();
    if said.is_empty() {
        format!("no answer from the agent on {target} over SSH ({e})")
    } else {
        format!("the agent on {target} is not reachable over SSH: {said}")
    }
}

fn spawn_dial(ssh: &Ssh, stderr_text: Arc<Mutex<String>>) -> std::io::Result<ChildIo> {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(ssh.args())
        .arg("--")
        .arg(DIAL)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    if let Some(mut err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf).await;
            if let Ok(mut t) = stderr_text.lock() {
                t.push_str(&String::from_utf8_lossy(&buf));
            }
        });
    }
    Ok(ChildIo {
        io: tokio::io::join(stdout, stdin),
        _child: child,
    })
}

/// A child's stdout and stdin as one stream; the child lives (and is killed) with it.
struct ChildIo {
    io: Join<ChildStdout, ChildStdin>,
    _child: Child,
}

impl AsyncRead for ChildIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChildIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A gRPC status as a user-facing error.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Adds what failed to a gRPC error.
pub fn rpc<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(status_error)
        .with_context(|| what.to_string())
}
