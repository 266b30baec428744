//! The local image store: root filesystems under `DATA/images/<name>/rootfs`,
//! each with an `image.json`. Imported from a rootfs tarball, a `docker save`
//! archive or an OCI archive (gzip or not); exported as a tarball for another
//! machine of the cluster.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the store knows of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// sha256 of the archive it was imported from.
    pub digest: String,
    pub size_bytes: u64,
    pub created_ms: u64,
    /// The command a container runs when `uc run` gives none.
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub workdir: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "image name {0:?} is not valid: use lower-case letters, digits, '.', '_', '-', and an optional :tag"
    )]
    BadName(String),
    #[error("image {name:?} not found on this machine; images: {known}")]
    NotFound { name: String, known: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("archive is not a root filesystem, docker save or OCI archive: {0}")]
    BadArchive(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Checks an image name: `NAME[:TAG]`, each of `[a-z0-9][a-z0-9._-]*`, at most 128 bytes.
pub fn check_image_name(name: &str) -> Result<(), ImageError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.as_bytes()[0].is_ascii_alphanumeric()
            && p.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
    };
    let ok = name.len() <= 128
        && match name.split_once(':') {
            Some((n, t)) => part_ok(n) && part_ok(t),
            None => part_ok(name),
        };
    if ok {
        Ok(())
    } else {
        Err(ImageError::BadName(name.to_owned()))
    }
}

/// `name:tag` is kept in a directory `name+tag`: overlayfs takes ':' as a separator.
fn dir_name(name: &str) -> String {
    name.replace(':', "+")
}

/// The images of one machine.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

