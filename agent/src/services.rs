//! The local API's service and image calls: `uc run` (check, place, write),
//! `uc ps` (the document's containers with what each machine says of them),
//! `uc logs` (merged across machines), `uc scale`, `uc stop|start`, `uc image import|ls`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use uc_crdt::{Container, DesiredState};
use uc_proto::spec::{Mode, PortSpec, ServiceSpec};
use uc_proto::v1::peer_client::PeerClient;
use uc_proto::v1::*;
use uc_proto::{ContainerId, MachineId, ServiceId};
use uc_workload::place::{self, Candidate};

use crate::node::{Liveness, Node, now_ms};
use crate::token;

/// Largest number of replicas one service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// Machine `m`'s peer API address, or the API's "unavailable" while the mesh is not up.
pub fn peer_addr(node: &Node, m: &MachineId) -> Result<String, Status> {
    node.peer_api_addr(m)
        .map(|a| a.to_string())
        .ok_or_else(|| Status::unavailable("the mesh interface is not up yet"))
}

/// The machines as placement sees them: the document's active machines, with
/// liveness, runtimes and memory from gossip (this machine's own from itself).
fn candidates(node: &Node) -> Vec<Candidate> {
    let peers = node.peers();
    let me = node.workloads.get();
    node.read(|doc| doc.machines())
        .into_iter()
        .filter(|m| m.is_active())
        .map(|m| {
            let own = m.id == node.machine_id;
            let p = peers.get(&m.id);
            Candidate {
                live: own || p.is_some_and(|p| p.liveness == Liveness::Live),
                runtimes: if own {
                    me.map(|w| {
                        w.available()
                            .iter()
                            .filter(|(_, a)| a.is_ok())
                            .map(|(k, _)| *k)
                            .collect()
                    })
                } else {
                    p.and_then(|p| p.runtimes.clone())
                        .map(|r| r.into_iter().collect())
                },
                free_memory: if own {
                    crate::membership::mem_available().parse().ok()
                } else {
                    p.and_then(|p| p.free_memory)
                },
                id: m.id,
                name: m.name,
                subnet: m.subnet,
            }
        })
        .collect()
}

/// The machines where `service`, publishing `ports`, cannot have a container, each with why:
/// another service's container there (stopped ones too, until removed) holds a clashing host
/// port.
pub fn port_blocked(
    doc: &uc_crdt::ClusterState,
    ports: &[uc_proto::spec::HostPort],
    service: &ServiceId,
) -> BTreeMap<MachineId, String> {
    if ports.is_empty() {
        return BTreeMap::new();
    }
    place::port_clashes(ports, &taken_ports(doc, service))
}

/// The host ports held on each machine by the containers there, except `except`'s.
fn taken_ports(doc: &uc_crdt::ClusterState, except: &ServiceId) -> place::TakenPorts {
    let services: BTreeMap<ServiceId, (String, Vec<uc_proto::spec::HostPort>)> = doc
        .services()
        .into_iter()
        .filter(|s| &s.id != except)
        .filter_map(|s| {
            let ports = ServiceSpec::from_json(&s.spec).ok()?.held_ports();
            (!ports.is_empty()).then_some((s.id, (s.name, ports)))
        })
        .collect();
    let mut out = place::TakenPorts::new();
    for c in doc.containers() {
        if let Some((name, ports)) = services.get(&c.service) {
            let held = out.entry(c.machine.clone()).or_default();
            for p in ports {
                if !held.iter().any(|(h, _)| h == p) {
                    held.push((*p, name.clone()));
                }
            }
        }
    }
    out
}

