//! `uc machine init|add USER@HOST`: check a host over SSH, copy `ucd` there, install it as a
//! service, start or join a cluster, wait until the machine has caught up and is on the mesh.
//! A failure leaves the host as it was: what was installed is removed, a joined machine is
//! removed from the cluster again.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::client::{self, Api, rpc};
use crate::context::{self, Conn, Connection};
use crate::install::{self, BinaryUndo, Bootstrap, HostFacts, Undo};
use crate::progress::Steps;
use crate::ssh::{Ssh, quote};
use crate::target::SshTarget;

/// How long one remote step may take (copying the binary over a slow link included).
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a new machine may take to become ready and reachable.
const WAIT_TIMEOUT: Duration = Duration::from_secs(90);
/// Lifetime of the join token `uc machine add` makes.
const TOKEN_TTL_SECS: u64 = 300;

/// What the user said about the host.
#[derive(Clone, Debug)]
pub struct HostArgs {
    pub target: SshTarget,
    pub name: Option<String>,
    pub ssh_key: Option<PathBuf>,
    pub endpoints: Vec<String>,
    pub wg_port: Option<u16>,
    pub tags: Vec<String>,
    pub yes: bool,
    pub force: bool,
    /// The `ucd` to install (default: next to this `uc`, then on PATH).
    pub binary: Option<PathBuf>,
}

/// An install in progress on one host.
struct Host {
    ssh: Ssh,
    facts: HostFacts,
    undo: Undo,
    sudo: bool,
    /// Where this install's part of the agent's log begins: the byte offset in the supervised
    /// log, or the host's clock (Unix seconds) for the journal. Earlier lines are an earlier
    /// install's and say nothing of this one.
    log_from: u64,
}

impl Host {
    async fn sh(&self, what: &str, script: &str, stdin: Option<&[u8]>) -> anyhow::Result<String> {
        self.ssh
            .run_ok(what, script, self.sudo, stdin, STEP_TIMEOUT)
            .await
    }

    /// The agent's last log lines, for an error message.
    async fn log_tail(&self) -> String {
        let script = if self.facts.systemd {
            "journalctl -u ucd -n 15 --no-pager 2>/dev/null".to_string()
        } else {
            format!("tail -n 15 {} 2>/dev/null", install::LOG)
        };
        self.ssh
            .run(&script, self.sudo, None, Duration::from_secs(20))
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// The error the agent last exited with, if it did (`ucd` prints `error: ...` then).
    async fn agent_error(&self) -> Option<String> {
        let script = if self.facts.systemd {
            format!(
                "journalctl -u ucd -o cat --since @{} --no-pager 2>/dev/null | tail -n 40",
                self.log_from
            )
        } else {
            format!(
                "tail -c +{} {} 2>/dev/null | tail -n 40",
                self.log_from + 1,
                install::LOG
            )
        };
        let out = self
            .ssh
            .run(&script, self.sudo, None, Duration::from_secs(20))
            .await
            .ok()?;
        last_error(&String::from_utf8_lossy(&out.stdout))
    }

    /// This machine's id, once the agent made one.
    async fn machine_id(&self) -> Option<String> {
        let out = self
            .ssh
            .run(
                &format!("cat {}/machine-id 2>/dev/null", install::DATA),
                self.sudo,
                None,
                Duration::from_secs(20),
            )
            .await
            .ok()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!id.is_empty()).then_some(id)
    }

    async fn rollback(&self) -> anyhow::Result<()> {
        self.sh(
            "removing what was installed",
            &install::rollback_script(&self.undo),
            None,
        )
        .await
        .map(|_| ())
    }
}

/// The last `error: ...` that `ucd` printed in `log`, with its indented continuation lines.
fn last_error(log: &str) -> Option<String> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.iter().rposition(|l| l.starts_with("error: "))?;
    let mut out = lines[start].trim_start_matches("error: ").to_string();
    for l in &lines[start + 1..] {
        if !l.starts_with("  ") {
            break;
        }
        out.push('\n');
        out.push_str(l);
    }
    Some(out)
}

