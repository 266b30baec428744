//! Which endpoint to use for each peer. A machine may advertise several
//! (public IP, LAN addresses); a peer that has had no handshake for a while
//! gets its next endpoint tried; an endpoint the device learned from the
//! peer's own authenticated packets (the peer roamed, or sits behind NAT)
//! is adopted. Pure: time is passed in, in milliseconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::keys::PublicKey;

/// How long a newly configured endpoint gets to complete a handshake
/// before the next one is tried (WireGuard retries a handshake every 5 s).
pub const TRY_FOR: Duration = Duration::from_secs(12);
/// A session with no handshake for this long is dead (WireGuard's
/// REJECT_AFTER_TIME); a healthy one renews every two minutes.
pub const SESSION_DEAD_AFTER: Duration = Duration::from_secs(180);

#[derive(Clone, Debug, Default)]
struct PeerChoice {
    candidates: Vec<SocketAddr>,
    index: usize,
    current: Option<SocketAddr>,
    configured_at_ms: u64,
    learned: bool,
}

/// What the device says of a peer right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    pub endpoint: Option<SocketAddr>,
    /// Time since the last handshake, if there was one.
    pub handshake_age: Option<Duration>,
}

/// The endpoint choice for every peer.
#[derive(Debug, Default)]
pub struct EndpointChooser {
    peers: BTreeMap<PublicKey, PeerChoice>,
}

impl EndpointChooser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint to configure for `key`, given its advertised
    /// `candidates` and what the device observes of it.
    pub fn choose(
        &mut self,
        key: PublicKey,
        candidates: &[SocketAddr],
        observed: Option<Observed>,
        now_ms: u64,
    ) -> Option<SocketAddr> {
        let c = self.peers.entry(key).or_default();
        if c.candidates != candidates {
            c.candidates = candidates.to_vec();
            if !c.learned && c.current.is_none_or(|cur| !candidates.contains(&cur)) {
                c.index = 0;
                c.current = candidates.first().copied();
                c.configured_at_ms = now_ms;
            }
        }
        let alive = observed
            .and_then(|o| o.handshake_age)
            .is_some_and(|age| age < SESSION_DEAD_AFTER);
        if let Some(Observed {
            endpoint: Some(seen),
            ..
        }) = observed
            && alive
            && Some(seen) != c.current
        {
            // The peer reached us from somewhere else and the session is
            // good: keep what works.
            c.current = Some(seen);
            c.learned = !c.candidates.contains(&seen);
            c.configured_at_ms = now_ms;
            return c.current;
        }
        let tried_long_enough =
            now_ms.saturating_sub(c.configured_at_ms) >= TRY_FOR.as_millis() as u64;
        if !alive && tried_long_enough && !c.candidates.is_empty() {
            let next = if c.learned {
                0
            } else {
                (c.index + 1) % c.candidates.len()
            };
            if c.learned || c.candidates.len() > 1 {
                c.index = next;
                c.current = Some(c.candidates[next]);
                c.learned = false;
                c.configured_at_ms = now_ms;
            }
        }
        c.current
    }

    /// An endpoint learned from the peer's packets that it does not
    /// advertise itself (worth publishing so other machines can try it).
    pub fn learned(&self, key: &PublicKey) -> Option<SocketAddr> {
        self.peers
            .get(key)
            .filter(|c| c.learned)
            .and_then(|c| c.current)
    }

    /// Forgets peers that are no longer planned.
    pub fn retain(&mut self, keep: impl Fn(&PublicKey) -> bool) {
        self.peers.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn ep(n: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, n], 51820))
    }

    #[test]
    fn rotates_while_no_handshake_and_stays_once_one_works() {
        let k = PrivateKey::from_bytes([1; 32]).public_key();
        let cands = [ep(1), ep(2), ep(3)];
        let mut c = EndpointChooser::new();
        assert_eq!(c.choose(k, &cands, None, 0), Some(ep(1)));
        let none = Some(Observed {
            endpoint: Some(ep(1)),
            handshake_age: None,
        });
        assert_eq!(c.choose(k, &cands, none, 5_000), Some(ep(1)), "too soon");
        assert_eq!(c.choose(k, &cands, none, 12_000), Some(ep(2)));
        assert_eq!(c.choose(k, &cands, none, 24_000), Some(ep(3)));
        assert_eq!(c.choose(k, &cands, none, 36_000), Some(ep(1)), "wraps");
        let good = Some(Observed {
            endpoint: Some(ep(1)),
            handshake_age: Some(Duration::from_secs(3)),
        });
        for t in [50_000, 100_000, 200_000] {
            assert_eq!(c.choose(k, &cands, good, t), Some(ep(1)));
        }
        // A single endpoint is kept however long it fails.
        let one = [ep(9)];
        let k2 = PrivateKey::from_bytes([2; 32]).public_key();
        assert_eq!(c.choose(k2, &one, None, 0), Some(ep(9)));
        assert_eq!(c.choose(k2, &one, None, 60_000), Some(ep(9)));
    }

    #[test]
    fn adopts_an_endpoint_learned_from_the_peer() {
        let k = PrivateKey::from_bytes([1; 32]).public_key();
        let cands = [ep(1)];
        let mut c = EndpointChooser::new();
        c.choose(k, &cands, None, 0);
        let roamed = SocketAddr::from(([198, 51, 100, 7], 40000));
        let obs = Some(Observed {
            endpoint: Some(roamed),
            handshake_age: Some(Duration::from_secs(1)),
        });
        assert_eq!(c.choose(k, &cands, obs, 1_000), Some(roamed));
        assert_eq!(c.learned(&k), Some(roamed));
        // It goes dead: back to what the peer advertises.
        let dead = Some(Observed {
            endpoint: Some(roamed),
            handshake_age: Some(Duration::from_secs(400)),
        });
        assert_eq!(c.choose(k, &cands, dead, 20_000), Some(ep(1)));
        assert_eq!(c.learned(&k), None);
    }
}