/// Checks a spec as `uc run` sends it; every problem is a clear error.
pub fn check_spec(name: &str, spec_json: &str) -> Result<ServiceSpec, Status> {
    uc_crdt::check_name("service", name).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let spec: ServiceSpec = serde_json::from_str(spec_json)
        .map_err(|e| Status::invalid_argument(format!("service spec is not valid: {e}")))?;
    uc_workload::image::check_image_name(&spec.image)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    for p in &spec.ports {
        p.parse::<PortSpec>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let host_ports = spec.host_ports();
    for (i, (a, _)) in host_ports.iter().enumerate() {
        if a.ip.is_some_and(|ip| ip.is_ipv6()) {
            return Err(Status::invalid_argument(format!(
                "host port {a}: publishing on an IPv6 address is not supported yet"
            )));
        }
        if let Some((b, _)) = host_ports[..i].iter().find(|(b, _)| a.clashes(b)) {
            return Err(Status::invalid_argument(format!(
                "host port {a} is given twice (also as {b})"
            )));
        }
    }
    if let Mode::Replicated { replicas } = spec.mode
        && replicas > MAX_REPLICAS
    {
        return Err(Status::invalid_argument(format!(
            "{replicas} replicas is more than {MAX_REPLICAS}"
        )));
    }
    if let Some(c) = spec.cpu
        && !(c > 0.0 && c <= 1024.0)
    {
        return Err(Status::invalid_argument(format!(
            "cpu {c} must be more than 0"
        )));
    }
    if spec.runtime == uc_proto::spec::RuntimeKind::Vm {
        uc_workload::vm::guest_memory(spec.memory)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    for k in &spec.ssh_keys {
        uc_proto::spec::check_ssh_key(k).map_err(Status::invalid_argument)?;
    }
    for k in spec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "environment variable name {k:?} is not valid"
            )));
        }
    }
    Ok(spec)
}

pub async fn run_service(node: &Node, r: RunServiceRequest) -> Result<RunServiceResponse, Status> {
    let mut spec = check_spec(&r.name, &r.spec_json)?;
    if let Some(s) = node.read(|doc| doc.service_by_name(&r.name)) {
        return Err(Status::already_exists(format!(
            "service {:?} already exists (id {}); remove it first with uc rm {}",
            r.name,
            s.id.short(),
            r.name
        )));
    }
    // The image must be somewhere: here, or on a live machine that says so.
    let here = node.workloads()?.images.get(&spec.image).is_some();
    let peers = node.peers();
    let elsewhere = peers
        .values()
        .any(|p| p.liveness == Liveness::Live && p.images.iter().any(|i| i == &spec.image));
    if !here && !elsewhere {
        let mut known: BTreeSet<String> = node
            .workloads()?
            .images
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.name)
            .collect();
        known.extend(peers.values().flat_map(|p| p.images.iter().cloned()));
        return Err(Status::not_found(format!(
            "image {:?} not found on any machine; images: {}; add it with uc image import FILE",
            spec.image,
            if known.is_empty() {
                "none".into()
            } else {
                known.into_iter().collect::<Vec<_>>().join(", ")
            }
        )));
    }
    let all = candidates(node);
    let eligible = place::eligible(&all, &spec.machines, spec.runtime)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    // Keep machine ids in the spec, so a rename does not change placement.
    if !spec.machines.is_empty() {
        spec.machines = eligible.iter().map(|c| c.id.to_string()).collect();
    }
    let service = ServiceId::from_bytes(token::random16());
    let count = match spec.mode {
        Mode::Replicated { replicas } => replicas as usize,
        Mode::Global => eligible.len(),
    };
    let host_ports = spec.held_ports();
    let (existing, blocked) =
        node.read(|doc| (doc.containers(), port_blocked(doc, &host_ports, &service)));
    let placed = if spec.mode == Mode::Global {
        // One per eligible machine.
        let mut out = Vec::new();
        let mut used: BTreeSet<_> = existing.iter().filter_map(|c| c.address).collect();
        for c in &eligible {
            if let Some(why) = blocked.get(&c.id) {
                return Err(Status::failed_precondition(
                    place::PlaceError::HostPortTaken {
                        name: c.name.clone(),
                        ports: place::ports_text(&host_ports),
                        why: why.clone(),
                    }
                    .to_string(),
                ));
            }
            let a = place::free_address(c.subnet, &used).ok_or_else(|| {
                Status::failed_precondition(
                    place::PlaceError::SubnetFull {
                        name: c.name.clone(),
                        subnet: c.subnet,
                    }
                    .to_string(),
                )
            })?;
            used.insert(a);
            out.push((c.id.clone(), a));
        }
        out
    } else {
        place::place(
            &eligible,
            &existing,
            &service,
            count,
            spec.memory,
            &host_ports,
            &blocked,
        )
        .map_err(|e| Status::failed_precondition(e.to_string()))?
    };
    let names: BTreeMap<MachineId, String> =
        all.iter().map(|c| (c.id.clone(), c.name.clone())).collect();
    let now = now_ms();
    let containers = new_containers(&service, placed, now);
    let spec_json = spec.to_json();
    let written = containers.clone();
    let name = r.name.clone();
    let sid = service.clone();
    tokio::task::block_in_place(|| {
        node.write(move |doc| {
            doc.put_service(sid, &name, spec_json, now)?;
            for c in written {
                doc.put_container(c)?;
            }
            Ok(())
        })
    })
    .map_err(|e| match e {
        crate::node::WriteError::Rejected(e @ uc_crdt::Error::NameTaken { .. }) => {
            Status::already_exists(e.to_string())
        }
        e => Status::failed_precondition(e.to_string()),
    })?;
    if let Some(w) = node.workloads.get() {
        w.kick();
    }
    Ok(RunServiceResponse {
        id: service.to_string(),
        name: r.name,
        containers: containers
            .iter()
            .map(|c| container_info(c, service.as_str(), &names))
            .collect(),
    })
}

