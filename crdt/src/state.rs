//! `ClusterState`: the automerge document, its layout, typed accessors and
//! mutations, save/load, and the sync wrappers.
//!
//! Layout (never visible to callers):
//!
//! ```text
//! ROOT
//!   cluster:     { id, network, created_at_ms }
//!   machines:    { <id>: { name, public_key, endpoints (JSON text), subnet,
//!                          tags: { <tag>: true }, state, created_at_ms } }
//!   services:    { <id>: { name, spec (JSON text), created_at_ms } }
//!   containers:  { <id>: { service, machine, address (text or null), desired, created_at_ms } }
//!   join_tokens: { <hash>: expires_at_ms }
//! ```
//!
//! Every field is its own key so that concurrent edits of different fields of
//! one record, or of different tags, all survive a merge. Values that must
//! change as a whole (endpoints, a service spec) are one scalar each, so that
//! concurrent writes pick one winner instead of interleaving. All top-level
//! maps are created once, by `new_cluster`; a record's nested maps are created
//! once, when the record is: two replicas creating the same object
//! concurrently would produce two objects of which only one survives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use automerge::sync::{Message, State as SyncState, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{
    ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, ScalarValueRef, Value,
    ValueRef,
};
use uc_proto::{ContainerId, MachineId, ServiceId, Subnet};

use crate::error::{Error, JoinTokenProblem};
use crate::model::{Container, DesiredState, Fix, Machine, MachineState, NewMachine, Service};
use crate::resolve;

const CLUSTER: &str = "cluster";
const MACHINES: &str = "machines";
const SERVICES: &str = "services";
const CONTAINERS: &str = "containers";
const JOIN_TOKENS: &str = "join_tokens";

/// At most this many rounds of the conflict rules per `resolve_conflicts`
/// call; one round is enough unless a fix creates a new conflict (a renamed
/// machine taking a name that was already used), which is rare.
const MAX_RESOLVE_ROUNDS: usize = 8;

/// The replicated cluster state. Each agent process holds one, with its own
/// actor id.
pub struct ClusterState {
    pub(crate) doc: AutoCommit,
    cluster_id: String,
    network: Subnet,
    created_at_ms: u64,
    roots: Roots,
}

/// Ids of the top-level maps, cached: they never change once created.
struct Roots {
    machines: ObjId,
    services: ObjId,
    containers: ObjId,
    join_tokens: ObjId,
}

/// Per-peer state of one sync session (automerge's `sync::State`). Start each
/// session (each stream to a peer) with a fresh one.
pub struct PeerSync(SyncState);

impl PeerSync {
    pub fn new() -> Self {
        Self(SyncState::new())
    }
}

impl Default for PeerSync {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PeerSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSync")
    }
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState")
            .field("cluster_id", &self.cluster_id)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

pub(crate) fn malformed(e: automerge::AutomergeError) -> Error {
    Error::Malformed(e.to_string())
}

// ---------------------------------------------------------------- reading

fn get_value<'a>(doc: &'a AutoCommit, obj: &ObjId, key: &str) -> Option<Value<'a>> {
    doc.get(obj, key).ok().flatten().map(|(v, _)| v)
}

pub(crate) fn get_str(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    get_value(doc, obj, key)?.as_str().map(str::to_owned)
}

fn get_u64(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<u64> {
    get_value(doc, obj, key)?.as_u64()
}

fn get_map(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key).ok().flatten()? {
        (Value::Object(ObjType::Map), id) => Some(id),
        _ => None,
    }
}

/// One field of a record, read in a single pass over the record's map.
enum Field {
    Str(String),
    U64(u64),
    Null,
    Map(ObjId),
    Other,
}

/// All fields of the map `obj`: one pass over it, much cheaper than one
/// `get` per field.
fn fields(doc: &AutoCommit, obj: &ObjId) -> HashMap<String, Field> {
    doc.map_range(obj, ..)
        .map(|item| {
            let field = match &item.value {
                ValueRef::Object(ObjType::Map) => Field::Map(item.id()),
                ValueRef::Scalar(ScalarValueRef::Str(s)) => Field::Str(s.to_string()),
                ValueRef::Scalar(ScalarValueRef::Uint(n)) => Field::U64(*n),
                ValueRef::Scalar(ScalarValueRef::Int(n)) => {
                    u64::try_from(*n).map_or(Field::Other, Field::U64)
                }
                ValueRef::Scalar(ScalarValueRef::Null) => Field::Null,
                _ => Field::Other,
            };
            (item.key.into_owned(), field)
        })
        .collect()
}

