//! Certificates by SNI: a store that the agent fills from the replicated state and swaps while
//! serving, and the rustls server configuration around it (HTTP/2 and HTTP/1.1 by ALPN,
//! session resumption by tickets and by id).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::Error;

/// A certificate chain and its key, ready to serve, with what `uc ingress ls` shows of it.
#[derive(Clone, Debug)]
pub struct Cert {
    pub key: Arc<CertifiedKey>,
    /// Seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The names it is valid for.
    pub names: Vec<String>,
}

impl Cert {
    /// Parses a PEM chain (leaf first) and its PEM private key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Cert(format!("certificate PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| Error::Cert("no certificate in the PEM".into()))?;
        let (not_before, not_after, names) = leaf_facts(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Cert(format!("private key PEM: {e}")))?;
        let signer =
            any_supported_type(&key).map_err(|e| Error::Cert(format!("private key: {e}")))?;
        let key = CertifiedKey::new(chain, signer);
        key.keys_match()
            .map_err(|e| Error::Cert(format!("the key does not belong to the certificate: {e}")))?;
        Ok(Cert {
            key: Arc::new(key),
            not_before,
            not_after,
            names,
        })
    }
}

/// The validity (seconds since the epoch) and DNS names of a DER certificate.
pub fn leaf_facts(der: &[u8]) -> Result<(i64, i64, Vec<String>), Error> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Cert(format!("certificate does not parse: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp(), names))
}

/// Hostname → certificate, read by every TLS handshake, replaced by the agent.
#[derive(Debug, Default)]
pub struct CertStore {
    by_host: RwLock<HashMap<String, Cert>>,
}

impl CertStore {
    /// Replaces every certificate at once.
    pub fn replace(&self, certs: HashMap<String, Cert>) {
        *self.by_host.write().unwrap_or_else(|e| e.into_inner()) = certs;
    }

    pub fn get(&self, host: &str) -> Option<Cert> {
        self.by_host
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .cloned()
    }

    pub fn hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_host
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// A client that names no host we have a certificate for gets no certificate at all (the
/// handshake fails with an `access_denied` alert), never another service's.
#[derive(Debug)]
struct BySni(Arc<CertStore>);

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        self.0.get(&name).map(|c| c.key)
    }
}

/// The TLS configuration of the HTTPS listeners: certificates from `store`, ALPN h2 then
/// http/1.1, stateless session tickets plus an in-memory session cache for resumption.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Cert(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni(store)));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| Error::Cert(format!("session tickets: {e}")))?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    Ok(Arc::new(cfg))
}

/// A self-signed certificate for `hosts` (tests, and the local cluster before ACME answers).
pub fn self_signed(hosts: &[String]) -> Result<(String, String), Error> {
    let ck = rcgen::generate_simple_self_signed(hosts.to_vec())
        .map_err(|e| Error::Cert(format!("self-signed certificate: {e}")))?;
    Ok((ck.cert.pem(), ck.signing_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_gives_names_and_expiry() {
        let (c, k) = self_signed(&["a.example.test".into()]).unwrap();
        let cert = Cert::from_pem(&c, &k).unwrap();
        assert_eq!(cert.names, ["a.example.test"]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(cert.not_after > now + 86400 * 365, "{}", cert.not_after);
    }

    #[test]
    fn bad_pem_is_named() {
        let (c, _) = self_signed(&["a.example.test".into()]).unwrap();
        let (_, other_key) = self_signed(&["b.example.test".into()]).unwrap();
        let e = Cert::from_pem("garbage", "garbage")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no certificate"), "{e}");
        let e = Cert::from_pem(&c, "garbage").unwrap_err().to_string();
        assert!(e.contains("private key"), "{e}");
        let e = Cert::from_pem(&c, &other_key).unwrap_err().to_string();
        assert!(e.contains("does not belong"), "{e}");
    }
}
