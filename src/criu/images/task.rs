//! Typed views of the per-task records: pstree.img, mm-<pid>.img (VMAs) and core-<pid>.img
//! (task state). Sans-IO: each decoder takes a file's bytes and its display name.

use serde::Serialize;

use crate::criu::image::{self, ImageError, ImageKind, Result};
use crate::pages::PAGE_SIZE;
use crate::pb::criu::{CoreEntry, MmEntry, PstreeEntry};

/// One process of the dumped tree (`pstree_entry`). Pids are the virtual pids of the dump, the
/// numbers in the image file names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    /// 0 for the root of the tree.
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    /// Thread ids, the main thread (== pid) included.
    pub threads: Vec<u32>,
}

/// `task_core_entry.task_state` (compel's `COMPEL_TASK_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Alive,
    /// A zombie: restored as one, sends `-pid` and no uffd in a lazy restore.
    Dead,
    Stopped,
    /// A value CRIU 4.1.1 does not write; kept so a summary can still show the task.
    Other(u32),
}

impl TaskState {
    /// Maps `task_core_entry.task_state`.
    pub fn from_raw(v: u32) -> Self {
        match v {
            1 => TaskState::Alive,
            2 => TaskState::Dead,
            3 => TaskState::Stopped,
            v => TaskState::Other(v),
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskState::Alive => f.write_str("alive"),
            TaskState::Dead => f.write_str("dead"),
            TaskState::Stopped => f.write_str("stopped"),
            TaskState::Other(v) => write!(f, "state-{v}"),
        }
    }
}

/// `vma_entry.status` bits CRIU sets (`criu/include/image.h`).
pub mod vma_status {
    pub const AREA_REGULAR: u32 = 1 << 0;
    pub const AREA_STACK: u32 = 1 << 1;
    pub const AREA_VSYSCALL: u32 = 1 << 2;
    pub const AREA_VDSO: u32 = 1 << 3;
    pub const AREA_HEAP: u32 = 1 << 5;
    pub const FILE_PRIVATE: u32 = 1 << 6;
    pub const FILE_SHARED: u32 = 1 << 7;
    pub const ANON_SHARED: u32 = 1 << 8;
    pub const ANON_PRIVATE: u32 = 1 << 9;
    pub const AREA_SYSVIPC: u32 = 1 << 10;
    pub const AREA_SOCKET: u32 = 1 << 11;
    pub const AREA_VVAR: u32 = 1 << 12;
    pub const AREA_AIORING: u32 = 1 << 13;
    pub const AREA_MEMFD: u32 = 1 << 14;
    /// A mapping a CRIU plugin restores (`VMA_EXT_PLUGIN`).
    pub const EXT_PLUGIN: u32 = 1 << 27;
}

/// One mapping of a task (`vma_entry`), `[start, end)` in dump-time addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_*` flags.
    pub flags: u32,
    /// `VMA_*` status bits, see [`vma_status`].
    pub status: u32,
}

impl Vma {
    /// Pages the mapping spans.
    pub fn nr_pages(&self) -> u64 {
        (self.end - self.start) / PAGE_SIZE
    }

    /// Private anonymous memory: pages CRIU did not dump come back as zero-filled pages.
    pub fn is_anon_private(&self) -> bool {
        self.status & vma_status::AREA_REGULAR != 0 && self.status & vma_status::ANON_PRIVATE != 0
    }

    /// CRIU's `vma_entry_can_be_lazy()`: which VMAs a lazy restore registers with userfaultfd.
    pub fn can_be_lazy(&self) -> bool {
        let f = self.flags as i32;
        f & libc::MAP_ANONYMOUS != 0
            && f & libc::MAP_PRIVATE != 0
            && f & libc::MAP_LOCKED == 0
            && f & libc::MAP_HUGETLB == 0
            && self.status
                & (vma_status::AREA_VDSO | vma_status::AREA_VVAR | vma_status::AREA_VSYSCALL)
                == 0
    }
}

/// Decodes pstree.img. An empty tree is an error: CRIU never writes one.
pub fn decode_pstree(file: &str, bytes: &[u8]) -> Result<Vec<Task>> {
    let recs = image::decode_all::<PstreeEntry>(file, ImageKind::Pstree, "pstree_entry", bytes)?;
    if recs.is_empty() {
        return Err(ImageError::MissingRecord {
            file: file.to_string(),
            what: "pstree_entry",
        });
    }
    let mut tasks = Vec::with_capacity(recs.len());
    // A set, not a scan of `tasks`: a hostile pstree.img may hold millions of records.
    let mut seen = std::collections::HashSet::with_capacity(recs.len());
    for (offset, e) in recs {
        if e.pid == 0 || !seen.insert(e.pid) {
            return Err(ImageError::BadRecord {
                file: file.to_string(),
                offset,
                problem: format!("pid {} is zero or appears twice in the tree", e.pid),
            });
        }
        tasks.push(Task {
            pid: e.pid,
            ppid: e.ppid,
            pgid: e.pgid,
            sid: e.sid,
            threads: e.threads,
        });
    }
    Ok(tasks)
}

