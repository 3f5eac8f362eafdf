//! CRIU's image files on the control stream: one `ImagesPlan` (how many files and bytes), chunks
//! of at most [`IMAGE_CHUNK`] bytes, then one `ImagesDone`. Both the lazy and the stop-and-copy source send them; dst's `image_sink`
//! writes them.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;

use super::send_ctl;
use crate::pb::pageserv::{ImageChunk, ImagesDone, ImagesPlan, control::Msg};
use crate::transport::FrameSender;

/// The largest image chunk sent in one frame.
pub const IMAGE_CHUNK: usize = 1 << 20;

/// One image file as its chunks of at most [`IMAGE_CHUNK`] bytes (an empty file is one empty
/// last chunk), uncopied.
pub fn image_chunks(name: &str, data: Bytes) -> impl Iterator<Item = ImageChunk> + '_ {
    let n = data.len().div_ceil(IMAGE_CHUNK).max(1);
    (0..n).map(move |i| {
        let offset = i * IMAGE_CHUNK;
        let end = (offset + IMAGE_CHUNK).min(data.len());
        ImageChunk {
            name: name.to_string(),
            offset: offset as u64,
            data: data.slice(offset..end),
            last: i + 1 == n,
            mode: 0o600,
        }
    })
}

/// Sends one image file to dst in chunks of at most [`IMAGE_CHUNK`] (see [`image_chunks`]).
pub async fn send_image(ctl: &mut FrameSender, name: &str, data: Bytes) -> Result<()> {
    for chunk in image_chunks(name, data) {
        send_ctl(ctl, Msg::ImageChunk(chunk)).await?;
    }
    Ok(())
}

/// Sends every image file except the lazy memory (which CRIU never wrote to disk);
/// `before_done` runs just before the closing ImagesDone.
pub async fn ship_images(
    ctl: &mut FrameSender,
    dir: &Path,
    frozen_at: SystemTime,
    restore_criu_opts: Vec<String>,
    before_done: impl FnOnce(),
) -> Result<u64> {
    let mut names: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // CRIU's own logs may sit in the image directory (an external dump's -o); they are not images.
        if entry.file_type()?.is_file() && !name.ends_with(".log") {
            names.push(name);
        }
    }
    names.sort();
    // The plan first: dst checks it against its limits and its free disk before any image.
    let mut planned = 0u64;
    for name in &names {
        planned += std::fs::metadata(dir.join(name))
            .with_context(|| format!("reading the size of image {name}"))?
            .len();
    }
    send_ctl(
        ctl,
        Msg::ImagesPlan(ImagesPlan {
            files: names.len() as u32,
            bytes: planned,
        }),
    )
    .await?;
    let mut total = 0u64;
    for name in &names {
        let data = tokio::fs::read(dir.join(name))
            .await
            .with_context(|| format!("reading image {name}"))?;
        total += data.len() as u64;
        send_image(ctl, name, Bytes::from(data)).await?;
    }
    before_done();
    send_ctl(
        ctl,
        Msg::ImagesDone(ImagesDone {
            files: names.len() as u32,
            bytes: total,
            frozen_at_unix_ns: frozen_at.duration_since(UNIX_EPOCH)?.as_nanos() as u64,
            restore_criu_opts,
        }),
    )
    .await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_a_file_and_only_the_last_is_last() {
        let data = Bytes::from(vec![7u8; 2 * IMAGE_CHUNK + 5]);
        let c: Vec<_> = image_chunks("core-1.img", data.clone()).collect();
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().filter(|c| c.last).count(), 1);
        assert!(c[2].last && c[2].offset == 2 * IMAGE_CHUNK as u64 && c[2].data.len() == 5);
        let empty: Vec<_> = image_chunks("e.img", Bytes::new()).collect();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].last && empty[0].data.is_empty());
        let exact: Vec<_> = image_chunks("x.img", data.slice(..IMAGE_CHUNK)).collect();
        assert_eq!(exact.len(), 1);
        assert!(exact[0].last);
    }
}
