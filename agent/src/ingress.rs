//! The ingress on machines tagged `ingress`: routes, certificates and ACME challenges from the
//! replicated state, swapped into the listeners while they serve; listeners opened and closed
//! as routes come and go; and certificates ordered from the ACME CA by one live ingress machine
//! per hostname, stored in the state so that every ingress machine serves the same one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use uc_crdt::{CertRecord, Challenge, ClusterState, DesiredState, OrderStatus};
use uc_ingress::acme::{self, Challenges};
use uc_ingress::{
    Cert, ContainerInput, Ingress, Limits, Listener, RouteTable, ServiceInput, Workers,
};
use uc_proto::MachineId;
use uc_proto::spec::{PortMode, ServiceSpec};

use crate::node::{Liveness, Node, PeerInfo, now_ms};

/// The tag that makes a machine an ingress.
pub const TAG: &str = "ingress";
/// How long a machine's claim to order a hostname's certificate holds.
const ORDER_LEASE: Duration = Duration::from_secs(300);
/// How long a published challenge lives if its machine never withdraws it.
const CHALLENGE_TTL: Duration = Duration::from_secs(600);

/// The services' ingress ports and the containers that may serve them, older services first
/// (they keep a host or port two services claim). Containers count when they should run, have
/// an address, and their machine is active and not known dead.
pub fn route_inputs(
    doc: &ClusterState,
    me: &MachineId,
    peers: &HashMap<MachineId, PeerInfo>,
) -> Vec<ServiceInput> {
    let usable: HashSet<MachineId> = doc
        .machines()
        .into_iter()
        .filter(|m| m.is_active())
        .filter(|m| {
            &m.id == me
                || peers
                    .get(&m.id)
                    .is_none_or(|p| p.liveness != Liveness::Dead)
        })
        .map(|m| m.id)
        .collect();
    let mut services = doc.services();
    services.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
    let containers = doc.containers();
    services
        .into_iter()
        .filter_map(|s| {
            let spec = ServiceSpec::from_json(&s.spec).ok()?;
            let ports: Vec<_> = spec
                .port_specs()
                .into_iter()
                .filter(|p| matches!(p.mode, PortMode::Ingress { .. }))
                .collect();
            if ports.is_empty() {
                return None;
            }
            let containers = containers
                .iter()
                .filter(|c| c.service == s.id && c.desired == DesiredState::Running)
                .filter(|c| usable.contains(&c.machine))
                .filter_map(|c| {
                    Some(ContainerInput {
                        ip: c.address?.into(),
                        local: &c.machine == me,
                    })
                })
                .collect();
            Some(ServiceInput {
                name: s.name,
                ports,
                containers,
            })
        })
        .collect()
}

/// The ingress machines that are up as far as this machine knows (itself included).
pub fn live_ingress_machines(
    doc: &ClusterState,
    me: &MachineId,
    peers: &HashMap<MachineId, PeerInfo>,
) -> Vec<MachineId> {
    doc.machines()
        .into_iter()
        .filter(|m| m.is_active() && m.tags.contains(TAG))
        .filter(|m| {
            &m.id == me
                || peers
                    .get(&m.id)
                    .is_some_and(|p| p.liveness == Liveness::Live)
        })
        .map(|m| m.id)
        .collect()
}

/// Which of `machines` orders `host`'s certificate: the same answer on every machine that sees
/// the same live ingress machines (highest hash of host and machine id).
pub fn orderer<'a>(host: &str, machines: &'a [MachineId]) -> Option<&'a MachineId> {
    machines.iter().max_by_key(|m| {
        let d = ring::digest::digest(&ring::digest::SHA256, format!("{host}|{m}").as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&d.as_ref()[..8]);
        u64::from_be_bytes(b)
    })
}

/// Whether `host`'s certificate should be ordered now, and why.
pub fn needs_order(cert: Option<&CertRecord>, now_s: i64) -> Option<&'static str> {
    match cert {
        None => Some("no certificate yet"),
        Some(c) if now_s >= acme::renew_at(c.not_before, c.not_after) => {
            Some("a third of its life left")
        }
        Some(_) => None,
    }
}

