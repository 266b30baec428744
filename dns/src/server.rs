//! The I/O shell: DNS on sockets the caller bound, answering `internal` names from the current
//! [`DnsView`] and forwarding everything else to upstream resolvers.
//!
//! UDP is served by uc's own loop: a plain query whose response is in the [`AnswerCache`] is
//! answered from it, with no parse or encoding; anything else is read by hickory, answered, and
//! its response kept for the next time. TCP is served by hickory-server with the same handler.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_resolver::net::{DnsError, NetError};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::answer::{Answer, DnsView, answer_turning, soa};
use crate::cache::AnswerCache;
use crate::{udp, wire};

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
    /// Whole UDP responses by question.
    cache: Mutex<AnswerCache>,
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
            cache: Mutex::new(AnswerCache::new()),
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

/// What to do with a request, decided from the view without I/O.
enum Decision {
    /// Answer from `view`; the answer turns with a period of `period` queries.
    Local {
        view: Arc<DnsView>,
        answer: Answer,
        period: usize,
    },
    /// Ask the upstreams.
    Forward(Name, RecordType),
    /// Not a plain query.
    NotImp,
}

/// A response before it is encoded.
struct Reply {
    meta: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    soa: Vec<Record>,
    edns: Option<Edns>,
}

/// What the UDP path does with one datagram.
pub enum UdpStep {
    /// Send the response now in the output buffer.
    Send,
    /// Ask the upstreams, then send the response (see [`Handler::forward_udp`]).
    Forward(Box<Pending>),
    /// Nothing to send.
    Drop,
}

/// A request that waits for the upstreams.
pub struct Pending {
    request: Request,
    name: Name,
    qtype: RecordType,
    /// The datagram, when it is a plain query whose response may be kept.
    cache_as: Option<Vec<u8>>,
}

impl Handler {
    fn decide(&self, request: &Request, view: Arc<DnsView>, rotate: usize) -> Decision {
        let query = match request.request_info() {
            Ok(info)
                if request.metadata.message_type == MessageType::Query
                    && request.metadata.op_code == OpCode::Query =>
            {
                info.query.original().clone()
            }
            _ => return Decision::NotImp,
        };
        let name = query.name();
        // The cluster's records are owned by the lower-case name (the question keeps the
        // client's case), so one response serves every spelling of a question.
        match answer_turning(&view, &name.to_lowercase(), query.query_type(), rotate) {
            (Answer::Forward, _) => Decision::Forward(name.clone(), query.query_type()),
            (answer, period) => Decision::Local {
                view,
                answer,
                period,
            },
        }
    }

    /// The reply to a request decided locally.
    fn local_reply(request: &Request, view: &DnsView, answer: Answer) -> Reply {
        let mut reply = Reply::new(request);
        reply.meta.authoritative = true;
        match answer {
            Answer::Records(records) => reply.answers = records,
            Answer::NoData => reply.soa = vec![soa(view)],
            Answer::NxDomain | Answer::Forward => {
                reply.meta.response_code = ResponseCode::NXDomain;
                reply.soa = vec![soa(view)];
            }
        }
        reply
    }

    /// The reply to a forwarded request: the upstreams' answer, or SERVFAIL.
    async fn forward_reply(&self, request: &Request, name: &Name, qtype: RecordType) -> Reply {
        let mut reply = Reply::new(request);
        reply.meta.recursion_available = true;
        match self.forward(name, qtype).await {
            Some(m) => {
                reply.meta.response_code = m.code;
                reply.answers = m.answers;
                reply.authorities = m.authorities;
            }
            None => reply.meta.response_code = ResponseCode::ServFail,
        }
        reply
    }

    async fn reply(&self, request: &Request, decision: Decision) -> Reply {
        match decision {
            Decision::Local { view, answer, .. } => Self::local_reply(request, &view, answer),
            Decision::Forward(name, qtype) => self.forward_reply(request, &name, qtype).await,
            Decision::NotImp => Reply::error(request, ResponseCode::NotImp),
        }
    }