/// New running containers of `service` where placement put them.
fn new_containers(
    service: &ServiceId,
    placed: Vec<(MachineId, std::net::Ipv4Addr)>,
    now: u64,
) -> Vec<Container> {
    placed
        .into_iter()
        .map(|(machine, address)| Container {
            id: ContainerId::from_bytes(token::random16()),
            service: service.clone(),
            machine,
            address: Some(address),
            desired: DesiredState::Running,
            created_at_ms: now,
        })
        .collect()
}

fn container_info(
    c: &Container,
    service: &str,
    names: &BTreeMap<MachineId, String>,
) -> ContainerInfo {
    ContainerInfo {
        id: c.id.to_string(),
        service: service.to_owned(),
        machine: names.get(&c.machine).cloned().unwrap_or_default(),
        machine_id: c.machine.to_string(),
        address: c.address.map(|a| a.to_string()).unwrap_or_default(),
        desired: match c.desired {
            DesiredState::Running => "running".into(),
            DesiredState::Stopped => "stopped".into(),
        },
        status: None,
    }
}

/// The service named `name` and its containers, or "not found" listing the services.
pub(crate) fn service_and_containers(
    node: &Node,
    name: &str,
) -> Result<(uc_crdt::Service, Vec<Container>), Status> {
    node.read(|doc| {
        let Some(s) = doc.service_by_name(name) else {
            let services = doc.services().into_iter().map(|s| (s.id, s.name)).collect();
            return Err(service_not_found(&services, name));
        };
        let containers = doc
            .containers()
            .into_iter()
            .filter(|c| c.service == s.id)
            .collect();
        Ok((s, containers))
    })
}

fn write_status(e: crate::node::WriteError) -> Status {
    Status::failed_precondition(e.to_string())
}

