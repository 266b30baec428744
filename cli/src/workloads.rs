//! `uc run`, `uc ls`, `uc ps`, `uc rm`, `uc logs`, `uc image import|ls`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use uc_proto::spec::{Mode, PortSpec, RuntimeKind, ServiceSpec, check_ssh_key, parse_memory};
use uc_proto::v1::*;

use crate::client::{Api, status_error};
use crate::output::table;

/// What `uc run` was given.
pub struct RunArgs {
    pub name: Option<String>,
    pub machines: Vec<String>,
    pub runtime: RuntimeKind,
    pub ports: Vec<String>,
    pub env: Vec<String>,
    pub replicas: Option<u32>,
    pub global: bool,
    pub cpu: Option<f64>,
    pub memory: Option<String>,
    /// OpenSSH public key lines.
    pub ssh_keys: Vec<String>,
    pub image: String,
    pub command: Vec<String>,
    pub detach: bool,
    pub timeout: Duration,
}

/// The SSH public keys `uc run` writes into nspawn containers: the lines of each `--ssh-key`
/// file (each must be a key), or by default the user's own first key of `~/.ssh`, if any.
pub fn ssh_keys(
    files: &[std::path::PathBuf],
    none: bool,
    runtime: RuntimeKind,
) -> anyhow::Result<Vec<String>> {
    if none {
        return Ok(Vec::new());
    }
    if !files.is_empty() {
        if runtime != RuntimeKind::Nspawn {
            anyhow::bail!(
                "--ssh-key: only nspawn containers get SSH keys written in, not {runtime} ones"
            );
        }
        let mut keys = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("--ssh-key: reading {}", f.display()))?;
            let before = keys.len();
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                check_ssh_key(line)
                    .map_err(|e| anyhow::anyhow!("--ssh-key {}: {e}", f.display()))?;
                keys.push(line.to_string());
            }
            if keys.len() == before {
                anyhow::bail!("--ssh-key {}: no key in it", f.display());
            }
        }
        return Ok(keys);
    }
    if runtime != RuntimeKind::Nspawn {
        return Ok(Vec::new());
    }
    let Some(home) = std::env::var_os("HOME") else {
        return Ok(Vec::new());
    };
    let dir = Path::new(&home).join(".ssh");
    for name in ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
            let key = text.trim();
            if check_ssh_key(key).is_ok() {
                return Ok(vec![key.to_string()]);
            }
        }
    }
    Ok(Vec::new())
}

/// The spec a `uc run` asks for; every bad flag is an error that names it.
pub fn spec_of(a: &RunArgs) -> anyhow::Result<ServiceSpec> {
    let mut ports = Vec::new();
    for p in &a.ports {
        let spec: PortSpec = p.parse()?;
        ports.push(spec.to_string());
    }
    let mut env = BTreeMap::new();
    for e in &a.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("environment {e:?} is not KEY=VALUE"))?;
        if k.is_empty() {
            anyhow::bail!("environment {e:?} has an empty name");
        }
        env.insert(k.to_string(), v.to_string());
    }
    let memory = a
        .memory
        .as_deref()
        .map(parse_memory)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let Some(c) = a.cpu
        && (c.is_nan() || c <= 0.0)
    {
        anyhow::bail!("--cpu {c} must be more than 0");
    }
    let mode = if a.global {
        Mode::Global
    } else {
        let replicas = a.replicas.unwrap_or(a.machines.len().max(1) as u32);
        if replicas == 0 {
            anyhow::bail!("--replicas 0: a service runs at least one container");
        }
        Mode::Replicated { replicas }
    };
    Ok(ServiceSpec {
        image: a.image.clone(),
        runtime: a.runtime,
        command: a.command.clone(),
        env,
        ports,
        mode,
        machines: a.machines.clone(),
        cpu: a.cpu,
        memory,
        ssh_keys: a.ssh_keys.clone(),
    })
}

