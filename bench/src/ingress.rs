//! Ingress benchmark: wrk through uc's ingress (the same `uc_ingress::serve` the agent runs) to a
//! backend, side by side in one run with nginx, HAProxy and Caddy proxying the same backend with
//! the same certificate. Each proxy is pinned to core 0 (one worker or thread), wrk and the
//! backend (an nginx answering a small static body) to core 1; everything on loopback. Two
//! modes: HTTPS with keep-alive, and a new TLS connection per request (`Connection: close`).
//! Figures: requests per second, p99 latency, the proxy's RSS after the run. Prints a Markdown
//! section and, with `--out`, writes it into docs/benchmarks.md between the `ingress` markers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use uc_bench::{rss_mb, spawn_pinned};

const BACKEND_PORT: u16 = 18080;
const PROXY_PORT: u16 = 18443;
const HOST: &str = "localhost";

#[derive(Parser)]
struct Args {
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Connections wrk keeps open.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Internal: run uc's ingress on 127.0.0.1:PROXY_PORT with the certificate in DIR.
    #[arg(long, hide = true)]
    serve_uc: Option<PathBuf>,
    /// Markdown file to update (between `<!-- ingress:begin -->` and `<!-- ingress:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn serve_uc(dir: &Path) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ingress = uc_ingress::Ingress::new(uc_ingress::Limits::default());
        let spec: uc_proto::spec::PortSpec = format!("{HOST}:{BACKEND_PORT}/https").parse()?;
        ingress.set_routes(uc_ingress::RouteTable::build(&[uc_ingress::ServiceInput {
            name: "backend".into(),
            ports: vec![spec],
            containers: vec![uc_ingress::ContainerInput {
                ip: "127.0.0.1".parse()?,
                local: true,
            }],
        }]));
        let cert = uc_ingress::Cert::from_pem(
            &std::fs::read_to_string(dir.join("cert.pem"))?,
            &std::fs::read_to_string(dir.join("key.pem"))?,
        )?;
        ingress
            .certs()
            .replace([(HOST.to_owned(), cert)].into_iter().collect());
        let tls = uc_ingress::tls::server_config(ingress.certs().clone())?;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", PROXY_PORT)).await?;
        uc_ingress::serve(
            ingress,
            l,
            uc_ingress::Listener::Https,
            443,
            Some(tls),
            tokio_util::sync::CancellationToken::new(),
        )
        .await?;
        anyhow::Ok(())
    })
}

fn wait_listening(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}")
}

struct Run {
    rps: f64,
    p99_ms: f64,
    errors: u64,
}

