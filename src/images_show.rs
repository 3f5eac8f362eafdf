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

mod table;
use table::Table;

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
mod tests;
