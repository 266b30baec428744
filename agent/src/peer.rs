//! The peer API between agents (gRPC over TCP): automerge sync sessions and
//! joining. Server side here; `sync_session` and `join` are the client side.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use uc_crdt::{MachineState, NewMachine, PeerSync};
use uc_proto::MachineId;
use uc_proto::v1::join_server::Join;
use uc_proto::v1::peer_client::PeerClient;
use uc_proto::v1::peer_server::Peer;
use uc_proto::v1::{
    Chunk, FetchImageRequest, JoinRequest, JoinResponse, ListWorkloadsRequest,
    ListWorkloadsResponse, LogLine, LogsRequest, SyncFrame, WgShowRequest, WgShowResponse,
};

use crate::node::{Metrics, Node, WriteError, now_ms};
use crate::token;

/// Rounds after which a sync session is abandoned (each round is one
/// message each way; automerge needs a handful).
const MAX_ROUNDS: usize = 64;

pub struct PeerService {
    pub node: Arc<Node>,
}

/// The join endpoint: the only API served on the underlay.
pub struct JoinService {
    pub node: Arc<Node>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<SyncFrame, Status>> + Send>>;

fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::Rejected(e) => Status::failed_precondition(e.to_string()),
        WriteError::Store(e) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type SyncStream = FrameStream;