struct Open {
    kind: Listener,
    stop: CancellationToken,
}

/// The ingress of this machine.
pub struct IngressAgent {
    node: Arc<Node>,
    pub ingress: Arc<Ingress>,
    tls: Arc<rustls::ServerConfig>,
    open: tokio::sync::Mutex<BTreeMap<u16, Open>>,
    /// Public port → why its listener could not be opened.
    listen_errors: Mutex<BTreeMap<u16, String>>,
    /// Parsed certificates, by host, with the record they came from.
    parsed: Mutex<HashMap<String, (CertRecord, Cert)>>,
    ordering: Mutex<HashSet<String>>,
    /// The threads that serve the listeners, started with the first listener.
    workers: Mutex<Option<Arc<Workers>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// What `uc ingress ls` shows.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub machines: Vec<IngressMachine>,
    pub routes: Vec<RouteLine>,
    pub refused: Vec<uc_ingress::routes::Refused>,
    pub certificates: Vec<CertLine>,
    /// Listener problems on the machine that answered.
    pub listen_errors: BTreeMap<u16, String>,
}

#[derive(Debug, Serialize)]
pub struct IngressMachine {
    pub name: String,
    pub liveness: String,
}

#[derive(Debug, Serialize)]
pub struct RouteLine {
    pub route: String,
    pub kind: String,
    pub service: String,
    pub backends: Vec<SocketAddr>,
}

#[derive(Debug, Serialize)]
pub struct CertLine {
    pub host: String,
    pub status: String,
    pub not_after: Option<i64>,
    pub issued_by: Option<String>,
    pub last_error: Option<String>,
}

impl IngressAgent {
    pub fn new(
        node: Arc<Node>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let ingress = Ingress::new(Limits::default());
        let tls = uc_ingress::tls::server_config(ingress.certs().clone())?;
        Ok(Arc::new(IngressAgent {
            node,
            ingress,
            tls,
            open: tokio::sync::Mutex::default(),
            listen_errors: Mutex::default(),
            parsed: Mutex::default(),
            ordering: Mutex::default(),
            workers: Mutex::default(),
            tracker: tracker.clone(),
            shutdown,
        }))
    }

