//! Removes what an agent's workloads left on the host when a test cluster
//! ends: their processes (found through their cgroups and pid files), the
//! overlay and network-namespace mounts under the agent's data directory,
//! and their cgroups. The agent is killed first, so nothing makes more.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Stops every workload of the agent whose data directory is `data_dir` and
/// unmounts everything under it. Returns what it could not do.
pub fn cleanup(data_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let root = data_dir.join("workloads");
    let ids: Vec<String> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Politely first: nspawn stops its container on SIGTERM.
    for id in &ids {
        if let Some(pid) = read_pid(&root.join(id).join("pid")) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for id in &ids {
        loop {
            let pids = uc_workload::cgroup::pids(id);
            if pids.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for p in pids {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
            if Instant::now() >= deadline + Duration::from_secs(3) {
                problems.push(format!("workload {id} still has processes"));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(pid) = read_pid(&root.join(id).join("shim.pid"))
            && std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(id.as_str()))
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        uc_workload::cgroup::remove(id);
        let _ = std::fs::remove_file(format!("/run/uc/vm/{id}.qmp"));
    }
    problems.extend(unmount_all_under(data_dir));
    problems
}

/// Unmounts every mount under `dir`, deepest first; says what it could not.
pub fn unmount_all_under(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        if let Err(e) = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH) {
            problems.push(format!("unmounting {m}: {e}"));
        }
    }
    problems
}

/// The demo image tarball: `$UC_DEMO_IMAGE`, else built once by
/// `scripts/demo-image.sh` under the system's temporary directory.
pub fn demo_image() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("UC_DEMO_IMAGE") {
        return Ok(p.into());
    }
    let out = std::env::temp_dir().join("uc-e2e-demo-image.tar");
    if out.exists() {
        return Ok(out);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo-image.sh");
    crate::process::run_ok(
        std::process::Command::new(&script).arg(&out),
        Duration::from_secs(300),
    )?;
    Ok(out)
}

/// Mounts under `dir`, as /proc/self/mountinfo lists them.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let Some(prefix) = dir.to_str() else {
        return Vec::new();
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me)
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                })
                .collect()
        })
        .unwrap_or_default()
}
