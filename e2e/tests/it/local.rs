//! `uc local up`, the README's first command: a local cluster whose m0 is the ingress machine,
//! with a local ACME CA (pebble, validating for real). A service published with `/https`
//! answers on the host's loopback with a certificate that CA issued; plain HTTP is redirected;
//! `uc local down` leaves nothing behind: no namespace, process, listener or file.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use uc_e2e::{Bins, eventually, run_with_timeout};

/// `uc` against the local cluster in `dir`, with a config directory of its own.
fn uc(bins: &Bins, dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let demo = uc_e2e::workloads::demo_image()?;
    let bin_dir = bins.uc.parent().context("uc's directory")?;
    run_with_timeout(
        Command::new(&bins.uc)
            .args(args)
            .env("UC_LOCAL_DIR", dir.join("local"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("UC_BIN_DIR", bin_dir)
            .env("UC_DEMO_IMAGE", demo)
            .env_remove("UC_SOCKET")
            .env_remove("UC_CONTEXT"),
        Duration::from_secs(120),
    )
}

fn uc_ok(bins: &Bins, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = uc(bins, dir, args)?;
    ensure!(
        out.status.success(),
        "uc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `uc local down` when dropped, so a failing test leaves nothing running.
struct Down<'a>(&'a Bins, &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if let Err(e) = uc(self.0, self.1, &["local", "down"]) {
            eprintln!("uc local down: {e:#}");
        }
    }
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = run_with_timeout(
        Command::new("curl").args(["-sS", "-m", "10"]).args(args),
        Duration::from_secs(15),
    )?;
    ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn local_up_serves_https_on_the_hosts_loopback_and_down_removes_everything() -> anyhow::Result<()> {
    let bins = Bins::find(None)?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let up: Value = {
        let _down = Down(&bins, dir);
        let up: Value = serde_json::from_str(&uc_ok(
            &bins,
            dir,
            &["-o", "json", "local", "up", "--machines", "2"],
        )?)?;
        let https = up["ingress"]["https_port"].as_u64().context("https_port")?;
        let http = up["ingress"]["http_port"].as_u64().context("http_port")?;
        let root = up["ingress"]["acme_root"].as_str().context("acme_root")?;
        uc_ok(
            &bins,
            dir,
            &[
                "run",
                "-n",
                "hello",
                "-p",
                "hello.example.test:80/https",
                "demo",
            ],
        )?;
        let url = format!("https://hello.example.test:{https}/cgi-bin/hello");
        let resolve = format!("hello.example.test:{https}:127.0.0.1");
        let body = eventually(
            Duration::from_secs(90),
            "hello answers over HTTPS on 127.0.0.1",
            || curl(&["--cacert", root, "--resolve", &resolve, &url]),
        )?;
        ensure!(body.starts_with("hello from hello-"), "{body:?}");
        // The certificate is the local CA's, shown as valid.
        let ls: Value =
            serde_json::from_str(&uc_ok(&bins, dir, &["-o", "json", "ingress", "ls"])?)?;
        ensure!(ls["certificates"][0]["status"] == "valid", "{ls}");
        let redirect = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: hello.example.test",
            &format!("http://127.0.0.1:{http}/x"),
        ])?;
        ensure!(redirect == "308 https://hello.example.test/x", "{redirect}");
        up
    };
    // `uc local down` has run: nothing is left.
    let https = up["ingress"]["https_port"].as_u64().unwrap_or_default();
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", https as u16)).is_err(),
        "something still listens on 127.0.0.1:{https}"
    );
    let netns = std::fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("ucm-local-") || n.starts_with("uch-local"))
        .collect::<Vec<_>>();
    ensure!(netns.is_empty(), "namespaces left: {netns:?}");
    let pids = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()?;
    ensure!(
        pids.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&pids.stdout)
    );
    ensure!(
        !dir.join("local").exists(),
        "{} is left",
        dir.join("local").display()
    );
    Ok(())
}
