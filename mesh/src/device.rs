//! WireGuard devices behind one trait. The userspace backend runs
//! boringtun in this process: it creates a TUN device in the calling
//! thread's network namespace, runs its own worker threads, and is
//! configured over a socket pair with the UAPI text protocol (no socket
//! file, so several agents on one host never collide).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use boringtun::device::{DeviceConfig, DeviceHandle};

use crate::diff::PeerOp;
use crate::keys::PrivateKey;
use crate::uapi::{self, UapiError};
pub use crate::uapi::{DeviceStatus, PeerStatus};

/// Which WireGuard implementation carries the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Kernel => "kernel",
            Backend::Userspace => "userspace (boringtun)",
        }
    }
}

/// A device that failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating WireGuard interface {name}: {message}")]
    Create { name: String, message: String },
    #[error("talking to WireGuard interface {name}: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
    #[error("WireGuard interface {name}: {source}")]
    Uapi { name: String, source: UapiError },
}

/// A WireGuard interface whose peers can be changed one by one.
pub trait MeshDevice: Send {
    fn backend(&self) -> Backend;
    /// Applies peer changes; peers not named are left alone.
    fn apply(&mut self, ops: &[PeerOp]) -> Result<(), DeviceError>;
    fn status(&mut self) -> Result<DeviceStatus, DeviceError>;
}

/// boringtun in this process.
pub struct UserspaceDevice {
    name: String,
    uapi: BufReader<UnixStream>,
    // Dropped last: stops boringtun's threads.
    _handle: DeviceHandle,
}

impl UserspaceDevice {
    /// Creates the TUN interface `name` in this thread's network namespace
    /// with `private` as its key, listening on `listen_port` (UDP, all
    /// addresses). Addresses and link state are [`crate::netlink`]'s job.
    pub fn create(
        name: &str,
        private: &PrivateKey,
        listen_port: u16,
        threads: usize,
    ) -> Result<Self, DeviceError> {
        let err = |message: String| DeviceError::Create {
            name: name.to_string(),
            message,
        };
        let (ours, theirs) = UnixStream::pair().map_err(|e| err(format!("socket pair: {e}")))?;
        let config = DeviceConfig {
            n_threads: threads.max(1),
            use_connected_socket: true,
            use_multi_queue: threads > 1,
            // boringtun owns this end from now on.
            uapi_fd: theirs.into_raw_fd(),
        };
        let handle = DeviceHandle::new(name, config).map_err(|e| err(format!("{e:?}")))?;
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| err(e.to_string()))?;
        let mut dev = UserspaceDevice {
            name: name.to_string(),
            uapi: BufReader::new(ours),
            _handle: handle,
        };
        dev.set(&uapi::render_device(private, listen_port))
            .map_err(|e| match e {
                DeviceError::Uapi {
                    source: UapiError::Errno(98),
                    ..
                } => err(format!("UDP port {listen_port} is taken")),
                e => e,
            })?;
        Ok(dev)
    }

    /// Sends one `set` request and checks its answer.
    fn set(&mut self, text: &str) -> Result<(), DeviceError> {
        let answer = self.request(text)?;
        uapi::parse_set(&answer).map_err(|source| DeviceError::Uapi {
            name: self.name.clone(),
            source,
        })
    }

    /// Sends one request and reads the answer up to the blank line after
    /// its `errno=` line.
    fn request(&mut self, text: &str) -> Result<String, DeviceError> {
        let io = |source| DeviceError::Io {
            name: self.name.clone(),
            source,
        };
        self.uapi.get_mut().write_all(text.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        let mut seen_errno = false;
        loop {
            let mut line = String::new();
            let n = self
                .uapi
                .read_line(&mut line)
                .map_err(|source| DeviceError::Io {
                    name: self.name.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(DeviceError::Uapi {
                    name: self.name.clone(),
                    source: UapiError::Closed,
                });
            }
            if line.starts_with("errno=") {
                seen_errno = true;
            }
            let blank = line == "\n";
            answer.push_str(&line);
            if seen_errno && blank {
                return Ok(answer);
            }
        }
    }
}

impl MeshDevice for UserspaceDevice {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn apply(&mut self, ops: &[PeerOp]) -> Result<(), DeviceError> {
        if ops.is_empty() {
            return Ok(());
        }
        // boringtun panics when asked to add a peer it already has: remove
        // such a peer first, whatever our own bookkeeping believes.
        let present: BTreeSet<_> = self
            .status()?
            .peers
            .into_iter()
            .map(|p| p.public_key)
            .collect();
        let mut removed = BTreeSet::new();
        let mut safe = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                PeerOp::Remove(k) => {
                    removed.insert(*k);
                    safe.push(op.clone());
                }
                PeerOp::Add(k, _) => {
                    if present.contains(k) && !removed.contains(k) {
                        safe.push(PeerOp::Remove(*k));
                        removed.insert(*k);
                    }
                    safe.push(op.clone());
                }
            }
        }
        // One request per change: boringtun 0.7 carries `remove`, `endpoint`
        // and the keepalive over from one peer section of a request to the
        // next, so a removal followed by an addition in one request would
        // remove twice.
        for op in &safe {
            self.set(&uapi::render_ops(std::slice::from_ref(op)))?;
        }
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus, DeviceError> {
        let answer = self.request("get=1\n\n")?;
        uapi::parse_get(&answer).map_err(|source| DeviceError::Uapi {
            name: self.name.clone(),
            source,
        })
    }
}
