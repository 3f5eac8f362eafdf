//! Serving from the frozen tasks against the real CRIU (`source::frozen`).
//!
//! - `frozen_memory_equals_criu_page_by_page`: a lazy dump of a holder process with a known
//!   memory layout; every lazy page read from the frozen task equals, byte for byte, the page
//!   CRIU's page server returns for it from the same dump, and the holder's known contents. The
//!   tasks are verified ptrace-stopped by that dump while read, and stop being readable the
//!   moment the session ends (CRIU kills them).
//! - `not_frozen_is_not_read`: a running task, or one stopped by another tracer, is not read.
//! - `a_task_killed_during_post_copy_fails_over_to_criu`: SIGKILL the frozen task mid session:
//!   reads of its memory are refused from then on, the serving core fails it over to CRIU, and
//!   CRIU's pipes still hold its frozen pages, which are served instead.
//!
//! Needs root and CRIU; skips otherwise.

#[path = "common/criu.rs"]
mod criu;
#[path = "common/holder.rs"]
mod holder;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pageserv::criu::binary::Criu;
use pageserv::criu::images::ImageDir;
use pageserv::criu::page_server::{ClientEvent, GetClient, GetReply};
use pageserv::pages::{PAGE_SIZE, PageRange};
use pageserv::source::dump::{DumpOptions, PageServerConn, ReadyDump, start_lazy_dump};
use pageserv::source::frozen::FrozenTasks;
use pageserv::source::frozen::core::{Action, Core, CoreConfig, FaultRequest, Origin};
use pageserv::source::frozen::tasks::{Checks, NotReadable};
use pageserv::source::push_plan::PushPlan;

#[test]
fn memory_holder() {
    holder::run_if_requested();
}

struct Session {
    _scratch: criu::TestDir,
    holder: holder::Holder,
    dump: ReadyDump,
    conn: UnixStream,
    client: GetClient,
    lazy: Vec<(u32, Vec<PageRange>)>,
    buf: Vec<u8>,
}

