//! Running commands on another machine through the user's own OpenSSH client (`ssh`): their
//! `~/.ssh/config`, keys, agent and known hosts apply, as they do for git or docker contexts.
//! One master connection per `uc` command carries every step (ControlMaster), so each step costs
//! a round trip rather than a handshake.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt;

use crate::target::SshTarget;

/// How long one SSH connection attempt may take.
const CONNECT_TIMEOUT_SECS: u32 = 10;

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An SSH destination plus how to reach it.
#[derive(Clone, Debug)]
pub struct Ssh {
    pub target: SshTarget,
    key: Option<PathBuf>,
    /// Directory holding the ControlMaster socket, when multiplexing.
    control: Option<PathBuf>,
}

impl Ssh {
    pub fn new(target: SshTarget, key: Option<PathBuf>) -> Ssh {
        Ssh {
            target,
            key,
            control: None,
        }
    }

    /// Shares one connection among this value's commands until [`Ssh::close`].
    pub fn multiplexed(mut self) -> anyhow::Result<Ssh> {
        let dir = std::env::temp_dir().join(format!("uc-ssh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        self.control = Some(dir);
        Ok(self)
    }

    /// `ssh`'s arguments up to and including the destination.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        // Tests (and users with a dedicated config) point uc at another ssh_config.
        if let Some(cfg) = std::env::var_os("UC_SSH_CONFIG") {
            a.push("-F".into());
            a.push(cfg);
        }
        if let Some(k) = &self.key {
            a.extend([
                "-i".into(),
                k.into(),
                "-o".into(),
                "IdentitiesOnly=yes".into(),
            ]);
        }
        if let Some(p) = self.target.port {
            a.extend(["-p".into(), p.to_string().into()]);
        }
        for o in [
            "BatchMode=yes".to_string(),
            // A machine seen for the first time is trusted and remembered; a changed key is refused.
            "StrictHostKeyChecking=accept-new".to_string(),
            format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"),
            "ServerAliveInterval=5".to_string(),
            "ServerAliveCountMax=3".to_string(),
            "LogLevel=ERROR".to_string(),
        ] {
            a.extend(["-o".into(), o.into()]);
        }
        if let Some(dir) = &self.control {
            a.extend([
                "-o".into(),
                "ControlMaster=auto".into(),
                "-o".into(),
                format!("ControlPath={}/%C", dir.display()).into(),
                "-o".into(),
                "ControlPersist=60".into(),
            ]);
        }
        a.push(self.target.destination().into());
        a
    }

    /// The command that runs `script` with `sh` on the host, as root (through `sudo -n` when the
    /// SSH user is someone else and `sudo` is true).
    pub fn command(&self, script: &str, sudo: bool) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(self.args());
        cmd.arg("--");
        let remote = if sudo {
            format!("sudo -n sh -c {}", quote(script))
        } else {
            format!("sh -c {}", quote(script))
        };
        cmd.arg(remote);
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs `script` and waits for it, feeding `stdin` to it; fails only when ssh itself fails
    /// (exit 255): the script's own exit status is in the output.
    pub async fn run(
        &self,
        script: &str,
        sudo: bool,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = self.command(script, sudo);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("running ssh (install openssh-client)")?;
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().context("ssh's stdin")?;
            let data = data.to_vec();
            tokio::spawn(async move {
                let _ = pipe.write_all(&data).await;
                let _ = pipe.shutdown().await;
            });
        }
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .with_context(|| format!("{} did not answer within {timeout:?}", self.target))??;
        if out.status.code() == Some(255) {
            bail!("{}", ssh_failure(&self.target, &out.stderr));
        }
        Ok(out)
    }

    /// Like [`Ssh::run`], but a nonzero exit of the script is an error carrying its stderr.
    pub async fn run_ok(
        &self,
        what: &str,
        script: &str,
        sudo: bool,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let out = self.run(script, sudo, stdin, timeout).await?;
        if !out.status.success() {
            bail!(
                "{what} on {} failed: {}",
                self.target,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Ends the shared connection, if any.
    pub async fn close(&self) {
        if let Some(dir) = &self.control {
            let mut cmd = tokio::process::Command::new("ssh");
            cmd.args(self.args()).args(["-O", "exit"]);
            let _ = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What went wrong with ssh itself, from its stderr, in words a user can act on.
pub fn ssh_failure(target: &SshTarget, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("ssh exited with status 255");
    let hint = if text.contains("Permission denied") {
        "the host refused the SSH key: check the user, or pass the right one with --ssh-key"
    } else if text.contains("timed out")
        || text.contains("No route to host")
        || text.contains("Connection refused")
        || text.contains("Could not resolve")
        || text.contains("Network is unreachable")
    {
        "the host is not reachable over SSH from here: check the address and that sshd runs"
    } else if text.contains("Host key verification failed")
        || text.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
    {
        "the host's SSH key differs from the one in known_hosts: if the machine was reinstalled, remove the old key with ssh-keygen -R"
    } else {
        "ssh failed"
    };
    format!("cannot run commands on {target} over SSH: {hint} ({last})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote("it's $HOME `x`")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME `x`");
    }

    #[test]
    fn failures_are_explained() {
        let t: SshTarget = "root@h".parse().unwrap();
        let denied = ssh_failure(&t, b"root@h: Permission denied (publickey).\n");
        assert!(
            denied.contains("--ssh-key") && denied.contains("Permission denied"),
            "{denied}"
        );
        let gone = ssh_failure(
            &t,
            b"ssh: connect to host h port 22: Connection timed out\n",
        );
        assert!(gone.contains("not reachable"), "{gone}");
    }
}
