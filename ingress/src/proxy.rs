//! The listeners: HTTP and HTTPS routed by host (HTTP/1.1 and HTTP/2, websockets), and raw TCP,
//! to a route's backends over the mesh. Each `serve` takes a bound listener and a shutdown token;
//! routes, certificates and ACME challenges are swapped in by the agent while they serve, so a
//! change of routes drops no connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::balance::Balancer;
use crate::routes::{Backend, Listener, RouteTable};
use crate::tls::CertStore;
use crate::upstream::{Pool, SendError};

pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Limits against abuse.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once, over all listeners.
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_ip: usize,
    /// Bytes of request line plus headers (HTTP/1.1), or of the header list (HTTP/2).
    pub max_header_bytes: usize,
    /// Time a client has to send a request's headers, and to finish a TLS handshake.
    pub header_timeout: Duration,
    /// Time to connect to one backend before the next is tried.
    pub connect_timeout: Duration,
    /// Request bodies up to this size are read before forwarding, so that a failed backend
    /// can be retried on another; larger ones are streamed and not retried.
    pub retry_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 8192,
            max_connections_per_ip: 512,
            max_header_bytes: 32 * 1024,
            header_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retry_body_bytes: 64 * 1024,
        }
    }
}

/// Counters shown by `uc ingress ls`.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub not_found: AtomicU64,
}

/// What every listener shares: the routes, certificates and challenges of the moment.
pub struct Ingress {
    routes: RwLock<Arc<RouteTable>>,
    certs: Arc<CertStore>,
    challenges: RwLock<HashMap<String, String>>,
    balancer: Balancer,
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    pub counters: Counters,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingress")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Ingress {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Ingress {
            routes: RwLock::new(Arc::new(RouteTable::default())),
            certs: Arc::new(CertStore::default()),
            challenges: RwLock::default(),
            balancer: Balancer::default(),
            limits,
            open: Mutex::default(),
            counters: Counters::default(),
        })
    }

    pub fn set_routes(&self, table: RouteTable) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// ACME HTTP-01 challenges: token → key authorization.
    pub fn set_challenges(&self, c: HashMap<String, String>) {
        *self.challenges.write().unwrap_or_else(|e| e.into_inner()) = c;
    }

    pub fn certs(&self) -> &Arc<CertStore> {
        &self.certs
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Admits a connection from `ip`, or refuses it when a limit is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *open;
        let n = per_ip.entry(ip).or_default();
        if *total >= self.limits.max_connections || *n >= self.limits.max_connections_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            return None;
        }
        *n += 1;
        *total += 1;
        Some(Admitted {
            ingress: self.clone(),
            ip,
        })
    }
}

