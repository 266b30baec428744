//! The agent's configuration: command-line flags (with environment overlays)
//! and an optional TOML file, checked as a whole by `validate`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;
use uc_proto::Subnet;

/// Gossip round interval when none is configured.
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(300);
/// Failure detector threshold when none is configured (see [`Config::failure_phi`]).
pub const DEFAULT_PHI: f64 = 6.0;

/// Command line of `ucd`.
#[derive(Debug, Parser)]
#[command(
    name = "ucd",
    version,
    about = "uc agent: one per machine, all equal",
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Subcommand>,
    /// Directory holding this machine's state, keys and API socket.
    #[arg(long, env = "UCD_DATA_DIR", default_value = "/var/lib/uc")]
    pub data_dir: PathBuf,
    /// Optional TOML config file; flags given on the command line win over it.
    #[arg(long, env = "UCD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of this machine in the cluster (default: the host name).
    #[arg(long, env = "UCD_NAME")]
    pub name: Option<String>,
    /// Address other agents use to reach this one.
    #[arg(long, env = "UCD_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
    /// Address to bind the join endpoint to (gossip and the peer API bind to the mesh address).
    #[arg(long, env = "UCD_LISTEN_ADDR")]
    pub listen_addr: Option<IpAddr>,
    /// UDP port for gossip (the same on every machine of a cluster).
    #[arg(long, env = "UCD_GOSSIP_PORT")]
    pub gossip_port: Option<u16>,
    /// TCP port for the peer API: state sync and joining.
    #[arg(long, env = "UCD_PEER_PORT")]
    pub peer_port: Option<u16>,
    /// TCP port of the join endpoint (the one API on the underlay).
    #[arg(long, env = "UCD_JOIN_PORT")]
    pub join_port: Option<u16>,
    /// UDP port of WireGuard (the mesh's only port on the underlay).
    #[arg(long, env = "UCD_WG_PORT")]
    pub wg_port: Option<u16>,
    /// Name of the mesh's WireGuard interface.
    #[arg(long, env = "UCD_WG_INTERFACE")]
    pub wg_interface: Option<String>,
    /// Which WireGuard carries the mesh: kernel, userspace, or auto (default: the kernel's
    /// where it has the module, else uc's userspace device).
    #[arg(long, env = "UCD_WG_BACKEND")]
    pub wg_backend: Option<uc_mesh::BackendChoice>,
    /// Port of the DNS server on the machine's mesh address (UDP and TCP).
    #[arg(long, env = "UCD_DNS_PORT")]
    pub dns_port: Option<u16>,
    /// Upstream resolvers for names outside `internal`, IP or IP:PORT (repeatable; default:
    /// the nameservers of /etc/resolv.conf).
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Vec<String>,
    /// The Docker engine that runs this machine's Docker containers (`unix:///PATH` or a
    /// socket path; default: $DOCKER_HOST if it is a unix socket, else
    /// unix:///var/run/docker.sock). Without an engine there, the Docker runtime is
    /// reported unavailable on this machine.
    #[arg(long)]
    pub docker_host: Option<String>,
    /// The microVM boot kit, a kernel and an initrd that scripts/vm-deps.sh makes (default:
    /// /var/lib/uc/vm-kit). Without one there, the vm runtime is reported unavailable.
    #[arg(long)]
    pub vm_kit: Option<PathBuf>,
    /// The accelerator of microVMs: kvm, tcg, or auto (default: KVM if a probe boot works
    /// under it, else TCG).
    #[arg(long)]
    pub vm_accel: Option<uc_workload::vm::Accel>,
    /// Port of the ingress's HTTP listener, on machines tagged `ingress` (default 80): ACME
    /// challenges, plain HTTP routes, and redirects to HTTPS.
    #[arg(long)]
    pub ingress_http_port: Option<u16>,
    /// Port of the ingress's HTTPS listener, on machines tagged `ingress` (default 443).
    #[arg(long)]
    pub ingress_https_port: Option<u16>,
    /// Threads that serve the ingress's connections, on machines tagged `ingress` (default:
    /// one per core).
    #[arg(long)]
    pub ingress_workers: Option<usize>,
    /// The ACME directory that issues the ingress's certificates (default: Let's Encrypt).
    #[arg(long)]
    pub acme_directory: Option<String>,
    /// A PEM root certificate to trust for the ACME directory's own HTTPS (a private or test
    /// CA); default: the usual web roots.
    #[arg(long)]
    pub acme_ca: Option<PathBuf>,
    /// Gossip round interval in milliseconds.
    #[arg(long, env = "UCD_GOSSIP_INTERVAL_MS")]
    pub gossip_interval_ms: Option<u64>,
    /// Failure detector threshold (phi): a machine is dead after about this many gossip
    /// intervals without news of it. Every machine of a cluster should use the same value.
    #[arg(long, env = "UCD_FAILURE_PHI")]
    pub failure_phi: Option<f64>,
    /// Endpoints (IP or IP:PORT) where this machine's WireGuard can be reached, in the order
    /// peers should try them (repeatable); default: the advertise address. A bare IP gets the
    /// WireGuard port.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
    /// Tags of this machine, such as `ingress` (repeatable); used when it joins or starts a cluster.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Start a new cluster here (only when the data directory holds no state yet).
    #[arg(long, env = "UCD_INIT", conflicts_with = "join")]
    pub init: bool,
    /// Cluster network, with --init.
    #[arg(
        long,
        env = "UCD_NETWORK",
        default_value = "10.210.0.0/16",
        requires = "init"
    )]
    pub network: Subnet,
    /// Join an existing cluster through this address (HOST:PORT of a machine's join endpoint).
    #[arg(long, env = "UCD_JOIN", requires = "token")]
    pub join: Option<String>,
    /// Join token made by `uc machine token` on a cluster machine.
    #[arg(long, env = "UCD_JOIN_TOKEN", requires = "join")]
    pub token: Option<String>,
}

