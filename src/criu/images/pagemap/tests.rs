use super::*;
use crate::criu::image::{encode_record, header_bytes};
use proptest::prelude::*;

const P: u64 = PAGE_SIZE;

fn raw_image(pages_id: u32, pes: &[PagemapEntry]) -> Vec<u8> {
    let mut out = header_bytes(ImageKind::Pagemap);
    encode_record(&mut out, "t", &PagemapHead { pages_id }).unwrap();
    for pe in pes {
        encode_record(&mut out, "t", pe).unwrap();
    }
    out
}

fn pe(vaddr: u64, compat: u32, flags: Option<u32>, nr: Option<u64>) -> PagemapEntry {
    PagemapEntry {
        vaddr,
        compat_nr_pages: compat,
        in_parent: None,
        flags,
        nr_pages: nr,
    }
}

fn me(vaddr: u64, nr_pages: u64, flags: PeFlags) -> MapEntry {
    MapEntry {
        vaddr,
        nr_pages,
        flags,
    }
}

fn err_of(pes: &[PagemapEntry]) -> String {
    decode_pagemap("pagemap-42.img", &raw_image(1, pes))
        .unwrap_err()
        .to_string()
}

#[test]
fn v411_style_field2_and_no_flags_means_present() {
    let pm = decode_pagemap("p", &raw_image(3, &[pe(0x1000, 4, None, None)])).unwrap();
    assert_eq!(pm.pages_id, 3);
    assert_eq!(pm.entries, vec![me(0x1000, 4, PeFlags::PRESENT)]);
}

#[test]
fn v42_style_field5_wins_over_zero_field2() {
    let pm = decode_pagemap("p", &raw_image(1, &[pe(0x1000, 0, Some(2), Some(7))])).unwrap();
    assert_eq!(pm.entries, vec![me(0x1000, 7, PeFlags::LAZY)]);
}

#[test]
fn in_parent_adds_parent_flag() {
    let mut e = pe(0x2000, 1, None, None);
    e.in_parent = Some(true);
    let pm = decode_pagemap("p", &raw_image(1, &[e])).unwrap();
    assert_eq!(pm.entries[0].flags, PeFlags::PARENT);
    assert!(!pm.entries[0].has_data_here());
}

#[test]
fn writer_fills_both_fields_and_flags() {
    let entries = [
        me(0x1000, 3, PeFlags::LAZY | PeFlags::PRESENT),
        me(0x8000, 1, PeFlags::LAZY),
    ];
    let bytes = encode_pagemap("pagemap-1.img", 9, &entries).unwrap();
    let raw = image::decode_all::<PagemapEntry>("p", ImageKind::Pagemap, "e", &bytes).unwrap();
    // First record is the head (decodes as an entry with vaddr = pages_id); skip it.
    let pes: Vec<_> = raw.into_iter().skip(1).map(|(_, e)| e).collect();
    assert_eq!(pes[0].compat_nr_pages, 3);
    assert_eq!(pes[0].nr_pages, Some(3));
    assert_eq!(pes[0].flags, Some(6));
    assert_eq!(pes[1].flags, Some(2));
    assert_eq!(decode_pagemap("p", &bytes).unwrap().entries, entries);
}

#[test]
fn writer_refuses_what_reader_refuses() {
    let e = encode_pagemap("pagemap-1.img", 1, &[me(0x1000, 1 << 32, PeFlags::PRESENT)]);
    assert!(e.unwrap_err().to_string().contains("32-bit"));
    let e = encode_pagemap(
        "pagemap-1.img",
        1,
        &[
            me(0x3000, 1, PeFlags::PRESENT),
            me(0x1000, 1, PeFlags::PRESENT),
        ],
    );
    assert!(e.unwrap_err().to_string().contains("ascending"));
    let e = encode_pagemap("pagemap-1.img", 1, &[me(0x1000, 1, PeFlags(8))]);
    assert!(e.unwrap_err().to_string().contains("unknown flag bits"));
}

#[test]
fn out_of_order_and_overlap() {
    let msg = err_of(&[pe(0x5000, 1, Some(4), None), pe(0x1000, 1, Some(4), None)]);
    assert!(
        msg.starts_with("pagemap-42.img: record at offset "),
        "{msg}"
    );
    assert!(
        msg.contains("vaddr 0x1000 starts before the previous entry [0x5000, 0x6000)"),
        "{msg}"
    );
    let msg = err_of(&[pe(0x1000, 2, Some(4), None), pe(0x2000, 1, Some(4), None)]);
    assert!(msg.contains("vaddr 0x2000 starts before"), "{msg}");
    // Touching is fine.
    decode_pagemap(
        "p",
        &raw_image(
            1,
            &[pe(0x1000, 1, Some(4), None), pe(0x2000, 1, Some(2), None)],
        ),
    )
    .unwrap();
}

