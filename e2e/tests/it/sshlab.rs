//! Tests of the SSH lab: hosts reachable over real SSH from a laptop namespace, each with its own
//! `/usr/local`, `/etc/uc` and `/var/lib/uc`, and nothing of them left once the lab is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use uc_e2e::sshlab::HOST_DIRS;
use uc_e2e::{SshLab, netns};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

fn ensure_ok(what: &str, out: &Output) -> anyhow::Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}): stdout {:?}, stderr {:?}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(text(&out.stdout))
}

/// Pids of processes in namespace `ns` whose command line is exactly `argv`.
fn pids_running(ns: &str, argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    netns::pids(ns)
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// The mount namespace of process `pid` (`mnt:[inode]`).
fn mount_ns(pid: impl std::fmt::Display) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Lines of `/proc/<pid>/mountinfo` of every process that contain `needle`.
fn mounts_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        found.extend(
            info.lines()
                .filter(|l| l.contains(needle))
                .map(|l| format!("pid {pid}: {l}")),
        );
    }
    found
}

#[test]
fn sshlab_hosts_have_their_own_dirs_over_real_ssh_and_leave_nothing_behind() -> anyhow::Result<()> {
    let lab = SshLab::start(2)?;
    let lab_dir = lab.cluster().dir().to_path_buf();
    // In mountinfo a bind mount's source is named relative to its filesystem's root, which need
    // not be /: look for the lab's unique tag instead of its whole path.
    let needle = format!("/{}/", lab.cluster().tag());
    let host0_ns = lab.cluster().machine(0).netns.clone();
    let (sleep, host_mount_ns) = exercise(&lab, &needle).map_err(|e| lab.with_logs(e))?;

    // Once the drop returns, nothing of the lab is left: no process, mount, namespace or file.
    drop(lab);
    ensure!(
        !netns::alive(sleep)
            || std::fs::read(format!("/proc/{sleep}/cmdline"))? != b"sleep\x001000\x00",
        "sleep 1000 (pid {sleep}) survived the lab"
    );
    let left = mounts_mentioning(&needle);
    ensure!(left.is_empty(), "mounts of the lab left: {left:#?}");
    let own = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(!own.contains(&needle));
    for e in std::fs::read_dir("/proc")?.flatten() {
        if let Some(ns) = mount_ns(e.file_name().to_string_lossy())
            && host_mount_ns.contains(&ns)
        {
            anyhow::bail!(
                "pid {:?} is still in a host's mount namespace",
                e.file_name()
            );
        }
    }
    ensure!(!lab_dir.exists(), "{} left", lab_dir.display());
    ensure!(!netns::list()?.contains(&host0_ns), "{host0_ns} left");
    Ok(())
}

