//! Files the host writes into a container's root filesystem (its host name, resolv.conf,
//! root's SSH keys) before it starts. Images come from users and may hold any symlink: an
//! image whose `/etc` points at `/etc`, or whose `/root/.ssh/authorized_keys` points at
//! `/etc/shadow`, must not make the agent write, or read, the host's own files. Every path is
//! therefore resolved inside the container's root (`openat2` with `RESOLVE_IN_ROOT`), the way
//! the container itself would see it.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, mkdirat, openat2, unlinkat};
use rustix::io::Errno;

/// The most [`Root::read`] reads.
pub const MAX_READ: u64 = 1 << 20;

/// A container's root directory, opened once.
pub struct Root(OwnedFd);

fn open_in(root: &OwnedFd, rel: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
    openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        mode,
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// `a/b/c` into (`a/b`, `c`); `c` into (`.`, `c`).
fn split(rel: &str) -> (&str, &str) {
    let rel = rel.trim_matches('/');
    match rel.rsplit_once('/') {
        Some((dir, name)) => (dir, name),
        None => (".", rel),
    }
}

impl Root {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let fd = rustix::fs::open(
            dir,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self(fd))
    }

    /// Makes directory `rel` and its parents (each new one with `mode`), inside the root.
    pub fn mkdir_all(&self, rel: &str, mode: u32) -> std::io::Result<()> {
        let mut done = String::new();
        for part in rel.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            let parent = if done.is_empty() { "." } else { done.as_str() };
            let dir = open_in(
                &self.0,
                parent,
                OFlags::DIRECTORY | OFlags::PATH,
                Mode::empty(),
            )?;
            match mkdirat(&dir, part, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            if !done.is_empty() {
                done.push('/');
            }
            done.push_str(part);
        }
        // What is there must be a directory (a symlink to one, inside the root, is fine).
        open_in(
            &self.0,
            rel,
            OFlags::DIRECTORY | OFlags::PATH,
            Mode::empty(),
        )?;
        Ok(())
    }

    /// Sets the mode of `rel` (resolved inside the root).
    pub fn chmod(&self, rel: &str, mode: u32) -> std::io::Result<()> {
        let fd = open_in(&self.0, rel, OFlags::RDONLY, Mode::empty())?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        Ok(())
    }

    /// The text of `rel`, or `None` if there is no such file. Only a regular file of at most
    /// [`MAX_READ`] bytes is read: an image's FIFO or device there must not block the agent.
    pub fn read(&self, rel: &str) -> std::io::Result<Option<String>> {
        let fd = match open_in(
            &self.0,
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(std::io::Error::other("not a regular file"));
        }
        if st.st_size as u64 > MAX_READ {
            return Err(std::io::Error::other(format!(
                "larger than {MAX_READ} bytes"
            )));
        }
        let mut s = String::new();
        std::fs::File::from(fd)
            .take(MAX_READ)
            .read_to_string(&mut s)?;
        Ok(Some(s))
    }

    /// Replaces `rel` with a new regular file holding `data`, with `mode`. Whatever was there
    /// (a file, or a symlink the image shipped: `/etc/resolv.conf` often is one) goes first.
    pub fn write(&self, rel: &str, data: &[u8], mode: u32) -> std::io::Result<()> {
        let (dir, name) = split(rel);
        let dir = open_in(
            &self.0,
            dir,
            OFlags::DIRECTORY | OFlags::PATH,
            Mode::empty(),
        )?;
        match unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = openat2(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        )?;
        // The umask must not narrow what was asked for.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        std::fs::File::from(fd).write_all(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("uc-rootfs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_land_inside_the_root_even_through_absolute_symlinks() {
        let base = tempdir("escape");
        let host = base.join("host");
        let root = base.join("root");
        std::fs::create_dir_all(host.join("etc")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(host.join("etc/hostname"), "the-host\n").unwrap();
        std::fs::write(host.join("secret"), "host secret\n").unwrap();
        // The image's /etc points at the host's /etc by an absolute path, and its
        // authorized_keys at a host file.
        symlink(host.join("etc"), root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("root/.ssh")).unwrap();
        symlink(host.join("secret"), root.join("root/.ssh/authorized_keys")).unwrap();

        let r = Root::open(&root).unwrap();
        // /etc resolves inside the root, where host/etc/... does not exist.
        let e = r.write("etc/hostname", b"web-1\n", 0o644).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        assert_eq!(
            std::fs::read_to_string(host.join("etc/hostname")).unwrap(),
            "the-host\n"
        );
        // Reading the planted symlink does not reach the host's file either.
        assert_eq!(r.read("root/.ssh/authorized_keys").unwrap(), None);
        // Writing replaces the symlink itself with a file of the container's.
        r.write("root/.ssh/authorized_keys", b"ssh-ed25519 AAAA\n", 0o600)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(host.join("secret")).unwrap(),
            "host secret\n"
        );
        let meta = std::fs::symlink_metadata(root.join("root/.ssh/authorized_keys")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mkdir_all_makes_what_is_missing_and_reads_back() {
        let root = tempdir("mkdir");
        let r = Root::open(&root).unwrap();
        r.mkdir_all("root/.ssh", 0o700).unwrap();
        r.mkdir_all("root/.ssh", 0o700).unwrap();
        assert!(root.join("root/.ssh").is_dir());
        r.chmod("root/.ssh", 0o700).unwrap();
        let mode = std::fs::metadata(root.join("root/.ssh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(r.read("etc/hostname").unwrap(), None);
        r.mkdir_all("etc", 0o755).unwrap();
        r.write("etc/hostname", b"x\n", 0o644).unwrap();
        assert_eq!(r.read("etc/hostname").unwrap().as_deref(), Some("x\n"));
        // A FIFO is refused, not waited on.
        nix::unistd::mkfifo(
            &root.join("etc/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let e = r.read("etc/fifo").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
