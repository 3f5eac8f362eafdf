//! The vocabulary both services speak, in one place: the protocol version, the hello roles, the
//! control stream's framing and the connect/accept steps every connection starts with. Frames
//! themselves are [`crate::wire`]; QUIC is [`crate::transport`]. Neither side's service is
//! imported here: `source`, `dst` and `stopcopy` all build on this module.

pub mod images;
pub mod lanes;

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};

use crate::keys::Identity;
use crate::pb::pageserv::{Control, Hello, control::Msg};
use crate::transport::{self, FrameReceiver, FrameSender};
use crate::wire::Frame;

/// The version every hello carries; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// Who opened a connection, as its hello says (`Hello.role` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `pageserv dst` answering any hello.
    Dst,
    /// A lazy (post-copy) source's control connection.
    Src,
    /// A lazy source's second connection, which carries only faults.
    SrcFaults,
    /// A lazy source reconnecting mid post-copy (see `source::recovery`).
    SrcResume,
    /// A stop-and-copy source's control connection.
    SrcStopAndCopy,
    /// A stop-and-copy source's further connection, carrying only lanes of its session
    /// ([`lanes`]).
    SrcLanes,
}

impl Role {
    /// The role's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Dst => "dst",
            Role::Src => "src",
            Role::SrcFaults => "src-faults",
            Role::SrcResume => "src-resume",
            Role::SrcStopAndCopy => "src-stop-and-copy",
            Role::SrcLanes => "src-stop-and-copy-lanes",
        }
    }

    /// The role named `s` on the wire, if it is one.
    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::Dst,
            Role::Src,
            Role::SrcFaults,
            Role::SrcResume,
            Role::SrcStopAndCopy,
            Role::SrcLanes,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// The role `hello` claims (`None`: a name this version does not know).
    pub fn of(hello: &Hello) -> Option<Role> {
        Role::parse(&hello.role)
    }
}

/// A hello of this protocol version and page size.
pub fn hello(role: Role, criu_version: String, migration_id: String) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role: role.as_str().into(),
        page_size: crate::pages::PAGE_SIZE as u32,
        criu_version,
        migration_id,
        fault_port: 0,
        restore_criu_opts: Vec::new(),
    }
}

/// Where a source opens its fault connection: dst's fault endpoint, as its hello answer names
/// it, at the address the source dialled (or the dialled port itself if it names none).
pub fn fault_addr(dialled: SocketAddr, answer: &Hello) -> SocketAddr {
    match u16::try_from(answer.fault_port) {
        Ok(port) if port != 0 => SocketAddr::new(dialled.ip(), port),
        _ => dialled,
    }
}

/// True if `h` is dst's answer in this protocol version.
pub fn is_dst_answer(h: &Hello) -> bool {
    Role::of(h) == Some(Role::Dst) && h.protocol_version == PROTOCOL_VERSION
}

/// A migration's name in logs, directory names and reports: a hash of its id. The id itself
/// stays out of them: with it (and the source's certificate, see dst::endpoint) a connection
/// joins the migration, so it is kept in 0600 files only.
pub fn id_tag(migration_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, migration_id.as_bytes());
    let hex: String = d.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("m{hex}")
}

/// What a peer is told when `what` failed here: short and free of local detail (paths, logs,
/// error chains stay in this host's log), with the tag that finds them there.
pub fn peer_error(what: &str, migration_id: &str) -> String {
    format!(
        "{what}; details in its log, migration {}",
        id_tag(migration_id)
    )
}

/// The wildcard local address of `to`'s family, port chosen by the kernel.
pub fn any_addr(to: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
}

/// Resolves `--to HOST:PORT` and the name dst's certificate must carry (`--dst-name`, else
/// HOST: see [`crate::keys::trust::dst_name`]).
pub fn resolve_dst(to: &str, dst_name: Option<&str>) -> Result<(SocketAddr, String)> {
    use std::net::ToSocketAddrs;
    let (host, port) = crate::keys::trust::split_host_port(to)
        .map_err(|e| anyhow::anyhow!("--to: {e}; e.g. --to dst.example:7070"))?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("--to: cannot resolve {host:?}; give an IP address or fix DNS"))?
        .next()
        .with_context(|| format!("--to: {host:?} has no address"))?;
    Ok((addr, crate::keys::trust::dst_name(&host, dst_name)))
}

