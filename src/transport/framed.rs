//! pageserv frames over QUIC streams: the IO shells around [`crate::wire`].

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};

use super::TransportError;
use crate::pages::PAGE_SIZE;
use crate::wire::{self, Frame, FrameDecoder, PageData, WireError};

/// Stream error code sent (STOP_SENDING) when a peer's frames do not decode.
pub const STOP_PROTOCOL_ERROR: u32 = 1;

/// Received chunks fetched per await: fewer wakeups at bulk rates.
const CHUNKS_PER_READ: usize = 32;

/// Sends frames on one QUIC send stream.
#[derive(Debug)]
pub struct FrameSender {
    stream: SendStream,
    buf: BytesMut,
}

impl FrameSender {
    pub fn new(stream: SendStream) -> Self {
        FrameSender {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Wraps `stream` and sets its priority (e.g. [`super::FAULT_PRIORITY`]).
    pub fn with_priority(stream: SendStream, priority: i32) -> Self {
        let s = Self::new(stream);
        s.set_priority(priority);
        s
    }

    /// Data of higher-priority streams is sent before any queued data of lower ones.
    pub fn set_priority(&self, priority: i32) {
        // Fails only on a stream already finished or reset, where priority no longer matters.
        let _ = self.stream.set_priority(priority);
    }

    /// Sends one frame. Pages frames go through [`send_pages`](Self::send_pages), uncopied.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        if let Frame::Pages {
            pid,
            vaddr,
            nr_pages,
            data,
        } = frame
        {
            return self.send_pages(*pid, *vaddr, *nr_pages, data.clone()).await;
        }
        self.encode(|out| wire::encode(frame, out))?;
        let bytes = self.buf.split().freeze();
        self.write(&mut [bytes]).await
    }

    /// Sends a Pages frame whose `data` (exactly `nr_pages * 4096` bytes) QUIC takes without
    /// copying.
    pub async fn send_pages(
        &mut self,
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        data: Bytes,
    ) -> Result<(), TransportError> {
        self.send_data(PageData::Pages, pid, vaddr, nr_pages, data)
            .await
    }

    /// Sends a PreCopyPages frame without copying `data` (as [`FrameSender::send_pages`]).
    pub async fn send_precopy_pages(
        &mut self,
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        data: Bytes,
    ) -> Result<(), TransportError> {
        self.send_data(PageData::PreCopyPages, pid, vaddr, nr_pages, data)
            .await
    }

    async fn send_data(
        &mut self,
        kind: PageData,
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
        data: Bytes,
    ) -> Result<(), TransportError> {
        if data.len() as u64 != u64::from(nr_pages) * PAGE_SIZE {
            return Err(self.wire_error(WireError::Unencodable {
                kind: match kind {
                    PageData::Pages => "Pages",
                    PageData::PreCopyPages => "PreCopyPages",
                },
                field: "data.len()",
                value: data.len() as u64,
                why: "must be nr_pages * 4096",
            }));
        }
        self.encode(|out| wire::encode_data_header(kind, pid, vaddr, nr_pages, out))?;
        let header = self.buf.split().freeze();
        self.write(&mut [header, data]).await
    }

    /// Ends the stream after everything sent so far.
    pub fn finish(&mut self) {
        // Fails only if the stream was already finished or reset: nothing more to do then.
        let _ = self.stream.finish();
    }

    /// The underlying stream (e.g. to await `stopped()`).
    pub fn stream(&mut self) -> &mut SendStream {
        &mut self.stream
    }

    fn encode(
        &mut self,
        f: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
    ) -> Result<(), TransportError> {
        self.buf.clear();
        f(&mut self.buf).map_err(|e| self.wire_error(e))
    }

    async fn write(&mut self, chunks: &mut [Bytes]) -> Result<(), TransportError> {
        // quinn's futures are outside tokio's cooperative budget: while the send window has room
        // a pushing task would never yield and could starve fault handling on its worker.
        tokio::task::consume_budget().await;
        let stream = self.stream.id();
        self.stream
            .write_all_chunks(chunks)
            .await
            .map_err(|source| TransportError::Write { stream, source })
    }

    fn wire_error(&self, source: WireError) -> TransportError {
        TransportError::Wire {
            stream: self.stream.id(),
            source,
        }
    }
}

/// Receives frames from one QUIC receive stream.
#[derive(Debug)]
pub struct FrameReceiver {
    stream: RecvStream,
    decoder: FrameDecoder,
}

impl FrameReceiver {
    pub fn new(stream: RecvStream) -> Self {
        FrameReceiver {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next frame, or `None` when the peer finished the stream on a frame boundary. On
    /// undecodable input the peer is told to stop sending and the error names the stream offset.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut chunks: [Bytes; CHUNKS_PER_READ] = Default::default();
        loop {
            match self.decoder.poll() {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(self.protocol_error(e)),
            }
            // As in FrameSender::write: with a full receive buffer this loop would never yield.
            tokio::task::consume_budget().await;
            let stream = self.stream.id();
            let n = self
                .stream
                .read_chunks(&mut chunks)
                .await
                .map_err(|source| TransportError::Read { stream, source })?;
            let Some(n) = n else {
                return match self.decoder.finish() {
                    Ok(()) => Ok(None),
                    Err(e) => Err(TransportError::Wire { stream, source: e }),
                };
            };
            for chunk in &mut chunks[..n] {
                self.decoder.feed(chunk);
                *chunk = Bytes::new();
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut RecvStream {
        &mut self.stream
    }

    fn protocol_error(&mut self, source: WireError) -> TransportError {
        let _ = self.stream.stop(VarInt::from_u32(STOP_PROTOCOL_ERROR));
        TransportError::Wire {
            stream: self.stream.id(),
            source,
        }
    }
}
