//! The kernel backend: a WireGuard interface of the kernel's module, made
//! with rtnetlink and configured through WireGuard's generic netlink family,
//! on plain blocking netlink sockets (the kernel answers each request at
//! once). The kernel carries the packets; this process only configures it.
//!
//! Unlike the userspace device, the interface outlives the process if it is
//! killed: [`KernelDevice::create`] removes a WireGuard interface left by an
//! earlier run under the same name, and dropping the device removes it.

use std::io;
use std::time::{Duration, SystemTime};

use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkDeserializable,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use rtnetlink::sys::{Socket, SocketAddr as NlAddr};
use rtnetlink::{LinkUnspec, LinkWireguard};

use crate::addr::AllowedIp;
use crate::device::{Backend, DeviceError, DeviceStatus, MeshDevice, PeerStatus};
use crate::diff::{PeerConfig, PeerOp};
use crate::keys::{PrivateKey, PublicKey};

/// A blocking netlink socket of one protocol, with its sequence numbers.
struct Netlink {
    sock: Socket,
    seq: u32,
}

impl Netlink {
    fn open(protocol: isize) -> io::Result<Netlink> {
        let mut sock = Socket::new(protocol)?;
        sock.bind_auto()?;
        sock.connect(&NlAddr::new(0, 0))?;
        Ok(Netlink { sock, seq: 0 })
    }

    /// Sends `msg` with `flags` and collects the answers, up to the ACK (or,
    /// for a dump, the end of it). An error from the kernel is returned as
    /// the `io::Error` of its errno.
    fn request<T>(&mut self, mut msg: NetlinkMessage<T>, flags: u16) -> io::Result<Vec<T>>
    where
        T: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        msg.header.flags = flags;
        msg.header.sequence_number = self.seq;
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut at = 0;
            while at < data.len() {
                let m = NetlinkMessage::<T>::deserialize(&data[at..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    // The ACK: the end of a request (a dump ends with Done).
                    NetlinkPayload::Error(_) if !dump => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }
}

/// WireGuard's generic netlink family on one socket.
struct Genl {
    nl: Netlink,
    family: u16,
}

impl Genl {
    fn open() -> io::Result<Genl> {
        let mut nl = Netlink::open(NETLINK_GENERIC)?;
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".to_string())],
        });
        let answers = nl.request(NetlinkMessage::from(ask), NLM_F_REQUEST | NLM_F_ACK)?;
        let family = answers
            .iter()
            .flat_map(|m| m.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| io::Error::other("the kernel named no wireguard netlink family"))?;
        Ok(Genl { nl, family })
    }

    fn request(
        &mut self,
        cmd: WireguardCmd,
        attributes: Vec<WireguardAttribute>,
        flags: u16,
    ) -> io::Result<Vec<WireguardMessage>> {
        let mut msg = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
        msg.set_resolved_family_id(self.family);
        let answers = self.nl.request(NetlinkMessage::from(msg), flags)?;
        Ok(answers.into_iter().map(|m| m.payload).collect())
    }
}

/// The index and kind of the link named `name`, if there is one.
fn find_link(route: &mut Netlink, name: &str) -> io::Result<Option<(u32, Option<InfoKind>)>> {
    let mut ask = LinkMessage::default();
    ask.attributes.push(LinkAttribute::IfName(name.to_string()));
    let found = match route.request(
        NetlinkMessage::from(RouteNetlinkMessage::GetLink(ask)),
        NLM_F_REQUEST | NLM_F_ACK,
    ) {
        Ok(found) => found,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(found.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => {
            let kind = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.clone()),
                    _ => None,
                }),
                _ => None,
            });
            Some((l.header.index, kind))
        }
        _ => None,
    }))
}

fn delete_link(route: &mut Netlink, index: u32) -> io::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    route
        .request(
            NetlinkMessage::from(RouteNetlinkMessage::DelLink(msg)),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .map(drop)
}

/// A WireGuard interface of the kernel's module, in the network namespace
/// of the thread that created it. Removed when dropped. Its netlink sockets
/// are opened at creation, so they stay in that namespace whichever thread
/// uses (or drops) the device.
pub struct KernelDevice {
    name: String,
    index: u32,
    route: Netlink,
    genl: Genl,
}

