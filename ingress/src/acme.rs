//! Certificates from an ACME CA (Let's Encrypt, or any directory; Debian's `pebble` in tests).
//! HTTP-01 challenges are handed to a [`Challenges`] sink: the agent writes them into the
//! replicated state, so whichever ingress machine the CA reaches answers them.
//!
//! `renew_at` is the pure rule for when a certificate is renewed.

use std::path::PathBuf;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use tracing::{debug, info};

use crate::Error;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Which CA, and how to trust it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeConfig {
    pub directory: String,
    /// A PEM root to trust for the directory's own HTTPS (a test CA such as pebble's); `None`
    /// trusts the usual web roots.
    pub root_ca: Option<PathBuf>,
    /// How long to wait for the CA to validate and issue.
    pub timeout: Duration,
}

impl Default for AcmeConfig {
    fn default() -> Self {
        AcmeConfig {
            directory: LETS_ENCRYPT.into(),
            root_ca: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Where HTTP-01 challenges are published while the CA validates them.
pub trait Challenges: Send + Sync {
    /// From now on, `GET /.well-known/acme-challenge/<token>` on port 80 answers `key_auth`.
    fn publish(&self, token: &str, key_auth: &str) -> Result<(), Error>;
    /// The challenge is over.
    fn withdraw(&self, token: &str);
}

fn acme(e: impl std::fmt::Display) -> Error {
    Error::Acme(e.to_string())
}

/// The ACME account: the one whose credentials are given (JSON, as stored), else a new one,
/// whose credentials come back to be stored.
pub async fn account(
    cfg: &AcmeConfig,
    stored: Option<&str>,
) -> Result<(Account, Option<String>), Error> {
    let builder = || match &cfg.root_ca {
        Some(root) => Account::builder_with_root(root)
            .map_err(|e| Error::Acme(format!("CA root {}: {e}", root.display()))),
        None => Account::builder().map_err(acme),
    };
    if let Some(json) = stored {
        match serde_json::from_str::<AccountCredentials>(json) {
            Ok(creds) => match builder()?.from_credentials(creds).await {
                Ok(a) => return Ok((a, None)),
                Err(e) => info!(error = %e, "stored ACME account not usable; making a new one"),
            },
            Err(e) => info!(error = %e, "stored ACME account does not parse; making a new one"),
        }
    }
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &[],
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| Error::Acme(format!("account at {}: {e}", cfg.directory)))?;
    let json = serde_json::to_string(&creds).map_err(acme)?;
    Ok((account, Some(json)))
}

/// A certificate as issued: the PEM chain (leaf first) and its PEM private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Orders a certificate for `hosts`, answering HTTP-01 through `challenges`.
pub async fn issue(
    cfg: &AcmeConfig,
    account: &Account,
    hosts: &[String],
    challenges: &dyn Challenges,
) -> Result<Issued, Error> {
    let ids: Vec<Identifier> = hosts.iter().map(|h| Identifier::Dns(h.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| Error::Acme(format!("new order: {e}")))?;
    let mut published = Vec::new();
    let result = async {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(|e| Error::Acme(format!("authorization: {e}")))?;
            match a.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(Error::Acme(format!("authorization is {other:?}")));
                }
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| Error::Acme("the CA offers no http-01 challenge".into()))?;
            let token = ch.token.clone();
            let key_auth = ch.key_authorization().as_str().to_owned();
            challenges.publish(&token, &key_auth)?;
            published.push(token);
            debug!(identifier = %ch.identifier(), "ACME challenge published");
            ch.set_ready()
                .await
                .map_err(|e| Error::Acme(format!("challenge ready: {e}")))?;
        }
        let policy = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(cfg.timeout);
        let status = order
            .poll_ready(&policy)
            .await
            .map_err(|e| Error::Acme(format!("waiting for validation: {e}")))?;
        if status != OrderStatus::Ready {
            let why = order
                .refresh()
                .await
                .ok()
                .and_then(|s| s.error.as_ref().map(|e| format!("{e:?}")));
            return Err(Error::Acme(format!(
                "the order is {status:?}, not ready{}",
                why.map(|w| format!(": {w}")).unwrap_or_default()
            )));
        }
        let key_pem = order
            .finalize()
            .await
            .map_err(|e| Error::Acme(format!("finalize: {e}")))?;
        let chain_pem = order
            .poll_certificate(&policy)
            .await
            .map_err(|e| Error::Acme(format!("certificate: {e}")))?;
        Ok(Issued { chain_pem, key_pem })
    }
    .await;
    for t in &published {
        challenges.withdraw(t);
    }
    result
}

/// When a certificate valid from `not_before` to `not_after` (seconds) is renewed: with a
/// third of its life left (30 days of Let's Encrypt's 90).
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

/// How long to wait before trying again after `failures` failures in a row: 1 minute, doubling,
/// at most 6 hours (Let's Encrypt limits failed validations per hour).
pub fn retry_after(failures: u32) -> Duration {
    let secs = 60u64.saturating_mul(1 << failures.saturating_sub(1).min(10));
    Duration::from_secs(secs.min(6 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_with_a_third_left() {
        let day = 86400;
        assert_eq!(renew_at(0, 90 * day), 60 * day);
        assert_eq!(renew_at(100, 160), 140);
        assert_eq!(
            renew_at(100, 50),
            50,
            "a backwards validity renews at its end"
        );
    }

    #[test]
    fn retries_back_off() {
        let s: Vec<u64> = [1, 2, 3, 9, 30]
            .iter()
            .map(|f| retry_after(*f).as_secs())
            .collect();
        assert_eq!(s, [60, 120, 240, 256 * 60, 6 * 3600]);
        assert_eq!(retry_after(0).as_secs(), 60);
    }
}