/// What `ucd` does instead of running the agent.
#[derive(Debug, clap::Subcommand)]
pub enum Subcommand {
    /// Bridge standard input and output to the agent's local API socket: what `uc` runs over SSH
    /// to reach a machine's agent from another computer.
    DialStdio {
        /// The agent's API socket.
        #[arg(long, default_value = "/var/lib/uc/api.sock")]
        socket: PathBuf,
    },
    /// Become a command run in a workload (`uc exec`): join its cgroups, and on a terminal
    /// make it the controlling one (started by the agent).
    #[command(hide = true)]
    Enter {
        /// The container's main process.
        #[arg(long)]
        target: u32,
        #[arg(long)]
        cgroup_procs: Vec<PathBuf>,
        #[arg(long)]
        tty: bool,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Run one workload's process and record its output and exit (started by the agent, one
    /// per running workload; it outlives the agent).
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        cpu: Option<f64>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

/// What the TOML config file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    advertise_addr: Option<IpAddr>,
    listen_addr: Option<IpAddr>,
    gossip_port: Option<u16>,
    peer_port: Option<u16>,
    join_port: Option<u16>,
    wg_port: Option<u16>,
    wg_interface: Option<String>,
    wg_backend: Option<String>,
    dns_port: Option<u16>,
    dns_upstreams: Option<Vec<String>>,
    docker_host: Option<String>,
    vm_kit: Option<PathBuf>,
    vm_accel: Option<String>,
    gossip_interval_ms: Option<u64>,
    failure_phi: Option<f64>,
    endpoints: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    ingress_http_port: Option<u16>,
    ingress_https_port: Option<u16>,
    ingress_workers: Option<usize>,
    acme_directory: Option<String>,
    acme_ca: Option<PathBuf>,
}

/// How the agent comes to be in a cluster when its data directory is empty.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// Only run from existing state.
    Existing,
    Init {
        network: Subnet,
    },
    Join {
        peer: String,
        token: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub name: String,
    pub advertise_addr: IpAddr,
    pub listen_addr: IpAddr,
    pub gossip_port: u16,
    pub peer_port: u16,
    pub join_port: u16,
    pub wg_port: u16,
    pub wg_interface: String,
    pub wg_backend: uc_mesh::BackendChoice,
    pub dns_port: u16,
    pub dns_upstreams: Vec<SocketAddr>,
    pub docker_host: String,
    pub vm_kit: PathBuf,
    pub vm_accel: uc_workload::vm::Accel,
    pub gossip_interval: Duration,
    pub failure_phi: f64,
    pub endpoints: Vec<String>,
    pub tags: Vec<String>,
    pub ingress_http_port: u16,
    pub ingress_https_port: u16,
    pub ingress_workers: usize,
    pub acme: uc_ingress::acme::AcmeConfig,
    pub bootstrap: Bootstrap,
    /// How long a restarted agent waits for a peer to sync with before it
    /// serves the state it has (and says so in its log).
    pub catch_up_timeout: Duration,
}

impl Config {
    pub fn join_addr(&self) -> SocketAddr {
        SocketAddr::new(self.advertise_addr, self.join_port)
    }
    pub fn wg_key_path(&self) -> PathBuf {
        self.data_dir.join("wg.key")
    }
    pub fn state_path(&self) -> PathBuf {
        self.data_dir.join("state.redb")
    }
    pub fn api_socket_path(&self) -> PathBuf {
        self.data_dir.join("api.sock")
    }
}

impl Args {
    /// Merges flags over the config file, then validates everything at once.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let name = self.name.or(file.name).unwrap_or_else(default_name);
        let advertise_addr = self
            .advertise_addr
            .or(file.advertise_addr)
            .or_else(first_non_loopback_ipv4);
        let listen_addr = self
            .listen_addr
            .or(file.listen_addr)
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let mut endpoints = if self.endpoints.is_empty() {
            file.endpoints.unwrap_or_default()
        } else {
            self.endpoints
        };
        let tags = if self.tags.is_empty() {
            file.tags.unwrap_or_default()
        } else {
            self.tags
        };
        let bootstrap = match (self.init, self.join, self.token) {
            (true, _, _) => Bootstrap::Init {
                network: self.network,
            },
            (false, Some(peer), Some(token)) => Bootstrap::Join { peer, token },
            _ => Bootstrap::Existing,
        };