#[test]
fn bad_flags() {
    let msg = err_of(&[pe(0x1000, 1, Some(0x14), None)]);
    assert!(
        msg.contains("unknown flag bits 0x10 in flags 0x14"),
        "{msg}"
    );
    assert!(err_of(&[pe(0x1000, 1, Some(0), None)]).contains("flags are 0"));
    assert!(err_of(&[pe(0x1000, 1, Some(5), None)]).contains("PRESENT and PARENT"));
}

#[test]
fn bad_sizes_and_alignment() {
    assert!(err_of(&[pe(0x1000, 0, Some(4), None)]).contains("nr_pages is 0"));
    assert!(err_of(&[pe(0x1000, 5, Some(4), Some(0))]).contains("nr_pages is 0"));
    let msg = err_of(&[pe(0x1000, 0, Some(4), Some(u64::MAX))]);
    assert!(
        msg.contains("runs past the highest possible address"),
        "{msg}"
    );
    let msg = err_of(&[pe(MAX_IMAGE_ADDR - P, 2, Some(4), None)]);
    assert!(msg.contains("runs past"), "{msg}");
    assert!(err_of(&[pe(0x1001, 1, Some(4), None)]).contains("not page-aligned"));
}

#[test]
fn head_missing_or_truncated_entry() {
    let only_header = header_bytes(ImageKind::Pagemap);
    let err = decode_pagemap("pagemap-3.img", &only_header).unwrap_err();
    assert!(matches!(
        err,
        ImageError::MissingRecord {
            what: "pagemap_head",
            ..
        }
    ));
    let full = raw_image(1, &[pe(0x1000, 1, Some(4), None)]);
    let err = decode_pagemap("pagemap-3.img", &full[..full.len() - 2]).unwrap_err();
    assert!(matches!(err, ImageError::TruncatedRecord { .. }), "{err}");
}

fn vma(start: u64, end: u64) -> Vma {
    Vma {
        start,
        end,
        prot: 3,
        flags: 0x22,
        status: 0x201,
    }
}

#[test]
fn lazy_split_at_vma_ends() {
    let entries = [
        me(0x1000, 1, PeFlags::PRESENT),
        me(0x2000, 4, PeFlags::LAZY), // spans two VMAs
        me(0x6000, 2, PeFlags::LAZY | PeFlags::PRESENT), // 6 counts as lazy
    ];
    let vmas = [vma(0x1000, 0x4000), vma(0x4000, 0x10000)];
    let got = lazy_ranges("pm", "mm", &entries, &vmas).unwrap();
    assert_eq!(
        got,
        vec![
            PageRange::new(0x2000, 2),
            PageRange::new(0x4000, 2),
            PageRange::new(0x6000, 2)
        ]
    );
    // A gap between VMAs inside a lazy entry is an error.
    let vmas = [vma(0x1000, 0x4000), vma(0x5000, 0x10000)];
    let err = lazy_ranges("pagemap-1.img", "mm-1.img", &entries, &vmas).unwrap_err();
    assert!(
        err.to_string()
            .contains("page 0x4000 outside every VMA of mm-1.img"),
        "{err}"
    );
}

#[test]
fn present_offsets_skip_lazy_and_parent() {
    let pm = Pagemap {
        pages_id: 1,
        entries: vec![
            me(0x1000, 2, PeFlags::PRESENT),
            me(0x3000, 1, PeFlags::LAZY),
            me(0x4000, 1, PeFlags::PARENT),
            me(0x8000, 3, PeFlags::LAZY | PeFlags::PRESENT),
        ],
    };
    let idx = PresentIndex::new(&pm);
    assert_eq!(idx.total_bytes(), 5 * P);
    assert_eq!(idx.offset_of(0x1fff), Some(0));
    assert_eq!(idx.offset_of(0x2fff), Some(P));
    assert_eq!(idx.offset_of(0x3000), None);
    assert_eq!(idx.offset_of(0x4000), None);
    assert_eq!(idx.offset_of(0x9000), Some(3 * P));
    assert_eq!(idx.offset_of(0xb000), None);
    let plan = plan_read("p", &pm, &idx, PageRange::new(0x1000, 2)).unwrap();
    assert_eq!(
        plan,
        vec![ReadPiece::Here {
            offset: 0,
            len: 2 * P
        }]
    );
    let plan = plan_read("p", &pm, &idx, PageRange::new(0x4000, 1)).unwrap();
    assert_eq!(plan, vec![ReadPiece::Parent(PageRange::new(0x4000, 1))]);
    let err = plan_read("p", &pm, &idx, PageRange::new(0x3000, 1)).unwrap_err();
    assert!(err.to_string().contains("LAZY only"), "{err}");
    let err = plan_read("p", &pm, &idx, PageRange::new(0x2000, 2)).unwrap_err();
    assert!(err.to_string().contains("page 0x3000"), "{err}");
    let err = plan_read("p", &pm, &idx, PageRange::new(0x5000, 1)).unwrap_err();
    assert!(err.to_string().contains("never dumped"), "{err}");
    assert!(plan_read("p", &pm, &idx, PageRange::new(0x1000, u64::MAX)).is_err());
}

