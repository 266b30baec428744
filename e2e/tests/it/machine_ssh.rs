//! `uc machine init|add` from a laptop to hosts reached over real SSH (see `uc_e2e::sshlab`):
//! the agent is installed on each host, the hosts form a cluster on the mesh, and every failure
//! leaves the host as it was.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use uc_e2e::{SshLab, eventually};

use crate::SETTLE;

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `uc ARGS` on the laptop; fails unless it succeeds.
fn uc_ok(lab: &SshLab, args: &[&str]) -> anyhow::Result<Output> {
    let out = lab.uc(args)?;
    ensure!(
        out.status.success(),
        "uc {}: {}",
        args.join(" "),
        text(&out)
    );
    Ok(out)
}

/// `uc ARGS` on the laptop; fails unless it fails with stderr containing `want`.
fn uc_fails(lab: &SshLab, args: &[&str], want: &str) -> anyhow::Result<String> {
    let out = lab.uc(args)?;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        !out.status.success() && err.contains(want),
        "uc {} should fail saying {want:?}: {}",
        args.join(" "),
        text(&out)
    );
    Ok(err)
}

fn json(out: &Output) -> anyhow::Result<Value> {
    serde_json::from_slice(&out.stdout).with_context(|| text(out))
}

/// Machines as host `i`'s agent lists them, reached over SSH: name -> entry (removed left out).
fn machines_via(lab: &SshLab, i: usize) -> anyhow::Result<Vec<Value>> {
    let target = lab.host_target(i);
    let v = json(&uc_ok(
        lab,
        &["--ssh", &target, "-o", "json", "machine", "ls"],
    )?)?;
    Ok(v.as_array()
        .context("machine ls is not a list")?
        .iter()
        .filter(|m| m["state"] != "removed")
        .cloned()
        .collect())
}

/// Every listed machine live (or self) as host `i` sees it; their names.
fn all_live_via(lab: &SshLab, i: usize, want: usize) -> anyhow::Result<BTreeSet<String>> {
    let ms = machines_via(lab, i)?;
    ensure!(
        ms.len() == want,
        "host {i} lists {} machines: {ms:?}",
        ms.len()
    );
    for m in &ms {
        ensure!(
            m["is_self"] == true || m["liveness"] == "live",
            "host {i} sees {} as {}",
            m["name"],
            m["liveness"]
        );
    }
    Ok(ms
        .iter()
        .map(|m| m["name"].as_str().unwrap_or("").to_string())
        .collect())
}

/// Every file and directory uc could leave on host `i`, for before/after comparisons.
fn host_files(lab: &SshLab, i: usize) -> BTreeSet<String> {
    fn walk(dir: &Path, base: &str, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = format!("{base}/{}", e.file_name().to_string_lossy());
            if e.path().is_dir() {
                walk(&e.path(), &p, out);
            }
            out.insert(p);
        }
    }
    let mut out = BTreeSet::new();
    for d in ["/usr/local", "/etc/uc", "/var/lib/uc"] {
        walk(&lab.host_path(i, d), d, &mut out);
    }
    out
}

/// Fails unless host `i` has exactly the files of `before`.
fn same_files(lab: &SshLab, i: usize, before: &BTreeSet<String>, what: &str) -> anyhow::Result<()> {
    let now = host_files(lab, i);
    ensure!(
        &now == before,
        "{what} changed host {i}: new {:?}, gone {:?}",
        now.difference(before).collect::<Vec<_>>(),
        before.difference(&now).collect::<Vec<_>>()
    );
    Ok(())
}

/// Host `i` runs no agent started by uc.
fn no_agent(lab: &SshLab, i: usize) -> anyhow::Result<()> {
    let out = lab.host_sh(
        i,
        "test -e /run/uc/ucd-supervise.pid || test -S /var/lib/uc/api.sock",
    )?;
    ensure!(!out.status.success(), "host {i} still runs an agent");
    Ok(())
}

fn context_file(lab: &SshLab) -> anyhow::Result<toml::Table> {
    let p = lab.laptop_home().join(".config/uc/config.toml");
    let s = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(toml::from_str(&s)?)
}

