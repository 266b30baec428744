//! Helpers of the ingress's component tests: a test CA, backends, and clients over plain TCP or
//! TLS speaking HTTP/1.1 or HTTP/2. Everything listens on and connects to loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use uc_ingress::{
    Cert, ContainerInput, Ingress, Limits, Listener, RouteTable, ServiceInput, Workers,
};

/// A throwaway CA that signs leaf certificates.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "uc test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A leaf for `names`: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn cert(&self, names: &[&str]) -> Cert {
        let (c, k) = self.leaf(names);
        Cert::from_pem(&c, &k).unwrap()
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// A backend that answers every request with its name and the headers the proxy sent, and
/// echoes bytes after a protocol upgrade.
pub async fn backend(name: &'static str) -> (SocketAddr, CancellationToken) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = l.accept() => r.unwrap(),
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                        if req.headers().contains_key(hyper::header::UPGRADE) {
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = up.await {
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            resp.headers_mut()
                                .insert("upgrade", "websocket".parse().unwrap());
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let mut text = format!("{name}\n{} {}\n", req.method(), req.uri());
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        text.push_str(&format!("body: {}\n", String::from_utf8_lossy(&body)));
                        Ok(Response::new(Full::new(Bytes::from(text))))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, stop)
}

/// A service publishing `ports` (with the backend's port as container port where `{}` is),
/// served by containers on loopback.
pub fn service(name: &str, ports: &[String], local: bool) -> ServiceInput {
    ServiceInput {
        name: name.into(),
        ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        containers: vec![ContainerInput {
            ip: "127.0.0.1".parse().unwrap(),
            local,
        }],
    }
}

/// A running ingress: its HTTP listener serves public port 80, its HTTPS one 443, on loopback
/// ports of their own.
pub struct Running {
    pub ingress: Arc<Ingress>,
    /// Two, so that connections are served by several threads as in the agent.
    _workers: Arc<Workers>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn ingress(limits: Limits, table: RouteTable) -> Running {
    let ingress = Ingress::new(limits);
    ingress.set_routes(table);
    let stop = CancellationToken::new();
    let workers = Arc::new(Workers::start(2).unwrap());
    let h = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (http, https) = (h.local_addr().unwrap(), s.local_addr().unwrap());
    let tls = uc_ingress::tls::server_config(ingress.certs().clone()).unwrap();
    for (l, kind, port, tls) in [
        (h, Listener::Http, 80, None),
        (s, Listener::Https, 443, Some(tls)),
    ] {
        let (w, i, stop) = (workers.clone(), ingress.clone(), stop.clone());
        tokio::spawn(async move { w.serve(i, l, kind, port, tls, stop).await });
    }
    Running {
        ingress,
        _workers: workers,
        http,
        https,
        stop,
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Connects to `addr`, through TLS for `host` when `tls` is given.
pub async fn connect(
    addr: SocketAddr,
    host: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> std::io::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect(addr).await?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(cfg) => {
            let name = ServerName::try_from(host.to_owned()).unwrap();
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(Box::new(s))
        }
    }
}

/// An answer: status, headers, body text.
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

async fn answer(resp: Response<Incoming>) -> Answer {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// One HTTP/1.1 request on a sender of an open connection.
pub async fn send1(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    body: &str,
) -> Answer {
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .method(if body.is_empty() { "GET" } else { "POST" })
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    answer(sender.send_request(req).await.unwrap()).await
}

pub async fn open1(io: Box<dyn Io>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// GET `path` from `host` over a new HTTP/1.1 connection.
pub async fn get1(
    addr: SocketAddr,
    host: &str,
    path: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Answer {
    let io = connect(addr, host, tls).await.unwrap();
    let mut s = open1(io).await;
    send1(&mut s, host, path, "").await
}

/// GET `https://host/path` over a new HTTP/2 connection.
pub async fn get2(
    addr: SocketAddr,
    host: &str,
    path: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Answer {
    let io = connect(addr, host, Some(tls)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("https://{host}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    answer(sender.send_request(req).await.unwrap()).await
}
