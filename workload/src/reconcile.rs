//! Reconciliation, a pure core: what this machine should run (from the
//! document) against what it runs (from its runtimes), in, and the actions
//! that close the gap, out; plus the restart backoff of crashed workloads.

use std::collections::BTreeMap;

use uc_proto::ContainerId;

/// A container the document places on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub id: ContainerId,
    /// A digest of everything the container is made from (spec, address); a
    /// container whose digest changed is made again.
    pub digest: String,
    pub running: bool,
}

/// What a runtime says of a container it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Running { since_ms: u64 },
    Exited { code: i32, at_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Have {
    pub id: ContainerId,
    pub digest: String,
    pub seen: Seen,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make the container and start it if it should run.
    Create(ContainerId),
    Start(ContainerId),
    Stop(ContainerId),
    /// Stop it if it runs, and delete everything it has.
    Remove(ContainerId),
}

/// Restarts of one container that keeps exiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backoff {
    pub failures: u32,
    /// No restart before this time.
    pub until_ms: u64,
}

/// The first restart waits this long; each failure doubles it up to [`MAX_DELAY_MS`].
pub const FIRST_DELAY_MS: u64 = 500;
pub const MAX_DELAY_MS: u64 = 30_000;
/// A workload that ran this long before exiting starts again from the first delay.
pub const HEALTHY_RUN_MS: u64 = 30_000;

impl Backoff {
    /// The backoff after a container that started at `started_ms` exited at `exited_ms`.
    pub fn after_exit(prev: Option<Backoff>, started_ms: u64, exited_ms: u64) -> Backoff {
        let failures = match prev {
            Some(b) if exited_ms.saturating_sub(started_ms) < HEALTHY_RUN_MS => b.failures + 1,
            _ => 1,
        };
        let delay = FIRST_DELAY_MS
            .saturating_mul(1u64 << (failures - 1).min(16))
            .min(MAX_DELAY_MS);
        Backoff {
            failures,
            until_ms: exited_ms + delay,
        }
    }
}

/// The actions, in order: removals first (they free addresses and names),
/// then creations, then starts and stops.
pub fn reconcile(
    want: &[Want],
    have: &[Have],
    backoff: &BTreeMap<ContainerId, Backoff>,
    now_ms: u64,
) -> Vec<Action> {
    let wanted: BTreeMap<&ContainerId, &Want> = want.iter().map(|w| (&w.id, w)).collect();
    let had: BTreeMap<&ContainerId, &Have> = have.iter().map(|h| (&h.id, h)).collect();
    let mut removes = Vec::new();
    let mut creates = Vec::new();
    let mut others = Vec::new();
    for h in have {
        match wanted.get(&h.id) {
            None => removes.push(Action::Remove(h.id.clone())),
            Some(w) if w.digest != h.digest => {
                removes.push(Action::Remove(h.id.clone()));
                creates.push(Action::Create(h.id.clone()));
            }
            Some(w) => match (w.running, h.seen) {
                (true, Seen::Exited { .. }) => {
                    let wait = backoff.get(&h.id).is_some_and(|b| b.until_ms > now_ms);
                    if !wait {
                        others.push(Action::Start(h.id.clone()));
                    }
                }
                (false, Seen::Running { .. }) => others.push(Action::Stop(h.id.clone())),
                _ => {}
            },
        }
    }
    for w in want {
        if !had.contains_key(&w.id) {
            creates.push(Action::Create(w.id.clone()));
        }
    }
    removes.into_iter().chain(creates).chain(others).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> ContainerId {
        ContainerId::from_bytes([i; 16])
    }
    fn want(i: u8, running: bool) -> Want {
        Want {
            id: id(i),
            digest: "d".into(),
            running,
        }
    }
    fn have(i: u8, seen: Seen) -> Have {
        Have {
            id: id(i),
            digest: "d".into(),
            seen,
        }
    }
    const RUN: Seen = Seen::Running { since_ms: 0 };
    const EXIT: Seen = Seen::Exited { code: 1, at_ms: 0 };

    #[test]
    fn closes_every_gap() {
        let mut changed = have(5, RUN);
        changed.digest = "old".into();
        let acts = reconcile(
            &[want(1, true), want(2, true), want(3, false), want(5, true)],
            &[have(2, EXIT), have(3, RUN), have(4, RUN), changed],
            &BTreeMap::new(),
            1000,
        );
        assert_eq!(
            acts,
            [
                Action::Remove(id(4)),
                Action::Remove(id(5)),
                Action::Create(id(5)),
                Action::Create(id(1)),
                Action::Start(id(2)),
                Action::Stop(id(3)),
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_in_line() {
        let acts = reconcile(
            &[want(1, true), want(2, false)],
            &[have(1, RUN), have(2, EXIT)],
            &BTreeMap::new(),
            0,
        );
        assert!(acts.is_empty());
    }

    #[test]
    fn a_crashed_container_waits_out_its_backoff() {
        let b = BTreeMap::from([(
            id(1),
            Backoff {
                failures: 3,
                until_ms: 5000,
            },
        )]);
        assert!(reconcile(&[want(1, true)], &[have(1, EXIT)], &b, 4999).is_empty());
        assert_eq!(
            reconcile(&[want(1, true)], &[have(1, EXIT)], &b, 5000),
            [Action::Start(id(1))]
        );
    }

    #[test]
    fn backoff_doubles_and_resets_after_a_healthy_run() {
        let b1 = Backoff::after_exit(None, 0, 100);
        assert_eq!(b1.until_ms, 100 + FIRST_DELAY_MS);
        let b2 = Backoff::after_exit(Some(b1), 200, 300);
        assert_eq!((b2.failures, b2.until_ms), (2, 300 + 2 * FIRST_DELAY_MS));
        let mut b = b2;
        for _ in 0..40 {
            b = Backoff::after_exit(Some(b), 0, 1000);
        }
        assert_eq!(b.until_ms, 1000 + MAX_DELAY_MS);
        let reset = Backoff::after_exit(Some(b), 0, HEALTHY_RUN_MS + 1);
        assert_eq!(reset.failures, 1);
    }
}
