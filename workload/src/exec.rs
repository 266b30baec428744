//! `uc exec`: a command run inside a workload, joined to whoever asked by two channels (input:
//! stdin, its end, terminal size; output: stdout, stderr, then the exit code). Runtimes make
//! the process their own way; [`spawn`] bridges a local process, on pipes or on a
//! pseudo-terminal, to the channels.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use tokio::sync::mpsc;

/// What the asker sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Vec<u8>),
    /// No more input (on a terminal: the end-of-file character).
    Eof,
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// What the command sends back; `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// On a pseudo-terminal of `rows` x `cols` (stdout and stderr are then one stream).
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// Extra environment (`K=V`), such as the asker's `TERM`.
    pub env: Vec<String>,
}

/// A new pseudo-terminal from the multiplexer `ptmx` (a container's own, so that its end is
/// a name under the container's /dev/pts): (controlling end, the command's end).
fn open_pty(ptmx: &std::path::Path, rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::unix::fs::OpenOptionsExt;
    let master: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(ptmx)?
        .into();
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = rustix::pty::ioctl_tiocgptpeer(
        &master,
        rustix::pty::OpenptFlags::RDWR | rustix::pty::OpenptFlags::NOCTTY,
    )?;
    resize(&master, rows, cols);
    Ok((master, slave))
}

/// A running command's two channels.
pub struct Exec {
    /// Its process (and process group) on this machine; 0 when an engine runs it.
    pub pid: u32,
    pub input: mpsc::Sender<ExecInput>,
    pub output: mpsc::Receiver<ExecOutput>,
}

/// The exit code of a finished child as a shell reports it (128 + signal).
fn code_of(s: std::io::Result<std::process::ExitStatus>) -> i32 {
    match s {
        Ok(s) => s.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
        }),
        Err(_) => 255,
    }
}

/// Copies a reader to the output channel until its end.
fn pump(mut r: impl Read, tx: mpsc::Sender<ExecOutput>, wrap: fn(Vec<u8>) -> ExecOutput) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.blocking_send(wrap(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts `cmd` and bridges it to channels. With `req.tty`, its stdin, stdout and stderr are
/// a new terminal of the multiplexer `ptmx`; the command should make it its controlling one
/// ([`enter`] does).
pub fn spawn(mut cmd: Command, req: &ExecRequest, ptmx: &std::path::Path) -> std::io::Result<Exec> {
    let pty = if req.tty {
        let (master, slave) = open_pty(ptmx, req.rows, req.cols)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        Some(master)
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own (on a terminal, `enter`'s session is one), to hang up.
            .process_group(0);
        None
    };
    let mut child = cmd.spawn()?;
    // The child holds the terminal's other end now.
    drop(cmd);
    let pid = child.id() as i32;
    // True while the child is not reaped, so that its pid is still its own: signals may go.
    let alive = Arc::new(Mutex::new(true));
    // When the asker is gone (or done), the command's process group is hung up: a session
    // leaves no shell or background child behind. (A group's id is not given to another
    // process while the group has members.)
    let hang_up = {
        let alive = alive.clone();
        move || {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGHUP);
            if *alive.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGHUP);
            }
        }
    };
    let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(64);
    let (out_tx, out_rx) = mpsc::channel::<ExecOutput>(64);
    let mut readers = Vec::new();
    match pty {
        Some(master) => {
            let reader = std::fs::File::from(master.try_clone()?);
            let mut w = std::fs::File::from(master.try_clone()?);
            let tx = out_tx.clone();
            readers.push(std::thread::spawn(move || {
                pump(reader, tx, ExecOutput::Stdout)
            }));
            std::thread::spawn(move || {
                while let Some(i) = in_rx.blocking_recv() {
                    let ok = match i {
                        ExecInput::Stdin(b) => w.write_all(&b).is_ok(),
                        // VEOF at the start of a line ends the input of a canonical reader.
                        ExecInput::Eof => w.write_all(b"\x04").is_ok(),
                        ExecInput::Resize { rows, cols } => {
                            resize(&master, rows, cols);
                            true
                        }
                    };
                    if !ok {
                        break;
                    }
                }
                hang_up();
            });
        }
        None => {
            let mut stdin = child.stdin.take();
            std::thread::spawn(move || {
                while let Some(i) = in_rx.blocking_recv() {
                    match i {
                        ExecInput::Stdin(b) => {
                            if let Some(s) = stdin.as_mut()
                                && s.write_all(&b).is_err()
                            {
                                stdin = None;
                            }
                        }
                        ExecInput::Eof => stdin = None,
                        ExecInput::Resize { .. } => {}
                    }
                }
                hang_up();
            });
            if let Some(o) = child.stdout.take() {
                let tx = out_tx.clone();
                readers.push(std::thread::spawn(move || pump(o, tx, ExecOutput::Stdout)));
            }
            if let Some(e) = child.stderr.take() {
                let tx = out_tx.clone();
                readers.push(std::thread::spawn(move || pump(e, tx, ExecOutput::Stderr)));
            }
        }
    }
    std::thread::spawn(move || {
        // Wait without reaping, mark it gone, then reap: no signal can reach a reused pid.
        let _ = waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        );
        *alive.lock().unwrap_or_else(|p| p.into_inner()) = false;
        let code = code_of(child.wait());
        // What is still in the pipes comes first; a background process that keeps them open
        // holds the exit code back for a second at most.
        let deadline = Instant::now() + Duration::from_secs(1);
        for r in &readers {
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = out_tx.blocking_send(ExecOutput::Exit(code));
    });
    Ok(Exec {
        pid: pid as u32,
        input: in_tx,
        output: out_rx,
    })
}

fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    let _ = rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    );
}

/// The prefix under which the command's environment reaches `ucd enter`, so that none of it
/// (`LD_PRELOAD`, `PATH`, ...) acts on the host programs before the container is entered.
pub const ENV_PREFIX: &str = "UC_EXEC_ENV_";

/// `ucd enter`: becomes a command in the container whose main process is `target`. It moves
/// itself into the workload's cgroups (the `cgroup.procs` files given), so that limits apply
/// and removing the workload ends it too; starts a session whose controlling terminal is its
/// stdin (with `tty`) or its own process group; enters the target's namespaces, root and
/// working directory; then runs `argv` with the environment it got under [`ENV_PREFIX`], and
/// returns its exit code. Must run single-threaded (entering a mount namespace requires it).
pub fn enter(
    target: u32,
    cgroup_procs: &[PathBuf],
    tty: bool,
    argv: &[String],
) -> Result<i32, String> {
    use std::os::unix::fs::MetadataExt;
    for p in cgroup_procs {
        let _ = std::fs::write(p, std::process::id().to_string());
    }
    if tty {
        let _ = rustix::process::setsid();
        let _ = rustix::process::ioctl_tiocsctty(std::io::stdin());
    } else {
        let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    }
    let proc = PathBuf::from(format!("/proc/{target}"));
    let err = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    // Everything is opened before the first setns: /proc/TARGET may not be reachable after.
    let root = std::fs::File::open(proc.join("root")).map_err(|e| err("opening its root", &e))?;
    let cwd = match (
        std::fs::read_link(proc.join("root")),
        std::fs::read_link(proc.join("cwd")),
    ) {
        (Ok(r), Ok(c)) => c
            .strip_prefix(&r)
            .map(|rel| Path::new("/").join(rel))
            .unwrap_or_else(|_| PathBuf::from("/")),
        _ => PathBuf::from("/"),
    };
    let mut namespaces = Vec::new();
    for (name, flag) in [
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let theirs = proc.join("ns").join(name);
        let (Ok(a), Ok(b)) = (
            std::fs::metadata(&theirs),
            std::fs::metadata(format!("/proc/self/ns/{name}")),
        ) else {
            continue;
        };
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            let f = std::fs::File::open(&theirs).map_err(|e| err(name, &e))?;
            namespaces.push((name, f, flag));
        }
    }
    for (name, f, flag) in &namespaces {
        setns(f, *flag).map_err(|e| err(&format!("entering its {name} namespace"), &e))?;
    }
    nix::unistd::fchdir(&root).map_err(|e| err("entering its root", &e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", &e))?;
    if std::env::set_current_dir(&cwd).is_err() {
        let _ = std::env::set_current_dir("/");
    }
    let env: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, v)| Some((k.strip_prefix(ENV_PREFIX)?.to_string(), v)))
        .collect();
    let (prog, args) = argv.split_first().ok_or("no command to run")?;
    // A child: only children enter the pid namespace.
    let status = Command::new(prog)
        .args(args)
        .env_clear()
        .envs(env)
        .status()
        .map_err(|e| err(&format!("running {prog}"), &e))?;
    Ok(code_of(Ok(status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(mut e: Exec) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(o) = e.output.recv().await {
            match o {
                ExecOutput::Stdout(b) => out.extend(b),
                ExecOutput::Stderr(b) => err.extend(b),
                ExecOutput::Exit(c) => return (out, err, c),
            }
        }
        panic!("no exit code")
    }

    #[tokio::test]
    async fn pipes_carry_stdin_stdout_stderr_and_the_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "read l; echo got $l; echo oops >&2; exit 3"]);
        let e = spawn(cmd, &ExecRequest::default(), Path::new("/dev/ptmx")).unwrap();
        e.input
            .send(ExecInput::Stdin(b"hello\n".to_vec()))
            .await
            .unwrap();
        e.input.send(ExecInput::Eof).await.unwrap();
        let (out, err, code) = collect(e).await;
        assert_eq!(out, b"got hello\n");
        assert_eq!(err, b"oops\n");
        assert_eq!(code, 3);
    }

    #[tokio::test]
    async fn the_command_is_hung_up_when_the_asker_goes_away() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let e = spawn(cmd, &ExecRequest::default(), Path::new("/dev/ptmx")).unwrap();
        let Exec { pid, input, output } = e;
        drop(input);
        let t = Instant::now();
        let (_, _, code) = collect(Exec {
            pid,
            input: mpsc::channel(1).0,
            output,
        })
        .await;
        assert_eq!(code, 128 + 1, "SIGHUP");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_background_child_holding_the_output_does_not_hold_the_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo started; exit 4"]);
        let e = spawn(cmd, &ExecRequest::default(), Path::new("/dev/ptmx")).unwrap();
        let t = Instant::now();
        let (pid, input) = (e.pid as i32, e.input.clone());
        let (out, _, code) = collect(e).await;
        assert_eq!((out.as_slice(), code), (&b"started\n"[..], 4));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(kill(Pid::from_raw(-pid), None).is_ok(), "the sleep runs on");
        // The session ends: the background sleep is hung up too.
        drop(input);
        let t = Instant::now();
        while kill(Pid::from_raw(-pid), None).is_ok() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the sleep was not hung up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_terminal_has_its_size_and_carries_input() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "stty size; tty -s && echo is-a-tty; read l; echo got $l",
        ]);
        let req = ExecRequest {
            tty: true,
            rows: 33,
            cols: 101,
            ..Default::default()
        };
        let e = spawn(cmd, &req, Path::new("/dev/ptmx")).unwrap();
        e.input
            .send(ExecInput::Stdin(b"typed\r".to_vec()))
            .await
            .unwrap();
        let (out, _, code) = collect(e).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(out.contains("is-a-tty"), "{out:?}");
        assert!(out.contains("got typed"), "{out:?}");
        assert_eq!(code, 0);
    }
}
