//! uc's userspace WireGuard device: boringtun's Noise sessions ([`Tunn`])
//! driven by uc's own data path, which moves packets in batches.
//!
//! - Out (TUN to network): the TUN device is opened with the kernel's
//!   offloads (virtio-net header, TSO), so one read returns up to 64 KiB of a
//!   TCP flow; it is cut into MTU-sized packets, each is encrypted, and the
//!   packets for one peer go out in one `sendmsg` with UDP GSO.
//! - In (network to TUN): one `recvmmsg` with UDP GRO returns many
//!   datagrams; each is decrypted, checked against the sender's allowed
//!   IPs, and the packets of one TCP flow are coalesced again into one write
//!   to the TUN device.
//! - The in thread, straight after it writes to the TUN device, runs the
//!   out path itself (under the same lock as the out thread, so a flow's
//!   packets keep their order): what the kernel answered at once, such as
//!   an echo reply or a TCP ACK, leaves without waiting for a wake-up.
//! - A timer thread drives handshakes, keepalives and rekeying.
//!
//! The batching (GSO splitting and GRO coalescing on TUN) is tun-rs's, the
//! UDP GSO/GRO is quinn-udp's, the cryptography and timers are boringtun's.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::device::allowed_ips::AllowedIps;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::device::{Backend, DeviceError, DeviceStatus, MeshDevice, PeerStatus};
use crate::diff::{PeerConfig, PeerOp};
use crate::keys::{PrivateKey, PublicKey};

/// Handshakes per second the device takes before it asks for cookies.
/// Each handshake is counted twice (once to find its peer, once by the
/// peer's session), so this is boringtun's 100 per second.
const HANDSHAKE_RATE_LIMIT: u64 = 200;
/// How often every peer's timers run (boringtun's device uses the same).
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Largest IP packet on the interface, with room to spare for any MTU up
/// to the usual Ethernet one.
const MAX_PACKET: usize = 1500;
/// WireGuard's data overhead (header and tag) plus the padding to 16.
const OVERHEAD: usize = 32 + 16;
/// One UDP GRO buffer, and one TUN read: 64 KiB.
const GSO_BUF: usize = 65535;
/// The most one UDP GSO send carries: an IPv4 datagram's payload is at
/// most 65,507 bytes.
const GSO_MAX_BYTES: usize = 65_000;
/// Datagram buffers handed to one `recvmmsg`.
const RECV_BUFS: usize = 4;
/// Kernel socket buffers for the UDP socket (forced past the sysctl
/// limits, which needs CAP_NET_ADMIN; a smaller buffer is kept otherwise).
const SOCKET_BUFFER: usize = 8 << 20;

/// One peer: its session and where it is.
struct Peer {
    key: PublicKey,
    index: u32,
    config: PeerConfig,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    /// Its allowed IPs, to check the source of what it sends.
    sources: AllowedIps<()>,
}

impl Peer {
    fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adopts the address an authenticated packet came from (roaming).
    fn seen_at(&self, addr: SocketAddr) {
        if self.endpoint() != Some(addr) {
            *self.endpoint.write().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        }
    }

