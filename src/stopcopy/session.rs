//! The page-server session of `pageserv src --stop-and-copy`: CRIU's dump read from its socket
//! and answered by the sans-IO [`ImageSession`], every pages file, page run and pagemap dealt
//! over the session's lanes ([`crate::protocol::lanes`]) to dst as it is produced, CLOSE
//! answered only once dst has written the session.

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::criu::page_server::{
    ImageSession, Layout, Output, ParentSet, ServerDecoder, SessionSummary, encode_close_reply,
};
use crate::pb::pageserv::{Control, PsCreatePages, PsLanes, PsSessionDone, control::Msg};
use crate::protocol::images::image_chunks;
use crate::protocol::lanes::{self, Spread, Striper};
use crate::protocol::{next_ctl, send_ctl};
use crate::transport::{FrameReceiver, FrameSender};
use crate::wire::Frame;

/// What a served session moved.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub summary: SessionSummary,
    /// Page bytes forwarded to dst.
    pub page_bytes: u64,
    /// Bytes of the pagemap files.
    pub pagemap_bytes: u64,
}

/// The connection and lane count a session's frames are dealt over.
pub(crate) type LaneSpec<'a> = (&'a [quinn::Connection], Spread);

/// The session's outgoing lanes ([`crate::protocol::lanes`]): announced on the control stream,
/// then one unidirectional stream each, frames dealt round-robin.
struct LanesOut {
    lanes: Vec<FrameSender>,
    striper: Striper,
}

impl LanesOut {
    async fn open(ctl: &mut FrameSender, (conns, spread): LaneSpec<'_>) -> Result<Self> {
        let striper = Striper::new(spread.lanes())?;
        let announced = PsLanes {
            lanes: spread.lanes(),
            connections: spread.connections(),
            index: 0,
        };
        send_ctl(ctl, Msg::PsLanes(announced)).await?;
        let mut lanes = Vec::with_capacity(spread.lanes() as usize);
        for i in 0..spread.lanes() as usize {
            let (c, _) = spread.place(i);
            let s = conns
                .get(c)
                .context("a lane connection is missing (internal error)")?
                .open_uni()
                .await
                .with_context(|| format!("opening lane {i} of the page-server session"))?;
            lanes.push(FrameSender::new(s));
        }
        Ok(LanesOut { lanes, striper })
    }

    /// The stream of the session's next frame.
    fn next(&mut self) -> &mut FrameSender {
        let lane = self.striper.next_lane();
        &mut self.lanes[lane]
    }

    async fn control(&mut self, msg: Msg) -> Result<()> {
        let frame = Frame::Control(Control { msg: Some(msg) });
        self.next()
            .send(&frame)
            .await
            .context("sending on a lane of the page-server session")
    }

    /// Finishes every lane: dst reads this as the end of the session's frames.
    fn finish(&mut self) {
        for l in &mut self.lanes {
            l.finish();
        }
    }
}

/// Serves one page-server session on `sock`, forwarding its writes to dst over the lanes.
/// Answers CLOSE only after dst confirmed the session is written. Any error drops the socket
/// unanswered, which makes the dump fail (and CRIU resume the tasks).
pub(crate) async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
    ctl: &mut FrameSender,
    ctl_rx: &mut FrameReceiver,
    lanes: LaneSpec<'_>,
    sock: &mut S,
    layout: Layout,
    parent: ParentSet,
) -> Result<Served> {
    let mut page_bytes = 0u64;
    let mut out = LanesOut::open(ctl, lanes).await?;
    let mut dec = ServerDecoder::new(layout);
    let mut session = ImageSession::new(parent);
    let mut outs = Vec::new();
    let mut pages_files = 0u32;
    let mut pagemap_files = 0u32;
    let mut pagemap_bytes = 0u64;
    loop {
        let n = sock
            .read_buf(dec.read_buf())
            .await
            .context("reading from the dump")?;
        if n == 0 {
            dec.on_eof()?;
            bail!("the dump closed the page-server session without CLOSE");
        }
        while let Some(ev) = dec.poll()? {
            outs.clear();
            session.handle(ev, &mut outs)?;
            for o in outs.drain(..) {
                match o {
                    Output::Reply(r) => sock.write_all(&r).await.context("answering the dump")?,
                    Output::CreatePages { pages_id } => {
                        pages_files += 1;
                        out.control(Msg::PsCreatePages(PsCreatePages { pages_id }))
                            .await?;
                    }
                    Output::AppendPages {
                        pages_id,
                        vaddr,
                        data,
                    } => {
                        page_bytes += data.len() as u64;
                        let page = crate::pages::PAGE_SIZE;
                        let nr = data.len() as u64 / page;
                        for (first, len) in lanes::pieces(nr, lanes::STRIPE_PAGES) {
                            let (off, end) = (first * page, (first + u64::from(len)) * page);
                            out.next()
                                .send_pages(
                                    pages_id,
                                    vaddr + off,
                                    len,
                                    data.slice(off as usize..end as usize),
                                )
                                .await?;
                        }
                    }
                    Output::Pagemap { name, bytes } => {
                        pagemap_files += 1;
                        pagemap_bytes += bytes.len() as u64;
                        for chunk in image_chunks(&name, bytes.into()) {
                            out.control(Msg::ImageChunk(chunk)).await?;
                        }
                    }
                    Output::Closed { force } => {
                        out.finish();
                        send_ctl(
                            ctl,
                            Msg::PsSessionDone(PsSessionDone {
                                page_bytes,
                                pages_files,
                                pagemap_files,
                                pagemap_bytes,
                            }),
                        )
                        .await?;
                        match next_ctl(ctl_rx).await? {
                            Msg::PsSessionWritten(w) if w.page_bytes == page_bytes => {}
                            Msg::PsSessionWritten(w) => bail!(
                                "dst wrote {} page bytes, {} were sent",
                                w.page_bytes,
                                page_bytes
                            ),
                            Msg::Abort(a) => bail!("dst could not write the session: {}", a.reason),
                            other => bail!("expected PsSessionWritten from dst, got {other:?}"),
                        }
                        let mut reply = BytesMut::new();
                        encode_close_reply(&mut reply);
                        sock.write_all(&reply).await.context("answering CLOSE")?;
                        tracing::info!(
                            force,
                            pages = session.summary().pages_present,
                            "page-server session complete"
                        );
                        return Ok(Served {
                            summary: session.summary().clone(),
                            page_bytes,
                            pagemap_bytes,
                        });
                    }
                }
            }
        }
    }
}