/// The records of the map `obj` whose key parses as an id: (id, record map).
fn records<'a, I: std::str::FromStr + 'a>(
    doc: &'a AutoCommit,
    obj: &ObjId,
) -> impl Iterator<Item = (I, ObjId)> + 'a {
    doc.map_range(obj, ..).filter_map(|item| match item.value {
        ValueRef::Object(ObjType::Map) => Some((item.key.parse().ok()?, item.id())),
        _ => None,
    })
}

fn field_str(f: &HashMap<String, Field>, key: &str) -> Option<String> {
    match f.get(key)? {
        Field::Str(s) => Some(s.clone()),
        _ => None,
    }
}

fn field_u64(f: &HashMap<String, Field>, key: &str) -> Option<u64> {
    match f.get(key)? {
        Field::U64(n) => Some(*n),
        _ => None,
    }
}

fn read_machine(doc: &AutoCommit, obj: &ObjId, id: MachineId) -> Option<Machine> {
    let f = fields(doc, obj);
    let endpoints = serde_json::from_str(&field_str(&f, "endpoints")?).ok()?;
    let Some(Field::Map(tags_obj)) = f.get("tags") else {
        return None;
    };
    Some(Machine {
        id,
        name: field_str(&f, "name")?,
        public_key: field_str(&f, "public_key")?,
        endpoints,
        subnet: field_str(&f, "subnet")?.parse().ok()?,
        tags: doc.keys(tags_obj).collect(),
        state: MachineState::parse(&field_str(&f, "state")?)?,
        created_at_ms: field_u64(&f, "created_at_ms")?,
    })
}

fn read_service(doc: &AutoCommit, obj: &ObjId, id: ServiceId) -> Option<Service> {
    let f = fields(doc, obj);
    Some(Service {
        id,
        name: field_str(&f, "name")?,
        spec: serde_json::from_str(&field_str(&f, "spec")?).ok()?,
        created_at_ms: field_u64(&f, "created_at_ms")?,
    })
}

fn read_container(doc: &AutoCommit, obj: &ObjId, id: ContainerId) -> Option<Container> {
    let f = fields(doc, obj);
    let address = match f.get("address")? {
        Field::Null => None,
        Field::Str(s) => Some(s.parse().ok()?),
        _ => return None,
    };
    Some(Container {
        id,
        service: field_str(&f, "service")?.parse().ok()?,
        machine: field_str(&f, "machine")?.parse().ok()?,
        address,
        desired: DesiredState::parse(&field_str(&f, "desired")?)?,
        created_at_ms: field_u64(&f, "created_at_ms")?,
    })
}

fn priority_machine(m: &Machine) -> (u64, MachineId) {
    (m.created_at_ms, m.id.clone())
}

fn address_value(address: Option<Ipv4Addr>) -> ScalarValue {
    match address {
        Some(a) => ScalarValue::Str(a.to_string().into()),
        None => ScalarValue::Null,
    }
}

/// DNS label rules: names end up in DNS.
/// Checks that `name` can be a DNS label (`<name>.internal`,
/// `<name>.machine.internal`); `kind` names the thing in the error.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
        })
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike std's
/// `DefaultHasher`), and enough to compare sets of sha256 change hashes.
fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The largest cluster network, /14: 1022 machine /24s.
const MIN_NETWORK_PREFIX: u8 = 14;

impl ClusterState {
    /// A new cluster; `actor` is 16 bytes chosen by the caller (random per
    /// agent process). Only the very first machine of a cluster calls this:
    /// every other replica starts from a copy of this document (`load`).
    pub fn new_cluster(
        cluster_id: &str,
        network: Subnet,
        actor: [u8; 16],
        now_ms: u64,
    ) -> Result<Self, Error> {
        if network.prefix() > 22 {
            return Err(Error::NetworkTooSmall(network));
        }
        // Every gossip datagram carries a digest of every machine: past
        // about a thousand machines it no longer fits in one UDP datagram,
        // even compressed (the agent's membership, bench/gossip-sim.sh).
        if network.prefix() < MIN_NETWORK_PREFIX {
            return Err(Error::NetworkTooLarge(network));
        }
        let mut doc = AutoCommit::new().with_actor(ActorId::from(actor));
        let cluster = doc
            .put_object(ROOT, CLUSTER, ObjType::Map)
            .map_err(malformed)?;
        doc.put(&cluster, "id", cluster_id).map_err(malformed)?;
        doc.put(&cluster, "network", network.to_string())
            .map_err(malformed)?;
        doc.put(&cluster, "created_at_ms", now_ms)
            .map_err(malformed)?;
        for key in [MACHINES, SERVICES, CONTAINERS, JOIN_TOKENS] {
            doc.put_object(ROOT, key, ObjType::Map).map_err(malformed)?;
        }
        doc.commit();
        Self::from_doc(doc)
    }