    fn tunn(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Peers {
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
    next_index: u32,
}

impl Peers {
    fn new() -> Peers {
        Peers {
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
            next_index: rand_index(),
        }
    }

    fn remove(&mut self, key: &PublicKey) {
        if let Some(p) = self.by_key.remove(key) {
            self.by_index.remove(&p.index);
            self.routes.remove(&|q: &Arc<Peer>| q.key == *key);
        }
    }

    /// A 24-bit index no current peer has (sessions are `index << 8 | n`).
    fn free_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }
}

/// What the device's threads share.
struct Shared {
    name: String,
    tun: SyncDevice,
    udp: std::net::UdpSocket,
    udp_state: UdpSocketState,
    /// The socket is IPv6 (dual-stack): IPv4 peers are written v4-mapped.
    dual_stack: bool,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
    listen_port: u16,
    peers: RwLock<Peers>,
    stop: AtomicBool,
    /// Readable once the device is dropped (its other end is closed), so
    /// threads blocked in `poll` wake at once and idle ones never spin.
    stopped: UnixStream,
    /// Datagrams dropped on arrival (garbage, unknown peers, bad sources).
    dropped: AtomicU64,
    /// The outbound path, run by the out thread when the TUN device wakes
    /// it, and by the in thread straight after it writes to the TUN device:
    /// what the kernel answers at once (an echo reply, a TCP ACK) is
    /// already queued there, and leaves without waiting for a thread to
    /// wake.
    outbound: Mutex<Outbound>,
}

impl Shared {
    fn lock_outbound(&self) -> MutexGuard<'_, Outbound> {
        self.outbound.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outbound path unless another thread is running it.
    fn try_lock_outbound(&self) -> Option<MutexGuard<'_, Outbound>> {
        match self.outbound.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn peers(&self) -> std::sync::RwLockReadGuard<'_, Peers> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn wire_addr(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(a) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            a => a,
        }
    }

    /// Sends `contents` to `to`, as GSO segments of `segment` bytes when
    /// there are several; waits while the socket's buffer is full.
    fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let transmit = Transmit {
            destination: self.wire_addr(to),
            ecn: None,
            contents,
            segment_size: segment.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        loop {
            match self
                .udp_state
                .try_send(UdpSockRef::from(&self.udp), &transmit)
            {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait(self.udp.as_fd(), PollFlags::POLLOUT) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // quinn-udp turns GSO off when the kernel refuses it;
                    // what was refused goes again one datagram at a time.
                    if let Some(s) = transmit.segment_size {
                        for chunk in contents.chunks(s) {
                            self.send(to, chunk, None);
                        }
                    } else {
                        tracing::debug!(interface = %self.name, %to, error = %e, "WireGuard send failed");
                    }
                    return;
                }
            }
        }
    }

    /// Waits until `fd` is ready for `what`; false once the device is
    /// stopping.
    fn wait(&self, fd: BorrowedFd<'_>, what: PollFlags) -> bool {
        self.sleep(Some((fd, what)), PollTimeout::NONE)
    }

    /// Waits for `fd` (if any) or `timeout`; false once the device is
    /// stopping.
    fn sleep(&self, fd: Option<(BorrowedFd<'_>, PollFlags)>, timeout: PollTimeout) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        let stopped = PollFd::new(self.stopped.as_fd(), PollFlags::POLLIN);
        let r = match fd {
            Some((fd, what)) => poll(&mut [PollFd::new(fd, what), stopped], timeout),
            None => poll(&mut [stopped], timeout),
        };
        if let Err(e) = r
            && e != nix::errno::Errno::EINTR
        {
            tracing::warn!(interface = %self.name, error = %e, "poll failed");
            std::thread::sleep(Duration::from_millis(100));
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// The userspace WireGuard device.
pub struct UserspaceDevice {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Closed on drop, which wakes every thread.
    stop_signal: Option<UnixStream>,
}

impl UserspaceDevice {
    /// Creates the TUN interface `name` in this thread's network namespace
    /// with `private` as its key, listening on `listen_port` (UDP, every
    /// address). Addresses and link state are [`crate::netlink`]'s job.
    pub fn create(name: &str, private: &PrivateKey, listen_port: u16) -> Result<Self, DeviceError> {
        let err = |message: String| DeviceError::Create {
            name: name.to_string(),
            message,
        };
        let udp = bind_udp(listen_port).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                err(format!("UDP port {listen_port} is taken"))
            } else {
                err(format!("binding UDP port {listen_port}: {e}"))
            }
        })?;
        let dual_stack = udp.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        let udp_state = UdpSocketState::new(UdpSockRef::from(&udp))
            .map_err(|e| err(format!("UDP socket: {e}")))?;
        grow_buffers(&udp, &udp_state);
        allow_fragments(&udp, dual_stack);
        let tun = tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(true)
            .build_sync()
            .map_err(|e| err(format!("TUN device: {e}")))?;
        tun.set_nonblocking(true)
            .map_err(|e| err(format!("TUN device: {e}")))?;
        let (stop_signal, stopped) =
            UnixStream::pair().map_err(|e| err(format!("socket pair: {e}")))?;
        let secret = private.to_x25519();
        let public = x25519::PublicKey::from(&secret);
        let max_segments = udp_state.max_gso_segments();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            tun,
            udp,
            udp_state,
            dual_stack,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            listen_port,
            peers: RwLock::new(Peers::new()),
            stop: AtomicBool::new(false),
            stopped,
            dropped: AtomicU64::new(0),
            outbound: Mutex::new(Outbound::new(max_segments)),
        });
        tracing::info!(
            interface = name,
            port = listen_port,
            tcp_offload = shared.tun.tcp_gso(),
            udp_gso_segments = shared.udp_state.max_gso_segments(),
            udp_gro_segments = shared.udp_state.gro_segments(),
            "WireGuard device up"
        );
        let mut threads = Vec::new();
        for (what, run) in [
            ("out", outbound as fn(&Shared)),
            ("in", inbound),
            ("timers", timers),
        ] {
            let s = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name(format!("wg-{what}"))
                .spawn(move || run(&s))
                .map_err(|e| err(format!("starting its {what} thread: {e}")))?;
            threads.push(t);
        }
        Ok(UserspaceDevice {
            shared,
            threads,
            stop_signal: Some(stop_signal),
        })
    }

    /// Datagrams dropped on arrival since the start: garbage, unknown peers,
    /// failed authentication, packets from outside a peer's allowed IPs.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.stop_signal.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl MeshDevice for UserspaceDevice {
    fn backend(&self) -> Backend {
        Backend::Userspace
    }

    fn apply(&mut self, ops: &[PeerOp]) -> Result<(), DeviceError> {
        let s = &self.shared;
        let mut peers = s.peers.write().unwrap_or_else(|e| e.into_inner());
        for op in ops {
            match op {
                PeerOp::Remove(k) => peers.remove(k),
                PeerOp::Add(k, config) => {
                    peers.remove(k);
                    let index = peers.free_index();
                    let mut tunn = Tunn::new(
                        s.secret.clone(),
                        x25519::PublicKey::from(*k.as_bytes()),
                        None,
                        (config.keepalive > 0).then_some(config.keepalive),
                        index,
                        Some(Arc::clone(&s.limiter)),
                    );
                    // A new peer with an address is greeted at once, as
                    // the kernel does for a peer with a keepalive: its
                    // tunnel is up before the first packet needs it.
                    if let Some(to) = config.endpoint {
                        let mut buf = [0u8; 256];
                        if let TunnResult::WriteToNetwork(init) =
                            tunn.format_handshake_initiation(&mut buf, false)
                        {
                            s.send(to, init, None);
                        }
                    }
                    let mut sources = AllowedIps::new();
                    for ip in &config.allowed_ips {
                        sources.insert(ip.addr, u32::from(ip.prefix), ());
                    }
                    let peer = Arc::new(Peer {
                        key: *k,
                        index,
                        config: config.clone(),
                        tunn: Mutex::new(tunn),
                        endpoint: RwLock::new(config.endpoint),
                        sources,
                    });
                    for ip in &config.allowed_ips {
                        peers
                            .routes
                            .insert(ip.addr, u32::from(ip.prefix), Arc::clone(&peer));
                    }
                    peers.by_index.insert(index, Arc::clone(&peer));
                    peers.by_key.insert(*k, peer);
                }
            }
        }
        Ok(())
    }

    fn status(&mut self) -> Result<DeviceStatus, DeviceError> {
        let s = &self.shared;
        let mut out: Vec<PeerStatus> = s
            .peers()
            .by_key
            .values()
            .map(|p| {
                let (age, tx, rx, ..) = p.tunn().stats();
                PeerStatus {
                    public_key: p.key,
                    endpoint: p.endpoint(),
                    allowed_ips: p.config.allowed_ips.clone(),
                    last_handshake_age: age,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    keepalive: p.config.keepalive,
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        Ok(DeviceStatus {
            public_key: Some(PublicKey::from_bytes(*s.public.as_bytes())),
            listen_port: s.listen_port,
            peers: out,
        })
    }
}

/// Binds the WireGuard port on every address: dual-stack IPv6 where the
/// host has IPv6, IPv4 alone where it has not.
fn bind_udp(port: u16) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    });
    match v6 {
        Ok(s) => Ok(s.into()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        Err(_) => std::net::UdpSocket::bind(("0.0.0.0", port)),
    }
}

