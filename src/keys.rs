//! Certificates for pageserv's mutual TLS (`pageserv keygen`): a private CA, leaf certificates
//! issued from it, and loading a host's identity from its certificate directory.
//!
//! A certificate directory holds `ca.pem` (the CA both hosts trust), `cert.pem` (this host's
//! certificate, SAN "pageserv" plus the host's name) and `key.pem` (mode 0600). A CA directory
//! holds `ca.pem` and `ca.key`.
//!
//! Roles are bound to certificates by their extended key usage, which TLS itself enforces: a
//! **destination** certificate is a TLS server certificate only (serverAuth), a **source**
//! certificate a TLS client certificate only (clientAuth). pageserv dst is always the QUIC
//! server and pageserv src always the client, so a source certificate cannot pose as a
//! destination to a source (the source's verifier demands serverAuth) and a destination
//! certificate cannot open a migration into another destination (the destination's verifier
//! demands clientAuth). A host that plays both issues `--role both` (or keeps two directories).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod trust;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The CA certificate, in CA and host certificate directories.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key, only in the CA directory.
pub const CA_KEY: &str = "ca.key";
/// This host's certificate (chain).
pub const CERT: &str = "cert.pem";
/// This host's private key.
pub const KEY: &str = "key.pem";
/// The name every pageserv certificate carries and every client verifies, so hosts can be
/// reached by any address without re-issuing certificates.
pub const SERVER_NAME: &str = "pageserv";

/// The CA is long-lived: replacing it means re-issuing every host certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// A host certificate lasts a year: a stolen key is useful for at most that long even if its
/// revocation (`--deny-cert`) is missed somewhere. Re-issue with the same command to renew.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 86400);
/// Backdating tolerates clocks between hosts that disagree by this much.
const BACKDATE: Duration = Duration::from_secs(3600);

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Migrate out of this host (`pageserv src`): a TLS client certificate.
    Source,
    /// Accept migrations into this host (`pageserv dst`): a TLS server certificate.
    Destination,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }

    fn key_usage(self) -> ExtendedKeyUsagePurpose {
        match self {
            Role::Source => ExtendedKeyUsagePurpose::ClientAuth,
            Role::Destination => ExtendedKeyUsagePurpose::ServerAuth,
        }
    }

    /// `source`, `destination` or `both`.
    pub fn parse_set(s: &str) -> Result<Vec<Role>, String> {
        match s {
            "source" | "src" => Ok(vec![Role::Source]),
            "destination" | "dst" => Ok(vec![Role::Destination]),
            "both" => Ok(vec![Role::Source, Role::Destination]),
            other => Err(format!(
                "unknown role {other:?}: source, destination or both"
            )),
        }
    }
}

/// The roles a certificate (DER) allows, from its extended key usage. A certificate without
/// the extension allows neither: pageserv issues none such.
pub fn roles_of(cert: &CertificateDer<'_>) -> Vec<Role> {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(eku)) = c.extended_key_usage() else {
        return Vec::new();
    };
    let mut roles = Vec::new();
    if eku.value.client_auth {
        roles.push(Role::Source);
    }
    if eku.value.server_auth {
        roles.push(Role::Destination);
    }
    roles
}

/// What went wrong creating or loading certificates.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("certificate directory {}: missing {file}; run `{hint}`", dir.display())]
    Missing {
        dir: PathBuf,
        file: &'static str,
        hint: String,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    BadFile { path: PathBuf, what: String },
    #[error(
        "{} already exists; refusing to replace a CA (every certificate issued from it would stop \
         working). Remove it first to start over",
        path.display()
    )]
    CaExists { path: PathBuf },
    #[error(
        "invalid host name {name:?} for a certificate: {why}; give a DNS name or an IP address"
    )]
    BadName { name: String, why: String },
    #[error("cannot {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error(
        "certificate directory {}: {CERT} is not a valid pageserv {role} certificate under \
         {CA_CERT}: {source}; re-issue it with `pageserv keygen issue --ca <CA dir> --name <host> \
         --out {}`",
        dir.display(),
        dir.display()
    )]
    NotTrusted {
        dir: PathBuf,
        role: &'static str,
        source: rustls::Error,
    },
    #[error(
        "certificate directory {}: {CERT} is not a {want} certificate (it allows: {has}); this \
         service needs one: issue it with `pageserv keygen --ca <CA dir> --name <host> --role \
         {want} --out {}`",
        dir.display(),
        dir.display()
    )]
    WrongRole {
        dir: PathBuf,
        want: &'static str,
        has: String,
    },
}

