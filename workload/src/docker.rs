//! The Docker runtime: OCI containers run by the machine's Docker Engine,
//! through its API (bollard, with the API version negotiated: Debian's
//! dockerd speaks 1.41).
//!
//! - Network: one Docker bridge network, `uc`, per machine, on the machine's
//!   /24 with 10.210.X.1 as gateway. It is the same Linux bridge as the other
//!   runtimes' (`ucbr0`, made first by [`net::ensure_bridge`], so Docker
//!   neither owns nor deletes it), without masquerading: containers of every
//!   runtime and machine reach each other by their mesh addresses, unNATed.
//!   dockerd sets the FORWARD policy to DROP and accepts new connections into
//!   its bridges only for published ports, so as soon as the engine is seen,
//!   rules appended to FORWARD (after Docker's chains, `DOCKER-USER`
//!   included) accept mesh to bridge, bridge to mesh, bridge to bridge, and
//!   connections to host ports (destination-NATed, see `ports.rs`).
//! - Images: uc's image store is the source. The first container of an image
//!   imports its root filesystem into the engine (`docker import`, with the
//!   image's command, environment and working directory) as
//!   `uc/NAME:TAG-DIGEST`; later ones start from the engine's copy.
//! - Bookkeeping: the engine's. Each container carries labels (`uc.id`,
//!   `uc.service`, `uc.digest`, `uc.address`, `uc.image`), so a restarted
//!   agent finds its containers by asking the engine. Docker does not restart
//!   them (restart policy `no`): the agent's reconciler does, with backoff.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, EndpointIpamConfig,
    EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest, NetworkingConfig,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectNetworkOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions,
};
use futures::StreamExt;
use uc_proto::ContainerId;
use uc_proto::spec::RuntimeKind;

use crate::exec::{Exec, ExecInput, ExecOutput, ExecRequest};
use crate::image::{ChannelWriter, ImageMeta, ImageStore};
use crate::nspawn::WORKLOAD_MTU;
use crate::reconcile::Seen;
use crate::runtime::{Meta, Runtime, RuntimeError, Status, Workload};
use crate::{net, shim};

/// The Docker network of uc's containers on each machine.
pub const NETWORK: &str = "uc";
const LABEL_ID: &str = "uc.id";
const LABEL_SERVICE: &str = "uc.service";
const LABEL_DIGEST: &str = "uc.digest";
const LABEL_ADDRESS: &str = "uc.address";
const LABEL_IMAGE: &str = "uc.image";
/// Seconds a request to the engine may take (an image import of a large root filesystem too).
const REQUEST_TIMEOUT_SECS: u64 = 600;
/// The timeout of `uc exec` sessions' requests: a week.
const EXEC_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

pub struct Docker {
    /// `unix:///var/run/docker.sock` or a socket path.
    host: String,
    images: ImageStore,
    /// The mesh's interface: traffic from it may enter the bridge.
    mesh_if: String,
    client: tokio::sync::OnceCell<bollard::Docker>,
    /// Serializes making the network and importing images.
    setup: tokio::sync::Mutex<()>,
    /// Restarts by the reconciler since this agent started (Docker's own count is of its
    /// restart policy's restarts, which uc does not use).
    restarts: Mutex<HashMap<ContainerId, u32>>,
}

