//! Datagrams in batches: `recvmmsg` takes every query waiting on the socket (up to [`BATCH`]) in
//! one system call, and `sendmmsg` sends their responses in one more, where one `recvfrom` and
//! one `sendto` per query would cost two calls each.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage};
use rustix::net::addr::SocketAddrArg;
use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags};

/// Datagrams read or written per system call.
pub const BATCH: usize = 32;

/// Reads the datagrams waiting on `socket` into `bufs` (one per buffer, at most `bufs.len()`),
/// appending each one's length and sender to `got`. Datagrams longer than their buffer, or from
/// no IP address, are dropped. `WouldBlock` when none is waiting.
pub fn recv_batch(
    socket: &impl AsRawFd,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, SocketAddr)>,
) -> io::Result<()> {
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
    let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [IoSliceMut::new(b.as_mut_slice())])
        .collect();
    let received = nix::sys::socket::recvmmsg(
        socket.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)?;
    for m in received {
        // A dropped datagram keeps its slot (length 0), so entries stay in step with buffers.
        let from = m.address.as_ref().and_then(std_addr);
        got.push(match from {
            Some(from) if !m.flags.contains(MsgFlags::MSG_TRUNC) => (m.bytes, from),
            _ => (0, SocketAddr::from(([0, 0, 0, 0], 0))),
        });
    }
    Ok(())
}

fn std_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    if let Some(v6) = a.as_sockaddr_in6() {
        return Some(SocketAddr::V6(SocketAddrV6::from(*v6)));
    }
    None
}

/// Sends `msgs[i]` to `to[i]` for each i, in as few calls as the kernel takes them. Returns how
/// many were sent from the start: fewer than all when the socket's buffer is full
/// (`WouldBlock` when not even the first fit) or a message failed.
pub fn send_batch(socket: &impl AsFd, msgs: &[Vec<u8>], to: &[SocketAddr]) -> io::Result<usize> {
    let n = msgs.len().min(to.len());
    let addrs: Vec<_> = to[..n].iter().map(|a| a.as_any()).collect();
    let iovs: Vec<[IoSlice<'_>; 1]> = msgs[..n].iter().map(|m| [IoSlice::new(m)]).collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
        (0..n).map(|_| SendAncillaryBuffer::default()).collect();
    let mut hdrs: Vec<MMsgHdr<'_>> = addrs
        .iter()
        .zip(&iovs)
        .zip(controls.iter_mut())
        .map(|((a, iov), c)| MMsgHdr::new_with_addr(a, iov, c))
        .collect();
    Ok(rustix::net::sendmmsg(
        socket,
        &mut hdrs,
        SendFlags::DONTWAIT,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_out_and_comes_in_with_its_senders() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx6 = std::net::UdpSocket::bind("[::1]:0").ok();
        let to = rx.local_addr().unwrap();
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
        assert_eq!(send_batch(&tx, &msgs, &[to; 5]).unwrap(), 5);
        // One too long for its buffer.
        tx.send_to(&[9u8; 100], to).unwrap();
        let mut bufs = vec![vec![0u8; 64]; 8];
        let mut got = Vec::new();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut peek = [0u8; 1];
        rx.peek_from(&mut peek).unwrap();
        // The kernel may hand them over in more than one call.
        while got.len() < 6 {
            recv_batch(&rx, &mut bufs[got.len()..], &mut got).unwrap();
        }
        for (i, (len, from)) in got.iter().take(5).enumerate() {
            assert_eq!(*len, 10 + i);
            assert_eq!(&bufs[i][..*len], &msgs[i][..]);
            assert_eq!(*from, tx.local_addr().unwrap());
        }
        assert_eq!(got[5].0, 0, "a truncated datagram is dropped");
        let err = recv_batch(&rx, &mut bufs, &mut got).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // IPv6 senders come back as IPv6 addresses.
        if let Some(rx6) = rx6 {
            let tx6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
            assert_eq!(
                send_batch(&tx6, &msgs[..1], &[rx6.local_addr().unwrap()]).unwrap(),
                1
            );
            rx6.set_read_timeout(Some(std::time::Duration::from_secs(1)))
                .unwrap();
            rx6.peek_from(&mut peek).unwrap();
            let mut got6 = Vec::new();
            recv_batch(&rx6, &mut bufs, &mut got6).unwrap();
            assert_eq!(got6, [(10, tx6.local_addr().unwrap())]);
        }
    }
}