fn grow_buffers(udp: &std::net::UdpSocket, state: &UdpSocketState) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(udp, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = state.set_recv_buffer_size(UdpSockRef::from(udp), SOCKET_BUFFER);
    }
    if setsockopt(udp, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = state.set_send_buffer_size(UdpSockRef::from(udp), SOCKET_BUFFER);
    }
}

/// quinn-udp forbids fragmenting what the socket sends (QUIC probes the
/// path's MTU itself); WireGuard does not, and a tunnel whose interface
/// MTU is larger than the underlay's (PPPoE's 1,492, say) would lose every
/// full-sized packet. Back to the kernel's default: fragment when the
/// route needs it.
fn allow_fragments(udp: &std::net::UdpSocket, dual_stack: bool) {
    use rustix::net::sockopt::{
        Ipv4PathMtuDiscovery, Ipv6PathMtuDiscovery, set_ip_mtu_discover, set_ipv6_mtu_discover,
    };
    let _ = set_ip_mtu_discover(udp, Ipv4PathMtuDiscovery::WANT);
    if dual_stack {
        let _ = set_ipv6_mtu_discover(udp, Ipv6PathMtuDiscovery::WANT);
    }
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Consecutive encrypted packets for one peer, sent as one GSO write.
struct Run {
    buf: Vec<u8>,
    len: usize,
    /// The size of every segment but the last.
    segment: usize,
    count: usize,
    /// A shorter segment ended the run.
    closed: bool,
    max_segments: usize,
}

impl Run {
    fn new(max_segments: usize) -> Run {
        Run {
            buf: vec![0; GSO_MAX_BYTES + MAX_PACKET + OVERHEAD],
            len: 0,
            segment: 0,
            count: 0,
            closed: false,
            max_segments: max_segments.max(1),
        }
    }

    /// Room at the end for one more encrypted packet.
    fn tail(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// Whether a datagram of `n` bytes, just written at the tail, may join.
    fn fits(&self, n: usize) -> bool {
        self.count == 0
            || (!self.closed
                && n <= self.segment
                && self.count < self.max_segments
                && self.len + n <= GSO_MAX_BYTES)
    }

    /// Takes the `n` bytes written at the tail into the run.
    fn push(&mut self, n: usize) {
        if self.count == 0 {
            self.segment = n;
        } else if n < self.segment {
            self.closed = true;
        }
        self.len += n;
        self.count += 1;
    }

    /// Sends the run (if any) and starts afresh, keeping `keep` bytes that
    /// were written at the tail and did not fit.
    fn flush(&mut self, s: &Shared, to: Option<SocketAddr>, keep: usize) {
        if self.count > 0
            && let Some(to) = to
        {
            s.send(to, &self.buf[..self.len], Some(self.segment));
        }
        if keep > 0 {
            self.buf.copy_within(self.len..self.len + keep, 0);
        }
        self.len = 0;
        self.count = 0;
        self.closed = false;
    }
}

/// The outbound path's buffers. Whoever holds them reads the TUN device,
/// so packets of one flow leave in the order they were read.
struct Outbound {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    run: Run,
}

impl Outbound {
    fn new(max_segments: usize) -> Outbound {
        Outbound {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + GSO_BUF],
            bufs: vec![vec![0u8; MAX_PACKET]; IDEAL_BATCH_SIZE],
            sizes: vec![0usize; IDEAL_BATCH_SIZE],
            run: Run::new(max_segments),
        }
    }

    /// Reads the TUN device until it is empty: split, encrypt, send in GSO
    /// runs per peer.
    fn drain(&mut self, s: &Shared) {
        loop {
            let n =
                match s
                    .tun
                    .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!(interface = %s.name, error = %e, "reading the TUN device");
                        break;
                    }
                };
            self.run.max_segments = s.udp_state.max_gso_segments().max(1);
            let peers = s.peers();
            let mut current: Option<(Arc<Peer>, MutexGuard<'_, Tunn>)> = None;
            for (buf, &size) in self.bufs.iter().zip(&self.sizes).take(n) {
                let packet = &buf[..size];
                let Some(dst) = Tunn::dst_address(packet) else {
                    continue;
                };
                let Some(peer) = peers.routes.find(dst) else {
                    continue;
                };
                if current.as_ref().is_none_or(|(p, _)| !Arc::ptr_eq(p, peer)) {
                    if let Some((p, guard)) = current.take() {
                        drop(guard);
                        self.run.flush(s, p.endpoint(), 0);
                    }
                    // The guard borrows the peer through `peers`, which
                    // outlives this batch.
                    current = Some((Arc::clone(peer), peer.tunn()));
                }
                let Some((p, tunn)) = current.as_mut() else {
                    continue;
                };
                let written = match tunn.encapsulate(packet, self.run.tail()) {
                    TunnResult::WriteToNetwork(out) => out.len(),
                    TunnResult::Err(e) => {
                        tracing::debug!(interface = %s.name, error = ?e, "encapsulating");
                        continue;
                    }
                    _ => continue,
                };
                if !self.run.fits(written) {
                    let to = p.endpoint();
                    self.run.flush(s, to, written);
                }
                self.run.push(written);
            }
            if let Some((p, guard)) = current.take() {
                drop(guard);
                self.run.flush(s, p.endpoint(), 0);
            }
        }
    }
}