impl Docker {
    pub fn new(host: impl Into<String>, images: ImageStore, mesh_if: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            images,
            mesh_if: mesh_if.into(),
            client: tokio::sync::OnceCell::new(),
            setup: tokio::sync::Mutex::new(()),
            restarts: Mutex::default(),
        }
    }

    /// The engine's client, its API version negotiated on first use.
    async fn client(&self) -> Result<&bollard::Docker, RuntimeError> {
        self.client
            .get_or_try_init(|| async {
                let path = self.host.strip_prefix("unix://").unwrap_or(&self.host);
                let c = bollard::Docker::connect_with_unix(
                    path,
                    REQUEST_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| self.unavailable(e))?;
                c.negotiate_version().await.map_err(|e| self.unavailable(e))
            })
            .await
    }

    fn unavailable(&self, e: DockerError) -> RuntimeError {
        RuntimeError::Unavailable(
            RuntimeKind::Docker,
            format!("no Docker engine answers at {}: {e}", self.host),
        )
    }

    /// The engine's reference of a uc image: `uc/NAME:TAG-DIGEST`, so that a re-imported
    /// image of the same name is a new reference.
    pub fn image_ref(meta: &ImageMeta) -> String {
        let (name, tag) = meta.name.split_once(':').unwrap_or((&meta.name, "latest"));
        let hex = meta.digest.strip_prefix("sha256:").unwrap_or(&meta.digest);
        let digest = hex.get(..12).unwrap_or(hex);
        if digest.is_empty() {
            format!("uc/{name}:{tag}-{}", meta.created_ms)
        } else {
            format!("uc/{name}:{tag}-{digest}")
        }
    }

    /// The `docker import` changes that carry the image's defaults.
    pub fn import_changes(meta: &ImageMeta) -> Vec<String> {
        let mut c = Vec::new();
        if !meta.cmd.is_empty() {
            c.push(format!(
                "CMD {}",
                serde_json::to_string(&meta.cmd).expect("strings serialize")
            ));
        }
        for e in &meta.env {
            if let Some((k, v)) = e.split_once('=') {
                c.push(format!(
                    "ENV {k}={}",
                    serde_json::to_string(v).expect("strings serialize")
                ));
            }
        }
        if !meta.workdir.is_empty() {
            c.push(format!("WORKDIR {}", meta.workdir));
        }
        c
    }

    /// Makes sure the engine has the image, importing it from the store if not.
    async fn ensure_image(&self, meta: &ImageMeta) -> Result<String, RuntimeError> {
        let docker = self.client().await?;
        let reference = Self::image_ref(meta);
        if docker.inspect_image(&reference).await.is_ok() {
            return Ok(reference);
        }
        let (repo, tag) = reference.split_once(':').expect("image_ref has a tag");
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let images = self.images.clone();
        let name = meta.name.clone();
        let export = tokio::task::spawn_blocking(move || {
            let mut w = ChannelWriter {
                tx,
                buf: Vec::new(),
            };
            images.export_rootfs(&name, &mut w)?;
            std::io::Write::flush(&mut w).map_err(|e| crate::image::ImageError::Io {
                what: "exporting",
                path: images.rootfs(&name),
                source: e,
            })
        });
        let body = tokio_stream_of(rx);
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            changes: Self::import_changes(meta),
            ..Default::default()
        };
        let mut progress =
            docker.create_image(Some(options), Some(bollard::body_try_stream(body)), None);
        let mut failed = None;
        while let Some(item) = progress.next().await {
            if let Err(e) = item {
                failed = Some(e);
                break;
            }
        }
        drop(progress);
        let exported = export
            .await
            .map_err(|e| RuntimeError::Other(format!("exporting image {}: {e}", meta.name)))?;
        if let Some(e) = failed {
            return Err(RuntimeError::Other(format!(
                "importing image {} into Docker: {e}",
                meta.name
            )));
        }
        exported?;
        tracing::info!(image = %meta.name, reference = %reference, "image imported into Docker");
        Ok(reference)
    }

    /// Makes sure the network `uc` exists on the machine's /24. (The FORWARD rules that let
    /// the mesh in are the probe's: see [`Self::accept_from_mesh`].)
    async fn ensure_network(&self, gateway: Ipv4Addr, prefix: u8) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        net::ensure_bridge(gateway, prefix).await?;
        let subnet = subnet_of(gateway, prefix);
        match docker
            .inspect_network(NETWORK, None::<InspectNetworkOptions>)
            .await
        {
            Ok(n) => {
                let has: Vec<String> = n
                    .ipam
                    .and_then(|i| i.config)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|c| c.subnet)
                    .collect();
                if !has.contains(&subnet) {
                    if n.containers.is_some_and(|c| !c.is_empty()) {
                        return Err(RuntimeError::Other(format!(
                            "Docker network {NETWORK} is on {has:?}, this machine's subnet is \
                             {subnet}, and containers still use it"
                        )));
                    }
                    tracing::info!(old = ?has, new = %subnet, "moving the Docker network to this machine's subnet");
                    docker
                        .remove_network(NETWORK)
                        .await
                        .map_err(|e| other("removing the Docker network", e))?;
                    self.create_network(docker, &subnet, gateway).await?;
                }
            }
            Err(e) if status_of(&e) == Some(404) => {
                self.create_network(docker, &subnet, gateway).await?
            }
            Err(e) => return Err(other("inspecting the Docker network", e)),
        }
        Ok(())
    }

    async fn create_network(
        &self,
        docker: &bollard::Docker,
        subnet: &str,
        gateway: Ipv4Addr,
    ) -> Result<(), RuntimeError> {
        let options = HashMap::from([
            (
                "com.docker.network.bridge.name".to_string(),
                net::BRIDGE.to_string(),
            ),
            (
                "com.docker.network.bridge.enable_ip_masquerade".into(),
                "false".into(),
            ),
            (
                "com.docker.network.driver.mtu".into(),
                WORKLOAD_MTU.to_string(),
            ),
        ]);
        docker
            .create_network(NetworkCreateRequest {
                name: NETWORK.into(),
                driver: Some("bridge".into()),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet.into()),
                        gateway: Some(gateway.to_string()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                options: Some(options),
                labels: Some(HashMap::from([("uc".to_string(), "1".to_string())])),
                ..Default::default()
            })
            .await
            .map_err(|e| other("creating the Docker network", e))?;
        tracing::info!(network = NETWORK, subnet = %subnet, "Docker network created");
        Ok(())
    }

    /// Makes sure the FORWARD chain accepts the workloads' traffic: mesh to bridge, bridge to
    /// mesh, bridge to bridge (with br_netfilter on, bridged packets pass iptables too), and
    /// host ports' connections.
    /// dockerd sets FORWARD's policy to DROP and accepts only its own networks' traffic until
    /// its network `uc` exists, so without these the other runtimes' containers are cut off.
    /// The rules are appended: Docker's chains (`DOCKER-USER`, where a user restricts) come
    /// first.
    async fn accept_from_mesh(&self) {
        let mesh = self.mesh_if.as_str();
        let rules: [&[&str]; 5] = [
            &["-i", mesh, "-o", net::BRIDGE],
            &["-i", net::BRIDGE, "-o", mesh],
            &["-i", net::BRIDGE, "-o", net::BRIDGE],
            // Host ports (`ports.rs`): connections sent to a workload by destination NAT,
            // from any interface, and their answers; only those through uc's bridge.
            &["-o", net::BRIDGE, "-m", "conntrack", "--ctstate", "DNAT"],
            &["-i", net::BRIDGE, "-m", "conntrack", "--ctstate", "DNAT"],
        ];
        for m in rules {
            let mut rule = vec!["FORWARD"];
            rule.extend_from_slice(m);
            rule.extend_from_slice(&["-j", "ACCEPT"]);
            let rule = &rule;
            let iptables = |op: &str| {
                let mut c = tokio::process::Command::new("iptables");
                c.arg("-w").arg(op).args(rule);
                c.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                c
            };
            if iptables("-C").status().await.is_ok_and(|s| s.success()) {
                continue;
            }
            match iptables("-A").status().await {
                Ok(s) if s.success() => {
                    tracing::info!(
                        rule = %m.join(" "),
                        "the FORWARD chain accepts workload traffic"
                    )
                }
                Ok(_) | Err(_) => {
                    tracing::warn!(
                        rule = %m.join(" "),
                        "could not add a FORWARD rule with iptables"
                    )
                }
            }
        }
    }

    /// The engine's container of a uc container id.
    async fn find(&self, id: &ContainerId) -> Result<Option<String>, RuntimeError> {
        let list = self.labelled(format!("{LABEL_ID}={id}")).await?;
        Ok(list.into_iter().find_map(|c| c.id))
    }

    /// The engine's containers, running or not, that match a label filter (`KEY` or
    /// `KEY=VALUE`).
    async fn labelled(
        &self,
        label: String,
    ) -> Result<Vec<bollard::models::ContainerSummary>, RuntimeError> {
        self.client()
            .await?
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("label".to_string(), vec![label])])),
                ..Default::default()
            }))
            .await
            .map_err(|e| other("listing Docker containers", e))
    }

    fn status_of(&self, c: &ContainerInspectResponse) -> Option<Status> {
        let labels = c.config.as_ref()?.labels.as_ref()?;
        let id: ContainerId = labels.get(LABEL_ID)?.parse().ok()?;
        let state = c.state.as_ref()?;
        let started_ms = state
            .started_at
            .as_deref()
            .and_then(parse_time)
            .unwrap_or(0);
        let created_ms = c.created.as_deref().and_then(parse_time).unwrap_or(0);
        let running = matches!(
            state.status,
            Some(
                ContainerStateStatusEnum::RUNNING
                    | ContainerStateStatusEnum::RESTARTING
                    | ContainerStateStatusEnum::PAUSED
            )
        );
        let seen = if running {
            Seen::Running {
                since_ms: started_ms,
            }
        } else {
            Seen::Exited {
                code: if started_ms == 0 {
                    -1
                } else {
                    state.exit_code.unwrap_or(-1) as i32
                },
                at_ms: state
                    .finished_at
                    .as_deref()
                    .and_then(parse_time)
                    .unwrap_or(created_ms),
            }
        };
        let restarts = self
            .restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
            .unwrap_or(0);
        let meta = Meta {
            service: labels.get(LABEL_SERVICE).cloned().unwrap_or_default(),
            runtime: RuntimeKind::Docker,
            digest: labels.get(LABEL_DIGEST).cloned().unwrap_or_default(),
            address: labels
                .get(LABEL_ADDRESS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            image: labels.get(LABEL_IMAGE).cloned().unwrap_or_default(),
            created_ms,
            started_ms,
            restarts,
            id,
        };
        Some(Status {
            meta,
            seen,
            pid: state.pid.filter(|p| running && *p > 0).map(|p| p as u32),
        })
    }

    fn body(w: &Workload, image: &ImageMeta, reference: &str) -> ContainerCreateBody {
        let labels = HashMap::from([
            (LABEL_ID.to_string(), w.id.to_string()),
            (LABEL_SERVICE.to_string(), w.service.clone()),
            (LABEL_DIGEST.to_string(), w.digest.clone()),
            (LABEL_ADDRESS.to_string(), w.address.to_string()),
            (LABEL_IMAGE.to_string(), image.name.clone()),
        ]);
        let env: Vec<String> = w.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let endpoint = EndpointSettings {
            ipam_config: Some(EndpointIpamConfig {
                ipv4_address: Some(w.address.to_string()),
                ..Default::default()
            }),
            aliases: Some(vec![w.service.clone()]),
            ..Default::default()
        };
        ContainerCreateBody {
            hostname: Some(w.hostname()),
            image: Some(reference.into()),
            cmd: (!w.spec.command.is_empty()).then(|| w.spec.command.clone()),
            env: (!env.is_empty()).then_some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(NETWORK.into()),
                dns: Some(vec![w.gateway.to_string()]),
                dns_search: Some(vec!["internal".into()]),
                memory: w.spec.memory.map(|m| m as i64),
                nano_cpus: w.spec.cpu.map(|c| (c * 1e9) as i64),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(NETWORK.to_string(), endpoint)])),
            }),
            ..Default::default()
        }
    }

    async fn create_and_start(&self, w: &Workload) -> Result<(), RuntimeError> {
        let image = self.images.require(&w.spec.image)?;
        if w.spec.command.is_empty() && image.cmd.is_empty() {
            return Err(RuntimeError::Other(format!(
                "image {:?} has no default command: give one after the image",
                image.name
            )));
        }
        let t0 = std::time::Instant::now();
        let reference = {
            let _setup = self.setup.lock().await;
            self.ensure_network(w.gateway, w.prefix).await?;
            self.ensure_image(&image).await?
        };
        let t_setup = t0.elapsed();
        let docker = self.client().await?;
        // A container of this id from an attempt that did not finish.
        if let Some(old) = self.find(&w.id).await? {
            remove_quietly(docker, &old).await?;
        }
        let t_find = t0.elapsed();
        let name = format!("uc-{}", w.hostname());
        docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                Self::body(w, &image, &reference),
            )
            .await
            .map_err(|e| other("creating the Docker container", e))?;
        let t_create = t0.elapsed();
        docker
            .start_container(&name, None)
            .await
            .map_err(|e| other("starting the Docker container", e))?;
        tracing::debug!(
            setup_ms = t_setup.as_millis() as u64,
            find_ms = (t_find - t_setup).as_millis() as u64,
            create_ms = (t_create - t_find).as_millis() as u64,
            start_ms = (t0.elapsed() - t_create).as_millis() as u64,
            "Docker container made"
        );
        Ok(())
    }
}

fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok(b.into()))))
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn other(what: &str, e: DockerError) -> RuntimeError {
    match e {
        DockerError::DockerResponseServerError { message, .. } => {
            RuntimeError::Other(format!("{what}: {message}"))
        }
        e => RuntimeError::Other(format!("{what}: {e}")),
    }
}

async fn remove_quietly(docker: &bollard::Docker, name: &str) -> Result<(), RuntimeError> {
    match docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(404) => Ok(()),
        Err(e) => Err(other("removing the Docker container", e)),
    }
}

/// `10.210.5.1`, 24 → `10.210.5.0/24`.
fn subnet_of(gateway: Ipv4Addr, prefix: u8) -> String {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    format!("{}/{prefix}", Ipv4Addr::from(u32::from(gateway) & mask))
}

/// Docker's RFC 3339 times, in ms since the epoch; `None` for its "never" (year 1).
pub fn parse_time(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    (ms > 0).then_some(ms as u64)
}

/// One line of `docker logs --timestamps`: the time, a space, the text.
fn log_line(stream: char, message: &[u8]) -> Vec<shim::LogLine> {
    String::from_utf8_lossy(message)
        .lines()
        .map(|l| {
            let (at_ms, text) = match l.split_once(' ') {
                Some((ts, text)) if parse_time(ts).is_some() => {
                    (parse_time(ts).unwrap_or(0), text.to_owned())
                }
                _ => (0, l.to_owned()),
            };
            shim::LogLine {
                at_ms,
                stream,
                text,
            }
        })
        .collect()
}

