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
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use uc_bench::{percentile, rss_group_mb, spawn_pinned};

const BACKEND_PORT: u16 = 18080;
const PROXY_PORT: u16 = 18443;
/// The benchmark's site. wrk resolves it through a hosts file of its own, bind-mounted over
/// /etc/hosts in a mount namespace of its own (`unshare --mount`), so nothing on the machine
/// changes.
const HOST: &str = "bench.example.test";

#[derive(Parser)]
struct Args {
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds; each runs every proxy in every mode, and medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Connections wrk keeps open.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Internal: run uc's ingress on 127.0.0.1:PROXY_PORT with the certificate in DIR.
    #[arg(long, hide = true)]
    serve_uc: Option<PathBuf>,
    /// Internal: with `--serve-uc`, offer no TLS session resumption (no tickets, no session cache).
    #[arg(long, hide = true)]
    no_resumption: bool,
    /// Markdown file to update (between `<!-- ingress:begin -->` and `<!-- ingress:end -->`).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn serve_uc(dir: &Path, resumption: bool) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
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
        let mut tls = uc_ingress::tls::server_config(ingress.certs().clone())?;
        if !resumption {
            // The product's configuration with resumption taken out, as the other proxies'
            // no-resumption configurations take it out of theirs.
            let mut c = (*tls).clone();
            c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            c.ticketer = Arc::new(NoTickets);
            c.send_tls13_tickets = 0;
            tls = Arc::new(c);
        }
        // The agent's ingress, with one worker thread.
        let workers = uc_ingress::Workers::start(1)?;
        let l = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))?;
        workers
            .serve(
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

#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Accepts the benchmark's self-signed certificate (and any other: this client only checks
/// whether a proxy resumes sessions).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether the proxy on PROXY_PORT resumes a TLS session: three requests, each on a new
/// connection from one client (which keeps the tickets or session ids it was given); true when
/// the later handshakes were resumptions. Checks that each mode measures what it says.
fn resumes() -> anyhow::Result<bool> {
    use std::io::{Read, Write};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    );
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let conn = rustls::ClientConnection::new(cfg.clone(), HOST.try_into()?)?;
        let sock = std::net::TcpStream::connect(("127.0.0.1", PROXY_PORT))?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        write!(
            tls,
            "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = Vec::new();
        // Reading to the end also reads the tickets a TLS 1.3 server sends after the handshake.
        match tls.read_to_end(&mut body) {
            Ok(_) => {}
            // Some servers close without close_notify; the answer and tickets have arrived.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
        if !body.starts_with(b"HTTP/1.1 200") {
            bail!("no 200 answer: {}", String::from_utf8_lossy(&body));
        }
        kinds.push(tls.conn.handshake_kind());
    }
    Ok(kinds[1..]
        .iter()
        .all(|k| *k == Some(rustls::HandshakeKind::Resumed)))
}

/// The median of runs: requests per second and p99 each on their own; errors summed.
fn median_run(runs: &[Run]) -> Run {
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Run {
        rps: med(runs.iter().map(|r| r.rps).collect()),
        p99_ms: med(runs.iter().map(|r| r.p99_ms).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

fn wait_listening(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    uc_e2e::eventually(Duration::from_secs(5), "a listener", || {
        Ok(std::net::TcpStream::connect(addr)?)
    })
    .with_context(|| format!("nothing listens on {addr}"))?;
    Ok(())
}

struct Run {
    rps: f64,
    p99_ms: f64,
    errors: u64,
}

/// `wrk` on core 1; requests per second, p99 latency and errors from its report.
fn wrk(hosts: &Path, secs: u64, conns: usize, close: bool) -> anyhow::Result<Run> {
    let url = format!("https://{HOST}:{PROXY_PORT}/");
    let (d, c) = (format!("{secs}s"), conns.to_string());
    let mut argv = vec![
        "unshare",
        "--mount",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
        hosts.to_str().context("path")?,
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

/// What a proxy itself spends on new connections, seen from the wire: per connection, from the
/// client's first handshake packet to the proxy's first answer (`handshake`), and from the packet
/// carrying the request to the proxy's FIN after the answer (`request`), in ms.
///
/// wrk is the bottleneck with a new connection per request (one thread doing every client
/// handshake on one core), and the latency it reports runs from its write of the request to its
/// read of the answer, so it includes the time an answer waits in wrk's own event loop; these
/// packet timestamps take the client out.
#[derive(Default)]
struct Held {
    handshake: Vec<f64>,
    request: Vec<f64>,
}

/// A packet of a connection.
struct Pkt {
    /// Seconds, as tcpdump prints them.
    t: f64,
    from_client: bool,
    flags: String,
    /// Payload length.
    len: usize,
    /// The sequence range of its payload (`A:B` as tcpdump prints it; a retransmission repeats
    /// it).
    seq: String,
}

/// One packet of `tcpdump -r FILE -nn -tt`, with its client port (the side that is not
/// PROXY_PORT).
fn packet(line: &str) -> Option<(u16, Pkt)> {
    let mut it = line.split_whitespace();
    let t: f64 = it.next()?.parse().ok()?;
    if it.next()? != "IP" {
        return None;
    }
    let port = |a: &str| {
        a.trim_end_matches(':')
            .rsplit('.')
            .next()?
            .parse::<u16>()
            .ok()
    };
    let (src, dst) = (port(it.next()?)?, {
        it.next()?;
        port(it.next()?)?
    });
    let flags = line.split("Flags [").nth(1)?.split(']').next()?.to_owned();
    let len = line
        .rsplit("length ")
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let seq = line
        .split(", seq ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("")
        .to_owned();
    let from_client = dst == PROXY_PORT;
    let port = if from_client { src } else { dst };
    Some((
        port,
        Pkt {
            t,
            from_client,
            flags,
            len,
            seq,
        },
    ))
}

fn held(text: &str) -> Held {
    // Connections by client port, split at each SYN (wrk's ports come round again).
    let mut open: std::collections::HashMap<u16, Vec<Pkt>> = Default::default();
    let mut done: Vec<Vec<Pkt>> = Vec::new();
    for (port, p) in text.lines().filter_map(packet) {
        if p.from_client
            && p.flags == "S"
            && let Some(old) = open.insert(port, Vec::new())
        {
            done.push(old);
        }
        if let Some(c) = open.get_mut(&port) {
            c.push(p);
        }
    }
    done.extend(open.into_values());
    let mut h = Held::default();
    for c in done {
        let Some(hello) = c.iter().find(|p| p.from_client && p.len > 0) else {
            continue;
        };
        let Some(flight) = c
            .iter()
            .find(|p| !p.from_client && p.len > 0 && p.t >= hello.t)
        else {
            continue;
        };
        let Some(fin) = c.iter().find(|p| !p.from_client && p.flags.contains('F')) else {
            continue;
        };
        // The request is the client's last data before the proxy ends the connection, as it
        // was first sent.
        let Some(last) = c
            .iter()
            .rfind(|p| p.from_client && p.len > 0 && p.t > flight.t && p.t <= fin.t)
        else {
            continue;
        };
        let Some(req) = c.iter().find(|p| p.from_client && p.seq == last.seq) else {
            continue;
        };
        h.handshake.push((flight.t - hello.t) * 1e3);
        h.request.push((fin.t - req.t) * 1e3);
    }
    h
}

/// Runs wrk with a new connection per request while tcpdump (on the proxy's core) records the
/// proxy's port, and returns what the proxy held (see [`Held`]).
fn captured(dir: &Path, hosts: &Path, secs: u64, conns: usize) -> anyhow::Result<Held> {
    use std::io::BufRead;
    let file = dir.join("capture.pcap");
    let mut tcpdump = Command::new("taskset")
        .args([
            "-c", "0", "tcpdump", "-i", "lo", "-nn", "-s", "96", "-B", "32768", "-w",
        ])
        .arg(&file)
        .arg(format!("tcp port {PROXY_PORT}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
    let mut err = std::io::BufReader::new(tcpdump.stderr.take().context("tcpdump's stderr")?);
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            let _ = tcpdump.wait();
            bail!("tcpdump did not start");
        }
    }
    let run = wrk(hosts, secs, conns, true);
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    tcpdump.wait()?;
    run?;
    let out = Command::new("tcpdump")
        .args(["-r"])
        .arg(&file)
        .args(["-nn", "-tt"])
        .stderr(std::process::Stdio::null())
        .output()
        .context("reading the capture")?;
    let _ = std::fs::remove_file(&file);
    let h = held(&String::from_utf8_lossy(&out.stdout));
    if h.request.len() < 100 {
        bail!("the capture holds {} whole connections", h.request.len());
    }
    Ok(h)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.serve_uc {
        return serve_uc(dir, !args.no_resumption);
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
    let hosts = dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "{}\n127.0.0.1 {HOST}\n",
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        ),
    )?;
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
    // Each proxy in two configurations: with TLS session resumption (their defaults, and a
    // session cache for nginx) and without. nginx 1.22 leaves TLS 1.3 out by default; all four
    // speak TLS 1.2 and 1.3 here, so wrk negotiates TLS 1.3 with each.
    for (name, session) in [
        ("nginx.conf", "ssl_session_cache shared:S:10m;"),
        (
            "nginx-nr.conf",
            "ssl_session_cache off; ssl_session_tickets off;",
        ),
    ] {
        std::fs::write(
            dir.join(name),
            format!(
                "{nginx_common}http {{ {temp} upstream b {{ server 127.0.0.1:{BACKEND_PORT}; keepalive 64; }}\nserver {{ listen 127.0.0.1:{PROXY_PORT} ssl http2; server_name {HOST}; ssl_certificate {c}; ssl_certificate_key {k}; ssl_protocols TLSv1.2 TLSv1.3; {session}\nlocation / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto https; }} }} }}\n",
                c = d("cert.pem"),
                k = d("key.pem"),
            ),
        )?;
    }
    for (name, global, bind) in [
        ("haproxy.cfg", "", ""),
        (
            "haproxy-nr.cfg",
            "  tune.ssl.cachesize 0\n",
            " no-tls-tickets",
        ),
    ] {
        std::fs::write(
            dir.join(name),
            format!(
                "global\n  nbthread 1\n  maxconn 8192\n{global}defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option forwardfor\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:{PROXY_PORT} ssl crt {both} alpn h2,http/1.1{bind}\n  default_backend b\nbackend b\n  server s1 127.0.0.1:{BACKEND_PORT}\n",
                both = d("both.pem")
            ),
        )?;
    }
    std::fs::write(
        dir.join("Caddyfile"),
        format!(
            "{{\n  admin off\n  auto_https off\n  storage file_system {s}\n}}\nhttps://{HOST}:{PROXY_PORT} {{\n  bind 127.0.0.1\n  tls {c} {k}\n  reverse_proxy 127.0.0.1:{BACKEND_PORT}\n}}\n",
            s = d("caddy"),
            c = d("cert.pem"),
            k = d("key.pem")
        ),
    )?;
    // Caddy's Caddyfile has no switch for session tickets (Go's only resumption): adapt it to
    // JSON and turn them off there.
    let adapted = Command::new("caddy")
        .args([
            "adapt",
            "--config",
            &d("Caddyfile"),
            "--adapter",
            "caddyfile",
        ])
        .env("HOME", &dir)
        .output()?;
    if !adapted.status.success() {
        bail!("caddy adapt: {}", String::from_utf8_lossy(&adapted.stderr));
    }
    let mut caddy: serde_json::Value = serde_json::from_slice(&adapted.stdout)?;
    std::fs::write(dir.join("caddy.json"), caddy.to_string())?;
    caddy["apps"]["tls"]["session_tickets"] = serde_json::json!({ "disabled": true });
    std::fs::write(dir.join("caddy-nr.json"), caddy.to_string())?;

    let _backend = spawn_pinned("1", &["nginx", "-c", &d("backend.conf")], &[])?;
    wait_listening(BACKEND_PORT)?;
    let me = std::env::current_exe()?.display().to_string();
    let dir_s = dir.to_str().context("dir")?.to_owned();
    let argv = |proxy: &str, resumption: bool| -> Vec<String> {
        let nr = if resumption { "" } else { "-nr" };
        let v: Vec<String> = match proxy {
            "uc" => {
                let mut v = vec![me.clone(), "--serve-uc".into(), dir_s.clone()];
                if !resumption {
                    v.push("--no-resumption".into());
                }
                v
            }
            "nginx" => vec!["nginx".into(), "-c".into(), d(&format!("nginx{nr}.conf"))],
            "HAProxy" => vec![
                "haproxy".into(),
                "-f".into(),
                d(&format!("haproxy{nr}.cfg")),
            ],
            _ => vec![
                "caddy".into(),
                "run".into(),
                "--config".into(),
                d(&format!("caddy{nr}.json")),
            ],
        };
        v
    };
    let env: Vec<(&str, &str)> = vec![("GOMAXPROCS", "1"), ("HOME", &dir_s)];
    let start = |proxy: &str, resumption: bool| -> anyhow::Result<uc_bench::Killed> {
        let v = argv(proxy, resumption);
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        let p = spawn_pinned("0", &v, &env)?;
        wait_listening(PROXY_PORT).with_context(|| format!("{proxy} did not start"))?;
        Ok(p)
    };
    struct Row {
        label: &'static str,
        keep: Vec<Run>,
        resumed: Vec<Run>,
        full: Vec<Run>,
        rss: f64,
        checks: (bool, bool),
    }
    let proxies = [
        ("uc (uc-ingress)", "uc"),
        ("nginx", "nginx"),
        ("HAProxy", "HAProxy"),
        ("Caddy", "Caddy"),
    ];
    let mut rows: Vec<Row> = proxies
        .iter()
        .map(|(label, _)| Row {
            label,
            keep: Vec::new(),
            resumed: Vec::new(),
            full: Vec::new(),
            rss: 0.0,
            checks: (false, false),
        })
        .collect();
    // Rounds, each running every proxy in turn, so that the machine's noise falls on all of
    // them alike; medians are reported.
    for round in 0..args.rounds {
        for ((label, proxy), row) in proxies.iter().zip(&mut rows) {
            let p = start(proxy, true)?;
            let resumes_on = resumes().with_context(|| format!("{label}: checking resumption"))?;
            // A short warm-up, then keep-alive and a new connection per request (wrk keeps the
            // session it was given across its reconnects, so these resume).
            let _ = wrk(&hosts, 1, args.connections, false);
            let keep = wrk(&hosts, args.secs, args.connections, false)?;
            let resumed = wrk(&hosts, args.secs, args.connections, true)?;
            let rss = rss_group_mb(p.0.id());
            drop(p);
            std::thread::sleep(Duration::from_millis(500));
            let p = start(proxy, false)?;
            let resumes_off = resumes().with_context(|| format!("{label}: checking resumption"))?;
            let _ = wrk(&hosts, 1, args.connections, true);
            let full = wrk(&hosts, args.secs, args.connections, true)?;
            drop(p);
            std::thread::sleep(Duration::from_millis(500));
            eprintln!(
                "round {round}: {label}: keep-alive {:.0} req/s p99 {:.2} ms; new connections resumed {:.0} req/s p99 {:.2} ms; full handshakes {:.0} req/s p99 {:.2} ms; {rss:.0} MB; resumes {resumes_on}/{resumes_off}",
                keep.rps, keep.p99_ms, resumed.rps, resumed.p99_ms, full.rps, full.p99_ms
            );
            row.keep.push(keep);
            row.resumed.push(resumed);
            row.full.push(full);
            row.rss = row.rss.max(rss);
            if round == 0 {
                row.checks = (resumes_on, resumes_off);
            } else {
                row.checks.0 &= resumes_on;
                row.checks.1 |= resumes_off;
            }
        }
    }
    // One more pass with the wire recorded: what each proxy itself holds a new connection for.
    let mut held_md = String::new();
    let mut held_p99 = Vec::new();
    for (label, proxy) in &proxies {
        let mut cells = Vec::new();
        let mut p99s = Vec::new();
        for resumption in [true, false] {
            let p = start(proxy, resumption)?;
            let _ = wrk(&hosts, 1, args.connections, true);
            let h = captured(&dir, &hosts, args.secs, args.connections)
                .with_context(|| format!("{label}: recording the wire"))?;
            drop(p);
            std::thread::sleep(Duration::from_millis(500));
            for v in [&h.handshake, &h.request] {
                let (p50, p99) = (percentile(v, 50.0), percentile(v, 99.0));
                cells.push(format!("{p50:.2} | {p99:.2}"));
                p99s.push(p99);
            }
            eprintln!(
                "{label}: resumption {resumption}: {} connections recorded",
                h.request.len()
            );
        }
        writeln!(held_md, "| {label} | {} |", cells.join(" | "))?;
        held_p99.push(p99s);
    }

    // Label; medians of keep-alive, resumed and full handshakes; RSS; resumption checks.
    type Summary<'a> = (&'a str, Run, Run, Run, f64, (bool, bool));
    let rows: Vec<Summary> = rows
        .into_iter()
        .map(|r| {
            (
                r.label,
                median_run(&r.keep),
                median_run(&r.resumed),
                median_run(&r.full),
                r.rss,
                r.checks,
            )
        })
        .collect();

    let mut md = String::from(
        "<!-- ingress:begin -->\n## Ingress: HTTPS through a proxy, wrk (issue 7)\n\n",
    );
    writeln!(
        md,
        "_{} · `bench/ingress.sh` · each proxy pinned to core 0 (one worker/thread), wrk (1 thread, {} connections) and the backend (nginx, a 23-byte body) to core 1, loopback, the same self-signed certificate, TLS 1.3 · medians of {} rounds of {} s per run, the proxies taking turns · uc is the ingress the agent runs (`uc_ingress::Workers`), with one worker thread · nginx keeps upstream connections alive (`keepalive 64`), HAProxy reuses them, uc and Caddy pool them · new connections: wrk with `Connection: close`; it offers the session it was given on each reconnect, so against a proxy's default configuration these are resumed handshakes; \"full\" runs the same proxy with resumption turned off (no tickets, no session cache). A rustls client checks each configuration: \"resumes\" says whether its second and third connections resumed_\n",
        uc_bench::date_utc(),
        args.connections,
        args.rounds,
        args.secs,
    )?;
    md.push_str("| proxy | keep-alive req/s | p99 ms | new conn., resumed req/s | p99 ms | new conn., full handshake req/s | p99 ms | resumes (on/off) | errors | RSS MB |\n|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    let yn = |b: bool| if b { "yes" } else { "no" };
    for (label, keep, resumed, full, rss, checks) in &rows {
        writeln!(
            md,
            "| {label} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {}/{} | {} | {rss:.0} |",
            keep.rps,
            keep.p99_ms,
            resumed.rps,
            resumed.p99_ms,
            full.rps,
            full.p99_ms,
            yn(checks.0),
            yn(checks.1),
            keep.errors + resumed.errors + full.errors,
        )?;
    }
    if let (Some(uc), Some(nginx)) = (rows.first(), rows.get(1)) {
        let ratio = |a: &Run, b: &Run| (a.rps / b.rps, a.p99_ms / b.p99_ms);
        let (k, kp) = ratio(&uc.1, &nginx.1);
        let (r, rp) = ratio(&uc.2, &nginx.2);
        let (f, fp) = ratio(&uc.3, &nginx.3);
        writeln!(
            md,
            "\nuc / nginx, requests per second (p99): keep-alive {k:.2}x ({kp:.2}x); new connections resumed {r:.2}x ({rp:.2}x); full handshakes {f:.2}x ({fp:.2}x). Target: at least nginx's requests per second with p99 no higher, in every mode.",
        )?;
    }
    md.push_str(
        "\nWith a new connection per request wrk is the bottleneck (its one thread does every client handshake, at about 0.9 of its core), and its latency runs from its write of a request to its read of the answer, so it includes the time an answer waits in wrk's own event loop. What each proxy itself holds a connection for, from packet timestamps (tcpdump on the proxy's core, one more run of each mode): *handshake*, from the client's first handshake packet to the proxy's first answer; *request*, from the packet carrying the request to the proxy's FIN after its answer; ms.\n\n| proxy | resumed: handshake p50 | p99 | request p50 | p99 | full: handshake p50 | p99 | request p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    md.push_str(&held_md);
    if let (Some(uc), Some(nginx)) = (held_p99.first(), held_p99.get(1)) {
        let r: Vec<String> = uc
            .iter()
            .zip(nginx)
            .map(|(a, b)| format!("{:.2}x", a / b))
            .collect();
        writeln!(
            md,
            "\nuc / nginx, p99 of what the proxy holds: resumed, handshake {} and request {}; full, handshake {} and request {}.",
            r[0], r[1], r[2], r[3]
        )?;
    }
    md.push_str("<!-- ingress:end -->");
    println!("{md}");
    if let Some(out) = &args.out {
        uc_bench::splice(out, "ingress", &md)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_times_come_from_the_first_sending_of_each_packet() {
        // A connection as tcpdump prints it: handshake, the client's Finished, its request
        // (sent again 4 ms later), the proxy's answer and FIN; then a SYN reusing the port whose
        // connection never finishes.
        let c = "127.0.0.1.50000 > 127.0.0.1.18443";
        let s = "127.0.0.1.18443 > 127.0.0.1.50000";
        let text = [
            format!("10.000000 IP {c}: Flags [S], seq 7, win 65495, length 0"),
            format!("10.000010 IP {s}: Flags [S.], seq 9, ack 8, win 65483, length 0"),
            format!("10.000020 IP {c}: Flags [.], ack 1, win 64, length 0"),
            format!("10.001000 IP {c}: Flags [P.], seq 1:325, ack 1, win 64, length 324"),
            format!("10.003000 IP {s}: Flags [P.], seq 1:745, ack 325, win 64, length 744"),
            format!("10.010000 IP {c}: Flags [P.], seq 325:405, ack 745, win 64, length 80"),
            format!("10.010100 IP {c}: Flags [P.], seq 405:496, ack 745, win 64, length 91"),
            format!("10.014100 IP {c}: Flags [P.], seq 405:496, ack 745, win 64, length 91"),
            "10.015000 IP 10.0.0.1.53 > 10.0.0.2.5353: UDP, length 40".to_owned(),
            format!("10.016100 IP {s}: Flags [P.], seq 745:933, ack 496, win 64, length 188"),
            format!("10.016200 IP {s}: Flags [F.], seq 933, ack 496, win 64, length 0"),
            format!("11.000000 IP {c}: Flags [S], seq 99, win 65495, length 0"),
        ]
        .join("\n");
        let h = held(&text);
        assert_eq!(h.handshake.len(), 1, "one whole connection");
        assert!((h.handshake[0] - 2.0).abs() < 1e-6, "{:?}", h.handshake);
        assert!((h.request[0] - 6.1).abs() < 1e-6, "{:?}", h.request);
    }
}
