use super::*;
use crate::pb::criu::{PagemapHead, PstreeEntry};
use proptest::prelude::*;

fn image(kind: ImageKind, msgs: &[PstreeEntry]) -> Vec<u8> {
    let mut out = header_bytes(kind);
    for m in msgs {
        encode_record(&mut out, "pstree", m).unwrap();
    }
    out
}

fn entry(pid: u32, threads: Vec<u32>) -> PstreeEntry {
    PstreeEntry {
        pid,
        ppid: pid / 2,
        pgid: pid,
        sid: 1,
        threads,
    }
}

#[test]
fn header_forms() {
    let common = header_bytes(ImageKind::Pstree);
    assert_eq!(
        parse_header("p", ImageKind::Pstree, &common).unwrap(),
        Header {
            style: HeaderStyle::Common,
            len: 8
        }
    );
    let bare = ImageKind::Pstree.magic().to_ne_bytes();
    assert_eq!(
        parse_header("p", ImageKind::Pstree, &bare).unwrap().style,
        HeaderStyle::Bare
    );
    let mut service = IMG_SERVICE_MAGIC.to_ne_bytes().to_vec();
    service.extend_from_slice(&ImageKind::Pstree.magic().to_ne_bytes());
    assert_eq!(
        parse_header("p", ImageKind::Pstree, &service)
            .unwrap()
            .style,
        HeaderStyle::Service
    );
    let inv = header_bytes(ImageKind::Inventory);
    assert_eq!(inv, 0x5831_3116u32.to_ne_bytes());
    assert_eq!(
        parse_header("i", ImageKind::Inventory, &inv).unwrap().len,
        4
    );
}

#[test]
fn truncated_header() {
    let common = header_bytes(ImageKind::Pagemap);
    let err = parse_header("pagemap-1.img", ImageKind::Pagemap, &common[..6]).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TruncatedHeader {
                len: 6,
                need: 8,
                ..
            }
        ),
        "{err}"
    );
    let err = parse_header("pagemap-1.img", ImageKind::Pagemap, &[]).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TruncatedHeader {
                len: 0,
                need: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("pagemap-1.img: file is 0 bytes")
    );
}

#[test]
fn wrong_magic() {
    // A pstree image offered as a pagemap: common magic matches, type magic does not.
    let bytes = header_bytes(ImageKind::Pstree);
    let err = parse_header("pagemap-7.img", ImageKind::Pagemap, &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::WrongMagic {
                offset: 4,
                found: 0x5027_3030,
                expected: 0x5608_4025,
                ..
            }
        ),
        "{err}"
    );
    // An ELF file.
    let err = parse_header("mm-1.img", ImageKind::Mm, b"\x7fELF\x02\x01").unwrap_err();
    assert!(
        matches!(err, ImageError::WrongMagic { offset: 0, .. }),
        "{err}"
    );
    // inventory.img never has the common magic.
    let err = parse_header(
        "inventory.img",
        ImageKind::Inventory,
        &header_bytes(ImageKind::Pstree),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("is 0x54564319, expected 0x58313116"),
        "{err}"
    );
}

#[test]
fn truncated_record_and_length() {
    let bytes = image(
        ImageKind::Pstree,
        &[entry(1, vec![1]), entry(2, vec![2, 3])],
    );
    // Cut inside the second record's body.
    let cut = &bytes[..bytes.len() - 1];
    let recs: Vec<_> = Records::new("pstree.img", cut, 8).collect();
    assert_eq!(recs.len(), 2);
    assert!(recs[0].is_ok());
    let err = recs[1].as_ref().unwrap_err();
    assert!(
        matches!(err, ImageError::TruncatedRecord { offset, .. } if *offset > 8),
        "{err}"
    );
    // Cut inside the first length word.
    let err = Records::new("pstree.img", &bytes[..10], 8)
        .next()
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::TruncatedLength {
                offset: 8,
                left: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn absurd_length() {
    let mut bytes = header_bytes(ImageKind::Pagemap);
    bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
    bytes.extend_from_slice(&[0u8; 120]);
    let err = Records::new("pagemap-42.img", &bytes, 8)
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "pagemap-42.img: record at offset 8 claims 4294967295 bytes, file has 120 left \
         (truncated?)"
    );
    // A length under the file size but over the cap.
    let len = MAX_RECORD_LEN + 1;
    let mut bytes = header_bytes(ImageKind::Pagemap);
    bytes.extend_from_slice(&len.to_ne_bytes());
    bytes.resize(bytes.len() + len as usize, 0);
    let err = Records::new("pagemap-42.img", &bytes, 8)
        .next()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ImageError::RecordTooLarge { .. }), "{err}");
}

#[test]
fn garbage_body_names_offset_and_type() {
    let mut bytes = header_bytes(ImageKind::Pagemap);
    bytes.extend_from_slice(&3u32.to_ne_bytes());
    bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
    let err =
        decode_first::<PagemapHead>("pagemap-1.img", ImageKind::Pagemap, "pagemap_head", &bytes)
            .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("pagemap-1.img: record at offset 8 is not a valid pagemap_head"),
        "{err}"
    );
    let err = decode_first::<PagemapHead>(
        "pagemap-1.img",
        ImageKind::Pagemap,
        "pagemap_head",
        &header_bytes(ImageKind::Pagemap),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::MissingRecord { .. }), "{err}");
}

fn arb_entry() -> impl Strategy<Value = PstreeEntry> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..8),
    )
        .prop_map(|(pid, ppid, pgid, sid, threads)| PstreeEntry {
            pid,
            ppid,
            pgid,
            sid,
            threads,
        })
}

proptest! {
    #[test]
    fn framing_round_trip(msgs in prop::collection::vec(arb_entry(), 0..20)) {
        let bytes = image(ImageKind::Pstree, &msgs);
        let back: Vec<PstreeEntry> =
            decode_all("pstree.img", ImageKind::Pstree, "pstree_entry", &bytes)
                .unwrap()
                .into_iter()
                .map(|(_, m)| m)
                .collect();
        prop_assert_eq!(back, msgs);
    }

    /// Any prefix of a valid image either parses to a prefix of its records (cut at a
    /// boundary) or fails with a truncation error; never panics, never invents records.
    #[test]
    fn every_prefix_is_clean(msgs in prop::collection::vec(arb_entry(), 1..6), cut in any::<prop::sample::Index>()) {
        let bytes = image(ImageKind::Pstree, &msgs);
        let n = cut.index(bytes.len() + 1);
        let prefix = &bytes[..n];
        match decode_all::<PstreeEntry>("pstree.img", ImageKind::Pstree, "pstree_entry", prefix) {
            Ok(got) => {
                let got: Vec<_> = got.into_iter().map(|(_, m)| m).collect();
                prop_assert_eq!(&got[..], &msgs[..got.len()]);
            }
            Err(ImageError::TruncatedHeader { .. })
            | Err(ImageError::TruncatedLength { .. })
            | Err(ImageError::TruncatedRecord { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    /// Arbitrary bytes after a valid header never panic and never yield a body past the end.
    #[test]
    fn arbitrary_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = header_bytes(ImageKind::Mm);
        bytes.extend_from_slice(&tail);
        for rec in Records::new("mm-1.img", &bytes, 8) {
            match rec {
                Ok(r) => prop_assert!(r.offset + 4 + r.body.len() <= bytes.len()),
                Err(_) => break,
            }
        }
    }
}
