use super::*;
use crate::criu::PeFlags;
use crate::criu::image::{encode_record, header_bytes};
use crate::pages::PAGE_SIZE;
use crate::pb::criu::{MmEntry, PstreeEntry, VmaEntry};

const P: u64 = PAGE_SIZE;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "pageserv-images-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn me(vaddr: u64, nr_pages: u64, flags: PeFlags) -> MapEntry {
    MapEntry {
        vaddr,
        nr_pages,
        flags,
    }
}

/// Page `vaddr` filled with a byte derived from its address and a generation tag.
fn page(vaddr: u64, tag: u8) -> Vec<u8> {
    vec![((vaddr / P) as u8) ^ tag; P as usize]
}

fn write_pages(dir: &Path, pages_id: u32, entries: &[MapEntry], tag: u8) {
    let mut data = Vec::new();
    for e in entries.iter().filter(|e| e.has_data_here()) {
        for i in 0..e.nr_pages {
            data.extend(page(e.vaddr + i * P, tag));
        }
    }
    std::fs::write(dir.join(format!("pages-{pages_id}.img")), data).unwrap();
}

#[test]
fn read_pages_across_entries_and_parent() {
    let parent = TempDir::new("parent");
    let child = TempDir::new("child");
    let old = [me(0x10000, 4, PeFlags::PRESENT)];
    write_pagemap(&parent.0, PagemapId::Pid(7), 1, &old).unwrap();
    write_pages(&parent.0, 1, &old, 0xAA);
    let new = [
        me(0x10000, 1, PeFlags::PRESENT),
        me(0x11000, 2, PeFlags::PARENT),
        me(0x13000, 1, PeFlags::LAZY | PeFlags::PRESENT),
        me(0x20000, 1, PeFlags::LAZY),
    ];
    write_pagemap(&child.0, PagemapId::Pid(7), 5, &new).unwrap();
    write_pages(&child.0, 5, &new, 0x55);
    std::os::unix::fs::symlink(&parent.0, child.0.join("parent")).unwrap();

    let dir = ImageDir::open(&child.0).unwrap();
    let got = dir.read_pages(7, 0x10000, 4).unwrap();
    let mut want = page(0x10000, 0x55);
    want.extend(page(0x11000, 0xAA));
    want.extend(page(0x12000, 0xAA));
    want.extend(page(0x13000, 0x55));
    assert_eq!(got, want);

    let idx = dir.present_index(7).unwrap();
    assert_eq!(idx.pages_id, 5);
    assert_eq!(idx.offset_of(0x13000), Some(P));

    let err = dir.read_pages(7, 0x20000, 1).unwrap_err();
    assert!(err.to_string().contains("LAZY only"), "{err}");

    // Without the parent link, the PARENT pages cannot be found.
    std::fs::remove_file(child.0.join("parent")).unwrap();
    let err = dir.read_pages(7, 0x11000, 1).unwrap_err();
    assert!(err.to_string().contains("has no parent link"), "{err}");
}

#[test]
fn parent_loop_is_refused() {
    let d = TempDir::new("loop");
    write_pagemap(
        &d.0,
        PagemapId::Pid(1),
        1,
        &[me(0x1000, 1, PeFlags::PARENT)],
    )
    .unwrap();
    std::os::unix::fs::symlink(".", d.0.join("parent")).unwrap();
    let err = ImageDir::open(&d.0)
        .unwrap()
        .read_pages(1, 0x1000, 1)
        .unwrap_err();
    assert!(err.to_string().contains("parent loop"), "{err}");
}

#[test]
fn truncated_pages_file() {
    let d = TempDir::new("trunc");
    let entries = [me(0x1000, 3, PeFlags::PRESENT)];
    write_pagemap(&d.0, PagemapId::Pid(3), 2, &entries).unwrap();
    std::fs::write(d.0.join("pages-2.img"), vec![0u8; 2 * P as usize]).unwrap();
    let dir = ImageDir::open(&d.0).unwrap();
    let err = dir.present_index(3).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pages-2.img: is 8192 bytes") && msg.contains("need 12288"),
        "{msg}"
    );
    // Even the pages that would fit are refused: the set is damaged.
    let err = dir.read_pages(3, 0x1000, 1).unwrap_err();
    assert!(
        err.to_string().contains("pages-2.img: is 8192 bytes"),
        "{err}"
    );
}

