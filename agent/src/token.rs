//! Join tokens: random secrets handed to a joining machine; the cluster
//! state only ever holds their SHA-256.

use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};

const PREFIX: &str = "ucj_";

/// A fresh token, e.g. `ucj_3f9a...` (32 random bytes).
pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(format!("{PREFIX}{}", hex::encode(bytes)))
}

/// What the cluster state stores for `token`.
pub fn hash(token: &str) -> String {
    hex::encode(digest(&SHA256, token.trim().as_bytes()))
}

/// 16 random bytes (machine ids, automerge actors).
pub fn random16() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator failed");
    bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = super::generate().unwrap();
        let b = super::generate().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("ucj_") && a.len() == 4 + 64);
        assert_eq!(super::hash(&a), super::hash(&format!(" {a}\n")));
        assert_ne!(super::hash(&a), super::hash(&b));
    }
}
