//! The answer cache: whole responses, by question, so a repeated question costs a lookup and a
//! copy instead of a parse, an answer and an encoding. Pure: the clock is passed in.
//!
//! Two kinds of entries:
//! - the cluster's names, answered from one view of the state: kept until the view changes.
//!   A name whose addresses rotate per query keeps one response per turn of the rotation;
//! - forwarded names: kept for the shortest TTL in the response (at most [`MAX_FORWARD_TTL`]),
//!   their TTLs lowered by their age when served.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::answer::DnsView;
use crate::wire::{self, Query};

/// Entries kept at most, of each kind; past it, the kind is emptied.
pub const MAX_ENTRIES: usize = 10_000;
/// The longest a forwarded response is kept.
pub const MAX_FORWARD_TTL: u32 = 300;
/// Rotations longer than this are not cached (a service with that many containers).
pub const MAX_PERIOD: usize = 64;

struct Response {
    bytes: Box<[u8]>,
    ttls: Vec<(usize, u32)>,
}

struct Local {
    /// One response per turn of the rotation.
    turns: Vec<Option<Response>>,
}

struct Forwarded {
    response: Response,
    born: Instant,
    expires: Instant,
}

/// Responses by [`Query::key`].
pub struct AnswerCache {
    /// The view the local entries were answered from.
    view: Option<Arc<DnsView>>,
    local: HashMap<Box<[u8]>, Local>,
    forwarded: HashMap<Box<[u8]>, Forwarded>,
}

impl Default for AnswerCache {
    fn default() -> Self {
        Self::new()
    }
}

impl AnswerCache {
    pub fn new() -> AnswerCache {
        AnswerCache {
            view: None,
            local: HashMap::new(),
            forwarded: HashMap::new(),
        }
    }

    /// Local entries answered from another view than `view` are dropped.
    pub fn set_view(&mut self, view: &Arc<DnsView>) {
        if !self.view.as_ref().is_some_and(|v| Arc::ptr_eq(v, view)) {
            self.local.clear();
            self.view = Some(view.clone());
        }
    }

    /// Writes the response to `query` into `out` if one is kept; `rotate` is the query's turn.
    pub fn get(
        &mut self,
        query: &Query<'_>,
        rotate: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let key = query.key();
        if let Some(l) = self.local.get(key) {
            let turn = rotate % l.turns.len();
            if let Some(r) = &l.turns[turn] {
                wire::render(&r.bytes, query, &r.ttls, 0, out);
                return true;
            }
            return false;
        }
        if let Some(f) = self.forwarded.get(key) {
            if now < f.expires {
                let age = now.duration_since(f.born).as_secs() as u32;
                wire::render(&f.response.bytes, query, &f.response.ttls, age, out);
                return true;
            }
            self.forwarded.remove(key);
        }
        false
    }

    /// Keeps `response`, answered from `view` at turn `rotate` of a rotation of `period` turns.
    /// Ignored unless it is a whole NOERROR or NXDOMAIN response to `query`, and `view` is the
    /// cache's view.
    pub fn put_local(
        &mut self,
        query: &Query<'_>,
        view: &Arc<DnsView>,
        rotate: usize,
        period: usize,
        response: &[u8],
    ) {
        if period == 0 || period > MAX_PERIOD {
            return;
        }
        if !self.view.as_ref().is_some_and(|v| Arc::ptr_eq(v, view)) {
            return;
        }
        let Some(r) = cacheable(query, response) else {
            return;
        };
        if self.local.len() >= MAX_ENTRIES && !self.local.contains_key(query.key()) {
            self.local.clear();
        }
        let entry = self
            .local
            .entry(query.key().into())
            .or_insert_with(|| Local {
                turns: (0..period).map(|_| None).collect(),
            });
        if entry.turns.len() != period {
            return;
        }
        entry.turns[rotate % period] = Some(r);
    }

    /// Keeps a forwarded `response` for its shortest TTL.
    pub fn put_forwarded(&mut self, query: &Query<'_>, response: &[u8], now: Instant) {
        let Some(r) = cacheable(query, response) else {
            return;
        };
        let Some(ttl) = r.ttls.iter().map(|t| t.1).min() else {
            return;
        };
        let ttl = ttl.min(MAX_FORWARD_TTL);
        if ttl == 0 {
            return;
        }
        if self.forwarded.len() >= MAX_ENTRIES {
            self.forwarded.retain(|_, f| now < f.expires);
            if self.forwarded.len() >= MAX_ENTRIES {
                self.forwarded.clear();
            }
        }
        self.forwarded.insert(
            query.key().into(),
            Forwarded {
                response: r,
                born: now,
                expires: now + Duration::from_secs(ttl.into()),
            },
        );
    }

    /// Entries kept: local, forwarded.
    pub fn len(&self) -> (usize, usize) {
        (self.local.len(), self.forwarded.len())
    }

    pub fn is_empty(&self) -> bool {
        self.local.is_empty() && self.forwarded.is_empty()
    }
}

