//! `pageserv bench --quick`: one small cell per mode (criu-disk, criu-pageserver, criu-lazy,
//! pageserv-lazy), each a real migration of the self-verifying workload with source and
//! destination in network namespaces of their own. Every available mode must complete and
//! verify the workload's memory at the destination; the unavailable ones must be listed with a
//! reason. Needs root and CRIU (skips with a printed reason otherwise).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

#[path = "../../tests/common/root.rs"]
mod root;
use root::can_run;

/// `pageserv`, built beside the lab by `cargo build --release` at the root: the bench runs as
/// users run it, `pageserv bench`, which hands it to `pageserv-lab`.
fn pageserv() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_pageserv-lab")).with_file_name("pageserv");
    assert!(
        p.is_file(),
        "{} missing: build with `cargo build --release` at the repository's root",
        p.display()
    );
    p
}

#[test]
fn quick_bench_verifies_every_available_mode() {
    if !can_run() {
        return;
    }
    let out = std::env::temp_dir().join(format!("pageserv-bench-quick-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(pageserv())
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
        assert_eq!(
            x["emulator"], "veth",
            "{mode}: the plain link is a bare veth"
        );
        // The workload's memory crossed the link (or the disk, for criu-disk).
        assert!(x["wire_bytes"].as_u64().unwrap() > 60 << 20, "{mode}: {x}");
    }
    let unavailable: Vec<&str> = r["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["mode"].as_str().unwrap())
        .collect();
    assert!(
        unavailable.contains(&"criu-predump"),
        "criu-predump not listed as unavailable"
    );
    assert!(
        r["machine"]["criu_version"]
            .as_str()
            .unwrap()
            .starts_with('4')
    );
    assert!(run.status.success(), "bench --quick failed: {}", run.status);
    for f in [
        "results.md",
        "downtime-unlimited.png",
        "downtime-unlimited.svg",
        "fault_latency-unlimited.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// The emulated links: the same two modes (CRIU's TCP, pageserv's QUIC) across a 1 Gbit/s link
/// with a 2 ms round trip and 0.5% loss, through linkem (or netem where the kernel has it).
#[test]
fn bench_runs_across_an_emulated_link() {
    if !can_run() {
        return;
    }
    let out = std::env::temp_dir().join(format!("pageserv-bench-link-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(pageserv())
        .args([
            "bench",
            "--sizes",
            "64",
            "--links",
            "1gbit+2ms+0.5%",
            "--rates",
            "10",
        ])
        .args([
            "--runs",
            "1",
            "--modes",
            "criu-pageserver,pageserv-lazy",
            "--out",
        ])
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
    assert_eq!(runs.len(), 2);
    let netem = r["machine"]["netem_available"].as_bool().unwrap();
    for x in runs {
        let mode = &x["cell"]["mode"];
        assert_eq!(x["cell"]["link"], "1gbit+2ms+0.5%");
        assert_eq!(x["verified"], true, "{mode}: {}", x["problems"]);
        assert_eq!(x["emulator"], if netem { "netem" } else { "linkem" });
        assert!(x["wire_bytes"].as_u64().unwrap() > 60 << 20, "{mode}: {x}");
        if !netem {
            // linkem's own counters: it dropped for loss, and never because it fell behind.
            let counters = x["link_counters"].as_str().unwrap();
            assert!(counters.contains("behind 0,"), "{counters}");
            let forward = counters.lines().next().unwrap_or_default();
            assert!(!forward.contains("loss 0 "), "no loss at 0.5%: {counters}");
        }
    }
    assert!(out.join("downtime-1gbit_2ms_0.5pct.svg").is_file());
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("### 1gbit+2ms+0.5%"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}