/// `uc scale`: places the new containers like `uc run` does, or removes the ones
/// [`place::pick_to_remove`] picks; the spec's replica count changes in the same write.
pub async fn scale_service(
    node: &Node,
    r: ScaleServiceRequest,
) -> Result<ScaleServiceResponse, Status> {
    if r.replicas > MAX_REPLICAS {
        return Err(Status::invalid_argument(format!(
            "{} replicas is more than {MAX_REPLICAS}",
            r.replicas
        )));
    }
    let (service, containers) = service_and_containers(node, &r.name)?;
    let mut spec = ServiceSpec::from_json(&service.spec)
        .map_err(|e| Status::failed_precondition(format!("the service's spec: {e}")))?;
    if spec.mode == Mode::Global {
        return Err(Status::failed_precondition(format!(
            "service {:?} is global: it runs one container on every machine; only replicated \
             services scale",
            r.name
        )));
    }
    spec.mode = Mode::Replicated {
        replicas: r.replicas,
    };
    let all = candidates(node);
    let names: BTreeMap<MachineId, String> =
        all.iter().map(|c| (c.id.clone(), c.name.clone())).collect();
    let want = r.replicas as usize;
    let now = now_ms();
    let (added, removed): (Vec<Container>, Vec<Container>) = if want > containers.len() {
        let eligible = place::eligible(&all, &spec.machines, spec.runtime)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let host_ports = spec.held_ports();
        let (existing, blocked) = node.read(|doc| {
            (
                doc.containers(),
                port_blocked(doc, &host_ports, &service.id),
            )
        });
        let placed = place::place(
            &eligible,
            &existing,
            &service.id,
            want - containers.len(),
            spec.memory,
            &host_ports,
            &blocked,
        )
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        (new_containers(&service.id, placed, now), Vec::new())
    } else {
        let live: BTreeSet<MachineId> = all
            .iter()
            .filter(|c| c.live)
            .map(|c| c.id.clone())
            .collect();
        let gone = place::pick_to_remove(&containers, &live, containers.len() - want);
        let removed = containers
            .into_iter()
            .filter(|c| gone.contains(&c.id))
            .collect();
        (Vec::new(), removed)
    };
    let (write_added, write_removed) = (added.clone(), removed.clone());
    let spec_json = spec.to_json();
    let (sid, name) = (service.id.clone(), service.name.clone());
    tokio::task::block_in_place(|| {
        node.write(move |doc| {
            doc.put_service(sid, &name, spec_json, now)?;
            for c in write_added {
                doc.put_container(c)?;
            }
            for c in write_removed {
                doc.remove_container(&c.id)?;
            }
            Ok(())
        })
    })
    .map_err(write_status)?;
    if let Some(w) = node.workloads.get() {
        w.kick();
    }
    Ok(ScaleServiceResponse {
        added: added
            .iter()
            .map(|c| container_info(c, &service.name, &names))
            .collect(),
        removed: removed
            .iter()
            .map(|c| container_info(c, &service.name, &names))
            .collect(),
    })
}

/// `uc stop|start`: every container of the service keeps its place and address; its
/// machine stops or starts it.
pub async fn set_service_running(
    node: &Node,
    r: SetServiceRunningRequest,
) -> Result<SetServiceRunningResponse, Status> {
    let (_, containers) = service_and_containers(node, &r.name)?;
    let want = if r.running {
        DesiredState::Running
    } else {
        DesiredState::Stopped
    };
    let total = containers.len() as u32;
    let changing: Vec<Container> = containers
        .into_iter()
        .filter(|c| c.desired != want)
        .map(|c| Container { desired: want, ..c })
        .collect();
    let changed = changing.len() as u32;
    if changed > 0 {
        tokio::task::block_in_place(|| {
            node.write(move |doc| {
                for c in changing {
                    doc.put_container(c)?;
                }
                Ok(())
            })
        })
        .map_err(write_status)?;
        if let Some(w) = node.workloads.get() {
            w.kick();
        }
    }
    Ok(SetServiceRunningResponse {
        changed,
        containers: total,
    })
}

/// What each machine that holds containers says of them, asked in parallel.
async fn statuses(
    node: &Node,
    machines: BTreeSet<MachineId>,
) -> BTreeMap<ContainerId, WorkloadStatus> {
    let mut tasks = tokio::task::JoinSet::new();
    for m in machines {
        if m == node.machine_id {
            let w = node.workloads.get().cloned();
            tasks.spawn(async move {
                match w {
                    Some(w) => w.statuses().await,
                    None => Vec::new(),
                }
            });
            continue;
        }
        let Ok(addr) = peer_addr(node, &m) else {
            continue;
        };
        tasks.spawn(async move {
            let ask = async {
                let mut c: PeerClient<_> = crate::peer::client(&addr).ok()?;
                let r = c.list_workloads(ListWorkloadsRequest {}).await.ok()?;
                Some(r.into_inner().workloads)
            };
            tokio::time::timeout(Duration::from_secs(3), ask)
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        });
    }
    let mut out = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        for s in r.unwrap_or_default() {
            if let Ok(id) = s.container_id.parse() {
                out.insert(id, s);
            }
        }
    }
    out
}