    /// Handles one datagram from `src`: from the cache, or answered and kept, into `out`; or
    /// left to [`Handler::forward_udp`] when it goes upstream.
    pub fn udp_step(
        &self,
        pkt: &[u8],
        src: SocketAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> UdpStep {
        if !answerable(src) {
            return UdpStep::Drop;
        }
        let view = self.view.borrow().clone();
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        let query = wire::parse_query(pkt);
        if let Some(q) = &query {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.set_view(&view);
            if cache.get(q, rotate, now, out) {
                return UdpStep::Send;
            }
        }
        let request = match Request::from_bytes(pkt.to_vec(), src, Protocol::Udp) {
            // A response echoes the question as received: a compression pointer in it would
            // point elsewhere in the response.
            Ok(r) if wire::first_name_is_plain(pkt) => r,
            _ => {
                return match wire::format_error(pkt) {
                    Some(e) => {
                        out.clear();
                        out.extend_from_slice(&e);
                        UdpStep::Send
                    }
                    None => UdpStep::Drop,
                };
            }
        };
        // Never answer a response (reflection).
        if request.metadata.message_type == MessageType::Response {
            return UdpStep::Drop;
        }
        match self.decide(&request, view, rotate) {
            Decision::Forward(name, qtype) => UdpStep::Forward(Box::new(Pending {
                request,
                name,
                qtype,
                cache_as: query.map(|_| pkt.to_vec()),
            })),
            Decision::Local {
                view,
                answer,
                period,
            } => {
                encode_udp(&Self::local_reply(&request, &view, answer), &request, out);
                if let Some(q) = &query {
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    cache.put_local(q, &view, rotate, period, out);
                }
                UdpStep::Send
            }
            Decision::NotImp => {
                encode_udp(&Reply::error(&request, ResponseCode::NotImp), &request, out);
                UdpStep::Send
            }
        }
    }

    /// Asks the upstreams for a pending request: its response, kept when it may be.
    pub async fn forward_udp(&self, pending: Pending) -> Vec<u8> {
        let reply = self
            .forward_reply(&pending.request, &pending.name, pending.qtype)
            .await;
        let mut out = Vec::with_capacity(512);
        encode_udp(&reply, &pending.request, &mut out);
        if let Some(q) = pending.cache_as.as_deref().and_then(wire::parse_query) {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.put_forwarded(&q, &out, Instant::now());
        }
        out
    }
}

impl Reply {
    fn new(request: &Request) -> Reply {
        Reply {
            meta: Metadata::response_from_request(&request.metadata),
            answers: Vec::new(),
            authorities: Vec::new(),
            soa: Vec::new(),
            // The client's payload size, at least 512.
            edns: request.edns.as_ref().map(|req| {
                let mut e = Edns::new();
                e.set_max_payload(req.max_payload().max(512));
                e
            }),
        }
    }

    fn error(request: &Request, code: ResponseCode) -> Reply {
        let mut r = Reply::new(request);
        r.meta.response_code = code;
        r
    }

    /// hickory's response to `request`, ready to encode.
    fn response<'a>(
        &'a self,
        request: &'a Request,
    ) -> MessageResponse<
        'a,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    > {
        MessageResponseBuilder::new(&request.queries, self.edns.as_ref()).build(
            self.meta,
            self.answers.iter(),
            self.authorities.iter(),
            self.soa.iter(),
            [].iter(),
        )
    }

    async fn send<R: ResponseHandler>(&self, request: &Request, mut rh: R) -> ResponseInfo {
        rh.send_response(self.response(request))
            .await
            .unwrap_or_else(|_| serve_failed(request))
    }
}

/// Encodes `reply` for UDP into `out`: at most the client's payload size (512 without EDNS),
/// truncated (TC) beyond it, as hickory-server does.
fn encode_udp(reply: &Reply, request: &Request, out: &mut Vec<u8>) {
    out.clear();
    let resp = reply.response(request);
    let mut enc = BinEncoder::new(out);
    enc.set_max_size(reply.edns.as_ref().map_or(512, Edns::max_payload));
    if resp.destructive_emit(&mut enc).is_err() {
        out.clear();
        let mut enc = BinEncoder::new(out);
        let header = servfail_header(request);
        if hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut enc).is_err() {
            out.clear();
        }
    }
}

/// Whether a response may go to `src` (not port 0, not an unspecified, broadcast or multicast
/// address).
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
            IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
        }
}

/// hickory-server's view of the handler, for TCP.
struct Shared(Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let view = self.view.borrow().clone();
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        let decision = self.decide(request, view, rotate);
        self.reply(request, decision)
            .await
            .send(request, response_handle)
            .await
    }
}

/// A SERVFAIL response to `request`, header only.
fn servfail_header(request: &Request) -> hickory_proto::op::Header {
    let mut meta = Metadata::response_from_request(&request.metadata);
    meta.response_code = ResponseCode::ServFail;
    hickory_proto::op::Header {
        metadata: meta,
        counts: Default::default(),
    }
}

fn serve_failed(request: &Request) -> ResponseInfo {
    ResponseInfo::from(servfail_header(request))
}

/// How long a TCP client may stay idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest datagram read.
const MAX_DATAGRAM: usize = 4096;

