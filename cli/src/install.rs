//! What `uc machine init|add` knows about a host, decides, and writes there: pure functions
//! (probe parsing, checks, file contents) tested without a host. `machine.rs` runs them over SSH.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Where uc lives on a machine.
pub const BIN: &str = "/usr/local/bin/ucd";
pub const ETC: &str = "/etc/uc";
pub const CONFIG: &str = "/etc/uc/ucd.toml";
/// `--init` / `--join` and the join token for the agent's first start; removed once it has
/// joined (the agent ignores them once it has state).
pub const BOOTSTRAP: &str = "/etc/uc/bootstrap.env";
pub const DATA: &str = "/var/lib/uc";
pub const LIBDIR: &str = "/usr/local/lib/uc";
pub const SUPERVISOR: &str = "/usr/local/lib/uc/ucd-supervise";
pub const SUPERVISOR_PID: &str = "/run/uc/ucd-supervise.pid";
pub const UNIT: &str = "/etc/systemd/system/ucd.service";
/// The supervised agent's log (under systemd, the journal has it).
pub const LOG: &str = "/var/lib/uc/ucd.log";

/// Files an install writes over: copied aside first (`PATH.uc-prev`) and put back on failure.
pub const OVERWRITTEN: [&str; 3] = [CONFIG, SUPERVISOR, UNIT];

/// DNS, which the agent serves on the mesh (a wildcard socket on this port would take it).
pub const DNS_PORT: u16 = 53;

/// Prints what the checks need, one `key=value` per line, then the kernel's socket tables.
pub const PROBE: &str = r#"echo "os=$(uname -s)"
echo "arch=$(uname -m)"
echo "uid=$(id -u)"
echo "user=$(id -un)"
if [ "$(id -u)" != 0 ] && sudo -n true 2>/dev/null; then echo sudo=yes; fi
[ -d /run/systemd/system ] && echo systemd=yes
[ -e /var/lib/uc/state.redb ] && echo state=yes
[ -d /var/lib/uc ] && echo data_dir=yes
[ -f /var/lib/uc/ucd.log ] && echo log=yes
[ -d /etc/uc ] && echo etc_dir=yes
[ -d /usr/local/lib/uc ] && echo lib_dir=yes
for f in /etc/uc/ucd.toml /usr/local/lib/uc/ucd-supervise /etc/systemd/system/ucd.service; do [ -f $f ] && echo "has=$f"; done
getent group uc >/dev/null 2>&1 && echo group=yes
if [ -f /usr/local/bin/ucd ]; then echo "ucd_sha=$(sha256sum /usr/local/bin/ucd | cut -d' ' -f1)"; fi
echo "hostname=$(cat /etc/hostname 2>/dev/null || hostname)"
for f in udp udp6 tcp tcp6; do [ -r /proc/net/$f ] && sed "s/^/$f /" /proc/net/$f; done
true
"#;

/// A socket bound on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub tcp: bool,
    pub addr: IpAddr,
    pub port: u16,
}

/// What the probe found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub os: String,
    pub arch: String,
    pub uid: u32,
    pub user: String,
    pub sudo: bool,
    pub systemd: bool,
    pub state: bool,
    pub data_dir: bool,
    /// The supervised agent's log exists (from an earlier install): it is kept.
    pub log: bool,
    pub etc_dir: bool,
    pub lib_dir: bool,
    /// Which of [`OVERWRITTEN`] exist.
    pub has: Vec<String>,
    pub group: bool,
    pub ucd_sha: Option<String>,
    pub hostname: String,
    /// Listening TCP sockets and bound UDP sockets.
    pub bound: Vec<Bound>,
}

impl HostFacts {
    pub fn root(&self) -> bool {
        self.uid == 0
    }
}

