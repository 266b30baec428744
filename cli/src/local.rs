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

fn ingress_dir() -> PathBuf {
    base_dir().join("ingress")
}

/// The host ports the ingress is reached on (its 80 and 443, forwarded from 127.0.0.1).
struct IngressPorts {
    http: u16,
    https: u16,
    root: PathBuf,
}

/// Makes m0 the ingress machine: opens 80 and 443 on its underlay, starts the ACME CA pointing
/// every name at it, tags it, and forwards 127.0.0.1's 80 and 443 (or 8080 and 8443 when those
/// are taken) into it, through a `uc local forward` process that lives as long as the cluster.
fn start_ingress(
    cluster: &mut uc_e2e::Cluster,
    acme: &uc_e2e::acme::Pebble,
) -> anyhow::Result<IngressPorts> {
    cluster.open_tcp_ports(0, &[80, 443])?;
    cluster.hub_ip()?;
    let hub = cluster.hub().to_owned();
    let m0 = cluster.machine(0).ip;
    acme.start(cluster, &hub, m0)?;
    let root = acme.fetch_root(&hub)?;
    let out = cluster.uc(0, &["machine", "tag", "m0", "ingress"])?;
    if !out.status.success() {
        bail!(
            "tagging m0 ingress: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let (http, https) = if free(80) && free(443) {
        (80, 443)
    } else if free(8080) && free(8443) {
        (8080, 8443)
    } else {
        bail!("neither 127.0.0.1:80/443 nor 127.0.0.1:8080/8443 are free for the local ingress");
    };
    let me = std::env::current_exe().context("finding uc")?;
    let me = me.to_str().context("uc's path")?;
    let ns = cluster.machine(0).netns.clone();
    let (a, b) = (format!("{http}:80"), format!("{https}:443"));
    let log = ingress_dir().join("forward.log");
    cluster.spawn_helper(
        None,
        &[me, "local", "forward", "--netns", &ns, &a, &b],
        &[],
        &log,
    )?;
    // Ready when the forwarder listens.
    uc_e2e::eventually(
        std::time::Duration::from_secs(10),
        "the forwarder to listen",
        || Ok(std::net::TcpStream::connect(("127.0.0.1", https))?),
    )
    .with_context(|| {
        format!(
            "the forwarder's log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;
    Ok(IngressPorts { http, https, root })
}

/// `uc local forward`: forwards each `HOST_PORT:PORT` from 127.0.0.1 here to 127.0.0.1 in
/// network namespace `netns` (the local ingress machine), until killed.
pub fn forward(netns: &str, pairs: &[String]) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for pair in pairs {
        let (outer, inner) = pair
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
            .with_context(|| format!("{pair:?} is not HOST_PORT:PORT"))?;
        let listener = std::net::TcpListener::bind(("127.0.0.1", outer))
            .with_context(|| format!("listening on 127.0.0.1:{outer}"))?;
        let netns = netns.to_owned();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let netns = netns.clone();
                std::thread::spawn(move || {
                    if let Err(e) = splice(conn, &netns, inner) {
                        eprintln!("forwarding to {netns} port {inner}: {e:#}");
                    }
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Copies both ways between `conn` and a connection to 127.0.0.1:`port` opened inside `netns`.
fn splice(conn: std::net::TcpStream, netns: &str, port: u16) -> anyhow::Result<()> {
    let upstream =
        uc_e2e::netns::run_in(netns, || std::net::TcpStream::connect(("127.0.0.1", port)))??;
    let (mut a_read, mut a_write) = (conn.try_clone()?, conn);
    let (mut b_read, mut b_write) = (upstream.try_clone()?, upstream);
    let there = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(std::net::Shutdown::Write);
    let _ = there.join();
    Ok(())
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
    // A local ACME CA (Debian's pebble, validating for real) in the hub namespace, at an address
    // every machine reaches on the underlay; every agent is told to use it.
    let acme = uc_e2e::acme::Pebble::new(&ingress_dir(), uc_e2e::HUB_IP)
        .context("preparing the local ACME CA")?;
    let mut builder = uc_e2e::ClusterBuilder::new(machines)
        .tag("local")
        .base_dir(base_dir());
    for arg in acme.agent_args() {
        builder = builder.extra_arg(arg);
    }
    let started_up = uc_e2e::Cluster::start(builder)
        .context("starting the local cluster")
        .and_then(|mut c| {
            let ingress = start_ingress(&mut c, &acme).context("starting the local ingress")?;
            Ok((c, ingress))
        });
    let (cluster, ingress) = match started_up {
        Ok(v) => v,
        Err(e) => {
            // The cluster removed what it made when it was dropped; the CA's files go too.
            let _ = std::fs::remove_dir_all(ingress_dir());
            let _ = std::fs::remove_dir(base_dir());
            return Err(e);
        }
    };
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
            serde_json::json!({
                "machines": names,
                "sockets": sockets,
                "state": state,
                "ingress": {
                    "machine": "m0",
                    "http_port": ingress.http,
                    "https_port": ingress.https,
                    "acme_root": ingress.root,
                },
            })
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
        let port = |p: u16, default: u16| {
            if p == default {
                String::new()
            } else {
                format!(":{p}")
            }
        };
        println!(
            "ingress: m0, reached at 127.0.0.1:{} and :{}; certificates from a local ACME CA whose root is {}",
            ingress.http,
            ingress.https,
            ingress.root.display()
        );
        println!(
            "try: uc run -n hello -p hello.example.test:80/https demo\n     curl --cacert {} --resolve hello.example.test:{}:127.0.0.1 https://hello.example.test{}/cgi-bin/hello",
            ingress.root.display(),
            ingress.https,
            port(ingress.https, 443)
        );
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
    let acme = ingress_dir();
    if acme.exists() {
        std::fs::remove_dir_all(&acme).with_context(|| format!("removing {}", acme.display()))?;
        // The base directory too, when nothing else is left in it.
        let _ = std::fs::remove_dir(base_dir());
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