/// Serves `handler` on the given bound sockets until `shutdown`.
pub async fn serve(
    handler: Handler,
    udp: Vec<tokio::net::UdpSocket>,
    tcp: Vec<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), crate::DnsError> {
    let handler = Arc::new(handler);
    let mut udp_tasks = tokio::task::JoinSet::new();
    for s in udp {
        udp_tasks.spawn(serve_udp(handler.clone(), Arc::new(s), shutdown.clone()));
    }
    let mut server = Server::new(Shared(handler));
    for l in tcp {
        server.register_listener(l, TCP_TIMEOUT, 64);
    }
    shutdown.cancelled().await;
    udp_tasks.join_all().await;
    server
        .shutdown_gracefully()
        .await
        .map_err(|e| crate::DnsError::Server(e.to_string()))
}

/// One UDP socket: the datagrams waiting are read in a batch and handled in turn, their
/// responses sent in a batch; forwarded ones go on in their own task.
async fn serve_udp(
    handler: Arc<Handler>,
    socket: Arc<tokio::net::UdpSocket>,
    shutdown: CancellationToken,
) {
    let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; udp::BATCH];
    let mut outs: Vec<Vec<u8>> = (0..udp::BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut got = Vec::with_capacity(udp::BATCH);
    let mut to = Vec::with_capacity(udp::BATCH);
    let mut forwards = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.readable() => if let Err(e) = r {
                tracing::error!(error = %e, "DNS socket failed");
                break;
            },
        }
        while forwards.try_join_next().is_some() {}
        loop {
            got.clear();
            let r = socket.try_io(tokio::io::Interest::READABLE, || {
                udp::recv_batch(&*socket, &mut bufs, &mut got)
            });
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive");
                    break;
                }
            }
            let now = Instant::now();
            to.clear();
            for (buf, &(len, src)) in bufs.iter().zip(&got) {
                if len == 0 {
                    continue;
                }
                match handler.udp_step(&buf[..len], src, now, &mut outs[to.len()]) {
                    UdpStep::Send => to.push(src),
                    UdpStep::Forward(pending) => {
                        let (h, s) = (handler.clone(), socket.clone());
                        forwards.spawn(async move {
                            let resp = h.forward_udp(*pending).await;
                            send_all(&s, &[resp], &[src]).await;
                        });
                    }
                    UdpStep::Drop => {}
                }
            }
            send_all(&socket, &outs[..to.len()], &to).await;
        }
    }
    forwards.abort_all();
}