/// TUN to network, woken by the TUN device.
fn outbound(s: &Shared) {
    while s.wait(s.tun.as_fd(), PollFlags::POLLIN) {
        s.lock_outbound().drain(s);
    }
}

/// Packets decrypted for the TUN device, each behind room for the
/// virtio-net header, waiting to be coalesced and written.
struct ToTun {
    bufs: Vec<Vec<u8>>,
    count: usize,
    gro: GROTable,
}

impl ToTun {
    fn new() -> ToTun {
        ToTun {
            // Room for a whole coalesced flow in each, touched only as used.
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + GSO_BUF))
                .collect(),
            count: 0,
            gro: GROTable::default(),
        }
    }

    /// The next buffer, long enough for one packet, to decrypt into.
    fn next(&mut self) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.count];
        b.resize(VIRTIO_NET_HDR_LEN + MAX_PACKET, 0);
        b
    }

    fn flush(&mut self, s: &Shared) {
        if self.count == 0 {
            return;
        }
        if let Err(e) = s.tun.send_multiple(
            &mut self.gro,
            &mut self.bufs[..self.count],
            VIRTIO_NET_HDR_LEN,
        ) {
            tracing::debug!(interface = %s.name, error = %e, "writing to the TUN device");
        }
        self.count = 0;
    }
}

