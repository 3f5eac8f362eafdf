//! `pageserv bench --quick`: one small cell per mode (criu-disk, criu-pageserver, criu-lazy,
//! pageserv-lazy), each a real migration of the self-verifying workload. Every available mode
//! must complete and verify the workload's memory at the destination; the unavailable ones must
//! be listed with a reason. Needs root and CRIU (skips with a printed reason otherwise).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn can_run() -> bool {
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

#[test]
fn quick_bench_verifies_every_available_mode() {
    if !can_run() {
        return;
    }
    let out = std::env::temp_dir().join(format!("pageserv-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_pageserv")))
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .expect("run pageserv bench");
    let text = std::fs::read_to_string(out.join("results.json")).unwrap_or_else(|_| {
        panic!(
            "bench wrote no results.json ({}):\n{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        )
    });
    let r: Value = serde_json::from_str(&text).unwrap();
    let runs = r["runs"].as_array().unwrap();
    for mode in ["criu-disk", "criu-pageserver", "criu-lazy", "pageserv-lazy"] {
        let mine: Vec<&Value> = runs.iter().filter(|x| x["cell"]["mode"] == mode).collect();
        assert_eq!(mine.len(), 1, "{mode}: one quick run expected");
        let x = mine[0];
        assert_eq!(
            x["verified"], true,
            "{mode} did not verify: {}",
            x["problems"]
        );
        assert!(x["checks_ok_after"].as_u64().unwrap() >= 2, "{mode}: {x}");
        assert_eq!(x["checks_failed"], 0, "{mode}");
        let downtime = x["downtime_ms"].as_f64().unwrap();
        assert!(
            downtime > 0.0 && downtime < 60_000.0,
            "{mode}: downtime {downtime}"
        );
        assert!(x["total_ms"].as_f64().unwrap() > 0.0, "{mode}");
    }
    let unavailable: Vec<&str> = r["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["mode"].as_str().unwrap())
        .collect();
    for mode in ["pageserv-stop-and-copy", "criu-predump"] {
        assert!(
            unavailable.contains(&mode),
            "{mode} not listed as unavailable"
        );
    }
    assert!(
        r["machine"]["criu_version"]
            .as_str()
            .unwrap()
            .starts_with('4')
    );
    assert!(run.status.success(), "bench --quick failed: {}", run.status);
    for f in [
        "results.md",
        "downtime.png",
        "downtime.svg",
        "fault_latency.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}
