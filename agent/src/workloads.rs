//! The agent's workloads: the runtimes of this machine, its image store, and
//! the reconciler that makes what runs here match what the document places
//! here (on every change of the document, and every second for crashed
//! workloads' restarts). Global services get their container on this machine
//! from here too. Images a placed container needs are fetched from a machine
//! that has them, over the mesh.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uc_crdt::{Container, DesiredState};
use uc_proto::spec::{Mode, RuntimeKind, ServiceSpec};
use uc_proto::v1::{FetchImageRequest, WorkloadStatus};
use uc_proto::{ContainerId, MachineId};
use uc_workload::image::{ImageMeta, ImageStore};
use uc_workload::ports;
use uc_workload::reconcile::{self, Action, Backoff, Have, Seen, Want};
use uc_workload::runtime::{Runtime, Workload, WorkloadDirs};

use crate::node::{Liveness, Node, now_ms};

pub struct Workloads {
    node: Arc<Node>,
    pub images: ImageStore,
    runtimes: Vec<Arc<dyn Runtime>>,
    /// Each runtime kind: Ok, or why it does not work here (probed again every
    /// [`REPROBE`]).
    available: std::sync::RwLock<BTreeMap<RuntimeKind, Result<(), String>>>,
    /// [`runtimes_text`] of `available`, for gossip.
    runtimes_tx: tokio::sync::watch::Sender<String>,
    /// Restart backoff per crashed container, and the exit it was computed for.
    backoff: Mutex<BTreeMap<ContainerId, (Backoff, u64)>>,
    /// The last error making or starting a container (shown by `uc ps`).
    errors: Mutex<BTreeMap<ContainerId, String>>,
    kick: Notify,
    /// The names of the images here, as gossip carries them; sent again after an import or a
    /// fetch, so that gossip learns of it without watching the store.
    images_tx: tokio::sync::watch::Sender<String>,
    /// Serializes reconciliation passes.
    pass: tokio::sync::Mutex<()>,
    /// Why a container has not its host ports, from the last pass (shown by `uc ps`).
    port_errors: Mutex<BTreeMap<ContainerId, String>>,
    /// What the kernel was last made to forward.
    published: tokio::sync::Mutex<Published>,
}

/// The host ports last published, and when the table was last seen in the kernel.
struct Published {
    /// `None`: not yet since the agent started, or the table went missing.
    forwards: Option<Vec<ports::Forward>>,
    checked: std::time::Instant,
}

/// How often the port table, while unchanged, is checked to be still in the kernel.
const PORTS_CHECK: Duration = Duration::from_secs(10);

/// How often the runtimes are asked again whether they work here.
const REPROBE: Duration = Duration::from_secs(10);

/// Each runtime kind: Ok, or why it does not work here.
async fn probe(runtimes: &[Arc<dyn Runtime>]) -> BTreeMap<RuntimeKind, Result<(), String>> {
    // At once: the first probe of the vm runtime may boot a VM to see whether KVM works.
    futures::future::join_all(RuntimeKind::ALL.into_iter().map(|kind| async move {
        let a = match runtimes.iter().find(|r| r.kind() == kind) {
            Some(r) => r.available().await,
            None => Err("not built into this version of ucd".into()),
        };
        (kind, a)
    }))
    .await
    .into_iter()
    .collect()
}

/// Sends `text` to the watchers if it differs from what they have; true if it did.
fn publish(tx: &tokio::sync::watch::Sender<String>, text: String) -> bool {
    tx.send_if_modified(|old| {
        let changed = *old != text;
        *old = text;
        changed
    })
}

