//! A cluster of machines on one host: a hub namespace holding the bridges, one namespace per
//! machine with a veth into the hub, and the real `ucd` running in each.
//!
//! ```text
//!   hub namespace uch-<tag>                       machine namespace ucm-<tag>-<i>
//!   br0 (everyone) ── v<i> ══ veth ══ eth0 172.31.0.(10+i)/16   ucd --data-dir <dir>/m<i> ...
//!   br1 (the cut-off group during a partition)
//! ```
//!
//! Nothing of the topology lives in the root namespace; the CLI reaches each agent through its
//! Unix socket, which is a file.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::netns;
use crate::process::{Bins, ip, run_ok, run_with_timeout};
use crate::{Fatal, eventually};

/// The agent's default ports (`ucd --peer-port`, `--gossip-port`, `--join-port`, `--wg-port`).
/// Peer and gossip live on the mesh address; join and WireGuard on the underlay.
pub const PEER_PORT: u16 = 51000;
pub const GOSSIP_PORT: u16 = 51001;
pub const JOIN_PORT: u16 = 51002;
pub const WG_PORT: u16 = 51820;

/// The firewall every real machine's namespace gets: on the underlay (eth0) only WireGuard's UDP
/// port and the join endpoint are open, so anything else that works between machines went
/// through the mesh.
pub const UNDERLAY_FIREWALL: &str = "table inet uc_e2e {
  chain input {
    type filter hook input priority 0; policy drop;
    iifname != \"eth0\" accept
    ct state established,related accept
    udp dport 51820 accept
    tcp dport 51002 accept
  }
}
";

/// How long a `uc` command may take before the harness calls it hung.
const UC_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Options for [`Cluster::start`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    machines: usize,
    tag: Option<String>,
    base_dir: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    extra_args: Vec<String>,
    machine_args: std::collections::BTreeMap<usize, Vec<String>>,
    placeholder_agents: bool,
    firewall: Option<bool>,
    timeout: Duration,
}

impl ClusterBuilder {
    pub fn new(machines: usize) -> ClusterBuilder {
        ClusterBuilder {
            machines,
            tag: None,
            base_dir: None,
            bin_dir: None,
            extra_args: Vec::new(),
            machine_args: Default::default(),
            placeholder_agents: false,
            firewall: None,
            timeout: Duration::from_secs(60),
        }
    }

    /// Whether machines firewall their underlay ([`UNDERLAY_FIREWALL`]); default: yes for real
    /// agents, no for placeholders.
    pub fn underlay_firewall(mut self, on: bool) -> Self {
        self.firewall = Some(on);
        self
    }

    /// A fixed tag instead of `<pid>x<counter>` (for `uc local`); such namespaces are never swept.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// The directory for the machines' data directories and the state file (default
    /// `$UC_E2E_DIR/<tag>`, `$UC_E2E_DIR` defaulting to `/var/tmp/uc-e2e`).
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = Some(dir.into());
        self
    }

    /// Where `ucd` and `uc` are (default: see [`Bins::find`]).
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// An argument added to every agent's command line.
    pub fn extra_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Arguments added to machine `i`'s agent command line only.
    pub fn machine_args(mut self, i: usize, args: &[&str]) -> Self {
        self.machine_args
            .entry(i)
            .or_default()
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// How long [`Cluster::start`] and [`Cluster::wait_membership`] wait for the cluster to form.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `sleep` instead of `ucd` in each machine and waits for nothing: for tests of the
    /// harness itself (namespaces, links, partitions, teardown), which need no agent.
    pub fn placeholder_agents(mut self) -> Self {
        self.placeholder_agents = true;
        self
    }
}

/// One machine: its namespace, address, files, and the agent process if one is running.
#[derive(Debug)]
pub struct MachineHandle {
    pub index: usize,
    /// The agent's `--name`.
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub data_dir: PathBuf,
    /// The agent's local API socket.
    pub socket: PathBuf,
    /// The agent's stdout and stderr, appended across restarts.
    pub log: PathBuf,
    /// The command line of the last agent started here (for [`Cluster::restart`]).
    args: Vec<String>,
    child: Option<Child>,
}

