//! `uc exec [-i] [-t] SVC CMD...`: runs a command in a container of a service, wherever it
//! runs, with this terminal's input and output. The exit code is the command's.

use std::io::{IsTerminal, Read, Write};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uc_proto::v1::{ExecInput, ExecStart, TermSize, exec_input, exec_output};

use crate::client::{Api, status_error};

/// The terminal's size, if stdin is one.
fn term_size() -> Option<TermSize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdin()).ok()?;
    (ws.ws_row > 0).then_some(TermSize {
        rows: ws.ws_row.into(),
        cols: ws.ws_col.into(),
    })
}

/// Puts the terminal in raw mode while it lives (keys go to the remote terminal as typed).
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

fn input(msg: exec_input::Msg) -> ExecInput {
    ExecInput { msg: Some(msg) }
}

/// Runs the command; returns its exit code.
pub async fn exec(
    api: &mut Api,
    service: String,
    container: Option<String>,
    interactive: bool,
    tty: bool,
    argv: Vec<String>,
) -> anyhow::Result<i32> {
    let size = if tty { term_size() } else { None };
    let env = if tty {
        vec![format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        )]
    } else {
        Vec::new()
    };
    let (tx, rx) = mpsc::channel::<ExecInput>(64);
    tx.send(input(exec_input::Msg::Start(ExecStart {
        service,
        container_id: container.unwrap_or_default(),
        argv,
        tty,
        size,
        env,
    })))
    .await?;
    if interactive {
        // Blocking reads on a thread of their own; at our exit it simply ends with us.
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(input(exec_input::Msg::StdinEof(true)));
                        return;
                    }
                    Ok(n) => {
                        if tx
                            .blocking_send(input(exec_input::Msg::Stdin(buf[..n].to_vec())))
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    } else if !tty {
        tx.send(input(exec_input::Msg::StdinEof(true))).await?;
    }
    if tty {
        // The remote terminal follows this one's size.
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(s) = term_size()
                    && tx.send(input(exec_input::Msg::Resize(s))).await.is_err()
                {
                    return;
                }
            }
        });
    }
    let mut out = api
        .exec(ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let _raw = (tty && interactive && std::io::stdin().is_terminal())
        .then(RawMode::enter)
        .flatten();
    let mut code = None;
    while let Some(m) = out.message().await.map_err(status_error)? {
        match m.msg {
            Some(exec_output::Msg::Stdout(b)) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            Some(exec_output::Msg::Stderr(b)) => {
                let mut e = std::io::stderr().lock();
                e.write_all(&b)?;
                e.flush()?;
            }
            Some(exec_output::Msg::ExitCode(c)) => code = Some(c),
            None => {}
        }
    }
    drop(tx);
    code.ok_or_else(|| {
        anyhow::anyhow!("the command's machine ended the session without its exit code")
    })
}
