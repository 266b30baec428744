//! Renders API answers as tables for people or JSON for programs.

use uc_proto::v1::{CreateJoinTokenResponse, MachineInfo, StatusResponse, WgShowResponse};

fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(unix_ms) / 1000;
    match s {
        0 => "now".into(),
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s => format!("{}h ago", s / 3600),
    }
}

/// Prints rows as aligned columns.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:w$}", c, w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn machines(ms: &[MachineInfo], json: bool) -> anyhow::Result<()> {
    if json {
        let v: Vec<serde_json::Value> = ms
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "name": m.name, "subnet": m.subnet, "liveness": m.liveness,
                    "endpoints": m.endpoints, "last_seen_unix_ms": m.last_seen_unix_ms,
                    "tags": m.tags, "state": m.state, "is_self": m.is_self, "public_key": m.public_key,
                    "mesh_address": m.mesh_address, "mesh_address_v6": m.mesh_address_v6,
                    "mesh_backend": m.mesh_backend, "mesh_management_address": m.mesh_management_address,
                    "runtimes": m.runtimes,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows = ms
        .iter()
        .filter(|m| m.state != "removed")
        .map(|m| {
            vec![
                if m.is_self {
                    format!("{} *", m.name)
                } else {
                    m.name.clone()
                },
                m.mesh_address.clone(),
                if m.is_self {
                    "live".into()
                } else {
                    m.liveness.clone()
                },
                m.endpoints.join(","),
                if m.is_self {
                    "-".into()
                } else {
                    ago(m.last_seen_unix_ms)
                },
                m.tags.join(","),
                short_backend(&m.mesh_backend),
                if m.runtimes.is_empty() {
                    "-".into()
                } else {
                    m.runtimes.join(",")
                },
                m.id[..8.min(m.id.len())].to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "ADDRESS",
            "STATE",
            "ENDPOINTS",
            "LAST SEEN",
            "TAGS",
            "WIREGUARD",
            "RUNTIMES",
            "ID",
        ],
        rows,
    );
    Ok(())
}

pub fn status(s: &StatusResponse, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "machine_id": s.machine_id, "machine_name": s.machine_name, "cluster_id": s.cluster_id,
                "ready": s.ready, "heads_digest": s.heads_digest,
                "gossip_garbage_dropped": s.gossip_garbage_dropped, "sync_garbage_dropped": s.sync_garbage_dropped,
                "sync_sessions_ok": s.sync_sessions_ok, "sync_sessions_failed": s.sync_sessions_failed,
                "data_dir": s.data_dir,
            }))?
        );
        return Ok(());
    }
    println!("machine:   {} ({})", s.machine_name, s.machine_id);
    println!("cluster:   {}", s.cluster_id);
    println!(
        "state:     {} (heads {})",
        if s.ready { "caught up" } else { "catching up" },
        s.heads_digest
    );
    println!(
        "sync:      {} sessions ok, {} failed",
        s.sync_sessions_ok, s.sync_sessions_failed
    );
    println!(
        "dropped:   {} garbage gossip datagrams, {} bad sync messages",
        s.gossip_garbage_dropped, s.sync_garbage_dropped
    );
    println!("data dir:  {}", s.data_dir);
    Ok(())
}

pub fn token(t: &CreateJoinTokenResponse, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::json!({"token": t.token, "expires_unix_ms": t.expires_unix_ms, "peer_addresses": t.peer_addresses})
        );
    } else {
        println!("{}", t.token);
        eprintln!(
            "single use; expires {}. On the new machine: ucd --join {} --token {}",
            ago_future(t.expires_unix_ms),
            t.peer_addresses
                .first()
                .map(String::as_str)
                .unwrap_or("PEER:51000"),
            t.token
        );
    }
    Ok(())
}

fn ago_future(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("in {} s", unix_ms.saturating_sub(now) / 1000)
}

/// Prints what a command made or removed: `{"id", "name"}` as JSON, else `text`.
pub fn named(id: &str, name: &str, json: bool, text: &str) {
    if json {
        println!("{}", serde_json::json!({"id": id, "name": name}));
    } else {
        println!("{text}");
    }
}

fn short_backend(b: &str) -> String {
    match b {
        "" => "-".into(),
        b if b.starts_with("userspace") => "userspace".into(),
        b => b.to_string(),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1024 * 1024 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1024 * 1024 * 1024 => format!("{:.1} MiB", n as f64 / 1048576.0),
        n => format!("{:.2} GiB", n as f64 / 1073741824.0),
    }
}