/// Sorted disjoint entries with the flag values CRIU writes (plus PARENT|LAZY).
fn arb_entries() -> impl Strategy<Value = Vec<MapEntry>> {
    prop::collection::vec(
        (
            0u64..4,
            1u64..20,
            prop::sample::select(vec![1u32, 2, 3, 4, 6]),
        ),
        0..30,
    )
    .prop_map(|runs| {
        let mut at = 0x10000u64;
        runs.into_iter()
            .map(|(gap, n, f)| {
                let e = me(at + gap * P, n, PeFlags(f));
                at = e.end();
                e
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn pagemap_round_trip(entries in arb_entries(), pages_id in any::<u32>()) {
        let bytes = encode_pagemap("pagemap-1.img", pages_id, &entries).unwrap();
        let pm = decode_pagemap("pagemap-1.img", &bytes).unwrap();
        prop_assert_eq!(pm.pages_id, pages_id);
        prop_assert_eq!(pm.entries, entries);
    }

    /// Old-style records (field 2 only) and new-style (field 5, field 2 = 0) decode alike.
    #[test]
    fn both_field_variants(entries in arb_entries()) {
        let old: Vec<_> = entries.iter().map(|e| pe(e.vaddr, e.nr_pages as u32, Some(e.flags.0), None)).collect();
        let new: Vec<_> = entries.iter().map(|e| pe(e.vaddr, 0, Some(e.flags.0), Some(e.nr_pages))).collect();
        let a = decode_pagemap("p", &raw_image(1, &old)).unwrap();
        let b = decode_pagemap("p", &raw_image(1, &new)).unwrap();
        prop_assert_eq!(&a.entries, &entries);
        prop_assert_eq!(&b.entries, &entries);
    }

    /// Every page of a data-holding entry maps to a distinct offset, in entry order, packed.
    #[test]
    fn present_index_matches_layout(entries in arb_entries()) {
        let pm = Pagemap { pages_id: 1, entries };
        let idx = PresentIndex::new(&pm);
        let mut expect = 0;
        for e in &pm.entries {
            for p in 0..e.nr_pages {
                let got = idx.offset_of(e.vaddr + p * P + 17);
                if e.has_data_here() {
                    prop_assert_eq!(got, Some(expect));
                    expect += P;
                } else {
                    prop_assert_eq!(got, None);
                }
            }
        }
        prop_assert_eq!(idx.total_bytes(), expect);
    }

    /// Lazy ranges cover exactly the lazy pages, each range inside one VMA.
    #[test]
    fn lazy_ranges_cover_lazy_pages(entries in arb_entries(), cuts in prop::collection::vec(1u64..8, 1..6)) {
        // VMAs tile [0x10000, end) with boundaries every few pages.
        let end = entries.last().map_or(0x20000, |e| e.end());
        let mut vmas = Vec::new();
        let mut at = 0x10000;
        let mut c = cuts.iter().cycle();
        while at < end {
            let next = (at + c.next().copied().unwrap_or(1) * P).min(end);
            vmas.push(vma(at, next));
            at = next;
        }
        let got = lazy_ranges("p", "m", &entries, &vmas).unwrap();
        let mut pages_got = Vec::new();
        for r in &got {
            prop_assert!(vmas.iter().any(|v| v.start <= r.start && r.end() <= v.end));
            pages_got.extend((0..r.nr_pages).map(|i| r.start + i * P));
        }
        let pages_want: Vec<u64> = entries.iter().filter(|e| e.flags.is_lazy())
            .flat_map(|e| (0..e.nr_pages).map(move |i| e.vaddr + i * P)).collect();
        prop_assert_eq!(pages_got, pages_want);
    }

    /// Hostile entries never panic the decoder.
    #[test]
    fn hostile_entries_never_panic(vaddr in any::<u64>(), compat in any::<u32>(), flags in any::<Option<u32>>(), nr in any::<Option<u64>>(), inp in any::<Option<bool>>()) {
        let mut e = pe(vaddr, compat, flags, nr);
        e.in_parent = inp;
        if let Ok(pm) = decode_pagemap("p", &raw_image(1, &[e])) {
            let e = pm.entries[0];
            prop_assert!(e.end() <= MAX_IMAGE_ADDR && e.nr_pages > 0 && e.flags.unknown_bits() == 0);
        }
    }
}
