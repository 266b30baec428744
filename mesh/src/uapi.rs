//! WireGuard's cross-platform configuration protocol (UAPI), as text:
//! rendering `set` requests from peer changes and parsing `get` answers.
//! Keys are hex on this wire. Pure.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::addr::AllowedIp;
use crate::diff::PeerOp;
use crate::keys::{PrivateKey, PublicKey};

/// The device-level part of a configuration: key and listening port.
pub fn render_device(private: &PrivateKey, listen_port: u16) -> String {
    format!(
        "set=1\nprivate_key={}\nlisten_port={listen_port}\n\n",
        private.to_hex_secret()
    )
}

/// A `set` request carrying `ops`.
pub fn render_ops(ops: &[PeerOp]) -> String {
    let mut s = String::from("set=1\n");
    for op in ops {
        match op {
            PeerOp::Remove(k) => {
                let _ = write!(s, "public_key={}\nremove=true\n", k.to_hex());
            }
            PeerOp::Add(k, c) => {
                let _ = writeln!(s, "public_key={}", k.to_hex());
                if let Some(e) = c.endpoint {
                    let _ = writeln!(s, "endpoint={e}");
                }
                if c.keepalive > 0 {
                    let _ = writeln!(s, "persistent_keepalive_interval={}", c.keepalive);
                }
                s.push_str("replace_allowed_ips=true\n");
                for a in &c.allowed_ips {
                    let _ = writeln!(s, "allowed_ip={a}");
                }
            }
        }
    }
    s.push('\n');
    s
}

/// One peer as the device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<AllowedIp>,
    /// Time since the last handshake (boringtun reports an age, not a date).
    pub last_handshake_age: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub keepalive: u16,
}

/// The device as it reports itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

/// A `get` answer that does not parse, or a request the device refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UapiError {
    #[error("the WireGuard device answered errno={0}")]
    Errno(i32),
    #[error("malformed WireGuard device answer at line {line:?}")]
    Malformed { line: String },
    #[error("the WireGuard device closed the configuration channel")]
    Closed,
}

fn hex_key(v: &str, line: &str) -> Result<PublicKey, UapiError> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(v, &mut b).map_err(|_| UapiError::Malformed {
        line: line.to_string(),
    })?;
    Ok(PublicKey::from_bytes(b))
}

/// Parses the answer to `get=1` (up to and including its `errno=` line).
pub fn parse_get(text: &str) -> Result<DeviceStatus, UapiError> {
    let mut st = DeviceStatus::default();
    let mut peer: Option<PeerStatus> = None;
    let mut hs_sec: Option<u64> = None;
    let mut hs_nsec: u32 = 0;
    let finish = |peer: &mut Option<PeerStatus>,
                  hs_sec: &mut Option<u64>,
                  hs_nsec: &mut u32,
                  st: &mut DeviceStatus| {
        if let Some(mut p) = peer.take() {
            p.last_handshake_age = hs_sec.take().map(|s| Duration::new(s, *hs_nsec));
            *hs_nsec = 0;
            st.peers.push(p);
        }
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let bad = || UapiError::Malformed {
            line: line.to_string(),
        };
        let (k, v) = line.split_once('=').ok_or_else(bad)?;
        match k {
            "errno" => {
                finish(&mut peer, &mut hs_sec, &mut hs_nsec, &mut st);
                let n: i32 = v.parse().map_err(|_| bad())?;
                return if n == 0 {
                    Ok(st)
                } else {
                    Err(UapiError::Errno(n))
                };
            }
            "own_public_key" => st.public_key = Some(hex_key(v, line)?),
            "listen_port" => st.listen_port = v.parse().map_err(|_| bad())?,
            "private_key" | "fwmark" | "protocol_version" | "preshared_key" => {}
            "public_key" => {
                finish(&mut peer, &mut hs_sec, &mut hs_nsec, &mut st);
                peer = Some(PeerStatus {
                    public_key: hex_key(v, line)?,
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    last_handshake_age: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    keepalive: 0,
                });
            }
            _ => {
                let p = peer.as_mut().ok_or_else(bad)?;
                match k {
                    "endpoint" => p.endpoint = Some(v.parse().map_err(|_| bad())?),
                    "allowed_ip" => p.allowed_ips.push(v.parse().map_err(|_| bad())?),
                    "last_handshake_time_sec" => hs_sec = Some(v.parse().map_err(|_| bad())?),
                    "last_handshake_time_nsec" => hs_nsec = v.parse().map_err(|_| bad())?,
                    "rx_bytes" => p.rx_bytes = v.parse().map_err(|_| bad())?,
                    "tx_bytes" => p.tx_bytes = v.parse().map_err(|_| bad())?,
                    "persistent_keepalive_interval" => {
                        p.keepalive = v.parse().map_err(|_| bad())?
                    }
                    _ => {}
                }
            }
        }
    }
    Err(UapiError::Closed)
}

/// Parses the answer to a `set` request.
pub fn parse_set(text: &str) -> Result<(), UapiError> {
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("errno=") {
            let n: i32 = v.parse().map_err(|_| UapiError::Malformed {
                line: line.to_string(),
            })?;
            return if n == 0 {
                Ok(())
            } else {
                Err(UapiError::Errno(n))
            };
        }
    }
    Err(UapiError::Closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::PeerConfig;

    #[test]
    fn renders_changes() {
        let k = PrivateKey::from_bytes([1; 32]).public_key();
        let ops = vec![
            PeerOp::Remove(k),
            PeerOp::Add(
                k,
                PeerConfig {
                    allowed_ips: vec!["10.210.2.0/24".parse().unwrap()],
                    endpoint: Some("172.31.0.11:51820".parse().unwrap()),
                    keepalive: 25,
                },
            ),
        ];
        let text = render_ops(&ops);
        let h = k.to_hex();
        assert_eq!(
            text,
            format!(
                "set=1\npublic_key={h}\nremove=true\npublic_key={h}\nendpoint=172.31.0.11:51820\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.210.2.0/24\n\n"
            )
        );
    }

    #[test]
    fn parses_a_get_answer() {
        let k = PrivateKey::from_bytes([1; 32]).public_key();
        let text = format!(
            "own_public_key={h}\nlisten_port=51820\npublic_key={h}\nendpoint=172.31.0.11:51820\nallowed_ip=10.210.2.0/24\nallowed_ip=fd00:0:0:2::/64\nlast_handshake_time_sec=3\nlast_handshake_time_nsec=500\nrx_bytes=10\ntx_bytes=20\nerrno=0\n\n",
            h = k.to_hex()
        );
        let st = parse_get(&text).unwrap();
        assert_eq!(st.listen_port, 51820);
        assert_eq!(st.public_key, Some(k));
        assert_eq!(st.peers.len(), 1);
        let p = &st.peers[0];
        assert_eq!(p.allowed_ips.len(), 2);
        assert_eq!(p.last_handshake_age, Some(Duration::new(3, 500)));
        assert_eq!((p.rx_bytes, p.tx_bytes), (10, 20));
        assert_eq!(parse_get("errno=5\n"), Err(UapiError::Errno(5)));
        assert!(parse_get("listen_port=x\nerrno=0\n").is_err());
        assert!(
            parse_get("endpoint=1.2.3.4:5\nerrno=0\n").is_err(),
            "no peer yet"
        );
        assert_eq!(parse_get("listen_port=1\n"), Err(UapiError::Closed));
        assert_eq!(parse_set("errno=0\n\n"), Ok(()));
        assert_eq!(parse_set("errno=22\n\n"), Err(UapiError::Errno(22)));
    }
}
