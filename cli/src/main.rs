//! `uc`, the command-line client: talks to an agent's local API.

mod client;
mod context;
mod local;
mod output;

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
    /// The replicated cluster state, for debugging.
    #[command(subcommand)]
    State(StateCmd),
    /// A cluster of network namespaces on this host, to try uc on one machine.
    #[command(subcommand)]
    Local(LocalCmd),
}

#[derive(Subcommand)]
enum MachineCmd {
    /// List machines: name, subnet, live/suspect/dead, endpoints, last seen.
    Ls,
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
        _ => {}
    }
    let mut api = client::connect(cli.socket.as_deref()).await?;
    match cli.command {
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
        Command::Machine(MachineCmd::Rm { machine }) => {
            let r = api
                .remove_machine(uc_proto::v1::RemoveMachineRequest { machine })
                .await
                .map_err(client::status_error)?
                .into_inner();
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
        Command::Local(_) => unreachable!("handled above"),
    }
}
