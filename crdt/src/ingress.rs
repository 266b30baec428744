//! The ingress's part of the document: certificates (so every ingress machine serves the same
//! one), ACME HTTP-01 challenges (so whichever ingress machine the CA reaches answers), the
//! ACME account, and each hostname's order status (who is ordering, until when; failures and
//! when to try again), so that one machine orders at a time and `uc ingress ls` can show it.
//!
//! Layout: scalars at the root, one per record, the value JSON text, so that a record changes
//! as a whole (a concurrent write picks one winner) and no new top-level map has to be created
//! in documents that exist already:
//!
//! ```text
//! ROOT
//!   "cert/<host>":            CertRecord
//!   "acme_challenge/<token>": Challenge
//!   "acme_order/<host>":      OrderStatus
//!   "acme_account":           AcmeAccount
//! ```

use std::collections::BTreeMap;

use automerge::ROOT;
use automerge::transaction::Transactable;
use automerge::{ReadDoc, ScalarValue};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uc_proto::MachineId;

use crate::error::Error;
use crate::state::{ClusterState, malformed};

const CERT: &str = "cert/";
const CHALLENGE: &str = "acme_challenge/";
const ORDER: &str = "acme_order/";
const ACCOUNT: &str = "acme_account";

/// A certificate for one hostname, as issued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub chain_pem: String,
    /// The private key (PEM). The document is the cluster's: every machine has it.
    pub key_pem: String,
    /// Validity, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    pub issued_by: MachineId,
    pub issued_at_ms: u64,
}

/// An HTTP-01 challenge being validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub key_auth: String,
    /// Dropped after this even if the machine that published it never withdraws it.
    pub expires_at_ms: u64,
}

/// Where a hostname's certificate order stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStatus {
    /// The machine ordering now, and until when its claim holds.
    pub ordering: Option<MachineId>,
    pub lease_until_ms: u64,
    /// Failures in a row, the last one's message, and when to try again.
    pub failures: u32,
    pub last_error: Option<String>,
    pub next_try_ms: u64,
}

/// The ACME account of the cluster at one CA directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeAccount {
    pub directory: String,
    /// instant-acme's credentials (JSON text).
    pub credentials: String,
}

impl ClusterState {
    fn json_scalars<T: DeserializeOwned>(&self, prefix: &str) -> BTreeMap<String, T> {
        self.doc
            .keys(ROOT)
            .filter_map(|k| {
                let name = k.strip_prefix(prefix)?.to_owned();
                Some((name, self.json_scalar(&k)?))
            })
            .collect()
    }

    fn json_scalar<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let text = crate::state::get_str(&self.doc, &ROOT, key)?;
        serde_json::from_str(&text).ok()
    }

    fn put_json(&mut self, key: &str, v: &impl Serialize) -> Result<(), Error> {
        let text = serde_json::to_string(v).map_err(|e| Error::Malformed(e.to_string()))?;
        self.change(|s| {
            s.doc
                .put(ROOT, key, ScalarValue::Str(text.into()))
                .map_err(malformed)
        })
    }

    fn delete_key(&mut self, key: &str) -> Result<(), Error> {
        if crate::state::get_str(&self.doc, &ROOT, key).is_none() {
            return Ok(());
        }
        self.change(|s| s.doc.delete(ROOT, key).map_err(malformed))
    }

    /// Every stored certificate, by hostname.
    pub fn certificates(&self) -> BTreeMap<String, CertRecord> {
        self.json_scalars(CERT)
    }

    pub fn put_certificate(&mut self, host: &str, cert: &CertRecord) -> Result<(), Error> {
        check_host(host)?;
        self.put_json(&format!("{CERT}{host}"), cert)
    }

    pub fn remove_certificate(&mut self, host: &str) -> Result<(), Error> {
        self.delete_key(&format!("{CERT}{host}"))
    }

    /// The challenges being validated, by token, expired ones left out.
    pub fn acme_challenges(&self, now_ms: u64) -> BTreeMap<String, Challenge> {
        let mut all: BTreeMap<String, Challenge> = self.json_scalars(CHALLENGE);
        all.retain(|_, c| c.expires_at_ms > now_ms);
        all
    }

    pub fn put_acme_challenge(&mut self, token: &str, c: &Challenge) -> Result<(), Error> {
        if token.is_empty() || token.contains('/') {
            return Err(Error::Malformed(format!("bad ACME token {token:?}")));
        }
        self.put_json(&format!("{CHALLENGE}{token}"), c)
    }

    pub fn remove_acme_challenge(&mut self, token: &str) -> Result<(), Error> {
        self.delete_key(&format!("{CHALLENGE}{token}"))
    }

    /// Removes challenges past their expiry; returns how many.
    pub fn drop_expired_acme_challenges(&mut self, now_ms: u64) -> Result<usize, Error> {
        let all: BTreeMap<String, Challenge> = self.json_scalars(CHALLENGE);
        let old: Vec<String> = all
            .iter()
            .filter(|(_, c)| c.expires_at_ms <= now_ms)
            .map(|(t, _)| format!("{CHALLENGE}{t}"))
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        self.change(|s| {
            for k in &old {
                s.doc.delete(ROOT, k.as_str()).map_err(malformed)?;
            }
            Ok(old.len())
        })
    }

    /// Each hostname's order status.
    pub fn acme_orders(&self) -> BTreeMap<String, OrderStatus> {
        self.json_scalars(ORDER)
    }

    pub fn put_acme_order(&mut self, host: &str, o: &OrderStatus) -> Result<(), Error> {
        check_host(host)?;
        self.put_json(&format!("{ORDER}{host}"), o)
    }

    pub fn remove_acme_order(&mut self, host: &str) -> Result<(), Error> {
        self.delete_key(&format!("{ORDER}{host}"))
    }

    pub fn acme_account(&self) -> Option<AcmeAccount> {
        self.json_scalar(ACCOUNT)
    }

    pub fn set_acme_account(&mut self, a: &AcmeAccount) -> Result<(), Error> {
        self.put_json(ACCOUNT, a)
    }
}

