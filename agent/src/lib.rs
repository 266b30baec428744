//! The uc agent (`ucd`): brings this machine into a cluster (new, joined, or
//! from its stored state), then runs gossip membership, state replication,
//! the peer API and the local API until it is told to stop.

pub mod api;
pub mod config;
pub mod dns;
pub mod exec;
pub mod ingress;
pub mod membership;
pub mod mesh;
pub mod node;
pub mod peer;
pub mod replicator;
pub mod services;
pub mod store;
pub mod token;
pub mod workloads;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use uc_crdt::{ClusterState, NewMachine};
use uc_proto::MachineId;
use uc_proto::v1::JoinRequest;
use uc_proto::v1::api_server::ApiServer;
use uc_proto::v1::join_server::JoinServer;
use uc_proto::v1::peer_server::PeerServer;

use crate::config::{Bootstrap, Config};
use crate::node::{Node, now_ms};
use crate::store::Store;

/// Installs the log subscriber (stderr, `RUST_LOG` or a quiet default) and
/// the counter of garbage gossip datagrams.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,chitchat=error,h2=warn,hyper=warn,tower=warn,boringtun=error,hickory_server=warn",
        )
    });
    let counter =
        membership::GarbageCounter.with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.target().starts_with("chitchat") && *m.level() == tracing::Level::WARN
        }));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .with(counter)
        .init();
}

/// Reads this machine's id from the data directory, creating it once.
fn machine_id(data_dir: &Path) -> anyhow::Result<MachineId> {
    let path = data_dir.join("machine-id");
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = MachineId::from_bytes(token::random16());
            let tmp = data_dir.join("machine-id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Opens the stored state, or creates it by starting or joining a cluster.
/// Returns the node's pieces and whether it is caught up already.
async fn bootstrap(
    config: &Config,
    id: &MachineId,
    actor: [u8; 16],
    public_key: &str,
) -> anyhow::Result<(ClusterState, Store, bool)> {
    let path = config.state_path();
    if Store::exists(&path) {
        if !matches!(config.bootstrap, Bootstrap::Existing) {
            tracing::info!(path = %path.display(), "state exists; ignoring --init/--join");
        }
        let (store, doc) = Store::open(&path, actor)?;
        return Ok((doc, store, false));
    }
    match &config.bootstrap {
        Bootstrap::Existing => bail!(
            "no cluster state in {}: start with --init to create a cluster, or --join PEER --token TOKEN to join one",
            config.data_dir.display()
        ),
        Bootstrap::Init { network } => {
            let cluster_id = hex::encode(token::random16());
            let now = now_ms();
            let mut doc = ClusterState::new_cluster(&cluster_id, *network, actor, now)?;
            let me = doc.add_machine(
                NewMachine {
                    id: id.clone(),
                    name: config.name.clone(),
                    public_key: public_key.to_string(),
                    endpoints: config.endpoints.clone(),
                    tags: config.tags.iter().cloned().collect(),
                },
                now,
            )?;
            let store = Store::create(&path, &mut doc)?;
            tracing::info!(cluster = %cluster_id, network = %network, subnet = %me.subnet, "created a new cluster");
            Ok((doc, store, true))
        }
        Bootstrap::Join { peer, token } => {
            let response = peer::join(
                peer,
                JoinRequest {
                    token: token.clone(),
                    machine_id: id.to_string(),
                    name: config.name.clone(),
                    endpoints: config.endpoints.clone(),
                    public_key: public_key.to_string(),
                    tags: config.tags.clone(),
                },
            )
            .await
            .with_context(|| format!("joining the cluster through {peer}"))?;
            let mut doc = ClusterState::load(&response.document, actor)
                .context("the peer sent a cluster document that does not load")?;
            if doc.machine(id).is_none() {
                bail!("the peer's document does not contain this machine; refusing to start");
            }
            let store = Store::create(&path, &mut doc)?;
            tracing::info!(cluster = %response.cluster_id, subnet = %response.subnet, name = %response.name, "joined the cluster");
            Ok((doc, store, true))
        }
    }
}

/// Copies bytes between standard input/output and the agent's API socket until either side
/// closes: `uc` runs `ucd dial-stdio` over SSH to reach this machine's agent, so the API never
/// listens on a network address.
pub async fn dial_stdio(socket: &Path) -> anyhow::Result<()> {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's API at {} (is ucd running?)",
                socket.display()
            )
        })?;
    let mut stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    match tokio::io::copy_bidirectional(&mut stdio, &mut stream).await {
        Ok(_) => Ok(()),
        // The other end hung up: that is how a session ends.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).context("relaying the API"),
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let id = machine_id(&config.data_dir)?;
    let keys = uc_mesh::KeyPair::load_or_create(&config.wg_key_path())?;
    let actor = token::random16();
    // Take every underlay port before touching the cluster, so a taken port
    // fails the start before this machine joins anything.
    let join_listener = TcpListener::bind((config.listen_addr, config.join_port))
        .await
        .with_context(|| {
            format!(
                "binding the join endpoint on {}:{}/tcp",
                config.listen_addr, config.join_port
            )
        })?;
    drop(
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, config.wg_port))
            .with_context(|| format!("binding WireGuard on port {}/udp", config.wg_port))?,
    );
    let api_path = config.api_socket_path();
    let api_listener = bind_api_socket(&api_path)?;
    let (doc, store, ready) = match bootstrap(&config, &id, actor, &keys.public.to_string()).await {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_file(&api_path);
            return Err(e);
        }
    };
    let shutdown = CancellationToken::new();
    let node = Arc::new(Node::new(config.clone(), id.clone(), doc, store, ready));
    let r = serve(&node, &keys, join_listener, api_listener, &shutdown).await;
    let _ = std::fs::remove_file(&api_path);
    if r.is_ok() && node.removed.load(std::sync::atomic::Ordering::SeqCst) {
        drop(node);
        set_state_aside(&config)?;
    }
    r
}

