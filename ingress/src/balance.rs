//! The pure core of load balancing: in which order to try a route's backends. Local containers
//! first, then the others, each group rotated per request; a backend that just failed is marked
//! down for a while and tried only after every other one. Time is passed in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::routes::Backend;

/// How long a backend that failed stays at the back of the line.
pub const DOWN_FOR: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Balancer {
    next: AtomicUsize,
    down: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    /// The order in which to try `backends` now.
    pub fn order(&self, backends: &[Backend], now: Instant) -> Vec<SocketAddr> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let is_down = |a: &SocketAddr| down.get(a).is_some_and(|until| *until > now);
        let mut out = Vec::with_capacity(backends.len());
        let mut last = Vec::new();
        for local in [true, false] {
            let group: Vec<SocketAddr> = backends
                .iter()
                .filter(|b| b.local == local)
                .map(|b| b.addr)
                .collect();
            if group.is_empty() {
                continue;
            }
            let start = turn % group.len();
            for a in group[start..].iter().chain(&group[..start]) {
                if is_down(a) {
                    last.push(*a);
                } else {
                    out.push(*a);
                }
            }
        }
        out.extend(last);
        out
    }

    /// `addr` failed: try it last until `now + DOWN_FOR`.
    pub fn mark_down(&self, addr: SocketAddr, now: Instant) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        down.retain(|_, until| *until > now);
        down.insert(addr, now + DOWN_FOR);
    }

    /// `addr` answered: it is up again.
    pub fn mark_up(&self, addr: SocketAddr) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if !down.is_empty() {
            down.remove(&addr);
        }
    }

    /// The backends marked down at `now`.
    pub fn down(&self, now: Instant) -> Vec<SocketAddr> {
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<SocketAddr> = down
            .iter()
            .filter(|(_, u)| **u > now)
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(last: u8, local: bool) -> Backend {
        Backend {
            addr: SocketAddr::from(([10, 210, 0, last], 80)),
            local,
        }
    }

    #[test]
    fn local_first_rotated_and_failed_ones_last_until_they_recover() {
        let bal = Balancer::default();
        let t0 = Instant::now();
        let all = [b(1, false), b(2, true), b(3, false), b(4, true)];
        let firsts: Vec<SocketAddr> = (0..4).map(|_| bal.order(&all, t0)[0]).collect();
        assert_eq!(firsts, [all[1].addr, all[3].addr, all[1].addr, all[3].addr]);
        let o = bal.order(&all, t0);
        assert_eq!(o.len(), 4);
        assert!(
            o[..2]
                .iter()
                .all(|a| [all[1].addr, all[3].addr].contains(a))
        );

        bal.mark_down(all[1].addr, t0);
        for _ in 0..3 {
            let o = bal.order(&all, t0 + Duration::from_secs(1));
            assert_eq!(o[0], all[3].addr);
            assert_eq!(o[3], all[1].addr, "a down backend is tried last: {o:?}");
        }
        assert_eq!(bal.down(t0), vec![all[1].addr]);
        let later = t0 + DOWN_FOR + Duration::from_millis(1);
        assert!(bal.down(later).is_empty());
        let firsts: Vec<SocketAddr> = (0..2).map(|_| bal.order(&all, later)[0]).collect();
        assert!(firsts.contains(&all[1].addr), "it is back: {firsts:?}");

        bal.mark_down(all[3].addr, later);
        assert_eq!(bal.down(later), vec![all[3].addr]);
        bal.mark_up(all[3].addr);
        assert!(bal.down(later).is_empty());
    }

    #[test]
    fn no_backends_no_order() {
        assert!(Balancer::default().order(&[], Instant::now()).is_empty());
    }
}