#[async_trait::async_trait]
impl Runtime for Docker {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    async fn available(&self) -> Result<(), String> {
        let docker = self.client().await.map_err(|e| e.to_string())?;
        docker
            .ping()
            .await
            .map_err(|e| format!("no Docker engine answers at {}: {e}", self.host))?;
        if tokio::process::Command::new("iptables")
            .arg("--version")
            .output()
            .await
            .is_err()
        {
            tracing::warn!(
                "iptables is not installed: if Docker filters forwarded traffic, the mesh cannot \
                 reach the machine's containers"
            );
        }
        // A running dockerd drops forwarded traffic into bridges it does not know, the
        // other runtimes' containers on ucbr0 included: open the bridge to the mesh as soon
        // as the engine is seen (and again at every probe, should dockerd have restarted).
        self.accept_from_mesh().await;
        Ok(())
    }

    async fn list(&self) -> Vec<Status> {
        let Ok(docker) = self.client().await else {
            return Vec::new();
        };
        let list = match self.labelled(LABEL_ID.to_string()).await {
            Ok(l) => l,
            Err(e) => {
                // Every pass asks; the probe reports an engine that went away, once.
                tracing::debug!(error = %e, "listing Docker containers failed");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for c in list {
            let Some(cid) = c.id else { continue };
            match docker.inspect_container(&cid, None).await {
                Ok(i) => out.extend(self.status_of(&i)),
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => tracing::warn!(container = %cid, error = %e, "inspecting failed"),
            }
        }
        out
    }

    async fn create(&self, w: &Workload) -> Result<(), RuntimeError> {
        if let Err(e) = self.create_and_start(w).await {
            let _ = self.remove(&w.id).await;
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let Some(cid) = self.find(id).await? else {
            return Err(RuntimeError::NotFound(id.clone()));
        };
        *self
            .restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.clone())
            .or_default() += 1;
        match docker.start_container(&cid, None).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(other("starting the Docker container", e)),
        }
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let Some(cid) = self.find(id).await? else {
            return Ok(());
        };
        match docker
            .stop_container(
                &cid,
                Some(StopContainerOptions {
                    t: Some(grace.as_secs().max(1) as i32),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(other("stopping the Docker container", e)),
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        if let Some(cid) = self.find(id).await? {
            // Stop first with a grace, as the other runtimes do; then remove.
            self.stop(id, Duration::from_secs(10)).await?;
            remove_quietly(docker, &cid).await?;
        }
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn logs(&self, id: &ContainerId, n: usize) -> Vec<shim::LogLine> {
        let Ok(docker) = self.client().await else {
            return Vec::new();
        };
        let Ok(Some(cid)) = self.find(id).await else {
            return Vec::new();
        };
        let mut s = docker.logs(
            &cid,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                timestamps: true,
                tail: if n == usize::MAX {
                    "all".into()
                } else {
                    n.to_string()
                },
                ..Default::default()
            }),
        );
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(bollard::container::LogOutput::StdOut { message })
                | Ok(bollard::container::LogOutput::Console { message }) => {
                    out.extend(log_line('o', &message))
                }
                Ok(bollard::container::LogOutput::StdErr { message }) => {
                    out.extend(log_line('e', &message))
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "reading Docker logs");
                    break;
                }
            }
        }
        let skip = out.len().saturating_sub(n);
        out.split_off(skip)
    }

