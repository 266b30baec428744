//! The DNS wire format, as far as the answer cache needs it: reading the one question of a
//! plain query (and its EDNS record) without allocating, walking a response to find its TTLs, and
//! writing a cached response for a new query. Pure; anything unusual is left to hickory.

/// Header flag bits (RFC 1035 4.1.1, RFC 4035 3.2).
const QR: u8 = 0x80;
const OPCODE: u8 = 0x78;
const AA: u8 = 0x04;
const TC: u8 = 0x02;
const RD: u8 = 0x01;
const AD: u8 = 0x20;
const CD: u8 = 0x10;
const RCODE: u8 = 0x0f;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// The longest name on the wire (RFC 1035 3.1).
const MAX_NAME: usize = 255;
/// Name bytes, type, class, query flags, EDNS marker and payload, DO bit.
pub const MAX_KEY: usize = MAX_NAME + 2 + 2 + 1 + 1 + 2 + 1;

/// A plain query, as read from a datagram: one question of class IN, no answer or authority
/// records, at most an EDNS version 0 record, nothing after it.
#[derive(Debug)]
pub struct Query<'a> {
    pub id: [u8; 2],
    /// The question section as received: name, type and class.
    pub question: &'a [u8],
    key: [u8; MAX_KEY],
    key_len: usize,
}

impl Query<'_> {
    /// What the response depends on: the lower-cased name, type, class, the flags a response
    /// copies (RD, AD, CD) and the client's EDNS payload size and DO bit.
    pub fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads `pkt` as a plain query, or None when it is anything else (hickory then takes it).