const META: &str = "image.json";
/// An exported image carries its metadata as this first entry.
const EXPORT_META: &str = ".uc-image.json";

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(dir_name(name))
    }

    /// The image's root filesystem (the lower layer of its containers).
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.dir(name).join("rootfs")
    }

    pub fn list(&self) -> Result<Vec<ImageMeta>, ImageError> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("reading", &self.root)(e)),
        };
        for e in rd.flatten() {
            if let Ok(text) = fs::read(e.path().join(META))
                && let Ok(m) = serde_json::from_slice::<ImageMeta>(&text)
            {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Option<ImageMeta> {
        let text = fs::read(self.dir(name).join(META)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// The image, or an error that lists the images there are.
    pub fn require(&self, name: &str) -> Result<ImageMeta, ImageError> {
        self.get(name).ok_or_else(|| ImageError::NotFound {
            name: name.to_owned(),
            known: match self.list() {
                Ok(l) if !l.is_empty() => l
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "none (uc image import FILE)".into(),
            },
        })
    }

    /// Imports an archive under `name` (default: the name a docker archive
    /// carries, else the file's stem). Replaces an image of that name only
    /// once the new one is complete; a failed import leaves nothing.
    pub fn import(
        &self,
        reader: impl Read,
        name: Option<&str>,
        fallback_name: &str,
        now_ms: u64,
    ) -> Result<ImageMeta, ImageError> {
        fs::create_dir_all(&self.root).map_err(io_err("creating", &self.root))?;
        if let Some(n) = name {
            check_image_name(n)?;
        }
        let tmp = self.root.join(format!(
            ".import-{}-{}",
            std::process::id(),
            hex::encode(crate::random8())
        ));
        let result = self.import_into(&tmp, reader, name, fallback_name, now_ms);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    fn import_into(
        &self,
        tmp: &Path,
        reader: impl Read,
        name: Option<&str>,
        fallback_name: &str,
        now_ms: u64,
    ) -> Result<ImageMeta, ImageError> {
        let unpacked = tmp.join("archive");
        fs::create_dir_all(&unpacked).map_err(io_err("creating", &unpacked))?;
        let mut hashing = HashingReader::new(reader);
        {
            let mut buf = BufReader::new(&mut hashing);
            let gz = buf.fill_buf().map(|b| b.starts_with(&[0x1f, 0x8b]));
            let gz = gz.map_err(|e| ImageError::BadArchive(e.to_string()))?;
            let r: Box<dyn Read> = if gz {
                Box::new(flate2::read::GzDecoder::new(buf))
            } else {
                Box::new(buf)
            };
            unpack_plain(r, &unpacked)?;
        }
        // Read what is left (tar stops at its end marker) so the digest covers the file.
        io::copy(&mut hashing, &mut io::sink())
            .map_err(|e| ImageError::BadArchive(e.to_string()))?;
        let digest = hashing.finish();
        let rootfs = tmp.join("rootfs");
        let mut meta = ImageMeta {
            name: String::new(),
            digest,
            size_bytes: 0,
            created_ms: now_ms,
            cmd: Vec::new(),
            env: Vec::new(),
            workdir: String::new(),
        };
        let mut carried_name = None;
        if unpacked.join("manifest.json").is_file() {
            carried_name = flatten_docker(&unpacked, &rootfs, &mut meta)?;
        } else if unpacked.join("oci-layout").is_file() && unpacked.join("index.json").is_file() {
            flatten_oci(&unpacked, &rootfs, &mut meta)?;
        } else {
            let exported = unpacked.join(EXPORT_META);
            if let Ok(text) = fs::read(&exported) {
                let m: ImageMeta = serde_json::from_slice(&text)
                    .map_err(|e| ImageError::BadArchive(format!("{EXPORT_META}: {e}")))?;
                carried_name = Some(m.name);
                meta.cmd = m.cmd;
                meta.env = m.env;
                meta.workdir = m.workdir;
                if !m.digest.is_empty() {
                    meta.digest = m.digest;
                }
                let _ = fs::remove_file(&exported);
            }
            fs::rename(&unpacked, &rootfs).map_err(io_err("moving", &unpacked))?;
        }
        let looks_like_os = ["usr", "bin", "etc"]
            .iter()
            .any(|d| rootfs.join(d).exists());
        if !looks_like_os {
            return Err(ImageError::BadArchive(
                "it has none of /usr, /bin, /etc at its top".into(),
            ));
        }
        // nspawn refuses a tree without os-release.
        if !rootfs.join("etc/os-release").exists() && !rootfs.join("usr/lib/os-release").exists() {
            let p = rootfs.join("usr/lib");
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
            let f = p.join("os-release");
            fs::write(&f, "ID=uc-image\n").map_err(io_err("writing", &f))?;
        }
        let name = match (name, carried_name) {
            (Some(n), _) => n.to_owned(),
            (None, Some(n)) if check_image_name(&n).is_ok() => n,
            _ => fallback_name.to_owned(),
        };
        check_image_name(&name)?;
        meta.name = name.clone();
        meta.size_bytes = du(&rootfs);
        let mf = tmp.join(META);
        fs::write(
            &mf,
            serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )
        .map_err(io_err("writing", &mf))?;
        let _ = fs::remove_dir_all(tmp.join("archive"));
        let dest = self.dir(&name);
        if dest.exists() {
            // Containers that use the old image keep their mount of it; the
            // directory goes once renamed aside.
            let old = self
                .root
                .join(format!(".old-{}", hex::encode(crate::random8())));
            fs::rename(&dest, &old).map_err(io_err("moving", &dest))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(tmp, &dest).map_err(io_err("moving", tmp))?;
        Ok(meta)
    }

    /// Writes the image as a tarball: its metadata first, then the root filesystem.
    pub fn export(&self, name: &str, w: impl Write) -> Result<(), ImageError> {
        self.write_tar(name, w, true)
    }

    /// Writes the image's root filesystem alone as a tarball (what `docker import` takes).
    pub fn export_rootfs(&self, name: &str, w: impl Write) -> Result<(), ImageError> {
        self.write_tar(name, w, false)
    }

    fn write_tar(&self, name: &str, w: impl Write, with_meta: bool) -> Result<(), ImageError> {
        let meta = self.require(name)?;
        let rootfs = self.rootfs(name);
        let mut b = tar::Builder::new(w);
        b.follow_symlinks(false);
        if with_meta {
            Self::append_meta(&mut b, &meta).map_err(io_err("exporting", &rootfs))?;
        }
        b.append_dir_all(".", &rootfs)
            .map_err(io_err("exporting", &rootfs))?;
        b.finish().map_err(io_err("exporting", &rootfs))?;
        Ok(())
    }

    fn append_meta(b: &mut tar::Builder<impl Write>, meta: &ImageMeta) -> std::io::Result<()> {
        let text = serde_json::to_vec(&meta).expect("meta serializes");
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(meta.created_ms / 1000);
        h.set_cksum();
        b.append_data(&mut h, EXPORT_META, text.as_slice())
    }

    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        self.require(name)?;
        let dir = self.dir(name);
        fs::remove_dir_all(&dir).map_err(io_err("removing", &dir))
    }
}

/// An I/O error with its causes (tar's own message hides them).
fn chain(e: &io::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn unpack_plain(r: impl Read, dest: &Path) -> Result<(), ImageError> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_overwrite(true);
    a.unpack(dest)
        .map_err(|e| ImageError::BadArchive(chain(&e)))
}

/// Applies one layer tarball onto `rootfs`, honouring whiteouts.
fn apply_layer(layer: &Path, rootfs: &Path) -> Result<(), ImageError> {
    let f = fs::File::open(layer).map_err(io_err("opening", layer))?;
    let mut buf = BufReader::new(f);
    let gz = buf
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .map_err(io_err("reading", layer))?;
    let r: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(buf))
    } else {
        Box::new(buf)
    };
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_overwrite(true);
    let bad =
        |e: io::Error| ImageError::BadArchive(format!("layer {}: {}", layer.display(), chain(&e)));
    for entry in a.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::RootDir))
        {
            return Err(ImageError::BadArchive(format!(
                "layer {} has a path outside the root: {}",
                layer.display(),
                path.display()
            )));
        }
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parent = path.parent().unwrap_or(Path::new(""));
        if file_name == ".wh..wh..opq" {
            if let Ok(rd) = fs::read_dir(rootfs.join(parent)) {
                for e in rd.flatten() {
                    let _ = remove_any(&e.path());
                }
            }
            continue;
        }
        if let Some(hidden) = file_name.strip_prefix(".wh.") {
            let _ = remove_any(&rootfs.join(parent).join(hidden));
            continue;
        }
        let target = rootfs.join(&path);
        if entry.header().entry_type() != tar::EntryType::Directory
            && let Ok(md) = fs::symlink_metadata(&target)
            && md.is_dir()
        {
            let _ = fs::remove_dir_all(&target);
        }
        entry.unpack_in(rootfs).map_err(bad)?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) => Err(e),
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value, ImageError> {
    let text = fs::read(p).map_err(io_err("reading", p))?;
    serde_json::from_slice(&text)
        .map_err(|e| ImageError::BadArchive(format!("{}: {e}", p.display())))
}