    /// Follows the state: on every change, every change of a peer's liveness, and every 10 s
    /// (renewals, expired challenges, listeners that could not be opened).
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        self.tracker.spawn(async move {
            let mut heads = me.node.subscribe_heads();
            let mut peers = me.node.subscribe_peer_changes();
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                me.refresh().await;
                tokio::select! {
                    _ = me.shutdown.cancelled() => break,
                    r = heads.changed() => if r.is_err() { break },
                    r = peers.changed() => if r.is_err() { break },
                    _ = tick.tick() => me.acme_round(),
                }
            }
            me.close_all().await;
        });
    }

    fn is_ingress(&self, doc: &ClusterState) -> bool {
        doc.machine(&self.node.machine_id)
            .is_some_and(|m| m.is_active() && m.tags.contains(TAG))
    }

    async fn refresh(self: &Arc<Self>) {
        let me = self.node.machine_id.clone();
        let peers = self.node.peers();
        let now = now_ms();
        let read = self.node.read(|doc| {
            self.is_ingress(doc).then(|| {
                (
                    route_inputs(doc, &me, &peers),
                    doc.certificates(),
                    doc.acme_challenges(now),
                )
            })
        });
        let Some((inputs, certs, challenges)) = read else {
            if !self.open.lock().await.is_empty() {
                info!("this machine is no longer an ingress: closing its listeners");
                self.close_all().await;
            }
            return;
        };
        let table = RouteTable::build(&inputs);
        let mut wanted: BTreeMap<u16, Listener> = table.listeners.clone();
        wanted.insert(80, Listener::Http);
        wanted.insert(443, Listener::Https);
        self.ingress.set_routes(table);
        self.install_certs(certs);
        self.ingress.set_challenges(
            challenges
                .into_iter()
                .map(|(t, c)| (t, c.key_auth))
                .collect(),
        );
        self.open_listeners(wanted).await;
    }

    fn install_certs(&self, records: BTreeMap<String, CertRecord>) {
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        parsed.retain(|h, _| records.contains_key(h));
        for (host, rec) in records {
            if parsed.get(&host).is_some_and(|(r, _)| *r == rec) {
                continue;
            }
            match Cert::from_pem(&rec.chain_pem, &rec.key_pem) {
                Ok(c) => {
                    parsed.insert(host, (rec, c));
                }
                Err(e) => warn!(%host, error = %e, "stored certificate is not usable"),
            }
        }
        self.ingress.certs().replace(
            parsed
                .iter()
                .map(|(h, (_, c))| (h.clone(), c.clone()))
                .collect(),
        );
    }

    fn bind_port(&self, public: u16) -> u16 {
        match public {
            80 => self.node.config.ingress_http_port,
            443 => self.node.config.ingress_https_port,
            p => p,
        }
    }

    /// The worker threads, started on first use.
    fn workers(&self) -> Result<Arc<Workers>, uc_ingress::Error> {
        let mut w = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = &*w {
            return Ok(w.clone());
        }
        let started = Arc::new(Workers::start(self.node.config.ingress_workers)?);
        info!(workers = started.len(), "ingress workers started");
        *w = Some(started.clone());
        Ok(started)
    }

    async fn open_listeners(&self, wanted: BTreeMap<u16, Listener>) {
        let mut open = self.open.lock().await;
        let stale: Vec<u16> = open
            .iter()
            .filter(|(p, o)| wanted.get(p) != Some(&o.kind))
            .map(|(p, _)| *p)
            .collect();
        for p in stale {
            if let Some(o) = open.remove(&p) {
                info!(port = p, "closing ingress listener");
                o.stop.cancel();
            }
        }
        let mut errors = BTreeMap::new();
        for (public, kind) in wanted {
            if open.contains_key(&public) {
                continue;
            }
            let addr = SocketAddr::new(self.node.config.listen_addr, self.bind_port(public));
            let listener = match std::net::TcpListener::bind(addr) {
                Ok(l) => l,
                Err(e) => {
                    errors.insert(public, format!("cannot listen on {addr}: {e}"));
                    continue;
                }
            };
            let workers = match self.workers() {
                Ok(w) => w,
                Err(e) => {
                    errors.insert(public, format!("cannot start the ingress's threads: {e}"));
                    continue;
                }
            };
            let stop = self.shutdown.child_token();
            let tls = (kind == Listener::Https).then(|| self.tls.clone());
            let ingress = self.ingress.clone();
            let s = stop.clone();
            self.tracker.spawn(async move {
                if let Err(e) = workers.serve(ingress, listener, kind, public, tls, s).await {
                    warn!(port = public, error = %e, "ingress listener stopped");
                }
            });
            open.insert(public, Open { kind, stop });
        }
        for (p, e) in &errors {
            warn!(port = p, error = %e, "ingress listener not opened; trying again in 10 s");
        }
        *self.listen_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    async fn close_all(&self) {
        let mut open = self.open.lock().await;
        for (_, o) in std::mem::take(&mut *open) {
            o.stop.cancel();
        }
        self.ingress.set_routes(RouteTable::default());
    }

    /// Starts an order for every https hostname whose certificate is missing or due, where this
    /// machine is the one to order it and nobody else holds the order's lease.
    fn acme_round(self: &Arc<Self>) {
        let me = self.node.machine_id.clone();
        let peers = self.node.peers();
        let now = now_ms();
        // The table the listeners serve, as `refresh` built it from this state.
        let table = self.ingress.routes();
        let due: Vec<(String, OrderStatus)> = self.node.read(|doc| {
            if !self.is_ingress(doc) {
                return Vec::new();
            }
            let live = live_ingress_machines(doc, &me, &peers);
            let certs = doc.certificates();
            let orders = doc.acme_orders();
            table
                .tls_hosts()
                .into_iter()
                .filter(|h| orderer(h, &live) == Some(&me))
                .filter(|h| needs_order(certs.get(h), (now / 1000) as i64).is_some())
                .filter_map(|h| {
                    let o = orders.get(&h).cloned().unwrap_or_default();
                    let leased =
                        o.ordering.as_ref().is_some_and(|m| m != &me) && o.lease_until_ms > now;
                    (!leased && o.next_try_ms <= now).then_some((h, o))
                })
                .collect()
        });
        let expired = self.node.read(|doc| {
            doc.acme_challenges(0)
                .len()
                .saturating_sub(doc.acme_challenges(now).len())
        });
        if expired > 0 {
            let _ = self.node.write(|doc| doc.drop_expired_acme_challenges(now));
        }
        for (host, order) in due {
            if !self
                .ordering
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(host.clone())
            {
                continue;
            }
            let agent = self.clone();
            self.tracker.spawn(async move {
                agent.order(&host, order).await;
                agent
                    .ordering
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&host);
            });
        }
    }

    async fn order(&self, host: &str, mut status: OrderStatus) {
        let me = self.node.machine_id.clone();
        status.ordering = Some(me.clone());
        status.lease_until_ms = now_ms() + ORDER_LEASE.as_millis() as u64;
        if let Err(e) = self.node.write(|doc| doc.put_acme_order(host, &status)) {
            warn!(host, error = %e, "could not claim the certificate order");
            return;
        }
        info!(host, directory = %self.node.config.acme.directory, "ordering a certificate");
        let cfg = &self.node.config.acme;
        let result = tokio::time::timeout(cfg.timeout + Duration::from_secs(30), async {
            let stored = self
                .node
                .read(|doc| doc.acme_account())
                .filter(|a| a.directory == cfg.directory)
                .map(|a| a.credentials);
            let (account, fresh) = acme::account(cfg, stored.as_deref()).await?;
            if let Some(credentials) = fresh {
                let a = uc_crdt::AcmeAccount {
                    directory: cfg.directory.clone(),
                    credentials,
                };
                self.node
                    .write(|doc| doc.set_acme_account(&a))
                    .map_err(|e| uc_ingress::Error::Acme(format!("storing the account: {e}")))?;
            }
            let sink = StateChallenges(self.node.clone());
            acme::issue(cfg, &account, &[host.to_owned()], &sink).await
        })
        .await
        .unwrap_or_else(|_| Err(uc_ingress::Error::Acme("the CA took too long".into())));
        let now = now_ms();
        let outcome = result.and_then(|issued| {
            let cert = Cert::from_pem(&issued.chain_pem, &issued.key_pem)?;
            Ok(CertRecord {
                chain_pem: issued.chain_pem,
                key_pem: issued.key_pem,
                not_before: cert.not_before,
                not_after: cert.not_after,
                issued_by: me.clone(),
                issued_at_ms: now,
            })
        });
        let written = match outcome {
            Ok(rec) => {
                info!(host, not_after = rec.not_after, "certificate issued");
                let done = OrderStatus::default();
                self.node.write(|doc| {
                    doc.put_certificate(host, &rec)?;
                    doc.put_acme_order(host, &done)
                })
            }
            Err(e) => {
                status.failures += 1;
                let wait = acme::retry_after(status.failures);
                warn!(host, error = %e, retry_in_s = wait.as_secs(), "certificate order failed");
                status.ordering = None;
                status.lease_until_ms = 0;
                status.last_error = Some(e.to_string());
                status.next_try_ms = now + wait.as_millis() as u64;
                self.node.write(|doc| doc.put_acme_order(host, &status))
            }
        };
        if let Err(e) = written {
            warn!(host, error = %e, "could not store the order's outcome");
        }
    }

    /// Routes, certificates and the ingress machines, for `uc ingress ls`.
    pub fn listing(&self) -> Listing {
        let me = self.node.machine_id.clone();
        let peers = self.node.peers();
        let now_s = (now_ms() / 1000) as i64;
        let (table, machines, certs, orders) = self.node.read(|doc| {
            let machines = doc
                .machines()
                .into_iter()
                .filter(|m| m.is_active() && m.tags.contains(TAG))
                .map(|m| IngressMachine {
                    liveness: if m.id == me {
                        "live".into()
                    } else {
                        peers
                            .get(&m.id)
                            .map_or(Liveness::Unknown, |p| p.liveness)
                            .as_str()
                            .into()
                    },
                    name: m.name,
                })
                .collect::<Vec<_>>();
            let names: HashMap<MachineId, String> =
                doc.machines().into_iter().map(|m| (m.id, m.name)).collect();
            let orders: BTreeMap<String, (OrderStatus, Option<String>)> = doc
                .acme_orders()
                .into_iter()
                .map(|(h, o)| {
                    let who = o.ordering.as_ref().and_then(|m| names.get(m).cloned());
                    (h, (o, who))
                })
                .collect();
            let certs: BTreeMap<String, (CertRecord, Option<String>)> = doc
                .certificates()
                .into_iter()
                .map(|(h, c)| {
                    let who = names.get(&c.issued_by).cloned();
                    (h, (c, who))
                })
                .collect();
            (
                RouteTable::build(&route_inputs(doc, &me, &peers)),
                machines,
                certs,
                orders,
            )
        });
        let mut routes = Vec::new();
        for r in table.http_routes() {
            routes.push(RouteLine {
                route: format!(
                    "{}://{}{}",
                    if r.tls { "https" } else { "http" },
                    r.host.as_deref().unwrap_or("*"),
                    match (r.tls, r.public_port) {
                        (false, 80) | (true, 443) => String::new(),
                        (_, p) => format!(":{p}"),
                    }
                ),
                kind: if r.tls { "https" } else { "http" }.into(),
                service: r.service.clone(),
                backends: r.backends.iter().map(|b| b.addr).collect(),
            });
        }
        for r in table.tcp_routes() {
            routes.push(RouteLine {
                route: format!("tcp :{}", r.public_port),
                kind: "tcp".into(),
                service: r.service.clone(),
                backends: r.backends.iter().map(|b| b.addr).collect(),
            });
        }
        let certificates = table
            .tls_hosts()
            .into_iter()
            .map(|host| {
                let cert = certs.get(&host);
                let order = orders.get(&host);
                let now_ms = now_s as u64 * 1000;
                let status = match (cert, order) {
                    (_, Some((o, Some(who)))) if o.lease_until_ms > now_ms => {
                        format!("ordering (by {who})")
                    }
                    (Some((c, _)), _) if c.not_after <= now_s => "expired".into(),
                    (Some((c, _)), _) if needs_order(Some(c), now_s).is_some() => {
                        "valid, renewal due".into()
                    }
                    (Some(_), _) => "valid".into(),
                    (None, Some((o, _))) if o.failures > 0 => format!(
                        "failed {} time{}, next try in {} s",
                        o.failures,
                        if o.failures == 1 { "" } else { "s" },
                        o.next_try_ms.saturating_sub(now_ms) / 1000
                    ),
                    (None, _) => "waiting for an order".into(),
                };
                CertLine {
                    not_after: cert.map(|(c, _)| c.not_after),
                    issued_by: cert.and_then(|(_, who)| who.clone()),
                    last_error: order.and_then(|(o, _)| o.last_error.clone()),
                    host,
                    status,
                }
            })
            .collect();
        Listing {
            machines,
            refused: table.refused.clone(),
            routes,
            certificates,
            listen_errors: self
                .listen_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// HTTP-01 challenges go into the replicated state, so every ingress machine answers them.
struct StateChallenges(Arc<Node>);

impl Challenges for StateChallenges {
    fn publish(&self, token: &str, key_auth: &str) -> Result<(), uc_ingress::Error> {
        let c = Challenge {
            key_auth: key_auth.to_owned(),
            expires_at_ms: now_ms() + CHALLENGE_TTL.as_millis() as u64,
        };
        self.0
            .write(|doc| doc.put_acme_challenge(token, &c))
            .map_err(|e| uc_ingress::Error::Acme(format!("publishing the challenge: {e}")))
    }

    fn withdraw(&self, token: &str) {
        if let Err(e) = self.0.write(|doc| doc.remove_acme_challenge(token)) {
            warn!(error = %e, "could not withdraw an ACME challenge");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_orderer_per_host_the_same_everywhere() {
        let ms: Vec<MachineId> = (1..=3u8).map(|i| MachineId::from_bytes([i; 16])).collect();
        let a = orderer("a.example.com", &ms).unwrap().clone();
        let mut rev = ms.clone();
        rev.reverse();
        assert_eq!(orderer("a.example.com", &rev), Some(&a));
        let chosen: HashSet<&MachineId> = (0..20)
            .map(|i| orderer(&format!("h{i}.example.com"), &ms).unwrap())
            .collect();
        assert!(chosen.len() > 1, "hosts spread over machines");
        assert_eq!(orderer("a.example.com", &[]), None);
    }

    #[test]
    fn routes_take_running_containers_on_machines_not_known_dead() {
        use std::collections::BTreeSet;
        use uc_crdt::{Container, NewMachine};
        use uc_proto::{ContainerId, ServiceId};
        let mut doc =
            ClusterState::new_cluster("c", "10.210.0.0/16".parse().unwrap(), [9; 16], 1).unwrap();
        let ids: Vec<MachineId> = (1..=3u8).map(|i| MachineId::from_bytes([i; 16])).collect();
        for (i, id) in ids.iter().enumerate() {
            doc.add_machine(
                NewMachine {
                    id: id.clone(),
                    name: format!("m{i}"),
                    public_key: String::new(),
                    endpoints: vec![],
                    tags: BTreeSet::new(),
                },
                1,
            )
            .unwrap();
        }
        let spec = |ports: &[&str]| {
            serde_json::json!({"image": "demo", "runtime": "nspawn", "mode": "replicated",
                "replicas": 3, "ports": ports})
        };
        let web = ServiceId::from_bytes([1; 16]);
        doc.put_service(web.clone(), "web", spec(&["w.example.com:80/https"]), 10)
            .unwrap();
        doc.put_service(
            ServiceId::from_bytes([2; 16]),
            "plain",
            spec(&["8080:80@host"]),
            5,
        )
        .unwrap();
        for (n, (machine, address, desired)) in [
            (&ids[0], [10, 210, 1, 2], DesiredState::Running),
            (&ids[1], [10, 210, 2, 2], DesiredState::Running),
            (&ids[2], [10, 210, 3, 2], DesiredState::Running),
            (&ids[0], [10, 210, 1, 3], DesiredState::Stopped),
        ]
        .into_iter()
        .enumerate()
        {
            doc.put_container(Container {
                id: ContainerId::from_bytes([10 + n as u8; 16]),
                service: web.clone(),
                machine: machine.clone(),
                address: Some(address.into()),
                desired,
                created_at_ms: 1,
            })
            .unwrap();
        }
        let peer = |liveness| PeerInfo::bare(liveness, 0);
        let peers = HashMap::from([
            (ids[1].clone(), peer(Liveness::Suspect)),
            (ids[2].clone(), peer(Liveness::Dead)),
        ]);
        let inputs = route_inputs(&doc, &ids[0], &peers);
        assert_eq!(
            inputs.len(),
            1,
            "a service without ingress ports has no routes"
        );
        assert_eq!(inputs[0].name, "web");
        let got: Vec<(String, bool)> = inputs[0]
            .containers
            .iter()
            .map(|c| (c.ip.to_string(), c.local))
            .collect();
        // m0's running one (local), m1's (suspect is not dead); not m2's (dead), not the stopped one.
        assert_eq!(
            got,
            [
                ("10.210.1.2".to_owned(), true),
                ("10.210.2.2".to_owned(), false)
            ]
        );
        assert_eq!(live_ingress_machines(&doc, &ids[0], &peers), vec![]);
        doc.set_machine_tag(&ids[0], TAG, true).unwrap();
        doc.set_machine_tag(&ids[2], TAG, true).unwrap();
        assert_eq!(
            live_ingress_machines(&doc, &ids[0], &peers),
            vec![ids[0].clone()],
            "a dead ingress machine orders nothing"
        );
    }

    #[test]
    fn order_when_missing_or_a_third_of_life_left() {
        let c = CertRecord {
            chain_pem: String::new(),
            key_pem: String::new(),
            not_before: 0,
            not_after: 90,
            issued_by: MachineId::from_bytes([1; 16]),
            issued_at_ms: 0,
        };
        assert!(needs_order(None, 0).is_some());
        assert!(needs_order(Some(&c), 59).is_none());
        assert!(needs_order(Some(&c), 60).is_some());
    }
}
