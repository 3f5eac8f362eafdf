//! Transport errors, and turning QUIC/TLS handshake failures into messages that say which side
//! refused whom and what the user can do about it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quinn::{ConnectionError, ReadError, StreamId, WriteError};

use crate::keys::trust::Refused;
use crate::keys::{Identity, KeyError};
use crate::wire::WireError;

/// What went wrong on the QUIC transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot use UDP address {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("cannot set up TLS with the certificates in {}: {why}", dir.display())]
    Tls { dir: PathBuf, why: String },
    #[error("invalid transport setting `{what}`: {why}")]
    Config { what: &'static str, why: String },
    #[error("cannot start a connection to {remote}: {source}")]
    Connect {
        remote: SocketAddr,
        source: quinn::ConnectError,
    },
    /// The TLS handshake failed: one side refused the other.
    #[error("{0}")]
    Refused(Box<Refusal>),
    #[error(
        "no answer from {peer} within {after:?}: is `pageserv` listening on that UDP port, and \
         does every firewall between the hosts pass UDP?"
    )]
    NoAnswer { peer: SocketAddr, after: Duration },
    #[error(
        "server {peer} completed the TLS handshake but did not admit us within {after:?}; is it a \
         pageserv of the same version?"
    )]
    NotAdmitted { peer: SocketAddr, after: Duration },
    #[error("connection with {peer} {when}: {source}")]
    Connection {
        peer: SocketAddr,
        when: &'static str,
        source: ConnectionError,
    },
    /// We (a destination) refused a verified client by `--allow-source` / `--deny-cert`.
    #[error("refused source {who}: {why}")]
    Policy {
        peer: SocketAddr,
        who: String,
        why: Refused,
    },
    /// The destination refused us after the handshake by its admission rule.
    #[error(
        "destination {peer} refused this source: {reason}; its operator decides which source \
         certificates it takes (`pageserv dst --allow-source`, `--deny-cert`)"
    )]
    RefusedByPolicy { peer: SocketAddr, reason: String },
    /// We (a source) refused a verified server by our `--deny-cert` list.
    #[error(
        "destination {who} at {peer} presented certificate {fingerprint}, which this source's \
         deny list (--deny-cert) revokes: nothing was sent to it; give that host a new \
         certificate, or dial another destination"
    )]
    DeniedServer {
        peer: SocketAddr,
        who: String,
        fingerprint: String,
    },
    #[error("the listening endpoint was closed")]
    EndpointClosed,
    #[error("writing pageserv stream {stream}: {source}")]
    Write {
        stream: StreamId,
        source: WriteError,
    },
    #[error("reading pageserv stream {stream}: {source}")]
    Read { stream: StreamId, source: ReadError },
    #[error("pageserv stream {stream}: {source}")]
    Wire { stream: StreamId, source: WireError },
}

/// Which side of a handshake refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// This process refused the peer.
    Us,
    /// The peer refused this process (it sent a TLS alert).
    Peer,
}

/// Why a handshake was refused, from the TLS alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The certificate does not chain to the trusted CA (alert unknown_ca).
    NotSignedByCa,
    /// The client sent no certificate (alert certificate_required).
    NoCertificate,
    /// The certificate is expired or not yet valid (alert certificate_expired).
    CertificateExpired,
    /// The server's certificate lacks the name the client dialled (or gave with --dst-name).
    WrongServerName,
    /// No common ALPN protocol: the peer does not speak pageserv/1.
    WrongProtocol,
    /// The certificate is for the other role (a source certificate serving, or a destination
    /// certificate connecting): its extended key usage does not allow this side.
    WrongRole,
    /// The certificate is unusable for another reason (bad signature, wrong key usage, ...).
    BadCertificate,
    /// Another TLS alert.
    Other,
}

/// A refused handshake, with everything needed to explain it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub by: RefusedBy,
    /// "client" or "server": this process's side.
    pub we_are: &'static str,
    pub peer: SocketAddr,
    pub reason: RefusalReason,
    /// The TLS alert that carried the refusal, e.g. "UnknownCA".
    pub alert: String,
    /// rustls's own words when we refused, or the peer's close reason when it did.
    pub detail: String,
    /// Our trusted CA file and our certificate, the files the user may need to fix.
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    /// The name a client asked the server's certificate for (empty on the server side).
    pub dialled_name: String,
}

