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

/// Sends one image file to dst in chunks of at most [`IMAGE_CHUNK`] (an empty file is one empty
/// last chunk).
pub async fn send_image(ctl: &mut FrameSender, name: &str, data: Bytes) -> Result<()> {
    let mut offset = 0usize;
    loop {
        let end = (offset + IMAGE_CHUNK).min(data.len());
        let last = end == data.len();
        send_ctl(
            ctl,
            Msg::ImageChunk(ImageChunk {
                name: name.to_string(),
                offset: offset as u64,
                data: data.slice(offset..end),
                last,
                mode: 0o600,
            }),
        )
        .await?;
        offset = end;
        if last {
            return Ok(());
        }
    }
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