impl MachineHandle {
    /// The pid of the running agent (the `ucd` process itself: `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's join endpoint on the underlay, `ip:51002`.
    pub fn join_addr(&self) -> String {
        format!("{}:{JOIN_PORT}", self.ip)
    }

    /// The agent's WireGuard endpoint on the underlay, `ip:51820`.
    pub fn wg_addr(&self) -> String {
        format!("{}:{WG_PORT}", self.ip)
    }

    /// The hub-side end of this machine's veth.
    fn hub_port(&self) -> String {
        format!("v{}", self.index)
    }
}

/// How an agent starts its life.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// `--init`: a new cluster.
    Init,
    /// `--join HOST:PORT --token TOKEN`.
    Join { peer: String, token: String },
    /// Neither (restart with existing state, or a test's own arguments in `extra`).
    None,
}

/// A running cluster; dropping it kills the agents and deletes everything it made.
pub struct Cluster {
    tag: String,
    hub: String,
    dir: PathBuf,
    /// Whether `dir` was made by us (then it is removed whole), or only its contents we made.
    created_dir: bool,
    bins: Option<Bins>,
    extra_args: Vec<String>,
    machine_args: std::collections::BTreeMap<usize, Vec<String>>,
    placeholder: bool,
    firewall: bool,
    timeout: Duration,
    machines: Vec<MachineHandle>,
    hub_created: bool,
    /// Whether the hub's bridge has its own address ([`Cluster::hub_ip`]).
    hub_addressed: bool,
    /// Processes that serve the cluster (a local ACME CA, `uc local`'s forwarder), killed with it.
    helpers: Vec<Helper>,
    detached: bool,
}

struct Helper {
    child: Child,
    /// The file name of its executable, checked before a detached teardown kills its pid.
    exe: String,
}

/// The hub's own address on the underlay bridge (machines are 172.31.0.10 and up).
pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);

/// The address in field `field` of a `uc machine ls` entry.
fn address_field<A: std::str::FromStr>(entry: &Value, field: &str) -> anyhow::Result<A>
where
    A::Err: std::error::Error + Send + Sync + 'static,
{
    entry[field]
        .as_str()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("{field} in {entry}"))
}

/// What [`Cluster::detach`] writes, so [`Cluster::teardown_detached`] can undo it later.
#[derive(Serialize, Deserialize)]
struct DetachedState {
    tag: String,
    hub: String,
    dir: PathBuf,
    created_dir: bool,
    machines: Vec<DetachedMachine>,
    #[serde(default)]
    helpers: Vec<DetachedHelper>,
}

#[derive(Serialize, Deserialize)]
struct DetachedHelper {
    pid: u32,
    exe: String,
}