        let mut problems = Vec::new();
        if let Err(e) = uc_crdt::check_name("machine", &name) {
            problems.push(e.to_string());
        }
        let advertise_addr = match advertise_addr {
            Some(a) if a.is_unspecified() => {
                problems.push(format!(
                    "--advertise-addr {a} is not an address peers can use"
                ));
                a
            }
            Some(a) => a,
            None => {
                problems.push(
                    "no --advertise-addr given and no non-loopback IPv4 address found".into(),
                );
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            }
        };
        let wg_port = self
            .wg_port
            .or(file.wg_port)
            .unwrap_or(uc_proto::DEFAULT_WG_PORT);
        if endpoints.is_empty() {
            endpoints.push(advertise_addr.to_string());
        }
        // Published with their port, so peers need not guess it.
        let endpoints: Vec<String> = endpoints
            .iter()
            .filter_map(|e| match uc_mesh::plan::parse_endpoint(e, wg_port) {
                Some(a) => Some(a.to_string()),
                None => {
                    problems.push(format!("invalid --endpoint {e:?}: expected IP or IP:PORT"));
                    None
                }
            })
            .collect();
        let wg_interface = self
            .wg_interface
            .or(file.wg_interface)
            .unwrap_or_else(|| "uc0".into());
        if wg_interface.is_empty()
            || wg_interface.len() > 15
            || !wg_interface
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "invalid --wg-interface {wg_interface:?}: 1 to 15 letters, digits, '-' or '_'"
            ));
        }
        for tag in &tags {
            if let Err(e) = validate_tag(tag) {
                problems.push(e);
            }
        }
        let dns_upstreams: Vec<SocketAddr> = if self.dns_upstreams.is_empty() {
            file.dns_upstreams.unwrap_or_default()
        } else {
            self.dns_upstreams
        }
        .iter()
        .filter_map(|u| match uc_mesh::plan::parse_endpoint(u, 53) {
            Some(a) => Some(a),
            None => {
                problems.push(format!(
                    "invalid --dns-upstream {u:?}: expected IP or IP:PORT"
                ));
                None
            }
        })
        .collect();
        let wg_backend = match (self.wg_backend, file.wg_backend) {
            (Some(b), _) => b,
            (None, Some(text)) => text
                .parse()
                .map_err(|e: String| anyhow::anyhow!("wg_backend in the config file: {e}"))?,
            (None, None) => uc_mesh::BackendChoice::Auto,
        };
        let vm_accel = match (self.vm_accel, file.vm_accel) {
            (Some(a), _) => a,
            (None, Some(text)) => text
                .parse()
                .map_err(|e: String| anyhow::anyhow!("vm_accel in the config file: {e}"))?,
            (None, None) => uc_workload::vm::Accel::Auto,
        };
        let gossip_interval = self
            .gossip_interval_ms
            .or(file.gossip_interval_ms)
            .map_or(DEFAULT_GOSSIP_INTERVAL, Duration::from_millis);
        if gossip_interval < Duration::from_millis(10) || gossip_interval > Duration::from_secs(10)
        {
            problems.push(format!(
                "gossip interval {} ms is out of range (10 to 10000)",
                gossip_interval.as_millis()
            ));
        }
        let failure_phi = self.failure_phi.or(file.failure_phi).unwrap_or(DEFAULT_PHI);
        if !(1.0..=16.0).contains(&failure_phi) {
            problems.push(format!(
                "failure phi {failure_phi} is out of range (1 to 16)"
            ));
        }
        let ingress_http_port = self
            .ingress_http_port
            .or(file.ingress_http_port)
            .unwrap_or(80);
        let ingress_https_port = self
            .ingress_https_port
            .or(file.ingress_https_port)
            .unwrap_or(443);
        if ingress_http_port == 0
            || ingress_https_port == 0
            || ingress_http_port == ingress_https_port
        {
            problems.push(format!(
                "ingress ports {ingress_http_port} (http) and {ingress_https_port} (https) must be two different ports from 1 to 65535"
            ));
        }
        let ingress_workers = self
            .ingress_workers
            .or(file.ingress_workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if !(1..=256).contains(&ingress_workers) {
            problems.push(format!(
                "ingress workers {ingress_workers} is out of range (1 to 256)"
            ));
        }
        let mut acme = uc_ingress::acme::AcmeConfig::default();
        if let Some(d) = self.acme_directory.or(file.acme_directory) {
            if !d.starts_with("https://") {
                problems.push(format!("--acme-directory {d:?} is not an https:// URL"));
            }
            acme.directory = d;
        }
        acme.root_ca = self.acme_ca.or(file.acme_ca);
        if let Some(ca) = &acme.root_ca
            && !ca.is_file()
        {
            problems.push(format!("--acme-ca {}: no such file", ca.display()));
        }
        if !problems.is_empty() {
            bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
        }
        Ok(Config {
            data_dir: self.data_dir,
            name,
            advertise_addr,
            listen_addr,
            gossip_port: self
                .gossip_port
                .or(file.gossip_port)
                .unwrap_or(uc_proto::DEFAULT_GOSSIP_PORT),
            peer_port: self
                .peer_port
                .or(file.peer_port)
                .unwrap_or(uc_proto::DEFAULT_PEER_PORT),
            join_port: self
                .join_port
                .or(file.join_port)
                .unwrap_or(uc_proto::DEFAULT_JOIN_PORT),
            wg_port,
            wg_interface,
            wg_backend,
            dns_port: self.dns_port.or(file.dns_port).unwrap_or(53),
            dns_upstreams,
            docker_host: self
                .docker_host
                .or(file.docker_host)
                .or_else(|| {
                    std::env::var("DOCKER_HOST")
                        .ok()
                        .filter(|h| h.starts_with("unix://"))
                })
                .unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            vm_kit: self
                .vm_kit
                .or(file.vm_kit)
                .unwrap_or_else(|| uc_workload::vm::DEFAULT_KIT.into()),
            vm_accel,
            gossip_interval,
            failure_phi,
            endpoints,
            tags,
            ingress_http_port,
            ingress_https_port,
            ingress_workers,
            acme,
            bootstrap,
            catch_up_timeout: Duration::from_secs(10),
        })
    }
}