fn default_name(facts: &HostFacts, target: &SshTarget) -> String {
    uc_proto::machine_name_from_host(if facts.hostname.is_empty() {
        &target.host
    } else {
        &facts.hostname
    })
}

/// The `ucd` to copy for a host of architecture `arch`: `--binary`, else `ucd` next to this
/// `uc`, else `ucd-<arch>` next to it, else `ucd` on PATH.
fn local_ucd(explicit: Option<&Path>, arch: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.push(dir.join("ucd"));
            candidates.push(dir.join(format!("ucd-{arch}")));
        }
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("ucd")));
        }
    }
    let mut seen = Vec::new();
    for c in candidates {
        let Ok(mut f) = std::fs::File::open(&c) else {
            continue;
        };
        let mut head = [0u8; 64];
        let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
        match install::elf_arch(&head[..n]) {
            Some(a) if install::arch_matches(arch, a) => return Ok(c),
            Some(a) => seen.push(format!("{} is for {a}", c.display())),
            None => seen.push(format!("{} is not an executable", c.display())),
        }
    }
    if seen.is_empty() {
        bail!(
            "no ucd binary found to install (looked next to uc and on PATH); pass one with --binary"
        )
    }
    bail!(
        "no ucd binary for {arch} to install: {}; build one for {arch} (for example `cargo build --profile dist --target {arch}-unknown-linux-gnu`) and pass it with --binary",
        seen.join(", ")
    )
}

fn sha256_file(path: &Path) -> anyhow::Result<(Vec<u8>, String)> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let sha = hex::encode(ring::digest::digest(&ring::digest::SHA256, &data));
    Ok((data, sha))
}

fn confirm(args: &HostArgs, what: &str) -> anyhow::Result<()> {
    if args.yes || !std::io::stdin().is_terminal() {
        return Ok(());
    }
    eprint!("{what} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!("cancelled")
    }
}

/// Connects, checks the host, copies the binary and starts the agent with `boot`. On failure
/// after something was installed, removes it again.
async fn install_agent(
    args: &HostArgs,
    boot: &Bootstrap,
    steps: &mut Steps,
) -> anyhow::Result<(Host, String)> {
    let ssh = Ssh::new(args.target.clone(), args.ssh_key.clone()).multiplexed()?;
    steps.start(&format!("connecting to {} over SSH", args.target));
    let facts = async {
        let out = ssh
            .run_ok(
                "probing the host",
                install::PROBE,
                false,
                None,
                STEP_TIMEOUT,
            )
            .await?;
        install::parse_probe(&out).map_err(anyhow::Error::msg)
    }
    .await;
    let facts = match facts {
        Ok(f) => f,
        Err(e) => {
            steps.fail();
            ssh.close().await;
            return Err(e);
        }
    };
    steps.ok(&format!("{} {} as {}", facts.os, facts.arch, facts.user));

    steps.start("checking the host");
    let needs = install::Needs {
        wg_port: args.wg_port.unwrap_or(uc_proto::DEFAULT_WG_PORT),
        force: args.force,
    };
    let target = args.target.to_string();
    let mut problems = install::problems(&facts, &target, &needs);
    let binary = match local_ucd(args.binary.as_deref(), &facts.arch) {
        Ok(b) => Some(b),
        Err(e) => {
            problems.push(format!("{e:#}"));
            None
        }
    };
    if !problems.is_empty() {
        steps.fail();
        ssh.close().await;
        bail!(
            "cannot install uc on {target}:\n  - {}",
            problems.join("\n  - ")
        );
    }
    let binary = binary.expect("no problems means a binary");
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| default_name(&facts, &args.target));
    steps.ok(&format!(
        "{}, {}",
        if facts.systemd {
            "systemd"
        } else {
            "no systemd"
        },
        if facts.root() { "root" } else { "sudo" }
    ));
    let mut host = Host {
        log_from: 0,
        sudo: !facts.root(),
        undo: Undo {
            systemd: facts.systemd,
            made_data_dir: !facts.data_dir,
            keep_log: facts.log,
            existed: facts.has.clone(),
            made_etc_dir: !facts.etc_dir,
            made_lib_dir: !facts.lib_dir,
            made_group: !facts.group,
            binary: None,
            replaced_state: None,
        },
        facts,
        ssh,
    };
    match install_steps(&mut host, args, boot, &name, &binary, steps).await {
        Ok(()) => Ok((host, name)),
        Err(e) => Err(fail_and_undo(&host, e, steps, None).await),
    }
}

