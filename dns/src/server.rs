//! The I/O shell: a hickory server on sockets the caller bound, answering `internal` names from
//! the current [`DnsView`] and forwarding everything else to upstream resolvers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::answer::{Answer, DnsView, answer, soa};

/// How the server forwards names outside `internal`.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream may take.
    pub timeout: Duration,
    /// Forwards in flight at once; beyond it, SERVFAIL at once.
    pub max_in_flight: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            max_in_flight: 256,
        }
    }
}

/// Counters, for `uc status` and tests.
#[derive(Debug, Default)]
pub struct DnsStats {
    pub answered: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
    pub refused_overload: AtomicU64,
}

/// Answers requests: the cluster's names from the view, the rest upstream.
pub struct Handler {
    view: watch::Receiver<Arc<DnsView>>,
    forward: ForwardConfig,
    in_flight: Arc<Semaphore>,
    rotate: AtomicUsize,
    pub stats: Arc<DnsStats>,
}

impl Handler {
    /// `own` are the addresses this server listens on: upstreams among them are dropped, so a
    /// machine whose resolv.conf points at uc does not forward to itself.
    pub fn new(
        view: watch::Receiver<Arc<DnsView>>,
        mut forward: ForwardConfig,
        own: &[SocketAddr],
    ) -> Handler {
        forward.upstreams.retain(|u| {
            !own.iter()
                .any(|o| o == u || (o.port() == u.port() && o.ip().is_unspecified()))
        });
        Handler {
            view,
            in_flight: Arc::new(Semaphore::new(forward.max_in_flight.max(1))),
            forward,
            rotate: AtomicUsize::new(0),
            stats: Arc::new(DnsStats::default()),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.forward.upstreams
    }

    /// Asks the upstreams, in order, with the request's own bytes; the first answer wins.
    async fn forward(&self, request: &Request) -> Option<Message> {
        let _permit = match self.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.stats.refused_overload.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        for up in &self.forward.upstreams {
            let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .ok()?;
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(request.as_slice()).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            let got = tokio::time::timeout(self.forward.timeout, async {
                loop {
                    let n = sock.recv(&mut buf).await.ok()?;
                    match Message::from_vec(&buf[..n]) {
                        Ok(m) if m.metadata.id == request.metadata.id => return Some(m),
                        _ => continue,
                    }
                }
            })
            .await;
            if let Ok(Some(m)) = got {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                return Some(m);
            }
            tracing::debug!(upstream = %up, "upstream resolver did not answer");
        }
        self.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut edns_out = None;
        if let Some(req) = request.edns.as_ref() {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            edns_out = Some(e);
        }
        let builder = MessageResponseBuilder::new(&request.queries, edns_out.as_ref());
        let mut meta = Metadata::response_from_request(&request.metadata);
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query.original().clone()
            }
            _ => {
                let refuse = builder.error_msg(&request.metadata, ResponseCode::NotImp);
                return response_handle
                    .send_response(refuse)
                    .await
                    .unwrap_or_else(|_| serve_failed(request));
            }
        };
        let view = self.view.borrow().clone();
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        let name: Name = query.name().clone();
        let result = match answer(&view, &name, query.query_type(), rotate) {
            Answer::Forward => {
                meta.recursion_available = true;
                match self.forward(request).await {
                    Some(m) => {
                        meta.response_code = m.metadata.response_code;
                        meta.authoritative = false;
                        let resp = builder.build(
                            meta,
                            m.answers.iter(),
                            m.authorities.iter(),
                            [],
                            m.additionals
                                .iter()
                                .filter(|r| r.record_type() != hickory_proto::rr::RecordType::OPT),
                        );
                        return response_handle
                            .send_response(resp)
                            .await
                            .unwrap_or_else(|_| serve_failed(request));
                    }
                    None => {
                        let fail = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                        return response_handle
                            .send_response(fail)
                            .await
                            .unwrap_or_else(|_| serve_failed(request));
                    }
                }
            }
            other => other,
        };
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        meta.authoritative = true;
        // The SOA only goes with negative answers.
        let soa_rec: Vec<Record> = match &result {
            Answer::Records(_) => Vec::new(),
            _ => vec![soa(&view)],
        };
        let empty: Vec<Record> = Vec::new();
        let resp = match &result {
            Answer::Records(records) => builder.build(
                meta,
                records.iter(),
                empty.iter(),
                empty.iter(),
                empty.iter(),
            ),
            Answer::NoData => builder.build(
                meta,
                empty.iter(),
                empty.iter(),
                soa_rec.iter(),
                empty.iter(),
            ),
            _ => {
                meta.response_code = ResponseCode::NXDomain;
                builder.build(
                    meta,
                    empty.iter(),
                    empty.iter(),
                    soa_rec.iter(),
                    empty.iter(),
                )
            }
        };
        response_handle
            .send_response(resp)
            .await
            .unwrap_or_else(|_| serve_failed(request))
    }
}

fn serve_failed(request: &Request) -> ResponseInfo {
    let mut meta = Metadata::response_from_request(&request.metadata);
    meta.response_code = ResponseCode::ServFail;
    ResponseInfo::from(hickory_proto::op::Header {
        metadata: meta,
        counts: Default::default(),
    })
}

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `handler` on the given bound sockets until `shutdown`.
pub async fn serve(
    handler: Handler,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), crate::DnsError> {
    let mut server = Server::new(handler);
    for s in udp {
        server.register_socket(s);
    }
    for l in tcp {
        server.register_listener(l, TCP_TIMEOUT, 64);
    }
    shutdown.cancelled().await;
    server
        .shutdown_gracefully()
        .await
        .map_err(|e| crate::DnsError::Server(e.to_string()))
}
