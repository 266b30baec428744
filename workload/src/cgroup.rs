//! A cgroup per workload, `uc/<id>`, in every hierarchy that is mounted
//! (cgroup v2, or v1 and hybrid): it keeps workloads apart from each other
//! and from the agent (a restarted agent's unit does not take them along),
//! carries the memory and CPU limits, and lets `uc rm` kill everything a
//! workload started.

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// The directories of workload `id`, one per hierarchy; the first is the one
/// to read processes from.
pub fn dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.join("uc").join(id)];
    }
    ["systemd", "unified", "memory", "cpu,cpuacct", "cpu", "pids"]
        .iter()
        .map(|h| root.join(h))
        .filter(|h| h.join("cgroup.procs").exists())
        .map(|h| h.join("uc").join(id))
        .collect()
}

/// Moves `pid` into workload `id`'s cgroups, creating them, and sets its
/// limits. Returns what could not be done (the workload runs anyway).
pub fn enter(id: &str, pid: u32, memory: Option<u64>, cpu: Option<f64>) -> Vec<String> {
    let mut problems = Vec::new();
    let v2 = Path::new(ROOT).join("cgroup.controllers").exists();
    if v2 {
        // Let the uc subtree use the memory and cpu controllers.
        let _ = fs::create_dir_all(Path::new(ROOT).join("uc"));
        for parent in [Path::new(ROOT).to_owned(), Path::new(ROOT).join("uc")] {
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
        }
    }
    for dir in dirs(id) {
        if let Err(e) = fs::create_dir_all(&dir) {
            problems.push(format!("creating {}: {e}", dir.display()));
            continue;
        }
        let hier = dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new(ROOT));
        let name = hier.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(m) = memory {
            let (file, value) = if v2 {
                ("memory.max", m.to_string())
            } else {
                ("memory.limit_in_bytes", m.to_string())
            };
            if (v2 || name == "memory")
                && let Err(e) = fs::write(dir.join(file), value)
            {
                problems.push(format!("setting {}/{file}: {e}", dir.display()));
            }
        }
        if let Some(c) = cpu {
            let quota = (c * 100_000.0).round().max(1000.0) as u64;
            let r = if v2 {
                Some(fs::write(dir.join("cpu.max"), format!("{quota} 100000")))
            } else if name.starts_with("cpu") {
                Some(fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()))
            } else {
                None
            };
            if let Some(Err(e)) = r {
                problems.push(format!("setting the CPU limit in {}: {e}", dir.display()));
            }
        }
        if let Err(e) = fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            problems.push(format!("joining {}: {e}", dir.display()));
        }
    }
    problems
}

/// Every process in workload `id`'s cgroup, its children's included.
pub fn pids(id: &str) -> Vec<i32> {
    let mut out = Vec::new();
    if let Some(dir) = dirs(id).into_iter().find(|d| d.exists()) {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
    }
    out
}

/// Moves `pid` back to the root cgroups (so its own can be removed).
pub fn leave(id: &str, pid: u32) {
    for dir in dirs(id) {
        if let Some(hier) = dir.parent().and_then(Path::parent) {
            let _ = fs::write(hier.join("cgroup.procs"), pid.to_string());
        }
    }
}

/// Removes workload `id`'s cgroups, children first (nspawn leaves `payload`
/// and `supervisor` behind). Ones that still hold processes stay.
pub fn remove(id: &str) {
    for dir in dirs(id) {
        remove_tree(&dir);
    }
}

fn remove_tree(d: &Path) {
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                remove_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(d);
}
