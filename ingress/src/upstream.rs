//! Connections to the backends: HTTP/1.1 kept alive in a pool, one pool per listener and
//! runtime (see `workers`), so that a request and its backend connection are served by one
//! thread. A request that a kept-alive connection could not send (the backend was closing it)
//! is sent again on a new connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::proxy::ProxyBody;

/// How long an unused connection is kept.
const IDLE: Duration = Duration::from_secs(30);
/// Connections kept per backend.
const MAX_KEPT: usize = 256;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection to the backend: nothing was sent, another backend may be tried.
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

struct Kept {
    send: SendRequest<ProxyBody>,
    since: Instant,
}

impl Kept {
    /// Open, and used within the last [`IDLE`].
    fn alive(&self, now: Instant) -> bool {
        !self.send.is_closed() && now.duration_since(self.since) < IDLE
    }
}

pub(crate) struct Pool {
    connect_timeout: Duration,
    kept: Mutex<HashMap<SocketAddr, Vec<Kept>>>,
}

impl Pool {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Pool {
            connect_timeout,
            kept: Mutex::default(),
        }
    }

    /// Sends `req` (its URI in origin form) to `addr`.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let (mut send, reused) = match self.take(addr) {
            Some(s) => (s, true),
            None => (self.connect(addr).await?, false),
        };
        let resp = match send.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    debug!(%addr, error = %e.error(), "kept-alive connection closed; sending again on a new one");
                    send = self.connect(addr).await?;
                    send.send_request(req).await?
                }
                _ => return Err(e.into_error().into()),
            },
        };
        self.keep(addr, send);
        Ok(resp)
    }

    /// Drops the connections that are closed or were not used for a while.
    pub(crate) fn sweep(&self) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        kept.retain(|_, v| {
            v.retain(|k| k.alive(now));
            !v.is_empty()
        });
    }

    /// A kept connection to `addr` that is ready for a request; closed and expired ones are
    /// dropped, busy ones (a response body still coming) stay.
    fn take(&self, addr: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let v = kept.get_mut(&addr)?;
        let now = Instant::now();
        v.retain(|k| k.alive(now));
        let i = v.iter().rposition(|k| k.send.is_ready())?;
        Some(v.swap_remove(i).send)
    }

    fn keep(&self, addr: SocketAddr, send: SendRequest<ProxyBody>) {
        if send.is_closed() {
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let v = kept.entry(addr).or_default();
        if v.len() < MAX_KEPT {
            v.push(Kept {
                send,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<ProxyBody>, SendError> {
        let stream = connect(addr, self.connect_timeout)
            .await
            .map_err(SendError::Connect)?;
        let (send, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%addr, error = %e, "backend connection ended");
            }
        });
        Ok(send)
    }
}

/// A TCP connection to backend `addr` (no delay), or why there is none within `timeout`.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {timeout:?}")),
    }
}