/// A host's TLS identity: the CA it trusts, its certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The directory it was loaded from, for error messages.
    pub dir: PathBuf,
    /// Every certificate in `ca.pem`: the roots peers must chain to.
    pub ca: Vec<CertificateDer<'static>>,
    /// `cert.pem`: this host's certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            dir: self.dir.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads and checks `dir`: the key matches the certificate and the certificate chains to
    /// `ca.pem` as both a server (name "pageserv") and a client, so a bad directory fails here
    /// with a local message rather than as a TLS alert on the peer.
    pub fn load(dir: &Path) -> Result<Identity, KeyError> {
        let hint = format!(
            "pageserv keygen issue --ca <CA dir> --name <host> --out {}",
            dir.display()
        );
        let ca = read_certs(dir, CA_CERT, &hint)?;
        let chain = read_certs(dir, CERT, &hint)?;
        let key_path = need(dir, KEY, &hint)?;
        let pem = read(&key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| KeyError::BadFile {
            path: key_path.clone(),
            what: format!("no usable PEM private key ({e})"),
        })?;
        warn_if_readable_by_others(&key_path);
        let id = Identity {
            dir: dir.to_path_buf(),
            ca,
            chain,
            key,
        };
        id.check()?;
        Ok(id)
    }

    /// Path of the trusted CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// Path of this host's certificate.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT)
    }

    /// The roles this host's certificate allows.
    pub fn roles(&self) -> Vec<Role> {
        self.chain.first().map(roles_of).unwrap_or_default()
    }

    /// Fails unless this host's certificate allows `role`.
    pub fn require(&self, role: Role) -> Result<(), KeyError> {
        let roles = self.roles();
        if roles.contains(&role) {
            return Ok(());
        }
        let has: Vec<&str> = roles.iter().map(|r| r.name()).collect();
        Err(KeyError::WrongRole {
            dir: self.dir.clone(),
            want: role.name(),
            has: if has.is_empty() {
                "no pageserv role".into()
            } else {
                has.join(", ")
            },
        })
    }

    /// The trusted roots as rustls wants them.
    pub(crate) fn roots(&self) -> Result<Arc<RootCertStore>, KeyError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|e| KeyError::BadFile {
                path: self.ca_path(),
                what: format!("not a usable CA certificate ({e})"),
            })?;
        }
        Ok(Arc::new(roots))
    }

    fn check(&self) -> Result<(), KeyError> {
        let provider = crypto_provider();
        let signer = provider
            .key_provider
            .load_private_key(self.key.clone_key())
            .map_err(|e| KeyError::BadFile {
                path: self.dir.join(KEY),
                what: format!("unsupported private key ({e})"),
            })?;
        let certified = rustls::sign::CertifiedKey::new(self.chain.clone(), signer);
        certified.keys_match().map_err(|e| KeyError::BadFile {
            path: self.dir.join(KEY),
            what: format!(
                "this key does not belong to {CERT} ({e}); keep the pair issued together"
            ),
        })?;

        let roots = self.roots()?;
        let not_trusted = |role, source| KeyError::NotTrusted {
            dir: self.dir.clone(),
            role,
            source,
        };
        let (leaf, intermediates) = (&self.chain[0], &self.chain[1..]);
        let roles = self.roles();
        if roles.is_empty() {
            return Err(KeyError::BadFile {
                path: self.cert_path(),
                what: "the certificate allows neither role (no serverAuth or clientAuth key \
                       usage); re-issue it with `pageserv keygen --role ...`"
                    .into(),
            });
        }
        let now = UnixTime::now();
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| not_trusted("server", rustls::Error::General(e.to_string())))?;
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| not_trusted("server", rustls::Error::General(e.to_string())))?;
        if roles.contains(&Role::Destination) {
            server
                .verify_server_cert(leaf, intermediates, &name, &[], now)
                .map_err(|e| not_trusted("server", e))?;
        }
        if roles.contains(&Role::Source) {
            let client =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| not_trusted("client", rustls::Error::General(e.to_string())))?;
            client
                .verify_client_cert(leaf, intermediates, now)
                .map_err(|e| not_trusted("client", e))?;
        }
        Ok(())
    }
}

/// The one crypto provider pageserv uses (ring), so no process-wide default is needed.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Creates a new CA in `dir` (`ca.pem`, `ca.key` mode 0600). Refuses to replace an existing one.
pub fn generate_ca(dir: &Path) -> Result<(), KeyError> {
    for f in [CA_CERT, CA_KEY] {
        let path = dir.join(f);
        if path.exists() {
            return Err(KeyError::CaExists { path });
        }
    }
    make_dir(dir)?;
    let key = KeyPair::generate().map_err(|source| KeyError::Generate {
        what: "generate the CA key",
        source,
    })?;
    let mut params = CertificateParams::default();
    // A distinct name per CA: a peer from another CA then fails as "unknown issuer", which
    // explains itself, rather than as a bad signature.
    let tag: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pageserv");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("pageserv CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_VALIDITY);
    let cert = params
        .self_signed(&key)
        .map_err(|source| KeyError::Generate {
            what: "self-sign the CA certificate",
            source,
        })?;
    write_file(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), "created pageserv CA");
    Ok(())
}

