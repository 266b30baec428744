//! The local API (gRPC over a Unix socket in the data directory, mode 0660),
//! used by `uc`. Commands that depend on the cluster state wait until this
//! replica has caught up.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use uc_crdt::MachineState;
use uc_proto::ServiceId;
use uc_proto::v1::api_server::Api;
use uc_proto::v1::*;

use crate::membership::GOSSIP_GARBAGE;
use crate::node::{Liveness, Node, WriteError, now_ms};
use crate::token;

pub struct ApiService {
    pub node: Arc<Node>,
}

const READY_WAIT: Duration = Duration::from_secs(30);

impl ApiService {
    async fn ready(&self) -> Result<(), Status> {
        if self.node.wait_ready(READY_WAIT).await {
            Ok(())
        } else {
            Err(Status::unavailable(
                "this machine is still catching up with the cluster; try again shortly",
            ))
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&mut uc_crdt::ClusterState) -> Result<T, uc_crdt::Error>,
    ) -> Result<T, Status> {
        tokio::task::block_in_place(|| self.node.write(f)).map_err(|e| match e {
            WriteError::Rejected(e) => match e {
                uc_crdt::Error::NameTaken { .. } => Status::already_exists(e.to_string()),
                _ => Status::failed_precondition(e.to_string()),
            },
            WriteError::Store(e) => Status::internal(e.to_string()),
        })
    }

    /// The active machine called `name_or_id` (its name, or its id).
    fn active_machine(&self, name_or_id: &str) -> Result<uc_crdt::Machine, Status> {
        self.node
            .read(|doc| {
                doc.machine_by_name(name_or_id)
                    .or_else(|| name_or_id.parse().ok().and_then(|id| doc.machine(&id)))
            })
            .filter(|m| m.is_active())
            .ok_or_else(|| self.machine_not_found(name_or_id))
    }

    /// Where machine `m`'s peer API listens: its management address.
    fn peer_api_of(&self, m: &uc_crdt::Machine) -> Result<String, Status> {
        crate::services::peer_addr(&self.node, &m.id)
    }

    fn machine_not_found(&self, name: &str) -> Status {
        let names: Vec<String> = self.node.read(|doc| {
            doc.machines()
                .into_iter()
                .filter(|m| m.state == MachineState::Active)
                .map(|m| m.name)
                .collect()
        });
        Status::not_found(format!(
            "machine {name:?} not found; machines: {}",
            names.join(", ")
        ))
    }
}

type HeadsStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<HeadsEvent, Status>> + Send>>;

type LogStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<LogLine, Status>> + Send>>;

#[tonic::async_trait]
impl Api for ApiService {
    type WatchHeadsStream = HeadsStream;
    type LogsStream = LogStream;

