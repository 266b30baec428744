//! Shared pieces of uc's benchmarks.

use std::os::unix::process::CommandExt;
use std::path::Path;

/// Replaces the section between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// of the Markdown file at `path` with `section` (which carries the markers),
/// or appends it.
pub fn splice(path: &Path, name: &str, section: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let (b, e) = (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    );
    let new = match (old.find(&b), old.find(&e)) {
        (Some(a), Some(z)) if z > a => format!("{}{}{}", &old[..a], section, &old[z + e.len()..]),
        _ => format!("{}\n\n{}\n", old.trim_end(), section),
    };
    std::fs::write(path, new)
}

/// The `p`-th percentile (nearest rank) of `v`; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The directory holding release builds of `ucd` and `uc`, made absolute.
pub fn bin_dir(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    std::fs::canonicalize(dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "{} (build with cargo build --release first): {e}",
                dir.display()
            ),
        )
    })
}

/// Whether `bin` is on PATH.
pub fn have(bin: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU time (user + system) of process `pid` so far, in seconds.
pub fn cpu_secs(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::other(format!("unexpected /proc/{pid}/stat"));
    let after = &stat[stat.rfind(')').ok_or_else(bad)? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
    // Clock ticks are 1/100 s on Linux.
    Ok((t(11)? + t(12)?) as f64 / 100.0)
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Today's date and time, for the figures' heading.
pub fn date_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A child process killed (and reaped) when dropped. Started by [`spawn_pinned`], it leads a
/// process group of its own, and the whole group is killed: nginx's workers outlive a killed
/// master and would keep its port.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `argv` pinned to CPU `core` (taskset, which execs it: the child's pid is the
/// program's), with `env` added and its output discarded.
pub fn spawn_pinned(core: &str, argv: &[&str], env: &[(&str, &str)]) -> std::io::Result<Killed> {
    let mut c = std::process::Command::new("taskset");
    c.args(["-c", core])
        .args(argv)
        .process_group(0)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c.spawn()
        .map(Killed)
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting {argv:?}: {e}")))
}

/// Resident memory of the processes in process group `pgid` (a [`spawn_pinned`] child and the
/// workers it forks), in MB.
pub fn rss_group_mb(pgid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // Field 5 of /proc/PID/stat, after the parenthesised command name.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .map(rss_mb)
        .sum()
}

/// Resident memory of process `pid` in MB (0 when it cannot be read).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn splice_replaces_only_its_section() {
        let dir = std::env::temp_dir().join(format!("uc-bench-splice-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("b.md");
        std::fs::write(&p, "# B\n\n<!-- x:begin -->old<!-- x:end -->\n\nkeep\n").unwrap();
        splice(&p, "x", "<!-- x:begin -->new<!-- x:end -->").unwrap();
        splice(&p, "y", "<!-- y:begin -->why<!-- y:end -->").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(
            s.contains("new") && !s.contains("old") && s.contains("keep") && s.contains("why"),
            "{s}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