/// Issues a certificate for host `name` from the CA in `ca_dir` into `out_dir`: `cert.pem`,
/// `key.pem` (0600) and a copy of `ca.pem`. It allows `roles` (see the module doc), with SANs
/// "pageserv" and `name` (a DNS name or an IP address). Replaces an older one.
pub fn issue(ca_dir: &Path, name: &str, roles: &[Role], out_dir: &Path) -> Result<(), KeyError> {
    issue_names(ca_dir, &[name.to_string()], roles, out_dir)
}

/// [`issue`] for a host known by several names (`keygen --name a --name 10.0.0.2`): every one
/// goes into the subject alternative names (an IP literal as an IP address), the first is the
/// common name. A source dialling the host by any of them (or with `--dst-name`) accepts it.
pub fn issue_names(
    ca_dir: &Path,
    names: &[String],
    roles: &[Role],
    out_dir: &Path,
) -> Result<(), KeyError> {
    let hint = format!("pageserv keygen ca {}", ca_dir.display());
    let ca_pem_path = need(ca_dir, CA_CERT, &hint)?;
    let ca_key_path = need(ca_dir, CA_KEY, &hint)?;
    let ca_pem = read_string(&ca_pem_path)?;
    let ca_key = KeyPair::from_pem(&read_string(&ca_key_path)?).map_err(|e| KeyError::BadFile {
        path: ca_key_path.clone(),
        what: format!("not a usable PEM private key ({e})"),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| KeyError::BadFile {
        path: ca_pem_path.clone(),
        what: format!("not a usable CA certificate ({e})"),
    })?;

    let name = names.first().map(String::as_str).unwrap_or("");
    let mut sans = vec![SERVER_NAME.to_string()];
    for n in names {
        if !sans.contains(n) {
            sans.push(n.clone());
        }
    }
    let bad_name = |why: String| KeyError::BadName {
        name: name.to_string(),
        why,
    };
    if names.iter().any(String::is_empty) || names.is_empty() {
        return Err(bad_name("it is empty".into()));
    }
    if roles.is_empty() {
        return Err(bad_name(
            "no role given (source, destination or both)".into(),
        ));
    }
    let mut params = CertificateParams::new(sans).map_err(|e| bad_name(e.to_string()))?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, "pageserv");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = roles.iter().map(|r| r.key_usage()).collect();
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY);
    let key = KeyPair::generate().map_err(|source| KeyError::Generate {
        what: "generate a host key",
        source,
    })?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| KeyError::Generate {
            what: "sign the host certificate",
            source,
        })?;

    make_dir(out_dir)?;
    write_file(&out_dir.join(KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out_dir.join(CERT), cert.pem().as_bytes(), 0o644)?;
    write_file(&out_dir.join(CA_CERT), ca_pem.as_bytes(), 0o644)?;
    let roles: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    tracing::info!(?names, ?roles, dir = %out_dir.display(), "issued pageserv certificate");
    Ok(())
}

/// The SHA-256 fingerprint of the first certificate in the PEM file `path` (what `--deny-cert`
/// lists).
pub fn fingerprint_file(path: &Path) -> Result<trust::Fingerprint, KeyError> {
    let pem = read(path)?;
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| KeyError::BadFile {
            path: path.to_path_buf(),
            what: "holds no PEM certificate".into(),
        })?;
    Ok(trust::Fingerprint::of(&cert))
}

/// A CA and two host identities under `base` (`ca/`, `src/`, `dst/`) for tests and the demo,
/// created on first use and reused after. Returns the (src, dst) certificate directories.
pub fn demo_identities(base: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    let ca = base.join("ca");
    let fresh_ca = !ca.join(CA_KEY).exists();
    if fresh_ca {
        generate_ca(&ca)?;
    }
    let (src, dst) = (base.join("src"), base.join("dst"));
    for (dir, name, role) in [
        (&src, "src", Role::Source),
        (&dst, "dst", Role::Destination),
    ] {
        let fits = || Identity::load(dir).is_ok_and(|id| id.roles() == [role]);
        if fresh_ca || !fits() {
            issue(&ca, name, &[role], dir)?;
        }
    }
    Ok((src, dst))
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn need(dir: &Path, file: &'static str, hint: &str) -> Result<PathBuf, KeyError> {
    let path = dir.join(file);
    if path.exists() {
        Ok(path)
    } else {
        Err(KeyError::Missing {
            dir: dir.to_path_buf(),
            file,
            hint: hint.to_string(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, KeyError> {
    String::from_utf8(read(path)?).map_err(|_| KeyError::BadFile {
        path: path.to_path_buf(),
        what: "not a PEM text file".into(),
    })
}

fn read_certs(
    dir: &Path,
    file: &'static str,
    hint: &str,
) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let path = need(dir, file, hint)?;
    let pem = read(&path)?;
    let bad = |what: String| KeyError::BadFile {
        path: path.clone(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("unreadable PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "private key is readable by group or others; chmod 600 it");
    }
}

fn make_dir(dir: &Path) -> Result<(), KeyError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `data` to `path` with `mode`, through a temporary file and a rename so a crash never
/// leaves a half-written key, and an existing file's looser mode is not inherited.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // The umask may have narrowed `mode`; a certificate must stay world-readable.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests;
