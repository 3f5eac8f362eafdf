//! A lazy dump of a fresh holder, connected to over TCP or a socketpair (`--ps-socket`): GETs
//! sent, replies read and checked against the holder's pattern, throughput over a list of GETs,
//! and the session's close.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pageserv::criu::page_server::{ClientEvent, GetClient};
use pageserv::pages::PAGE_SIZE;

use crate::environment::{
    Run, free_port, log_tail, read_pagemap, scratch_dir, spawn_dump, status_pipe, wait_status,
    wait_timeout,
};
use crate::{FULL_PAGES, Holder, PS_SOCKET_FD, STATUS_FD, TIMEOUT, layout, pattern_page};

// ----- (b) lazy GET -------------------------------------------------------------------------------

/// Either transport CRIU can serve GETs on.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn write_all(&mut self, b: &[u8]) {
        match self {
            Conn::Tcp(s) => s.write_all(b).unwrap(),
            Conn::Unix(s) => s.write_all(b).unwrap(),
        }
    }
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
    pub(crate) fn set_timeout(&self, t: Duration) {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).unwrap(),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).unwrap(),
        }
    }
}

/// A lazy dump of a fresh holder, status byte received, connected.
pub(crate) struct LazySession {
    pub(crate) dir: PathBuf,
    pub(crate) holder: Holder,
    pub(crate) dump: Child,
    pub(crate) conn: Conn,
    pub(crate) client: GetClient,
    pub(crate) runs: Vec<Run>,
    scratch: Vec<u8>,
}

impl LazySession {
    pub(crate) fn start(criu: &Path, tag: &str, unix: bool) -> LazySession {
        LazySession::start_with(criu, tag, unix, false)
    }

    pub(crate) fn start_with(criu: &Path, tag: &str, unix: bool, aligned_sp: bool) -> LazySession {
        let dir = scratch_dir(tag);
        let holder = Holder::spawn_with(&dir, aligned_sp);
        let (status_r, status_w) = status_pipe();
        let mut extra = vec![
            "--lazy-pages".to_string(),
            "--status-fd".into(),
            STATUS_FD.to_string(),
        ];
        let mut fds = vec![(status_w.as_raw_fd(), STATUS_FD)];
        let (conn, port, theirs) = if unix {
            let (ours, theirs) = UnixStream::pair().unwrap();
            extra.extend(["--ps-socket".into(), PS_SOCKET_FD.to_string()]);
            fds.push((theirs.as_raw_fd(), PS_SOCKET_FD));
            (Some(Conn::Unix(ours)), 0, Some(theirs))
        } else {
            let port = free_port();
            extra.extend([
                "--address".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
            ]);
            (None, port, None)
        };
        let mut dump = spawn_dump(criu, &holder, &dir, &extra, &fds);
        drop(status_w);
        drop(theirs);
        wait_status(status_r, &mut dump, &dir);
        let conn =
            conn.unwrap_or_else(|| Conn::Tcp(TcpStream::connect(("127.0.0.1", port)).unwrap()));
        conn.set_timeout(TIMEOUT);
        let runs = read_pagemap(&dir.join(format!("pagemap-{}.img", holder.vpid)));
        LazySession {
            dir,
            holder,
            dump,
            conn,
            client: GetClient::new(layout()),
            runs,
            scratch: vec![0; 1 << 18],
        }
    }

    pub(crate) fn lazy_region_runs(&self) -> Vec<Run> {
        self.runs
            .iter()
            .filter(|r| r.flags.is_lazy() && self.holder.region_page(r.vaddr).is_some())
            .copied()
            .collect()
    }

    pub(crate) fn send_get(&mut self, vaddr: u64, nr_pages: u64) {
        let mut out = BytesMut::new();
        self.client
            .request(self.holder.vpid, vaddr, nr_pages, &mut out)
            .unwrap();
        self.conn.write_all(&out);
    }