/// Everything the test checks while the lab runs; returns the pid of the `sleep 1000` left on
/// host 0 and the hosts' mount namespaces.
fn exercise(lab: &SshLab, needle: &str) -> anyhow::Result<(i32, Vec<String>)> {
    let config = lab.ssh_config().display().to_string();
    let host0_ns = &lab.cluster().machine(0).netns;

    // Plain ssh from the laptop, with the lab's ssh_config; a detached process is left behind.
    // The braces matter: a trailing `&` would put the whole `&&` list in a background subshell
    // that keeps the session's stdout open until the sleep ends, and ssh would wait for it.
    let out = lab.laptop_run(&[
        "ssh",
        "-F",
        &config,
        &lab.host_target(0),
        "mkdir -p /var/lib/uc && echo h0 > /var/lib/uc/x && test ! -e /run/systemd/system \
         && { setsid sleep 1000 >/dev/null 2>&1 < /dev/null & }",
    ])?;
    ensure_ok("ssh to host 0", &out)?;

    // What it wrote is host 0's alone.
    let x0 = lab.host_path(0, "/var/lib/uc/x");
    ensure!(
        std::fs::read_to_string(&x0)? == "h0\n",
        "{} does not hold h0",
        x0.display()
    );
    let x1 = lab.host_path(1, "/var/lib/uc/x");
    ensure!(!x1.exists(), "{} exists", x1.display());
    ensure!(
        !Path::new("/var/lib/uc/x").exists(),
        "the write reached the real /var/lib/uc"
    );
    ensure!(ensure_ok("cat on host 0", &lab.host_sh(0, "cat /var/lib/uc/x")?)? == "h0");
    let out = lab.host_sh(1, "cat /var/lib/uc/x")?;
    ensure!(
        !out.status.success(),
        "host 1 sees host 0's file: {}",
        text(&out.stdout)
    );
    ensure_ok(
        "host 1's view",
        &lab.host_sh(
            1,
            "test -d /run/sshd && test ! -e /run/systemd && test -d /usr/local/bin \
             && test ! -e /usr/local/bin/uc && test ! -e /root/.cargo && echo t > /tmp/probe",
        )?,
    )?;

    ensure!(lab.host_path(1, "/tmp/probe").is_file() && !lab.host_path(0, "/tmp/probe").exists());
    ensure!(
        !Path::new("/tmp/probe").exists(),
        "the write reached the real /tmp"
    );
    let out = ensure_ok("ssh printenv", &lab.ssh(1, "echo $HOME $PATH")?)?;
    ensure!(
        out == "/root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "an SSH session's HOME and PATH on a host: {out}"
    );

    // Each host has its own host key, both now known to the laptop.
    ensure_ok("ssh to host 1", &lab.ssh(1, "true")?)?;
    let known = std::fs::read_to_string(lab.laptop_home().join(".ssh/known_hosts"))?;
    ensure!(
        known.lines().count() == 2
            && known.contains(&lab.host_ip(0).to_string())
            && known.contains(&lab.host_ip(1).to_string()),
        "known_hosts: {known}"
    );

    // A key no host authorizes is refused.
    let out = lab.laptop_run(&[
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        &lab.wrong_key().display().to_string(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        &format!(
            "UserKnownHostsFile={}",
            lab.laptop_home().join(".ssh/known_hosts").display()
        ),
        &lab.host_target(0),
        "true",
    ])?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("Permission denied"),
        "the wrong key was not refused: {} {:?}",
        out.status,
        text(&out.stderr)
    );

    // The laptop's environment, for the CLI under test.
    let env = ensure_ok(
        "the laptop's environment",
        &lab.laptop_run(&[
            "sh",
            "-c",
            "echo $HOME; echo ${XDG_CONFIG_HOME-unset}; echo $UC_SSH_CONFIG; command -v uc; command -v ucd",
        ])?,
    )?;
    let bins = uc_e2e::Bins::find(None)?;
    let want = format!(
        "{}\nunset\n{}\n{}\n{}",
        lab.laptop_home().display(),
        config,
        bins.uc.display(),
        bins.ucd.display()
    );
    ensure!(env == want, "laptop environment {env:?}, want {want:?}");
    ensure_ok("uc --help on the laptop", &lab.uc(&["--help"])?)?;

    // The hosts' firewall lets 22 through, not other ports; the laptop has none.
    let blocked = lab
        .cluster()
        .in_netns(0, || TcpListener::bind((lab.host_ip(0), 2222)))??;
    let laptop = lab.laptop_index();
    let connect = |addr: SocketAddr| {
        lab.cluster().in_netns(laptop, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(700)).is_ok()
        })
    };
    ensure!(connect(SocketAddr::from((lab.host_ip(0), 22)))?);
    ensure!(
        !connect(blocked.local_addr()?)?,
        "the firewall let tcp 2222 through"
    );

    // One SSH round trip (connect, authenticate, run `true`), from the laptop.
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        ensure_ok("ssh true", &lab.ssh(0, "true")?)?;
        times.push(t.elapsed());
    }
    times.sort();
    eprintln!(
        "sshlab: ssh round trip min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );

    // The detached sleep lives in host 0, and the lab's mounts only in the hosts' own mount
    // namespaces.
    let sleeps = pids_running(host0_ns, &["sleep", "1000"]);
    ensure!(sleeps.len() == 1, "sleep 1000 in {host0_ns}: {sleeps:?}");
    let sleep = sleeps[0];
    let host_mount_ns: Vec<String> = (0..lab.hosts())
        .map(|i| mount_ns(lab.sshd_pid(i)).context("sshd's mount namespace"))
        .collect::<anyhow::Result<_>>()?;
    ensure!(mount_ns(sleep).as_ref() == Some(&host_mount_ns[0]));
    ensure!(host_mount_ns[0] != host_mount_ns[1]);
    ensure!(!host_mount_ns.contains(&mount_ns("self").context("own mount namespace")?));
    let own = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !own.contains(needle),
        "a lab mount is in the root mount namespace"
    );
    ensure!(
        mounts_mentioning(needle).len() >= HOST_DIRS.len() * lab.hosts(),
        "the hosts' bind mounts are not where expected"
    );

    Ok((sleep, host_mount_ns))
}
