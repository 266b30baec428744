//! Mesh addressing: machine X of the cluster network owns the /24
//! 10.210.X.0/24 and is 10.210.X.1; in IPv6 the cluster has a ULA /48
//! derived from its id, and machine X owns the /64 `<ula>:X::/64`, where
//! 10.210.X.Y is `<ula>:X::Y`. Everything here is a pure function of the
//! cluster id, the cluster network and the machine's /24.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use uc_proto::Subnet;

/// A network written `ADDRESS/PREFIX`, IPv4 or IPv6, as WireGuard's
/// AllowedIPs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedIp {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl AllowedIp {
    pub fn v4(subnet: Subnet) -> Self {
        AllowedIp {
            addr: IpAddr::V4(subnet.addr()),
            prefix: subnet.prefix(),
        }
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &AllowedIp) -> bool {
        let p = self.prefix.min(other.prefix);
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                u32::from(a) & m == u32::from(b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                u128::from(a) & m == u128::from(b) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for AllowedIp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid network {s:?}: expected ADDRESS/PREFIX"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("invalid network {s:?}: bad address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("invalid network {s:?}: bad prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("invalid network {s:?}: prefix over {max}"));
        }
        Ok(AllowedIp { addr, prefix })
    }
}

/// How a cluster numbers its machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshAddressing {
    /// The cluster network, 10.210.0.0/16 by default.
    pub network: Subnet,
    /// The cluster's IPv6 ULA /48.
    pub ula: Ipv6Addr,
}

/// Length of the cluster's IPv6 prefix.
pub const ULA_PREFIX: u8 = 48;
/// Length of a machine's IPv6 prefix.
pub const MACHINE_V6_PREFIX: u8 = 64;

impl MeshAddressing {
    pub fn new(cluster_id: &str, network: Subnet) -> Self {
        MeshAddressing {
            network,
            ula: ula_prefix(cluster_id),
        }
    }

    /// The index of a machine's /24 inside the cluster network (X for
    /// 10.210.X.0/24), which is also its IPv6 subnet id. None for a subnet
    /// outside the network or not a /24.
    pub fn index(&self, subnet: Subnet) -> Option<u16> {
        if subnet.prefix() != 24 || !self.network.contains(subnet.addr()) {
            return None;
        }
        let off = (u32::from(subnet.addr()) - u32::from(self.network.addr())) >> 8;
        u16::try_from(off).ok()
    }

    /// The machine's own IPv4 address: host 1 of its /24.
    pub fn machine_v4(&self, subnet: Subnet) -> Option<Ipv4Addr> {
        self.index(subnet)?;
        subnet.host(1)
    }

    /// The machine's IPv6 /64. None for index 0: that /64 holds the
    /// management addresses (and the first /24 is never given out).
    pub fn machine_v6_net(&self, subnet: Subnet) -> Option<AllowedIp> {
        let idx = self.index(subnet).filter(|i| *i != 0)?;
        let mut seg = self.ula.segments();
        seg[3] = idx;
        Some(AllowedIp {
            addr: IpAddr::V6(Ipv6Addr::from(seg)),
            prefix: MACHINE_V6_PREFIX,
        })
    }

    /// The IPv6 address that goes with an IPv4 address of the mesh
    /// (10.210.X.Y becomes `<ula>:X::Y`).
    pub fn v6_of(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        if !self.network.contains(v4) {
            return None;
        }
        let off = u32::from(v4) - u32::from(self.network.addr());
        let idx = u16::try_from(off >> 8).ok()?;
        let host = (off & 0xff) as u16;
        let mut seg = self.ula.segments();
        seg[3] = idx;
        seg[7] = host;
        Some(Ipv6Addr::from(seg))
    }
}

impl MeshAddressing {
    /// The machine's management address, `<ula>:0:<64 bits of SHA-256 of
    /// its id>`: independent of its /24, so agent-to-agent traffic (gossip,
    /// sync, the peer API) is not disturbed when a conflict moves a machine
    /// to another /24. Subnet id 0 of the ULA is never a machine's (the
    /// first /24 of the network is never given out).
    pub fn management(&self, machine_id: &str) -> Ipv6Addr {
        let d = ring::digest::digest(&ring::digest::SHA256, machine_id.as_bytes());
        let mut b = self.ula.octets();
        b[6] = 0;
        b[7] = 0;
        b[8..16].copy_from_slice(&d.as_ref()[..8]);
        Ipv6Addr::from(b)
    }
}

/// The cluster's ULA /48 (RFC 4193): `fd` then 40 bits of SHA-256 of the
/// cluster id, so every machine derives the same prefix with no coordination.
pub fn ula_prefix(cluster_id: &str) -> Ipv6Addr {
    let d = ring::digest::digest(&ring::digest::SHA256, cluster_id.as_bytes());
    let h = d.as_ref();
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..6].copy_from_slice(&h[..5]);
    Ipv6Addr::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_addresses() {
        let net: Subnet = "10.210.0.0/16".parse().unwrap();
        let a = MeshAddressing::new("c1", net);
        let s: Subnet = "10.210.7.0/24".parse().unwrap();
        assert_eq!(a.index(s), Some(7));
        assert_eq!(a.machine_v4(s), Some(Ipv4Addr::new(10, 210, 7, 1)));
        let v6 = a.machine_v6_net(s).unwrap();
        assert_eq!(v6.prefix, 64);
        assert_eq!(a.ula.segments()[0] >> 8, 0xfd);
        let IpAddr::V6(v6a) = v6.addr else { panic!() };
        assert_eq!(v6a.segments()[3], 7);
        assert_eq!(
            a.v6_of(Ipv4Addr::new(10, 210, 7, 1)).unwrap().segments()[7],
            1
        );
        // Outside the network, or not a /24: no address.
        assert_eq!(a.index("10.211.7.0/24".parse().unwrap()), None);
        assert_eq!(a.index("10.210.7.0/25".parse().unwrap()), None);
        // The management address: in the ULA, outside every machine's /64,
        // one per machine id.
        let mg = a.management("m1");
        assert_eq!(mg.segments()[..3], a.ula.segments()[..3]);
        assert_eq!(mg.segments()[3], 0);
        assert_ne!(mg, a.management("m2"));
        assert!(!a.machine_v6_net(s).unwrap().overlaps(&AllowedIp {
            addr: IpAddr::V6(mg),
            prefix: 128
        }));
        // Same cluster, same prefix; another cluster, another prefix.
        assert_eq!(ula_prefix("c1"), MeshAddressing::new("c1", net).ula);
        assert_ne!(ula_prefix("c1"), ula_prefix("c2"));
    }

    #[test]
    fn overlap() {
        let a: AllowedIp = "10.210.1.0/24".parse().unwrap();
        let b: AllowedIp = "10.210.0.0/16".parse().unwrap();
        let c: AllowedIp = "10.210.2.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert_eq!(a.to_string().parse::<AllowedIp>().unwrap(), a);
        assert!("10.0.0.0/33".parse::<AllowedIp>().is_err());
    }
}
