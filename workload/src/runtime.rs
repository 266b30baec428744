//! The runtime trait, and the directory every local workload keeps:
//! `DATA/workloads/<id>/` with `meta.json`, the shim's files (`log`, `exit`,
//! `shim.pid`, `pid`) and whatever its runtime needs.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uc_proto::ContainerId;
use uc_proto::spec::{RuntimeKind, ServiceSpec};

use crate::reconcile::Seen;
use crate::shim;

/// Everything a runtime needs to make one container.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub id: ContainerId,
    pub service: String,
    pub spec: ServiceSpec,
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The machine's address in its /24: gateway and DNS server.
    pub gateway: Ipv4Addr,
    pub machine: String,
    /// See [`crate::reconcile::Want::digest`].
    pub digest: String,
}

impl Workload {
    /// The container's host name: the service's name and the id's first 8 digits.
    pub fn hostname(&self) -> String {
        format!("{}-{}", self.service, self.id.short())
    }
}

/// What the machine keeps of a workload, in `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub id: ContainerId,
    pub service: String,
    pub runtime: RuntimeKind,
    pub digest: String,
    pub address: Ipv4Addr,
    pub image: String,
    pub created_ms: u64,
    /// When it was last started.
    #[serde(default)]
    pub started_ms: u64,
    #[serde(default)]
    pub restarts: u32,
}

/// A workload as its runtime sees it now.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    pub meta: Meta,
    pub seen: Seen,
    /// The main process, while it runs.
    pub pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime {0} is not available on this machine: {1}")]
    Unavailable(RuntimeKind, String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("container {0} not found on this machine")]
    NotFound(ContainerId),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A way to run containers (nspawn, Docker, QEMU). Implementations keep their
/// bookkeeping on the machine's disk, so a restarted agent finds (adopts)
/// what runs.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Ok if this machine can run this kind of container; else why not.
    async fn available(&self) -> Result<(), String>;
    /// The containers of this runtime on this machine.
    async fn list(&self) -> Vec<Status>;
    /// Makes the container (image fork, network) and starts it.
    async fn create(&self, w: &Workload) -> Result<(), RuntimeError>;
    /// Starts a container that exited.
    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError>;
    /// Stops it: SIGTERM, then after `grace` everything it started is killed.
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError>;
    /// Stops it and deletes all it has: processes, mounts, links, files.
    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError>;
    /// The last `n` lines of its output.
    async fn logs(&self, id: &ContainerId, n: usize) -> Vec<shim::LogLine>;
}

/// The workloads directory of a machine.
#[derive(Clone, Debug)]
pub struct WorkloadDirs {
    root: PathBuf,
}

impl WorkloadDirs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn dir(&self, id: &ContainerId) -> PathBuf {
        self.root.join(id.as_str())
    }

    pub fn read_meta(&self, id: &ContainerId) -> Option<Meta> {
        serde_json::from_slice(&fs::read(self.dir(id).join("meta.json")).ok()?).ok()
    }

    pub fn write_meta(&self, m: &Meta) -> Result<(), RuntimeError> {
        let p = self.dir(&m.id).join("meta.json");
        shim::write_atomic(&p, &serde_json::to_vec_pretty(m).expect("meta serializes"))
            .map_err(io_err("writing", &p))
    }

    /// Every workload directory with a readable `meta.json` of this runtime.
    pub fn all(&self, kind: RuntimeKind) -> Vec<Meta> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<ContainerId>().ok())
            .filter_map(|id| self.read_meta(&id))
            .filter(|m| m.runtime == kind)
            .collect()
    }

    /// The shim's pid if it still runs (checked against its command line, so
    /// a reused pid is not taken for it).
    pub fn live_shim(&self, id: &ContainerId) -> Option<u32> {
        let dir = self.dir(id);
        let pid: u32 = fs::read_to_string(shim::shim_pid_path(&dir))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // A zombie has exited; its parent has not reaped it yet.
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'));
        (cmdline.contains("shim") && cmdline.contains(dir.to_str()?) && !zombie).then_some(pid)
    }

    /// The workload's main process if its shim runs.
    pub fn child_pid(&self, id: &ContainerId) -> Option<u32> {
        self.live_shim(id)?;
        fs::read_to_string(shim::child_pid_path(&self.dir(id)))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What the files say of the workload.
    pub fn seen(&self, m: &Meta) -> Seen {
        if self.live_shim(&m.id).is_some() {
            return Seen::Running {
                since_ms: m.started_ms,
            };
        }
        let exit = fs::read(shim::exit_path(&self.dir(&m.id)))
            .ok()
            .and_then(|b| serde_json::from_slice::<shim::ExitStatus>(&b).ok());
        match exit {
            Some(e) => Seen::Exited {
                code: e.code,
                at_ms: e.at_ms,
            },
            // The shim died without saying how (killed), or never started.
            None => Seen::Exited {
                code: -1,
                at_ms: m.started_ms,
            },
        }
    }
}
