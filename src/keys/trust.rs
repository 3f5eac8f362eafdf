//! Who may talk to whom, beyond "signed by our CA with the right role": the pure policy pieces of
//! pageserv's trust between hosts (see README, "Security model").
//!
//! - **Names.** A source checks that the destination's certificate carries the name it dialled
//!   ([`dst_name`]); a destination may admit only sources whose certificate names are on its
//!   `--allow-source` list ([`Admission`]).
//! - **Identities.** A certificate's identity is the SHA-256 of its DER ([`Fingerprint`]): every
//!   fault and resume connection of a migration must present the identity of the control
//!   connection that opened it ([`may_join`]).
//! - **Revocation.** A deny list of fingerprints ([`DenyList`], `--deny-cert FILE`) refuses a
//!   certificate still signed by the CA and not yet expired.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use rustls::pki_types::CertificateDer;

use super::{KeyError, SERVER_NAME};

/// SHA-256 of a certificate's DER encoding: what `--deny-cert` lists and what binds a
/// migration's connections to one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// 64 hex digits, optionally with `:` between bytes (as `openssl x509 -fingerprint
    /// -sha256` prints them), any case.
    pub fn parse(s: &str) -> Option<Fingerprint> {
        let hex: String = s.chars().filter(|c| *c != ':').collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Fingerprint(out))
    }

    /// The first 8 bytes in hex: enough to tell identities apart in a log line.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// May a connection presenting `joining` carry a fault stream or a resume for the migration whose
/// control connection presented `owner`? Only the very same certificate: another host of the
/// same CA and role, even a legitimate one, must not take over or feed a migration it did not
/// open, whatever it learnt of its id.
pub fn may_join(owner: &Fingerprint, joining: &Fingerprint) -> bool {
    owner == joining
}

/// The name a source expects in the destination's certificate: `--dst-name` if given, else the
/// host part of `--to`, a DNS name or an IP literal. An IP literal is checked against the
/// certificate's IP addresses (`pageserv keygen --name 10.0.0.2`): dialling by address proves
/// nothing about a DNS name, so it never stands in for one. `--dst-name pageserv` (the name every
/// pageserv certificate carries) accepts any destination certificate of the CA.
pub fn dst_name(dialled_host: &str, dst_name: Option<&str>) -> String {
    match dst_name {
        Some(n) => n.to_string(),
        None => dialled_host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    }
}

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6) into its parts.
pub fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| format!("{s:?} is not HOST:PORT ({why})");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| bad("IPv6 is [ADDR]:PORT"))?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address between the brackets"));
        }
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        if h.contains(':') {
            return Err(bad("an IPv6 address needs brackets: [ADDR]:PORT"));
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = port.parse::<u16>().map_err(|_| bad("bad port"))?;
    Ok((host.to_string(), port))
}

/// True if `name` is an IP address literal.
pub fn is_ip(name: &str) -> bool {
    name.parse::<IpAddr>().is_ok()
}

/// Certificate fingerprints refused although the CA signed them (`--deny-cert FILE`).
#[derive(Debug, Clone, Default)]
pub struct DenyList(HashSet<Fingerprint>);

impl DenyList {
    /// One fingerprint a line (see [`Fingerprint::parse`]); blank lines and `#` comments
    /// ignored, also after a fingerprint.
    pub fn parse(text: &str) -> Result<DenyList, (usize, String)> {
        let mut set = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let fp = Fingerprint::parse(entry).ok_or((
                i + 1,
                format!("{entry:?} is not a SHA-256 fingerprint (64 hex digits)"),
            ))?;
            set.insert(fp);
        }
        Ok(DenyList(set))
    }

    pub fn load(path: &Path) -> Result<DenyList, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        DenyList::parse(&text).map_err(|(line, why)| KeyError::BadFile {
            path: path.to_path_buf(),
            what: format!(
                "line {line}: {why}; list one `pageserv keygen --fingerprint CERT` output a line"
            ),
        })
    }

    /// [`DenyList::load`] of `path`, or an empty list without one (no `--deny-cert`).
    pub fn load_optional(path: Option<&Path>) -> Result<DenyList, KeyError> {
        path.map_or_else(|| Ok(DenyList::default()), DenyList::load)
    }

    pub fn denies(&self, fp: &Fingerprint) -> bool {
        self.0.contains(fp)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a destination refused a source after the TLS handshake. The peer is told
/// [`Refused::to_peer`] only; the log gets the whole of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "certificate {fingerprint} is on the deny list (--deny-cert); it was revoked: issue the \
         host a new certificate"
    )]
    Denied { fingerprint: String },
    #[error(
        "none of the certificate's names ({names}) is allowed here (--allow-source {allowed}); \
         add one with --allow-source NAME if this source may migrate into this host"
    )]
    NotAllowed { names: String, allowed: String },
}

impl Refused {
    /// What the peer learns: short, and nothing of this host's configuration.
    pub fn to_peer(&self) -> &'static str {
        match self {
            Refused::Denied { .. } => "certificate revoked at this destination",
            Refused::NotAllowed { .. } => "source not allowed at this destination",
        }
    }
}

/// A destination's admission rule beyond TLS: the `--allow-source` names (empty: any source of
/// the CA) and the deny list.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    allow: Vec<String>,
    pub deny: DenyList,
}

