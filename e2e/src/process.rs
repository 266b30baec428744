//! Running short helper commands (`ip`, `uc`) with a deadline, and finding the `ucd` and `uc` binaries.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured; kills it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_with_input(cmd, None, timeout)
}

/// [`run_with_timeout`], with `input` (if any) written to the child's stdin, which then ends.
pub fn run_with_input(
    cmd: &mut Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        });
    }
    // Read both pipes on their own threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take().context("stdout was piped")?;
    let mut err = child.stderr.take().context("stderr was piped")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            // Not reaped yet, so the pid is still this child's.
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` like [`run_with_timeout`] and fails, quoting its stderr, unless it exits with 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let out = run_with_timeout(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip ARGS...` and fails with its stderr unless it succeeds.
pub fn ip(args: &[&str]) -> anyhow::Result<Output> {
    run_ok(Command::new("ip").args(args), Duration::from_secs(20))
}

/// Where the `ucd` and `uc` binaries are.
#[derive(Clone, Debug)]
pub struct Bins {
    pub ucd: PathBuf,
    pub uc: PathBuf,
}

impl Bins {
    /// `explicit` if given, else `$UC_BIN_DIR`, else the directory of the running executable if it
    /// holds `ucd`, else its parent (tests run from `target/debug/deps`, binaries are in `target/debug`).
    pub fn find(explicit: Option<&Path>) -> anyhow::Result<Bins> {
        let dir = match explicit {
            Some(d) => d.to_path_buf(),
            None => match std::env::var_os("UC_BIN_DIR") {
                Some(d) => PathBuf::from(d),
                None => {
                    let exe = std::env::current_exe().context("finding the current executable")?;
                    let here = exe
                        .parent()
                        .context("the current executable has no directory")?
                        .to_path_buf();
                    if here.join("ucd").is_file() {
                        here
                    } else {
                        here.parent().map(Path::to_path_buf).unwrap_or(here)
                    }
                }
            },
        };
        let bins = Bins {
            ucd: dir.join("ucd"),
            uc: dir.join("uc"),
        };
        for b in [&bins.ucd, &bins.uc] {
            if !b.is_file() {
                bail!(
                    "{} not found (set UC_BIN_DIR, or run `cargo build --workspace --bins` first)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// Loads nftables `ruleset` into network namespace `ns` (`nft -f -`).
pub fn nft(ns: &str, ruleset: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (install the nftables package)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