fn inside(base: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let p = Path::new(rel);
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(ImageError::BadArchive(format!(
            "path {rel:?} leaves the archive"
        )));
    }
    Ok(base.join(p))
}

fn config_into(config: &serde_json::Value, meta: &mut ImageMeta) {
    let c = &config["config"];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut cmd = strings(&c["Entrypoint"]);
    cmd.extend(strings(&c["Cmd"]));
    meta.cmd = cmd;
    meta.env = strings(&c["Env"]);
    meta.workdir = c["WorkingDir"].as_str().unwrap_or("").to_owned();
}

/// `docker save`: `manifest.json` lists the config and the layers in order.
fn flatten_docker(
    dir: &Path,
    rootfs: &Path,
    meta: &mut ImageMeta,
) -> Result<Option<String>, ImageError> {
    let manifest = read_json(&dir.join("manifest.json"))?;
    let first = manifest
        .get(0)
        .ok_or_else(|| ImageError::BadArchive("manifest.json lists no image".into()))?;
    fs::create_dir_all(rootfs).map_err(io_err("creating", rootfs))?;
    for layer in first["Layers"].as_array().into_iter().flatten() {
        let rel = layer
            .as_str()
            .ok_or_else(|| ImageError::BadArchive("a layer is not a path".into()))?;
        apply_layer(&inside(dir, rel)?, rootfs)?;
    }
    if let Some(cfg) = first["Config"].as_str() {
        config_into(&read_json(&inside(dir, cfg)?)?, meta);
    }
    let tag = first["RepoTags"]
        .get(0)
        .and_then(|t| t.as_str())
        .map(|t| t.rsplit('/').next().unwrap_or(t).to_owned());
    Ok(tag)
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| ImageError::BadArchive(format!("digest {digest:?}")))?;
    inside(dir, &format!("blobs/{alg}/{hex}"))
}

/// An OCI image layout: `index.json` -> manifest -> config and layers.
fn flatten_oci(dir: &Path, rootfs: &Path, meta: &mut ImageMeta) -> Result<(), ImageError> {
    let index = read_json(&dir.join("index.json"))?;
    let mut manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or_else(|| ImageError::BadArchive("index.json lists no manifest".into()))?
        .to_owned();
    let mut manifest = read_json(&blob(dir, &manifest_digest)?)?;
    // An index may point at another index (multi-platform); take its first.
    while manifest["manifests"].is_array() {
        manifest_digest = manifest["manifests"][0]["digest"]
            .as_str()
            .ok_or_else(|| ImageError::BadArchive("empty nested index".into()))?
            .to_owned();
        manifest = read_json(&blob(dir, &manifest_digest)?)?;
    }
    fs::create_dir_all(rootfs).map_err(io_err("creating", rootfs))?;
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let d = layer["digest"]
            .as_str()
            .ok_or_else(|| ImageError::BadArchive("a layer has no digest".into()))?;
        apply_layer(&blob(dir, d)?, rootfs)?;
    }
    if let Some(d) = manifest["config"]["digest"].as_str() {
        config_into(&read_json(&blob(dir, d)?)?, meta);
    }
    Ok(())
}

