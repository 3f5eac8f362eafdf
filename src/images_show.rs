//! `pageserv images show DIR`: what a CRIU image directory holds, memory first. For each task:
//! how many pages are in the images (present), left at the source for post-copy (lazy), held by a
//! parent image set (parent), or never dumped because they were never touched (zero).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::criu::PeFlags;
use crate::criu::image::Result;
use crate::criu::images::{ImageDir, MapEntry, Pagemap, PagemapId, TaskState, Vma};
use crate::pages::PAGE_SIZE;

/// Pages of one kind: how many, in how many contiguous runs, and their size in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PageCount {
    pub pages: u64,
    pub regions: u64,
    pub bytes: u64,
}

impl PageCount {
    fn add_run(&mut self, nr_pages: u64) {
        self.pages += nr_pages;
        self.regions += 1;
        self.bytes += nr_pages * PAGE_SIZE;
    }
    fn merge(&mut self, o: &PageCount) {
        self.pages += o.pages;
        self.regions += o.regions;
        self.bytes += o.bytes;
    }
}

/// Memory of one task (or shared-memory segment) by where its data lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryCounts {
    /// Data in this set's pages file (PE_PRESENT, lazy-capable or not).
    pub present: PageCount,
    /// Data left at the dumping criu for post-copy (PE_LAZY without PE_PRESENT).
    pub lazy: PageCount,
    /// Data in the parent image set (PE_PARENT).
    pub parent: PageCount,
    /// Private anonymous pages in no pagemap entry: never touched, restored as zero pages.
    pub zero: PageCount,
    /// Of `present`, pages also marked PE_LAZY (a lazy restore from these images may defer them).
    pub present_lazy_capable: u64,
    /// Pagemap entries (CRIU's runs; contiguous entries of one kind count as one region above).
    pub entries: u64,
}

impl MemoryCounts {
    fn merge(&mut self, o: &MemoryCounts) {
        self.present.merge(&o.present);
        self.lazy.merge(&o.lazy);
        self.parent.merge(&o.parent);
        self.zero.merge(&o.zero);
        self.present_lazy_capable += o.present_lazy_capable;
        self.entries += o.entries;
    }
}

/// One process of the dumped tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskSummary {
    pub pid: u32,
    pub ppid: u32,
    pub threads: usize,
    /// "alive", "dead" (zombie), "stopped", or "state-N".
    pub state: String,
    pub vmas: usize,
    /// Pages covered by all VMAs, file-backed and shared included.
    pub mapped_pages: u64,
    /// Id of its `pages-<id>.img`; `None` for zombies, which have no memory images.
    pub pages_id: Option<u32>,
    pub memory: MemoryCounts,
}

/// One shared-memory segment with its own pagemap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShmemSummary {
    pub shmid: u64,
    pub pages_id: u32,
    pub memory: MemoryCounts,
}

/// A `pages-<id>.img` file and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PagesFile {
    pub name: String,
    pub bytes: u64,
    pub pages: u64,
}

/// Sums over all tasks and segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub tasks: usize,
    pub threads: usize,
    pub memory: MemoryCounts,
    pub pages_file_bytes: u64,
}

/// What `images show` reports. Serialises as the `--json` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub dir: String,
    pub img_version: u32,
    pub tasks: Vec<TaskSummary>,
    pub shmem: Vec<ShmemSummary>,
    pub pages_files: Vec<PagesFile>,
    pub totals: Totals,
    /// Inconsistencies worth a look that do not stop the summary (e.g. a pages file whose size
    /// does not match its pagemap).
    pub warnings: Vec<String>,
}

/// Which kind a pagemap entry's data is, for counting.
fn kind_of(f: PeFlags) -> usize {
    if f.is_parent() {
        2
    } else if f.is_present() {
        0
    } else {
        1
    }
}

/// Counts a pagemap's entries by kind (merging contiguous entries of one kind into one region)
/// and the never-dumped pages of the private anonymous VMAs.
pub fn count_memory(pm: &Pagemap, vmas: &[Vma]) -> MemoryCounts {
    let mut c = MemoryCounts {
        entries: pm.entries.len() as u64,
        ..Default::default()
    };
    let mut prev: Option<(usize, u64)> = None;
    for e in &pm.entries {
        let k = kind_of(e.flags);
        let slot = match k {
            0 => &mut c.present,
            1 => &mut c.lazy,
            _ => &mut c.parent,
        };
        if prev == Some((k, e.vaddr)) {
            slot.pages += e.nr_pages;
            slot.bytes += e.nr_pages * PAGE_SIZE;
        } else {
            slot.add_run(e.nr_pages);
        }
        if k == 0 && e.flags.is_lazy() {
            c.present_lazy_capable += e.nr_pages;
        }
        prev = Some((k, e.end()));
    }
    c.zero = zero_pages(&pm.entries, vmas);
    c
}

