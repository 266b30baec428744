//! `uc exec`: a command run inside a workload, joined to whoever asked by two channels (input:
//! stdin, its end, terminal size; output: stdout, stderr, then the exit code). Runtimes make
//! the process their own way; [`spawn`] bridges a local process, on pipes or on a
//! pseudo-terminal, to the channels.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

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
            .stderr(Stdio::piped());
        None
    };
    let mut child = cmd.spawn()?;
    // The child holds the terminal's other end now.
    drop(cmd);
    let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(64);
    let (out_tx, out_rx) = mpsc::channel::<ExecOutput>(64);
    let mut readers = Vec::new();
    match pty {
        Some(master) => {
            let reader = std::fs::File::from(master.try_clone()?);
            let tx = out_tx.clone();
            readers.push(std::thread::spawn(move || {
                pump(reader, tx, ExecOutput::Stdout)
            }));
            std::thread::spawn(move || {
                let mut w = std::fs::File::from(master.try_clone().expect("dup of the pty"));
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
                        return;
                    }
                }
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
        for r in readers {
            let _ = r.join();
        }
        let code = code_of(child.wait());
        let _ = out_tx.blocking_send(ExecOutput::Exit(code));
    });
    Ok(Exec {
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

/// What `ucd enter` does, in the process a command runs as: moves itself into the workload's
/// cgroups (writing its pid to each `cgroup.procs` given), so that limits apply to the command
/// and removing the workload ends it too; on a terminal, starts a session whose controlling
/// terminal is its stdin; then becomes `argv`. Returns only if that fails.
pub fn enter(cgroup_procs: &[std::path::PathBuf], tty: bool, argv: &[String]) -> std::io::Error {
    for p in cgroup_procs {
        let _ = std::fs::write(p, std::process::id().to_string());
    }
    if tty {
        let _ = rustix::process::setsid();
        let _ = rustix::process::ioctl_tiocsctty(std::io::stdin());
    }
    let Some((prog, args)) = argv.split_first() else {
        return std::io::Error::other("no command to run");
    };
    Command::new(prog).args(args).exec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
