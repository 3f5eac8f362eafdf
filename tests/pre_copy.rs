//! End-to-end pre-copy migrations with real CRIU, real userfaultfd and QUIC: `pageserv src --lazy
//! --pre-copy` while the workload keeps writing. The workload checks every page of its memory
//! against its own version table at the destination, so a stale pre-copied page placed instead of
//! the frozen one fails the test. Needs root and CRIU (`tools/setup`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

#[path = "common/root.rs"]
mod root;
use root::can_run;

fn migrate(name: &str, args: &[&str]) -> Value {
    let json =
        std::env::temp_dir().join(format!("pageserv-test-{name}-{}.json", std::process::id()));
    let out = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_pageserv")))
        .arg("demo")
        .arg("--json")
        .arg(&json)
        .args(["--after", "4"])
        .args(args)
        .output()
        .expect("run pageserv demo");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|_| {
        panic!(
            "{name}: demo wrote no result ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&json);
    let v: Value = serde_json::from_str(&text).expect("demo JSON");
    if v["ok"] != Value::Bool(true) {
        panic!(
            "{name}: migration did not verify: {}\n--- demo stderr ---\n{}",
            v["problems"],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    v
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// What every verified pre-copy migration must show.
fn check(name: &str, v: &Value) -> (u64, u64) {
    assert_eq!(v["src_exit"], 0, "{name}");
    assert_eq!(v["dst_exit"], 0, "{name}");
    assert_eq!(v["workload_alive_at_dst"], true, "{name}");
    assert_eq!(v["workload_alive_at_src"], false, "{name}");
    assert_eq!(v["checks_failed"], 0, "{name}");
    assert!(
        u(&v["checks_ok_after"]) >= 3,
        "{name}: {}",
        v["checks_ok_after"]
    );
    let (src, dst) = (&v["src"], &v["dst"]);
    let pre = &src["pre_copy"];
    assert!(
        !pre["rounds"].as_array().unwrap().is_empty(),
        "{name}: {pre}"
    );
    let sweep = &pre["sweep"];
    let valid = u(&sweep["pages_valid"]);
    let changed = u(&sweep["pages_data"]) + u(&sweep["pages_zero"]);
    // Every lazy page was judged: valid, or sent again. A page that a fault asks for while its
    // pushed batch is on the way to dst is judged twice; those duplicates bound the slack below.
    // A page already at dst, not placed yet, is not asked again (dst::push_queue): measured
    // 0.4-1.4% judged twice with that in session 15, 2.4-9.6% without. In session 20 the tree
    // cell measured 0.8-6.4% on a quiet machine with both that session's binary and the one
    // before it (3 runs each), and 5.2% once in CI: more than in session 15, not understood
    // yet. That push_queue answers faults at all is checked by the tree test
    // (`pages_taken_at_fault`); this bound catches gross duplication, not drift.
    let lazy = u(&dst["lazy_pages"]);
    assert!(valid + changed >= lazy, "{name}: {sweep} {dst}");
    let twice = valid + changed - lazy;
    assert!(
        twice * 10 < lazy,
        "{name}: too many pages judged twice: {sweep} {dst}"
    );
    // dst placed from its store the pages src confirmed (a confirmation of a duplicate may
    // arrive after dst reported its memory whole, and is not counted then).
    for local in [u(&dst["pages_local"]), u(&src["dst_pages_local"])] {
        assert!(
            local <= valid && local + twice >= valid,
            "{name}: placed locally {local}, confirmed {valid}, judged twice {twice}"
        );
    }
    // Nothing lost, nothing invented.
    let placed = u(&dst["pages_on_demand"]) + u(&dst["pages_pushed"]) + u(&dst["pages_zero_lazy"]);
    assert_eq!(placed, u(&dst["lazy_pages"]), "{name}: {dst}");
    // As pages were placed, their copies in dst's store were given back (dst::store_release);
    // the memory verified above shows no released copy was ever read.
    let released = u(&dst["page_store_released_bytes"]) / 4096;
    let held = u(&dst["precopy_pages_held"]);
    assert!(
        released > 0 && released <= held,
        "{name}: {released} of {held} stored pages given back: {dst}"
    );
    (valid, changed)
}

/// One round only, while the workload rewrites ~40 pages per ms: thousands of pre-copied pages
/// are stale at the freeze. They must cross again, and the workload's self-checks at the
/// destination prove none was served from its stale copy.
#[test]
fn stale_pre_copied_pages_are_never_served() {
    if !can_run() {
        return;
    }
    let v = migrate(
        "pre-copy-1",
        &[
            "--mib",
            "128",
            "--write-rate",
            "40",
            "--src-arg=--pre-copy=1",
        ],
    );
    let (valid, changed) = check("pre-copy-1", &v);
    assert!(
        changed >= 1000,
        "the workload should have changed many pages after the only round: {}",
        v["src"]["pre_copy"]
    );
    assert!(valid > 0, "{}", v["src"]["pre_copy"]);
}

/// `auto` with a process tree: rounds stop by the rule, most memory is placed from the store,
/// and only what changed after the last round crosses again.
#[test]
fn auto_pre_copy_of_a_tree_sends_only_what_changed() {
    if !can_run() {
        return;
    }
    let v = migrate(
        "pre-copy-auto",
        &[
            "--mib",
            "96",
            "--children",
            "2",
            "--write-rate",
            "10",
            "--src-arg=--pre-copy=auto",
        ],
    );
    let (valid, changed) = check("pre-copy-auto", &v);
    assert_eq!(v["dst"]["tasks"], 3);
    // The workload's sequential self-check faults right behind the push: dst has the source's
    // confirmation of most of those pages before it has placed them, and places them from its
    // store without asking the source (measured 4,800-6,500 of ~7,000 faults' pages).
    assert!(
        u(&v["dst"]["pages_taken_at_fault"]) > 0,
        "no fault was answered from the store: {}",
        v["dst"]
    );
    let pre = &v["src"]["pre_copy"];
    assert!(pre["stop_reason"].is_string(), "{pre}");
    // What changes after the last round is the tree's write rate (3 x 10 pages/ms) times the
    // last round plus the freeze: ~0.4-1 s, i.e. 10-40% of its 74k pages when the machine is
    // busy (measured 9.6-10.5x valid on a loaded host). Most must still be valid.
    assert!(valid > 4 * changed, "most pages must be valid: {pre}");
    // After the freeze, memory bytes are the changed pages plus a few bytes per 1024 valid ones.
    let sweep = &pre["sweep"];
    let data = u(&sweep["pages_data"]) * 4096;
    let bytes = u(&sweep["bytes_data"]) + u(&sweep["bytes_valid"]) + u(&sweep["bytes_zero"]);
    assert!(bytes >= data, "{sweep}");
    assert!(
        bytes <= data + data / 20 + 64 * 1024,
        "bytes after the freeze {bytes} vs changed data {data}: {sweep}"
    );
}

/// A pre-copy whose lazy dump comes out eager for one task (CRIU's stack-page test; the
/// workload's root parks a thread on a page-aligned stack, so every dump of it is eager): that
/// task's memory comes whole in the images, dst drops its pre-copied pages unused, and the
/// child's memory is still placed from the store. Before, dst refused the migration without
/// telling the source, which kept the tree frozen although nothing had been restored.
#[test]
fn a_pre_copy_whose_dump_comes_out_eager_still_migrates() {
    if !can_run() {
        return;
    }
    let v = migrate(
        "pre-copy-eager",
        &[
            "--mib",
            "64",
            "--children",
            "1",
            "--write-rate",
            "1",
            "--workload-arg=--park-on-aligned-stack",
            "--src-arg=--pre-copy=1",
        ],
    );
    assert_eq!(v["src_exit"], 0);
    assert_eq!(v["dst_exit"], 0);
    assert_eq!(v["workload_alive_at_dst"], true);
    assert_eq!(v["checks_failed"], 0);
    let (src, dst) = (&v["src"], &v["dst"]);
    assert_eq!(
        src["eager_dump"], true,
        "the root's dump must be eager: {src}"
    );
    assert_eq!(dst["tasks"], 2);
    let (held, unused) = (
        u(&dst["precopy_pages_held"]),
        u(&dst["precopy_pages_unused"]),
    );
    // The root's 64 MiB (16k pages) were dropped; the child's were kept and used.
    assert!(
        unused >= 16_000 && unused < held,
        "held {held}, unused {unused}: {dst}"
    );
    assert!(
        u(&dst["lazy_pages"]) >= 16_000,
        "the child's memory is lazy: {dst}"
    );
    assert!(
        u(&dst["pages_local"]) > 0,
        "the child's pages from the store: {dst}"
    );
    let placed = u(&dst["pages_on_demand"]) + u(&dst["pages_pushed"]) + u(&dst["pages_zero_lazy"]);
    assert_eq!(placed, u(&dst["lazy_pages"]), "{dst}");
}
