//! Workload networking on one machine: the bridge `ucbr0` that holds the
//! machine's address in its /24 (10.210.X.1/24, the workloads' gateway), and
//! per workload a network namespace (a file bind-mounted in its directory)
//! with a veth whose outer end is a port of the bridge and whose inner end
//! is `eth0` with the workload's fixed address.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

/// The bridge of a machine's workloads.
pub const BRIDGE: &str = "ucbr0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interface {0} not found")]
    NoLink(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

fn sys<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NetError + 'a {
    move |source| NetError::Sys {
        what,
        path: path.to_owned(),
        source,
    }
}

fn handle() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

fn is_code(e: &rtnetlink::Error, code: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -code)
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_code(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// Drops the bridge's neighbour (ARP) entry for `addr`, if any. Packets sent to a workload's
/// address before it existed leave an entry that is incomplete or failed, or, when the
/// address was another workload's before, one with that workload's MAC; the kernel would
/// resolve it again only at its next probe, up to a second or more later. Called once a
/// workload has started, so that the first packet to it asks afresh. Permanent entries (a
/// microVM's, whose MAC uc chose) stay.
pub async fn forget_neighbor(addr: Ipv4Addr) -> Result<(), NetError> {
    delete_neighbors(addr, false).await
}

/// Drops every neighbour entry for `addr` on the bridge, permanent ones too (when the
/// workload that had the address is removed).
pub async fn remove_neighbor(addr: Ipv4Addr) -> Result<(), NetError> {
    delete_neighbors(addr, true).await
}

async fn delete_neighbors(addr: Ipv4Addr, permanent_too: bool) -> Result<(), NetError> {
    use rtnetlink::packet_route::neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourState,
    };
    let h = handle()?;
    let Some(bridge) = link_index(&h, BRIDGE).await? else {
        return Ok(());
    };
    let mut entries = h
        .neighbours()
        .get()
        .set_address_family(rtnetlink::packet_route::AddressFamily::Inet)
        .execute();
    let mut found = Vec::new();
    while let Some(m) = entries.try_next().await.map_err(nl("listing neighbours"))? {
        let is_it = m.header.ifindex == bridge
            && (permanent_too || m.header.state != NeighbourState::Permanent)
            && m.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) if *a == addr)
            });
        if is_it {
            found.push(m);
        }
    }
    for m in found {
        match h.neighbours().del(m).execute().await {
            Ok(()) => {}
            Err(e) if is_code(&e, libc::ENOENT) => {}
            Err(e) => return Err(nl(format!("forgetting the neighbour {addr}"))(e)),
        }
    }
    Ok(())
}

/// Whether this network namespace has a link called `name`.
pub async fn has_link(name: &str) -> Result<bool, NetError> {
    Ok(link_index(&handle()?, name).await?.is_some())
}

/// Makes sure the bridge exists, is up, and has exactly `gateway/prefix` as
/// its IPv4 address (a machine moved to another /24 swaps it); turns on IPv4
/// forwarding, which routing between the bridge and the mesh needs.
pub async fn ensure_bridge(gateway: Ipv4Addr, prefix: u8) -> Result<u32, NetError> {
    let h = handle()?;
    let index = match link_index(&h, BRIDGE).await? {
        Some(i) => i,
        None => {
            let add = h
                .link()
                .add(LinkBridge::new(BRIDGE).build())
                .execute()
                .await;
            if let Err(e) = add
                && !is_code(&e, libc::EEXIST)
            {
                return Err(nl(format!("creating bridge {BRIDGE}"))(e));
            }
            link_index(&h, BRIDGE)
                .await?
                .ok_or_else(|| NetError::NoLink(BRIDGE.into()))?
        }
    };
    let mut have_it = false;
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut stale = Vec::new();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(nl(format!("listing addresses of {BRIDGE}")))?
    {
        let addr = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
            _ => None,
        });
        if let Some(a) = addr {
            if a == gateway && msg.header.prefix_len == prefix {
                have_it = true;
            } else {
                stale.push(msg);
            }
        }
    }
    for msg in stale {
        h.address()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("removing an old address of {BRIDGE}")))?;
    }
    if !have_it {
        let r = h
            .address()
            .add(index, IpAddr::V4(gateway), prefix)
            .execute()
            .await;
        if let Err(e) = r
            && !is_code(&e, libc::EEXIST)
        {
            return Err(nl(format!("adding {gateway}/{prefix} to {BRIDGE}"))(e));
        }
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {BRIDGE} up")))?;
    let fwd = Path::new("/proc/sys/net/ipv4/ip_forward");
    if fs::read_to_string(fwd)
        .map(|s| s.trim() != "1")
        .unwrap_or(true)
    {
        fs::write(fwd, "1").map_err(sys("turning on", fwd))?;
    }
    Ok(index)
}

