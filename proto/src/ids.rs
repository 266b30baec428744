//! Typed identifiers: 16 random bytes, written as 32 lower-case hex digits.

use std::fmt;
use std::str::FromStr;

/// A malformed identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} id {value:?}: expected 32 lower-case hex digits")]
pub struct IdError {
    kind: &'static str,
    value: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Builds an id from 16 bytes (random in production, seeded in tests).
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(hex::encode(bytes))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The first 8 hex digits, for display.
            pub fn short(&self) -> &str {
                &self.0[..8]
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                let ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                if ok {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError { kind: $kind, value: s.to_owned() })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

typed_id!(
    /// Identifies a machine for its whole life in a cluster; never reused.
    MachineId,
    "machine"
);
typed_id!(
    /// Identifies a service; its name may change, its id does not.
    ServiceId,
    "service"
);
typed_id!(
    /// Identifies one container (replica) of a service.
    ContainerId,
    "container"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let id = MachineId::from_bytes([0xab; 16]);
        assert_eq!(id.as_str().len(), 32);
        assert_eq!(id.to_string().parse::<MachineId>().unwrap(), id);
        assert_eq!(id.short(), "abababab");
        assert!("xyz".parse::<MachineId>().is_err());
        assert!(
            "ABABABABABABABABABABABABABABABAB"
                .parse::<MachineId>()
                .is_err()
        );
        let err = "nope".parse::<ServiceId>().unwrap_err().to_string();
        assert!(err.contains("service") && err.contains("nope"), "{err}");
    }
}

/// A machine name from a host name: lower case, anything but letters and digits made `-`,
/// no `-` at either end; `machine` when nothing is left. (Names longer than 63 characters are
/// cut.)
pub fn machine_name_from_host(host: &str) -> String {
    let name: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "machine".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn host_names_become_machine_names() {
        use super::machine_name_from_host as n;
        assert_eq!(n("Pi.Local\n"), "pi-local");
        assert_eq!(n("--"), "machine");
        assert_eq!(n(""), "machine");
        assert_eq!(n(&"a".repeat(80)).len(), 63);
    }
}
