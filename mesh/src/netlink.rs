//! Addresses and link state of the mesh interface, through rtnetlink.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::{Handle, LinkUnspec};

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("interface {0} not found")]
    NoLink(String),
    #[error("{what} on interface {link}: {source}")]
    Request {
        what: String,
        link: String,
        source: rtnetlink::Error,
    },
}

async fn handle() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn link_index(h: &Handle, name: &str) -> Result<u32, NetlinkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        _ => Err(NetlinkError::NoLink(name.to_string())),
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// Gives `link` its addresses (each `(address, prefix)`; an address it
/// already has is fine), sets its MTU and brings it up.
pub async fn configure(link: &str, addrs: &[(IpAddr, u8)], mtu: u32) -> Result<(), NetlinkError> {
    let h = handle().await?;
    let index = link_index(&h, link).await?;
    let req = |what: &str, source| NetlinkError::Request {
        what: what.to_string(),
        link: link.to_string(),
        source,
    };
    h.link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(|e| req("setting MTU and up", e))?;
    for (addr, prefix) in addrs {
        let mut add = h.address().add(index, *addr, *prefix);
        if addr.is_ipv6() {
            // Without NODAD a new IPv6 address is "tentative" until the
            // kernel's DAD work runs (asynchronously, under the RTNL lock),
            // and binding to it fails with EADDRNOTAVAIL: the agent binds
            // gossip and its peer API to the management address right after
            // this call. The mesh owns these addresses; there is nothing to
            // detect duplicates against on a point-to-point tunnel.
            add.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Err(e) = add.execute().await
            && !is_exists(&e)
        {
            return Err(req(&format!("adding address {addr}/{prefix}"), e));
        }
    }
    Ok(())
}

/// Removes addresses from `link` (one it does not have is fine).
pub async fn remove_addresses(link: &str, addrs: &[(IpAddr, u8)]) -> Result<(), NetlinkError> {
    let h = handle().await?;
    let index = link_index(&h, link).await?;
    for (addr, prefix) in addrs {
        let mut found = h
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(*addr)
            .set_prefix_length_filter(*prefix)
            .execute();
        while let Ok(Some(msg)) = found.try_next().await {
            h.address()
                .del(msg)
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: format!("removing address {addr}/{prefix}"),
                    link: link.to_string(),
                    source,
                })?;
        }
    }
    Ok(())
}
