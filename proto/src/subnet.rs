//! IPv4 subnets as written in the cluster state: `10.210.3.0/24`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: a base address with all host bits zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    addr: Ipv4Addr,
    prefix: u8,
}

/// A malformed subnet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetError {
    #[error("invalid subnet {0:?}: expected ADDRESS/PREFIX, for example 10.210.0.0/16")]
    Syntax(String),
    #[error("invalid subnet {0:?}: prefix length must be 0 to 32")]
    Prefix(String),
    #[error("invalid subnet {0:?}: host bits are set (did you mean {1}?)")]
    HostBits(String, String),
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SubnetError> {
        let text = format!("{addr}/{prefix}");
        if prefix > 32 {
            return Err(SubnetError::Prefix(text));
        }
        let masked = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        if masked != addr {
            return Err(SubnetError::HostBits(text, format!("{masked}/{prefix}")));
        }
        Ok(Self { addr, prefix })
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// The `index`-th subnet of length `prefix` inside this one, if it fits.
    pub fn child(&self, prefix: u8, index: u32) -> Option<Subnet> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let bits = u32::from(prefix - self.prefix);
        if bits < 32 && index >= (1u32 << bits) {
            return None;
        }
        let step = if prefix == 32 {
            1
        } else {
            1u32 << (32 - prefix)
        };
        let base = u32::from(self.addr).checked_add(index.checked_mul(step)?)?;
        Some(Subnet {
            addr: Ipv4Addr::from(base),
            prefix,
        })
    }

    /// The address `host` inside this subnet (host 1 is the first usable one).
    pub fn host(&self, host: u32) -> Option<Ipv4Addr> {
        let size = if self.prefix == 0 {
            u32::MAX
        } else {
            (1u32 << (32 - self.prefix)) - 1
        };
        (host <= size).then(|| Ipv4Addr::from(u32::from(self.addr) + host))
    }

    /// The host part of `ip` inside this subnet, if `ip` is inside it.
    pub fn host_index(&self, ip: Ipv4Addr) -> Option<u32> {
        self.contains(ip)
            .then(|| u32::from(ip) - u32::from(self.addr))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, SubnetError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| SubnetError::Syntax(s.to_owned()))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| SubnetError::Syntax(s.to_owned()))?;
        let prefix: u8 = p.parse().map_err(|_| SubnetError::Prefix(s.to_owned()))?;
        Subnet::new(addr, prefix)
    }
}

impl serde::Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_children_and_hosts() {
        let net: Subnet = "10.210.0.0/16".parse().unwrap();
        let c = net.child(24, 3).unwrap();
        assert_eq!(c.to_string(), "10.210.3.0/24");
        assert_eq!(c.host(1).unwrap(), Ipv4Addr::new(10, 210, 3, 1));
        assert_eq!(c.host_index(Ipv4Addr::new(10, 210, 3, 7)), Some(7));
        assert_eq!(c.host_index(Ipv4Addr::new(10, 210, 4, 7)), None);
        assert!(net.child(24, 256).is_none());
        assert!(net.contains(Ipv4Addr::new(10, 210, 255, 255)));
        assert!(!net.contains(Ipv4Addr::new(10, 211, 0, 1)));
    }

    #[test]
    fn errors_name_the_input() {
        let e = "10.210.1.0/16".parse::<Subnet>().unwrap_err();
        assert_eq!(
            e,
            SubnetError::HostBits("10.210.1.0/16".into(), "10.210.0.0/16".into())
        );
        assert!(matches!(
            "10.210.0.0".parse::<Subnet>(),
            Err(SubnetError::Syntax(_))
        ));
        assert!(matches!(
            "10.210.0.0/40".parse::<Subnet>(),
            Err(SubnetError::Prefix(_))
        ));
        assert!(matches!(
            "banana/8".parse::<Subnet>(),
            Err(SubnetError::Syntax(_))
        ));
    }
}