/// The `ssh` values of context `name`'s connections.
fn context_hosts(lab: &SshLab, name: &str) -> anyhow::Result<Vec<String>> {
    let t = context_file(lab)?;
    let conns = t["contexts"][name]["connections"]
        .as_array()
        .context("no connections")?;
    Ok(conns
        .iter()
        .filter_map(|c| c.get("ssh").and_then(|s| s.as_str()).map(str::to_string))
        .collect())
}

fn with_lab(
    hosts: usize,
    test: impl FnOnce(&mut SshLab) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut lab = SshLab::start(hosts)?;
    test(&mut lab).map_err(|e| {
        let mut msg = format!("{e:#}");
        for i in 0..lab.hosts() {
            let log = std::fs::read_to_string(lab.host_path(i, "/var/lib/uc/ucd.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            msg.push_str(&format!(
                "\n--- host {i} ucd.log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        anyhow::anyhow!(msg)
    })
}

#[test]
fn init_add_remove_and_add_again_over_ssh() -> anyhow::Result<()> {
    with_lab(3, |lab| {
        let (h0, h1, h2) = (lab.host_target(0), lab.host_target(1), lab.host_target(2));
        let out = uc_ok(
            lab,
            &["-o", "json", "machine", "init", &h0, "-y", "--name", "h0"],
        )?;
        let v = json(&out)?;
        ensure!(
            v["cluster_id"].as_str().is_some_and(|s| s.len() == 32),
            "{v}"
        );
        let steps: Vec<&str> = v["steps"]
            .as_array()
            .context("no steps")?
            .iter()
            .filter_map(|s| s["step"].as_str())
            .collect();
        ensure!(steps.len() >= 4, "steps: {steps:?}");
        // Each step was shown as it happened, with its time.
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("✓ copying ucd") && err.contains(" s)"),
            "{err}"
        );

        for (i, h) in [(1, &h1), (2, &h2)] {
            let out = uc_ok(
                lab,
                &[
                    "-o",
                    "json",
                    "machine",
                    "add",
                    h,
                    "-y",
                    "--name",
                    &format!("h{i}"),
                ],
            )?;
            let v = json(&out)?;
            ensure!(v["machine"] == format!("h{i}"), "{v}");
        }
        // Installed on each host, in its own directories; the join token is gone.
        for i in 0..3 {
            ensure!(
                lab.host_path(i, "/usr/local/bin/ucd").exists(),
                "no ucd on host {i}"
            );
            let cfg = std::fs::read_to_string(lab.host_path(i, "/etc/uc/ucd.toml"))?;
            ensure!(cfg.contains(&format!("name = \"h{i}\"")), "{cfg}");
            ensure!(
                !lab.host_path(i, "/etc/uc/bootstrap.env").exists(),
                "host {i} keeps its bootstrap file"
            );
        }
        // Through each connection: three live machines.
        for i in 0..3 {
            let names = all_live_via(lab, i, 3)?;
            ensure!(
                names == BTreeSet::from(["h0".into(), "h1".into(), "h2".into()]),
                "{names:?}"
            );
        }
        // The mesh carries traffic between the hosts (their firewalls let only SSH, the join
        // endpoint and WireGuard in on the underlay).
        let ms = machines_via(lab, 0)?;
        for m in &ms {
            let ip = m["mesh_address"].as_str().context("no mesh address")?;
            let out = lab.host_sh(1, &format!("ping -c 1 -W 2 {ip}"))?;
            ensure!(
                out.status.success(),
                "host 1 cannot ping {ip} over the mesh"
            );
        }
        // The laptop's context: current, one SSH connection per machine.
        let t = context_file(lab)?;
        ensure!(t["current_context"].as_str() == Some("default"), "{t}");
        ensure!(
            context_hosts(lab, "default")? == vec![h0.clone(), h1.clone(), h2.clone()],
            "{t}"
        );
        uc_ok(lab, &["machine", "ls"])?;

        // Rename, then remove h2: its agent stops and sets its state aside by itself, and the
        // context forgets it.
        uc_ok(lab, &["machine", "rename", "h1", "h1x"])?;
        uc_ok(lab, &["machine", "rm", "h2"])?;
        ensure!(context_hosts(lab, "default")? == vec![h0.clone(), h1.clone()]);
        eventually(SETTLE, "h2's agent resets itself", || {
            ensure!(
                !lab.host_path(2, "/var/lib/uc/state.redb").exists(),
                "state still there"
            );
            no_agent(lab, 2)
        })?;
        // And it can be added again, with a new identity.
        uc_ok(lab, &["machine", "add", &h2, "-y", "--name", "h2"])?;
        for i in 0..3 {
            let names = eventually(SETTLE, "three live machines", || all_live_via(lab, i, 3))?;
            ensure!(
                names == BTreeSet::from(["h0".into(), "h1x".into(), "h2".into()]),
                "{names:?}"
            );
        }
        Ok(())
    })
}

#[test]
fn failed_installs_leave_the_host_as_it_was() -> anyhow::Result<()> {
    with_lab(2, |lab| {
        let (h0, h1) = (lab.host_target(0), lab.host_target(1));
        uc_ok(lab, &["machine", "init", &h0, "-y", "--name", "h0"])?;
        let before = host_files(lab, 1);

        // An address where nothing answers (inside the lab's own network).
        uc_fails(
            lab,
            &["machine", "add", "root@172.31.0.99", "-y"],
            "not reachable",
        )?;
        // A key the host does not accept. (The lab's ssh_config names the right key, which ssh
        // would offer too: this attempt gets a config without it.)
        let wrong = lab.wrong_key().display().to_string();
        let lab_cfg = std::fs::read_to_string(lab.ssh_config())?;
        let no_key = lab.laptop_home().join("ssh_config_without_key");
        std::fs::write(
            &no_key,
            lab_cfg
                .lines()
                .filter(|l| !l.trim_start().starts_with("IdentityFile"))
                .collect::<Vec<_>>()
                .join("\n"),
        )?;
        let out = uc_e2e::run_with_timeout(
            lab.laptop_command(uc_e2e::Bins::find(None)?.uc)?
                .env("UC_SSH_CONFIG", &no_key)
                .args(["machine", "add", &h1, "-y", "-i", &wrong]),
            uc_e2e::sshlab::LAPTOP_TIMEOUT,
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("refused the SSH key"),
            "{}",
            text(&out)
        );
        same_files(lab, 1, &before, "a refused login")?;

        // Ports the agent needs, taken: nothing is installed, and the error says which.
        for (port, proto) in [
            (51820, "SOCK_DGRAM"),
            (53, "SOCK_DGRAM"),
            (51002, "SOCK_STREAM"),
        ] {
            let listen = if proto == "SOCK_STREAM" {
                "; s.listen()"
            } else {
                ""
            };
            let hold = lab.host_sh(
                1,
                &format!(
                    "setsid python3 -c 'import socket,time; s=socket.socket(socket.AF_INET, socket.{proto}); \
                     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((\"0.0.0.0\", {port})){listen}; \
                     open(\"/run/uc-hold-{port}\", \"w\").close(); time.sleep(600)' >/dev/null 2>&1 < /dev/null &"
                ),
            )?;
            ensure!(hold.status.success(), "{}", text(&hold));
            eventually(SETTLE, "the port is held", || {
                ensure!(
                    lab.host_sh(1, &format!("test -e /run/uc-hold-{port}"))?
                        .status
                        .success(),
                    "not yet"
                );
                Ok(())
            })?;
            uc_fails(
                lab,
                &["machine", "add", &h1, "-y"],
                &format!("port {port} is taken"),
            )?;
            lab.host_sh(
                1,
                &format!(
                    "pkill -f 'bind\\(\\(\"0.0.0.0\", {port}\\)\\)'; rm -f /run/uc-hold-{port}"
                ),
            )?;
            same_files(lab, 1, &before, &format!("a refused install (port {port})"))?;
        }

        // An expired token: the agent is installed, refused by the cluster, and removed again.
        let tok = json(&uc_ok(
            lab,
            &["-o", "json", "machine", "token", "--ttl", "1"],
        )?)?;
        let (token, join) = (
            tok["token"].as_str().context("no token")?.to_string(),
            tok["peer_addresses"][0]
                .as_str()
                .context("no join address")?
                .to_string(),
        );
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let err = uc_fails(
            lab,
            &[
                "machine", "add", &h1, "-y", "--token", &token, "--join", &join,
            ],
            "expired",
        )?;
        ensure!(err.contains("is as it was before"), "{err}");
        same_files(lab, 1, &before, "an expired token")?;
        no_agent(lab, 1)?;

        // A used token: first used for real, then (after the machine was removed and reset
        // itself) again.
        let tok = json(&uc_ok(lab, &["-o", "json", "machine", "token"])?)?;
        let token = tok["token"].as_str().context("no token")?.to_string();
        uc_ok(
            lab,
            &[
                "machine", "add", &h1, "-y", "--token", &token, "--join", &join, "--name", "h1",
            ],
        )?;
        // A host in a cluster is not taken over by another one.
        uc_fails(
            lab,
            &["machine", "init", &h1, "-y", "--context", "other"],
            "already belongs to a uc cluster",
        )?;
        uc_ok(lab, &["machine", "rm", "h1"])?;
        eventually(SETTLE, "h1's agent resets itself", || no_agent(lab, 1))?;
        let before = host_files(lab, 1);
        uc_fails(
            lab,
            &[
                "machine", "add", &h1, "-y", "--token", &token, "--join", &join,
            ],
            "already used",
        )?;
        same_files(lab, 1, &before, "a used token")?;
        no_agent(lab, 1)?;
        // The cluster has no trace of the refused joins.
        let ms = machines_via(lab, 0)?;
        ensure!(ms.len() == 1, "the cluster lists {ms:?}");

        // --force takes over a machine of another cluster, keeping its old state aside.
        uc_ok(
            lab,
            &[
                "machine",
                "init",
                &h1,
                "-y",
                "--context",
                "other",
                "--name",
                "solo",
            ],
        )?;
        ensure!(context_file(lab)?["current_context"].as_str() == Some("other"));
        uc_ok(lab, &["ctx", "use", "default"])?;
        uc_fails(lab, &["machine", "add", &h1, "-y"], "--force")?;
        uc_ok(
            lab,
            &["machine", "add", &h1, "-y", "--force", "--name", "h1b"],
        )?;
        let names = eventually(SETTLE, "h0 and h1b live", || all_live_via(lab, 0, 2))?;
        ensure!(
            names == BTreeSet::from(["h0".into(), "h1b".into()]),
            "{names:?}"
        );
        let kept: Vec<_> = std::fs::read_dir(lab.host_path(1, "/var/lib/uc"))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".replaced-"))
            .filter(|e| e.path().join("state.redb").exists())
            .collect();
        ensure!(
            kept.len() == 1,
            "the old cluster's state was not kept aside"
        );
        Ok(())
    })
}

#[test]
fn a_host_without_a_binary_for_its_architecture_is_refused() -> anyhow::Result<()> {
    with_lab(1, |lab| {
        let h0 = lab.host_target(0);
        // A "ucd" for another architecture: an ELF header for aarch64.
        let fake = lab.laptop_home().join("ucd-arm");
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(18, 0);
        elf.extend_from_slice(&183u16.to_le_bytes());
        elf.resize(64, 0);
        std::fs::write(&fake, elf)?;
        let before = host_files(lab, 0);
        let err = uc_fails(
            lab,
            &[
                "machine",
                "init",
                &h0,
                "-y",
                "--binary",
                &fake.display().to_string(),
            ],
            "no ucd binary for x86_64",
        )?;
        if !err.contains("aarch64") {
            bail!("the error does not say what the binary was for: {err}");
        }
        same_files(lab, 0, &before, "a refused install")?;
        Ok(())
    })
}