/// Kills `pid` if it still runs the executable named `exe` (a pid may have been reused).
fn kill_if(pid: u32, exe: &str) {
    if std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p.file_name().is_some_and(|n| n == exe))
    {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

#[derive(Serialize, Deserialize)]
struct DetachedMachine {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    data_dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    pid: Option<u32>,
}

impl Cluster {
    /// Makes the hub and `machines` machines; machine 0 starts a cluster (`--init`) and the others
    /// join it through machine 0, each with its own token; waits until every machine lists all of
    /// them live and says it is ready.
    pub fn start(b: ClusterBuilder) -> anyhow::Result<Cluster> {
        if b.machines == 0 {
            bail!("a cluster needs at least one machine");
        }
        let root = netns::default_root();
        if let Err(e) = netns::sweep_stale(&root) {
            eprintln!("uc-e2e: sweeping leftovers of earlier runs: {e:#}");
        }
        let bins = if b.placeholder_agents {
            None
        } else {
            Some(Bins::find(b.bin_dir.as_deref())?)
        };
        let tag = b.tag.clone().unwrap_or_else(|| {
            format!(
                "{}x{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        });
        let dir = b.base_dir.clone().unwrap_or_else(|| root.join(&tag));
        let created_dir = !dir.exists();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, Drop undoes whatever has been made if a step fails.
        let mut c = Cluster {
            hub: netns::hub_name(&tag),
            tag,
            dir,
            created_dir,
            bins,
            extra_args: b.extra_args.clone(),
            machine_args: b.machine_args.clone(),
            placeholder: b.placeholder_agents,
            firewall: b.firewall.unwrap_or(!b.placeholder_agents),
            timeout: b.timeout,
            machines: Vec::new(),
            hub_created: false,
            hub_addressed: false,
            helpers: Vec::new(),
            detached: false,
        };
        c.make_hub()?;
        for _ in 0..b.machines {
            c.add_namespace()?;
        }
        if c.placeholder {
            for i in 0..b.machines {
                c.spawn_process(i, vec!["sleep".into(), "3600".into()])?;
            }
            return Ok(c);
        }
        c.start_agent(0, Bootstrap::Init, &[])?;
        c.wait_ready(0)?;
        // Join all the others at once: concurrent joins are part of what is tested.
        for i in 1..b.machines {
            c.start_joiner(i)?;
        }
        c.wait_membership()?;
        Ok(c)
    }

    fn make_hub(&mut self) -> anyhow::Result<()> {
        netns::add(&self.hub)?;
        self.hub_created = true;
        for br in ["br0", "br1"] {
            ip(&["-n", &self.hub, "link", "add", br, "type", "bridge"])?;
            ip(&["-n", &self.hub, "link", "set", br, "up"])?;
        }
        Ok(())
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The directory holding the machines' data directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hub namespace's name.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    pub fn len(&self) -> usize {
        self.machines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }

    pub fn machine(&self, i: usize) -> &MachineHandle {
        &self.machines[i]
    }

    /// Indexes of the machines whose agent is running.
    pub fn running(&self) -> Vec<usize> {
        self.machines
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.index)
            .collect()
    }

    pub fn bins(&self) -> anyhow::Result<&Bins> {
        self.bins
            .as_ref()
            .context("this cluster runs placeholder agents, not ucd")
    }

    /// Adds a machine: its namespace, veth into the hub, address and data directory, but no agent.
    /// Returns its index.
    pub fn add_namespace(&mut self) -> anyhow::Result<usize> {
        let index = self.machines.len();
        let ns = netns::machine_ns_name(&self.tag, index);
        let n = 10 + index;
        let addr = Ipv4Addr::new(172, 31, (n / 256) as u8, (n % 256) as u8);
        let data_dir = self.dir.join(format!("m{index}"));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        // Registered as soon as the namespace exists (not before: a namespace of that name made by
        // someone else is not ours to delete), so Drop deletes it even if a step below fails.
        netns::add(&ns)?;
        self.machines.push(MachineHandle {
            index,
            name: format!("m{index}"),
            netns: ns.clone(),
            ip: addr,
            socket: data_dir.join("api.sock"),
            log: data_dir.join("ucd.log"),
            data_dir,
            args: Vec::new(),
            child: None,
        });
        let port = format!("v{index}");
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/16"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        if self.firewall {
            self.firewall_underlay(&ns)?;
        }
        ip(&["-n", &self.hub, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &self.hub, "link", "set", &port, "up"])?;
        Ok(index)
    }

    fn firewall_underlay(&self, ns: &str) -> anyhow::Result<()> {
        crate::process::nft(ns, UNDERLAY_FIREWALL)
    }

    /// Machine `i`'s mesh address (10.210.X.1), as its agent reports it.
    pub fn mesh_ip(&self, i: usize) -> anyhow::Result<Ipv4Addr> {
        self.mesh_addresses(i).map(|(v4, _)| v4)
    }

    /// Machine `i`'s IPv4 and IPv6 mesh addresses, as its agent reports them.
    pub fn mesh_addresses(&self, i: usize) -> anyhow::Result<(Ipv4Addr, std::net::Ipv6Addr)> {
        let me = self.own_entry(i)?;
        Ok((
            address_field(&me, "mesh_address")?,
            address_field(&me, "mesh_address_v6")?,
        ))
    }

    /// Machine `i`'s management address, where its gossip and peer API listen.
    pub fn mgmt_ip(&self, i: usize) -> anyhow::Result<std::net::Ipv6Addr> {
        address_field(&self.own_entry(i)?, "mesh_management_address")
    }

    /// Machine `i`'s own entry in its `uc machine ls`.
    fn own_entry(&self, i: usize) -> anyhow::Result<Value> {
        self.machines_seen_by(i)?
            .into_iter()
            .find(|m| m["is_self"] == Value::Bool(true))
            .with_context(|| format!("machine ls of {} lists no self", self.machines[i].name))
    }

    /// `uc wg show -o json` on machine `i`.
    pub fn wg_show(&self, i: usize) -> anyhow::Result<Value> {
        self.uc_json(i, &["wg", "show"])
    }

    /// Pings `addr` once from machine `i`'s namespace, waiting at most `wait_secs`; true if it
    /// answered.
    pub fn ping(&self, i: usize, addr: std::net::IpAddr, wait_secs: u32) -> anyhow::Result<bool> {
        let out = self.exec_in(
            i,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "1",
                "-W",
                &wait_secs.to_string(),
                &addr.to_string(),
            ],
        )?;
        Ok(out.status.success())
    }

    /// The agent command line for machine `i` with `bootstrap` and `extra` arguments.
    pub fn agent_args(
        &self,
        i: usize,
        bootstrap: &Bootstrap,
        extra: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let m = &self.machines[i];
        let mut args = vec![
            self.bins()?.ucd.display().to_string(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--name".into(),
            m.name.clone(),
            "--advertise-addr".into(),
            m.ip.to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args.extend(self.machine_args.get(&i).into_iter().flatten().cloned());
        match bootstrap {
            Bootstrap::Init => args.push("--init".into()),
            Bootstrap::Join { peer, token } => {
                args.extend([
                    "--join".into(),
                    peer.clone(),
                    "--token".into(),
                    token.clone(),
                ]);
            }
            Bootstrap::None => {}
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(args)
    }

    /// Starts `ucd` in machine `i` (in the background; see [`Cluster::wait_ready`]).
    pub fn start_agent(
        &mut self,
        i: usize,
        bootstrap: Bootstrap,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let args = self.agent_args(i, &bootstrap, extra)?;
        self.spawn_process(i, args)
    }

    /// Starts `argv` in machine `i`'s namespace with output appended to its log. The process gets
    /// its own process group, so it outlives a caller that detaches, and terminal signals meant for
    /// the test runner don't reach it.
    /// Starts a helper process (in network namespace `netns`, or in this one when `None`), its
    /// output to `log`; it is killed when the cluster is dropped or torn down. Returns its pid.
    pub fn spawn_helper(
        &mut self,
        netns: Option<&str>,
        argv: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<u32> {
        let exe = argv.first().context("an empty command")?;
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
                c
            }
            None => {
                let mut c = Command::new(exe);
                c.args(&argv[1..]);
                c
            }
        };
        let child = cmd
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {argv:?}"))?;
        let pid = child.id();
        let exe = Path::new(exe)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.helpers.push(Helper { child, exe });
        Ok(pid)
    }

    /// Gives the hub's underlay bridge the address [`HUB_IP`] (once), so that helpers in the hub
    /// namespace (a local ACME CA) are reachable from every machine; returns it.
    pub fn hub_ip(&mut self) -> anyhow::Result<Ipv4Addr> {
        if !self.hub_addressed {
            ip(&[
                "-n",
                &self.hub,
                "addr",
                "add",
                &format!("{HUB_IP}/16"),
                "dev",
                "br0",
            ])?;
            self.hub_addressed = true;
        }
        Ok(HUB_IP)
    }

    /// Lets TCP `ports` through machine `i`'s underlay firewall (as an ingress machine opens 80
    /// and 443); nothing to do when the cluster has no firewall.
    pub fn open_tcp_ports(&mut self, i: usize, ports: &[u16]) -> anyhow::Result<()> {
        if !self.firewall {
            return Ok(());
        }
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        crate::process::nft(
            &self.machines[i].netns,
            &format!("add rule inet uc_e2e input tcp dport {{ {list} }} accept\n"),
        )
    }

    fn spawn_process(&mut self, i: usize, argv: Vec<String>) -> anyhow::Result<()> {
        let m = &mut self.machines[i];
        if m.child.is_some() {
            bail!(
                "machine {} already runs an agent (pid {:?})",
                m.name,
                m.pid()
            );
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .with_context(|| format!("opening {}", m.log.display()))?;
        // nsenter, not `ip netns exec`: that mounts a sysfs of its own over /sys, which hides
        // the cgroup hierarchies systemd-nspawn needs.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", m.netns))
            .arg("--")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {argv:?} in {}", m.netns))?;
        m.args = argv;
        m.child = Some(child);
        Ok(())
    }

    /// Starts machine `i`'s agent joining the cluster through the first running machine, with a fresh token.
    pub fn start_joiner(&mut self, i: usize) -> anyhow::Result<()> {
        let via = *self
            .running()
            .first()
            .context("no running machine to join through")?;
        let token = self.token(via)?;
        let peer = self.machines[via].join_addr();
        self.start_agent(i, Bootstrap::Join { peer, token }, &[])
    }

    /// A new machine joins with a fresh token; waits until everyone lists it live.
    pub fn add_machine(&mut self) -> anyhow::Result<usize> {
        let i = self.add_machine_no_wait()?;
        self.wait_membership()?;
        Ok(i)
    }

    /// A new machine starts joining with a fresh token; returns at once.
    pub fn add_machine_no_wait(&mut self) -> anyhow::Result<usize> {
        let i = self.add_namespace()?;
        self.start_joiner(i)?;
        Ok(i)
    }

    /// Runs `ucd` in machine `i` with its usual `--data-dir/--name/--advertise-addr`, `bootstrap`
    /// and `extra`, in the foreground, and returns how it ended (for agents that should refuse to
    /// start). Fails if it is still running after `timeout`.
    pub fn run_agent_once(
        &self,
        i: usize,
        bootstrap: Bootstrap,
        extra: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        if self.machines[i].child.is_some() {
            bail!("machine {} already runs an agent", self.machines[i].name);
        }
        let args = self.agent_args(i, &bootstrap, extra)?;
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.machines[i].netns])
                .args(&args),
            timeout,
        )
    }

    /// The agent's pid and whether it is still running (reaps it if it exited).
    pub fn agent_exited(&mut self, i: usize) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.machines[i].child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("machine {} runs no agent", self.machines[i].name),
        }
    }

    /// SIGKILLs machine `i`'s agent and reaps it.
    pub fn kill9(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.machines[i];
        let mut child = m
            .child
            .take()
            .with_context(|| format!("machine {} runs no agent", m.name))?;
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("reaping the agent of {}", m.name))?;
        Ok(())
    }

    /// SIGTERMs machine `i`'s agent and waits up to `grace` for it to exit, then SIGKILLs it.
    pub fn stop(&mut self, i: usize, grace: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let m = &mut self.machines[i];
        let mut child = m
            .child
            .take()
            .with_context(|| format!("machine {} runs no agent", m.name))?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                return Ok(child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts machine `i`'s agent again with the same command line (with state in its data
    /// directory, the agent ignores `--init`/`--join`). Returns at once.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let args = self.machines[i].args.clone();
        if args.is_empty() {
            bail!("machine {} never ran an agent", self.machines[i].name);
        }
        self.spawn_process(i, args)
    }

    /// Cuts the machines in `group` off from the others: their hub-side veths move to a second
    /// bridge, so the group still reaches itself. Replaces any earlier partition.
    pub fn partition(&mut self, group: &[usize]) -> anyhow::Result<()> {
        if let Some(bad) = group.iter().find(|&&i| i >= self.machines.len()) {
            bail!("no machine {bad}; the cluster has {}", self.machines.len());
        }
        for m in &self.machines {
            let br = if group.contains(&m.index) {
                "br1"
            } else {
                "br0"
            };
            ip(&["-n", &self.hub, "link", "set", &m.hub_port(), "master", br])?;
        }
        Ok(())
    }

    /// Undoes [`Cluster::partition`] and [`Cluster::set_link`]: every machine on one bridge, links up.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for m in &self.machines {
            ip(&[
                "-n",
                &self.hub,
                "link",
                "set",
                &m.hub_port(),
                "master",
                "br0",
            ])?;
            ip(&["-n", &self.hub, "link", "set", &m.hub_port(), "up"])?;
        }
        Ok(())
    }

    /// Takes machine `i`'s link down (`up == false`) or up again, at the hub end.
    pub fn set_link(&mut self, i: usize, up: bool) -> anyhow::Result<()> {
        let port = self.machines[i].hub_port();
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// Runs `cmd` inside machine `i`'s namespace (`ip netns exec`), capturing its output.
    pub fn exec_in(&self, i: usize, cmd: &[&str]) -> anyhow::Result<Output> {
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.machines[i].netns])
                .args(cmd),
            UC_TIMEOUT,
        )
    }

    /// Runs `f` on a thread inside machine `i`'s namespace: sockets it opens are that machine's.
    pub fn in_netns<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        netns::run_in(&self.machines[i].netns, f)
    }

    /// A `uc` client for machine `i` that can move to another thread.
    pub fn client(&self, i: usize) -> anyhow::Result<Uc> {
        Ok(Uc {
            bin: self.bins()?.uc.clone(),
            socket: self.machines[i].socket.clone(),
        })
    }

    /// Runs `uc --socket <machine i's socket> ARGS` (from the root namespace: the socket is a file).
    pub fn uc(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.client(i)?.run(args)
    }

    /// Runs `uc --socket .. -o json ARGS`, fails unless it succeeds, and parses its output.
    pub fn uc_json(&self, i: usize, args: &[&str]) -> anyhow::Result<Value> {
        self.client(i)?.json(args)
    }

    /// `uc status` of machine `i`.
    pub fn status(&self, i: usize) -> anyhow::Result<Value> {
        self.uc_json(i, &["status"])
    }

    /// `uc machine ls` of machine `i`.
    pub fn machines_seen_by(&self, i: usize) -> anyhow::Result<Vec<Value>> {
        match self.uc_json(i, &["machine", "ls"])? {
            Value::Array(v) => Ok(v),
            other => bail!(
                "machine ls of {} is not a list: {other}",
                self.machines[i].name
            ),
        }
    }

    /// `uc state dump` of machine `i`.
    pub fn dump(&self, i: usize) -> anyhow::Result<Value> {
        self.uc_json(i, &["state", "dump"])
    }

    /// A fresh join token from machine `i`.
    pub fn token(&self, i: usize) -> anyhow::Result<String> {
        let v = self.uc_json(i, &["machine", "token"])?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no token in {v}"))
    }

    /// Waits until machine `i`'s agent answers `status` with `ready: true`.
    pub fn wait_ready(&mut self, i: usize) -> anyhow::Result<Value> {
        let name = self.machines[i].name.clone();
        let r = eventually(self.timeout, &format!("{name} ready"), || {
            if let Some(status) = self.agent_exited(i)? {
                return Err(Fatal(format!("the agent of {name} exited: {status}")).into());
            }
            let s = self.status(i)?;
            if s["ready"] != Value::Bool(true) {
                bail!("status says not ready: {s}");
            }
            Ok(s)
        });
        r.map_err(|e| self.with_logs(e, &[i]))
    }

    /// Waits until every running agent is ready and lists every running machine as live (and no
    /// others as active).
    pub fn wait_membership(&mut self) -> anyhow::Result<()> {
        let running = self.running();
        let mut dead = None;
        let r = eventually(
            self.timeout,
            &format!("{} machines live everywhere", running.len()),
            || {
                for &i in &running {
                    if let Some(status) = self.agent_exited(i)? {
                        dead = Some(i);
                        return Err(Fatal(format!(
                            "the agent of {} exited: {status}",
                            self.machines[i].name
                        ))
                        .into());
                    }
                }
                for &i in &running {
                    let name = &self.machines[i].name;
                    let s = self.status(i)?;
                    if s["ready"] != Value::Bool(true) {
                        bail!("{name} not ready: {s}");
                    }
                    let ms = self.machines_seen_by(i)?;
                    let mut names = Vec::new();
                    for m in ms.iter().filter(|m| m["state"] != "removed") {
                        let live = m["is_self"] == Value::Bool(true) || m["liveness"] == "live";
                        if !live {
                            bail!("{name} sees {} as {}", m["name"], m["liveness"]);
                        }
                        names.push(m["name"].as_str().unwrap_or_default().to_string());
                    }
                    names.sort();
                    let mut want: Vec<String> = running
                        .iter()
                        .map(|&j| self.machines[j].name.clone())
                        .collect();
                    want.sort();
                    if names != want {
                        bail!("{name} lists {names:?}, want {want:?}");
                    }
                }
                Ok(())
            },
        );
        // An agent that exited says why in its own log: show that one alone, so the reason is
        // not cut off by the others' logs.
        let show = dead.map_or(running.clone(), |i| vec![i]);
        r.map_err(|e| self.with_logs(e, &show))
    }

    /// `e` followed by the last lines of the logs of `machines` (all if empty), for test failures.
    pub fn with_logs(&self, e: anyhow::Error, machines: &[usize]) -> anyhow::Error {
        let all: Vec<usize> = (0..self.machines.len()).collect();
        let machines = if machines.is_empty() {
            &all[..]
        } else {
            machines
        };
        anyhow::anyhow!("{e:#}\n{}", self.logs_tail(machines, 30))
    }

    /// The last `lines` lines of the logs of `machines`, for error messages.
    pub fn logs_tail(&self, machines: &[usize], lines: usize) -> String {
        let mut out = String::new();
        for &i in machines {
            let m = &self.machines[i];
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!(
                "--- last {} lines of {} ---\n{}\n",
                tail.len(),
                m.log.display(),
                tail.join("\n")
            ));
        }
        out
    }

    /// Leaves everything running (for `uc local up`): writes `<dir>/cluster.json` describing what
    /// to undo and returns its path.
    pub fn detach(mut self) -> anyhow::Result<PathBuf> {
        let state = DetachedState {
            tag: self.tag.clone(),
            hub: self.hub.clone(),
            dir: self.dir.clone(),
            created_dir: self.created_dir,
            machines: self
                .machines
                .iter()
                .map(|m| DetachedMachine {
                    name: m.name.clone(),
                    netns: m.netns.clone(),
                    ip: m.ip,
                    data_dir: m.data_dir.clone(),
                    socket: m.socket.clone(),
                    log: m.log.clone(),
                    pid: m.pid(),
                })
                .collect(),
            helpers: self
                .helpers
                .iter()
                .map(|h| DetachedHelper {
                    pid: h.child.id(),
                    exe: h.exe.clone(),
                })
                .collect(),
        };
        let path = self.dir.join("cluster.json");
        let tmp = self.dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        self.detached = true;
        Ok(path)
    }

    /// Undoes a detached cluster (for `uc local down`): kills its agents, deletes its namespaces and
    /// directories and the state file. Idempotent; parts already gone are fine.
    pub fn teardown_detached(state_file: &Path) -> anyhow::Result<()> {
        let text = match std::fs::read(state_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
        };
        let state: DetachedState = serde_json::from_slice(&text)
            .with_context(|| format!("parsing {}", state_file.display()))?;
        let mut problems = Vec::new();
        for h in &state.helpers {
            kill_if(h.pid, &h.exe);
        }
        for m in &state.machines {
            // Only a pid that is still a ucd: it may have been reused since.
            if let Some(pid) = m.pid {
                kill_if(pid, "ucd");
            }
            problems.extend(crate::workloads::cleanup(&m.data_dir));
            if let Err(e) = netns::delete(&m.netns) {
                problems.push(format!("{e:#}"));
            }
            remove_dir(&m.data_dir, &mut problems);
        }
        if let Err(e) = netns::delete(&state.hub) {
            problems.push(format!("{e:#}"));
        }
        if let Err(e) = std::fs::remove_file(state_file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("removing {}: {e}", state_file.display()));
        }
        if state.created_dir {
            remove_dir(&state.dir, &mut problems);
        }
        if !problems.is_empty() {
            bail!(
                "tearing down the cluster left:\n  - {}",
                problems.join("\n  - ")
            );
        }
        Ok(())
    }
}

