//! The shim (`ucd shim`): one small process per running workload, in its own
//! session and cgroup, that outlives the agent. It starts the workload's
//! process, writes its output to `DIR/log` a line at a time with the time and
//! the stream, and writes how it ended to `DIR/exit`. The agent (a new one
//! after a restart, too) learns everything from these files and the pids in
//! `DIR/shim.pid` and `DIR/pid`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

/// How a workload's process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; 128 + N for a signal N.
    pub code: i32,
    pub at_ms: u64,
}

/// A log bigger than this is moved to `log.1` (one generation is kept).
pub const LOG_MAX_BYTES: u64 = 8 << 20;

pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("log")
}
pub fn exit_path(dir: &Path) -> PathBuf {
    dir.join("exit")
}
pub fn shim_pid_path(dir: &Path) -> PathBuf {
    dir.join("shim.pid")
}
pub fn child_pid_path(dir: &Path) -> PathBuf {
    dir.join("pid")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data)?;
    fs::rename(tmp, path)
}

/// What the shim is told.
#[derive(Clone, Debug)]
pub struct ShimArgs {
    pub dir: PathBuf,
    /// The workload's id: its cgroup is `uc/<id>`.
    pub id: String,
    pub memory: Option<u64>,
    pub cpu: Option<f64>,
    pub argv: Vec<String>,
    /// Start a session and move into the workload's cgroups (what `ucd shim`
    /// does; off only in tests that run the shim inside the test process).
    pub isolate: bool,
}

enum Line {
    Out(String),
    Err(String),
}

/// Runs the shim; returns the workload's exit code.
pub fn run(a: &ShimArgs) -> i32 {
    let me = std::process::id();
    let log_file = log_path(&a.dir);
    let mut log = Log::open(&log_file);
    if a.isolate {
        let _ = nix::unistd::setsid();
        for p in crate::cgroup::enter(&a.id, me, a.memory, a.cpu) {
            log.line('s', &format!("uc: cgroup: {p}"));
        }
    }
    let _ = fs::remove_file(exit_path(&a.dir));
    let _ = write_atomic(&shim_pid_path(&a.dir), me.to_string().as_bytes());
    let Some((prog, args)) = a.argv.split_first() else {
        log.line('s', "uc: no command to run");
        return finish(a, &mut log, 127);
    };
    let child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            log.line('s', &format!("uc: starting {prog}: {e}"));
            return finish(a, &mut log, 127);
        }
    };
    let _ = write_atomic(&child_pid_path(&a.dir), child.id().to_string().as_bytes());
    let (tx, rx) = mpsc::channel();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    .filter_map(|(i, s)| {
        let s = s?;
        let tx = tx.clone();
        Some(std::thread::spawn(move || {
            let mut r = BufReader::new(s);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned();
                        let line = if i == 0 {
                            Line::Out(text)
                        } else {
                            Line::Err(text)
                        };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        }))
    })
    .collect();
    drop(tx);
    for line in rx {
        match line {
            Line::Out(t) => log.line('o', &t),
            Line::Err(t) => log.line('e', &t),
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let code = match child.wait() {
        Ok(s) => s.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
        }),
        Err(_) => 255,
    };
    finish(a, &mut log, code)
}

fn finish(a: &ShimArgs, log: &mut Log, code: i32) -> i32 {
    log.line('s', &format!("uc: exited with code {code}"));
    let status = ExitStatus {
        code,
        at_ms: now_ms(),
    };
    let _ = write_atomic(
        &exit_path(&a.dir),
        &serde_json::to_vec(&status).expect("status serializes"),
    );
    if a.isolate {
        crate::cgroup::leave(&a.id, std::process::id());
        crate::cgroup::remove(&a.id);
    }
    code
}

/// The workload's log: `<unix ms> <o|e|s> <text>` per line; `s` lines are uc's own.
struct Log {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl Log {
    fn open(path: &Path) -> Log {
        let file = OpenOptions::new().create(true).append(true).open(path).ok();
        let size = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        Log {
            path: path.to_owned(),
            file,
            size,
        }
    }

    fn line(&mut self, stream: char, text: &str) {
        if self.size > LOG_MAX_BYTES {
            let _ = fs::rename(&self.path, self.path.with_extension("1"));
            *self = Log::open(&self.path);
        }
        let rec = format!("{} {stream} {text}\n", now_ms());
        if let Some(f) = self.file.as_mut()
            && f.write_all(rec.as_bytes()).is_ok()
        {
            self.size += rec.len() as u64;
        }
    }
}

/// One line of a workload's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub at_ms: u64,
    /// `o` stdout, `e` stderr, `s` uc.
    pub stream: char,
    pub text: String,
}

pub fn parse_log_line(l: &str) -> Option<LogLine> {
    let (ts, rest) = l.split_once(' ')?;
    let at_ms = ts.parse().ok()?;
    let mut chars = rest.chars();
    let stream = chars.next()?;
    let text = chars.as_str().strip_prefix(' ').unwrap_or("").to_owned();
    Some(LogLine {
        at_ms,
        stream,
        text,
    })
}

/// The last `n` lines of the workload's log (the previous generation too, when needed).
pub fn tail(dir: &Path, n: usize) -> Vec<LogLine> {
    let read = |p: PathBuf| -> Vec<LogLine> {
        fs::read_to_string(p)
            .map(|t| t.lines().filter_map(parse_log_line).collect())
            .unwrap_or_default()
    };
    let mut lines = read(log_path(dir));
    if lines.len() < n {
        let mut older = read(log_path(dir).with_extension("1"));
        older.append(&mut lines);
        lines = older;
    }
    let skip = lines.len().saturating_sub(n);
    lines.split_off(skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_parse() {
        assert_eq!(
            parse_log_line("17 o hello world"),
            Some(LogLine {
                at_ms: 17,
                stream: 'o',
                text: "hello world".into()
            })
        );
        assert_eq!(parse_log_line("17 e").unwrap().text, "");
        assert_eq!(parse_log_line("x o hi"), None);
    }

    #[test]
    fn shim_runs_a_process_and_records_output_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let a = ShimArgs {
            dir: dir.path().to_owned(),
            id: format!("test-shim-{}", std::process::id()),
            memory: None,
            cpu: None,
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 3".into(),
            ],
            isolate: false,
        };
        assert_eq!(run(&a), 3);
        let lines = tail(dir.path(), 10);
        assert!(
            lines.iter().any(|l| l.stream == 'o' && l.text == "out"),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.stream == 'e' && l.text == "err"),
            "{lines:?}"
        );
        let exit: ExitStatus =
            serde_json::from_slice(&fs::read(exit_path(dir.path())).unwrap()).unwrap();
        assert_eq!(exit.code, 3);
        assert_eq!(tail(dir.path(), 1).len(), 1);
        let missing = ShimArgs {
            argv: vec!["/nonexistent/x".into()],
            ..a
        };
        assert_eq!(run(&missing), 127);
    }
}