/// `uc wg show`: the interface, then one row per peer.
pub fn wg(w: &WgShowResponse, json: bool) -> anyhow::Result<()> {
    if json {
        let peers: Vec<serde_json::Value> = w
            .peers
            .iter()
            .map(|p| {
                serde_json::json!({
                    "machine": p.machine_name, "machine_id": p.machine_id,
                    "public_key": p.public_key, "endpoint": p.endpoint,
                    "allowed_ips": p.allowed_ips,
                    "last_handshake_age_secs": (p.last_handshake_age_secs >= 0).then_some(p.last_handshake_age_secs),
                    "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes, "keepalive_secs": p.keepalive_secs,
                })
            })
            .collect();
        let v = serde_json::json!({
            "machine": w.machine_name, "machine_id": w.machine_id, "interface": w.interface,
            "backend": w.backend, "backend_note": w.backend_note, "public_key": w.public_key,
            "listen_port": w.listen_port, "addresses": w.addresses, "peers": peers,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("machine:     {}", w.machine_name);
    println!("interface:   {} ({})", w.interface, w.backend);
    if !w.backend_note.is_empty() {
        println!("             {}", w.backend_note);
    }
    println!("public key:  {}", w.public_key);
    println!("listening:   {}/udp", w.listen_port);
    println!("addresses:   {}", w.addresses.join(", "));
    println!();
    let rows = w
        .peers
        .iter()
        .map(|p| {
            vec![
                if p.machine_name.is_empty() {
                    p.public_key[..8.min(p.public_key.len())].to_string()
                } else {
                    p.machine_name.clone()
                },
                if p.endpoint.is_empty() {
                    "-".into()
                } else {
                    p.endpoint.clone()
                },
                match p.last_handshake_age_secs {
                    s if s < 0 => "never".into(),
                    s if s < 120 => format!("{s}s ago"),
                    s => format!("{}m ago", s / 60),
                },
                bytes(p.rx_bytes),
                bytes(p.tx_bytes),
                p.allowed_ips.join(","),
            ]
        })
        .collect();
    table(
        &[
            "PEER",
            "ENDPOINT",
            "HANDSHAKE",
            "RECEIVED",
            "SENT",
            "ALLOWED IPS",
        ],
        rows,
    );
    Ok(())
}

/// `uc ingress ls`: the agent's listing (JSON) as tables, or as it is.
pub fn ingress(listing: &str, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{listing}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(listing)?;
    let list = |k: &str| v[k].as_array().cloned().unwrap_or_default();
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
    let machines: Vec<String> = list("machines")
        .iter()
        .map(|m| format!("{} ({})", s(&m["name"]), s(&m["liveness"])))
        .collect();
    if machines.is_empty() {
        println!("no ingress machines: tag one with `uc machine tag MACHINE ingress`");
    } else {
        println!("ingress machines: {}", machines.join(", "));
    }
    println!();
    table(
        &["ROUTE", "SERVICE", "BACKENDS"],
        list("routes")
            .iter()
            .map(|r| {
                let backends: Vec<String> = r["backends"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(s)
                    .collect();
                vec![
                    s(&r["route"]),
                    s(&r["service"]),
                    if backends.is_empty() {
                        "none running".into()
                    } else {
                        backends.join(", ")
                    },
                ]
            })
            .collect(),
    );
    let certs = list("certificates");
    if !certs.is_empty() {
        println!();
        table(
            &[
                "CERTIFICATE",
                "STATUS",
                "EXPIRES",
                "ISSUED BY",
                "LAST ERROR",
            ],
            certs
                .iter()
                .map(|c| {
                    vec![
                        s(&c["host"]),
                        s(&c["status"]),
                        c["not_after"]
                            .as_i64()
                            .map(expires)
                            .unwrap_or_else(|| "-".into()),
                        c["issued_by"].as_str().unwrap_or("-").to_owned(),
                        c["last_error"].as_str().unwrap_or("").to_owned(),
                    ]
                })
                .collect(),
        );
    }
    for r in list("refused") {
        println!(
            "not routed: {} of service {}: {}",
            s(&r["port"]),
            s(&r["service"]),
            s(&r["why"])
        );
    }
    if let Some(errs) = v["listen_errors"].as_object() {
        for (port, e) in errs {
            println!("listener for port {port}: {}", e.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// When a certificate expires (seconds since the epoch), from now: `in 89d`, `3h ago`.
fn expires(at_s: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = at_s - now;
    let span = |s: i64| match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    if d >= 0 {
        format!("in {}", span(d))
    } else {
        format!("{} ago", span(-d))
    }
}
