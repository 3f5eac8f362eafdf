use super::*;

const BOTH: [Role; 2] = [Role::Source, Role::Destination];
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("pageserv-keys-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// SAN DNS names and IPs of the first certificate in a PEM file.
fn sans(path: &Path) -> Vec<String> {
    let pem = fs::read(path).unwrap();
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn issued_identity_loads_and_has_the_right_names_and_modes() {
    let t = TempDir::new();
    let ca = t.0.join("ca");
    generate_ca(&ca).unwrap();
    assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
    let host = t.0.join("hostA");
    issue(&ca, "host-a.example", &BOTH, &host).unwrap();
    assert_eq!(mode(&host.join(KEY)), 0o600);
    assert_eq!(mode(&host.join(CERT)), 0o644);
    assert_eq!(
        fs::read(host.join(CA_CERT)).unwrap(),
        fs::read(ca.join(CA_CERT)).unwrap()
    );
    assert_eq!(sans(&host.join(CERT)), vec!["pageserv", "host-a.example"]);
    let id = Identity::load(&host).unwrap();
    assert_eq!(id.chain.len(), 1);
    assert_eq!(id.ca.len(), 1);
    assert_eq!(id.cert_path(), host.join(CERT));

    issue(&ca, "10.1.2.3", &BOTH, &t.0.join("ip")).unwrap();
    assert_eq!(
        sans(&t.0.join("ip").join(CERT)),
        vec!["pageserv", "ip:[10, 1, 2, 3]"]
    );
    assert!(matches!(
        issue(&ca, "", &BOTH, &t.0.join("x")),
        Err(KeyError::BadName { .. })
    ));
}

#[test]
fn missing_files_name_the_directory_file_and_command() {
    let t = TempDir::new();
    let e = Identity::load(&t.0).unwrap_err().to_string();
    assert!(e.contains(&t.0.display().to_string()), "{e}");
    assert!(
        e.contains("missing ca.pem") && e.contains("pageserv keygen"),
        "{e}"
    );

    let (src, _) = demo_identities(&t.0.join("demo")).unwrap();
    fs::remove_file(src.join(KEY)).unwrap();
    let e = Identity::load(&src).unwrap_err().to_string();
    assert!(e.contains("missing key.pem"), "{e}");

    let e = issue(&t.0.join("nope"), "a", &BOTH, &t.0.join("a"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing ca.pem") && e.contains("pageserv keygen ca"),
        "{e}"
    );
}

#[test]
fn mismatched_key_and_foreign_ca_are_caught_at_load() {
    let t = TempDir::new();
    let (src, dst) = demo_identities(&t.0.join("one")).unwrap();
    fs::copy(dst.join(KEY), src.join(KEY)).unwrap();
    match Identity::load(&src) {
        Err(KeyError::BadFile { path, what }) => {
            assert_eq!(path, src.join(KEY));
            assert!(what.contains("does not belong"), "{what}");
        }
        other => panic!("expected a key mismatch, got {other:?}"),
    }

    let (other_src, _) = demo_identities(&t.0.join("two")).unwrap();
    fs::copy(other_src.join(CA_CERT), dst.join(CA_CERT)).unwrap();
    let e = Identity::load(&dst).unwrap_err();
    assert!(matches!(e, KeyError::NotTrusted { .. }), "{e:?}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

#[test]
fn ca_is_never_replaced_and_demo_reuses_what_exists() {
    let t = TempDir::new();
    let (src, dst) = demo_identities(&t.0).unwrap();
    let before = fs::read(src.join(CERT)).unwrap();
    assert!(matches!(
        generate_ca(&t.0.join("ca")),
        Err(KeyError::CaExists { .. })
    ));
    let again = demo_identities(&t.0).unwrap();
    assert_eq!(again, (src.clone(), dst.clone()));
    assert_eq!(fs::read(src.join(CERT)).unwrap(), before);
    Identity::load(&src).unwrap();
    Identity::load(&dst).unwrap();
}

#[test]
fn every_name_goes_into_the_certificate_which_lasts_a_year() {
    let t = TempDir::new();
    let ca = t.0.join("ca");
    generate_ca(&ca).unwrap();
    let out = t.0.join("h");
    let names = [
        "dst.example".to_string(),
        "10.0.0.2".into(),
        "pageserv".into(),
    ];
    issue_names(&ca, &names, &[Role::Destination], &out).unwrap();
    assert_eq!(
        sans(&out.join(CERT)),
        vec!["pageserv", "dst.example", "ip:[10, 0, 0, 2]"]
    );
    let pem = fs::read(out.join(CERT)).unwrap();
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 365, "one year (and the hour of backdating)");
    assert_eq!(
        fingerprint_file(&out.join(CERT)).unwrap(),
        trust::Fingerprint::of(&der)
    );
    assert!(issue_names(&ca, &[], &[Role::Source], &t.0.join("none")).is_err());
}