fn load_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Tags are short words such as `ingress`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}: use letters, digits and '-'"))
    }
}

fn default_name() -> String {
    uc_proto::machine_name_from_host(&std::fs::read_to_string("/etc/hostname").unwrap_or_default())
}

/// The address this machine's traffic to the outside leaves from; on a machine without a
/// default route, its first IPv4 address that is neither loopback, link-local, nor on uc's own
/// interfaces.
fn first_non_loopback_ipv4() -> Option<IpAddr> {
    // Ask the kernel which source address it would use; no packet is sent.
    let routed = std::net::UdpSocket::bind("0.0.0.0:0")
        .ok()
        .and_then(|sock| {
            sock.connect("192.0.2.1:9").ok()?;
            let ip = sock.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        });
    routed.or_else(|| {
        nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
            let ip = ifa.address?.as_sockaddr_in()?.ip();
            let usable = !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified();
            (usable && !ifa.interface_name.starts_with("uc")).then_some(IpAddr::V4(ip))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        let mut v = vec!["ucd"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)?.into_config()
    }

    #[test]
    fn reports_every_problem_at_once() {
        let err = parse(&[
            "--name",
            "Bad_Name",
            "--advertise-addr",
            "0.0.0.0",
            "--tag",
            "no way",
            "--endpoint",
            "pi.lan",
            "--wg-interface",
            "much-too-long-a-name",
            "--failure-phi",
            "0.5",
            "--gossip-interval-ms",
            "5",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid machine name"), "{err}");
        assert!(err.contains("not an address peers can use"), "{err}");
        assert!(err.contains("invalid tag"), "{err}");
        assert!(err.contains("invalid --endpoint \"pi.lan\""), "{err}");
        assert!(err.contains("invalid --wg-interface"), "{err}");
        assert!(err.contains("failure phi 0.5 is out of range"), "{err}");
        assert!(
            err.contains("gossip interval 5 ms is out of range"),
            "{err}"
        );
    }

    #[test]
    fn defaults_and_bootstrap() {
        let c = parse(&["--name", "a", "--advertise-addr", "172.31.0.10", "--init"]).unwrap();
        assert_eq!(c.gossip_port, uc_proto::DEFAULT_GOSSIP_PORT);
        assert_eq!(c.gossip_interval, DEFAULT_GOSSIP_INTERVAL);
        assert_eq!(c.failure_phi, DEFAULT_PHI);
        assert_eq!(c.endpoints, vec!["172.31.0.10:51820".to_string()]);
        assert_eq!(c.join_addr().to_string(), "172.31.0.10:51002");
        assert!(matches!(c.bootstrap, Bootstrap::Init { .. }));
        let c = parse(&[
            "--name",
            "b",
            "--advertise-addr",
            "172.31.0.11",
            "--join",
            "172.31.0.10:51000",
            "--token",
            "t",
        ])
        .unwrap();
        assert!(matches!(c.bootstrap, Bootstrap::Join { .. }));
        assert!(
            parse(&["--name", "b", "--join", "x:1"]).is_err(),
            "--join needs --token"
        );
    }

    #[test]
    fn config_file_rejects_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("ucd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ucd.toml");
        std::fs::write(&path, "name = \"a\"\nbogus = 1\n").unwrap();
        let err = format!("{:#}", load_file(&path).unwrap_err());
        assert!(err.contains("bogus") && err.contains("ucd.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