/// A connection counted against the limits until it is dropped.
struct Admitted {
    ingress: Arc<Ingress>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.ingress.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// What the connections of one listener on one runtime share.
struct Site {
    ingress: Arc<Ingress>,
    /// Kept-alive backend connections, on the runtime that serves the listener.
    pool: Pool,
    https: bool,
    /// The port clients use, which picks the routes.
    public_port: u16,
}

/// Serves one listener until `shutdown`: `kind` says what it speaks, `public_port` which routes
/// it serves (the port clients use, which the listener may not be bound to in tests). HTTPS
/// listeners need `tls`. On shutdown, open HTTP connections finish their requests.
pub async fn serve(
    ingress: Arc<Ingress>,
    listener: TcpListener,
    kind: Listener,
    public_port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), crate::Error> {
    let tls = match (kind, tls) {
        (Listener::Https, Some(cfg)) => Some(TlsAcceptor::from(cfg)),
        (Listener::Https, None) => {
            return Err(crate::Error::Cert(
                "an HTTPS listener needs a TLS configuration".into(),
            ));
        }
        _ => None,
    };
    let local = listener.local_addr()?;
    debug!(%local, ?kind, public_port, "ingress listening");
    let site = Arc::new(Site {
        pool: Pool::new(ingress.limits.connect_timeout),
        ingress: ingress.clone(),
        https: kind == Listener::Https,
        public_port,
    });
    let tasks = TaskTracker::new();
    let sweeping = {
        let (site, shutdown) = (site.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = every.tick() => site.pool.sweep(),
                }
            }
        })
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(%local, error = %e, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = ingress.admit(peer.ip()) else {
            ingress
                .counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "ingress connection refused: limit reached");
            continue;
        };
        ingress.counters.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let site = site.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _admitted = admitted;
            match kind {
                Listener::Tcp => tcp_connection(&site, stream, peer, shutdown).await,
                Listener::Http => http_connection(site, stream, peer, shutdown).await,
                Listener::Https => {
                    let Some(tls) = tls else { return };
                    let timeout = site.ingress.limits.header_timeout;
                    match tokio::time::timeout(timeout, tls.accept(stream)).await {
                        Ok(Ok(s)) => http_connection(site, s, peer, shutdown).await,
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    tasks.close();
    // Give open connections a moment to finish what they are doing.
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    sweeping.abort();
    Ok(())
}

async fn http_connection<S>(
    site: Arc<Site>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ingress = &site.ingress;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ingress.limits.header_timeout)
        .max_buf_size(ingress.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(ingress.limits.max_header_bytes as u32)
        .max_concurrent_streams(256);
    let svc_site = site.clone();
    let service = hyper::service::service_fn(move |req| {
        let site = svc_site.clone();
        async move { Ok::<_, Infallible>(handle(&site, req, peer).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, error = %e, "ingress connection ended");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut r = Response::new(full(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";

async fn handle(site: &Site, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
    let (ingress, https) = (&site.ingress, site.https);
    ingress.counters.requests.fetch_add(1, Ordering::Relaxed);
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = host else {
        return text(StatusCode::BAD_REQUEST, "the request names no host");
    };
    if !https && let Some(token) = req.uri().path().strip_prefix(ACME_PREFIX) {
        let answer = ingress
            .challenges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        if let Some(key_auth) = answer {
            debug!(%peer, token, "answered an ACME challenge");
            let mut r = Response::new(full(Bytes::from(key_auth)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            return r;
        }
    }
    let table = ingress.routes();
    let Some(route) = table.http_route(site.public_port, &host) else {
        if !https && let Some(secure) = table.https_route_for(&host) {
            let h = crate::routes::normalize_host(&host);
            let port = match secure.public_port {
                443 => String::new(),
                p => format!(":{p}"),
            };
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            let mut r = text(
                StatusCode::PERMANENT_REDIRECT,
                "this site is served over HTTPS",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("https://{h}{port}{pq}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        ingress.counters.not_found.fetch_add(1, Ordering::Relaxed);
        return text(StatusCode::NOT_FOUND, "no such site here");
    };
    // `table` stays alive while this request is forwarded; a route change meanwhile swaps in a
    // new table for later requests.
    if route.backends.is_empty() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("service {} has no running containers", route.service),
        );
    }
    forward(site, req, peer, &host, &route.service, &route.backends).await
}

/// Headers that belong to one hop and are not passed on (RFC 9110, 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(&HOP_BY_HOP) {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
    h.remove(HeaderName::from_static("proxy-connection"));
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

async fn forward(
    site: &Site,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    host: &str,
    service: &str,
    backends: &[Backend],
) -> Response<ProxyBody> {
    let upgrade = is_upgrade(req.headers()).then(|| {
        (
            req.headers().get(header::UPGRADE).cloned(),
            hyper::upgrade::on(&mut req),
        )
    });
    let (ingress, https) = (&site.ingress, site.https);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    let client_ip = peer.ip().to_string();
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    for (name, value) in [
        ("x-forwarded-for", xff.as_str()),
        ("x-forwarded-proto", if https { "https" } else { "http" }),
        ("x-forwarded-host", host),
        ("x-real-ip", client_ip.as_str()),
    ] {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(HeaderName::from_static(name), v);
        }
    }
    if !h.contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        h.insert(header::HOST, v);
    }
    if let Some((Some(proto), _)) = &upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    parts.version = hyper::Version::HTTP_11;
    // The backend gets the origin form (an HTTP/2 request's URI names scheme and authority).
    parts.uri = Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );

    // A body small enough is read first, so that a failed backend can be retried.
    let (retry_body, mut stream_body) = if body.is_end_stream() {
        (Some(Bytes::new()), None)
    } else if body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= ingress.limits.retry_body_bytes)
    {
        match tokio::time::timeout(ingress.limits.header_timeout * 3, body.collect()).await {
            Ok(Ok(b)) => (Some(b.to_bytes()), None),
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "request body ended early");
                return text(StatusCode::BAD_REQUEST, "the request body ended early");
            }
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body came too slowly",
                );
            }
        }
    } else {
        (None, Some(body))
    };

    let now = Instant::now();
    let order = ingress.balancer.order(backends, now);
    let attempts = order.len().min(3);
    let mut parts = Some(parts);
    for (i, addr) in order.into_iter().take(attempts).enumerate() {
        // The request's head is copied only when a retry may need it again.
        let head = if i + 1 < attempts && retry_body.is_some() {
            parts.clone()
        } else {
            parts.take()
        };
        let Some(head) = head else { break };
        let body = match (&retry_body, stream_body.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(b)) => b.boxed(),
            (None, None) => break,
        };
        match site.pool.send(addr, Request::from_parts(head, body)).await {
            Ok(mut resp) => {
                ingress.balancer.mark_up(addr);
                if let Some((_, client_upgrade)) = upgrade
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let backend_upgrade = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        match tokio::try_join!(client_upgrade, backend_upgrade) {
                            Ok((c, b)) => {
                                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                                let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                            }
                            Err(e) => debug!(error = %e, "upgrade failed"),
                        }
                    });
                    let (parts, _) = resp.into_parts();
                    return Response::from_parts(parts, full(Bytes::new()));
                }
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                return Response::from_parts(parts, body.boxed());
            }
            Err(e) => {
                ingress
                    .counters
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(%addr, service, error = %e, "backend failed");
                if matches!(e, SendError::Connect(_)) {
                    ingress.balancer.mark_down(addr, Instant::now());
                    if retry_body.is_some() {
                        continue;
                    }
                }
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!("service {service} did not answer"),
                );
            }
        }
    }
    text(
        StatusCode::BAD_GATEWAY,
        &format!("no container of service {service} answered"),
    )
}

async fn tcp_connection(
    site: &Site,
    mut client: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let ingress = &site.ingress;
    let backends = match ingress.routes().tcp_route(site.public_port) {
        Some(r) => r.backends.clone(),
        None => return,
    };
    for addr in ingress
        .balancer
        .order(&backends, Instant::now())
        .into_iter()
        .take(3)
    {
        match crate::upstream::connect(addr, ingress.limits.connect_timeout).await {
            Ok(mut upstream) => {
                ingress.balancer.mark_up(addr);
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                        if let Err(e) = r {
                            debug!(%peer, %addr, error = %e, "tcp route connection ended");
                        }
                    }
                    _ = shutdown.cancelled() => {}
                }
                return;
            }
            Err(e) => debug!(%addr, error = %e, "tcp backend unreachable"),
        }
        ingress
            .counters
            .upstream_failures
            .fetch_add(1, Ordering::Relaxed);
        ingress.balancer.mark_down(addr, Instant::now());
    }
}