/// Parses [`PROBE`]'s output.
pub fn parse_probe(text: &str) -> Result<HostFacts, String> {
    let mut kv = BTreeMap::new();
    let mut f = HostFacts::default();
    for line in text.lines() {
        if let Some(rest) = ["udp ", "udp6 ", "tcp ", "tcp6 "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|r| (p.trim(), r)))
        {
            if let Some(b) = parse_socket_line(rest.0, rest.1) {
                f.bound.push(b);
            }
        } else if let Some(path) = line.strip_prefix("has=") {
            f.has.push(path.trim().to_string());
        } else if let Some((k, v)) = line.split_once('=') {
            kv.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
    f.os = get("os");
    f.arch = get("arch");
    f.uid = get("uid")
        .parse()
        .map_err(|_| format!("the host's probe gave no user id:\n{text}"))?;
    f.user = get("user");
    f.sudo = get("sudo") == "yes";
    f.systemd = get("systemd") == "yes";
    f.state = get("state") == "yes";
    f.data_dir = get("data_dir") == "yes";
    f.log = get("log") == "yes";
    f.etc_dir = get("etc_dir") == "yes";
    f.lib_dir = get("lib_dir") == "yes";
    f.group = get("group") == "yes";
    f.ucd_sha = kv.get("ucd_sha").filter(|s| s.len() == 64).cloned();
    f.hostname = get("hostname");
    Ok(f)
}

/// One line of /proc/net/{tcp,udp}{,6}: bound sockets (TCP in LISTEN) only.
fn parse_socket_line(proto: &str, line: &str) -> Option<Bound> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    let (local, state) = (cols.get(1)?, cols.get(3)?);
    let tcp = proto.starts_with("tcp");
    // TCP_LISTEN is 0A; a UDP socket that is bound and not connected shows 07.
    if (tcp && *state != "0A") || (!tcp && *state != "07") {
        return None;
    }
    let (hex, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let addr = match hex.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(hex, 16).ok()?.swap_bytes(),
        )),
        32 => {
            // Four 32-bit words, each in host (little-endian) order.
            let mut bytes = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(&hex[w * 8..w * 8 + 8], 16).ok()?;
                bytes[w * 4..w * 4 + 4].copy_from_slice(&word.swap_bytes().to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(Bound { tcp, addr, port })
}

/// What the new agent needs of the host.
#[derive(Clone, Debug)]
pub struct Needs {
    pub wg_port: u16,
    pub force: bool,
}

/// Everything that stops an install, each with what to do about it.
pub fn problems(f: &HostFacts, target: &str, needs: &Needs) -> Vec<String> {
    let mut out = Vec::new();
    if f.os != "Linux" {
        out.push(format!(
            "{target} runs {:?}; uc runs on Linux",
            if f.os.is_empty() {
                "an unknown system"
            } else {
                &f.os
            }
        ));
    }
    if !f.root() && !f.sudo {
        out.push(format!(
            "{} on {target} is not root and cannot run sudo without a password: connect as root, or allow it passwordless sudo",
            f.user
        ));
    }
    if f.state && !needs.force {
        out.push(format!(
            "{target} already belongs to a uc cluster ({DATA}/state.redb exists): remove it from that cluster with `uc machine rm`, or pass --force to set its state aside and join this one"
        ));
    }
    // What the agent binds: WireGuard on every address, the join endpoint on every address, DNS
    // on its mesh address (which a wildcard socket on port 53 would take).
    let ours = |b: &Bound| f.state && needs.force && b.port != DNS_PORT;
    for b in f.bound.iter().filter(|b| !ours(b)) {
        let what = if !b.tcp && b.port == needs.wg_port {
            Some(format!("WireGuard ({}/udp)", needs.wg_port))
        } else if b.tcp && b.port == uc_proto::DEFAULT_JOIN_PORT {
            Some(format!(
                "the join endpoint ({}/tcp)",
                uc_proto::DEFAULT_JOIN_PORT
            ))
        } else if b.port == DNS_PORT && b.addr.is_unspecified() {
            Some(format!(
                "uc's DNS ({DNS_PORT}/{}, on every address)",
                if b.tcp { "tcp" } else { "udp" }
            ))
        } else {
            None
        };
        if let Some(what) = what {
            let msg = format!(
                "port {} is taken on {target} ({} {}:{}): uc needs it for {what}{}",
                b.port,
                if b.tcp { "tcp" } else { "udp" },
                b.addr,
                b.port,
                if b.port == needs.wg_port {
                    "; pick another with --wg-port"
                } else {
                    ""
                }
            );
            if !out.contains(&msg) {
                out.push(msg);
            }
        }
    }
    out
}

/// The ELF machine of an executable (`uname -m` spelling), if it is one.
pub fn elf_arch(head: &[u8]) -> Option<&'static str> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    let machine = if head[5] == 1 {
        u16::from_le_bytes([head[18], head[19]])
    } else {
        u16::from_be_bytes([head[18], head[19]])
    };
    Some(match machine {
        62 => "x86_64",
        183 => "aarch64",
        40 => "arm",
        243 => "riscv64",
        3 => "i686",
        _ => "unknown",
    })
}