/// Network to TUN: receive in batches, decrypt, check, coalesce, write.
fn inbound(s: &Shared) {
    let mut storage = vec![vec![0u8; GSO_BUF]; RECV_BUFS];
    let mut meta = vec![RecvMeta::default(); RECV_BUFS];
    let mut to_tun = ToTun::new();
    let mut scratch = vec![0u8; GSO_BUF];
    while s.wait(s.udp.as_fd(), PollFlags::POLLIN) {
        loop {
            let n = {
                let mut iovs: Vec<IoSliceMut<'_>> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                match s
                    .udp_state
                    .recv(UdpSockRef::from(&s.udp), &mut iovs, &mut meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::debug!(interface = %s.name, error = %e, "receiving");
                        break;
                    }
                }
            };
            let peers = s.peers();
            for (m, buf) in meta.iter().zip(&storage).take(n) {
                let from = canonical(m.addr);
                let stride = m.stride.max(1);
                for datagram in buf[..m.len].chunks(stride) {
                    if !receive(s, &peers, from, datagram, &mut to_tun, &mut scratch) {
                        s.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    if to_tun.count == to_tun.bufs.len() {
                        to_tun.flush(s);
                    }
                }
            }
            drop(peers);
            to_tun.flush(s);
            // Unless the out thread is at it already.
            if let Some(mut out) = s.try_lock_outbound() {
                out.drain(s);
            }
        }
    }
}