    async fn run_service(
        &self,
        request: Request<RunServiceRequest>,
    ) -> Result<Response<RunServiceResponse>, Status> {
        self.ready().await?;
        crate::services::run_service(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn scale_service(
        &self,
        request: Request<ScaleServiceRequest>,
    ) -> Result<Response<ScaleServiceResponse>, Status> {
        self.ready().await?;
        crate::services::scale_service(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn set_service_running(
        &self,
        request: Request<SetServiceRunningRequest>,
    ) -> Result<Response<SetServiceRunningResponse>, Status> {
        self.ready().await?;
        crate::services::set_service_running(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        self.ready().await?;
        crate::services::list_containers(&self.node, &request.into_inner().service)
            .await
            .map(Response::new)
    }

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<LogStream>, Status> {
        self.ready().await?;
        let rx = crate::services::logs(&self.node, request.into_inner()).await?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ExecStream = crate::exec::OutputStream;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.ready().await?;
        crate::exec::api_exec(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn import_image(
        &self,
        request: Request<tonic::Streaming<ImportImageChunk>>,
    ) -> Result<Response<ImageInfo>, Status> {
        crate::services::import_image(&self.node, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_images(
        &self,
        _: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        crate::services::list_images(&self.node).map(Response::new)
    }

    async fn watch_heads(
        &self,
        _: Request<WatchHeadsRequest>,
    ) -> Result<Response<HeadsStream>, Status> {
        let rx = self.node.subscribe_heads();
        let stream = tokio_stream::wrappers::WatchStream::new(rx)
            .map(|heads_digest| Ok(HeadsEvent { heads_digest }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let n = &self.node;
        let m = &n.metrics;
        Ok(Response::new(StatusResponse {
            machine_id: n.machine_id.to_string(),
            machine_name: n
                .read(|doc| doc.machine(&n.machine_id).map(|m| m.name))
                .unwrap_or_default(),
            cluster_id: n.cluster_id.clone(),
            ready: n.is_ready(),
            heads_digest: n.heads(),
            gossip_garbage_dropped: GOSSIP_GARBAGE.load(Ordering::Relaxed),
            sync_garbage_dropped: m.sync_garbage_dropped.load(Ordering::Relaxed),
            gossip_datagrams_received: 0,
            sync_sessions_ok: m.sync_sessions_ok.load(Ordering::Relaxed),
            sync_sessions_failed: m.sync_sessions_failed.load(Ordering::Relaxed),
            data_dir: n.config.data_dir.display().to_string(),
        }))
    }

    async fn list_machines(
        &self,
        _: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        self.ready().await?;
        let n = &self.node;
        let peers = n.peers();
        let mesh = n.mesh.get();
        let machines = n.read(|doc| doc.machines());
        let now = now_ms();
        let machines = machines
            .into_iter()
            .map(|m| {
                let is_self = m.id == n.machine_id;
                let (liveness, last_seen) = if is_self {
                    ("self".to_string(), now)
                } else if m.state == MachineState::Removed {
                    ("removed".to_string(), 0)
                } else {
                    let p = peers.get(&m.id);
                    (
                        p.map(|p| p.liveness)
                            .unwrap_or(Liveness::Unknown)
                            .as_str()
                            .to_string(),
                        p.map(|p| p.last_seen_unix_ms).unwrap_or(0),
                    )
                };
                let (v4, v6) = mesh
                    .map(|mesh| mesh.addresses_of(m.subnet))
                    .unwrap_or((None, None));
                let mesh_backend = if is_self {
                    mesh.map(|x| x.backend.as_str().to_string())
                } else {
                    peers.get(&m.id).and_then(|p| p.mesh_backend.clone())
                };
                let runtimes: Vec<String> = if is_self {
                    n.workloads()
                        .map(|w| {
                            w.available()
                                .into_iter()
                                .filter(|(_, a)| a.is_ok())
                                .map(|(k, _)| k.as_str().to_string())
                                .collect()
                        })
                        .unwrap_or_default()
                } else {
                    peers
                        .get(&m.id)
                        .and_then(|p| p.runtimes.as_ref())
                        .map(|r| r.iter().map(|k| k.as_str().to_string()).collect())
                        .unwrap_or_default()
                };
                let management = mesh
                    .map(|mesh| mesh.management_of(m.id.as_str()).to_string())
                    .unwrap_or_default();
                MachineInfo {
                    runtimes,
                    mesh_management_address: management,
                    mesh_address: v4.map(|a| a.to_string()).unwrap_or_default(),
                    mesh_address_v6: v6.map(|a| a.to_string()).unwrap_or_default(),
                    mesh_backend: mesh_backend.unwrap_or_default(),
                    id: m.id.to_string(),
                    name: m.name,
                    subnet: m.subnet.to_string(),
                    liveness,
                    endpoints: m.endpoints,
                    last_seen_unix_ms: last_seen,
                    tags: m.tags.into_iter().collect(),
                    public_key: m.public_key,
                    state: match m.state {
                        MachineState::Active => "active".into(),
                        MachineState::Removed => "removed".into(),
                    },
                    is_self,
                }
            })
            .collect();
        Ok(Response::new(ListMachinesResponse { machines }))
    }

    async fn dump_state(
        &self,
        _: Request<DumpStateRequest>,
    ) -> Result<Response<DumpStateResponse>, Status> {
        self.ready().await?;
        let json = self.node.read(|doc| doc.to_json());
        Ok(Response::new(DumpStateResponse {
            json: serde_json::to_string_pretty(&json)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        self.ready().await?;
        let ttl = match request.into_inner().ttl_seconds {
            0 => 600,
            t if t > 24 * 3600 => {
                return Err(Status::invalid_argument(
                    "a join token may live at most 24 hours",
                ));
            }
            t => t,
        };
        let token = token::generate().map_err(|e| Status::internal(e.to_string()))?;
        let expires = now_ms() + ttl * 1000;
        let hash = token::hash(&token);
        self.write(|doc| doc.add_join_token(&hash, expires))?;
        Ok(Response::new(CreateJoinTokenResponse {
            token,
            expires_unix_ms: expires,
            peer_addresses: vec![self.node.config.join_addr().to_string()],
        }))
    }

    async fn put_service(
        &self,
        request: Request<PutServiceRequest>,
    ) -> Result<Response<PutServiceResponse>, Status> {
        self.ready().await?;
        let r = request.into_inner();
        uc_crdt::check_name("service", &r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec: serde_json::Value = if r.spec_json.trim().is_empty() {
            serde_json::json!({})
        } else {
            serde_json::from_str(&r.spec_json).map_err(|e| {
                Status::invalid_argument(format!("service spec is not valid JSON: {e}"))
            })?
        };
        if !spec.is_object() {
            return Err(Status::invalid_argument(
                "service spec must be a JSON object",
            ));
        }
        let fresh = ServiceId::from_bytes(token::random16());
        let svc = self.write(|doc| {
            let id = doc.service_by_name(&r.name).map(|s| s.id).unwrap_or(fresh);
            doc.put_service(id, &r.name, spec, now_ms())
        })?;
        Ok(Response::new(PutServiceResponse {
            id: svc.id.to_string(),
            name: svc.name,
        }))
    }

    async fn remove_service(
        &self,
        request: Request<RemoveServiceRequest>,
    ) -> Result<Response<RemoveServiceResponse>, Status> {
        self.ready().await?;
        let name = request.into_inner().name;
        let id = self
            .node
            .read(|doc| doc.service_by_name(&name).map(|s| s.id))
            .ok_or_else(|| Status::not_found(format!("service {name:?} not found")))?;
        self.write(|doc| doc.remove_service(&id))?;
        Ok(Response::new(RemoveServiceResponse { id: id.to_string() }))
    }

    async fn ingress_list(
        &self,
        _: Request<IngressListRequest>,
    ) -> Result<Response<IngressListResponse>, Status> {
        self.ready().await?;
        let ingress = self
            .node
            .ingress
            .get()
            .ok_or_else(|| Status::unavailable("the ingress is not started yet"))?;
        let json = serde_json::to_string_pretty(&ingress.listing())
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(IngressListResponse { json }))
    }

    async fn tag_machine(
        &self,
        request: Request<TagMachineRequest>,
    ) -> Result<Response<TagMachineResponse>, Status> {
        self.ready().await?;
        let r = request.into_inner();
        let id = self.active_machine(&r.machine)?.id;
        crate::config::validate_tag(&r.tag).map_err(Status::invalid_argument)?;
        self.write(|doc| doc.set_machine_tag(&id, &r.tag, !r.remove))?;
        Ok(Response::new(TagMachineResponse {}))
    }

    async fn dns_lookup(
        &self,
        request: Request<DnsLookupRequest>,
    ) -> Result<Response<DnsLookupResponse>, Status> {
        let r = request.into_inner();
        let server = if r.machine.is_empty() {
            self.node
                .dns()
                .ok_or_else(|| Status::unavailable("this machine's DNS server is not running"))?
        } else {
            self.ready().await?;
            let m = self.active_machine(&r.machine)?;
            let mesh = self
                .node
                .mesh
                .get()
                .ok_or_else(|| Status::unavailable("the mesh interface is not up yet"))?;
            let v4 = mesh.addresses_of(m.subnet).0.ok_or_else(|| {
                Status::failed_precondition(format!("{} has no mesh address", m.name))
            })?;
            std::net::SocketAddr::new(v4.into(), self.node.config.dns_port)
        };
        let rtype = if r.record_type.is_empty() {
            "A".to_string()
        } else {
            r.record_type.to_ascii_uppercase()
        };
        let t0 = std::time::Instant::now();
        let answer = crate::dns::query(server, &r.name, &rtype)
            .await
            .map_err(|e| Status::unavailable(format!("asking {server}: {e:#}")))?;
        Ok(Response::new(DnsLookupResponse {
            response_code: answer.0,
            answers: answer.1,
            authorities: answer.2,
            server: server.to_string(),
            milliseconds: t0.elapsed().as_secs_f64() * 1000.0,
        }))
    }

    async fn rename_machine(
        &self,
        request: Request<RenameMachineRequest>,
    ) -> Result<Response<RenameMachineResponse>, Status> {
        self.ready().await?;
        let r = request.into_inner();
        let m = self.active_machine(&r.machine)?;
        uc_crdt::check_name("machine", &r.new_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.write(|doc| doc.rename_machine(&m.id, &r.new_name))?;
        tracing::info!(machine = %m.id, old = %m.name, new = %r.new_name, "machine renamed");
        Ok(Response::new(RenameMachineResponse {
            id: m.id.to_string(),
            old_name: m.name,
            new_name: r.new_name,
        }))
    }

    async fn remove_machine(
        &self,
        request: Request<RemoveMachineRequest>,
    ) -> Result<Response<RemoveMachineResponse>, Status> {
        self.ready().await?;
        let r = request.into_inner();
        let m = self.active_machine(&r.machine)?;
        if m.id == self.node.machine_id {
            return Err(Status::failed_precondition(format!(
                "{} is the machine answering this command; run `uc machine rm {}` on another machine",
                m.name, m.name
            )));
        }
        self.write(|doc| doc.remove_machine(&m.id))?;
        tracing::info!(machine = %m.id, name = %m.name, "machine removed from the cluster");
        // Tell the removed machine at once, while the mesh still carries it
        // (it stays a peer for a short grace), so it drops its own peers.
        if let Ok(addr) = self.peer_api_of(&m) {
            let node = self.node.clone();
            tokio::spawn(async move {
                let Ok(mut client) = crate::peer::client(&addr) else {
                    return;
                };
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    crate::peer::sync_session(&node, &mut client),
                )
                .await;
                if !matches!(r, Ok(Ok(()))) {
                    tracing::info!(%addr, "could not tell the removed machine; it learns when it next syncs");
                }
            });
        }
        Ok(Response::new(RemoveMachineResponse {
            id: m.id.to_string(),
            name: m.name,
        }))
    }

    async fn wg_show(
        &self,
        request: Request<WgShowRequest>,
    ) -> Result<Response<WgShowResponse>, Status> {
        let r = request.into_inner();
        let n = &self.node;
        if r.machine.is_empty() || r.machine == n.config.name || r.machine == n.machine_id.as_str()
        {
            return crate::peer::wg_show_local(n).map(Response::new);
        }
        self.ready().await?;
        let m = self.active_machine(&r.machine)?;
        let addr = self.peer_api_of(&m)?;
        let mut client = crate::peer::client(&addr).map_err(|e| Status::internal(e.to_string()))?;
        let answer = client
            .wg_show(WgShowRequest::default())
            .await
            .map_err(|s| {
                Status::unavailable(format!(
                    "machine {} did not answer over the mesh at {addr}: {}",
                    m.name,
                    s.message()
                ))
            })?;
        Ok(answer)
    }
}