/// Connects to `pageserv dst` at `to`, whose certificate must carry `name` (mutual TLS), and
/// opens the control stream.
pub async fn connect_control(
    id: &Identity,
    to: SocketAddr,
    name: &str,
    options: &transport::TransportOptions,
) -> Result<(quinn::Connection, FrameSender, FrameReceiver)> {
    let conn = transport::connect_with(any_addr(to), to, name, id, options)
        .await
        .with_context(|| format!("connecting to pageserv dst {name} at {to}"))?;
    let (send, recv) = conn.open_bi().await.context("opening the control stream")?;
    Ok((conn, FrameSender::new(send), FrameReceiver::new(recv)))
}

/// Accepts a connection's first stream and reads its hello (any role: the caller routes).
pub async fn accept_control(
    conn: &quinn::Connection,
) -> Result<(FrameSender, FrameReceiver, Hello)> {
    let (ctl_send, ctl_recv) = conn
        .accept_bi()
        .await
        .context("waiting for the control stream")?;
    let ctl = FrameSender::new(ctl_send);
    let mut ctl_rx = FrameReceiver::new(ctl_recv);
    let hello = match next_ctl(&mut ctl_rx).await? {
        Msg::Hello(h) => h,
        other => bail!("the source opened with {other:?} instead of a hello"),
    };
    Ok((ctl, ctl_rx, hello))
}

/// Sends one control message.
pub async fn send_ctl(ctl: &mut FrameSender, msg: Msg) -> Result<()> {
    ctl.send(&Frame::Control(Control { msg: Some(msg) }))
        .await
        .context("sending on the control stream")
}

/// The next control message; the stream ending is an error (the peer is gone).
pub async fn next_ctl(rx: &mut FrameReceiver) -> Result<Msg> {
    match rx.next().await? {
        Some(Frame::Control(Control { msg: Some(m) })) => Ok(m),
        Some(other) => bail!("expected a control message, got {other:?}"),
        None => bail!("the peer closed the control stream"),
    }
}

/// True if `conn` died of the link (no packets within the idle timeout, or a stateless reset
/// after a peer's restart of its endpoint), as opposed to a peer that closed it on purpose.
pub fn link_lost(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip_and_match_the_wire() {
        for (role, name) in [
            (Role::Dst, "dst"),
            (Role::Src, "src"),
            (Role::SrcFaults, "src-faults"),
            (Role::SrcResume, "src-resume"),
            (Role::SrcStopAndCopy, "src-stop-and-copy"),
            (Role::SrcLanes, "src-stop-and-copy-lanes"),
        ] {
            assert_eq!(role.as_str(), name);
            assert_eq!(Role::parse(name), Some(role));
        }
        assert_eq!(Role::parse("source"), None);
    }

    #[test]
    fn a_tag_is_stable_short_and_hides_the_id() {
        let id = "m1733379000-4242-0123456789abcdef";
        assert_eq!(id_tag(id), id_tag(id));
        assert_eq!(id_tag(id).len(), 13);
        assert_ne!(id_tag(id), id_tag("m1733379000-4242-0123456789abcdee"));
        assert!(!id_tag(id).contains("0123"));
        let e = peer_error("restore failed at the destination", id);
        assert!(e.contains(&id_tag(id)) && !e.contains(id), "{e}");
    }

    #[test]
    fn only_dst_of_this_version_is_an_answer() {
        let mut h = hello(Role::Dst, "4.2".into(), "m".into());
        assert!(is_dst_answer(&h));
        h.protocol_version += 1;
        assert!(!is_dst_answer(&h));
        assert!(!is_dst_answer(&hello(Role::Src, "4.2".into(), "m".into())));
    }
}