impl KernelDevice {
    /// Makes interface `name` with the key and UDP port given. An old
    /// WireGuard interface with that name (left by a killed agent) is
    /// replaced; any other kind of interface with that name is an error.
    pub fn create(name: &str, private: &PrivateKey, listen_port: u16) -> Result<Self, DeviceError> {
        let err = |message: String| DeviceError::Create {
            name: name.to_string(),
            message,
        };
        let mut route = Netlink::open(NETLINK_ROUTE)
            .map_err(|e| err(format!("opening a netlink socket: {e}")))?;
        let genl = Genl::open().map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                DeviceError::NoKernelModule {
                    name: name.to_string(),
                }
            } else {
                err(format!("opening WireGuard's netlink family: {e}"))
            }
        })?;
        match find_link(&mut route, name)
            .map_err(|e| err(format!("looking for the interface: {e}")))?
        {
            Some((index, Some(InfoKind::Wireguard))) => {
                tracing::info!(
                    interface = name,
                    "removing a WireGuard interface left by an earlier run"
                );
                delete_link(&mut route, index)
                    .map_err(|e| err(format!("removing the old interface: {e}")))?;
            }
            Some((_, kind)) => {
                return Err(err(format!(
                    "an interface of another kind ({}) has this name",
                    kind.map(|k| format!("{k:?}"))
                        .unwrap_or_else(|| "unknown".into())
                )));
            }
            None => {}
        }
        let make = RouteNetlinkMessage::NewLink(LinkWireguard::new(name).build());
        route
            .request(
                NetlinkMessage::from(make),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            )
            .map_err(|e| err(format!("making the interface: {e}")))?;
        let index = match find_link(&mut route, name) {
            Ok(Some((index, _))) => index,
            Ok(None) => return Err(err("the interface vanished right after it was made".into())),
            Err(e) => return Err(err(format!("looking for the new interface: {e}"))),
        };
        // From here on, dropping the device removes the interface.
        let mut dev = KernelDevice {
            name: name.to_string(),
            index,
            route,
            genl,
        };
        let port_err = |what: &str, e: io::Error| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                err(format!("UDP port {listen_port} is taken"))
            } else {
                err(format!("{what}: {e}"))
            }
        };
        dev.set(vec![
            WireguardAttribute::PrivateKey(private.secret_bytes()),
            WireguardAttribute::ListenPort(listen_port),
            WireguardAttribute::Flags(WireguardDeviceFlags::ReplacePeers),
        ])
        .map_err(|e| port_err(&format!("setting its key and port {listen_port}"), e))?;
        // The kernel binds the port when the interface comes up: up at once,
        // so a port in use is an error here, like the userspace device's.
        let up = LinkUnspec::new_with_index(index).up().build();
        dev.route
            .request(
                NetlinkMessage::from(RouteNetlinkMessage::SetLink(up)),
                NLM_F_REQUEST | NLM_F_ACK,
            )
            .map_err(|e| port_err("bringing it up", e))?;
        Ok(dev)
    }

    fn set(&mut self, mut attributes: Vec<WireguardAttribute>) -> io::Result<()> {
        attributes.insert(0, WireguardAttribute::IfIndex(self.index));
        self.genl
            .request(
                WireguardCmd::SetDevice,
                attributes,
                NLM_F_REQUEST | NLM_F_ACK,
            )
            .map(drop)
    }

    fn netlink_error(&self, what: &str, e: io::Error) -> DeviceError {
        DeviceError::Netlink {
            name: self.name.clone(),
            what: what.to_string(),
            source: e,
        }
    }
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        if let Err(e) = delete_link(&mut self.route, self.index) {
            tracing::warn!(interface = %self.name, error = %e, "removing the WireGuard interface");
        }
    }
}

/// One peer as WireGuard's netlink family sets it: in place (a peer the
/// device has keeps its session), its allowed IPs replaced.
fn peer_attributes(key: &PublicKey, config: &PeerConfig) -> WireguardPeer {
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(*key.as_bytes()),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PersistentKeepalive(config.keepalive),
    ];
    if let Some(ep) = config.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(ep));
    }
    attrs.push(WireguardPeerAttribute::AllowedIps(
        config
            .allowed_ips
            .iter()
            .map(|ip| {
                let family = if ip.addr.is_ipv4() {
                    WireguardAddressFamily::Ipv4
                } else {
                    WireguardAddressFamily::Ipv6
                };
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(family),
                    WireguardAllowedIpAttr::IpAddr(ip.addr),
                    WireguardAllowedIpAttr::Cidr(ip.prefix),
                ])
            })
            .collect(),
    ));
    WireguardPeer(attrs)
}

/// The device's changes as netlink peer entries. A peer removed and added
/// again in the same batch (how the diff expresses a change) is updated in
/// place instead, so its session survives, unless the change drops its
/// endpoint (the kernel cannot unset one).
fn peer_entries(ops: &[PeerOp]) -> Vec<WireguardPeer> {
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            PeerOp::Remove(k) => {
                let readded = ops[i + 1..].iter().any(
                    |later| matches!(later, PeerOp::Add(k2, c) if k2 == k && c.endpoint.is_some()),
                );
                if !readded {
                    out.push(WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey(*k.as_bytes()),
                        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                    ]));
                }
            }
            PeerOp::Add(k, config) => out.push(peer_attributes(k, config)),
        }
    }
    out
}

fn status_from(messages: Vec<WireguardMessage>) -> DeviceStatus {
    let mut status = DeviceStatus::default();
    let now = SystemTime::now();
    for a in messages.into_iter().flat_map(|m| m.attributes) {
        match a {
            WireguardAttribute::PublicKey(k) => status.public_key = Some(PublicKey::from_bytes(k)),
            WireguardAttribute::ListenPort(p) => status.listen_port = p,
            WireguardAttribute::Peers(peers) => {
                for s in peers.into_iter().map(|p| peer_status(p, now)) {
                    // A peer with many allowed IPs continues in the next
                    // message of the dump, under the same key.
                    match status.peers.last_mut() {
                        Some(last) if last.public_key == s.public_key => {
                            last.allowed_ips.extend(s.allowed_ips);
                        }
                        _ => status.peers.push(s),
                    }
                }
            }
            _ => {}
        }
    }
    status.peers.sort_by_key(|p| p.public_key);
    status
}

