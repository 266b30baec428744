//! `uc local up|down`: a cluster of network namespaces on this host, each
//! running the real agent, made with the same library the e2e tests use.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::context;

const CONTEXT: &str = "local";

fn base_dir() -> PathBuf {
    std::env::var_os("UC_LOCAL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/uc/local"))
}

fn state_file() -> PathBuf {
    base_dir().join("cluster.json")
}

pub fn up(machines: usize, json: bool) -> anyhow::Result<()> {
    if !(1..=50).contains(&machines) {
        bail!("--machines must be between 1 and 50, got {machines}");
    }
    if state_file().exists() {
        bail!(
            "a local cluster is already running (state in {}); run `uc local down` first",
            state_file().display()
        );
    }
    if !nix_is_root() {
        bail!("uc local up needs root: it creates network namespaces (try sudo)");
    }
    eprintln!("starting {machines} machines in network namespaces ...");
    let started = std::time::Instant::now();
    let cluster = uc_e2e::Cluster::start(
        uc_e2e::ClusterBuilder::new(machines)
            .tag("local")
            .base_dir(base_dir()),
    )
    .context("starting the local cluster")?;
    // The demo image, so that a first `uc run demo` works; other machines fetch it over the mesh.
    let demo = std::env::var_os("UC_DEMO_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/uc/demo-image.tar"));
    let mut imported = false;
    if demo.exists() {
        let out = cluster
            .uc(0, &["image", "import", &demo.display().to_string()])
            .context("importing the demo image")?;
        if !out.status.success() {
            bail!(
                "importing the demo image {}: {}",
                demo.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        imported = true;
    } else {
        eprintln!(
            "no demo image at {} (scripts/demo-image.sh makes it): the cluster has no images yet",
            demo.display()
        );
    }
    let sockets: Vec<PathBuf> = (0..cluster.len())
        .map(|i| cluster.machine(i).socket.clone())
        .collect();
    let names: Vec<String> = (0..cluster.len())
        .map(|i| cluster.machine(i).name.clone())
        .collect();
    let state = cluster.detach()?;
    let mut cfg = context::load()?;
    cfg.contexts.insert(
        CONTEXT.into(),
        context::ContextEntry {
            connections: sockets
                .iter()
                .map(|s| context::Connection {
                    unix: Some(s.clone()),
                    ..Default::default()
                })
                .collect(),
        },
    );
    cfg.current_context = Some(CONTEXT.into());
    context::save(&cfg)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"machines": names, "sockets": sockets, "state": state})
        );
    } else {
        println!(
            "local cluster up: {} machines ({}) in {:.1} s",
            names.len(),
            names.join(", "),
            started.elapsed().as_secs_f64()
        );
        println!(
            "context \"local\" selected in {}",
            context::path().display()
        );
        if imported {
            println!("image \"demo\" imported: try uc run -n web --replicas 2 demo");
        }
        println!("try: uc machine ls");
    }
    Ok(())
}

pub fn down() -> anyhow::Result<()> {
    let file = state_file();
    if !file.exists() {
        eprintln!("no local cluster is running");
    } else {
        uc_e2e::Cluster::teardown_detached(&file).context("stopping the local cluster")?;
        println!("local cluster removed");
    }
    let mut cfg = context::load()?;
    if cfg.contexts.remove(CONTEXT).is_some() {
        if cfg.current_context.as_deref() == Some(CONTEXT) {
            cfg.current_context = None;
        }
        context::save(&cfg)?;
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