/// Pages of private anonymous VMAs that no entry covers, as merged runs.
fn zero_pages(entries: &[MapEntry], vmas: &[Vma]) -> PageCount {
    let mut out = PageCount::default();
    let mut last_gap_end = None;
    let mut add_gap = |start: u64, end: u64| {
        if end <= start {
            return;
        }
        let n = (end - start) / PAGE_SIZE;
        if last_gap_end == Some(start) {
            out.pages += n;
            out.bytes += n * PAGE_SIZE;
        } else {
            out.add_run(n);
        }
        last_gap_end = Some(end);
    };
    for vma in vmas.iter().filter(|v| v.is_anon_private()) {
        let mut at = vma.start;
        let first = entries.partition_point(|e| e.end() <= vma.start);
        for e in entries[first..].iter().take_while(|e| e.vaddr < vma.end) {
            add_gap(at, e.vaddr.min(vma.end));
            at = at.max(e.end());
        }
        add_gap(at, vma.end);
    }
    out
}

/// Reads the directory and counts every task's memory.
pub fn summarize(dir: &ImageDir) -> Result<Summary> {
    let inventory = dir.inventory()?;
    let tree = dir.pstree()?;
    let mut warnings = Vec::new();
    let mut pages_ids: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tasks = Vec::with_capacity(tree.len());
    for t in &tree {
        let state = dir.task_state(t.pid)?;
        let (vmas, pm) = if state == TaskState::Dead {
            (Vec::new(), None)
        } else {
            (dir.vmas(t.pid)?, Some(dir.pagemap(t.pid)?))
        };
        let memory = pm
            .as_ref()
            .map(|pm| count_memory(pm, &vmas))
            .unwrap_or_default();
        if let Some(pm) = &pm {
            pages_ids.insert(pm.pages_id, memory.present.bytes);
        }
        tasks.push(TaskSummary {
            pid: t.pid,
            ppid: t.ppid,
            threads: t.threads.len(),
            state: state.to_string(),
            vmas: vmas.len(),
            mapped_pages: vmas.iter().map(Vma::nr_pages).sum(),
            pages_id: pm.map(|pm| pm.pages_id),
            memory,
        });
    }
    let mut shmem = Vec::new();
    for shmid in dir.shmem_ids()? {
        let pm = dir.pagemap_of(PagemapId::Shmem(shmid))?;
        let memory = count_memory(&pm, &[]);
        pages_ids.insert(pm.pages_id, memory.present.bytes);
        shmem.push(ShmemSummary {
            shmid,
            pages_id: pm.pages_id,
            memory,
        });
    }
    let mut pages_files = Vec::new();
    for (&id, &need) in &pages_ids {
        let name = format!("pages-{id}.img");
        let bytes = match dir.pages_file_len(id) {
            Ok(b) => b,
            Err(_) if need == 0 => continue,
            Err(e) => {
                warnings.push(format!(
                    "{e} (its pagemap has {need} bytes of PRESENT pages)"
                ));
                continue;
            }
        };
        if bytes != need {
            warnings.push(format!(
                "{name} is {bytes} bytes but its pagemap's PRESENT entries total {need}"
            ));
        }
        pages_files.push(PagesFile {
            name,
            bytes,
            pages: bytes / PAGE_SIZE,
        });
    }
    let mut totals = Totals {
        tasks: tasks.len(),
        threads: tasks.iter().map(|t| t.threads).sum(),
        pages_file_bytes: pages_files.iter().map(|f| f.bytes).sum(),
        ..Default::default()
    };
    for m in tasks
        .iter()
        .map(|t| &t.memory)
        .chain(shmem.iter().map(|s| &s.memory))
    {
        totals.memory.merge(m);
    }
    Ok(Summary {
        dir: dir.path().display().to_string(),
        img_version: inventory.img_version,
        tasks,
        shmem,
        pages_files,
        totals,
        warnings,
    })
}

