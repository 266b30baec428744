//! Network namespaces: creating and deleting them, running code inside one, and sweeping away
//! the leftovers of test runs that died before they could clean up.
//!
//! Names: a cluster's hub is `uch-<tag>`, its machines `ucm-<tag>-<index>`. Test clusters use the
//! tag `<pid>x<counter>`, so a namespace whose pid is no longer alive belongs to a dead run.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::{ip, run_with_timeout};

pub const HUB_PREFIX: &str = "uch-";
pub const MACHINE_PREFIX: &str = "ucm-";

/// The hub namespace name of a cluster tag.
pub fn hub_name(tag: &str) -> String {
    format!("{HUB_PREFIX}{tag}")
}

/// The namespace name of machine `index` of a cluster tag.
pub fn machine_ns_name(tag: &str, index: usize) -> String {
    format!("{MACHINE_PREFIX}{tag}-{index}")
}

/// Names of all network namespaces on this host.
pub fn list() -> anyhow::Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Creates namespace `name` with its loopback up.
pub fn add(name: &str) -> anyhow::Result<()> {
    if Path::new("/run/netns").join(name).exists() {
        bail!(
            "network namespace {name} already exists (a leftover of an earlier run? remove it with `ip netns del {name}`)"
        );
    }
    ip(&["netns", "add", name]).with_context(|| format!("creating network namespace {name}"))?;
    if let Err(e) = ip(&["-n", name, "link", "set", "lo", "up"]) {
        let _ = delete(name);
        return Err(e);
    }
    Ok(())
}

/// Pids of the processes inside namespace `name` (empty if it does not exist).
pub fn pids(name: &str) -> Vec<i32> {
    let Ok(out) = run_with_timeout(
        std::process::Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(10),
    ) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILLs every process inside namespace `name`.
pub fn kill_all(name: &str) {
    for pid in pids(name) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Kills the processes in namespace `name` and deletes it; fine if it is already gone.
pub fn delete(name: &str) -> anyhow::Result<()> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    kill_all(name);
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        Err(_) if !Path::new("/run/netns").join(name).exists() => Ok(()),
        Err(e) => Err(e.context(format!("deleting network namespace {name}"))),
    }
}

/// Runs `f` on a thread that has entered namespace `ns`: sockets it creates live in that namespace.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || -> anyhow::Result<T> {
            // Only this short-lived thread switches namespace; it ends with `f`.
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the closure run in namespace {ns} panicked"))?
    })
}

/// The pid in a test tag `<pid>x<counter>`, if it is one.
pub fn tag_pid(tag: &str) -> Option<i32> {
    let (pid, counter) = tag.split_once('x')?;
    counter.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// The tag of a hub or machine namespace name made by this crate.
pub fn tag_of(ns: &str) -> Option<&str> {
    if let Some(tag) = ns.strip_prefix(HUB_PREFIX) {
        return Some(tag);
    }
    let rest = ns.strip_prefix(MACHINE_PREFIX)?;
    let (tag, index) = rest.rsplit_once('-')?;
    index.parse::<usize>().ok()?;
    Some(tag)
}

/// Whether process `pid` is alive (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Removes namespaces (and their processes) and directories under `dirs_root` left by test runs whose
/// process is gone. Returns the namespaces it removed.
pub fn sweep_stale(dirs_root: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in list()? {
        let Some(pid) = tag_of(&ns).and_then(tag_pid) else {
            continue;
        };
        if !alive(pid) {
            delete(&ns)?;
            removed.push(ns);
        }
    }
    if let Ok(entries) = std::fs::read_dir(dirs_root) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(tag_pid) else {
                continue;
            };
            if !alive(pid) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(removed)
}

/// The directory test clusters keep their files in: `$UC_E2E_DIR`, else `/var/tmp/uc-e2e`
/// (not /tmp: something on these machines cleans /tmp while apt runs).
pub fn default_root() -> PathBuf {
    std::env::var_os("UC_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/uc-e2e"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(tag_of(&hub_name("12x3")), Some("12x3"));
        assert_eq!(tag_of(&machine_ns_name("12x3", 14)), Some("12x3"));
        assert_eq!(tag_of(&machine_ns_name("local", 0)), Some("local"));
        assert_eq!(tag_of("other-ns"), None);
        assert_eq!(tag_pid("12x3"), Some(12));
        assert_eq!(tag_pid("local"), None);
        assert_eq!(tag_pid("12x"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
    }
}