pub async fn list_containers(node: &Node, service: &str) -> Result<ListContainersResponse, Status> {
    let (containers, services, names) = node.read(|doc| {
        let services: BTreeMap<ServiceId, String> =
            doc.services().into_iter().map(|s| (s.id, s.name)).collect();
        let names: BTreeMap<MachineId, String> =
            doc.machines().into_iter().map(|m| (m.id, m.name)).collect();
        (doc.containers(), services, names)
    });
    if !service.is_empty() && !services.values().any(|n| n == service) {
        return Err(service_not_found(&services, service));
    }
    let containers: Vec<Container> = containers
        .into_iter()
        .filter(|c| {
            service.is_empty() || services.get(&c.service).map(String::as_str) == Some(service)
        })
        .collect();
    let st = statuses(node, containers.iter().map(|c| c.machine.clone()).collect()).await;
    Ok(ListContainersResponse {
        containers: containers
            .into_iter()
            .map(|c| ContainerInfo {
                status: Some(st.get(&c.id).cloned().unwrap_or_else(|| WorkloadStatus {
                    container_id: c.id.to_string(),
                    state: "unknown".into(),
                    ..Default::default()
                })),
                ..container_info(
                    &c,
                    services.get(&c.service).map_or("", String::as_str),
                    &names,
                )
            })
            .collect(),
    })
}