/// Bytes for people: "0 B", "4.0 KiB", "21.4 MiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A plain text table: first `left` columns left-aligned, the rest right-aligned.
struct Table {
    left: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn render(&self, out: &mut String, groups: &[(usize, usize, &str)]) {
        let ncols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut width: Vec<usize> = (0..ncols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let sep = 2;
        // Widen a group's last column if its title does not fit over the group.
        for &(first, last, title) in groups {
            let span: usize = width[first..=last].iter().sum::<usize>() + sep * (last - first);
            let need = title.chars().count() + 4;
            if need > span {
                width[last] += need - span;
            }
        }
        let start: Vec<usize> = width
            .iter()
            .scan(0, |at, w| {
                let s = *at;
                *at += w + sep;
                Some(s)
            })
            .collect();
        // Group titles centred over their columns, e.g. "──── present ────".
        if !groups.is_empty() {
            let mut line = String::new();
            for &(first, last, title) in groups {
                let (from, to) = (start[first], start[last] + width[last]);
                let span = to - from;
                let label = format!(" {title} ");
                let fill = span.saturating_sub(label.chars().count());
                let pad = " ".repeat(from.saturating_sub(line.chars().count()));
                line.push_str(&pad);
                line.push_str(&"─".repeat(fill / 2));
                line.push_str(&label);
                line.push_str(&"─".repeat(fill - fill / 2));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str(&" ".repeat(sep));
                }
                let pad = width[c] - cell.chars().count();
                if c < self.left {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// Picks one kind's counts out of a task's memory, for a table column group.
type KindGetter = fn(&MemoryCounts) -> &PageCount;

fn count_cells(c: &PageCount) -> [String; 3] {
    [
        c.pages.to_string(),
        c.regions.to_string(),
        human_bytes(c.bytes),
    ]
}

/// The table `images show` prints: one row per task (and shared-memory segment), a totals row,
/// the pages files, and any warnings. The parent columns appear only when some page is PARENT.
pub fn render_text(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "CRIU images in {} (img_version {}): {} task{}, {} thread{}",
        s.dir,
        s.img_version,
        s.totals.tasks,
        if s.totals.tasks == 1 { "" } else { "s" },
        s.totals.threads,
        if s.totals.threads == 1 { "" } else { "s" },
    );
    out.push('\n');
    let with_parent = s.totals.memory.parent.pages > 0;
    let mut kinds: Vec<(&str, KindGetter)> =
        vec![("present", |m| &m.present), ("lazy", |m| &m.lazy)];
    if with_parent {
        kinds.push(("parent", |m| &m.parent));
    }
    kinds.push(("zero", |m| &m.zero));

    let lead = ["PID", "PPID", "THR", "STATE", "VMAS", "MAPPED"];
    let mut header: Vec<String> = lead.iter().map(|h| h.to_string()).collect();
    for _ in &kinds {
        header.extend(["pages", "runs", "size"].map(String::from));
    }
    let mut rows = vec![header];
    let mem_cells = |m: &MemoryCounts| -> Vec<String> {
        kinds
            .iter()
            .flat_map(|(_, get)| count_cells(get(m)))
            .collect()
    };
    for t in &s.tasks {
        let mut r = vec![
            t.pid.to_string(),
            t.ppid.to_string(),
            t.threads.to_string(),
            t.state.clone(),
            t.vmas.to_string(),
            human_bytes(t.mapped_pages * PAGE_SIZE),
        ];
        r.extend(mem_cells(&t.memory));
        rows.push(r);
    }
    for sh in &s.shmem {
        let mut r = vec![
            format!("shm {}", sh.shmid),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ];
        r.extend(mem_cells(&sh.memory));
        rows.push(r);
    }
    let mut total = vec![
        "total".to_string(),
        String::new(),
        s.totals.threads.to_string(),
        String::new(),
        String::new(),
        String::new(),
    ];
    total.extend(mem_cells(&s.totals.memory));
    rows.push(total);
    let groups: Vec<(usize, usize, &str)> = kinds
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (lead.len() + 3 * i, lead.len() + 3 * i + 2, *name))
        .collect();
    Table { left: 1, rows }.render(&mut out, &groups);

    if !s.pages_files.is_empty() {
        out.push('\n');
        let rows = s
            .pages_files
            .iter()
            .map(|f| {
                vec![
                    f.name.clone(),
                    format!("{} pages", f.pages),
                    human_bytes(f.bytes),
                ]
            })
            .collect();
        Table { left: 1, rows }.render(&mut out, &[]);
    }
    out.push_str("\npresent: data in pages-*.img   lazy: left at the source for post-copy\n");
    if with_parent {
        out.push_str("parent: data in the parent image set (parent/)\n");
    }
    out.push_str("zero: private anonymous pages never touched, not dumped (restored as zeros)\n");
    let lazy_capable = s.totals.memory.present_lazy_capable;
    if lazy_capable > 0 {
        let _ = writeln!(
            out,
            "\n{lazy_capable} of the present pages are lazy-capable (a lazy restore may defer them)."
        );
    }
    for w in &s.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

/// `pageserv images show DIR [--json]`: prints the summary to stdout.
pub fn run(dir: &Path, json: bool) -> anyhow::Result<()> {
    let images = ImageDir::open(dir)?;
    let summary = summarize(&images)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render_text(&summary));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(vaddr: u64, nr_pages: u64, f: u32) -> MapEntry {
        MapEntry {
            vaddr,
            nr_pages,
            flags: PeFlags(f),
        }
    }

    fn anon(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            flags: 0x22,
            status: 0x201,
        }
    }

    #[test]
    fn counts_by_kind_with_merged_runs() {
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![
                me(0x10000, 2, 6),
                me(0x12000, 1, 4), // contiguous with the previous present run
                me(0x14000, 3, 2),
                me(0x17000, 1, 1),
            ],
        };
        // Two anon VMAs and a file mapping whose uncovered pages are not "zero".
        let file = Vma {
            status: 0x41,
            ..anon(0x40000, 0x50000)
        };
        let vmas = [anon(0x10000, 0x20000), anon(0x20000, 0x22000), file];
        let c = count_memory(&pm, &vmas);
        assert_eq!(
            c.present,
            PageCount {
                pages: 3,
                regions: 1,
                bytes: 3 * PAGE_SIZE
            }
        );
        assert_eq!(c.present_lazy_capable, 2);
        assert_eq!((c.lazy.pages, c.lazy.regions), (3, 1));
        assert_eq!((c.parent.pages, c.parent.regions), (1, 1));
        // Gap 0x13000 (1 page), then 0x18000..0x22000 (10 pages across the VMA boundary).
        assert_eq!((c.zero.pages, c.zero.regions), (11, 2));
        assert_eq!(c.entries, 4);
    }

    #[test]
    fn every_vma_page_is_counted_once() {
        let vmas = [anon(0x10000, 0x30000)];
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![me(0x11000, 4, 4), me(0x20000, 2, 2), me(0x2f000, 1, 6)],
        };
        let c = count_memory(&pm, &vmas);
        assert_eq!(
            c.present.pages + c.lazy.pages + c.parent.pages + c.zero.pages,
            vmas[0].nr_pages()
        );
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn text_is_aligned() {
        let mem = MemoryCounts {
            present: PageCount {
                pages: 5473,
                regions: 31,
                bytes: 5473 * PAGE_SIZE,
            },
            ..Default::default()
        };
        let s = Summary {
            dir: "/tmp/d".into(),
            img_version: 2,
            tasks: vec![TaskSummary {
                pid: 1,
                ppid: 0,
                threads: 2,
                state: "alive".into(),
                vmas: 23,
                mapped_pages: 16384,
                pages_id: Some(1),
                memory: mem,
            }],
            shmem: vec![],
            pages_files: vec![PagesFile {
                name: "pages-1.img".into(),
                bytes: 5473 * PAGE_SIZE,
                pages: 5473,
            }],
            totals: Totals {
                tasks: 1,
                threads: 2,
                memory: mem,
                pages_file_bytes: 5473 * PAGE_SIZE,
            },
            warnings: vec![],
        };
        let text = render_text(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("1 task, 2 threads"), "{text}");
        assert!(!text.contains("parent"), "{text}");
        // The header row and the task row end their "present size" column at the same place.
        let header = lines.iter().find(|l| l.starts_with("PID")).unwrap();
        let row = lines.iter().find(|l| l.starts_with("1 ")).unwrap();
        let h = header.find("size").unwrap() + 4;
        let r = row.find("21.4 MiB").unwrap() + 8;
        assert_eq!(h, r, "\n{text}");
        assert!(text.contains("pages-1.img  5473 pages  21.4 MiB"), "{text}");
    }
}
