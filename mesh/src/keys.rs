//! WireGuard keys: Curve25519 key pairs, written as base64 like `wg` does.
//! The private key lives only in the data directory (mode 0600); it is
//! never logged (its `Debug` is redacted) and never leaves the machine.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519;

/// A problem with a key or the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("invalid WireGuard key {0:?}: expected 32 bytes in base64 (44 characters)")]
    Syntax(String),
    #[error("reading WireGuard key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing WireGuard key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("WireGuard key file {0} is not a private key; refusing to replace it")]
    Corrupt(PathBuf),
    #[error("no randomness available for a new key")]
    Random,
}

fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|_| KeyError::Syntax(s.to_string()))?;
    bytes
        .try_into()
        .map_err(|_| KeyError::Syntax(s.to_string()))
}

/// A public key: safe to publish, copy and log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PublicKey(b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Lower-case hex, as the UAPI protocol writes keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PublicKey)
    }
}

/// A private key. Its `Debug` and `Display` never show the key.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> Result<Self, KeyError> {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| KeyError::Random)?;
        Ok(PrivateKey(b))
    }
    pub fn from_bytes(b: [u8; 32]) -> Self {
        PrivateKey(b)
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*x25519::PublicKey::from(&self.to_x25519()).as_bytes())
    }
    /// The key's bytes, for a device that needs them (the kernel's).
    pub(crate) fn secret_bytes(&self) -> [u8; 32] {
        self.0
    }
    pub(crate) fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
    fn to_base64_secret(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A machine's key pair.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: PrivateKey,
    pub public: PublicKey,
}

impl KeyPair {
    pub fn generate() -> Result<Self, KeyError> {
        let private = PrivateKey::generate()?;
        Ok(KeyPair {
            public: private.public_key(),
            private,
        })
    }

    /// Loads the key pair from `path`, or creates it there (mode 0600,
    /// written to a temporary file and renamed, so a crash leaves either no
    /// file or a whole one). A file that holds no key is an error, never
    /// replaced. A file readable by others is made private again.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = decode32(&text).map_err(|_| KeyError::Corrupt(path.to_path_buf()))?;
                let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "WireGuard key file was readable by others; setting mode 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|source| KeyError::Write {
                            path: path.to_path_buf(),
                            source,
                        })?;
                }
                let private = PrivateKey(bytes);
                Ok(KeyPair {
                    public: private.public_key(),
                    private,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = KeyPair::generate()?;
                let tmp = path.with_extension("tmp");
                let write = |p: &Path| -> std::io::Result<()> {
                    let _ = std::fs::remove_file(p);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(p)?;
                    writeln!(f, "{}", pair.private.to_base64_secret())?;
                    f.sync_all()
                };
                write(&tmp).map_err(|source| KeyError::Write {
                    path: tmp.clone(),
                    source,
                })?;
                std::fs::rename(&tmp, path).map_err(|source| KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(pair)
            }
            Err(source) => Err(KeyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_round_trips_and_matches_rfc7748() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let expected =
            hex::decode("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        let k = PrivateKey::from_bytes(private.try_into().unwrap());
        assert_eq!(k.public_key().as_bytes().as_slice(), expected.as_slice());
        let text = k.public_key().to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text.parse::<PublicKey>().unwrap(), k.public_key());
        assert!("not a key".parse::<PublicKey>().is_err());
        assert!("AAAA".parse::<PublicKey>().is_err());
    }

    #[test]
    fn private_key_is_never_printed() {
        let k = KeyPair::generate().unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.private.to_base64_secret()), "{shown}");
        assert!(!shown.contains(&hex::encode(k.private.0)), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("uc-mesh-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wg.key");
        let _ = std::fs::remove_file(&path);
        let a = KeyPair::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = KeyPair::load_or_create(&path).unwrap();
        assert_eq!(a.public, b.public);
        // A file that is not a key is refused and left as it was.
        std::fs::write(&path, "garbage\n").unwrap();
        let err = KeyPair::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("wg.key") && err.contains("refusing"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
