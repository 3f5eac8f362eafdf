//! Whether an end-to-end test can run here: root (network namespaces, CRIU) and CRIU >= 4.0.
//!
//! Include from an integration test with `#[path = "common/root.rs"] mod root;`. Outside CI a
//! missing prerequisite skips the test with a printed reason; in CI a missing CRIU fails it.

/// True when the test can run; prints why not otherwise.
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: needs root (network namespaces, CRIU)");
        return false;
    }
    if pageserv::criu::binary::Criu::locate(None).is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CRIU missing in CI: tools/setup should have installed it"
        );
        eprintln!("SKIP: no CRIU >= 4.0 (run tools/setup)");
        return false;
    }
    true
}