/// Handles one datagram; false if it was dropped.
fn receive(
    s: &Shared,
    peers: &Peers,
    from: SocketAddr,
    datagram: &[u8],
    to_tun: &mut ToTun,
    scratch: &mut [u8],
) -> bool {
    let peer = match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::HandshakeInit(p)) => {
            // Check mac1 (and, under load, the cookie) before the
            // Diffie-Hellman that finds out who is asking.
            match s.limiter.verify_packet(Some(from.ip()), datagram, scratch) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    s.send(from, cookie, None);
                    return true;
                }
                Err(_) => return false,
            }
            match parse_handshake_anon(&s.secret, &s.public, &p) {
                Ok(half) => peers
                    .by_key
                    .get(&PublicKey::from_bytes(half.peer_static_public)),
                Err(_) => None,
            }
        }
        Ok(Packet::HandshakeResponse(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
        Ok(Packet::PacketCookieReply(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
        Ok(Packet::PacketData(p)) => peers.by_index.get(&(p.receiver_idx >> 8)),
        Err(_) => None,
    };
    let Some(peer) = peer else {
        return false;
    };
    let mut tunn = peer.tunn();
    let out = to_tun.next();
    match tunn.decapsulate(Some(from.ip()), datagram, &mut out[VIRTIO_NET_HDR_LEN..]) {
        TunnResult::Done => {
            peer.seen_at(from);
            true
        }
        TunnResult::WriteToNetwork(reply) => {
            s.send(from, reply, None);
            // Packets that waited for this handshake go now.
            while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], scratch) {
                s.send(from, queued, None);
            }
            peer.seen_at(from);
            true
        }
        TunnResult::WriteToTunnelV4(packet, src) => {
            let len = packet.len();
            accept(peer, from, IpAddr::V4(src), len, to_tun)
        }
        TunnResult::WriteToTunnelV6(packet, src) => {
            let len = packet.len();
            accept(peer, from, IpAddr::V6(src), len, to_tun)
        }
        TunnResult::Err(WireGuardError::DuplicateCounter) => false,
        TunnResult::Err(e) => {
            tracing::trace!(interface = %s.name, %from, error = ?e, "dropped a datagram");
            false
        }
    }
}

/// Queues a decrypted packet for the TUN device if its source is one of
/// the peer's allowed IPs (WireGuard's cryptokey routing).
fn accept(peer: &Peer, from: SocketAddr, src: IpAddr, len: usize, to_tun: &mut ToTun) -> bool {
    peer.seen_at(from);
    if peer.sources.find(src).is_none() {
        return false;
    }
    let n = to_tun.count;
    to_tun.bufs[n].truncate(VIRTIO_NET_HDR_LEN + len);
    to_tun.count += 1;
    true
}

/// Handshakes, keepalives and rekeying for every peer; the handshake rate
/// limit's window.
fn timers(s: &Shared) {
    let mut buf = vec![0u8; MAX_PACKET + OVERHEAD];
    let mut window = Instant::now();
    while s.sleep(None, PollTimeout::from(TIMER_TICK.as_millis() as u16)) {
        if window.elapsed() >= Duration::from_secs(1) {
            s.limiter.reset_count();
            window = Instant::now();
        }
        let peers: Vec<Arc<Peer>> = s.peers().by_key.values().cloned().collect();
        for p in peers {
            let mut tunn = p.tunn();
            match tunn.update_timers(&mut buf) {
                TunnResult::WriteToNetwork(packet) => {
                    if let Some(to) = p.endpoint() {
                        s.send(to, packet, None);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => {
                    tracing::debug!(interface = %s.name, peer = %p.key, error = ?e, "peer timers");
                }
                _ => {}
            }
        }
    }
}