impl Refusal {
    fn peer_is(&self) -> &'static str {
        if self.we_are == "client" {
            "server"
        } else {
            "client"
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (peer, addr, ca, cert) = (
            self.peer_is(),
            self.peer,
            self.ca_path.display(),
            self.cert_path.display(),
        );
        let detail = if self.detail.is_empty() {
            format!("TLS alert {}", self.alert)
        } else {
            format!("TLS alert {}: {}", self.alert, self.detail)
        };
        match (self.by, self.reason) {
            (RefusedBy::Us, RefusalReason::NotSignedByCa) => write!(
                f,
                "this host ({}) refused {peer} {addr}: peer certificate not signed by the CA in \
                 {ca} ({detail}); give it a certificate issued from that CA (`pageserv keygen \
                 issue`)",
                self.we_are
            ),
            (RefusedBy::Us, RefusalReason::NoCertificate) => write!(
                f,
                "this host ({}) refused {peer} {addr}: it presented no certificate, and pageserv \
                 requires mutual TLS ({detail})",
                self.we_are
            ),
            (RefusedBy::Us, RefusalReason::CertificateExpired) => write!(
                f,
                "this host ({}) refused {peer} {addr}: its certificate is expired or not yet \
                 valid ({detail}); check both hosts' clocks, or re-issue it",
                self.we_are
            ),
            (RefusedBy::Us, RefusalReason::WrongServerName) => write!(
                f,
                "this host ({}) refused {peer} {addr}: its certificate is not valid for the name \
                 {:?} that was dialled ({detail}); if it is the right host, pass --dst-name with \
                 a name its certificate carries (its keygen --name), or re-issue it with \
                 `pageserv keygen --name {}`",
                self.we_are, self.dialled_name, self.dialled_name
            ),
            (RefusedBy::Us, RefusalReason::WrongRole) => {
                let role = if self.we_are == "client" {
                    "destination"
                } else {
                    "source"
                };
                write!(
                    f,
                    "this host ({}) refused {peer} {addr}: its certificate is not a {role} \
                     certificate, which a {role} must present ({detail}); a certificate for the \
                     other role cannot stand in for it: issue one with `pageserv keygen --role \
                     {role}`",
                    self.we_are
                )
            }
            (RefusedBy::Us, RefusalReason::WrongProtocol) => write!(
                f,
                "this host ({}) refused {peer} {addr}: it does not speak pageserv/1 (no common \
                 ALPN protocol; {detail}); is it another service or another pageserv version?",
                self.we_are
            ),
            (RefusedBy::Us, _) => write!(
                f,
                "this host ({}) refused {peer} {addr} during the TLS handshake ({detail}); we \
                 trust the CA in {ca}",
                self.we_are
            ),
            (RefusedBy::Peer, RefusalReason::NotSignedByCa) => write!(
                f,
                "{peer} {addr} refused this host ({}): our certificate {cert} is not signed by a \
                 CA it trusts ({detail}); both hosts need certificates issued from one CA, and \
                 that CA's ca.pem",
                self.we_are
            ),
            (RefusedBy::Peer, RefusalReason::NoCertificate) => write!(
                f,
                "{peer} {addr} refused this host ({}): it requires a client certificate and we \
                 sent none ({detail})",
                self.we_are
            ),
            (RefusedBy::Peer, RefusalReason::CertificateExpired) => write!(
                f,
                "{peer} {addr} refused this host ({}): it finds our certificate {cert} expired or \
                 not yet valid ({detail}); check both hosts' clocks",
                self.we_are
            ),
            (RefusedBy::Peer, RefusalReason::WrongProtocol) => write!(
                f,
                "{peer} {addr} refused this host ({}): it does not speak pageserv/1 ({detail}); \
                 is that port a pageserv of the same version?",
                self.we_are
            ),
            (RefusedBy::Peer, _) => write!(
                f,
                "{peer} {addr} refused this host ({}) during the TLS handshake ({detail}); our \
                 certificate is {cert}",
                self.we_are
            ),
        }
    }
}

/// `when` for errors of the QUIC/TLS handshake itself.
pub(crate) const DURING_HANDSHAKE: &str = "during the handshake";

/// The TLS alert behind a QUIC crypto error code (0x100 + alert).
fn alert_of(code: quinn::TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| (code - 0x100) as u8)
}

fn reason_of(alert: u8, detail: &str) -> RefusalReason {
    match alert {
        48 => RefusalReason::NotSignedByCa,
        116 => RefusalReason::NoCertificate,
        45 => RefusalReason::CertificateExpired,
        120 => RefusalReason::WrongProtocol,
        42 if detail.contains("not valid for name") || detail.contains("NotValidForName") => {
            RefusalReason::WrongServerName
        }
        43 if detail.contains("extended key usage") || detail.contains("ExtendedKeyUsage") => {
            RefusalReason::WrongRole
        }
        42 | 43 | 44 | 46 | 49 | 51 => RefusalReason::BadCertificate,
        _ => RefusalReason::Other,
    }
}

/// Explains a connection error: a TLS refusal (by either side) becomes [`Refusal`], a handshake
/// timeout [`TransportError::NoAnswer`], anything else a plain connection error.
pub(crate) fn explain(
    err: ConnectionError,
    we_are: &'static str,
    peer: SocketAddr,
    id: &Identity,
    when: &'static str,
    idle: Duration,
) -> TransportError {
    let (by, alert, detail) = match &err {
        ConnectionError::TransportError(e) => match alert_of(e.code) {
            Some(a) => (RefusedBy::Us, a, e.reason.clone()),
            None => {
                return TransportError::Connection {
                    peer,
                    when,
                    source: err,
                };
            }
        },
        ConnectionError::ConnectionClosed(c) => match alert_of(c.error_code) {
            Some(a) => (
                RefusedBy::Peer,
                a,
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            None => {
                return TransportError::Connection {
                    peer,
                    when,
                    source: err,
                };
            }
        },
        ConnectionError::TimedOut if when == DURING_HANDSHAKE => {
            return TransportError::NoAnswer { peer, after: idle };
        }
        _ => {
            return TransportError::Connection {
                peer,
                when,
                source: err,
            };
        }
    };
    TransportError::Refused(Box::new(Refusal {
        by,
        we_are,
        peer,
        reason: reason_of(alert, &detail),
        alert: format!("{:?}", rustls::AlertDescription::from(alert)),
        detail,
        ca_path: id.ca_path(),
        cert_path: id.cert_path(),
        dialled_name: String::new(),
    }))
}