fn service_not_found(services: &BTreeMap<ServiceId, String>, name: &str) -> Status {
    let mut names: Vec<&str> = services.values().map(String::as_str).collect();
    names.sort();
    Status::not_found(format!(
        "service {name:?} not found; services: {}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    ))
}

/// A service's logs: each machine's lines (sorted by time there), merged by time.
pub async fn logs(
    node: &Node,
    r: LogsRequest,
) -> Result<mpsc::Receiver<Result<LogLine, Status>>, Status> {
    let (containers, services) = node.read(|doc| {
        let services: BTreeMap<ServiceId, String> =
            doc.services().into_iter().map(|s| (s.id, s.name)).collect();
        (doc.containers(), services)
    });
    let Some(svc) = services
        .iter()
        .find(|(_, n)| **n == r.service)
        .map(|(id, _)| id.clone())
    else {
        return Err(service_not_found(&services, &r.service));
    };
    let mut by_machine: BTreeMap<MachineId, Vec<String>> = BTreeMap::new();
    for c in containers.into_iter().filter(|c| c.service == svc) {
        by_machine
            .entry(c.machine)
            .or_default()
            .push(c.id.to_string());
    }
    let (tx, rx) = mpsc::channel(256);
    let mut streams = Vec::new();
    for (m, ids) in by_machine {
        let req = LogsRequest {
            service: String::new(),
            container_ids: ids,
            tail: r.tail,
            follow: r.follow,
        };
        let addr = peer_addr(node, &m)?;
        streams.push(async move {
            let mut c =
                crate::peer::client(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
            Ok::<_, Status>(c.workload_logs(req).await?.into_inner())
        });
    }
    let opened = futures::future::join_all(streams).await;
    let follow = r.follow;
    let tail = r.tail as usize;
    tokio::spawn(async move {
        let mut live = Vec::new();
        for s in opened {
            match s {
                Ok(s) => live.push(s),
                Err(e) => {
                    let _ = tx
                        .send(Ok(LogLine {
                            unix_ms: now_ms(),
                            stream: "s".into(),
                            text: format!("uc: a machine's logs are missing: {}", e.message()),
                            ..Default::default()
                        }))
                        .await;
                }
            }
        }
        // First the tails, merged by time.
        let mut first: Vec<LogLine> = Vec::new();
        let mut rest: Vec<Streaming<LogLine>> = Vec::new();
        for mut s in live {
            if !follow {
                while let Ok(Some(l)) = s.message().await {
                    first.push(l);
                }
            } else {
                rest.push(s);
            }
        }
        first.sort_by_key(|l| l.unix_ms);
        if tail > 0 && first.len() > tail {
            first.drain(..first.len() - tail);
        }
        for l in first {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        // Then, following, lines as they come from each machine.
        let mut merged = futures::stream::select_all(rest);
        use futures::StreamExt;
        while let Some(Ok(l)) = merged.next().await {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

pub async fn import_image(
    node: &Node,
    mut s: Streaming<ImportImageChunk>,
) -> Result<ImageInfo, Status> {
    let w = node.workloads()?;
    let first = s
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("no image data"))?;
    let name = (!first.name.is_empty()).then(|| first.name.clone());
    if let Some(n) = &name {
        uc_workload::image::check_image_name(n)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let fallback = fallback_name(&first.file_name);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let images = w.images.clone();
    let import = tokio::task::spawn_blocking(move || {
        images.import(
            crate::workloads::ChannelReader::new(rx),
            name.as_deref(),
            &fallback,
            now_ms(),
        )
    });
    let mut chunk = Some(first.data);
    loop {
        if let Some(c) = chunk.take()
            && !c.is_empty()
            && tx.send(c).is_err()
        {
            break;
        }
        match s.message().await {
            Ok(Some(m)) => chunk = Some(m.data),
            Ok(None) => break,
            Err(e) => {
                drop(tx);
                let _ = import.await;
                return Err(e);
            }
        }
    }
    drop(tx);
    let meta = import
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    w.images_changed();
    tracing::info!(image = %meta.name, bytes = meta.size_bytes, "image imported");
    Ok(info(&meta, vec![node.config.name.clone()]))
}

/// An image name from a file name: `demo.tar.gz` -> `demo`, lower-cased, bad characters as '-'.
fn fallback_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let mut stem = base;
    for ext in [".tar.gz", ".tgz", ".tar", ".oci", ".gz"] {
        if let Some(s) = stem.strip_suffix(ext) {
            stem = s;
            break;
        }
    }
    let cleaned: String = stem
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '_', '-']).to_string();
    if cleaned.is_empty() {
        "image".into()
    } else {
        cleaned
    }
}

fn info(m: &uc_workload::image::ImageMeta, machines: Vec<String>) -> ImageInfo {
    ImageInfo {
        name: m.name.clone(),
        digest: m.digest.clone(),
        size_bytes: m.size_bytes,
        created_unix_ms: m.created_ms,
        machines,
        cmd: m.cmd.join(" "),
    }
}

/// This machine's images in full, and which other machines say they have them.
pub fn list_images(node: &Node) -> Result<ListImagesResponse, Status> {
    let w = node.workloads()?;
    let names: BTreeMap<MachineId, String> =
        node.read(|doc| doc.machines().into_iter().map(|m| (m.id, m.name)).collect());
    let mut out: BTreeMap<String, ImageInfo> = BTreeMap::new();
    for m in w
        .images
        .list()
        .map_err(|e| Status::internal(e.to_string()))?
    {
        out.insert(m.name.clone(), info(&m, vec![node.config.name.clone()]));
    }
    for (id, p) in node.peers() {
        if p.liveness == Liveness::Dead {
            continue;
        }
        let machine = names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.short().to_string());
        for i in p.images {
            out.entry(i.clone())
                .or_insert_with(|| ImageInfo {
                    name: i,
                    ..Default::default()
                })
                .machines
                .push(machine.clone());
        }
    }
    Ok(ListImagesResponse {
        images: out
            .into_values()
            .map(|mut i| {
                i.machines.sort();
                i
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_become_image_names() {
        assert_eq!(fallback_name("/tmp/Demo.tar.gz"), "demo");
        assert_eq!(fallback_name("my image.tar"), "my-image");
        assert_eq!(fallback_name("..."), "image");
    }

    #[test]
    fn specs_are_checked() {
        let ok = r#"{"image":"demo","runtime":"nspawn","mode":"replicated","replicas":2}"#;
        assert!(check_spec("web", ok).is_ok());
        let bad_port = r#"{"image":"demo","runtime":"nspawn","mode":"global","ports":["80/sctp"]}"#;
        let e = check_spec("web", bad_port).unwrap_err();
        assert!(e.message().contains("protocol \"sctp\""), "{}", e.message());
        let e = check_spec("Web!", ok).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = check_spec("web", r#"{"image":"demo"}"#).unwrap_err();
        assert!(e.message().contains("not valid"), "{}", e.message());
        let many = r#"{"image":"demo","runtime":"nspawn","mode":"replicated","replicas":5000}"#;
        assert!(check_spec("web", many).is_err());
    }
}