    /// Loads a document written by [`Self::save`] (or a concatenation of
    /// `save` and `save_incremental` outputs).
    pub fn load(bytes: &[u8], actor: [u8; 16]) -> Result<Self, Error> {
        let doc = AutoCommit::load(bytes).map_err(|e| Error::Load {
            len: bytes.len(),
            reason: e.to_string(),
        })?;
        let mut state = Self::from_doc(doc.with_actor(ActorId::from(actor)))?;
        // `AutoCommit::load` leaves the incremental-save cursor at the empty
        // document; move it to what we just loaded so that the next
        // `save_incremental` holds only new changes.
        state.doc.save_incremental();
        Ok(state)
    }

    fn from_doc(doc: AutoCommit) -> Result<Self, Error> {
        let missing = |what: &str| Error::Malformed(format!("missing {what}"));
        let cluster = get_map(&doc, &ROOT, CLUSTER).ok_or_else(|| missing("cluster"))?;
        let cluster_id = get_str(&doc, &cluster, "id").ok_or_else(|| missing("cluster id"))?;
        let network_text =
            get_str(&doc, &cluster, "network").ok_or_else(|| missing("cluster network"))?;
        let network = network_text
            .parse()
            .map_err(|e| Error::Malformed(format!("cluster network: {e}")))?;
        let created_at_ms = get_u64(&doc, &cluster, "created_at_ms").unwrap_or(0);
        let roots = Self::read_roots(&doc)?;
        Ok(Self {
            doc,
            cluster_id,
            network,
            created_at_ms,
            roots,
        })
    }

    fn read_roots(doc: &AutoCommit) -> Result<Roots, Error> {
        let get = |key: &str| {
            get_map(doc, &ROOT, key).ok_or_else(|| Error::Malformed(format!("missing {key}")))
        };
        Ok(Roots {
            machines: get(MACHINES)?,
            services: get(SERVICES)?,
            containers: get(CONTAINERS)?,
            join_tokens: get(JOIN_TOKENS)?,
        })
    }

    /// After changes from elsewhere: a top-level map can only change if a
    /// foreign document was merged in (a bug of the caller); keep reading
    /// whichever object automerge now shows.
    fn refresh_roots(&mut self) {
        if let Ok(roots) = Self::read_roots(&self.doc) {
            self.roots = roots;
        }
    }

    /// Applies bytes from [`Self::save_incremental`] (or [`Self::save`]) of
    /// this or another replica of the same cluster. Corrupt or truncated
    /// input is an error and changes nothing (automerge itself would apply
    /// the valid leading part and ignore the rest).
    pub fn load_incremental(&mut self, bytes: &[u8]) -> Result<(), Error> {
        check_chunks(bytes).map_err(|reason| Error::Load {
            len: bytes.len(),
            reason,
        })?;
        self.doc.load_incremental(bytes).map_err(|e| Error::Load {
            len: bytes.len(),
            reason: e.to_string(),
        })?;
        self.refresh_roots();
        Ok(())
    }

    /// The whole document, compacted.
    pub fn save(&mut self) -> Vec<u8> {
        self.doc.save()
    }