/// After this machine was removed from its cluster: moves its state, machine id and WireGuard
/// key into `removed-<unix seconds>/` in the data directory (kept, not deleted), so that the
/// next start, or `uc machine add`, begins afresh with a new identity.
fn set_state_aside(config: &Config) -> anyhow::Result<()> {
    let secs = now_ms() / 1000;
    let aside = config.data_dir.join(format!("removed-{secs}"));
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    for name in ["state.redb", "machine-id", "wg.key"] {
        let from = config.data_dir.join(name);
        if from.exists() {
            std::fs::rename(&from, aside.join(name))
                .with_context(|| format!("moving {} to {}", from.display(), aside.display()))?;
        }
    }
    tracing::info!(moved_to = %aside.display(), "state set aside; this machine can be added to a cluster again");
    Ok(())
}

async fn serve(
    node: &Arc<Node>,
    keys: &uc_mesh::KeyPair,
    join_listener: TcpListener,
    api_listener: UnixListener,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let config = &node.config;
    let id = &node.machine_id;
    // Keep what this machine says of itself current.
    let (endpoints, key, tags_missing) = node.read(|doc| {
        let me = doc.machine(id);
        (
            me.as_ref().map(|m| m.endpoints.clone()),
            me.as_ref().map(|m| m.public_key.clone()),
            me.map(|m| {
                config
                    .tags
                    .iter()
                    .filter(|t| !m.tags.contains(*t))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
        )
    });
    if endpoints.as_ref() != Some(&config.endpoints) {
        node.write(|doc| doc.set_machine_endpoints(id, config.endpoints.clone()))?;
    }
    let public_key = keys.public.to_string();
    if key.as_ref() != Some(&public_key) {
        node.write(|doc| doc.set_machine_public_key(id, &public_key))?;
    }
    for tag in tags_missing {
        node.write(|doc| doc.set_machine_tag(id, &tag, true))?;
    }

    let tracker = TaskTracker::new();
    // Runtimes are probed before gossip starts, so that its first word says which work here;
    // the mesh comes up meanwhile (other machines' handshakes wait for it).
    let (workloads, mesh) = tokio::join!(
        workloads::Workloads::new(node.clone()),
        mesh::Mesh::start(node, keys)
    );
    let _ = node.workloads.set(workloads.clone());
    let mesh = mesh?;
    let _ = node.mesh.set(mesh.clone());
    mesh.spawn(node.clone(), &tracker, shutdown.clone());
    // Gossip, sync and the peer API live on the management address.
    let mesh_ip = IpAddr::V6(mesh.management);
    spawn_peer_server(node, mesh_ip, &tracker, shutdown).await?;
    let membership =
        match membership::start(node.clone(), mesh_ip, &tracker, shutdown.clone()).await {
            Ok(m) => m,
            Err(e) => {
                shutdown.cancel();
                return Err(e);
            }
        };
    replicator::spawn(node.clone(), &tracker, shutdown.clone());
    workloads.spawn(&tracker, shutdown.clone());
    // The ingress follows the state and serves only while this machine is tagged `ingress`.
    let ingress = ingress::IngressAgent::new(node.clone(), &tracker, shutdown.clone())?;
    ingress.spawn();
    let _ = node.ingress.set(ingress);
    // DNS on the machine's mesh addresses, following them if the /24 moves.
    if let Err(e) = dns::start(
        node.clone(),
        mesh.clone(),
        config.dns_port,
        &config.dns_upstreams,
        &tracker,
        shutdown.clone(),
    )
    .await
    {
        shutdown.cancel();
        return Err(e);
    }

    let join_service = JoinServer::new(peer::JoinService { node: node.clone() })
        .max_encoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES);
    let stop = shutdown.clone();
    let incoming = peer::screened_incoming(join_listener, node.clone(), &tracker, shutdown.clone());
    tracker.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(join_service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "join endpoint stopped");
        }
    });
    let api_service = ApiServer::new(api::ApiService { node: node.clone() });
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(api_service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(api_listener), stop.cancelled())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "local API stopped");
        }
    });
    tracing::info!(
        machine = %id,
        name = %config.name,
        mesh = %mesh_ip,
        gossip = config.gossip_port,
        peer = config.peer_port,
        join = %config.join_addr(),
        wireguard = config.wg_port,
        api = %config.api_socket_path().display(),
        "agent running"
    );

    // Under systemd (Type=notify) the unit is started once the agent serves.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "telling systemd the agent is ready failed");
    }
    tracker.close();
    tokio::select! {
        r = wait_for_signal() => r?,
        // Stopping from within: this machine was removed from the cluster.
        _ = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    membership.shutdown().await;
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 5 s");
    }
    if let Err(e) = node.flush() {
        tracing::error!(error = %e, "storing received changes at shutdown failed");
    }
    Ok(())
}

/// Serves the peer API (sync, `WgShow`) on `mesh_ip` until shutdown.
async fn spawn_peer_server(
    node: &Arc<Node>,
    mesh_ip: IpAddr,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::new(mesh_ip, node.config.peer_port);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the peer API on {addr}/tcp"))?;
    let peer_service = PeerServer::new(peer::PeerService { node: node.clone() })
        .max_decoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(uc_proto::MAX_PEER_MESSAGE_BYTES);
    let stop = shutdown.clone();
    let incoming = peer::screened_incoming(listener, node.clone(), tracker, shutdown.clone());
    tracker.spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(peer_service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "peer API stopped");
        }
    });
    Ok(())
}

fn bind_api_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        } else {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the local API on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name("uc") {
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("giving {} to group uc", path.display()))?;
    }
    Ok(listener)
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