/// `wrk` on core 1; requests per second, p99 latency and errors from its report.
fn wrk(secs: u64, conns: usize, close: bool) -> anyhow::Result<Run> {
    let url = format!("https://{HOST}:{PROXY_PORT}/");
    let (d, c) = (format!("{secs}s"), conns.to_string());
    let mut argv = vec![
        "taskset",
        "-c",
        "1",
        "wrk",
        "-t1",
        "-c",
        &c,
        "-d",
        &d,
        "--latency",
    ];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(&url);
    let out = Command::new(argv[0]).args(&argv[1..]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk: {text} {}", String::from_utf8_lossy(&out.stderr));
    }
    let num_after = |key: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.trim_start()[key.len()..].split_whitespace().next())
            .map(str::to_owned)
    };
    let rps: f64 = num_after("Requests/sec:")
        .context("no Requests/sec in wrk's report")?
        .parse()?;
    let p99 = num_after("99%").context("no 99% in wrk's report")?;
    let p99_ms = if let Some(v) = p99.strip_suffix("ms") {
        v.parse::<f64>()?
    } else if let Some(v) = p99.strip_suffix("us") {
        v.parse::<f64>()? / 1000.0
    } else if let Some(v) = p99.strip_suffix('s') {
        v.parse::<f64>()? * 1000.0
    } else {
        bail!("p99 {p99:?}")
    };
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .flat_map(|l| l.split(|c: char| !c.is_ascii_digit()))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    Ok(Run {
        rps,
        p99_ms,
        errors,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.serve_uc {
        return serve_uc(dir);
    }
    let dir = std::env::temp_dir().join(format!("uc-bench-ingress-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let (cert, key) = uc_ingress::tls::self_signed(&[HOST.to_owned()])?;
    std::fs::write(dir.join("cert.pem"), &cert)?;
    std::fs::write(dir.join("key.pem"), &key)?;
    std::fs::write(dir.join("both.pem"), format!("{cert}{key}"))?;
    let d = |f: &str| dir.join(f).display().to_string();
    let nginx_common = format!(
        "daemon off; worker_processes 1; pid {pid}; error_log {log} crit;\nevents {{ worker_connections 4096; }}\n",
        pid = d("nginx.pid"),
        log = d("nginx.log")
    );
    let temp = format!(
        "client_body_temp_path {t}; proxy_temp_path {t}; fastcgi_temp_path {t}; uwsgi_temp_path {t}; scgi_temp_path {t}; access_log off;",
        t = d("")
    );
    std::fs::write(
        dir.join("backend.conf"),
        format!(
            "daemon off; worker_processes 1; pid {pid}; error_log {log} crit;\nevents {{ worker_connections 4096; }}\nhttp {{ {temp} keepalive_requests 100000; server {{ listen 127.0.0.1:{BACKEND_PORT}; location / {{ return 200 \"hello from the backend\\n\"; }} }} }}\n",
            pid = d("backend.pid"),
            log = d("backend.log"),
        ),
    )?;
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "{nginx_common}http {{ {temp} upstream b {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}\nserver {{ listen 127.0.0.1:{PROXY_PORT} ssl; http2 on; server_name {HOST}; ssl_certificate {c}; ssl_certificate_key {k}; ssl_session_cache shared:S:10m;\nlocation / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto https; }} }} }}\n",
            c = d("cert.pem"),
            k = d("key.pem"),
        ),
    )?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option forwardfor\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{PROXY_PORT} ssl crt {both} alpn h2,http/1.1\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{BACKEND_PORT}\n",
            both = d("both.pem")
        ),
    )?;
    std::fs::write(
        dir.join("Caddyfile"),
        format!(
            "{{\n  admin off\n  auto_https off\n  storage file_system {s}\n}}\nhttps://{HOST}:{PROXY_PORT} {{\n  bind 127.0.0.1\n  tls {c} {k}\n  reverse_proxy 127.0.0.1:{BACKEND_PORT}\n}}\n",
            s = d("caddy"),
            c = d("cert.pem"),
            k = d("key.pem")
        ),
    )?;

    let _backend = spawn_pinned("1", &["nginx", "-c", &d("backend.conf")], &[])?;
    wait_listening(BACKEND_PORT)?;
    let me = std::env::current_exe()?.display().to_string();
    let (nginx_conf, haproxy_cfg, caddyfile) = (d("nginx.conf"), d("haproxy.cfg"), d("Caddyfile"));
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let proxies: Vec<(&str, Vec<&str>, Env)> = vec![
        (
            "uc (uc-ingress)",
            vec![&me, "--serve-uc", dir.to_str().context("dir")?],
            vec![],
        ),
        ("nginx", vec!["nginx", "-c", &nginx_conf], vec![]),
        ("HAProxy", vec!["haproxy", "-f", &haproxy_cfg], vec![]),
        (
            "Caddy",
            vec![
                "caddy",
                "run",
                "--config",
                &caddyfile,
                "--adapter",
                "caddyfile",
            ],
            vec![("GOMAXPROCS", "1"), ("HOME", dir.to_str().context("dir")?)],
        ),
    ];
    let mut rows = Vec::new();
    for (label, argv, env) in &proxies {
        let proxy = spawn_pinned("0", argv, env)?;
        wait_listening(PROXY_PORT).with_context(|| format!("{label} did not start"))?;
        // A short warm-up, then the two modes.
        let _ = wrk(1, args.connections, false);
        let keep = wrk(args.secs, args.connections, false)?;
        let close = wrk(args.secs, args.connections, true)?;
        let rss = rss_mb(proxy.0.id());
        eprintln!(
            "{label}: keep-alive {:.0} req/s p99 {:.2} ms; new connections {:.0} req/s p99 {:.2} ms; {rss:.0} MB",
            keep.rps, keep.p99_ms, close.rps, close.p99_ms
        );
        rows.push((label.to_string(), keep, close, rss));
        drop(proxy);
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut md = String::from(
        "<!-- ingress:begin -->\n## Ingress: HTTPS through a proxy, wrk (issue 7)\n\n",
    );
    writeln!(
        md,
        "_{} · `bench/ingress.sh` · each proxy pinned to core 0 (one worker/thread), wrk (1 thread, {} connections) and the backend (nginx, a 23-byte body) to core 1, loopback, the same self-signed certificate · {} s per run · uc is the same `uc_ingress::serve` the agent runs, on one tokio worker · nginx keeps upstream connections alive (`keepalive 64`), HAProxy reuses them; uc pools them_\n",
        uc_bench::date_utc(),
        args.connections,
        args.secs,
    )?;
    md.push_str("| proxy | keep-alive req/s | p99 ms | new TLS connection per request req/s | p99 ms | errors | RSS MB |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for (label, k, c, rss) in &rows {
        writeln!(
            md,
            "| {label} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {rss:.0} |",
            k.rps,
            k.p99_ms,
            c.rps,
            c.p99_ms,
            k.errors + c.errors
        )?;
    }
    if let (Some(uc), Some(nginx)) = (rows.first(), rows.get(1)) {
        writeln!(
            md,
            "\nuc / nginx: keep-alive {:.2}x the requests per second at {:.2}x the p99; new connections {:.2}x at {:.2}x the p99. Target: at least nginx's requests per second with p99 no higher, in every mode. Not measured yet: new connections with TLS session resumption.",
            uc.1.rps / nginx.1.rps,
            uc.1.p99_ms / nginx.1.p99_ms,
            uc.2.rps / nginx.2.rps,
            uc.2.p99_ms / nginx.2.p99_ms,
        )?;
    }
    md.push_str("<!-- ingress:end -->");
    println!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "ingress", &md)?;
    }
    Ok(())
}
