//! A local ACME CA for tests and `uc local up`: Debian's `pebble`, validating for real (never
//! `PEBBLE_VA_ALWAYS_VALID`), with `pebble-challtestsrv` as the DNS it asks, which resolves every
//! name to one address: the ingress machine. Both run as helpers of a [`Cluster`], in a namespace
//! the cluster made, so they go when the cluster goes.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};

use crate::Cluster;

/// Pebble's ACME port.
pub const PEBBLE_PORT: u16 = 14000;
/// Pebble's management port (its roots: `/roots/0`).
pub const PEBBLE_MGMT_PORT: u16 = 15000;

/// A pebble made ready at an address: its own TLS files written, not yet started.
pub struct Pebble {
    ip: Ipv4Addr,
    dir: PathBuf,
}

impl Pebble {
    /// Writes, into `dir`, a throwaway CA and the certificate pebble serves its API with at `ip`
    /// (agents trust it through `--acme-ca`), and pebble's configuration.
    pub fn new(dir: &Path, ip: Ipv4Addr) -> anyhow::Result<Pebble> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "uc local ACME API CA");
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = rcgen::CertificateParams::new(vec![ip.to_string()])?;
        let key = rcgen::KeyPair::generate()?;
        let cert = leaf.signed_by(&key, &issuer)?;
        std::fs::write(dir.join("api-ca.pem"), ca_cert.pem())?;
        std::fs::write(dir.join("pebble-cert.pem"), cert.pem())?;
        std::fs::write(dir.join("pebble-key.pem"), key.serialize_pem())?;
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("0.0.0.0:{PEBBLE_PORT}"),
            "managementListenAddress": format!("0.0.0.0:{PEBBLE_MGMT_PORT}"),
            "certificate": dir.join("pebble-cert.pem"),
            "privateKey": dir.join("pebble-key.pem"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string())?;
        Ok(Pebble {
            ip,
            dir: dir.to_owned(),
        })
    }

    /// The ACME directory URL (ucd's `--acme-directory`).
    pub fn directory(&self) -> String {
        format!("https://{}:{PEBBLE_PORT}/dir", self.ip)
    }

    /// The CA that signed pebble's API certificate (ucd's `--acme-ca`).
    pub fn api_ca(&self) -> PathBuf {
        self.dir.join("api-ca.pem")
    }

    /// ucd's arguments for this CA.
    pub fn agent_args(&self) -> [String; 2] {
        [
            format!("--acme-directory={}", self.directory()),
            format!("--acme-ca={}", self.api_ca().display()),
        ]
    }

    /// Starts the DNS and pebble in namespace `netns` (where `ip` is), the DNS answering
    /// `ingress` for every name, and waits until pebble listens.
    pub fn start(&self, c: &mut Cluster, netns: &str, ingress: Ipv4Addr) -> anyhow::Result<()> {
        let ingress = ingress.to_string();
        c.spawn_helper(
            Some(netns),
            &[
                "pebble-challtestsrv",
                "-dns01",
                "127.0.0.1:8053",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                "127.0.0.1:8055",
                "-defaultIPv4",
                &ingress,
                "-defaultIPv6",
                "",
            ],
            &[],
            &self.dir.join("dns.log"),
        )
        .context("starting pebble-challtestsrv (Debian package pebble)")?;
        let config = self.dir.join("pebble.json");
        c.spawn_helper(
            Some(netns),
            &[
                "pebble",
                "-config",
                config.to_str().context("path")?,
                "-dnsserver",
                "127.0.0.1:8053",
            ],
            // No sleeping before validation; PEBBLE_VA_ALWAYS_VALID stays unset.
            &[("PEBBLE_VA_NOSLEEP", "1")],
            &self.log(),
        )
        .context("starting pebble (Debian package pebble)")?;
        let addr = SocketAddr::from((self.ip, PEBBLE_PORT));
        crate::eventually(Duration::from_secs(20), "pebble to listen", || {
            let up = crate::netns::run_in(netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            ensure!(up, "nothing listens on {addr}");
            Ok(())
        })
        .with_context(|| {
            format!(
                "pebble's log:\n{}",
                std::fs::read_to_string(self.log()).unwrap_or_default()
            )
        })
    }

    /// Pebble's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("pebble.log")
    }

    /// Fetches the root pebble signs certificates with (a new one each time pebble starts) from
    /// its management API, from namespace `netns`, into `<dir>/root.pem`; returns that path.
    pub fn fetch_root(&self, netns: &str) -> anyhow::Result<PathBuf> {
        let root = self.dir.join("root.pem");
        let out = crate::run_with_timeout(
            std::process::Command::new("ip")
                .args(["netns", "exec", netns])
                .args([
                    "curl",
                    "-sS",
                    "--fail",
                    "--cacert",
                    self.api_ca().to_str().context("path")?,
                    "-o",
                    root.to_str().context("path")?,
                    &format!("https://{}:{PEBBLE_MGMT_PORT}/roots/0", self.ip),
                ]),
            Duration::from_secs(20),
        )?;
        ensure!(
            out.status.success(),
            "fetching pebble's root: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(root)
    }
}