fn remove_dir(dir: &Path, problems: &mut Vec<String>) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("removing {}: {e}", dir.display()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if std::thread::panicking() && !self.placeholder {
            let all: Vec<usize> = (0..self.machines.len()).collect();
            eprintln!(
                "uc-e2e: test failed; agent logs of cluster {}:\n{}",
                self.tag,
                self.logs_tail(&all, 40)
            );
        }
        let keep = std::env::var_os("UC_E2E_KEEP").is_some();
        for h in &mut self.helpers {
            let _ = h.child.kill();
            let _ = h.child.wait();
        }
        for m in &mut self.machines {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for p in crate::workloads::cleanup(&m.data_dir) {
                eprintln!("uc-e2e: {p}");
            }
            if let Err(e) = netns::delete(&m.netns) {
                eprintln!("uc-e2e: {e:#}");
            }
            if !keep {
                let _ = std::fs::remove_dir_all(&m.data_dir);
            }
        }
        if self.hub_created
            && let Err(e) = netns::delete(&self.hub)
        {
            eprintln!("uc-e2e: {e:#}");
        }
        if keep {
            eprintln!("uc-e2e: UC_E2E_KEEP is set: keeping {}", self.dir.display());
        } else if self.created_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `uc` client for one machine's socket; `Send`, so a test thread can write while another kills.
#[derive(Clone, Debug)]
pub struct Uc {
    pub bin: PathBuf,
    pub socket: PathBuf,
}

impl Uc {
    /// Runs `uc --socket S ARGS` and returns how it ended.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        run_with_timeout(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
            UC_TIMEOUT,
        )
    }

    /// Runs `uc --socket S ARGS` with `input` on its stdin.
    pub fn run_with_input(&self, args: &[&str], input: &[u8]) -> anyhow::Result<Output> {
        crate::process::run_with_input(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(args),
            Some(input.to_vec()),
            UC_TIMEOUT,
        )
    }

    /// Runs `uc --socket S -o json ARGS`; fails unless it succeeds; parses stdout.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let out = run_ok(
            Command::new(&self.bin)
                .arg("--socket")
                .arg(&self.socket)
                .args(["-o", "json"])
                .args(args),
            UC_TIMEOUT,
        )?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "uc {} printed no JSON: {:?}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}