    async fn exec(&self, id: &ContainerId, req: ExecRequest) -> Result<Exec, RuntimeError> {
        use bollard::container::LogOutput;
        use tokio::io::AsyncWriteExt;
        if req.argv.is_empty() {
            return Err(RuntimeError::Other("no command to run".into()));
        }
        let cid = self
            .find(id)
            .await?
            .ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        // A client of its own, without the request timeout: a session may last.
        let path = self.host.strip_prefix("unix://").unwrap_or(&self.host);
        let docker = bollard::Docker::connect_with_unix(
            path,
            EXEC_TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| self.unavailable(e))?
        .negotiate_version()
        .await
        .map_err(|e| self.unavailable(e))?;
        let fail = |e: DockerError| RuntimeError::Other(format!("docker exec: {e}"));
        let exec_id = docker
            .create_exec(
                &cid,
                bollard::models::ExecConfig {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(req.tty),
                    env: Some(req.env.clone()),
                    cmd: Some(req.argv.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(fail)?
            .id;
        let started = docker
            .start_exec(
                &exec_id,
                Some(bollard::exec::StartExecOptions {
                    detach: false,
                    tty: req.tty,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(fail)?;
        let bollard::exec::StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        else {
            return Err(RuntimeError::Other("docker exec did not attach".into()));
        };
        let resize = |docker: bollard::Docker, exec_id: String, rows: u16, cols: u16| async move {
            let _ = docker
                .resize_exec(
                    &exec_id,
                    bollard::query_parameters::ResizeExecOptions {
                        h: rows.into(),
                        w: cols.into(),
                    },
                )
                .await;
        };
        if req.tty && req.rows > 0 {
            resize(docker.clone(), exec_id.clone(), req.rows, req.cols).await;
        }
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<ExecInput>(64);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel::<ExecOutput>(64);
        let (d, eid, tty) = (docker.clone(), exec_id.clone(), req.tty);
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                match i {
                    ExecInput::Stdin(b) => {
                        if input.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    ExecInput::Eof if tty => {
                        let _ = input.write_all(b"\x04").await;
                    }
                    ExecInput::Eof => {
                        let _ = input.shutdown().await;
                    }
                    ExecInput::Resize { rows, cols } => {
                        resize(d.clone(), eid.clone(), rows, cols).await;
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Some(item) = output.next().await {
                let msg = match item {
                    Ok(LogOutput::StdErr { message }) => ExecOutput::Stderr(message.to_vec()),
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        ExecOutput::Stdout(message.to_vec())
                    }
                    Ok(LogOutput::StdIn { .. }) => continue,
                    Err(_) => break,
                };
                if out_tx.send(msg).await.is_err() {
                    return;
                }
            }
            let code = docker
                .inspect_exec(&exec_id)
                .await
                .ok()
                .and_then(|i| i.exit_code)
                .unwrap_or(255);
            let _ = out_tx.send(ExecOutput::Exit(code as i32)).await;
        });
        Ok(Exec {
            pid: 0,
            input: in_tx,
            output: out_rx,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, digest: &str) -> ImageMeta {
        ImageMeta {
            name: name.into(),
            digest: digest.into(),
            size_bytes: 0,
            created_ms: 42,
            cmd: vec!["httpd".into(), "-f".into(), "-h".into(), "/var/www".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hello \"you\"".into()],
            workdir: "/srv".into(),
        }
    }

    #[test]
    fn image_refs_carry_the_digest() {
        assert_eq!(
            Docker::image_ref(&meta("demo", "sha256:0123456789abcdef")),
            "uc/demo:latest-0123456789ab"
        );
        assert_eq!(Docker::image_ref(&meta("web:v2", "ffee")), "uc/web:v2-ffee");
        assert_eq!(Docker::image_ref(&meta("web", "")), "uc/web:latest-42");
    }

    #[test]
    fn import_changes_quote_what_they_carry() {
        assert_eq!(
            Docker::import_changes(&meta("demo", "")),
            vec![
                r#"CMD ["httpd","-f","-h","/var/www"]"#.to_string(),
                r#"ENV PATH="/usr/bin:/bin""#.into(),
                r#"ENV GREETING="hello \"you\"""#.into(),
                "WORKDIR /srv".into(),
            ]
        );
    }

    #[test]
    fn subnets_and_times() {
        assert_eq!(subnet_of(Ipv4Addr::new(10, 210, 5, 1), 24), "10.210.5.0/24");
        assert_eq!(subnet_of(Ipv4Addr::new(10, 210, 5, 1), 0), "0.0.0.0/0");
        assert_eq!(
            parse_time("2026-11-24T01:30:19.082206725Z"),
            Some(1_795_483_819_082)
        );
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
        let l = log_line('e', b"2026-11-24T01:30:19.5Z GET / 200\n");
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].at_ms, l[0].stream), (1_795_483_819_500, 'e'));
        assert_eq!(l[0].text, "GET / 200");
    }
}