/// A default service name from the image: `demo:1.0` -> `demo`, plus 4 random hex digits.
fn default_name(image: &str) -> String {
    let base = image.split(':').next().unwrap_or(image);
    let base: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let r = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{:04x}", base.trim_matches('-'), r & 0xffff)
}

pub async fn run(api: &mut Api, a: RunArgs, json: bool) -> anyhow::Result<()> {
    let spec = spec_of(&a)?;
    let name = a.name.clone().unwrap_or_else(|| default_name(&a.image));
    let t0 = std::time::Instant::now();
    let r = api
        .run_service(RunServiceRequest {
            name: name.clone(),
            spec_json: spec.to_json().to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if a.detach {
        return print_run(&r, None, json);
    }
    let ps = wait_for(api, &r.name, "running", a.timeout).await?;
    print_run(&r, Some((t0.elapsed(), &ps)), json)
}

/// Waits until every container of the service is in state `want` ("running" or "exited"), or
/// one failed (then the error says why).
async fn wait_for(
    api: &mut Api,
    name: &str,
    want: &str,
    timeout: Duration,
) -> anyhow::Result<ListContainersResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ps = containers(api, name).await?;
        let states: Vec<&str> = ps
            .containers
            .iter()
            .map(|c| c.status.as_ref().map_or("unknown", |s| s.state.as_str()))
            .collect();
        if want == "running"
            && let Some(c) = ps.containers.iter().find(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.state == "failed" || (s.state == "exited" && !s.error.is_empty())
                })
            })
        {
            let s = c.status.as_ref().expect("found with a status");
            anyhow::bail!(
                "container {} of {name} on {} failed: {}\n(the service stays; see uc ps, uc logs {name}, or uc rm {name})",
                &c.id[..12],
                c.machine,
                if s.error.is_empty() {
                    "it exited"
                } else {
                    &s.error
                },
            );
        }
        if states.iter().all(|s| *s == want) {
            return Ok(ps);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "service {name} is not {want} after {timeout:?} (states: {}); see uc ps",
                states.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The services of the state (the dump holds a map by id; a list is read too).
async fn services(api: &mut Api) -> anyhow::Result<Vec<serde_json::Value>> {
    let state: serde_json::Value = serde_json::from_str(
        &api.dump_state(DumpStateRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .json,
    )?;
    Ok(match &state["services"] {
        serde_json::Value::Object(m) => m.values().cloned().collect(),
        serde_json::Value::Array(a) => a.clone(),
        _ => Vec::new(),
    })
}

/// The containers of a service (all, for ""), as the state and their machines say; an unknown
/// service is the agent's error, which lists the services.
async fn containers(api: &mut Api, service: &str) -> anyhow::Result<ListContainersResponse> {
    Ok(api
        .list_containers(ListContainersRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// `uc scale SVC N`.
pub async fn scale(
    api: &mut Api,
    name: String,
    replicas: u32,
    detach: bool,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let r = api
        .scale_service(ScaleServiceRequest {
            name: name.clone(),
            replicas,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !detach && !r.added.is_empty() {
        wait_for(api, &name, "running", timeout).await?;
    }
    let brief = |c: &ContainerInfo| serde_json::json!({"id": c.id, "machine": c.machine, "address": c.address});
    if json {
        let v = serde_json::json!({
            "name": name, "replicas": replicas,
            "added": r.added.iter().map(brief).collect::<Vec<_>>(),
            "removed": r.removed.iter().map(brief).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for c in &r.added {
        println!("added {} on {} ({})", &c.id[..12], c.machine, c.address);
    }
    for c in &r.removed {
        println!("removed {} on {} ({})", &c.id[..12], c.machine, c.address);
    }
    if r.added.is_empty() && r.removed.is_empty() {
        println!("{name} already has {replicas} containers");
    }
    Ok(())
}

/// `uc stop|start SVC...`.
pub async fn set_running(
    api: &mut Api,
    names: Vec<String>,
    running: bool,
    detach: bool,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for name in names {
        let r = api
            .set_service_running(SetServiceRunningRequest {
                name: name.clone(),
                running,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if !detach {
            wait_for(
                api,
                &name,
                if running { "running" } else { "exited" },
                timeout,
            )
            .await?;
        }
        if !json {
            println!(
                "{} {name} ({} containers)",
                if running { "started" } else { "stopped" },
                r.containers
            );
        }
        out.push(
            serde_json::json!({"name": name, "containers": r.containers, "changed": r.changed}),
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

/// `uc inspect SVC`: the service's spec and its containers, as the state and their machines say.
pub async fn inspect(api: &mut Api, name: String, json: bool) -> anyhow::Result<()> {
    let ps = containers(api, &name).await?;
    let Some(s) = services(api)
        .await?
        .into_iter()
        .find(|s| s["name"] == name.as_str())
    else {
        anyhow::bail!("service {name:?} was removed just now");
    };
    let container_values: Vec<serde_json::Value> = ps.containers.iter().map(status_json).collect();
    let spec = s["spec"].clone();
    let v = serde_json::json!({
        "id": s["id"], "name": name, "created_at_ms": s["created_at_ms"],
        "spec": spec, "containers": container_values,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("service  {name} ({})", s["id"].as_str().unwrap_or(""));
    if let Ok(spec) = ServiceSpec::from_json(&spec) {
        println!("image    {}", spec.image);
        println!("runtime  {}", spec.runtime);
        println!(
            "mode     {}",
            match spec.mode {
                Mode::Global => "global".to_string(),
                Mode::Replicated { replicas } => format!("replicated, {replicas} replicas"),
            }
        );
        if !spec.command.is_empty() {
            println!("command  {}", spec.command.join(" "));
        }
        for (k, val) in &spec.env {
            println!("env      {k}={val}");
        }
        for p in &spec.ports {
            println!("port     {p}");
        }
        if let Some(c) = spec.cpu {
            println!("cpu      {c}");
        }
        if let Some(m) = spec.memory {
            println!("memory   {m} bytes");
        }
    }
    println!();
    let rows: Vec<Vec<String>> = ps
        .containers
        .iter()
        .map(|c| {
            let st = c.status.clone().unwrap_or_default();
            vec![
                c.id[..12].to_string(),
                c.machine.clone(),
                c.address.clone(),
                c.desired.clone(),
                st.state,
                st.restarts.to_string(),
                st.error,
            ]
        })
        .collect();
    table(
        &[
            "CONTAINER",
            "MACHINE",
            "ADDRESS",
            "DESIRED",
            "STATE",
            "RESTARTS",
            "ERROR",
        ],
        rows,
    );
    Ok(())
}

fn print_run(
    r: &RunServiceResponse,
    ran: Option<(Duration, &ListContainersResponse)>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({
            "id": r.id, "name": r.name,
            "seconds": ran.map(|(d, _)| d.as_secs_f64()),
            "containers": r.containers.iter().map(|c| serde_json::json!({
                "id": c.id, "machine": c.machine, "address": c.address,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match ran {
        Some((d, _)) => println!(
            "service {} running: {} container(s) in {:.2}s",
            r.name,
            r.containers.len(),
            d.as_secs_f64()
        ),
        None => println!(
            "service {} placed: {} container(s)",
            r.name,
            r.containers.len()
        ),
    }
    for c in &r.containers {
        println!("  {}  {}  {}", &c.id[..12], c.machine, c.address);
    }
    Ok(())
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = crate::unix_secs() * 1000;
    let s = now.saturating_sub(ms) / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn status_json(c: &ContainerInfo) -> serde_json::Value {
    let s = c.status.clone().unwrap_or_default();
    serde_json::json!({
        "id": c.id, "service": c.service, "machine": c.machine, "machine_id": c.machine_id,
        "address": c.address, "desired": c.desired, "state": s.state,
        "since_unix_ms": s.since_unix_ms, "exit_code": s.exit_code, "restarts": s.restarts,
        "error": s.error, "pid": s.pid, "runtime": s.runtime, "image": s.image,
    })
}

pub async fn ps(api: &mut Api, service: Option<String>, json: bool) -> anyhow::Result<()> {
    let r = containers(api, &service.unwrap_or_default()).await?;
    if json {
        let v: Vec<_> = r.containers.iter().map(status_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = r
        .containers
        .iter()
        .map(|c| {
            let s = c.status.clone().unwrap_or_default();
            let state = match s.state.as_str() {
                "exited" => format!("exited ({})", s.exit_code),
                "" => "unknown".into(),
                other => other.to_string(),
            };
            vec![
                c.id[..12].to_string(),
                c.service.clone(),
                c.machine.clone(),
                c.address.clone(),
                state,
                if s.state == "running" {
                    ago(s.since_unix_ms)
                } else {
                    "-".into()
                },
                s.restarts.to_string(),
                s.error,
            ]
        })
        .collect();
    table(
        &[
            "CONTAINER",
            "SERVICE",
            "MACHINE",
            "ADDRESS",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "ERROR",
        ],
        rows,
    );
    Ok(())
}

pub async fn ls(api: &mut Api, json: bool) -> anyhow::Result<()> {
    let services = services(api).await?;
    let ps = containers(api, "").await?;
    let mut rows = Vec::new();
    let mut out = Vec::new();
    for s in services {
        let name = s["name"].as_str().unwrap_or("").to_string();
        let spec = ServiceSpec::from_json(&s["spec"]).ok();
        let of: Vec<&ContainerInfo> = ps.containers.iter().filter(|c| c.service == name).collect();
        let running = of
            .iter()
            .filter(|c| c.status.as_ref().is_some_and(|s| s.state == "running"))
            .count();
        let mode = match spec.as_ref().map(|s| s.mode) {
            Some(Mode::Global) => "global".to_string(),
            Some(Mode::Replicated { replicas }) => format!("replicated {replicas}"),
            None => "-".into(),
        };
        out.push(serde_json::json!({
            "id": s["id"], "name": name, "spec": s["spec"], "containers": of.len(), "running": running,
        }));
        rows.push(vec![
            name,
            spec.as_ref().map(|s| s.image.clone()).unwrap_or_default(),
            spec.as_ref()
                .map(|s| s.runtime.to_string())
                .unwrap_or_default(),
            mode,
            format!("{running}/{}", of.len()),
            spec.map(|s| s.ports.join(",")).unwrap_or_default(),
        ]);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    table(
        &["NAME", "IMAGE", "RUNTIME", "MODE", "RUNNING", "PORTS"],
        rows,
    );
    Ok(())
}

pub async fn logs(
    api: &mut Api,
    service: String,
    tail: u32,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut s = api
        .logs(LogsRequest {
            service,
            container_ids: Vec::new(),
            tail,
            follow,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(l) = s.message().await.map_err(status_error)? {
        if json {
            println!(
                "{}",
                serde_json::json!({"unix_ms": l.unix_ms, "container": l.container_id,
                    "machine": l.machine, "stream": l.stream, "text": l.text})
            );
        } else {
            let short = l.container_id.get(..8).unwrap_or(&l.container_id);
            println!("{}/{short}  {}", l.machine, l.text);
        }
    }
    Ok(())
}

pub async fn image_import(
    api: &mut Api,
    file: &Path,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ImportImageChunk>(4);
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            let n = f.read(&mut buf)?;
            if n == 0 && !first {
                return Ok(());
            }
            buf.truncate(n);
            let chunk = ImportImageChunk {
                name: if first {
                    name.clone().unwrap_or_default()
                } else {
                    String::new()
                },
                file_name: if first {
                    file_name.clone()
                } else {
                    String::new()
                },
                data: buf,
            };
            first = false;
            if tx.blocking_send(chunk).is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let r = api
        .import_image(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error);
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reading thread panicked"))?
        .with_context(|| format!("reading {}", file.display()))?;
    let i = r?.into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"name": i.name, "digest": i.digest, "size_bytes": i.size_bytes})
        );
    } else {
        println!(
            "imported {} ({}, {:.1} MB)",
            i.name,
            &i.digest[..i.digest.len().min(19)],
            i.size_bytes as f64 / 1e6
        );
    }
    Ok(())
}

pub async fn image_ls(api: &mut Api, json: bool) -> anyhow::Result<()> {
    let r = api
        .list_images(ListImagesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let v: Vec<_> = r
            .images
            .iter()
            .map(|i| {
                serde_json::json!({"name": i.name, "digest": i.digest, "size_bytes": i.size_bytes,
                "machines": i.machines, "cmd": i.cmd})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = r
        .images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                if i.size_bytes > 0 {
                    format!("{:.1} MB", i.size_bytes as f64 / 1e6)
                } else {
                    "-".into()
                },
                i.cmd.clone(),
                i.machines.join(","),
            ]
        })
        .collect();
    table(&["NAME", "SIZE", "COMMAND", "MACHINES"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            name: None,
            machines: vec![],
            runtime: RuntimeKind::Nspawn,
            ports: vec![],
            env: vec![],
            replicas: None,
            global: false,
            cpu: None,
            memory: None,
            ssh_keys: vec![],
            image: "demo".into(),
            command: vec![],
            detach: false,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn flags_become_a_spec() {
        let mut a = args();
        a.ports = vec!["8080/http".into(), "127.0.0.1:53:53/udp@host".into()];
        a.env = vec!["A=1=2".into()];
        a.memory = Some("256m".into());
        a.machines = vec!["a".into(), "b".into()];
        let s = spec_of(&a).unwrap();
        assert_eq!(s.mode, Mode::Replicated { replicas: 2 });
        assert_eq!(s.env["A"], "1=2");
        assert_eq!(s.memory, Some(256 << 20));
        assert_eq!(s.ports[1], "127.0.0.1:53:53/udp@host");
    }

    #[test]
    fn bad_flags_say_which() {
        let mut a = args();
        a.ports = vec!["80:http".into()];
        assert!(
            spec_of(&a)
                .unwrap_err()
                .to_string()
                .contains("bad port spec \"80:http\"")
        );
        let mut a = args();
        a.env = vec!["NOEQUALS".into()];
        assert!(spec_of(&a).unwrap_err().to_string().contains("KEY=VALUE"));
        let mut a = args();
        a.memory = Some("lots".into());
        assert!(spec_of(&a).unwrap_err().to_string().contains("memory"));
        let mut a = args();
        a.replicas = Some(0);
        assert!(spec_of(&a).is_err());
        assert!(default_name("demo:1.0").starts_with("demo-"));
    }

    #[test]
    fn ssh_key_files_are_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("uc-sshkeys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvbh6GzPSbS1k2bJqTjXl5xWdXbPiSd2S4hVYp2Kv7X a@b";
        let good = dir.join("good.pub");
        std::fs::write(&good, format!("# mine\n{key}\n\n")).unwrap();
        let bad = dir.join("bad.pub");
        std::fs::write(&bad, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        let empty = dir.join("empty.pub");
        std::fs::write(&empty, "\n").unwrap();
        let nspawn = RuntimeKind::Nspawn;
        assert_eq!(
            ssh_keys(std::slice::from_ref(&good), false, nspawn).unwrap(),
            vec![key]
        );
        let e = ssh_keys(std::slice::from_ref(&bad), false, nspawn)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.pub") && e.contains("a private key"), "{e}");
        let e = ssh_keys(&[empty], false, nspawn).unwrap_err().to_string();
        assert!(e.contains("no key in it"), "{e}");
        let e = ssh_keys(std::slice::from_ref(&good), false, RuntimeKind::Docker)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only nspawn"), "{e}");
        let e = ssh_keys(&[dir.join("missing.pub")], false, nspawn).unwrap_err();
        assert!(format!("{e:#}").contains("missing.pub"), "{e:#}");
        assert!(ssh_keys(&[], true, nspawn).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
