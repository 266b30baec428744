//! The ingress on namespace machines: a client outside the mesh fetches
//! `https://app.example.test` through the machine tagged `ingress` and gets answers from
//! replicas on two other machines, with a certificate that Debian's `pebble` issued after
//! validating HTTP-01 against the ingress (pebble resolves every name to the ingress machine
//! through `pebble-challtestsrv`). A replica's machine goes away and requests keep succeeding;
//! a second ingress machine serves the same certificate; the first is removed and the second
//! keeps serving.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use uc_e2e::acme::Pebble;
use uc_e2e::{Cluster, ClusterBuilder, eventually};

use crate::{uc_ok, with_cluster};

const WAIT: Duration = Duration::from_secs(90);

/// The client's view: `curl` in namespace `ns`, to `https://app.example.test` at `ip`.
fn fetch(c: &Cluster, ns: usize, ip: &str, root: &Path, path: &str) -> anyhow::Result<String> {
    let out = c.exec_in(
        ns,
        &[
            "curl",
            "-sS",
            "-m",
            "10",
            "--cacert",
            root.to_str().context("path")?,
            "--resolve",
            &format!("app.example.test:443:{ip}"),
            &format!("https://app.example.test{path}"),
        ],
    )?;
    ensure!(
        out.status.success(),
        "curl via {ip}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The SHA-256 fingerprint of the certificate `ip` serves for app.example.test.
fn served_cert(c: &Cluster, ns: usize, ip: &str) -> anyhow::Result<String> {
    let script = format!(
        "openssl s_client -connect {ip}:443 -servername app.example.test </dev/null 2>/dev/null \
         | openssl x509 -noout -fingerprint -sha256"
    );
    let out = c.exec_in(ns, &["sh", "-c", &script])?;
    let fp = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        fp.contains("Fingerprint"),
        "no certificate from {ip}: {out:?}"
    );
    Ok(fp)
}

fn cert_status(c: &Cluster, i: usize) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(&uc_ok(c, i, &["-o", "json", "ingress", "ls"])?)?;
    Ok(v["certificates"][0].clone())
}

#[test]
fn https_through_ingress_machines_with_a_pebble_certificate() -> anyhow::Result<()> {
    let tls = tempfile::tempdir()?;
    // The outside namespace comes after the 3 machines: 172.31.0.13 (see add_namespace).
    let outside_ip: std::net::Ipv4Addr = "172.31.0.13".parse()?;
    let pebble = Pebble::new(tls.path(), outside_ip)?;
    let mut b = ClusterBuilder::new(3)
        // Ingress machines take public traffic on their underlay.
        .underlay_firewall(false);
    for arg in pebble.agent_args() {
        b = b.extra_arg(arg);
    }
    with_cluster(b, |c| {
        c.wait_membership()?;
        let out = c.add_namespace()?;
        ensure!(
            c.machine(out).ip == outside_ip,
            "outside is not at {outside_ip}"
        );
        let outside = c.machine(out).netns.clone();
        let m0 = c.machine(0).ip.to_string();
        let m1 = c.machine(1).ip.to_string();
        // The DNS the CA uses answers the first ingress machine for every name.
        let m0_ip = c.machine(0).ip;
        pebble.start(c, &outside, m0_ip)?;
        crate::workloads::import_demo(c, 0)?;
        uc_ok(c, 0, &["machine", "tag", "m0", "ingress"])?;
        uc_ok(
            c,
            0,
            &[
                "run",
                "-n",
                "app",
                "-m",
                "m1",
                "-m",
                "m2",
                "-p",
                "app.example.test:80/https",
                "demo",
            ],
        )?;
        let pebble_log = || std::fs::read_to_string(pebble.log()).unwrap_or_default();
        eventually(WAIT, "the certificate is issued", || {
            let s = cert_status(c, 0)?;
            ensure!(s["status"] == "valid", "{s}\npebble:\n{}", pebble_log());
            Ok(())
        })
        .map_err(|e| e.context(pebble_log()))?;
        // The client trusts pebble's root, from pebble's management API.
        let root = pebble.fetch_root(&outside)?;

        // Answers from both replicas (the demo's CGI names the container's host).
        let hosts = eventually(WAIT, "both replicas answer through m0", || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..8 {
                seen.insert(fetch(c, out, &m0, &root, "/cgi-bin/hello")?);
            }
            ensure!(seen.len() == 2, "answers: {seen:?}");
            Ok(seen)
        })?;
        // Plain HTTP is redirected to HTTPS.
        let r = c.exec_in(
            out,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{redirect_url}",
                "-H",
                "Host: app.example.test",
                &format!("http://{m0}/x"),
            ],
        )?;
        let r = String::from_utf8_lossy(&r.stdout).into_owned();
        ensure!(r == "308 https://app.example.test/x", "{r}");

        // m2 goes away (its link is cut): every request still succeeds.
        c.set_link(2, false)?;
        for i in 0..6 {
            let body = fetch(c, out, &m0, &root, "/cgi-bin/hello")
                .with_context(|| format!("request {i} with m2 gone"))?;
            ensure!(hosts.contains(&body), "{body:?}");
        }

        // A second ingress machine serves the same certificate.
        uc_ok(c, 0, &["machine", "tag", "m1", "ingress"])?;
        let fp0 = served_cert(c, out, &m0)?;
        eventually(WAIT, "m1 serves the same certificate", || {
            ensure!(served_cert(c, out, &m1)? == fp0, "another certificate");
            Ok(())
        })?;
        fetch(c, out, &m1, &root, "/cgi-bin/hello")?;

        // m0 is removed: m1 keeps serving.
        uc_ok(c, 1, &["machine", "rm", "m0"])?;
        eventually(WAIT, "m0's ingress is gone", || {
            let r = c.exec_in(out, &["curl", "-sS", "-m", "2", &format!("http://{m0}/")])?;
            ensure!(!r.status.success(), "m0 still answers");
            Ok(())
        })?;
        for _ in 0..4 {
            fetch(c, out, &m1, &root, "/cgi-bin/hello")?;
        }
        let v: Value = serde_json::from_str(&uc_ok(c, 1, &["-o", "json", "ingress", "ls"])?)?;
        ensure!(v["machines"].as_array().map(Vec::len) == Some(1), "{v}");
        ensure!(v["routes"][0]["route"] == "https://app.example.test", "{v}");
        Ok(())
    })
}
