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