#[test]
fn missing_and_foreign_files_name_the_file() {
    let d = TempDir::new("foreign");
    let dir = ImageDir::open(&d.0).unwrap();
    let err = dir.pstree().unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }));
    assert!(err.to_string().contains("pstree.img"), "{err}");

    std::fs::write(d.0.join("pagemap-4.img"), b"#!/bin/sh\necho hi\n").unwrap();
    let err = dir.pagemap(4).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("pagemap-4.img: magic at offset 0"), "{msg}");
    assert!(msg.contains("not a CRIU pagemap image"), "{msg}");

    std::fs::write(d.0.join("inventory.img"), [0x16, 0x31]).unwrap();
    let err = dir.inventory().unwrap_err();
    assert!(
        err.to_string().contains("inventory.img: file is 2 bytes"),
        "{err}"
    );

    let err = ImageDir::open(d.0.join("inventory.img")).unwrap_err();
    assert!(matches!(err, ImageError::NotADir { .. }), "{err}");
}

#[test]
fn lazy_ranges_and_vmas_from_files() {
    let d = TempDir::new("lazy");
    let entries = [
        me(0x10000, 2, PeFlags::PRESENT),
        me(0x12000, 6, PeFlags::LAZY),
    ];
    write_pagemap(&d.0, PagemapId::Pid(9), 1, &entries).unwrap();
    let mm = MmEntry {
        vmas: vec![
            VmaEntry {
                start: 0x10000,
                end: 0x14000,
                prot: 3,
                flags: 0x22,
                status: 0x201,
                fd: -1,
                ..Default::default()
            },
            VmaEntry {
                start: 0x14000,
                end: 0x20000,
                prot: 1,
                flags: 0x22,
                status: 0x201,
                fd: -1,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut bytes = header_bytes(ImageKind::Mm);
    encode_record(&mut bytes, "mm", &mm).unwrap();
    std::fs::write(d.0.join("mm-9.img"), bytes).unwrap();
    let dir = ImageDir::open(&d.0).unwrap();
    assert_eq!(dir.vmas(9).unwrap().len(), 2);
    assert_eq!(
        dir.lazy_ranges(9).unwrap(),
        vec![PageRange::new(0x12000, 2), PageRange::new(0x14000, 4)]
    );

    let mut bytes = header_bytes(ImageKind::Pstree);
    for pid in [9, 10] {
        let e = PstreeEntry {
            pid,
            ppid: if pid == 9 { 0 } else { 9 },
            pgid: 9,
            sid: 9,
            threads: vec![pid],
        };
        encode_record(&mut bytes, "p", &e).unwrap();
    }
    std::fs::write(d.0.join("pstree.img"), bytes).unwrap();
    let tree = dir.pstree().unwrap();
    assert_eq!(tree.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![9, 10]);
    assert_eq!(tree[1].ppid, 9);
}

#[test]
fn shmem_pagemaps_are_listed() {
    let d = TempDir::new("shmem");
    write_pagemap(&d.0, PagemapId::Shmem(77), 3, &[me(0, 1, PeFlags::PRESENT)]).unwrap();
    write_pagemap(&d.0, PagemapId::Shmem(5), 4, &[me(0, 1, PeFlags::PRESENT)]).unwrap();
    write_pagemap(&d.0, PagemapId::Pid(5), 1, &[]).unwrap();
    let dir = ImageDir::open(&d.0).unwrap();
    assert_eq!(dir.shmem_ids().unwrap(), vec![5, 77]);
    assert_eq!(dir.pagemap_of(PagemapId::Shmem(77)).unwrap().pages_id, 3);
}

#[test]
fn oversized_read_is_refused() {
    let d = TempDir::new("big");
    write_pagemap(&d.0, PagemapId::Pid(1), 1, &[]).unwrap();
    let dir = ImageDir::open(&d.0).unwrap();
    let err = dir.read_pages(1, 0, MAX_READ_PAGES + 1).unwrap_err();
    assert!(err.to_string().contains("limit per call"), "{err}");
}
