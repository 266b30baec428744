//! `[USER@]HOST[:PORT]`: where `uc machine init|add` and SSH connections go.

use std::fmt;

/// An SSH destination as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub user: Option<String>,
    /// A host name or an IP address (an IPv6 address without brackets).
    pub host: String,
    pub port: Option<u16>,
}

impl SshTarget {
    /// `user@host` (or `host`) as `ssh` takes it; the port goes separately.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }
}

impl fmt::Display for SshTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        let bracket = self.host.contains(':');
        match (bracket, self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (true, None) => write!(f, "{}", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (false, None) => write!(f, "{}", self.host),
        }
    }
}

impl std::str::FromStr for SshTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid host {s:?}: {why} (expected [USER@]HOST[:PORT])");
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) => {
                if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c == ':') {
                    return Err(bad("bad user"));
                }
                (Some(u.to_string()), r)
            }
            None => (None, s),
        };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            // [v6] or [v6]:port
            let (h, after) = inner.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (h, port)
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port.
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address"));
        }
        if !host.contains(':')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        {
            return Err(bad("bad host name"));
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(bad(&format!("bad port {p:?}"))),
                Ok(p) => Some(p),
            },
        };
        Ok(SshTarget {
            user,
            host: host.to_string(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SshTarget {
        s.parse().unwrap()
    }

    #[test]
    fn forms() {
        assert_eq!(
            t("root@10.0.0.1:2222"),
            SshTarget {
                user: Some("root".into()),
                host: "10.0.0.1".into(),
                port: Some(2222)
            }
        );
        assert_eq!(t("pi").destination(), "pi");
        assert_eq!(t("pi").port, None);
        assert_eq!(t("me@pi.local").destination(), "me@pi.local");
        assert_eq!(t("fd00::1").host, "fd00::1");
        assert_eq!(t("[fd00::1]:22").port, Some(22));
        assert_eq!(t("u@[fd00::1]").host, "fd00::1");
    }

    #[test]
    fn round_trips() {
        for s in [
            "root@10.0.0.1:2222",
            "pi",
            "me@pi.local",
            "[fd00::1]:22",
            "fd00::1",
        ] {
            assert_eq!(t(s).to_string(), s);
        }
    }

    #[test]
    fn errors_say_what() {
        for (s, why) in [
            ("", "no host"),
            ("root@", "no host"),
            ("@h", "bad user"),
            ("h:0", "bad port"),
            ("h:99999", "bad port"),
            ("h:x", "bad port"),
            ("[fd00::1", "unclosed"),
            ("a b", "bad host name"),
            ("zz::qq::1", "not an IPv6"),
        ] {
            let e = s.parse::<SshTarget>().unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