/// The runtimes that work, as gossip carries them: `nspawn,docker`.
fn runtimes_text(available: &BTreeMap<RuntimeKind, Result<(), String>>) -> String {
    available
        .iter()
        .filter(|(_, a)| a.is_ok())
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// How long a stopped workload gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Workloads {
    pub async fn new(node: Arc<Node>) -> Arc<Workloads> {
        let data = node.config.data_dir.clone();
        let images = ImageStore::new(data.join("images"));
        let dirs = WorkloadDirs::new(data.join("workloads"));
        let shim_exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ucd"));
        let all: Vec<Arc<dyn Runtime>> = vec![
            Arc::new(uc_workload::nspawn::Nspawn::new(
                images.clone(),
                dirs.clone(),
                shim_exe.clone(),
            )),
            Arc::new(uc_workload::vm::Vm::new(
                images.clone(),
                dirs,
                shim_exe,
                &data,
                node.config.vm_kit.clone(),
                node.config.vm_accel,
            )),
            Arc::new(uc_workload::docker::Docker::new(
                node.config.docker_host.clone(),
                images.clone(),
                node.config.wg_interface.clone(),
            )),
        ];
        let runtimes: Vec<Arc<dyn Runtime>> = RuntimeKind::ALL
            .iter()
            .filter_map(|k| all.iter().find(|r| r.kind() == *k).cloned())
            .collect();
        let available = probe(&runtimes).await;
        let (runtimes_tx, _) = tokio::sync::watch::channel(runtimes_text(&available));
        let (images_tx, _) = tokio::sync::watch::channel(images_text(&images));
        Arc::new(Workloads {
            node,
            images_tx,
            images,
            runtimes,
            available: std::sync::RwLock::new(available),
            runtimes_tx,
            backoff: Mutex::default(),
            errors: Mutex::default(),
            kick: Notify::new(),
            pass: tokio::sync::Mutex::new(()),
            port_errors: Mutex::default(),
            published: tokio::sync::Mutex::new(Published {
                forwards: None,
                checked: std::time::Instant::now(),
            }),
        })
    }

    /// Each runtime kind: Ok, or why it does not work here.
    pub fn available(&self) -> BTreeMap<RuntimeKind, Result<(), String>> {
        self.available
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The runtimes that work here, as gossip carries them (`nspawn,docker`), now and after
    /// every change.
    pub fn subscribe_runtimes(&self) -> tokio::sync::watch::Receiver<String> {
        self.runtimes_tx.subscribe()
    }

    /// Asks every runtime again whether it works here: a Docker engine installed or
    /// started after the agent is found, one that went away is reported.
    pub async fn reprobe(&self) {
        let now = probe(&self.runtimes).await;
        let text = runtimes_text(&now);
        *self.available.write().unwrap_or_else(|p| p.into_inner()) = now;
        if publish(&self.runtimes_tx, text.clone()) {
            tracing::info!(runtimes = %text, "the runtimes that work here changed");
        }
    }

    /// The names of the images here, as gossip carries them, now and after every change.
    pub fn subscribe_images(&self) -> tokio::sync::watch::Receiver<String> {
        self.images_tx.subscribe()
    }

    /// Tells gossip that the image store changed (an import or a fetch).
    pub fn images_changed(&self) {
        publish(&self.images_tx, images_text(&self.images));
    }

    fn runtime(&self, kind: RuntimeKind) -> Option<&Arc<dyn Runtime>> {
        let ok = self
            .available
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kind)
            .is_some_and(|a| a.is_ok());
        if ok {
            self.runtimes.iter().find(|r| r.kind() == kind)
        } else {
            None
        }
    }

    /// Asks for a reconciliation pass now.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    pub fn spawn(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        let me = self.clone();
        let mut heads = self.node.subscribe_heads();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let shutdown = stop;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = heads.changed() => if r.is_err() { break },
                    _ = me.kick.notified() => {}
                    _ = tick.tick() => {}
                }
                if !me.node.is_ready() {
                    continue;
                }
                // A pass can take a while (a stop waits for its grace); it
                // must not hold up shutdown, which leaves workloads running.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = me.reconcile_once() => {}
                }
            }
        });
        let me = self.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(REPROBE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = me.reprobe() => me.kick(),
                }
            }
        });
    }

    /// The workloads of this machine as the runtimes see them.
    pub async fn statuses(&self) -> Vec<WorkloadStatus> {
        let mut out = Vec::new();
        // A port error is this pass's; a runtime error may be older.
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        errors.extend(
            self.port_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        for r in &self.runtimes {
            for s in r.list().await {
                let (state, since, code) = match s.seen {
                    Seen::Running { since_ms } => ("running", since_ms, 0),
                    Seen::Exited { code, at_ms } => ("exited", at_ms, code),
                };
                out.push(WorkloadStatus {
                    container_id: s.meta.id.to_string(),
                    service: s.meta.service.clone(),
                    runtime: s.meta.runtime.to_string(),
                    state: state.into(),
                    since_unix_ms: since,
                    exit_code: code,
                    restarts: s.meta.restarts,
                    error: errors.get(&s.meta.id).cloned().unwrap_or_default(),
                    pid: s.pid.unwrap_or(0),
                    image: s.meta.image.clone(),
                });
            }
        }
        // Containers that could not be made at all have no directory: say why.
        for (id, e) in errors {
            if !out.iter().any(|w| w.container_id == id.as_str()) {
                out.push(WorkloadStatus {
                    container_id: id.to_string(),
                    state: "failed".into(),
                    error: e,
                    ..Default::default()
                });
            }
        }
        out
    }

    pub async fn logs(&self, id: &ContainerId, n: usize) -> Vec<uc_workload::shim::LogLine> {
        for r in &self.runtimes {
            let lines = r.logs(id, n).await;
            if !lines.is_empty() {
                return lines;
            }
        }
        Vec::new()
    }

    /// Runs a command in one of this machine's containers, through its service's runtime.
    pub async fn exec(
        &self,
        id: &ContainerId,
        req: uc_workload::exec::ExecRequest,
    ) -> Result<uc_workload::exec::Exec, tonic::Status> {
        let kind = self
            .node
            .read(|doc| {
                let c = doc.container(id)?;
                if c.machine != self.node.machine_id {
                    return None;
                }
                let s = doc.services().into_iter().find(|s| s.id == c.service)?;
                ServiceSpec::from_json(&s.spec).ok().map(|s| s.runtime)
            })
            .ok_or_else(|| {
                tonic::Status::not_found(format!(
                    "container {} is not placed on this machine",
                    id.short()
                ))
            })?;
        let rt = self
            .runtimes
            .iter()
            .find(|r| r.kind() == kind)
            .ok_or_else(|| tonic::Status::failed_precondition(format!("no {kind} runtime")))?;
        rt.exec(id, req)
            .await
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))
    }

    /// Which containers get their host ports, and the forwards that result. A container
    /// that loses a clash ([`ports::claim`]) is not run; one not made yet whose port a program
    /// of this machine holds is not made (tried again every pass). Both keep an error that
    /// says why, for `uc ps`.
    fn settle_ports(
        &self,
        claims: Vec<ports::Claim>,
        want: &mut Vec<Want>,
        have: &[Have],
    ) -> Vec<ports::Forward> {
        let exists = |id: &ContainerId| have.iter().any(|h| &h.id == id);
        let mut blocked: BTreeMap<ContainerId, String> = claims
            .iter()
            .filter(|c| !exists(&c.container))
            .filter_map(|c| {
                let why = c.ports.iter().find_map(|(p, _)| ports::unavailable(p))?;
                Some((c.container.clone(), why))
            })
            .collect();
        let (mut forwards, refused) = ports::claim(claims);
        // A lost clash says so rather than that a program holds the port.
        blocked.extend(refused);
        {
            let mut errors = self.port_errors.lock().unwrap_or_else(|p| p.into_inner());
            for (id, why) in &blocked {
                if errors.get(id) != Some(why) {
                    tracing::warn!(container = %id.short(), why = %why, "not running a container: its host port");
                }
            }
            *errors = blocked.clone();
        }
        // Not made yet: not made. Made already (it lost a clash): stopped.
        want.retain(|w| !blocked.contains_key(&w.id) || exists(&w.id));
        for w in want.iter_mut().filter(|w| blocked.contains_key(&w.id)) {
            w.running = false;
        }
        forwards.retain(|f| !blocked.contains_key(&f.container));
        forwards
    }

    fn route_localnet(&self, on: bool) -> bool {
        match ports::route_localnet(on) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, on, "setting route_localnet on the bridge failed");
                false
            }
        }
    }

    /// Makes the kernel forward exactly `forwards` (only when they changed since the last
    /// time it worked). A failure is each forwarding container's error.
    async fn publish_ports(&self, forwards: Vec<ports::Forward>) {
        let mut published = self.published.lock().await;
        let Published {
            forwards: last,
            checked,
        } = &mut *published;
        if last.as_ref() == Some(&forwards) {
            // Unchanged; but someone may have flushed the ruleset. Look every few seconds.
            if forwards.is_empty() || checked.elapsed() < PORTS_CHECK {
                return;
            }
            *checked = std::time::Instant::now();
            if ports::table_present().await {
                return;
            }
            tracing::warn!(
                "uc's nftables table of host ports is gone (a flushed ruleset?); making it again"
            );
            // Its guard went with it.
            self.route_localnet(false);
            *last = None;
        }
        match ports::apply(&forwards).await {
            Ok(()) => {
                for f in &forwards {
                    if last.as_ref().is_none_or(|l| !l.contains(f)) {
                        tracing::info!(container = %f.container.short(), port = %f.port, to = %f.to, "host port published");
                    }
                }
                *last = Some(forwards);
            }
            Err(e) if forwards.is_empty() => {
                // nft is there but does not work (no nf_tables?): nothing needs it now. Say so
                // once, not every pass.
                tracing::warn!(error = %e, "clearing uc's host port table failed");
                *last = Some(forwards);
            }
            Err(e) => {
                tracing::warn!(error = %e, "publishing host ports failed");
                let mut errors = self.port_errors.lock().unwrap_or_else(|p| p.into_inner());
                for f in &forwards {
                    errors.insert(f.container.clone(), e.to_string());
                }
            }
        }
    }

    fn set_error(&self, id: &ContainerId, e: Option<String>) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Some(e) => {
                errors.insert(id.clone(), e);
            }
            None => {
                errors.remove(id);
            }
        }
    }

    /// Puts this machine's container of every global service it lacks into the document.
    fn place_global(&self) {
        let me = &self.node.machine_id;
        let todo: Vec<(uc_proto::ServiceId, ServiceSpec)> = self.node.read(|doc| {
            let containers = doc.containers();
            doc.services()
                .into_iter()
                .filter_map(|s| Some((s.id, ServiceSpec::from_json(&s.spec).ok()?)))
                .filter(|(id, spec)| {
                    spec.mode == Mode::Global
                        && (spec.machines.is_empty()
                            || spec.machines.iter().any(|m| m == me.as_str()))
                        && self.runtime(spec.runtime).is_some()
                        && !containers
                            .iter()
                            .any(|c| &c.service == id && &c.machine == me)
                })
                .collect()
        });
        for (service, spec) in todo {
            let r = self.node.write(|doc| {
                let Some(m) = doc.machine(me) else {
                    return Ok(());
                };
                if !m.is_active() {
                    return Ok(());
                }
                // A host port another service holds here: no container here (logged at debug
                // level; `uc run --mode global` refuses such a clash on the machines it knows).
                let blocked = crate::services::port_blocked(doc, &spec.held_ports(), &service);
                if let Some(why) = blocked.get(me) {
                    tracing::debug!(service = %service, why = %why, "not placing a global service here");
                    return Ok(());
                }
                let used = doc.containers().iter().filter_map(|c| c.address).collect();
                let Some(address) = uc_workload::place::free_address(m.subnet, &used) else {
                    return Ok(());
                };
                doc.put_container(Container {
                    id: ContainerId::from_bytes(crate::token::random16()),
                    service: service.clone(),
                    machine: me.clone(),
                    address: Some(address),
                    desired: DesiredState::Running,
                    created_at_ms: now_ms(),
                })
            });
            if let Err(e) = r {
                tracing::warn!(service = %service, error = %e, "placing a global service here failed");
            }
        }
    }

    /// One reconciliation pass.
    pub async fn reconcile_once(&self) {
        let _pass = self.pass.lock().await;
        self.place_global();
        let me = self.node.machine_id.clone();
        let (machine, placed) = self.node.read(|doc| {
            let machine = doc.machine(&me);
            let services: BTreeMap<_, _> = doc
                .services()
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect();
            let placed: Vec<(Container, String, Option<ServiceSpec>)> = doc
                .containers()
                .into_iter()
                .filter(|c| c.machine == me)
                .filter_map(|c| {
                    let s = services.get(&c.service)?;
                    let spec = ServiceSpec::from_json(&s.spec).ok();
                    Some((c, s.name.clone(), spec))
                })
                .collect();
            (machine, placed)
        });
        let active = machine.as_ref().is_some_and(|m| m.is_active());
        let mut want = Vec::new();
        let mut claims = Vec::new();
        let mut workloads: BTreeMap<ContainerId, Workload> = BTreeMap::new();
        if let (true, Some(m)) = (active, &machine) {
            let gateway = m.subnet.host(1).expect("a /24 has a first host");
            for (c, name, spec) in placed {
                let (Some(spec), Some(address)) = (spec, c.address) else {
                    self.set_error(&c.id, Some("its service's spec is not valid".into()));
                    continue;
                };
                let digest = digest(&spec, address);
                let host_ports = spec.host_ports();
                if c.desired == DesiredState::Running && !host_ports.is_empty() {
                    claims.push(ports::Claim {
                        container: c.id.clone(),
                        service: name.clone(),
                        created_at_ms: c.created_at_ms,
                        address,
                        ports: host_ports,
                    });
                }
                want.push(Want {
                    id: c.id.clone(),
                    digest: digest.clone(),
                    running: c.desired == DesiredState::Running,
                });
                workloads.insert(
                    c.id.clone(),
                    Workload {
                        id: c.id.clone(),
                        service: name,
                        spec,
                        address,
                        prefix: m.subnet.prefix(),
                        gateway,
                        machine: m.name.clone(),
                        digest,
                    },
                );
            }
        }
        let mut have = Vec::new();
        let mut kinds = BTreeMap::new();
        for r in &self.runtimes {
            for s in r.list().await {
                kinds.insert(s.meta.id.clone(), r.kind());
                have.push(Have {
                    id: s.meta.id.clone(),
                    digest: s.meta.digest.clone(),
                    seen: s.seen,
                });
                // A crash: count it once, for the backoff.
                if let Seen::Exited { at_ms, code } = s.seen {
                    let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
                    let prev = b.get(&s.meta.id).copied();
                    if prev.is_none_or(|(_, at)| at != at_ms) {
                        let next = Backoff::after_exit(prev.map(|p| p.0), s.meta.started_ms, at_ms);
                        if want.iter().any(|w| w.id == s.meta.id && w.running) {
                            tracing::info!(container = %s.meta.id.short(), service = %s.meta.service, code, delay_ms = next.until_ms.saturating_sub(at_ms), "workload exited; restarting after backoff");
                        }
                        b.insert(s.meta.id.clone(), (next, at_ms));
                    }
                }
            }
        }
        let keep: std::collections::BTreeSet<ContainerId> =
            want.iter().map(|w| w.id.clone()).collect();
        let forwards = self.settle_ports(claims, &mut want, &have);
        let backoff: BTreeMap<ContainerId, Backoff> = self
            .backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect();
        let actions = reconcile::reconcile(&want, &have, &backoff, now_ms());
        // Ports first: once `uc run` sees a container running, its host ports forward.
        // `route_localnet` is on only while the table (and its guard) is in place: off before
        // the table goes, on after it came and the first container made the bridge.
        // (If it cannot be turned off, the table and its guard stay.)
        if !forwards.is_empty() || self.route_localnet(false) {
            self.publish_ports(forwards).await;
        }
        for action in actions {
            self.apply(action, &workloads, &kinds).await;
        }
        let in_place = self
            .published
            .lock()
            .await
            .forwards
            .as_ref()
            .is_some_and(|f| !f.is_empty());
        if in_place {
            self.route_localnet(true);
        }
        // Forget what is gone.
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep.contains(k));
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep.contains(k));
    }

    async fn apply(
        &self,
        action: Action,
        workloads: &BTreeMap<ContainerId, Workload>,
        kinds: &BTreeMap<ContainerId, RuntimeKind>,
    ) {
        match action {
            Action::Create(id) => {
                let Some(w) = workloads.get(&id) else { return };
                let Some(rt) = self.runtime(w.spec.runtime) else {
                    let why = self
                        .available()
                        .get(&w.spec.runtime)
                        .and_then(|a| a.clone().err())
                        .unwrap_or_default();
                    self.set_error(
                        &id,
                        Some(format!(
                            "runtime {} is not available here: {why}",
                            w.spec.runtime
                        )),
                    );
                    return;
                };
                if self.images.get(&w.spec.image).is_none()
                    && let Err(e) = self.fetch_image(&w.spec.image).await
                {
                    self.set_error(&id, Some(format!("{e:#}")));
                    return;
                }
                let t = std::time::Instant::now();
                match rt.create(w).await {
                    Ok(()) => {
                        if let Err(e) = uc_workload::net::forget_neighbor(w.address).await {
                            tracing::debug!(error = %e, "forgetting the old neighbour entry");
                        }
                        tracing::info!(container = %id.short(), service = %w.service, address = %w.address, ms = t.elapsed().as_millis() as u64, "workload started");
                        self.set_error(&id, None);
                    }
                    Err(e) => {
                        tracing::warn!(container = %id.short(), service = %w.service, error = %e, "making workload failed");
                        self.set_error(&id, Some(e.to_string()));
                    }
                }
            }
            Action::Start(id) => {
                let Some(rt) = kinds.get(&id).and_then(|k| self.runtime(*k)) else {
                    return;
                };
                if let Err(e) = rt.start(&id).await {
                    tracing::warn!(container = %id.short(), error = %e, "restarting workload failed");
                    self.set_error(&id, Some(e.to_string()));
                }
            }
            Action::Stop(id) => {
                let Some(rt) = kinds.get(&id).and_then(|k| self.runtime(*k)) else {
                    return;
                };
                if let Err(e) = rt.stop(&id, STOP_GRACE).await {
                    tracing::warn!(container = %id.short(), error = %e, "stopping workload failed");
                }
            }
            Action::Remove(id) => {
                let Some(rt) = kinds
                    .get(&id)
                    .and_then(|k| self.runtimes.iter().find(|r| r.kind() == *k))
                else {
                    return;
                };
                match rt.remove(&id).await {
                    Ok(()) => tracing::info!(container = %id.short(), "workload removed"),
                    Err(e) => {
                        tracing::warn!(container = %id.short(), error = %e, "removing workload failed")
                    }
                }
            }
        }
    }

    /// Gets an image from a live machine whose gossip says it has it.
    async fn fetch_image(&self, name: &str) -> anyhow::Result<ImageMeta> {
        // Machines whose gossip says they have it first, then every other
        // live machine: gossip may not have carried a fresh import yet.
        let mut live: Vec<(bool, MachineId)> = self
            .node
            .peers()
            .into_iter()
            .filter(|(_, p)| p.liveness == Liveness::Live)
            .map(|(id, p)| (!p.images.iter().any(|i| i == name), id))
            .collect();
        live.sort();
        let holders: Vec<MachineId> = live.into_iter().map(|(_, id)| id).collect();
        if holders.is_empty() {
            anyhow::bail!(
                "image {name:?} is on no live machine of the cluster (uc image import it)"
            );
        }
        let mut last = None;
        for m in holders {
            let addr = self
                .node
                .peer_api_addr(&m)
                .ok_or_else(|| anyhow::anyhow!("the mesh is not up"))?;
            let t = std::time::Instant::now();
            match self.fetch_from(&addr.to_string(), name).await {
                Ok(meta) => {
                    tracing::info!(image = name, from = %m.short(), bytes = meta.size_bytes, ms = t.elapsed().as_millis() as u64, "image fetched");
                    return Ok(meta);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one holder was tried"))
    }

    async fn fetch_from(&self, addr: &str, name: &str) -> anyhow::Result<ImageMeta> {
        let mut client = crate::peer::client(addr)?;
        let mut stream = client
            .fetch_image(FetchImageRequest { name: name.into() })
            .await?
            .into_inner();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let images = self.images.clone();
        let fallback = name.to_owned();
        let import = tokio::task::spawn_blocking(move || {
            images.import(ChannelReader::new(rx), None, &fallback, now_ms())
        });
        while let Some(chunk) = stream.message().await? {
            if tx.send(chunk.data).is_err() {
                break;
            }
        }
        drop(tx);
        let meta = import.await??;
        self.images_changed();
        Ok(meta)
    }
}

/// The names of the images in `store`, comma-separated.
fn images_text(store: &ImageStore) -> String {
    store
        .list()
        .unwrap_or_default()
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// A digest of what a container is made from: a change makes it again.
/// What a container is made from: a change of it replaces the container. How many there are
/// (the mode) and where they may go (the machines) are not: `uc scale` keeps the ones that run.
fn digest(spec: &ServiceSpec, address: std::net::Ipv4Addr) -> String {
    let made_of = ServiceSpec {
        mode: Mode::Replicated { replicas: 1 },
        machines: Vec::new(),
        ..spec.clone()
    };
    let text = format!("{}|{address}", made_of.to_json());
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref()[..8])
}

/// Reads what a channel of chunks carries (an image arriving over gRPC, into a blocking import).
pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    pub fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