async fn install_steps(
    host: &mut Host,
    args: &HostArgs,
    boot: &Bootstrap,
    name: &str,
    binary: &Path,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    steps.start(&format!("copying ucd to {}", args.target));
    let (data, sha) = sha256_file(binary)?;
    if host.facts.ucd_sha.as_deref() == Some(sha.as_str()) {
        steps.ok("already there");
    } else {
        let prev = format!("{}.uc-prev", install::BIN);
        let keep_prev = if host.facts.ucd_sha.is_some() {
            format!("cp -p {bin} {prev} && ", bin = install::BIN)
        } else {
            String::new()
        };
        host.sh(
            "copying ucd",
            &format!(
                "set -e; mkdir -p /usr/local/bin; {keep_prev}cat > {bin}.uc-new; chmod 755 {bin}.uc-new; mv -f {bin}.uc-new {bin}",
                bin = install::BIN
            ),
            Some(&data),
        )
        .await?;
        host.undo.binary = Some(if host.facts.ucd_sha.is_some() {
            BinaryUndo::Restore(prev)
        } else {
            BinaryUndo::Remove
        });
        steps.ok(&format!("{:.1} MB", data.len() as f64 / 1e6));
    }

    steps.start("installing and starting the agent");
    let mut script = String::from("set -e\n");
    if host.facts.state && args.force {
        // Stop whatever runs from the old state and set that state aside (kept, not deleted).
        let aside = format!("{}/.replaced-{}", install::DATA, crate::unix_secs());
        script.push_str(&format!(
            "systemctl stop ucd 2>/dev/null || true\n\
             if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null || true; sleep 1; fi\n\
             mkdir -p {aside}\n\
             for f in {data}/* ; do [ \"$f\" = {aside} ] || mv \"$f\" {aside}/; done\n",
            pid = install::SUPERVISOR_PID,
            data = install::DATA,
        ));
        host.undo.replaced_state = Some(aside);
    }
    // What this install overwrites is kept, to put back if it fails.
    for f in &host.undo.existed {
        script.push_str(&format!("cp -p {f} {f}.uc-prev\n"));
    }
    let endpoints = args.endpoints.clone();
    script.push_str(&format!(
        "mkdir -p {etc} {data} {lib} /run/uc\n\
         getent group uc >/dev/null 2>&1 || groupadd --system uc 2>/dev/null || addgroup --system uc >/dev/null 2>&1 || true\n",
        etc = install::ETC,
        data = install::DATA,
        lib = install::LIBDIR,
    ));
    if !host.facts.root() {
        // The SSH user reaches the API socket through the uc group, without sudo.
        script.push_str(&format!(
            "usermod -aG uc {} || true\n",
            quote(&host.facts.user)
        ));
    }
    script.push_str(&write_file(
        install::CONFIG,
        &install::config_toml(name, &endpoints, &args.tags, args.wg_port),
        "644",
    ));
    script.push_str(&write_file(
        install::BOOTSTRAP,
        &install::bootstrap_env(boot),
        "600",
    ));
    // Where this install's log lines begin.
    script.push_str(&if host.facts.systemd {
        "echo \"log_from=$(date +%s)\"\n".to_string()
    } else {
        format!(
            "echo \"log_from=$(stat -c %s {log} 2>/dev/null || echo 0)\"\n",
            log = install::LOG
        )
    });
    if host.facts.systemd {
        script.push_str(&write_file(install::UNIT, &install::systemd_unit(), "644"));
        script.push_str("systemctl daemon-reload\nsystemctl enable --now ucd\n");
    } else {
        script.push_str(&write_file(
            install::SUPERVISOR,
            &install::supervisor_script(),
            "755",
        ));
        script.push_str(&format!(
            "setsid {} </dev/null >/dev/null 2>&1 &\n",
            install::SUPERVISOR
        ));
    }
    let out = host.sh("installing the agent", &script, None).await?;
    host.log_from = out
        .lines()
        .find_map(|l| l.strip_prefix("log_from="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    steps.ok(if host.facts.systemd {
        "systemd unit ucd.service"
    } else {
        "no systemd here: started under a restart loop, which does not survive a reboot"
    });
    Ok(())
}

/// `cat > PATH` of `content` in a script, with a mode.
fn write_file(path: &str, content: &str, mode: &str) -> String {
    let mut delim = "UC_EOF".to_string();
    while content.contains(&delim) {
        delim.push('_');
    }
    format!("umask 077\ncat > {path} <<'{delim}'\n{content}{delim}\nchmod {mode} {path}\n")
}

/// Shows why `e` happened (with the agent's log), undoes the install and, when the machine
/// joined a cluster, removes it from there.
async fn fail_and_undo(
    host: &Host,
    e: anyhow::Error,
    steps: &mut Steps,
    cluster: Option<&mut Api>,
) -> anyhow::Error {
    steps.fail();
    let log = host.log_tail().await;
    let id = host.machine_id().await;
    let mut notes = Vec::new();
    if let (Some(api), Some(id)) = (cluster, id) {
        match api
            .remove_machine(uc_proto::v1::RemoveMachineRequest {
                machine: id.clone(),
            })
            .await
        {
            Ok(_) => notes.push(format!("removed machine {id} from the cluster again")),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => notes.push(format!(
                "could not remove machine {id} from the cluster ({}); run `uc machine rm {id}`",
                s.message()
            )),
        }
    }
    match host.rollback().await {
        Ok(()) => notes.push(format!("{} is as it was before", host.ssh.target)),
        Err(u) => notes.push(format!("cleaning up failed too: {u:#}")),
    }
    host.ssh.close().await;
    let mut msg = format!("{e:#}");
    if !log.is_empty() && !msg.contains("failed to start") {
        msg.push_str(&format!("\nthe agent's last log lines:\n{log}"));
    }
    for n in notes {
        msg.push_str(&format!("\n{n}"));
    }
    anyhow::anyhow!(msg)
}

/// Waits until the agent behind `conn_api` is ready; returns its status.
async fn wait_ready(host: &Host) -> anyhow::Result<(Api, uc_proto::v1::StatusResponse)> {
    let t0 = Instant::now();
    loop {
        let last;
        let attempt = tokio::time::timeout(Duration::from_secs(5), client::connect_ssh(&host.ssh));
        match attempt
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer yet")))
        {
            Ok(mut api) => match api.status(uc_proto::v1::StatusRequest {}).await {
                Ok(s) if s.get_ref().ready => return Ok((api, s.into_inner())),
                Ok(_) => last = "it has not caught up with the cluster yet".into(),
                Err(e) => last = e.message().to_string(),
            },
            Err(e) => last = format!("{e:#}"),
        }
        // An agent that fails to start says why and exits (to be restarted): no use waiting.
        if let Some(err) = host.agent_error().await {
            bail!("the agent on {} failed to start: {err}", host.ssh.target);
        }
        if t0.elapsed() > WAIT_TIMEOUT {
            bail!(
                "the agent on {} did not become ready within {WAIT_TIMEOUT:?}: {last}",
                host.ssh.target
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Removes the bootstrap file (it holds the join token) once the agent has its state.
async fn finish_bootstrap(host: &Host) -> anyhow::Result<()> {
    host.sh(
        "removing the bootstrap file",
        &format!(
            "rm -f {} {}.uc-prev {}",
            install::BOOTSTRAP,
            install::BIN,
            install::OVERWRITTEN
                .map(|f| format!("{f}.uc-prev"))
                .join(" ")
        ),
        None,
    )
    .await
    .map(|_| ())
}

fn print_result(json: bool, what: serde_json::Value, steps: &Steps, line: &str) {
    if json {
        let mut v = what;
        v["steps"] = json!(steps.done);
        v["seconds"] = json!(steps.total());
        println!("{v}");
    } else {
        println!("{line}");
    }
}

/// `uc machine init`.
pub async fn init(
    args: HostArgs,
    network: String,
    context_name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    network
        .parse::<uc_proto::Subnet>()
        .map_err(|e| anyhow::anyhow!("--network {network}: {e}"))?;
    let ctx_name = context_name.unwrap_or_else(|| "default".to_string());
    let config = context::load()?;
    if config
        .contexts
        .get(&ctx_name)
        .is_some_and(|c| !c.connections.is_empty())
    {
        bail!(
            "context {ctx_name:?} exists already in {}: name the new cluster's context with --context",
            context::path().display()
        );
    }
    confirm(
        &args,
        &format!(
            "Install uc on {} and start a new cluster there?",
            args.target
        ),
    )?;
    let mut steps = Steps::new();
    let (host, name) = install_agent(&args, &Bootstrap::Init { network }, &mut steps).await?;
    steps.start("waiting for the agent");
    let status = match wait_ready(&host).await {
        Ok((_, s)) => s,
        Err(e) => return Err(fail_and_undo(&host, e, &mut steps, None).await),
    };
    if let Err(e) = finish_bootstrap(&host).await {
        return Err(fail_and_undo(&host, e, &mut steps, None).await);
    }
    steps.ok(&format!("cluster {}", status.cluster_id));
    host.ssh.close().await;
    context::add_connection(
        &ctx_name,
        Connection::ssh(&args.target, args.ssh_key.clone()),
        true,
    )?;
    print_result(
        json,
        json!({"machine": name, "cluster_id": status.cluster_id, "context": ctx_name}),
        &steps,
        &format!(
            "cluster {} started on {name} ({}); context {ctx_name:?} selected. Add machines with `uc machine add USER@HOST`.",
            status.cluster_id, args.target
        ),
    );
    Ok(())
}

/// `uc machine add`.
pub async fn add(
    args: HostArgs,
    socket: Option<&Path>,
    via: Option<&SshTarget>,
    token: Option<String>,
    join: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let mut steps = Steps::new();
    steps.start("reaching the cluster");
    let reached = async {
        let (mut api, conn) = client::connect_any(socket, via).await?;
        let status = rpc(
            api.status(uc_proto::v1::StatusRequest {}).await,
            "asking the cluster's status",
        )?;
        let (token, join) = match (token, join) {
            (Some(t), Some(j)) => (t, j),
            (Some(_), None) | (None, Some(_)) => bail!("--token and --join go together"),
            (None, None) => {
                let r = rpc(
                    api.create_join_token(uc_proto::v1::CreateJoinTokenRequest {
                        ttl_seconds: TOKEN_TTL_SECS,
                    })
                    .await,
                    "making a join token",
                )?;
                let addr = r
                    .peer_addresses
                    .first()
                    .cloned()
                    .context("the cluster gave no join address")?;
                (r.token, addr)
            }
        };
        Ok((api, conn, status, token, join))
    }
    .await;
    let (mut cluster, conn, status, token, join) = match reached {
        Ok(r) => r,
        Err(e) => {
            steps.fail();
            return Err(e);
        }
    };
    steps.ok(&format!(
        "cluster {} through {}",
        status.cluster_id, status.machine_name
    ));
    confirm(
        &args,
        &format!("Install uc on {} and join it to this cluster?", args.target),
    )?;
    let boot = Bootstrap::Join { addr: join, token };
    let (host, name) = install_agent(&args, &boot, &mut steps).await?;

    steps.start("waiting until it has caught up");
    let new_api = match wait_ready(&host).await {
        Ok((api, s)) if s.cluster_id == status.cluster_id => api,
        Ok((_, s)) => {
            let e = anyhow::anyhow!(
                "the new agent is in cluster {}, not {}",
                s.cluster_id,
                status.cluster_id
            );
            return Err(fail_and_undo(&host, e, &mut steps, Some(&mut cluster)).await);
        }
        Err(e) => return Err(fail_and_undo(&host, e, &mut steps, Some(&mut cluster)).await),
    };
    if let Err(e) = finish_bootstrap(&host).await {
        return Err(fail_and_undo(&host, e, &mut steps, Some(&mut cluster)).await);
    }
    steps.ok("");

    steps.start("waiting until every machine reaches it over the mesh");
    let live = wait_mesh(new_api, &mut cluster, &name).await;
    let count = match live {
        Ok(n) => n,
        Err(e) => return Err(fail_and_undo(&host, e, &mut steps, Some(&mut cluster)).await),
    };
    steps.ok(&format!("{count} machines live"));
    host.ssh.close().await;
    // The context that reached the cluster learns the new connection.
    if let (Conn::Ssh { .. }, Some((ctx, _))) = (&conn, context::current()?) {
        context::add_connection(
            &ctx,
            Connection::ssh(&args.target, args.ssh_key.clone()),
            false,
        )?;
    }
    print_result(
        json,
        json!({"machine": name, "cluster_id": status.cluster_id}),
        &steps,
        &format!("{name} ({}) joined the cluster", args.target),
    );
    Ok(())
}

/// Waits until the new machine sees every active machine live, the cluster side sees it live
/// (gossip runs on the mesh), and it has a WireGuard handshake with every other machine.
async fn wait_mesh(mut new_api: Api, cluster: &mut Api, name: &str) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    loop {
        let mine = rpc(
            new_api
                .list_machines(uc_proto::v1::ListMachinesRequest {})
                .await,
            "listing machines",
        )?;
        let theirs = rpc(
            cluster
                .list_machines(uc_proto::v1::ListMachinesRequest {})
                .await,
            "listing machines",
        )?;
        let active: Vec<_> = mine
            .machines
            .iter()
            .filter(|m| m.state != "removed")
            .collect();
        let not_live: Vec<String> = active
            .iter()
            .filter(|m| !m.is_self && m.liveness != "live")
            .map(|m| format!("{} ({})", m.name, m.liveness))
            .collect();
        let seen = theirs
            .machines
            .iter()
            .any(|m| m.name == name && (m.liveness == "live" || m.is_self));
        // Liveness can travel through third machines in gossip: a WireGuard handshake with
        // every other machine is the proof that each tunnel works.
        let wg = rpc(
            new_api
                .wg_show(uc_proto::v1::WgShowRequest {
                    machine: String::new(),
                })
                .await,
            "asking its WireGuard interface",
        )?;
        let no_handshake: Vec<String> = active
            .iter()
            .filter(|m| !m.is_self)
            .filter(|m| {
                !wg.peers
                    .iter()
                    .any(|p| p.machine_id == m.id && p.last_handshake_age_secs >= 0)
            })
            .map(|m| m.name.clone())
            .collect();
        if not_live.is_empty() && seen && no_handshake.is_empty() {
            return Ok(active.len());
        }
        if t0.elapsed() > WAIT_TIMEOUT {
            bail!(
                "{name} is not reachable over the mesh after {WAIT_TIMEOUT:?}: {}{}{}",
                if not_live.is_empty() {
                    String::new()
                } else {
                    format!("it sees {} not live", not_live.join(", "))
                },
                if seen {
                    String::new()
                } else {
                    "; the cluster does not see it live".into()
                },
                if no_handshake.is_empty() {
                    String::new()
                } else {
                    format!("; no WireGuard handshake with {}", no_handshake.join(", "))
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_last_error_is_found_with_its_details() {
        let log = "INFO started\nerror: old\nuc supervisor: restarting\nerror: invalid configuration:\n  - no address\n  - bad tag\nuc supervisor: ucd exited with status 1\n";
        assert_eq!(
            last_error(log).as_deref(),
            Some("invalid configuration:\n  - no address\n  - bad tag")
        );
        assert_eq!(last_error("INFO all good\n"), None);
    }
}