fn du(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if let Ok(md) = e.metadata() {
                    if md.is_dir() {
                        stack.push(e.path());
                    } else {
                        total += md.len();
                    }
                }
            }
        }
    }
    total
}

struct HashingReader<R> {
    inner: R,
    ctx: ring::digest::Context,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }
    fn finish(self) -> String {
        format!("sha256:{}", hex::encode(self.ctx.finish().as_ref()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

/// A writer that sends what it is given as chunks (an image export, out to gRPC).
pub struct ChannelWriter {
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub buf: Vec<u8>,
}

pub const CHUNK: usize = 256 * 1024;

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let b = std::mem::take(&mut self.buf);
            self.tx.blocking_send(b).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone")
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn names() {
        for ok in ["demo", "demo:1.0", "a-b_c.d", "x9:latest"] {
            check_image_name(ok).unwrap();
        }
        for bad in ["", "Demo", "-x", "a:b:c", "a/b", "a:", ":b", "a b"] {
            assert!(check_image_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rootfs_tarball_round_trips_through_export() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        let tar = tarball(&[
            ("usr/bin/hello", b"#!/bin/sh\necho hi\n"),
            ("etc/motd", b"hi"),
        ]);
        let m = store.import(tar.as_slice(), None, "demo", 7).unwrap();
        assert_eq!(m.name, "demo");
        assert!(m.digest.starts_with("sha256:"));
        assert!(store.rootfs("demo").join("usr/lib/os-release").exists());
        assert_eq!(store.list().unwrap(), std::slice::from_ref(&m));

        let mut out = Vec::new();
        store.export("demo", &mut out).unwrap();
        let other = ImageStore::new(dir.path().join("other"));
        let m2 = other.import(out.as_slice(), None, "ignored", 9).unwrap();
        assert_eq!((m2.name.as_str(), &m2.digest), ("demo", &m.digest));
        assert_eq!(
            fs::read(other.rootfs("demo").join("etc/motd")).unwrap(),
            b"hi"
        );
        assert!(!other.rootfs("demo").join(EXPORT_META).exists());
    }

    #[test]
    fn docker_save_layers_apply_in_order_with_whiteouts() {
        let dir = tempfile::tempdir().unwrap();
        let l1 = tarball(&[("etc/a", b"1"), ("etc/b", b"1"), ("usr/x", b"x")]);
        let l2 = tarball(&[("etc/a", b"2"), ("etc/.wh.b", b"")]);
        let cfg = br#"{"config":{"Cmd":["httpd","-f"],"Env":["A=1"]}}"#;
        let manifest =
            br#"[{"Config":"c.json","RepoTags":["library/web:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
        let archive = tarball(&[
            ("manifest.json", manifest),
            ("c.json", cfg),
            ("l1/layer.tar", &l1),
            ("l2/layer.tar", &l2),
        ]);
        let store = ImageStore::new(dir.path().join("images"));
        let m = store
            .import(archive.as_slice(), None, "fallback", 1)
            .unwrap();
        assert_eq!(m.name, "web:1");
        assert_eq!(m.cmd, ["httpd", "-f"]);
        let root = store.rootfs("web:1");
        assert_eq!(fs::read(root.join("etc/a")).unwrap(), b"2");
        assert!(!root.join("etc/b").exists());
        assert!(root.to_string_lossy().ends_with("web+1/rootfs"));
    }

    #[test]
    fn garbage_and_escapes_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images"));
        assert!(
            store
                .import(&b"not a tarball at all"[..], None, "x", 1)
                .is_err()
        );
        let not_os = tarball(&[("hello.txt", b"hi")]);
        let e = store.import(not_os.as_slice(), None, "x", 1).unwrap_err();
        assert!(e.to_string().contains("none of /usr"), "{e}");
        let manifest = br#"[{"Layers":["../../etc/passwd"]}]"#;
        let evil = tarball(&[("manifest.json", manifest)]);
        let e = store.import(evil.as_slice(), None, "x", 1).unwrap_err();
        assert!(e.to_string().contains("leaves the archive"), "{e}");
        assert!(store.import(&b""[..], Some("Bad Name"), "x", 1).is_err());
        let left: Vec<_> = fs::read_dir(store.root()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        let e = store.require("nope").unwrap_err();
        assert!(e.to_string().contains("uc image import"), "{e}");
    }
}