    /// Reads until the next event; `Err` carries the read error or the EOF diagnosis.
    pub(crate) fn next_event(&mut self) -> Result<ClientEvent, String> {
        loop {
            if let Some(ev) = self.client.poll().map_err(|e| e.to_string())? {
                return Ok(ev);
            }
            match self.conn.read(&mut self.scratch) {
                Ok(0) => return Err(self.client.on_eof().unwrap_err().to_string()),
                Ok(n) => self.client.feed(&self.scratch[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    pub(crate) fn next_pages(&mut self) -> pageserv::criu::page_server::GetReply {
        match self.next_event() {
            Ok(ClientEvent::Pages(r)) => r,
            other => panic!("expected pages, got {other:?}\n{}", log_tail(&self.dir)),
        }
    }

    pub(crate) fn check_pattern(&self, vaddr: u64, data: &[u8]) {
        for (p, page) in data.chunks(PAGE_SIZE as usize).enumerate() {
            let i = self
                .holder
                .region_page(vaddr + p as u64 * PAGE_SIZE)
                .expect("page in region");
            assert!(
                page == pattern_page(i),
                "GET data for region page {i} differs from the pattern"
            );
        }
    }

    /// GETs of `size` pages tiling every lazy run in the region's fully written part.
    pub(crate) fn tiling(&self, size: u64) -> Vec<(u64, u64)> {
        let full_end = self.holder.region + FULL_PAGES * PAGE_SIZE;
        let mut reqs = Vec::new();
        for r in self
            .lazy_region_runs()
            .iter()
            .filter(|r| r.vaddr < full_end)
        {
            let end = (r.vaddr + r.nr_pages * PAGE_SIZE).min(full_end);
            let mut v = r.vaddr;
            while v < end {
                let n = size.min((end - v) / PAGE_SIZE);
                reqs.push((v, n));
                v += n * PAGE_SIZE;
            }
        }
        reqs
    }

    /// Runs `reqs` with `window` GETs in flight, repeating the list until at least 0.5 s have
    /// passed (at most 50 times). Returns (MiB/s, requests/s).
    pub(crate) fn throughput(&mut self, reqs: &[(u64, u64)], window: usize) -> (f64, f64) {
        let t = Instant::now();
        let (mut bytes, mut count) = (0u64, 0u64);
        for _ in 0..50 {
            let (mut next, mut done, mut out) = (0, 0, BytesMut::new());
            while done < reqs.len() {
                while next < reqs.len() && self.client.outstanding() < window {
                    let (v, n) = reqs[next];
                    self.client
                        .request(self.holder.vpid, v, n, &mut out)
                        .unwrap();
                    next += 1;
                }
                if !out.is_empty() {
                    self.conn.write_all(&out);
                    out.clear();
                }
                let r = self.next_pages();
                let (v, n) = reqs[done];
                assert_eq!(
                    (r.vaddr, r.nr_pages),
                    (v, n),
                    "reply in request order, unclamped"
                );
                // A cheap spot check; the full pattern is verified in check_gets.
                let i = self.holder.region_page(v).unwrap();
                assert_eq!(r.data[..8], pattern_page(i)[..8]);
                bytes += r.data.len() as u64;
                done += 1;
            }
            count += reqs.len() as u64;
            if t.elapsed() >= Duration::from_millis(500) {
                break;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        (bytes as f64 / (1 << 20) as f64 / secs, count as f64 / secs)
    }

    pub(crate) fn close_and_finish(mut self, force: bool) {
        let mut out = BytesMut::new();
        self.client.close(force, &mut out).unwrap();
        self.conn.write_all(&out);
        assert_eq!(self.next_event(), Ok(ClientEvent::Closed));
        drop(self.conn);
        let st = wait_timeout(&mut self.dump, TIMEOUT).expect("lazy dump did not exit after CLOSE");
        assert!(
            st.success(),
            "lazy dump exited with {st}:\n{}",
            log_tail(&self.dir)
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}