/// Creates a network namespace held by a bind mount on `path` (a file).
pub fn create_netns(path: &Path) -> Result<(), NetError> {
    fs::write(path, b"").map_err(sys("creating", path))?;
    let p = path.to_owned();
    let r = std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| sys("unsharing a network namespace for", &p)(e.into()))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| sys("bind-mounting a network namespace on", &p)(e.into()))
    })
    .join()
    .expect("netns thread does not panic");
    if r.is_err() {
        let _ = fs::remove_file(path);
    }
    r
}

/// Unmounts and removes a namespace file made by [`create_netns`] (gone already is fine).
pub fn delete_netns(path: &Path) -> Result<(), NetError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(sys("unmounting", path)(e.into())),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(sys("removing", path)(e)),
    }
}

/// The host-side name of a workload's veth (interface names are at most 15 bytes).
pub fn host_ifname(id: &str) -> String {
    format!("uc-{}", &id[..12.min(id.len())])
}

/// Plugs the namespace at `netns` into the bridge: a veth `host_if` on the
/// bridge, `eth0` inside with `addr/prefix`, default route via `gateway`.
pub async fn attach(
    netns: &Path,
    host_if: &str,
    addr: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<(), NetError> {
    let h = handle()?;
    let bridge = link_index(&h, BRIDGE)
        .await?
        .ok_or_else(|| NetError::NoLink(BRIDGE.into()))?;
    if link_index(&h, host_if).await?.is_some() {
        detach(host_if).await?;
    }
    let ns = fs::File::open(netns).map_err(sys("opening", netns))?;
    // One request makes the pair: the outer end a port of the bridge and up, the inner end
    // born in the workload's namespace as eth0. Moving a link into a namespace after the
    // fact waits for the kernel's network-wide RCU grace periods, about 15 ms here.
    let inner_end = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0".to_string())
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    h.link()
        .add(
            LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host_if.to_string())
                .mtu(mtu)
                .controller(bridge)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(inner_end)))
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!(
            "creating veth {host_if} into the workload's namespace"
        )))?;
    // Configure the inside from a thread that entered the namespace: its
    // netlink socket belongs to the namespace it was opened in.
    let inner = std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Connect(e.into()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetError::Connect)?;
        rt.block_on(async move {
            let h = handle()?;
            let lo = link_index(&h, "lo")
                .await?
                .ok_or_else(|| NetError::NoLink("lo".into()))?;
            h.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("bringing lo up"))?;
            let i = link_index(&h, "eth0")
                .await?
                .ok_or_else(|| NetError::NoLink("eth0".into()))?;
            h.address()
                .add(i, IpAddr::V4(addr), prefix)
                .execute()
                .await
                .map_err(nl(format!("adding {addr}/{prefix} to eth0")))?;
            h.link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(nl("bringing eth0 up"))?;
            h.route()
                .add(
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .gateway(gateway)
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("adding the default route via {gateway}")))?;
            Ok(())
        })
    })
    .join()
    .expect("netns thread does not panic");
    if let Err(e) = inner {
        let _ = detach(host_if).await;
        return Err(e);
    }
    Ok(())
}

/// Deletes the workload's veth (its inner end goes with it); gone already is fine.
pub async fn detach(host_if: &str) -> Result<(), NetError> {
    let h = handle()?;
    let Some(i) = link_index(&h, host_if).await? else {
        return Ok(());
    };
    match h.link().del(i).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_code(&e, libc::ENODEV) => Ok(()),
        Err(e) => Err(nl(format!("deleting {host_if}"))(e)),
    }
}
