//! The I/O shell: a hickory server on sockets the caller bound, answering `internal` names from
//! the current [`DnsView`] and forwarding everything else to upstream resolvers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::net::{DnsError, NetError};
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

/// Answers requests: the cluster's names from the view, the rest upstream.
pub struct Handler {
    view: watch::Receiver<Arc<DnsView>>,
    forward: ForwardConfig,
    /// hickory's resolver on the upstreams: retries, TCP on truncation, and a cache that
    /// follows the records' TTLs.
    resolver: Option<hickory_resolver::TokioResolver>,
    in_flight: Arc<Semaphore>,
    rotate: AtomicUsize,
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
        let resolver = if forward.upstreams.is_empty() {
            None
        } else {
            resolver(&forward)
        };
        Handler {
            view,
            in_flight: Arc::new(Semaphore::new(forward.max_in_flight.max(1))),
            resolver,
            forward,
            rotate: AtomicUsize::new(0),
        }
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.forward.upstreams
    }

    /// Asks the upstreams (through the resolver's cache): the response code, answers and
    /// authorities, or None when no upstream answered.
    async fn forward(&self, name: &Name, qtype: RecordType) -> Option<Forwarded> {
        let resolver = self.resolver.as_ref()?;
        // Beyond the bound, SERVFAIL at once.
        let _permit = self.in_flight.clone().try_acquire_owned().ok()?;
        let out = match resolver.lookup(name.clone(), qtype).await {
            Ok(l) => Forwarded {
                code: ResponseCode::NoError,
                answers: l.answers().to_vec(),
                authorities: Vec::new(),
            },
            Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => Forwarded {
                code: nr.response_code,
                answers: Vec::new(),
                authorities: match (nr.authorities, nr.soa) {
                    (Some(a), _) if !a.is_empty() => a.to_vec(),
                    (_, Some(soa)) => vec![soa.into_record_of_rdata()],
                    _ => Vec::new(),
                },
            },
            Err(e) => {
                tracing::debug!(error = %e, %name, "upstream resolvers did not answer");
                return None;
            }
        };
        Some(out)
    }
}

/// What the upstreams said.
struct Forwarded {
    code: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
}

fn resolver(f: &ForwardConfig) -> Option<hickory_resolver::TokioResolver> {
    use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
    let servers = f
        .upstreams
        .iter()
        .map(|u| {
            let mut ns = NameServerConfig::udp_and_tcp(u.ip());
            for c in &mut ns.connections {
                c.port = u.port();
            }
            ns
        })
        .collect();
    let mut b = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], servers),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    let o = b.options_mut();
    o.timeout = f.timeout;
    o.attempts = 1;
    o.ndots = 0;
    o.cache_size = 4096;
    o.use_hosts_file = ResolveHosts::Never;
    match b.build() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the upstream resolver; names outside internal fail");
            None
        }
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
                match self.forward(&name, query.query_type()).await {
                    Some(m) => {
                        meta.response_code = m.code;
                        meta.authoritative = false;
                        let none: [Record; 0] = [];
                        let resp = builder.build(
                            meta,
                            m.answers.iter(),
                            m.authorities.iter(),
                            none.iter(),
                            none.iter(),
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