/// Decodes the VMA list of mm-<pid>.img and checks what lazy splitting and zero accounting rely
/// on: page-aligned, non-empty, sorted, non-overlapping.
pub fn decode_vmas(file: &str, bytes: &[u8]) -> Result<Vec<Vma>> {
    let mm: MmEntry = image::decode_first(file, ImageKind::Mm, "mm_entry", bytes)?;
    let mut out: Vec<Vma> = Vec::with_capacity(mm.vmas.len());
    for (i, v) in mm.vmas.iter().enumerate() {
        let bad = |problem: String| ImageError::BadFile {
            file: file.to_string(),
            problem: format!("VMA #{i} [{:#x}, {:#x}): {problem}", v.start, v.end),
        };
        if !v.start.is_multiple_of(PAGE_SIZE)
            || !v.end.is_multiple_of(PAGE_SIZE)
            || v.end <= v.start
        {
            return Err(bad("not a non-empty page-aligned range".into()));
        }
        if let Some(prev) = out.last()
            && v.start < prev.end
        {
            return Err(bad(format!(
                "starts before the previous VMA ends ({:#x}); VMAs must be sorted and disjoint",
                prev.end
            )));
        }
        out.push(Vma {
            start: v.start,
            end: v.end,
            prot: v.prot,
            flags: v.flags,
            status: v.status,
        });
    }
    Ok(out)
}

/// Reads `core_entry.tc.task_state` from core-<pid>.img.
pub fn decode_task_state(file: &str, bytes: &[u8]) -> Result<TaskState> {
    let core: CoreEntry = image::decode_first(file, ImageKind::Core, "core_entry", bytes)?;
    let tc = core.tc.ok_or_else(|| ImageError::BadFile {
        file: file.to_string(),
        problem: "core_entry has no task core (tc): is this a thread's core file?".into(),
    })?;
    Ok(TaskState::from_raw(tc.task_state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::image::{encode_record, header_bytes};
    use crate::pb::criu::{TaskCoreEntry, VmaEntry};

    fn mm_image(vmas: &[(u64, u64)]) -> Vec<u8> {
        let mm = MmEntry {
            vmas: vmas
                .iter()
                .map(|&(start, end)| VmaEntry {
                    start,
                    end,
                    fd: -1,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let mut out = header_bytes(ImageKind::Mm);
        encode_record(&mut out, "mm", &mm).unwrap();
        out
    }

    #[test]
    fn vmas_sorted_and_aligned() {
        let v = decode_vmas("mm-1.img", &mm_image(&[(0x1000, 0x3000), (0x3000, 0x4000)])).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].nr_pages(), 2);
        let err =
            decode_vmas("mm-1.img", &mm_image(&[(0x1000, 0x3000), (0x2000, 0x4000)])).unwrap_err();
        assert!(err.to_string().contains("VMA #1 [0x2000, 0x4000)"), "{err}");
        let err = decode_vmas("mm-1.img", &mm_image(&[(0x1001, 0x3000)])).unwrap_err();
        assert!(err.to_string().contains("page-aligned"), "{err}");
    }

    #[test]
    fn pstree_rejects_duplicates_and_empty() {
        let mut out = header_bytes(ImageKind::Pstree);
        let e = PstreeEntry {
            pid: 5,
            ppid: 0,
            pgid: 5,
            sid: 5,
            threads: vec![5],
        };
        encode_record(&mut out, "p", &e).unwrap();
        assert_eq!(
            decode_pstree("pstree.img", &out).unwrap()[0].threads,
            vec![5]
        );
        encode_record(&mut out, "p", &e).unwrap();
        let err = decode_pstree("pstree.img", &out).unwrap_err();
        assert!(err.to_string().contains("pid 5"), "{err}");
        let err = decode_pstree("pstree.img", &header_bytes(ImageKind::Pstree)).unwrap_err();
        assert!(matches!(err, ImageError::MissingRecord { .. }));
    }

    #[test]
    fn task_state_from_core() {
        let core = CoreEntry {
            tc: Some(TaskCoreEntry {
                task_state: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = header_bytes(ImageKind::Core);
        encode_record(&mut out, "core", &core).unwrap();
        assert_eq!(
            decode_task_state("core-9.img", &out).unwrap(),
            TaskState::Dead
        );
        let mut out = header_bytes(ImageKind::Core);
        encode_record(&mut out, "core", &CoreEntry::default()).unwrap();
        assert!(decode_task_state("core-9.img", &out).is_err());
    }

    #[test]
    fn lazy_capability() {
        let anon = Vma {
            start: 0,
            end: 4096,
            prot: 3,
            flags: (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u32,
            status: vma_status::AREA_REGULAR | vma_status::ANON_PRIVATE,
        };
        assert!(anon.can_be_lazy() && anon.is_anon_private());
        let vdso = Vma {
            status: anon.status | vma_status::AREA_VDSO,
            ..anon
        };
        assert!(!vdso.can_be_lazy());
        let shared = Vma {
            flags: (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u32,
            status: vma_status::AREA_REGULAR | vma_status::ANON_SHARED,
            ..anon
        };
        assert!(!shared.can_be_lazy() && !shared.is_anon_private());
    }
}
