//! uc's internal DNS: every agent answers `<service>.internal`, `nearest.<service>.internal`,
//! `<container>.<machine>.machine.internal`, `<machine>.machine.internal` and SRV records for a
//! service's ports from its own replica of the state, and forwards every other name upstream.
//!
//! `answer` is the pure core (a view of the state in, records out); `wire` and `cache` are
//! the pure answer cache (whole responses by question); `server` is the I/O shell (uc's UDP
//! loop and hickory-server for TCP, on sockets the caller bound, with a shutdown token), `udp`
//! its batched datagram I/O (`recvmmsg`, `sendmmsg`).

pub mod answer;
pub mod cache;
pub mod server;
pub mod udp;
pub mod wire;

pub use answer::{Answer, ContainerRec, DnsView, MachineRec, PortRec, ServiceRec, answer};
pub use server::{ForwardConfig, Handler, UdpStep, serve};

/// What can go wrong serving DNS.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS server: {0}")]
    Server(String),
}

/// The nameservers of a resolv.conf text (`nameserver IP` lines), port 53.
pub fn parse_resolv_conf(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == "nameserver").then_some(())?;
            let ip: std::net::IpAddr = it.next()?.split('%').next()?.parse().ok()?;
            Some(std::net::SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolv_conf_nameservers() {
        let t = "# x\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\noptions ndots:2\n";
        let got: Vec<String> = super::parse_resolv_conf(t)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["192.0.2.53:53", "[fe80::1]:53"]);
    }
}