/// Whether `uname -m` on the host names the architecture `elf` was built for.
pub fn arch_matches(uname_m: &str, elf: &str) -> bool {
    match elf {
        "arm" => uname_m.starts_with("armv"),
        "i686" => matches!(uname_m, "i386" | "i486" | "i586" | "i686"),
        other => uname_m == other || (other == "aarch64" && uname_m == "arm64"),
    }
}

/// What the agent is told at its first start.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    Init { network: String },
    Join { addr: String, token: String },
}

/// `/etc/uc/ucd.toml`.
pub fn config_toml(
    name: &str,
    endpoints: &[String],
    tags: &[String],
    wg_port: Option<u16>,
) -> String {
    let mut s =
        String::from("# Written by `uc machine init|add`; flags given to ucd win over it.\n");
    let list = |v: &[String]| {
        v.iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(s, "name = {name:?}");
    if !endpoints.is_empty() {
        let _ = writeln!(s, "endpoints = [{}]", list(endpoints));
    }
    if !tags.is_empty() {
        let _ = writeln!(s, "tags = [{}]", list(tags));
    }
    if let Some(p) = wg_port {
        let _ = writeln!(s, "wg_port = {p}");
    }
    s
}

/// `/etc/uc/bootstrap.env` (mode 0600: it holds the join token).
pub fn bootstrap_env(b: &Bootstrap) -> String {
    match b {
        Bootstrap::Init { network } => format!("UCD_INIT=true\nUCD_NETWORK={network}\n"),
        Bootstrap::Join { addr, token } => format!("UCD_JOIN={addr}\nUCD_JOIN_TOKEN={token}\n"),
    }
}

/// The systemd unit.
pub fn systemd_unit() -> String {
    format!(
        "[Unit]
Description=uc agent
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
EnvironmentFile=-{BOOTSTRAP}
ExecStart={BIN} --config {CONFIG} --data-dir {DATA}
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"
    )
}

/// The restart loop used where systemd does not run: restarts the agent when it fails, stops it
/// on SIGTERM, and keeps its log in the data directory.
pub fn supervisor_script() -> String {
    format!(
        r#"#!/bin/sh
# Runs ucd and restarts it when it fails (written by `uc machine init|add` on a machine without
# systemd). Stop it with: kill $(cat {SUPERVISOR_PID})
echo $$ > {SUPERVISOR_PID}
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; [ -n "$child" ] && wait "$child"; rm -f {SUPERVISOR_PID}; exit 0' TERM INT
while :; do
  (
    if [ -f {BOOTSTRAP} ]; then set -a; . {BOOTSTRAP}; set +a; fi
    exec {BIN} --config {CONFIG} --data-dir {DATA}
  ) >> {LOG} 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  [ "$rc" = 0 ] && {{ rm -f {SUPERVISOR_PID}; exit 0; }}
  echo "uc supervisor: ucd exited with status $rc; restarting in 1 s" >> {LOG}
  sleep 1
done
"#
    )
}

/// What an install created or set aside, for undoing it.
#[derive(Clone, Debug, Default)]
pub struct Undo {
    pub systemd: bool,
    pub made_data_dir: bool,
    /// Keep the agent's log: it was there before.
    pub keep_log: bool,
    pub made_etc_dir: bool,
    pub made_lib_dir: bool,
    pub made_group: bool,
    /// The binary was absent (remove ours) or replaced (put the old one back).
    pub binary: Option<BinaryUndo>,
    /// Which of [`OVERWRITTEN`] existed before (and were copied aside).
    pub existed: Vec<String>,
    /// A previous cluster state moved aside by --force, to move back.
    pub replaced_state: Option<String>,
}

#[derive(Clone, Debug)]
pub enum BinaryUndo {
    Remove,
    Restore(String),
}

/// The script that stops the agent this install started and removes what it made.
pub fn rollback_script(u: &Undo) -> String {
    let mut s = String::new();
    if u.systemd {
        let _ = writeln!(s, "systemctl disable --now ucd >/dev/null 2>&1");
    }
    let _ = writeln!(
        s,
        "if [ -f {SUPERVISOR_PID} ]; then kill $(cat {SUPERVISOR_PID}) 2>/dev/null; \
         for i in $(seq 50); do [ -f {SUPERVISOR_PID} ] || break; sleep 0.1; done; rm -f {SUPERVISOR_PID}; fi"
    );
    let _ = writeln!(s, "rm -f {BOOTSTRAP} {BIN}.uc-new");
    for f in OVERWRITTEN {
        if u.existed.iter().any(|e| e == f) {
            let _ = writeln!(s, "mv -f {f}.uc-prev {f}");
        } else {
            let _ = writeln!(s, "rm -f {f}");
        }
    }
    if u.systemd {
        let _ = writeln!(s, "systemctl daemon-reload");
    }
    if u.made_lib_dir {
        let _ = writeln!(s, "rmdir {LIBDIR} 2>/dev/null");
    }
    if u.made_data_dir {
        let _ = writeln!(
            s,
            "rm -rf {DATA}/* {DATA}/.[!.]* 2>/dev/null; rmdir {DATA} 2>/dev/null"
        );
    } else {
        let _ = writeln!(
            s,
            "rm -f {DATA}/state.redb {DATA}/wg.key {DATA}/machine-id {DATA}/machine-id.tmp {DATA}/api.sock{}",
            if u.keep_log {
                String::new()
            } else {
                format!(" {LOG}")
            }
        );
    }
    if let Some(dir) = &u.replaced_state {
        let _ = writeln!(s, "mv {dir}/* {DATA}/ 2>/dev/null; rmdir {dir}");
    }
    if u.made_etc_dir {
        let _ = writeln!(s, "rmdir {ETC} 2>/dev/null");
    }
    match &u.binary {
        Some(BinaryUndo::Remove) => {
            let _ = writeln!(s, "rm -f {BIN}");
        }
        Some(BinaryUndo::Restore(prev)) => {
            let _ = writeln!(s, "mv -f {prev} {BIN}");
        }
        None => {}
    }
    if u.made_group {
        let _ = writeln!(s, "groupdel uc 2>/dev/null");
    }
    s.push_str("true\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_TCP: &str = "tcp   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
tcp    0: 00000000:C36A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
tcp    1: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
tcp    2: 0A00000A:0016 0B00000A:D431 01 00000000:00000000 02:0009F6F5 00000000     0        0 3 4 0000000000000000 20 4 31 10 -1
udp    5: 00000000:C924 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0000000000000000 0
udp6   6: 00000000000000000000000000000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5 2 0000000000000000 0
tcp6   7: 000080FE00000000FF0054525E0B12FE:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6 1 0000000000000000 100 0 0 10 0
";

    fn facts(extra: &str) -> HostFacts {
        parse_probe(&format!(
            "os=Linux\narch=x86_64\nuid=0\nuser=root\nhostname=pi\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn socket_tables_parse() {
        let f = facts(PROC_TCP);
        let b: Vec<(bool, String, u16)> = f
            .bound
            .iter()
            .map(|b| (b.tcp, b.addr.to_string(), b.port))
            .collect();
        assert_eq!(
            b,
            vec![
                (true, "0.0.0.0".into(), 50026),
                (true, "127.0.0.1".into(), 53),
                (false, "0.0.0.0".into(), 51492),
                (false, "::".into(), 53),
                (true, "fe80::5254:ff:fe12:b5e".into(), 22),
            ]
        );
    }

    #[test]
    fn the_kernels_own_tables_parse() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("[::1]:0").unwrap();
        let mut text = String::new();
        for f in ["udp", "tcp6"] {
            for line in std::fs::read_to_string(format!("/proc/net/{f}"))
                .unwrap()
                .lines()
            {
                text.push_str(&format!("{f} {line}\n"));
            }
        }
        let b = facts(&text).bound;
        for want in [
            Bound {
                tcp: false,
                addr: "127.0.0.1".parse().unwrap(),
                port: udp.local_addr().unwrap().port(),
            },
            Bound {
                tcp: true,
                addr: "::1".parse().unwrap(),
                port: tcp.local_addr().unwrap().port(),
            },
        ] {
            assert!(b.contains(&want), "{want:?} not in {b:?}");
        }
    }

    #[test]
    fn checks_name_every_problem() {
        let ok = Needs {
            wg_port: 51820,
            force: false,
        };
        assert!(problems(&facts(""), "root@pi", &ok).is_empty());
        let p = problems(
            &parse_probe("os=Darwin\nuid=501\nuser=me\nstate=yes\n").unwrap(),
            "me@mac",
            &ok,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("Darwin") && p[1].contains("sudo") && p[2].contains("--force"));
        // DNS on every address is a conflict, on 127.0.0.1 it is not.
        let p = problems(&facts(PROC_TCP), "root@pi", &ok);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("port 53") && p[0].contains("udp ::"), "{p:?}");
        // WireGuard's port, with the way out.
        let wg = "udp 0: 00000000:CA6C 00000000:0000 07 0 0 0 0 0 0\n";
        let p = problems(&facts(wg), "root@pi", &ok);
        assert!(
            p.len() == 1 && p[0].contains("51820") && p[0].contains("--wg-port"),
            "{p:?}"
        );
        let p = problems(
            &facts(wg),
            "root@pi",
            &Needs {
                wg_port: 51821,
                force: false,
            },
        );
        assert!(p.is_empty(), "{p:?}");
        // Sudo without a password is enough.
        assert!(
            problems(
                &parse_probe("os=Linux\nuid=1000\nsudo=yes\n").unwrap(),
                "h",
                &ok
            )
            .is_empty()
        );
    }

    #[test]
    fn systemd_accepts_the_unit() {
        // systemd's own checker, offline; the unit's ExecStart must name an existing file.
        let dir = tempfile::tempdir().unwrap();
        let unit = systemd_unit().replace(BIN, "/bin/sleep");
        let path = dir.path().join("ucd.service");
        std::fs::write(&path, unit).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (package systemd) is needed");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{err}");
        // And the check can fail.
        std::fs::write(
            &path,
            systemd_unit()
                .replace(BIN, "/bin/sleep")
                .replace("on-failure", "bogus"),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    }

    #[test]
    fn probe_without_uid_is_an_error() {
        assert!(parse_probe("garbage").is_err());
    }

    #[test]
    fn elf_headers() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&exe), Some(std::env::consts::ARCH));
        assert_eq!(elf_arch(b"#!/bin/sh\necho not an elf file"), None);
        let mut arm =
            b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00".to_vec();
        assert_eq!(elf_arch(&arm), Some("aarch64"));
        arm[18] = 40;
        assert!(arch_matches("armv7l", elf_arch(&arm).unwrap()));
        assert!(!arch_matches("x86_64", "aarch64") && arch_matches("arm64", "aarch64"));
    }

    #[test]
    fn files_say_what_they_should() {
        let c = config_toml("pi", &["10.0.0.2".into()], &["ingress".into()], Some(51821));
        assert!(c.contains("name = \"pi\"") && c.contains("endpoints = [\"10.0.0.2\"]"));
        assert!(c.contains("tags = [\"ingress\"]") && c.contains("wg_port = 51821"));
        assert!(toml::from_str::<toml::Table>(&c).is_ok());
        let unit = systemd_unit();
        assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure"));
        let env = bootstrap_env(&Bootstrap::Join {
            addr: "10.0.0.1:51002".into(),
            token: "t0k".into(),
        });
        assert_eq!(env, "UCD_JOIN=10.0.0.1:51002\nUCD_JOIN_TOKEN=t0k\n");
        // Shell scripts at least parse.
        for script in [
            supervisor_script(),
            rollback_script(&Undo::default()),
            PROBE.to_string(),
        ] {
            let ok = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .status()
                .unwrap();
            assert!(ok.success(), "{script}");
        }
    }
}