/// One peer of a dump message; the kernel's last handshake (a wall-clock
/// time, zero for none) becomes an age at `now`.
fn peer_status(peer: WireguardPeer, now: SystemTime) -> PeerStatus {
    let mut s = PeerStatus {
        public_key: PublicKey::from_bytes([0; 32]),
        endpoint: None,
        allowed_ips: Vec::new(),
        last_handshake_age: None,
        rx_bytes: 0,
        tx_bytes: 0,
        keepalive: 0,
    };
    for a in peer.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => s.public_key = PublicKey::from_bytes(k),
            WireguardPeerAttribute::Endpoint(ep) => s.endpoint = Some(ep),
            WireguardPeerAttribute::PersistentKeepalive(k) => s.keepalive = k,
            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                let at =
                    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nano_seconds as u32);
                s.last_handshake_age = Some(now.duration_since(at).unwrap_or_default());
            }
            WireguardPeerAttribute::RxBytes(b) => s.rx_bytes = b,
            WireguardPeerAttribute::TxBytes(b) => s.tx_bytes = b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                s.allowed_ips.extend(ips.iter().filter_map(allowed_ip));
            }
            _ => {}
        }
    }
    s
}

fn allowed_ip(ip: &WireguardAllowedIp) -> Option<AllowedIp> {
    let addr = ip.0.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
        _ => None,
    })?;
    let prefix = ip.0.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
        _ => None,
    })?;
    Some(AllowedIp { addr, prefix })
}

impl MeshDevice for KernelDevice {
    fn backend(&self) -> Backend {
        Backend::Kernel
    }

    fn apply(&mut self, ops: &[PeerOp]) -> Result<(), DeviceError> {
        // One peer per message: a message stays far below netlink's size
        // limit however many peers the cluster has.
        for peer in peer_entries(ops) {
            self.set(vec![WireguardAttribute::Peers(vec![peer])])
                .map_err(|e| self.netlink_error("changing a peer", e))?;
        }
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus, DeviceError> {
        let messages = self
            .genl
            .request(
                WireguardCmd::GetDevice,
                vec![WireguardAttribute::IfIndex(self.index)],
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_DUMP,
            )
            .map_err(|e| self.netlink_error("reading the device", e))?;
        Ok(status_from(messages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn config(ep: Option<&str>) -> PeerConfig {
        PeerConfig {
            allowed_ips: vec![
                "10.210.3.0/24".parse().unwrap(),
                "fd00:1:2:3::/64".parse().unwrap(),
            ],
            endpoint: ep.map(|e| e.parse().unwrap()),
            keepalive: 25,
        }
    }

    fn flags(p: &WireguardPeer) -> Option<WireguardPeerFlags> {
        p.0.iter().find_map(|a| match a {
            WireguardPeerAttribute::Flags(f) => Some(*f),
            _ => None,
        })
    }

    #[test]
    fn a_changed_peer_is_updated_in_place() {
        let ops = [
            PeerOp::Remove(key(1)),
            PeerOp::Remove(key(2)),
            PeerOp::Add(key(1), config(Some("192.0.2.1:51820"))),
        ];
        let entries = peer_entries(&ops);
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(flags(&entries[0]), Some(WireguardPeerFlags::RemoveMe));
        assert!(
            entries[0]
                .0
                .contains(&WireguardPeerAttribute::PublicKey([2; 32]))
        );
        assert_eq!(
            flags(&entries[1]),
            Some(WireguardPeerFlags::ReplaceAllowedIps)
        );
        assert!(
            entries[1]
                .0
                .contains(&WireguardPeerAttribute::PublicKey([1; 32]))
        );
    }

    #[test]
    fn a_change_that_drops_the_endpoint_removes_the_peer_first() {
        let ops = [PeerOp::Remove(key(1)), PeerOp::Add(key(1), config(None))];
        let entries = peer_entries(&ops);
        assert_eq!(entries.len(), 2);
        assert_eq!(flags(&entries[0]), Some(WireguardPeerFlags::RemoveMe));
        assert!(
            !entries[1]
                .0
                .iter()
                .any(|a| matches!(a, WireguardPeerAttribute::Endpoint(_)))
        );
    }

    #[test]
    fn a_peer_split_over_two_dump_messages_is_one_peer() {
        let peer = |ip: &str| WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![peer_attributes(
                &key(7),
                &PeerConfig {
                    allowed_ips: vec![ip.parse().unwrap()],
                    endpoint: None,
                    keepalive: 0,
                },
            )])],
        };
        let st = status_from(vec![peer("10.210.1.0/24"), peer("10.210.2.0/24")]);
        assert_eq!(st.peers.len(), 1);
        let ips: Vec<String> = st.peers[0]
            .allowed_ips
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["10.210.1.0/24", "10.210.2.0/24"]);
    }
}