    /// Changes (local or received) since the last `save`/`save_incremental`;
    /// empty if there are none.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        self.doc.save_incremental()
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id.clone()
    }

    pub fn network(&self) -> Subnet {
        self.network
    }

    pub fn created_at_ms(&self) -> u64 {
        self.created_at_ms
    }

    /// 16 hex digits summarising the document's heads: replicas with the same
    /// changes have the same digest (small enough to gossip).
    pub fn heads_digest(&mut self) -> String {
        let mut heads = self.doc.get_heads();
        heads.sort();
        format!("{:016x}", fnv1a64(heads.iter().flat_map(|h| h.0)))
    }

    // ------------------------------------------------------------ machines

    /// All machines, removed ones included, sorted by (created_at_ms, id).
    pub fn machines(&self) -> Vec<Machine> {
        let mut out: Vec<_> = records::<MachineId>(&self.doc, &self.roots.machines)
            .filter_map(|(id, obj)| read_machine(&self.doc, &obj, id))
            .collect();
        out.sort_by_key(priority_machine);
        out
    }

    pub fn machine(&self, id: &MachineId) -> Option<Machine> {
        let obj = get_map(&self.doc, &self.roots.machines, id.as_str())?;
        read_machine(&self.doc, &obj, id.clone())
    }

    /// The active machine with this name (the oldest one while a name
    /// conflict is not yet resolved).
    pub fn machine_by_name(&self, name: &str) -> Option<Machine> {
        self.machines()
            .into_iter()
            .find(|m| m.is_active() && m.name == name)
    }

    fn machine_obj(&self, id: &MachineId) -> Result<(ObjId, Machine), Error> {
        let obj = get_map(&self.doc, &self.roots.machines, id.as_str())
            .ok_or_else(|| Error::UnknownMachine(id.clone()))?;
        let m = read_machine(&self.doc, &obj, id.clone())
            .ok_or_else(|| Error::UnknownMachine(id.clone()))?;
        Ok((obj, m))
    }

    fn active_machine_obj(&self, id: &MachineId) -> Result<(ObjId, Machine), Error> {
        let (obj, m) = self.machine_obj(id)?;
        if !m.is_active() {
            return Err(Error::MachineRemoved(id.clone()));
        }
        Ok((obj, m))
    }

    fn check_machine_name_free(&self, name: &str, except: &MachineId) -> Result<(), Error> {
        check_name("machine", name)?;
        match self
            .machines()
            .into_iter()
            .find(|m| m.is_active() && m.name == name && &m.id != except)
        {
            Some(other) => Err(Error::NameTaken {
                kind: "machine",
                name: name.to_owned(),
                by: other.id.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Runs `f` as one automerge change: committed if it returns `Ok`, rolled
    /// back (leaving the document unchanged) if it returns `Err`.
    pub(crate) fn change<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let out = f(self);
        if out.is_ok() {
            self.doc.commit();
        } else {
            self.doc.rollback();
        }
        out
    }

    /// Adds a machine in the lowest free /24 of the network (indices 1 to
    /// N-2 of the network's /24s: 1..=254 for a /16; the first and last are
    /// never used).
    pub fn add_machine(&mut self, m: NewMachine, now_ms: u64) -> Result<Machine, Error> {
        if get_map(&self.doc, &self.roots.machines, m.id.as_str()).is_some() {
            return Err(Error::MachineExists(m.id));
        }
        self.check_machine_name_free(&m.name, &m.id)?;
        let used: BTreeSet<Subnet> = self
            .machines()
            .into_iter()
            .filter(Machine::is_active)
            .map(|m| m.subnet)
            .collect();
        let subnet = resolve::lowest_free_subnet(self.network, &used)
            .ok_or(Error::NetworkFull(self.network))?;
        let machine = Machine {
            id: m.id,
            name: m.name,
            public_key: m.public_key,
            endpoints: m.endpoints,
            subnet,
            tags: m.tags,
            state: MachineState::Active,
            created_at_ms: now_ms,
        };
        self.change(|s| {
            let obj = s
                .doc
                .put_object(&s.roots.machines, machine.id.as_str(), ObjType::Map)
                .map_err(malformed)?;
            let d = &mut s.doc;
            d.put(&obj, "name", machine.name.as_str())
                .map_err(malformed)?;
            d.put(&obj, "public_key", machine.public_key.as_str())
                .map_err(malformed)?;
            d.put(&obj, "endpoints", endpoints_text(&machine.endpoints))
                .map_err(malformed)?;
            d.put(&obj, "subnet", machine.subnet.to_string())
                .map_err(malformed)?;
            let tags = d
                .put_object(&obj, "tags", ObjType::Map)
                .map_err(malformed)?;
            for tag in &machine.tags {
                d.put(&tags, tag.as_str(), true).map_err(malformed)?;
            }
            d.put(&obj, "state", MachineState::Active.as_str())
                .map_err(malformed)?;
            d.put(&obj, "created_at_ms", now_ms).map_err(malformed)?;
            Ok(())
        })?;
        Ok(machine)
    }

    /// Marks the machine removed (the record stays as a tombstone, so it
    /// never comes back) and deletes its containers. Removing a removed
    /// machine is a no-op.
    pub fn remove_machine(&mut self, id: &MachineId) -> Result<(), Error> {
        let (obj, m) = self.machine_obj(id)?;
        if !m.is_active() {
            return Ok(());
        }
        let containers: Vec<ContainerId> = self
            .containers()
            .into_iter()
            .filter(|c| &c.machine == id)
            .map(|c| c.id)
            .collect();
        self.change(|s| {
            s.doc
                .put(&obj, "state", MachineState::Removed.as_str())
                .map_err(malformed)?;
            for c in containers {
                s.doc
                    .delete(&s.roots.containers, c.as_str())
                    .map_err(malformed)?;
            }
            Ok(())
        })
    }

    pub fn set_machine_endpoints(
        &mut self,
        id: &MachineId,
        endpoints: Vec<String>,
    ) -> Result<(), Error> {
        let (obj, m) = self.active_machine_obj(id)?;
        if m.endpoints == endpoints {
            return Ok(());
        }
        self.change(|s| {
            s.doc
                .put(&obj, "endpoints", endpoints_text(&endpoints))
                .map_err(malformed)
        })
    }

    /// Publishes the machine's WireGuard public key (base64).
    pub fn set_machine_public_key(&mut self, id: &MachineId, key: &str) -> Result<(), Error> {
        let (obj, m) = self.active_machine_obj(id)?;
        if m.public_key == key {
            return Ok(());
        }
        self.change(|s| s.doc.put(&obj, "public_key", key).map_err(malformed))
    }

    /// Adds (`present`) or removes a tag; concurrent add and remove of the
    /// same tag: the add wins.
    pub fn set_machine_tag(
        &mut self,
        id: &MachineId,
        tag: &str,
        present: bool,
    ) -> Result<(), Error> {
        let (obj, m) = self.active_machine_obj(id)?;
        if m.tags.contains(tag) == present {
            return Ok(());
        }
        let tags = get_map(&self.doc, &obj, "tags")
            .ok_or_else(|| Error::Malformed(format!("machine {id} has no tags")))?;
        self.change(|s| {
            if present {
                s.doc.put(&tags, tag, true).map_err(malformed)
            } else {
                s.doc.delete(&tags, tag).map_err(malformed)
            }
        })
    }

    pub fn rename_machine(&mut self, id: &MachineId, name: &str) -> Result<(), Error> {
        let (obj, m) = self.active_machine_obj(id)?;
        if m.name == name {
            return Ok(());
        }
        self.check_machine_name_free(name, id)?;
        self.change(|s| s.doc.put(&obj, "name", name).map_err(malformed))
    }

    // ------------------------------------------------------------ services

    /// All services, sorted by (created_at_ms, id).
    pub fn services(&self) -> Vec<Service> {
        let mut out: Vec<_> = records::<ServiceId>(&self.doc, &self.roots.services)
            .filter_map(|(id, obj)| read_service(&self.doc, &obj, id))
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    pub fn service(&self, id: &ServiceId) -> Option<Service> {
        let obj = get_map(&self.doc, &self.roots.services, id.as_str())?;
        read_service(&self.doc, &obj, id.clone())
    }

    /// The service with this name (the oldest one while a name conflict is
    /// not yet resolved).
    pub fn service_by_name(&self, name: &str) -> Option<Service> {
        self.services().into_iter().find(|s| s.name == name)
    }

    /// Creates the service, or updates its name and spec. `now_ms` is only
    /// used on creation. Err if another service has the name.
    pub fn put_service(
        &mut self,
        id: ServiceId,
        name: &str,
        spec: serde_json::Value,
        now_ms: u64,
    ) -> Result<Service, Error> {
        check_name("service", name)?;
        if let Some(other) = self
            .services()
            .into_iter()
            .find(|s| s.name == name && s.id != id)
        {
            return Err(Error::NameTaken {
                kind: "service",
                name: name.to_owned(),
                by: other.id.to_string(),
            });
        }
        let spec_text = spec.to_string();
        let existing = get_map(&self.doc, &self.roots.services, id.as_str());
        match existing.and_then(|obj| Some((read_service(&self.doc, &obj, id.clone())?, obj))) {
            Some((old, obj)) => {
                self.change(|s| {
                    if old.name != name {
                        s.doc.put(&obj, "name", name).map_err(malformed)?;
                    }
                    if old.spec != spec {
                        s.doc.put(&obj, "spec", spec_text).map_err(malformed)?;
                    }
                    Ok(())
                })?;
                Ok(Service {
                    id,
                    name: name.to_owned(),
                    spec,
                    created_at_ms: old.created_at_ms,
                })
            }
            None => {
                self.change(|s| {
                    let obj = s
                        .doc
                        .put_object(&s.roots.services, id.as_str(), ObjType::Map)
                        .map_err(malformed)?;
                    s.doc.put(&obj, "name", name).map_err(malformed)?;
                    s.doc.put(&obj, "spec", spec_text).map_err(malformed)?;
                    s.doc
                        .put(&obj, "created_at_ms", now_ms)
                        .map_err(malformed)?;
                    Ok(())
                })?;
                Ok(Service {
                    id,
                    name: name.to_owned(),
                    spec,
                    created_at_ms: now_ms,
                })
            }
        }
    }

    /// Removes the service and its containers. A concurrent update of the
    /// removed service is lost (removal wins).
    pub fn remove_service(&mut self, id: &ServiceId) -> Result<(), Error> {
        if get_map(&self.doc, &self.roots.services, id.as_str()).is_none() {
            return Err(Error::UnknownService(id.clone()));
        }
        let containers: Vec<ContainerId> = self
            .containers()
            .into_iter()
            .filter(|c| &c.service == id)
            .map(|c| c.id)
            .collect();
        self.change(|s| {
            s.doc
                .delete(&s.roots.services, id.as_str())
                .map_err(malformed)?;
            for c in containers {
                s.doc
                    .delete(&s.roots.containers, c.as_str())
                    .map_err(malformed)?;
            }
            Ok(())
        })
    }

    // ---------------------------------------------------------- containers

    /// All containers, sorted by (created_at_ms, id).
    pub fn containers(&self) -> Vec<Container> {
        let mut out: Vec<_> = records::<ContainerId>(&self.doc, &self.roots.containers)
            .filter_map(|(id, obj)| read_container(&self.doc, &obj, id))
            .collect();
        out.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        out
    }

    pub fn container(&self, id: &ContainerId) -> Option<Container> {
        let obj = get_map(&self.doc, &self.roots.containers, id.as_str())?;
        read_container(&self.doc, &obj, id.clone())
    }

    /// Creates or updates a container. Its service must exist, its machine
    /// must be active, and its address (if any) must be inside the machine's
    /// subnet and not used by another container. On update, `created_at_ms`
    /// keeps its first value (it orders conflicts).
    pub fn put_container(&mut self, c: Container) -> Result<(), Error> {
        if get_map(&self.doc, &self.roots.services, c.service.as_str()).is_none() {
            return Err(Error::UnknownService(c.service));
        }
        let (_, machine) = self.active_machine_obj(&c.machine)?;
        if let Some(address) = c.address {
            if !machine.subnet.contains(address) {
                return Err(Error::AddressOutsideSubnet {
                    container: c.id,
                    address,
                    subnet: machine.subnet,
                    machine: machine.id,
                });
            }
            if let Some(other) = self
                .containers()
                .into_iter()
                .find(|o| o.address == Some(address) && o.id != c.id)
            {
                return Err(Error::AddressTaken {
                    container: c.id,
                    address,
                    by: other.id,
                });
            }
        }
        let existing = get_map(&self.doc, &self.roots.containers, c.id.as_str());
        let old = existing
            .as_ref()
            .and_then(|obj| read_container(&self.doc, obj, c.id.clone()));
        self.change(|s| {
            let obj = match (existing, &old) {
                (Some(obj), Some(_)) => obj,
                _ => {
                    let obj = s
                        .doc
                        .put_object(&s.roots.containers, c.id.as_str(), ObjType::Map)
                        .map_err(malformed)?;
                    s.doc
                        .put(&obj, "created_at_ms", c.created_at_ms)
                        .map_err(malformed)?;
                    obj
                }
            };
            let d = &mut s.doc;
            if old.as_ref().is_none_or(|o| o.service != c.service) {
                d.put(&obj, "service", c.service.as_str())
                    .map_err(malformed)?;
            }
            if old.as_ref().is_none_or(|o| o.machine != c.machine) {
                d.put(&obj, "machine", c.machine.as_str())
                    .map_err(malformed)?;
            }
            if old.as_ref().is_none_or(|o| o.address != c.address) {
                d.put(&obj, "address", address_value(c.address))
                    .map_err(malformed)?;
            }
            if old.as_ref().is_none_or(|o| o.desired != c.desired) {
                d.put(&obj, "desired", c.desired.as_str())
                    .map_err(malformed)?;
            }
            Ok(())
        })
    }

    pub fn remove_container(&mut self, id: &ContainerId) -> Result<(), Error> {
        if get_map(&self.doc, &self.roots.containers, id.as_str()).is_none() {
            return Err(Error::UnknownContainer(id.clone()));
        }
        self.change(|s| {
            s.doc
                .delete(&s.roots.containers, id.as_str())
                .map_err(malformed)
        })
    }

    // --------------------------------------------------------- join tokens

    /// Stores a join token's hash (the agent never stores the token itself).
    pub fn add_join_token(&mut self, token_hash: &str, expires_at_ms: u64) -> Result<(), Error> {
        if token_hash.is_empty() || token_hash.contains('/') {
            return Err(Error::InvalidTokenHash(token_hash.to_owned()));
        }
        self.change(|s| {
            s.doc
                .put(&s.roots.join_tokens, token_hash, expires_at_ms)
                .map_err(malformed)
        })
    }

    /// The stored join tokens: hash and expiry, sorted by hash.
    pub fn join_tokens(&self) -> BTreeMap<String, u64> {
        self.doc
            .keys(&self.roots.join_tokens)
            .filter_map(|k| Some((k.clone(), get_u64(&self.doc, &self.roots.join_tokens, &k)?)))
            .collect()
    }

    /// Uses up a join token: Ok (and deletes it, and every expired token) if
    /// it is present and not expired (`expires_at_ms > now_ms`); Err and no
    /// change otherwise. Two replicas that consume the same token while
    /// partitioned both succeed: single use holds only within a connected
    /// part of the cluster.
    pub fn consume_join_token(&mut self, token_hash: &str, now_ms: u64) -> Result<(), Error> {
        let tokens = self.join_tokens();
        match tokens.get(token_hash) {
            None => Err(Error::JoinToken {
                hash: token_hash.to_owned(),
                problem: JoinTokenProblem::Unknown,
            }),
            Some(&at_ms) if at_ms <= now_ms => Err(Error::JoinToken {
                hash: token_hash.to_owned(),
                problem: JoinTokenProblem::Expired { at_ms },
            }),
            Some(_) => self.change(|s| {
                s.doc
                    .delete(&s.roots.join_tokens, token_hash)
                    .map_err(malformed)?;
                s.delete_expired_tokens(&tokens, now_ms)
            }),
        }
    }

    /// Deletes every expired join token; returns how many.
    pub fn drop_expired_join_tokens(&mut self, now_ms: u64) -> Result<usize, Error> {
        let tokens = self.join_tokens();
        let expired = tokens.values().filter(|&&at| at <= now_ms).count();
        self.change(|s| s.delete_expired_tokens(&tokens, now_ms))?;
        Ok(expired)
    }

    fn delete_expired_tokens(
        &mut self,
        tokens: &BTreeMap<String, u64>,
        now_ms: u64,
    ) -> Result<(), Error> {
        for (hash, _) in tokens.iter().filter(|(_, at)| **at <= now_ms) {
            self.doc
                .delete(&self.roots.join_tokens, hash.as_str())
                .map_err(malformed)?;
        }
        Ok(())
    }

    // ----------------------------------------------------------- conflicts

    /// Applies the conflict rules (see `resolve`) until none applies, as one
    /// change, and returns what changed. Deterministic: replicas holding the
    /// same document make the same fixes, and identical concurrent fixes
    /// merge into the same values.
    pub fn resolve_conflicts(&mut self) -> Vec<Fix> {
        let mut all = Vec::new();
        for _ in 0..MAX_RESOLVE_ROUNDS {
            let machines = self.machines();
            let services = self.services();
            let containers = self.containers();
            let fixes = resolve::plan(self.network, &machines, &services, &containers);
            if fixes.is_empty() {
                break;
            }
            if let Err(e) = self.apply_fixes(&fixes) {
                // Only a malformed document can fail here; keep what was
                // applied so far rather than loop.
                debug_assert!(false, "applying fixes: {e}");
                break;
            }
            all.extend(fixes);
        }
        self.doc.commit();
        all
    }

    fn apply_fixes(&mut self, fixes: &[Fix]) -> Result<(), Error> {
        for fix in fixes {
            match fix {
                Fix::MachineMoved { machine, to, .. } => {
                    let (obj, _) = self.machine_obj(machine)?;
                    self.doc
                        .put(&obj, "subnet", to.to_string())
                        .map_err(malformed)?;
                }
                Fix::MachineRenamed { machine, to, .. } => {
                    let (obj, _) = self.machine_obj(machine)?;
                    self.doc.put(&obj, "name", to.as_str()).map_err(malformed)?;
                }
                Fix::ServiceRenamed { service, to, .. } => {
                    let obj = get_map(&self.doc, &self.roots.services, service.as_str())
                        .ok_or_else(|| Error::UnknownService(service.clone()))?;
                    self.doc.put(&obj, "name", to.as_str()).map_err(malformed)?;
                }
                Fix::ContainerReaddressed { container, to, .. } => {
                    let obj = get_map(&self.doc, &self.roots.containers, container.as_str())
                        .ok_or_else(|| Error::UnknownContainer(container.clone()))?;
                    self.doc
                        .put(&obj, "address", address_value(Some(*to)))
                        .map_err(malformed)?;
                }
                Fix::ContainerRemoved { container } => {
                    self.doc
                        .delete(&self.roots.containers, container.as_str())
                        .map_err(malformed)?;
                }
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- dump

    /// The whole document as JSON, for `uc state dump`:
    /// `{"cluster":{..},"machines":{id:{..}},"services":{..},"containers":{..},"join_tokens":{hash:expires_at_ms}}`.
    pub fn to_json(&self) -> serde_json::Value {
        fn by_id<T: serde::Serialize>(
            items: impl IntoIterator<Item = (String, T)>,
        ) -> serde_json::Value {
            serde_json::Value::Object(
                items
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k,
                            serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
                        )
                    })
                    .collect(),
            )
        }
        serde_json::json!({
            "cluster": {
                "id": self.cluster_id,
                "network": self.network.to_string(),
                "created_at_ms": self.created_at_ms,
            },
            "machines": by_id(self.machines().into_iter().map(|m| (m.id.to_string(), m))),
            "services": by_id(self.services().into_iter().map(|s| (s.id.to_string(), s))),
            "containers": by_id(self.containers().into_iter().map(|c| (c.id.to_string(), c))),
            "join_tokens": by_id(self.join_tokens()),
            // Certificates without their private keys.
            "certificates": by_id(self.certificates().into_iter().map(|(h, c)| {
                (h, serde_json::json!({
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                    "issued_by": c.issued_by,
                    "issued_at_ms": c.issued_at_ms,
                }))
            })),
            "acme_orders": by_id(self.acme_orders()),
        })
    }

    // ---------------------------------------------------------------- sync

    /// The next message for this peer, or None when there is nothing to send
    /// (the peer is up to date, or we await its reply).
    pub fn generate_sync_message(&mut self, peer: &mut PeerSync) -> Option<Vec<u8>> {
        self.doc
            .sync()
            .generate_sync_message(&mut peer.0)
            .map(Message::encode)
    }

    /// Applies a message from the peer; returns whether the document changed.
    /// Bytes that do not decode are an error and change nothing.
    pub fn receive_sync_message(&mut self, peer: &mut PeerSync, msg: &[u8]) -> Result<bool, Error> {
        let sync_err = |reason: String| Error::Sync {
            len: msg.len(),
            reason,
        };
        let message = Message::decode(msg).map_err(|e| sync_err(e.to_string()))?;
        let before = self.doc.get_heads();
        self.doc
            .sync()
            .receive_sync_message(&mut peer.0, message)
            .map_err(|e| sync_err(e.to_string()))?;
        let changed = self.doc.get_heads() != before;
        if changed {
            self.refresh_roots();
        }
        Ok(changed)
    }

    /// Takes every change of `other` that this replica lacks.
    pub fn merge(&mut self, other: &mut ClusterState) -> Result<(), Error> {
        self.doc.merge(&mut other.doc).map_err(malformed)?;
        self.refresh_roots();
        Ok(())
    }
}

fn endpoints_text(endpoints: &[String]) -> String {
    serde_json::to_string(endpoints).unwrap_or_else(|_| "[]".to_owned())
}

const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Checks that `bytes` is a sequence of whole, intact automerge chunks:
/// documents (from `save`) or changes (from `save_incremental`).
fn check_chunks(bytes: &[u8]) -> Result<(), String> {
    let mut rest = bytes;
    let mut offset = 0;
    while !rest.is_empty() {
        let header_err = || format!("truncated or corrupt chunk at byte {offset}");
        if rest.len() < 9 || rest[..4] != CHUNK_MAGIC {
            return Err(header_err());
        }
        let chunk_type = rest[8];
        let (data_len, leb_len) = read_leb128(&rest[9..]).ok_or_else(header_err)?;
        let total = usize::try_from(data_len)
            .ok()
            .and_then(|n| n.checked_add(9 + leb_len))
            .filter(|&t| t <= rest.len())
            .ok_or_else(header_err)?;
        let chunk = &rest[..total];
        match chunk_type {
            0 => {
                AutoCommit::load(chunk)
                    .map_err(|e| format!("document chunk at byte {offset}: {e}"))?;
            }
            1 | 2 => {
                let change = automerge::Change::try_from(chunk)
                    .map_err(|e| format!("change chunk at byte {offset}: {e}"))?;
                if change.hash().0[..4] != chunk[4..8] {
                    return Err(format!("change chunk at byte {offset}: bad checksum"));
                }
            }
            other => {
                return Err(format!(
                    "chunk at byte {offset}: unexpected chunk type {other}"
                ));
            }
        }
        rest = &rest[total..];
        offset += total;
    }
    Ok(())
}

/// An unsigned LEB128 number: its value and how many bytes it took.
fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}