/// Sends `msgs[i]` to `to[i]`, waiting while the socket's buffer is full; a message the kernel
/// refuses is skipped.
async fn send_all(socket: &tokio::net::UdpSocket, msgs: &[Vec<u8>], to: &[SocketAddr]) {
    let mut done = 0;
    while done < msgs.len() {
        let r = socket
            .async_io(tokio::io::Interest::WRITABLE, || {
                udp::send_batch(socket, &msgs[done..], &to[done..])
            })
            .await;
        match r {
            Ok(n) if n > 0 => done += n,
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, to = %to[done], "DNS send");
                done += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::{ContainerRec, MachineRec, PortRec, ServiceRec};
    use hickory_proto::op::{Message, Query};
    use std::net::Ipv4Addr;

    fn view() -> DnsView {
        let mut v = DnsView {
            this_machine: "pi".into(),
            serial: 3,
            ..Default::default()
        };
        for (i, m) in ["pi", "vps"].iter().enumerate() {
            v.machines.insert(
                m.to_string(),
                MachineRec {
                    name: m.to_string(),
                    v4: Ipv4Addr::new(10, 210, i as u8 + 1, 1),
                    v6: format!("fd00:0:0:{}::1", i + 1).parse().unwrap(),
                },
            );
        }
        for (svc, n) in [("web", 3u8), ("big", 60)] {
            v.services.insert(
                svc.into(),
                ServiceRec {
                    containers: (0..n)
                        .map(|i| ContainerRec {
                            name: format!("{svc}{i:013}"),
                            machine: if i % 2 == 0 { "pi" } else { "vps" }.into(),
                            v4: Ipv4Addr::new(10, 210, 1 + i % 2, 2 + i),
                            v6: (i % 3 == 0).then(|| format!("fd00::{i:x}").parse().unwrap()),
                            healthy: i != 1,
                        })
                        .collect(),
                    ports: vec![PortRec {
                        name: "http".into(),
                        tcp: true,
                        port: 80,
                    }],
                },
            );
        }
        v
    }

    fn handler(v: DnsView) -> Handler {
        let (tx, rx) = watch::channel(Arc::new(v));
        std::mem::forget(tx);
        Handler::new(rx, ForwardConfig::default(), &[])
    }

    fn queries() -> Vec<Vec<u8>> {
        let names = [
            "web.internal.",
            "WEB.Internal.",
            "nearest.web.internal.",
            "big.internal.",
            "_http._tcp.web.internal.",
            "_http._tcp.big.internal.",
            "pi.machine.internal.",
            "web0000000000000.pi.machine.internal.",
            "nope.internal.",
            "internal.",
            "machine.internal.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::ANY,
            RecordType::SRV,
            RecordType::SOA,
            RecordType::MX,
        ];
        let mut out = Vec::new();
        let mut id = 0u16;
        for name in names {
            for qtype in types {
                for edns in [None, Some(512u16), Some(1232), Some(4096)] {
                    for (rd, dnssec) in [(true, false), (false, true)] {
                        id = id.wrapping_add(7919);
                        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
                        m.metadata.recursion_desired = rd;
                        m.metadata.checking_disabled = dnssec;
                        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
                        if let Some(p) = edns {
                            let mut e = Edns::new();
                            e.set_max_payload(p);
                            e.set_dnssec_ok(dnssec);
                            m.set_edns(e);
                        }
                        out.push(m.to_vec().unwrap());
                    }
                }
            }
        }
        out
    }

    /// Every response served from the cache is byte for byte the response built anew for the
    /// same query at the same turn.
    #[test]
    fn cached_responses_are_the_responses_built_anew() {
        let (cached, fresh) = (handler(view()), handler(view()));
        let src = SocketAddr::from(([127, 0, 0, 1], 5300));
        let now = Instant::now();
        let (mut a, mut b, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let qs = queries();
        let mut hits = 0;
        for round in 0..4 {
            for q in &qs {
                let turn = cached.rotate.load(Ordering::Relaxed);
                let hit = wire::parse_query(q).is_some_and(|pq| {
                    cached
                        .cache
                        .lock()
                        .unwrap()
                        .get(&pq, turn, now, &mut scratch)
                });
                assert!(matches!(
                    cached.udp_step(q, src, now, &mut a),
                    UdpStep::Send
                ));
                *fresh.cache.lock().unwrap() = AnswerCache::new();
                assert!(matches!(fresh.udp_step(q, src, now, &mut b), UdpStep::Send));
                assert_eq!(a, b, "round {round}: {:?}", Message::from_vec(q).unwrap());
                if hit {
                    assert_eq!(a, scratch);
                    hits += 1;
                }
            }
        }
        let (local, _) = cached.cache.lock().unwrap().len();
        assert!(local > 100, "{local} entries");
        // Rounds after the first are served from the cache, but for truncated responses.
        assert!(hits > 2 * qs.len(), "{hits} hits of {}", 4 * qs.len());
    }

    #[test]
    fn a_new_view_is_answered_at_once() {
        let (tx, rx) = watch::channel(Arc::new(view()));
        let h = Handler::new(rx, ForwardConfig::default(), &[]);
        let src = SocketAddr::from(([127, 0, 0, 1], 5300));
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii("web.internal.").unwrap(),
            RecordType::A,
        ));
        let q = m.to_vec().unwrap();
        let mut out = Vec::new();
        for _ in 0..3 {
            h.udp_step(&q, src, Instant::now(), &mut out);
        }
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 2);
        let mut v = view();
        v.services.remove("web");
        tx.send_replace(Arc::new(v));
        h.udp_step(&q, src, Instant::now(), &mut out);
        let r = Message::from_vec(&out).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn garbage_gets_formerr_or_nothing_and_responses_are_never_answered() {
        let h = handler(view());
        let src = SocketAddr::from(([127, 0, 0, 1], 5300));
        let mut out = Vec::new();
        assert!(matches!(
            h.udp_step(&[1, 2, 3], src, Instant::now(), &mut out),
            UdpStep::Drop
        ));
        let mut junk = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        junk.extend([0x3f, b'x']);
        assert!(matches!(
            h.udp_step(&junk, src, Instant::now(), &mut out),
            UdpStep::Send
        ));
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(
            (m.metadata.id, m.metadata.response_code),
            (0xabcd, ResponseCode::FormErr)
        );
        let mut resp = Message::new(1, MessageType::Response, OpCode::Query);
        resp.add_query(Query::query(
            Name::from_ascii("web.internal.").unwrap(),
            RecordType::A,
        ));
        let resp = resp.to_vec().unwrap();
        assert!(matches!(
            h.udp_step(&resp, src, Instant::now(), &mut out),
            UdpStep::Drop
        ));
        let port0 = SocketAddr::from(([127, 0, 0, 1], 0));
        let q = queries().remove(0);
        assert!(matches!(
            h.udp_step(&q, port0, Instant::now(), &mut out),
            UdpStep::Drop
        ));
    }
}