fn check_host(host: &str) -> Result<(), Error> {
    if host.is_empty() || host.contains('/') || host.len() > 253 {
        return Err(Error::Malformed(format!("bad hostname {host:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uc_proto::Subnet;

    fn doc(actor: u8) -> ClusterState {
        ClusterState::new_cluster(
            "c1",
            "10.210.0.0/16".parse::<Subnet>().unwrap(),
            [actor; 16],
            1,
        )
        .unwrap()
    }

    fn cert(by: u8, not_after: i64) -> CertRecord {
        let id = MachineId::from_bytes([by; 16]);
        CertRecord {
            chain_pem: format!("chain {id}"),
            key_pem: format!("key {id}"),
            not_before: 0,
            not_after,
            issued_by: id,
            issued_at_ms: 5,
        }
    }

    #[test]
    fn records_round_trip_and_concurrent_certificates_pick_one_winner() {
        let mut a = doc(1);
        let mut b = ClusterState::load(&a.save(), [2; 16]).unwrap();
        a.put_certificate("x.example.com", &cert(1, 100)).unwrap();
        b.put_certificate("x.example.com", &cert(2, 200)).unwrap();
        b.put_certificate("y.example.com", &cert(2, 300)).unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        assert_eq!(a.certificates(), b.certificates());
        let certs = a.certificates();
        assert_eq!(certs.len(), 2);
        let x = &certs["x.example.com"];
        assert_eq!(
            x.chain_pem,
            format!("chain {}", x.issued_by),
            "a whole record wins"
        );
        a.remove_certificate("y.example.com").unwrap();
        assert_eq!(a.certificates().len(), 1);
        assert!(a.put_certificate("a/b", &cert(1, 1)).is_err());
    }

    #[test]
    fn challenges_expire_and_orders_and_account_are_kept() {
        let mut a = doc(1);
        let c = |exp| Challenge {
            key_auth: "k".into(),
            expires_at_ms: exp,
        };
        a.put_acme_challenge("t1", &c(100)).unwrap();
        a.put_acme_challenge("t2", &c(300)).unwrap();
        assert_eq!(a.acme_challenges(200).len(), 1);
        assert_eq!(a.drop_expired_acme_challenges(200).unwrap(), 1);
        assert_eq!(a.acme_challenges(0).keys().collect::<Vec<_>>(), ["t2"]);
        a.remove_acme_challenge("t2").unwrap();
        assert!(a.acme_challenges(0).is_empty());
        assert!(a.put_acme_challenge("", &c(1)).is_err());

        let o = OrderStatus {
            failures: 2,
            last_error: Some("no".into()),
            ..Default::default()
        };
        a.put_acme_order("x.example.com", &o).unwrap();
        assert_eq!(a.acme_orders()["x.example.com"], o);
        let acct = AcmeAccount {
            directory: "https://ca/dir".into(),
            credentials: "{}".into(),
        };
        a.set_acme_account(&acct).unwrap();
        let mut b = ClusterState::load(&a.save(), [2; 16]).unwrap();
        assert_eq!(b.acme_account(), Some(acct));
        assert_eq!(b.acme_orders().len(), 1);
        // A document from before these records existed has none, and loads.
        assert!(doc(3).certificates().is_empty());
        assert!(b.machines().is_empty());
        b.remove_acme_order("x.example.com").unwrap();
        assert!(b.acme_orders().is_empty());
    }
}