pub fn parse_query(pkt: &[u8]) -> Option<Query<'_>> {
    let header = pkt.get(..12)?;
    let (f1, f2) = (header[2], header[3]);
    // A query (not a response), opcode QUERY, not truncated, no response code.
    if f1 & (QR | OPCODE | AA | TC) != 0 || f2 & RCODE != 0 {
        return None;
    }
    let counts = [
        u16_at(pkt, 4)?,
        u16_at(pkt, 6)?,
        u16_at(pkt, 8)?,
        u16_at(pkt, 10)?,
    ];
    if counts[0] != 1 || counts[1] != 0 || counts[2] != 0 || counts[3] > 1 {
        return None;
    }
    let mut key = [0u8; MAX_KEY];
    // The name: uncompressed labels, lower-cased into the key.
    let mut at = 12;
    loop {
        let len = *pkt.get(at)? as usize;
        if len & 0xc0 != 0 {
            return None;
        }
        if at - 12 + 1 + len > MAX_NAME {
            return None;
        }
        let label = pkt.get(at..at + 1 + len)?;
        for (k, b) in key[at - 12..].iter_mut().zip(label) {
            *k = b.to_ascii_lowercase();
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let name_len = at - 12;
    let qtype = u16_at(pkt, at)?;
    let qclass = u16_at(pkt, at + 2)?;
    if qclass != CLASS_IN || qtype == TYPE_OPT {
        return None;
    }
    at += 4;
    let question = &pkt[12..at];
    let mut k = name_len;
    key[k..k + 4].copy_from_slice(&pkt[at - 4..at]);
    k += 4;
    key[k] = (f1 & RD) | (f2 & (AD | CD));
    k += 1;
    if counts[3] == 1 {
        // EDNS: the root name, type OPT, the payload size as class, version 0, options that
        // fill the record exactly.
        if pkt.get(at)? != &0 || u16_at(pkt, at + 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(pkt, at + 3)?;
        let (ext_rcode, version, flags) = (*pkt.get(at + 5)?, *pkt.get(at + 6)?, *pkt.get(at + 7)?);
        if ext_rcode != 0 || version != 0 {
            return None;
        }
        let rdlen = u16_at(pkt, at + 9)? as usize;
        at += 11;
        let options = pkt.get(at..at + rdlen)?;
        let mut o = 0;
        while o < options.len() {
            let olen = u16_at(options, o + 2)? as usize;
            o += 4 + olen;
        }
        if o != options.len() {
            return None;
        }
        at += rdlen;
        key[k] = 1;
        key[k + 1..k + 3].copy_from_slice(&payload.to_be_bytes());
        key[k + 3] = flags & 0x80;
        k += 4;
    } else {
        key[k] = 0;
        k += 1;
    }
    if at != pkt.len() {
        return None;
    }
    Some(Query {
        id: [pkt[0], pkt[1]],
        question,
        key,
        key_len: k,
    })
}

/// What a response says about caching it.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseFacts {
    /// The response code (the header's four bits).
    pub rcode: u8,
    pub truncated: bool,
    pub authoritative: bool,
    /// Where each record's TTL is (OPT excluded), and its value.
    pub ttls: Vec<(usize, u32)>,
}

fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *b.get(at)? as usize;
        match len & 0xc0 {
            0 if len == 0 => return Some(at + 1),
            0 => at += 1 + len,
            0xc0 => {
                b.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Walks a response: its flags and where its TTLs are, or None when it does not parse.
pub fn response_facts(resp: &[u8]) -> Option<ResponseFacts> {
    let header = resp.get(..12)?;
    if header[2] & QR == 0 {
        return None;
    }
    let qd = u16_at(resp, 4)?;
    let rr = u16_at(resp, 6)? as usize + u16_at(resp, 8)? as usize + u16_at(resp, 10)? as usize;
    let mut at = 12;
    for _ in 0..qd {
        at = skip_name(resp, at)? + 4;
    }
    let mut ttls = Vec::with_capacity(rr);
    for _ in 0..rr {
        at = skip_name(resp, at)?;
        let rtype = u16_at(resp, at)?;
        let ttl = u32_at(resp, at + 4)?;
        if rtype != TYPE_OPT {
            ttls.push((at + 4, ttl));
        }
        let rdlen = u16_at(resp, at + 8)? as usize;
        at += 10 + rdlen;
    }
    if at != resp.len() {
        return None;
    }
    Some(ResponseFacts {
        rcode: header[3] & RCODE,
        truncated: header[2] & TC != 0,
        authoritative: header[2] & AA != 0,
        ttls,
    })
}

/// Writes into `out` the response `template` (a response to a query with the same key) for
/// `query`: its id and its question as the client wrote it, and with the TTLs at `ttls` lowered
/// by `age` seconds.
pub fn render(
    template: &[u8],
    query: &Query<'_>,
    ttls: &[(usize, u32)],
    age: u32,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(template);
    out[..2].copy_from_slice(&query.id);
    out[12..12 + query.question.len()].copy_from_slice(query.question);
    if age > 0 {
        for &(at, ttl) in ttls {
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
    }
}

/// Whether `template` answers `query`'s question (same bytes but for the name's case).
pub fn answers(template: &[u8], query: &Query<'_>) -> bool {
    let q = query.question;
    template.len() >= 12 + q.len()
        && u16_at(template, 4) == Some(1)
        && template[12..12 + q.len()].eq_ignore_ascii_case(q)
}

/// Whether the first name after the header has no compression pointer (one there could only
/// point into the header: never a valid name).
pub fn first_name_is_plain(pkt: &[u8]) -> bool {
    let mut at = 12;
    while let Some(&len) = pkt.get(at) {
        match len {
            0 => return true,
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            _ => return false,
        }
    }
    // Too short to hold a question: hickory reads it (or not) as it is.
    true
}

/// The FORMERR response to a datagram hickory could not read, when it has a query's header.
pub fn format_error(pkt: &[u8]) -> Option<[u8; 12]> {
    let h = pkt.get(..12)?;
    if h[2] & QR != 0 {
        return None;
    }
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&h[..2]);
    out[2] = QR | (h[2] & (OPCODE | RD));
    out[3] = (h[3] & CD) | 1;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn keys_ignore_case_and_id_but_not_type_or_edns() {
        let a = query("Web.Internal.", RecordType::A, None);
        let mut b = query("web.internal.", RecordType::A, None);
        b[0] = 9;
        let qa = parse_query(&a).unwrap();
        let qb = parse_query(&b).unwrap();
        assert_eq!(qa.key(), qb.key());
        assert_eq!(qa.question, &a[12..a.len()]);
        assert_eq!(qb.id, [9, 0x34]);
        let c = query("web.internal.", RecordType::AAAA, None);
        assert_ne!(parse_query(&c).unwrap().key(), qa.key());
        let d = query("web.internal.", RecordType::A, Some(1232));
        let e = query("web.internal.", RecordType::A, Some(4096));
        let (kd, ke) = (parse_query(&d).unwrap(), parse_query(&e).unwrap());
        assert_ne!(kd.key(), qa.key());
        assert_ne!(kd.key(), ke.key());
        // RD is part of the key: the response copies it.
        let mut f = a.clone();
        f[2] &= !RD;
        assert_ne!(parse_query(&f).unwrap().key(), qa.key());
    }

    #[test]
    fn anything_but_a_plain_query_is_left_to_hickory() {
        let good = query("web.internal.", RecordType::A, Some(1232));
        assert!(parse_query(&good).is_some());
        // Every truncation, and one byte too many.
        for n in 0..good.len() {
            assert!(parse_query(&good[..n]).is_none(), "{n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(parse_query(&long).is_none());
        let mut resp = good.clone();
        resp[2] |= QR;
        assert!(parse_query(&resp).is_none());
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert!(parse_query(&notify).is_none());
        let mut two = good.clone();
        two[5] = 2;
        assert!(parse_query(&two).is_none());
        // A compression pointer in the question.
        let mut ptr = good.clone();
        ptr[12] = 0xc0;
        assert!(parse_query(&ptr).is_none());
        // EDNS version 1.
        let mut v1 = good.clone();
        let opt = v1.len() - 11;
        v1[opt + 6] = 1;
        assert!(parse_query(&v1).is_none());
        // Class CH.
        let plain = query("web.internal.", RecordType::A, None);
        let mut ch = plain.clone();
        let n = ch.len();
        ch[n - 1] = 3;
        assert!(parse_query(&ch).is_none());
    }

    #[test]
    fn a_name_longer_than_255_bytes_is_refused() {
        let mut pkt = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            pkt.push(63);
            pkt.extend([b'a'; 63]);
        }
        pkt.extend([0, 0, 1, 0, 1]);
        assert!(parse_query(&pkt).is_none());
    }

    #[test]
    fn render_copies_the_id_and_the_question_and_ages_ttls() {
        let q = query("WEB.internal.", RecordType::A, None);
        let query = parse_query(&q).unwrap();
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.add_query(HQuery::query(
            Name::from_ascii("web.internal.").unwrap(),
            RecordType::A,
        ));
        m.add_answer(hickory_proto::rr::Record::from_rdata(
            Name::from_ascii("web.internal.").unwrap(),
            300,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(10, 210, 1, 2)),
        ));
        let template = m.to_vec().unwrap();
        assert!(answers(&template, &query));
        let facts = response_facts(&template).unwrap();
        assert_eq!(facts.ttls.len(), 1);
        assert_eq!(facts.ttls[0].1, 300);
        let mut out = Vec::new();
        render(&template, &query, &facts.ttls, 100, &mut out);
        let got = Message::from_vec(&out).unwrap();
        assert_eq!(got.metadata.id, 0x1234);
        assert_eq!(got.queries[0].name().to_ascii(), "WEB.internal.");
        assert_eq!(got.answers[0].ttl, 200);
        // Another question is not answered by it.
        let other = query_bytes_for("db.internal.");
        assert!(!answers(&template, &parse_query(&other).unwrap()));
    }

    fn query_bytes_for(name: &str) -> Vec<u8> {
        query(name, RecordType::A, None)
    }

    #[test]
    fn a_pointer_in_the_first_name_is_seen() {
        let q = query("web.internal.", RecordType::A, None);
        assert!(first_name_is_plain(&q));
        let mut p = q[..12].to_vec();
        p.extend([3, b'w', b'e', b'b', 0xc0, 0, 0, 1, 0, 1]);
        assert!(!first_name_is_plain(&p));
    }

    #[test]
    fn format_error_keeps_id_and_opcode() {
        let mut q = query("web.internal.", RecordType::A, None);
        q.truncate(14);
        let e = format_error(&q).unwrap();
        let m = Message::from_vec(&e).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(
            m.metadata.response_code,
            hickory_proto::op::ResponseCode::FormErr
        );
        assert!(m.metadata.recursion_desired);
        assert!(format_error(&q[..11]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(b in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_query(&b);
            let _ = response_facts(&b);
            let _ = format_error(&b);
        }
    }
}