/// A whole NOERROR or NXDOMAIN response to `query`'s question.
fn cacheable(query: &Query<'_>, response: &[u8]) -> Option<Response> {
    let facts = wire::response_facts(response)?;
    if facts.truncated || !matches!(facts.rcode, 0 | 3) || !wire::answers(response, query) {
        return None;
    }
    Some(Response {
        bytes: response.into(),
        ttls: facts.ttls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_query;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(HQuery::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    fn response(name: &str, ttl: u32, last: u8, code: ResponseCode) -> Vec<u8> {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = code;
        let n = Name::from_ascii(name).unwrap();
        m.add_query(HQuery::query(n.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(n, ttl, RData::A(A::new(10, 0, 0, last))));
        m.to_vec().unwrap()
    }

    fn last_octet(resp: &[u8]) -> u8 {
        match Message::from_vec(resp).unwrap().answers[0].data {
            RData::A(a) => a.0.octets()[3],
            _ => panic!("not an A record"),
        }
    }

    #[test]
    fn local_entries_keep_each_turn_and_go_with_the_view() {
        let (v1, v2) = (Arc::new(DnsView::default()), Arc::new(DnsView::default()));
        let mut c = AnswerCache::new();
        c.set_view(&v1);
        let q = query("web.internal.");
        let q = parse_query(&q).unwrap();
        let now = Instant::now();
        let mut out = Vec::new();
        assert!(!c.get(&q, 0, now, &mut out));
        c.put_local(
            &q,
            &v1,
            0,
            2,
            &response("web.internal.", 5, 2, ResponseCode::NoError),
        );
        c.put_local(
            &q,
            &v1,
            3,
            2,
            &response("web.internal.", 5, 3, ResponseCode::NoError),
        );
        assert!(c.get(&q, 4, now, &mut out));
        assert_eq!(last_octet(&out), 2);
        assert!(c.get(&q, 5, now, &mut out));
        assert_eq!(last_octet(&out), 3);
        // Answered from another view than the cache's: not kept.
        let q2 = query("db.internal.");
        let q2 = parse_query(&q2).unwrap();
        c.put_local(
            &q2,
            &v2,
            0,
            1,
            &response("db.internal.", 5, 9, ResponseCode::NoError),
        );
        assert!(!c.get(&q2, 0, now, &mut out));
        // A new view drops every local entry.
        c.set_view(&v2);
        assert!(!c.get(&q, 4, now, &mut out));
        assert!(c.is_empty());
    }

    #[test]
    fn errors_truncations_and_other_questions_are_not_kept() {
        let v = Arc::new(DnsView::default());
        let mut c = AnswerCache::new();
        c.set_view(&v);
        let q = query("web.internal.");
        let q = parse_query(&q).unwrap();
        let now = Instant::now();
        c.put_local(
            &q,
            &v,
            0,
            1,
            &response("web.internal.", 5, 2, ResponseCode::ServFail),
        );
        c.put_local(
            &q,
            &v,
            0,
            1,
            &response("db.internal.", 5, 2, ResponseCode::NoError),
        );
        let mut tc = response("web.internal.", 5, 2, ResponseCode::NoError);
        tc[2] |= 0x02;
        c.put_local(&q, &v, 0, 1, &tc);
        c.put_forwarded(
            &q,
            &response("web.internal.", 0, 2, ResponseCode::NoError),
            now,
        );
        c.put_local(
            &q,
            &v,
            0,
            MAX_PERIOD + 1,
            &response("web.internal.", 5, 2, ResponseCode::NoError),
        );
        assert!(c.is_empty());
    }

    #[test]
    fn forwarded_entries_age_and_expire() {
        let mut c = AnswerCache::new();
        let q = query("example.com.");
        let q = parse_query(&q).unwrap();
        let t0 = Instant::now();
        c.put_forwarded(
            &q,
            &response("example.com.", 30, 1, ResponseCode::NoError),
            t0,
        );
        let mut out = Vec::new();
        assert!(c.get(&q, 0, t0 + Duration::from_secs(10), &mut out));
        assert_eq!(Message::from_vec(&out).unwrap().answers[0].ttl, 20);
        assert!(!c.get(&q, 0, t0 + Duration::from_secs(30), &mut out));
        assert_eq!(c.len(), (0, 0));
        // TTLs beyond the bound are kept only that long.
        c.put_forwarded(
            &q,
            &response("example.com.", 86400, 1, ResponseCode::NoError),
            t0,
        );
        assert!(c.get(&q, 0, t0 + Duration::from_secs(299), &mut out));
        assert!(!c.get(&q, 0, t0 + Duration::from_secs(300), &mut out));
    }

    #[test]
    fn the_cache_is_bounded() {
        let v = Arc::new(DnsView::default());
        let mut c = AnswerCache::new();
        c.set_view(&v);
        for i in 0..MAX_ENTRIES + 5 {
            let name = format!("s{i}.internal.");
            let q = query(&name);
            let q = parse_query(&q).unwrap();
            c.put_local(&q, &v, 0, 1, &response(&name, 5, 1, ResponseCode::NoError));
            c.put_forwarded(
                &q,
                &response(&name, 5, 1, ResponseCode::NoError),
                Instant::now(),
            );
        }
        let (l, f) = c.len();
        assert!(l <= MAX_ENTRIES && f <= MAX_ENTRIES, "{l} {f}");
        assert!(l > 0 && f > 0);
    }
}