    async fn sync(
        &self,
        request: Request<Streaming<SyncFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let node = self.node.clone();
        let remote = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut peer = PeerSync::new();
            for _ in 0..MAX_ROUNDS {
                let frame = match inbound.message().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return,
                    Err(status) => {
                        // Undecodable frames land here: count and drop.
                        Metrics::inc(&node.metrics.sync_garbage_dropped);
                        tracing::debug!(?remote, %status, "sync stream broken");
                        return;
                    }
                };
                if frame.cluster_id != node.cluster_id {
                    Metrics::inc(&node.metrics.sync_garbage_dropped);
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "this machine belongs to cluster {}, not {:?}",
                            node.cluster_id, frame.cluster_id
                        ))))
                        .await;
                    return;
                }
                let incoming = (!frame.message.is_empty()).then_some(frame.message.as_slice());
                // No fsync on this path (received changes are stored lazily): a
                // short, CPU-only step, run in place.
                let step = node.sync_step(&mut peer, incoming);
                let reply = match step {
                    Ok(out) => Ok(SyncFrame {
                        cluster_id: node.cluster_id.clone(),
                        from_machine: node.machine_id.to_string(),
                        message: out.unwrap_or_default(),
                    }),
                    Err(WriteError::Rejected(e)) => {
                        Metrics::inc(&node.metrics.sync_garbage_dropped);
                        tracing::warn!(?remote, error = %e, "dropped a malformed sync message");
                        Err(Status::invalid_argument(format!(
                            "malformed sync message: {e}"
                        )))
                    }
                    Err(e) => Err(write_status(e)),
                };
                let stop = reply.is_err();
                if tx.send(reply).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn wg_show(&self, _: Request<WgShowRequest>) -> Result<Response<WgShowResponse>, Status> {
        wg_show_local(&self.node).map(Response::new)
    }

    async fn list_workloads(
        &self,
        _: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let w = self.node.workloads()?;
        Ok(Response::new(ListWorkloadsResponse {
            workloads: w.statuses().await,
            runtimes: w
                .available()
                .iter()
                .map(|(k, a)| (k.to_string(), a.clone().err().unwrap_or_default()))
                .collect(),
        }))
    }

    type WorkloadLogsStream = Pin<Box<dyn Stream<Item = Result<LogLine, Status>> + Send>>;

    async fn workload_logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::WorkloadLogsStream>, Status> {
        let r = request.into_inner();
        let w = self.node.workloads()?;
        let ids: Vec<uc_proto::ContainerId> = r
            .container_ids
            .iter()
            .map(|i| {
                i.parse()
                    .map_err(|e: uc_proto::IdError| Status::invalid_argument(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let machine = self.node.config.name.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let tail = if r.tail == 0 {
                usize::MAX
            } else {
                r.tail as usize
            };
            let mut last: std::collections::HashMap<uc_proto::ContainerId, u64> =
                Default::default();
            let mut first = true;
            loop {
                let mut batch = Vec::new();
                for id in &ids {
                    let lines = w.logs(id, if first { tail } else { 10_000 }).await;
                    let after = last.get(id).copied();
                    for l in lines {
                        if after.is_some_and(|a| l.at_ms <= a) {
                            continue;
                        }
                        batch.push(LogLine {
                            unix_ms: l.at_ms,
                            container_id: id.to_string(),
                            machine: machine.clone(),
                            stream: l.stream.to_string(),
                            text: l.text,
                        });
                    }
                    if let Some(l) = batch
                        .iter()
                        .filter(|l| l.container_id == id.as_str())
                        .map(|l| l.unix_ms)
                        .max()
                    {
                        last.insert(id.clone(), l);
                    } else if first {
                        last.insert(id.clone(), 0);
                    }
                }
                batch.sort_by_key(|l| l.unix_ms);
                for l in batch {
                    if tx.send(Ok(l)).await.is_err() {
                        return;
                    }
                }
                if !r.follow {
                    return;
                }
                first = false;
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = crate::exec::OutputStream;

    async fn exec(
        &self,
        request: Request<Streaming<uc_proto::v1::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        crate::exec::peer_exec(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    type FetchImageStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

    async fn fetch_image(
        &self,
        request: Request<FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        let name = request.into_inner().name;
        let w = self.node.workloads()?;
        w.images
            .require(&name)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
        let images = w.images.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = uc_workload::image::ChannelWriter {
                tx,
                buf: Vec::new(),
            };
            if let Err(e) = images.export(&name, &mut out) {
                tracing::warn!(image = %name, error = %e, "exporting image failed");
                return;
            }
            let _ = std::io::Write::flush(&mut out);
        });
        let stream = ReceiverStream::new(rx).map(|data| Ok(Chunk { data }));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// This machine's `uc wg show`.
pub fn wg_show_local(node: &Node) -> Result<WgShowResponse, Status> {
    let mesh = node
        .mesh
        .get()
        .ok_or_else(|| Status::unavailable("the mesh interface is not up yet"))?;
    mesh.show(node)
        .map_err(|e| Status::internal(format!("reading the WireGuard interface: {e:#}")))
}

#[tonic::async_trait]
impl Join for JoinService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let node = &self.node;
        let remote = request.remote_addr();
        let r = request.into_inner();
        let id: MachineId = r
            .machine_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        uc_crdt::check_name("machine", &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key: uc_mesh::PublicKey = r
            .public_key
            .parse()
            .map_err(|e| Status::invalid_argument(format!("join refused: {e}")))?;
        for ep in &r.endpoints {
            if uc_mesh::plan::parse_endpoint(ep, uc_proto::DEFAULT_WG_PORT).is_none() {
                return Err(Status::invalid_argument(format!(
                    "join refused: invalid endpoint {ep:?}: expected IP or IP:PORT"
                )));
            }
        }
        if !node.wait_ready(Duration::from_secs(5)).await {
            return Err(Status::unavailable(
                "this machine is still catching up with the cluster; try again shortly",
            ));
        }
        let key_text = key.to_string();
        let key_owner = node.read(|doc| {
            doc.machines()
                .into_iter()
                .find(|m| m.is_active() && m.id != id && m.public_key == key_text)
                .map(|m| m.name)
        });
        if let Some(owner) = key_owner {
            return Err(Status::already_exists(format!(
                "join refused: WireGuard key {key} is already used by machine {owner}"
            )));
        }
        let hash = token::hash(&r.token);
        let now = now_ms();
        let name = r.name.clone();
        let result = tokio::task::block_in_place(|| {
            node.write(|doc| {
                if let Some(other) = doc.machine_by_name(&name)
                    && other.id != id
                {
                    return Err(uc_crdt::Error::NameTaken {
                        kind: "machine",
                        name: name.clone(),
                        by: other.id.to_string(),
                    });
                }
                doc.consume_join_token(&hash, now)?;
                match doc.machine(&id) {
                    Some(m) if m.state == MachineState::Active => Ok(m),
                    Some(_) => Err(uc_crdt::Error::MachineRemoved(id.clone())),
                    None => doc.add_machine(
                        NewMachine {
                            id: id.clone(),
                            name: name.clone(),
                            public_key: r.public_key.clone(),
                            endpoints: r.endpoints.clone(),
                            tags: r.tags.iter().cloned().collect(),
                        },
                        now,
                    ),
                }
            })
        });
        let machine = match result {
            Ok(m) => m,
            Err(WriteError::Rejected(e @ uc_crdt::Error::JoinToken { .. })) => {
                tracing::warn!(?remote, machine = %id, "join refused: {e}");
                return Err(Status::permission_denied(format!("join refused: {e}")));
            }
            Err(WriteError::Rejected(e)) => {
                tracing::warn!(?remote, machine = %id, "join refused: {e}");
                return Err(Status::failed_precondition(format!("join refused: {e}")));
            }
            Err(e) => return Err(write_status(e)),
        };
        tracing::info!(machine = %id, name = %machine.name, subnet = %machine.subnet, "machine joined");
        Ok(Response::new(JoinResponse {
            cluster_id: node.cluster_id.clone(),
            document: node.save_document(),
            subnet: machine.subnet.to_string(),
            name: machine.name,
        }))
    }
}

/// What every HTTP/2 connection starts with (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts peer connections and hands on only those that start like HTTP/2;
/// anything else is garbage: counted, logged and closed. (Malformed gRPC
/// inside a good connection is counted by the `Sync` handler.)
pub fn screened_incoming(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) -> ReceiverStream<std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = mpsc::channel(64);
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, go on.
                        tracing::warn!(error = %e, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let tx = tx.clone();
            let node = node.clone();
            inner.spawn(async move {
                let mut buf = [0u8; H2_PREFACE.len()];
                let check = tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let n = stream.peek(&mut buf).await?;
                        if n == 0 || buf[..n] != H2_PREFACE[..n] {
                            return Ok::<bool, std::io::Error>(false);
                        }
                        if n == H2_PREFACE.len() {
                            return Ok(true);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
                .await;
                match check {
                    Ok(Ok(true)) => {
                        // tonic's own `tcp_nodelay` only reaches sockets it accepts itself.
                        // Without it, Nagle and the peer's delayed ACK hold a sync
                        // session's small replies back by 40 ms.
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(%remote, error = %e, "setting TCP_NODELAY");
                        }
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Ok(false)) => {
                        Metrics::inc(&node.metrics.sync_garbage_dropped);
                        tracing::debug!(%remote, "dropped a peer connection that is not HTTP/2");
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "peer connection failed"),
                    Err(_) => {
                        Metrics::inc(&node.metrics.sync_garbage_dropped);
                        tracing::debug!(%remote, "dropped a peer connection that sent no HTTP/2 preface in 5 s");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connected client for a peer's API.
pub fn client(addr: &str) -> anyhow::Result<PeerClient<Channel>> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(PeerClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES))
}

/// Runs one sync session with a peer until neither side has anything to send.
pub async fn sync_session(node: &Node, client: &mut PeerClient<Channel>) -> anyhow::Result<()> {
    let frame = |message: Option<Vec<u8>>| SyncFrame {
        cluster_id: node.cluster_id.clone(),
        from_machine: node.machine_id.to_string(),
        message: message.unwrap_or_default(),
    };
    let mut peer = PeerSync::new();
    let first = node.sync_step(&mut peer, None)?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(frame(first)).await?;
    let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
    for _ in 0..MAX_ROUNDS {
        let reply = inbound
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("peer closed the sync session early"))?;
        let incoming = (!reply.message.is_empty()).then_some(reply.message.as_slice());
        let out = node.sync_step(&mut peer, incoming)?;
        if out.is_none() && incoming.is_none() {
            return Ok(());
        }
        tx.send(frame(out)).await?;
    }
    anyhow::bail!("sync session did not settle after {MAX_ROUNDS} rounds")
}

/// Asks `peer` (its join endpoint) to let this machine join; returns the
/// response with the document.
pub async fn join(peer: &str, request: JoinRequest) -> anyhow::Result<JoinResponse> {
    let endpoint = Endpoint::from_shared(format!("http://{peer}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let mut c = uc_proto::v1::join_client::JoinClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES);
    match c.join(request).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("connect") => {
            anyhow::bail!("cannot reach {peer}: {}", s.message())
        }
        Err(s) => anyhow::bail!("{}", s.message()),
    }
}