impl Admission {
    /// `allow`: the `--allow-source` names. `pageserv` is refused: every pageserv certificate
    /// carries it, so it would allow everyone.
    pub fn new(allow: Vec<String>, deny: DenyList) -> Result<Admission, String> {
        for n in &allow {
            if n.eq_ignore_ascii_case(SERVER_NAME) {
                return Err(format!(
                    "--allow-source {SERVER_NAME}: every pageserv certificate carries that name, \
                     so it would allow any source; give the sources' own names (their keygen \
                     --name)"
                ));
            }
            if n.is_empty() {
                return Err("--allow-source needs a name".into());
            }
        }
        Ok(Admission { allow, deny })
    }

    /// Admits a peer whose certificate has fingerprint `fp` and names `names` (its common name
    /// and subject alternative names), or says why not.
    pub fn judge(&self, names: &[String], fp: &Fingerprint) -> Result<(), Refused> {
        if self.deny.denies(fp) {
            return Err(Refused::Denied {
                fingerprint: fp.to_string(),
            });
        }
        if self.allow.is_empty() || names_allowed(&self.allow, names) {
            return Ok(());
        }
        Err(Refused::NotAllowed {
            names: names.join(", "),
            allowed: self.allow.join(", "),
        })
    }
}

/// True if one of `names` other than the shared name "pageserv" is on `allow` (DNS names compare
/// case-insensitively, as DNS does).
pub fn names_allowed(allow: &[String], names: &[String]) -> bool {
    names
        .iter()
        .filter(|n| !n.eq_ignore_ascii_case(SERVER_NAME))
        .any(|n| allow.iter().any(|a| a.eq_ignore_ascii_case(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_dialled_host_is_the_name_unless_dst_name_says_otherwise() {
        assert_eq!(dst_name("dst.example", None), "dst.example");
        assert_eq!(dst_name("10.0.0.2", None), "10.0.0.2");
        assert_eq!(dst_name("[::1]", None), "::1");
        assert_eq!(dst_name("10.0.0.2", Some("dst")), "dst");
    }

    #[test]
    fn host_port_splits_names_v4_and_bracketed_v6() {
        assert_eq!(split_host_port("dst:7070").unwrap(), ("dst".into(), 7070));
        assert_eq!(
            split_host_port("10.0.0.2:7070").unwrap(),
            ("10.0.0.2".into(), 7070)
        );
        assert_eq!(split_host_port("[::1]:9").unwrap(), ("::1".into(), 9));
        for bad in [
            "dst",
            ":7070",
            "::1:9",
            "[::1]9",
            "dst:x",
            "dst:70000",
            "[zz]:1",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
        assert!(is_ip("::1") && is_ip("10.0.0.2") && !is_ip("dst"));
    }

    #[test]
    fn the_allow_list_matches_own_names_never_the_shared_one() {
        let allow = s(&["src-a", "Host.Example"]);
        assert!(names_allowed(&allow, &s(&["pageserv", "src-a"])));
        assert!(names_allowed(&allow, &s(&["host.example"])));
        assert!(!names_allowed(&allow, &s(&["pageserv", "src-b"])));
        assert!(!names_allowed(&s(&["pageserv"]), &s(&["pageserv"])));
        assert!(Admission::new(s(&["PageServ"]), DenyList::default()).is_err());
    }

    #[test]
    fn deny_beats_allow_and_an_empty_allow_list_admits_any_name() {
        let fp = Fingerprint([7; 32]);
        let deny = DenyList::parse(&format!("# revoked\n{fp}  # host a\n\n")).unwrap();
        let open = Admission::new(vec![], DenyList::default()).unwrap();
        assert!(open.judge(&s(&["x"]), &fp).is_ok());
        let a = Admission::new(s(&["x"]), deny).unwrap();
        assert!(matches!(
            a.judge(&s(&["x"]), &fp),
            Err(Refused::Denied { .. })
        ));
        assert!(a.judge(&s(&["x"]), &Fingerprint([8; 32])).is_ok());
        let e = a.judge(&s(&["y"]), &Fingerprint([8; 32])).unwrap_err();
        assert_eq!(e.to_peer(), "source not allowed at this destination");
        assert!(e.to_string().contains("--allow-source x"), "{e}");
    }

    #[test]
    fn a_bad_deny_list_line_is_named() {
        assert_eq!(DenyList::parse("ab\n").unwrap_err().0, 1);
        assert_eq!(
            DenyList::parse(&format!("{}\nzz", Fingerprint([1; 32])))
                .unwrap_err()
                .0,
            2
        );
    }

    proptest! {
        #[test]
        fn fingerprints_round_trip_with_or_without_colons(b in any::<[u8; 32]>(), colons: bool, upper: bool) {
            let fp = Fingerprint(b);
            let mut text = fp.to_string();
            if colons {
                text = b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":");
            }
            if upper {
                text = text.to_uppercase();
            }
            prop_assert_eq!(Fingerprint::parse(&text), Some(fp));
            prop_assert!(may_join(&fp, &Fingerprint::parse(&text).unwrap()));
        }

        #[test]
        fn only_the_same_certificate_joins(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assert_eq!(may_join(&Fingerprint(a), &Fingerprint(b)), a == b);
        }

        #[test]
        fn an_allow_list_never_admits_a_name_off_it(allow in proptest::collection::vec("[a-z]{1,6}", 0..4), name in "[a-z]{1,6}") {
            let names = vec![SERVER_NAME.to_string(), name.clone()];
            prop_assert_eq!(names_allowed(&allow, &names), allow.contains(&name));
        }

        #[test]
        fn split_host_port_never_panics(s in ".{0,40}") {
            let _ = split_host_port(&s);
        }
    }
}
