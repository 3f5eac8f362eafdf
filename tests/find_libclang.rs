//! `tools/find-libclang` (used by `tools/setup`) against made-up machines: one with only the
//! look-alikes a fresh machine has (libclang-cpp), which must count as "no libclang", and ones
//! with each name clang-sys really loads.

use std::fs;
use std::path::Path;
use std::process::Command;

fn find(root: &Path) -> Option<String> {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/find-libclang"))
        .arg(root)
        .env_remove("LIBCLANG_PATH")
        .output()
        .expect("run tools/find-libclang");
    match out.status.code() {
        Some(0) => Some(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(1) => {
            assert!(out.stdout.is_empty(), "printed a path but said none");
            None
        }
        other => panic!(
            "tools/find-libclang exited {other:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn machine(files: &[&str]) -> tempdir::Dir {
    let d = tempdir::Dir::new();
    for f in files {
        let p = d.path().join(f.trim_start_matches('/'));
        fs::create_dir_all(p.parent().expect("file has a parent")).expect("mkdir");
        fs::write(&p, b"").expect("touch");
    }
    d
}

#[test]
fn fresh_machine_with_lookalikes_has_no_libclang() {
    // What a fresh machine of this project's kind has (and the old glob took for libclang).
    let m = machine(&[
        "/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14",
        "/usr/lib/llvm-14/lib/libclang-cpp.so.14",
        "/usr/lib/llvm-14/lib/libclangBasic.a",
        "/usr/lib/x86_64-linux-gnu/libclang-cpp.so",
    ]);
    assert_eq!(find(m.path()), None);
}

#[test]
fn each_name_clang_sys_loads_is_found() {
    for f in [
        "/usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "/usr/lib/llvm-14/lib/libclang.so",
        "/usr/lib/llvm-16/lib/libclang-16.so",
        "/usr/lib/libclang.so.13",
        "/usr/local/lib/libclang.so",
    ] {
        let m = machine(&["/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", f]);
        let got = find(m.path()).unwrap_or_else(|| panic!("{f} not found"));
        assert!(got.ends_with(f), "{f}: found {got}");
    }
}

#[test]
fn libclang_path_is_honoured() {
    let m = machine(&["/opt/llvm/lib/libclang.so.1"]);
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/find-libclang"))
        .arg(m.path())
        .env("LIBCLANG_PATH", "/opt/llvm/lib")
        .output()
        .expect("run tools/find-libclang");
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .ends_with("/opt/llvm/lib/libclang.so.1")
    );
}

/// A temporary directory removed on drop (no extra dev-dependency for three tests).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let mut p = std::env::temp_dir();
            p.push(format!(
                "find-libclang-{}-{}-{}",
                std::process::id(),
                std::thread::current()
                    .name()
                    .unwrap_or("t")
                    .replace(':', "_"),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("make temp dir");
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