fn start(test: &str) -> Option<Session> {
    let c = criu::require(test)?;
    criu::ensure_pipe_max_size().expect("pipe-max-size");
    let criu = Criu::locate(Some(c.bin.as_path())).expect("CRIU version");
    let scratch = criu::TestDir::new(test);
    let holder = holder::spawn("memory_holder", scratch.path()).expect("holder");
    let work = scratch.sub("work");
    let mut dump = start_lazy_dump(
        &criu,
        &DumpOptions {
            pid: holder.proc.pid,
            images_dir: work.join("images"),
            work_dir: work.clone(),
            extra: Vec::new(),
        },
    )
    .expect("criu dump --lazy-pages ready");
    let images = ImageDir::open(&dump.images_dir).expect("images");
    let mut lazy = Vec::new();
    for t in images.pstree().expect("pstree") {
        let ranges: Vec<PageRange> = images
            .pagemap(t.pid)
            .expect("pagemap")
            .entries
            .iter()
            .filter(|e| e.flags.is_lazy() && !e.flags.is_present())
            .map(|e| PageRange::new(e.vaddr, e.nr_pages))
            .collect();
        lazy.push((t.pid, ranges));
    }
    let conn = match std::mem::replace(
        &mut dump.conn,
        PageServerConn::Unix(UnixStream::pair().expect("socketpair").0),
    ) {
        PageServerConn::Unix(s) => s,
        PageServerConn::Tcp(_) => unreachable!("start_lazy_dump uses --ps-socket"),
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let layout = criu.layout();
    Some(Session {
        _scratch: scratch,
        holder,
        dump,
        conn,
        client: GetClient::new(layout),
        lazy,
        buf: vec![0; 1 << 20],
    })
}

impl Session {
    fn image_pids(&self) -> Vec<u32> {
        self.lazy.iter().map(|(p, _)| *p).collect()
    }

    fn dump_pid(&self) -> u32 {
        self.dump.child.as_ref().expect("our dump").id()
    }

    fn next_event(&mut self) -> ClientEvent {
        loop {
            if let Some(e) = self.client.poll().expect("page-server stream") {
                return e;
            }
            let n = self.conn.read(&mut self.buf).expect("read from CRIU");
            assert!(n > 0, "CRIU closed the session: {:?}", self.client.on_eof());
            let (client, buf) = (&mut self.client, &self.buf);
            client.feed(&buf[..n]);
        }
    }

    /// GETs `nr_pages` pages (possibly in several replies: CRIU clamps at its buffer ends).
    fn get(&mut self, pid: u32, vaddr: u64, nr_pages: u64) -> Vec<u8> {
        let mut data = Vec::new();
        let mut at = vaddr;
        let end = vaddr + nr_pages * PAGE_SIZE;
        while at < end {
            let mut out = BytesMut::new();
            self.client
                .request(pid, at, (end - at) / PAGE_SIZE, &mut out)
                .expect("GET");
            self.conn.write_all(&out).expect("write GET");
            let ClientEvent::Pages(GetReply {
                nr_pages, data: d, ..
            }) = self.next_event()
            else {
                panic!("CLOSE reply to a GET")
            };
            data.extend_from_slice(&d);
            at += nr_pages * PAGE_SIZE;
        }
        data
    }

    fn close(&mut self) {
        let mut out = BytesMut::new();
        self.client.close(true, &mut out).expect("FORCE_CLOSE");
        self.conn.write_all(&out).expect("write FORCE_CLOSE");
        assert_eq!(self.next_event(), ClientEvent::Closed);
    }

    /// Checks a page against the holder's known contents (pages outside its region: skipped).
    fn check_holder(&self, vaddr: u64, page: &[u8]) -> bool {
        let end = self.holder.addr + holder::HOLDER_PAGES * PAGE_SIZE;
        if vaddr < self.holder.addr || vaddr >= end {
            return false;
        }
        let i = (vaddr - self.holder.addr) / PAGE_SIZE;
        assert!(
            page == holder::expected_page(i).as_slice(),
            "holder page {i} at {vaddr:#x} differs from what the holder wrote"
        );
        true
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn frozen_memory_equals_criu_page_by_page() {
    let Some(mut s) = start("frozen_memory_equals_criu_page_by_page") else {
        return;
    };
    let tasks = FrozenTasks::discover(s.holder.proc.pid, s.dump_pid(), &s.image_pids())
        .expect("discover the frozen tree");
    assert!(
        tasks.unreadable().is_empty(),
        "every task is frozen by the dump: {:?}",
        tasks.unreadable()
    );
    // This kernel gives perf switch watches, so the checks below load them (no /proc read).
    for pid in s.image_pids() {
        assert!(tasks.checked_by_switch_watch(pid), "image pid {pid}");
    }
    let (mut pages, mut holder_pages) = (0u64, 0u64);
    for (pid, ranges) in s.lazy.clone() {
        assert_eq!(
            tasks.host_pid(pid),
            Some(s.holder.proc.pid),
            "image pid {pid}"
        );
        for r in ranges {
            let mem = tasks
                .read(pid, r.start, r.nr_pages)
                .unwrap_or_else(|e| panic!("reading {r:?} of the frozen task: {e}"));
            let from_criu = s.get(pid, r.start, r.nr_pages);
            assert_eq!(mem.len(), from_criu.len());
            for (i, (a, b)) in mem
                .chunks(PAGE_SIZE as usize)
                .zip(from_criu.chunks(PAGE_SIZE as usize))
                .enumerate()
            {
                let vaddr = r.start + i as u64 * PAGE_SIZE;
                assert!(
                    a == b,
                    "pid {pid} page {vaddr:#x}: frozen memory != CRIU's copy"
                );
                holder_pages += u64::from(s.check_holder(vaddr, a));
                pages += 1;
            }
            tasks
                .check_frozen(pid)
                .expect("still frozen after the read");
        }
    }
    let dumped = (0..holder::HOLDER_PAGES)
        .filter(|&i| holder::is_dumped(i))
        .count() as u64;
    eprintln!("{pages} lazy pages compared, {holder_pages} of them in the holder's region");
    assert!(
        holder_pages >= dumped * 9 / 10,
        "most of the holder's {dumped} dumped pages are lazy: {holder_pages}"
    );
    // The session ends: CRIU kills the tasks, and their memory is no longer read.
    s.close();
    let status = s.dump.wait(Duration::from_secs(30)).expect("dump ended");
    assert!(status.0.success(), "criu dump: {}", status.1);
    let pid = s.image_pids()[0];
    assert!(tasks.check_frozen(pid).is_err(), "the dump is gone");
    let r = s.lazy[0].1[0];
    assert!(
        tasks.read(pid, r.start, 1).is_err(),
        "no read after the end"
    );
}

#[test]
fn not_frozen_is_not_read() {
    let Some(c) = criu::require("not_frozen_is_not_read") else {
        return;
    };
    let _ = c;
    let scratch = criu::TestDir::new("not_frozen_is_not_read");
    let holder = holder::spawn("memory_holder", scratch.path()).expect("holder");
    let me0 = std::process::id();
    // Running (sleeping): not stopped, no tracer.
    let t = FrozenTasks::discover(holder.proc.pid, me0, &[1]).expect("discover");
    assert!(t.readable().next().is_none());
    assert!(matches!(
        t.unreadable(),
        [(1, NotReadable::NotFrozen { .. })]
    ));
    // An image pid the tree does not have.
    let t = FrozenTasks::discover(holder.proc.pid, me0, &[77]).expect("discover");
    assert_eq!(t.unreadable(), &[(77, NotReadable::NoHostPid(77))]);
    // Stopped (every thread) by a tracer that is not the dump: this test's thread. Not read.
    let threads = stop_all_threads(holder.proc.pid);
    // TracerPid names the tracing thread.
    let me = nix::unistd::gettid().as_raw() as u32;
    let t = FrozenTasks::discover(holder.proc.pid, 1, &[1]).expect("discover");
    assert!(
        t.readable().next().is_none(),
        "traced by this test, not by the dump (pid 1)"
    );
    // Stopped by the tracer named as the dump: read, and the bytes are the holder's. Checked
    // both ways: by perf switch watches, and by /proc alone (the fallback, run counts here).
    let t = FrozenTasks::discover(holder.proc.pid, me, &[1]).expect("discover");
    assert_eq!(t.readable().collect::<Vec<_>>(), vec![1]);
    assert!(t.checked_by_switch_watch(1));
    let by_proc = FrozenTasks::discover_checked(holder.proc.pid, me, &[1], Checks::Proc)
        .expect("discover by /proc");
    assert!(by_proc.checked_by_run_count(1) && !by_proc.checked_by_switch_watch(1));
    std::thread::sleep(Duration::from_millis(100));
    t.check_frozen(1)
        .expect("still stopped: no switch recorded");
    by_proc
        .check_frozen(1)
        .expect("still stopped: run count unchanged");
    let data = t.read(1, holder.addr, 3).expect("read the stopped holder");
    for i in 0..3u64 {
        let page = &data[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
        assert!(page == holder::expected_page(i).as_slice(), "page {i}");
    }
    // Released by its tracer: it runs again, and is no longer read.
    for &tid in &threads {
        nix::sys::ptrace::detach(tid, None).expect("detach");
    }
    wait_until("the holder to leave its stop", || {
        t.check_frozen(1).is_err()
    });
    assert!(t.read(1, holder.addr, 1).is_err());
    wait_until("the /proc check to see it", || {
        by_proc.check_frozen(1).is_err()
    });
    assert!(by_proc.read(1, holder.addr, 1).is_err());
}

#[test]
fn a_task_killed_during_post_copy_fails_over_to_criu() {
    let Some(mut s) = start("a_task_killed_during_post_copy_fails_over_to_criu") else {
        return;
    };
    let tasks = FrozenTasks::discover(s.holder.proc.pid, s.dump_pid(), &s.image_pids())
        .expect("discover the frozen tree");
    let pid = s.image_pids()[0];
    let mut core = Core::new(
        PushPlan::new(s.lazy.clone()),
        CoreConfig::default(),
        tasks.readable().collect(),
    );
    // Killed while frozen (a SIGKILL ends even a ptrace stop).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.holder.proc.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the frozen task");
    wait_until("the killed task to leave its stop", || {
        tasks.check_frozen(pid).is_err()
    });
    // A fault on a holder page: read from memory first, refused, then from CRIU.
    let vaddr = s.holder.addr;
    core.fault(FaultRequest {
        pid,
        vaddr,
        nr_pages: 3,
        at: Instant::now(),
    });
    let Some(Action::Read(r)) = core.poll() else {
        panic!("no read for the fault")
    };
    assert_eq!(r.origin, Origin::Memory);
    let err = tasks.read(r.pid, r.vaddr, r.nr_pages).unwrap_err();
    eprintln!("read of the killed task refused: {err}");
    core.read_failed(r.id).expect("fail over");
    let Some(Action::Read(again)) = core.poll() else {
        panic!("no CRIU read after the failover")
    };
    assert_eq!((again.origin, again.id), (Origin::Criu, r.id));
    let data = s.get(again.pid, again.vaddr, again.nr_pages);
    core.read_done(again.id, Bytes::from(data.clone()))
        .expect("read done");
    match core.poll() {
        Some(Action::Answer { data: d, .. }) => assert_eq!(d, Bytes::from(data.clone())),
        other => panic!("expected the answer, got {other:?}"),
    }
    // CRIU's pipes still hold every frozen page of the dead task.
    let mut checked = 0;
    for r in s.lazy[0].1.clone() {
        let from_criu = s.get(pid, r.start, r.nr_pages);
        for (i, page) in from_criu.chunks(PAGE_SIZE as usize).enumerate() {
            checked += u64::from(s.check_holder(r.start + i as u64 * PAGE_SIZE, page));
        }
    }
    assert!(checked > 1000, "holder pages served by CRIU: {checked}");
    s.close();
    let ended = s.dump.wait(Duration::from_secs(30));
    eprintln!("criu dump after its task was killed: {ended:?}");
    assert!(ended.is_some(), "the dump ends after the close");
}

/// Seizes and stops every thread of `pid` with this test's thread as the tracer; returns them.
fn stop_all_threads(pid: i32) -> Vec<nix::unistd::Pid> {
    let threads: Vec<nix::unistd::Pid> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("threads")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .map(nix::unistd::Pid::from_raw)
        .collect();
    for &tid in &threads {
        nix::sys::ptrace::seize(tid, nix::sys::ptrace::Options::empty()).expect("seize");
        nix::sys::ptrace::interrupt(tid).expect("interrupt");
        let _ = nix::sys::wait::waitpid(tid, Some(nix::sys::wait::WaitPidFlag::__WALL));
    }
    threads
}

/// A task with many threads: releasing only its last thread is seen by both kinds of check, so
/// no thread is skipped; the task's memory is not read after that.
#[test]
fn one_released_thread_of_many_is_seen() {
    let Some(_c) = criu::require("one_released_thread_of_many_is_seen") else {
        return;
    };
    let scratch = criu::TestDir::new("one_released_thread_of_many_is_seen");
    let holder = holder::spawn_with(
        "memory_holder",
        scratch.path(),
        &[(holder::THREADS_ENV, "15")],
    )
    .expect("holder");
    let mut threads = stop_all_threads(holder.proc.pid);
    assert!(threads.len() >= 16, "the holder has its 15 more threads");
    threads.sort();
    let me = nix::unistd::gettid().as_raw() as u32;
    let watched = FrozenTasks::discover(holder.proc.pid, me, &[1]).expect("discover");
    let by_proc = FrozenTasks::discover_checked(holder.proc.pid, me, &[1], Checks::Proc)
        .expect("discover by /proc");
    assert!(watched.checked_by_switch_watch(1));
    assert!(by_proc.checked_by_run_count(1));
    std::thread::sleep(Duration::from_millis(100));
    watched.check_frozen(1).expect("all stopped");
    by_proc.check_frozen(1).expect("all stopped");
    let last = *threads.last().expect("a thread");
    nix::sys::ptrace::detach(last, None).expect("detach the last thread");
    wait_until("the watch to see the last thread run", || {
        watched.check_frozen(1).is_err()
    });
    wait_until("the /proc check to see it", || {
        by_proc.check_frozen(1).is_err()
    });
    assert!(watched.read(1, holder.addr, 1).is_err());
    let err = watched.check_frozen(1).expect_err("released");
    assert!(
        matches!(err, NotReadable::NotFrozen { tid, .. } if tid == last.as_raw()),
        "the released thread is named: {err}"
    );
}

/// Measurement (run with `--ignored --nocapture`): what one check after a read costs, by the
/// task's thread count, with switch watches and with /proc reads. No bound is asserted here.
#[test]
#[ignore]
fn measure_check_cost_by_thread_count() {
    let Some(_c) = criu::require("measure_check_cost_by_thread_count") else {
        return;
    };
    for extra in [0usize, 7, 31, 127] {
        let scratch = criu::TestDir::new("measure_check_cost_by_thread_count");
        let n = extra.to_string();
        let holder = holder::spawn_with(
            "memory_holder",
            scratch.path(),
            &[(holder::THREADS_ENV, n.as_str())],
        )
        .expect("holder");
        let threads = stop_all_threads(holder.proc.pid);
        let me = nix::unistd::gettid().as_raw() as u32;
        let mut line = format!("{} threads:", threads.len());
        for checks in [Checks::SwitchWatch, Checks::Proc] {
            let t =
                FrozenTasks::discover_checked(holder.proc.pid, me, &[1], checks).expect("discover");
            let rounds = 2000u32;
            let start = Instant::now();
            for _ in 0..rounds {
                t.check_frozen(1).expect("stopped");
            }
            let per = start.elapsed() / rounds;
            line += &format!(" {checks:?} {:.1} us;", per.as_secs_f64() * 1e6);
        }
        eprintln!("{line}");
        for &tid in &threads {
            let _ = nix::sys::ptrace::detach(tid, None);
        }
    }
}
