//! `uc`, the command-line client: talks to an agent's local API.

mod client;
mod context;
mod exec;
mod install;
mod local;
mod machine;
mod output;
mod progress;
mod ssh;
mod target;
mod workloads;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "uc",
    version,
    about = "uc: a personal cloud made of the machines you already have"
)]
struct Cli {
    /// The agent's API socket (default: the current context, else /var/lib/uc/api.sock).
    #[arg(long, global = true, env = "UC_SOCKET")]
    socket: Option<PathBuf>,
    /// Reach the cluster through this machine over SSH, [USER@]HOST[:PORT] (default: the current
    /// context).
    #[arg(long, global = true, env = "UC_SSH", conflicts_with = "socket")]
    ssh: Option<target::SshTarget>,
    /// Output format of listings.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// This agent: its machine, cluster, whether it has caught up, counters.
    Status,
    /// Machines of the cluster.
    #[command(subcommand)]
    Machine(MachineCmd),
    /// The WireGuard mesh.
    #[command(subcommand)]
    Wg(WgCmd),
    /// The cluster's internal DNS.
    #[command(subcommand)]
    Dns(DnsCmd),
    /// Public HTTP, HTTPS and TCP through the machines tagged `ingress`
    /// (`uc machine tag M ingress`; publish with `uc run -p app.example.com:8000/https`).
    #[command(subcommand)]
    Ingress(IngressCmd),
    /// The replicated cluster state, for debugging.
    #[command(subcommand)]
    State(StateCmd),
    /// A cluster of network namespaces on this host, to try uc on one machine.
    #[command(subcommand)]
    Local(LocalCmd),
    /// Contexts: named lists of connections to a cluster (~/.config/uc/config.toml).
    #[command(subcommand)]
    Ctx(CtxCmd),
    /// Run a service: its containers are placed on machines of the cluster, on the mesh.
    Run(RunFlags),
    /// List services.
    Ls,
    /// List containers: machine, address, state, uptime.
    Ps {
        /// Only this service's containers.
        service: Option<String>,
    },
    /// Remove services: their containers stop and everything they had is deleted.
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// A service's spec and its containers, as the state and their machines say.
    Inspect { service: String },
    /// Change how many containers a replicated service has: new ones are placed like
    /// `uc run` places them; the newest go first (those on machines that are down before all).
    Scale {
        service: String,
        replicas: u32,
        /// Return at once instead of waiting for new containers to run.
        #[arg(short, long)]
        detach: bool,
        /// How long to wait for them, in seconds.
        #[arg(long = "timeout", default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Stop every container of services; they keep their machine and address.
    Stop {
        #[arg(required = true)]
        services: Vec<String>,
        /// Return at once instead of waiting until they have stopped.
        #[arg(short, long)]
        detach: bool,
        #[arg(long = "timeout", default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Start the stopped containers of services again.
    Start {
        #[arg(required = true)]
        services: Vec<String>,
        /// Return at once instead of waiting until they run.
        #[arg(short, long)]
        detach: bool,
        #[arg(long = "timeout", default_value_t = 120)]
        timeout_secs: u64,
    },
    /// A service's output, merged across machines.
    Logs {
        service: String,
        /// Follow: print new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines (0: all).
        #[arg(short = 'n', long, default_value_t = 100)]
        tail: u32,
    },
    /// Run a command in a running container of a service (on this machine if it has one),
    /// with this terminal's input and output; exits with the command's exit code.
    Exec {
        /// Keep stdin open and send it to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (with -i, this one's keys go to it as typed).
        #[arg(short, long)]
        tty: bool,
        /// Which container (its id or the start of it); default: a running one.
        #[arg(long)]
        container: Option<String>,
        service: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Images of the machines' stores.
    #[command(subcommand)]
    Image(ImageCmd),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Add an image to the store of the machine this command reaches: a root filesystem
    /// tarball, a `docker save` archive or an OCI archive (gzip or not). Other machines fetch
    /// it over the mesh when a service needs it there.
    Import {
        file: PathBuf,
        /// Its name (default: the name in the archive, else the file's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List images and the machines that have them.
    Ls,
}

#[derive(clap::Args)]
struct RunFlags {
    /// Name of the service (default: the image's name and 4 random hex digits).
    #[arg(short, long)]
    name: Option<String>,
    /// A machine to run on (repeatable; default: any machine with the runtime).
    #[arg(short, long = "machine")]
    machines: Vec<String>,
    /// docker, nspawn or vm.
    #[arg(long, default_value = "nspawn")]
    runtime: uc_proto::spec::RuntimeKind,
    /// Publish a port: [HOSTNAME:][LB_PORT:]PORT[/PROTO] or [IP:]HOST_PORT:PORT[/PROTO]@host.
    #[arg(short = 'p', long = "publish")]
    ports: Vec<String>,
    /// An environment variable, KEY=VALUE (repeatable).
    #[arg(short, long)]
    env: Vec<String>,
    /// How many containers (default: one per --machine, else 1).
    #[arg(long, conflicts_with = "mode")]
    replicas: Option<u32>,
    /// `global`: one container on every machine with the runtime, also ones that join later.
    #[arg(long, value_parser = ["global", "replicated"])]
    mode: Option<String>,
    /// CPU limit, in cores (0.5 = half a core).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory limit: 512m, 2g, ...
    #[arg(long)]
    memory: Option<String>,
    /// A file of SSH public keys for root in each nspawn container (repeatable; default:
    /// your ~/.ssh/id_ed25519.pub, id_ecdsa.pub or id_rsa.pub, the first that exists).
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<std::path::PathBuf>,
    /// Write no SSH key into the containers.
    #[arg(long, conflicts_with = "ssh_keys")]
    no_ssh_key: bool,
    /// Return once the containers are placed, without waiting for them to run.
    #[arg(short, long)]
    detach: bool,
    /// How long to wait for the containers to run.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// The image (see uc image ls).
    image: String,
    /// The command to run (default: the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Subcommand)]
enum CtxCmd {
    /// List contexts; the current one is marked.
    Ls,
    /// Make a context the current one.
    Use { name: String },
    /// Show a context's connections (default: the current one).
    Show { name: Option<String> },
}

/// What `uc machine init` and `uc machine add` say about the host.
#[derive(clap::Args)]
struct HostFlags {
    /// The machine, as ssh reaches it: [USER@]HOST[:PORT].
    host: target::SshTarget,
    /// Name of the machine in the cluster (default: its host name).
    #[arg(short, long)]
    name: Option<String>,
    /// SSH private key to log in with (default: ssh's own choice).
    #[arg(short = 'i', long)]
    ssh_key: Option<PathBuf>,
    /// Where other machines reach its WireGuard: IP or IP:PORT (repeatable; default: its own
    /// address).
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// WireGuard's UDP port on the machine (default 51820).
    #[arg(long)]
    wg_port: Option<u16>,
    /// Tags such as `ingress` (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    yes: bool,
    /// Install even where a uc cluster state exists (it is set aside, not deleted).
    #[arg(long)]
    force: bool,
    /// The ucd binary to install (default: the one next to uc, else on PATH).
    #[arg(long)]
    binary: Option<PathBuf>,
}

impl HostFlags {
    fn into_args(self) -> machine::HostArgs {
        machine::HostArgs {
            target: self.host,
            name: self.name,
            ssh_key: self.ssh_key,
            endpoints: self.endpoints,
            wg_port: self.wg_port,
            tags: self.tags,
            yes: self.yes,
            force: self.force,
            binary: self.binary,
        }
    }
}

#[derive(Subcommand)]
enum MachineCmd {
    /// Start a new cluster on a machine reached over SSH: installs ucd there and selects a
    /// context for it.
    Init {
        #[command(flatten)]
        host: HostFlags,
        /// The cluster's network.
        #[arg(long, default_value = "10.210.0.0/16")]
        network: String,
        /// Name of the context to create (default: "default").
        #[arg(long)]
        context: Option<String>,
    },
    /// Join a machine reached over SSH to the cluster: installs ucd there and waits until every
    /// machine reaches it over the mesh.
    Add {
        #[command(flatten)]
        host: HostFlags,
        /// A join token made elsewhere (`uc machine token`), instead of a fresh one.
        #[arg(long, requires = "join")]
        token: Option<String>,
        /// The join endpoint (IP:PORT) that goes with --token.
        #[arg(long, requires = "token")]
        join: Option<String>,
    },
    /// List machines: name, subnet, live/suspect/dead, endpoints, last seen.
    Ls,
    /// Rename a machine.
    Rename { machine: String, new_name: String },
    /// Make a single-use join token for a new machine (`ucd --join ADDR --token TOKEN`).
    Token {
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 600)]
        ttl: u64,
    },
    /// Remove a machine from the cluster: every other machine forgets it as a mesh peer.
    Rm { machine: String },
    /// Add (or with --remove, drop) a tag such as `ingress` on a machine.
    Tag {
        machine: String,
        tag: String,
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Subcommand)]
enum WgCmd {
    /// A machine's WireGuard interface: peers, endpoint in use, last handshake, bytes each way.
    Show {
        /// The machine to ask (default: the one this command reaches).
        #[arg(short, long)]
        machine: Option<String>,
    },
}

#[derive(Subcommand)]
enum DnsCmd {
    /// Ask a machine's DNS server, as its workloads do: `web.internal`, `nearest.web.internal`,
    /// `pi.machine.internal`, `_http._tcp.web.internal` (SRV), or any outside name (forwarded).
    Lookup {
        name: String,
        /// Record type.
        #[arg(short = 't', long = "type", default_value = "A")]
        record_type: String,
        /// The machine whose DNS server to ask (default: the one this command reaches).
        #[arg(short, long)]
        machine: Option<String>,
    },
}

#[derive(Subcommand)]
enum IngressCmd {
    /// Routes, certificates (status, expiry, errors) and the machines that serve them.
    Ls,
}

#[derive(Subcommand)]
enum StateCmd {
    /// Print the whole cluster document as JSON.
    Dump,
    /// Create or update a service record (debugging; `uc run` comes later).
    PutService {
        name: String,
        /// The service spec, a JSON object.
        #[arg(long, default_value = "{}")]
        spec: String,
    },
    /// Remove a service record and its containers (debugging).
    RmService { name: String },
}

#[derive(Subcommand)]
enum LocalCmd {
    /// Start N machines, each in its own network namespace, running the real agent.
    Up {
        #[arg(long, default_value_t = 3)]
        machines: usize,
    },
    /// Stop the local cluster and remove everything it made.
    Down,
    /// Internal: forwards HOST_PORT:PORT from 127.0.0.1 to 127.0.0.1 in a namespace (the local
    /// ingress machine's 80 and 443); `uc local up` starts it.
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        netns: String,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.output == Format::Json;
    match cli.command {
        Command::Local(LocalCmd::Up { machines }) => return local::up(machines, json),
        Command::Local(LocalCmd::Down) => return local::down(),
        Command::Local(LocalCmd::Forward { netns, pairs }) => {
            return local::forward(&netns, &pairs);
        }
        _ => {}
    }
    let command = match cli.command {
        Command::Machine(MachineCmd::Init {
            host,
            network,
            context,
        }) => return machine::init(host.into_args(), network, context, json).await,
        Command::Machine(MachineCmd::Add { host, token, join }) => {
            return machine::add(
                host.into_args(),
                cli.socket.as_deref(),
                cli.ssh.as_ref(),
                token,
                join,
                json,
            )
            .await;
        }
        Command::Ctx(c) => return ctx(c, json),
        other => other,
    };
    let (mut api, conn) = client::connect_any(cli.socket.as_deref(), cli.ssh.as_ref()).await?;
    match command {
        Command::Status => {
            let s = api
                .status(uc_proto::v1::StatusRequest {})
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::status(&s, json)
        }
        Command::Machine(MachineCmd::Ls) => {
            let r = api
                .list_machines(uc_proto::v1::ListMachinesRequest {})
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::machines(&r.machines, json)
        }
        Command::Machine(MachineCmd::Token { ttl }) => {
            let r = api
                .create_join_token(uc_proto::v1::CreateJoinTokenRequest { ttl_seconds: ttl })
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::token(&r, json)
        }
        Command::Machine(MachineCmd::Tag {
            machine,
            tag,
            remove,
        }) => {
            api.tag_machine(uc_proto::v1::TagMachineRequest {
                machine,
                tag,
                remove,
            })
            .await
            .map_err(client::status_error)?;
            Ok(())
        }
        Command::Machine(MachineCmd::Rename { machine, new_name }) => {
            let r = api
                .rename_machine(uc_proto::v1::RenameMachineRequest { machine, new_name })
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::named(
                &r.id,
                &r.new_name,
                json,
                &format!("renamed machine {} to {}", r.old_name, r.new_name),
            );
            Ok(())
        }
        Command::Machine(MachineCmd::Rm { machine }) => {
            // The machine's SSH address, to drop from the context (it is no way in any more).
            let endpoints: Vec<String> = api
                .list_machines(uc_proto::v1::ListMachinesRequest {})
                .await
                .map(|r| r.into_inner().machines)
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m.name == machine || m.id == machine)
                .flat_map(|m| m.endpoints)
                .collect();
            let r = api
                .remove_machine(uc_proto::v1::RemoveMachineRequest { machine })
                .await
                .map_err(client::status_error)?
                .into_inner();
            if let (context::Conn::Ssh { .. }, Some((ctx, _))) = (&conn, context::current()?) {
                for ep in &endpoints {
                    let host = ep.rsplit_once(':').map_or(ep.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    context::remove_ssh_host(&ctx, host)?;
                }
            }
            output::named(
                &r.id,
                &r.name,
                json,
                &format!("removed machine {} ({})", r.name, r.id),
            );
            Ok(())
        }
        Command::Wg(WgCmd::Show { machine }) => {
            let r = api
                .wg_show(uc_proto::v1::WgShowRequest {
                    machine: machine.unwrap_or_default(),
                })
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::wg(&r, json)
        }
        Command::Ingress(IngressCmd::Ls) => {
            let r = api
                .ingress_list(uc_proto::v1::IngressListRequest {})
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::ingress(&r.json, json)
        }
        Command::Dns(DnsCmd::Lookup {
            name,
            record_type,
            machine,
        }) => {
            let r = api
                .dns_lookup(uc_proto::v1::DnsLookupRequest {
                    name,
                    record_type,
                    machine: machine.unwrap_or_default(),
                })
                .await
                .map_err(client::status_error)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "server": r.server,
                        "response_code": r.response_code,
                        "answers": r.answers,
                        "authorities": r.authorities,
                        "milliseconds": r.milliseconds,
                    })
                );
            } else {
                println!(
                    ";; {} from {} in {:.1} ms",
                    r.response_code, r.server, r.milliseconds
                );
                for a in &r.answers {
                    println!("{a}");
                }
                for a in &r.authorities {
                    println!(";; authority: {a}");
                }
            }
            Ok(())
        }
        Command::State(StateCmd::Dump) => {
            let r = api
                .dump_state(uc_proto::v1::DumpStateRequest {})
                .await
                .map_err(client::status_error)?
                .into_inner();
            println!("{}", r.json);
            Ok(())
        }
        Command::State(StateCmd::PutService { name, spec }) => {
            let r = api
                .put_service(uc_proto::v1::PutServiceRequest {
                    name,
                    spec_json: spec,
                })
                .await
                .map_err(client::status_error)?
                .into_inner();
            output::named(&r.id, &r.name, json, &format!("{} {}", r.name, r.id));
            Ok(())
        }
        Command::State(StateCmd::RmService { name }) => {
            api.remove_service(uc_proto::v1::RemoveServiceRequest { name })
                .await
                .map_err(client::status_error)?;
            Ok(())
        }
        Command::Run(f) => {
            let a = workloads::RunArgs {
                name: f.name,
                machines: f.machines,
                runtime: f.runtime,
                ports: f.ports,
                env: f.env,
                replicas: f.replicas,
                global: f.mode.as_deref() == Some("global"),
                cpu: f.cpu,
                memory: f.memory,
                ssh_keys: workloads::ssh_keys(&f.ssh_keys, f.no_ssh_key, f.runtime)?,
                image: f.image,
                command: f.command,
                detach: f.detach,
                timeout: std::time::Duration::from_secs(f.timeout_secs),
            };
            workloads::run(&mut api, a, json).await
        }
        Command::Ls => workloads::ls(&mut api, json).await,
        Command::Ps { service } => workloads::ps(&mut api, service, json).await,
        Command::Rm { services } => {
            for name in services {
                api.remove_service(uc_proto::v1::RemoveServiceRequest { name: name.clone() })
                    .await
                    .map_err(client::status_error)?;
                if !json {
                    println!("removed {name}");
                }
            }
            Ok(())
        }
        Command::Logs {
            service,
            follow,
            tail,
        } => workloads::logs(&mut api, service, tail, follow, json).await,
        Command::Inspect { service } => workloads::inspect(&mut api, service, json).await,
        Command::Exec {
            interactive,
            tty,
            container,
            service,
            command,
        } => {
            let code = exec::exec(&mut api, service, container, interactive, tty, command).await?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Scale {
            service,
            replicas,
            detach,
            timeout_secs,
        } => {
            let t = std::time::Duration::from_secs(timeout_secs);
            workloads::scale(&mut api, service, replicas, detach, t, json).await
        }
        Command::Stop {
            services,
            detach,
            timeout_secs,
        } => {
            let t = std::time::Duration::from_secs(timeout_secs);
            workloads::set_running(&mut api, services, false, detach, t, json).await
        }
        Command::Start {
            services,
            detach,
            timeout_secs,
        } => {
            let t = std::time::Duration::from_secs(timeout_secs);
            workloads::set_running(&mut api, services, true, detach, t, json).await
        }
        Command::Image(ImageCmd::Import { file, name }) => {
            workloads::image_import(&mut api, &file, name, json).await
        }
        Command::Image(ImageCmd::Ls) => workloads::image_ls(&mut api, json).await,
        Command::Local(_)
        | Command::Ctx(_)
        | Command::Machine(MachineCmd::Init { .. } | MachineCmd::Add { .. }) => {
            unreachable!("handled above")
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ctx(cmd: CtxCmd, json: bool) -> anyhow::Result<()> {
    let mut config = context::load()?;
    match cmd {
        CtxCmd::Ls => {
            if json {
                let list: Vec<_> = config
                    .contexts
                    .iter()
                    .map(|(name, c)| {
                        serde_json::json!({
                            "name": name,
                            "current": config.current_context.as_deref() == Some(name),
                            "connections": c.connections,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:<2}{:<20} CONNECTIONS", "", "NAME");
                for (name, c) in &config.contexts {
                    let mark = if config.current_context.as_deref() == Some(name) {
                        "*"
                    } else {
                        ""
                    };
                    let conns: Vec<String> = c
                        .connections
                        .iter()
                        .map(|c| {
                            c.check()
                                .map_or_else(|e| format!("invalid: {e}"), |c| c.to_string())
                        })
                        .collect();
                    println!("{mark:<2}{name:<20} {}", conns.join(", "));
                }
            }
            Ok(())
        }
        CtxCmd::Use { name } => {
            if !config.contexts.contains_key(&name) {
                let known: Vec<&str> = config.contexts.keys().map(String::as_str).collect();
                anyhow::bail!(
                    "no context {name:?} in {} (known: {})",
                    context::path().display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            }
            config.current_context = Some(name.clone());
            context::save(&config)?;
            if !json {
                println!("using context {name:?}");
            }
            Ok(())
        }
        CtxCmd::Show { name } => {
            let name = name
                .or(config.current_context.clone())
                .ok_or_else(|| anyhow::anyhow!("no current context; name one"))?;
            let c = config.contexts.get(&name).ok_or_else(|| {
                anyhow::anyhow!("no context {name:?} in {}", context::path().display())
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "connections": c.connections})
                );
            } else {
                println!("context {name:?} ({})", context::path().display());
                for conn in &c.connections {
                    match conn.check() {
                        Ok(k) => println!(
                            "  {k}{}",
                            conn.ssh_key
                                .as_ref()
                                .map(|k| format!(" (key {})", k.display()))
                                .unwrap_or_default()
                        ),
                        Err(e) => println!("  invalid: {e}"),
                    }
                }
            }
            Ok(())
        }
    }
}
