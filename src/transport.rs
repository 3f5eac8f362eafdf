//! QUIC between `pageserv src` and `pageserv dst`: mutual TLS 1.3 against the pair's private CA,
//! ALPN "pageserv/1", a transport tuned for bulk page pushes beside latency-critical faults, and
//! framed streams ([`FrameSender`], [`FrameReceiver`]).
//!
//! A connection is only handed out once both sides have verified each other: the server opens
//! one unidirectional "admitted" stream after the handshake, and [`connect`] waits for it. In TLS
//! 1.3 the client finishes its handshake before the server has checked the client's certificate,
//! so without this a refused client would only learn of it at its first stream operation.

mod batched_socket;
mod errors;
mod framed;
pub mod recv_batch;
pub mod scavenger;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;

pub use errors::{Refusal, RefusalReason, RefusedBy, TransportError};
pub use framed::{FrameReceiver, FrameSender, STOP_PROTOCOL_ERROR};

use crate::keys::trust::{Admission, DenyList, Fingerprint};
use crate::keys::{Identity, crypto_provider};
use errors::{DURING_HANDSHAKE, explain};

/// The one application protocol pageserv speaks; bump on incompatible wire changes.
pub const ALPN: &[u8] = b"pageserv/1";
/// Streams answering page faults: their data is sent before anything else queued.
pub const FAULT_PRIORITY: i32 = 100;
/// The control stream: above bulk pushes, below faults.
pub const CONTROL_PRIORITY: i32 = 10;
/// Background pushes of not-yet-faulted pages: sent only when nothing else is waiting.
pub const PUSH_PRIORITY: i32 = -100;

/// What the server writes on its admission stream.
const ADMITTED: &[u8] = b"pageserv/1 admitted";
/// The application close code of a client refused after the handshake by the server's
/// admission rule (`--allow-source`, `--deny-cert`); the close reason says why, in a few words.
pub const REFUSED_BY_POLICY: u32 = 0x70;

/// Congestion controllers: quinn's, and pageserv's scavenger for the background push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    /// quinn's BBR (v1, marked experimental by quinn).
    Bbr,
    NewReno,
    /// Delay-based, yields to other traffic on the bottleneck ([`scavenger`]): the push's.
    Scavenger,
}

impl Congestion {
    /// The sparse ACKs a bulk connection under this controller asks for
    /// ([`TransportOptions::sparse_acks`]): [`BULK_SPARSE_ACKS`] for the loss-based ones, whose
    /// window grows far past the threshold; quinn's own (`None`) for BBR and the scavenger,
    /// whose window stays near the path's BDP, on a LAN a few packets, fewer than the
    /// threshold, so their ACKs would come only after [`SparseAcks::max_delay`]. Measured with
    /// quinn-bulk over the 1 Gbit/s tbf (512 MiB, 2 runs each): BBR lost 3-5% of its goodput at
    /// every setting tried (threshold 16 or 64, 1 or 5 ms: 107-108 against 110-111 MiB/s in
    /// session 22; 104-106 against 109-110 in session 21), Cubic none (112). The scavenger was
    /// not measured: it is left out because its window is held near BDP + its 1 ms target by
    /// design.
    pub fn bulk_sparse_acks(self) -> Option<SparseAcks> {
        match self {
            Congestion::Cubic | Congestion::NewReno => Some(BULK_SPARSE_ACKS),
            Congestion::Bbr | Congestion::Scavenger => None,
        }
    }
}

/// How sparsely a connection asks its peer to acknowledge (QUIC's ACK-frequency extension,
/// draft-ietf-quic-ack-frequency; quinn's default without it is an ACK for every second
/// packet). The side that sends the data is the one whose setting counts: it asks its peer to
/// acknowledge this sparsely. A gap in the packet numbers is still acknowledged at once
/// (quinn's reordering threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseAcks {
    /// Ack-eliciting packets the peer may receive before it must acknowledge them at once.
    pub threshold: u32,
    /// The longest the peer holds an ACK back when fewer packets came (quinn asks for at most
    /// this, and at most the path's RTT or 25 ms, whichever is larger). Also part of the
    /// sender's loss timeout, so it stays short.
    pub max_delay: Duration,
}

impl SparseAcks {
    /// The congestion window a connection asking for these ACKs starts with: room for
    /// [`SparseAcks::threshold`] full-size packets on a 1,500-byte path, and never less than
    /// quinn's own ([`QUINN_INITIAL_WINDOW`]). While the window holds fewer packets than the
    /// threshold, the receiver acknowledges only after [`SparseAcks::max_delay`], so each of
    /// slow start's round trips would wait that long; the post-copy's push connection carries
    /// the images at the freeze in its first round trips. Measured with [`BULK_SPARSE_ACKS`]
    /// and quinn's window (8 packets of 1,466 bytes): dst started the restore a median 3.4 ms
    /// later after the dump was ready (10.8 against 7.4 ms, 9 runs each, 1 Gbit/s, cubic,
    /// session 22). The window is paced: quinn spreads it over the RTT on a long path.
    pub fn initial_window(self) -> u64 {
        (u64::from(self.threshold) * 1_500).max(QUINN_INITIAL_WINDOW)
    }
}

/// quinn's initial congestion window (RFC 9002's 10 packets of 1,200 bytes, at most 14,720
/// bytes): what a connection without sparse ACKs starts with.
pub const QUINN_INITIAL_WINDOW: u64 = 12_000;

/// [`TransportOptions::sparse_acks`] of the fault connection: two fault answers' packets on a
/// 1,500-byte path (a 4 KiB answer is three there, one with jumbo frames) before an ACK must go
/// out on its own. Kept below quinn's initial congestion window (~10 packets), so a source with
/// several answers in flight is never held by its window while dst, all of whose threads wait,
/// has no request to carry the ACK. A quiet fault connection's last answer is acknowledged
/// after 5 ms, unless a request carries the ACK first.
pub const FAULT_SPARSE_ACKS: SparseAcks = SparseAcks {
    threshold: 6,
    max_delay: Duration::from_millis(5),
};

/// [`TransportOptions::sparse_acks`] of the connections that carry the bulk of the pages
/// under a loss-based controller ([`TransportOptions::with_sparse_bulk_acks`]: the post-copy's
/// push connection and the stop-and-copy session's connections): the receiver acknowledges
/// every 65th packet, or 1 ms after the first it has not acknowledged, instead of every second.
///
/// Each stand-alone ACK is a packet the receiver builds, encrypts and sends and the sender
/// receives, decrypts and processes; at 1 Gbit/s that is ~40,000 of them a second each way.
/// Measured with `pageserv-lab quinn-bulk --congestion cubic` over the bench's 1 Gbit/s tbf (2
/// runs each, 512 MiB, the same 112 MiB/s), sender / receiver CPU: quinn's ACKs 42-45% / 53-54%
/// of a core; 64 and 1 ms 29-35% / 32-38%; 16 and 1 ms 41-45% / 47-50% (session 22); in
/// session 21, 32: 40-43% / 44-46%, 128: 36-40% / 38-42% (with 5 ms). On the bare veth the rate
/// did not drop (532-548 MiB/s with quinn's ACKs, 556-570 at 32).
///
/// The delay is 1 ms, not longer, for slow start: while the window holds fewer packets than
/// the threshold (~10 at first), every round trip waits for the delay, and the post-copy's push
/// connection carries the images at the freeze, on the downtime's critical path, in its first
/// round trips. With 5 ms that cost a median +16 ms from CRIU's freeze to the workload's first
/// beat (bbr, 6 runs each way, session 21). With 1 ms and [`SparseAcks::initial_window`] the
/// restore started 2-3 ms earlier to 2 ms later than with quinn's ACKs across session 22's
/// rounds, the felt downtime unchanged (README, "Stop-and-copy").
pub const BULK_SPARSE_ACKS: SparseAcks = SparseAcks {
    threshold: 64,
    max_delay: Duration::from_millis(1),
};

/// [`TransportOptions::max_datagram`]'s default: the largest UDP payload MTU discovery looks
/// for. quinn hands the kernel up to ten datagrams in one UDP GSO send
/// (`MAX_TRANSMIT_SEGMENTS` in quinn 0.11), and one such send carries at most 64 KiB, so ten of
/// these must fit in 65,507 bytes. Above that the kernel refuses whole batches, and quinn takes
/// the losses for a black hole and falls back to 1,200 bytes (measured with 8,952: 4 MiB/s).
///
/// On a path with jumbo frames (a veth or NIC with MTU 9000) this is where most of QUIC's cost
/// goes away: quinn's cost is per packet (header protection, AEAD set-up, ACKs, one GSO
/// segment each), not per byte. Measured on this 2-core VM, quinn alone over a bare veth, 1 GiB:
/// 443-558 MiB/s at 1,452-byte datagrams against 1,000-1,331 MiB/s at 6,500, with less than
/// half the CPU per byte. On a 1,500-byte path discovery settles at 1,472 (its larger probes are
/// lost, which costs a few probe packets after the handshake and nothing else).
pub const MAX_DATAGRAM: u16 = 6_500;

/// How long a connection stays at 1,200-byte datagrams after quinn suspected a black hole,
/// before it searches the path's MTU again (quinn's default: 60 s). quinn suspects one after
/// more than three loss bursts made only of full-size packets, which is what a loss-based
/// controller's drops at a bottleneck's full drop-tail queue look like when every packet is a
/// full-size push packet: seen in 6 of 34 bench runs at 1 Gbit/s (linkem, 2 MiB queue) in
/// session 33, each then moving the rest of its migration in 1,200-byte packets (22% more
/// packets per byte). A real black hole costs a few lost probes every 2 s.
pub const BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(2);

/// How a report says that a connection fell back to 1,200-byte datagrams: empty when it never
/// did.
pub fn black_hole_note(black_holes: u64) -> String {
    match black_holes {
        0 => String::new(),
        1 => " (fell back to 1200 bytes once: a suspected black hole)".into(),
        n => format!(" (fell back to 1200 bytes {n} times: suspected black holes)"),
    }
}

/// Transport tuning; `Default` is pageserv's measured choice (see the field docs).
///
/// Stream priorities only order data still waiting in the sender. Bulk data already in flight
/// sits in socket buffers and queues ahead of any later packet of the same path, so on one
/// connection a fault reply waits behind up to a stream window of pushed pages (measured on
/// loopback: p50 0.7 ms with the default 2 MiB window and 8 MiB socket buffer, 9.7 ms with
/// 16 MiB windows, 137 ms with 64 MiB). Give page faults their own connection (the faulting
/// side calls [`connect`] a second time, which binds a second UDP socket) and they no longer
/// queue behind pushed pages (p50 0.32 ms under the same push).
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// A connection with no packets for this long is dead. Keep-alives keep a quiet but healthy
    /// connection open, so this is how long a link outage is survived.
    pub idle_timeout: Duration,
    /// Interval of keep-alive pings on a quiet connection.
    pub keep_alive: Duration,
    pub congestion: Congestion,
    /// Tuning of [`Congestion::Scavenger`] (its queueing-delay target above all).
    pub scavenger: scavenger::ScavengerConfig,
    /// Per-stream receive window: bytes the peer may send on one stream before we read them. It
    /// bounds a push stream's data in flight, so it must cover bandwidth x RTT for full speed:
    /// 2 MiB is 1 GB/s up to 2 ms RTT (a LAN). Raise it for a WAN. Larger than needed only
    /// deepens the backlog a CPU-bound receiver works through in one go (quinn decrypts all
    /// queued packets of a connection in one poll), which measurably delays faults.
    pub stream_receive_window: u64,
    /// Connection receive window across all streams. Larger than the stream window, so a bulk
    /// stream the application reads slowly can never exhaust the credit fault replies need.
    pub receive_window: u64,
    /// Bytes of written-but-unacknowledged data buffered per connection. Keep it well above
    /// the stream window times the number of push streams: a push stream can never buffer more
    /// than its stream window, so there is always room for a fault reply. When the push can fill
    /// it, fault replies wait for acknowledgements (measured: p50 6-18 ms instead of 0.5 ms).
    pub send_window: u64,
    /// Streams of each direction the peer may open at once.
    pub max_concurrent_streams: u32,
    /// How sparsely the peer acknowledges what this end sends; `None` (the default) leaves
    /// quinn's ACK for every second packet. The bulk connections ask for [`BULK_SPARSE_ACKS`]
    /// under a loss-based controller ([`TransportOptions::with_sparse_bulk_acks`]), the fault
    /// connection for [`FAULT_SPARSE_ACKS`]: a 4 KiB fault answer is three packets, so quinn's
    /// default sends a stand-alone ACK for every fault, waking the source's fault lane on the
    /// fault's path, while the next fault request carries that ACK anyway.
    pub sparse_acks: Option<SparseAcks>,
    /// SO_RCVBUF of the UDP socket (forced past net.core.rmem_max when running as root); 0 leaves
    /// the kernel default. A large one absorbs receiver CPU hiccups without loss (bulk
    /// throughput), but every byte queued there delays whatever arrives after it on that socket:
    /// see [`TransportOptions`] on keeping faults on their own connection.
    pub udp_recv_buffer: usize,
    /// SO_SNDBUF of the UDP socket; 0 leaves the kernel default. Bytes queued there delay every
    /// later packet of the socket, fault replies included, so it stays small.
    pub udp_send_buffer: usize,
    /// The largest UDP payload this endpoint accepts and MTU discovery searches up to (RFC 9000
    /// section 14.3, DPLPMTUD): a connection starts at 1,200 bytes and grows its datagrams to
    /// what the path carries, up to the smaller of both ends' values. Between 1,200 and
    /// 65,527; see [`MAX_DATAGRAM`] for why the default is not higher.
    pub max_datagram: u16,
    /// How long [`connect`] waits for the server to admit it after the TLS handshake.
    pub admit_timeout: Duration,
    /// Drive the endpoint (socket, timers, connection drivers) on the fault lane
    /// ([`crate::fault_lane`]) instead of the caller's runtime: for the fault connection only.
    pub fault_lane: bool,
    /// Receive batching on this endpoint's socket ([`recv_batch`]): for bulk endpoints, where
    /// it saves the receiver's CPU; `None` reads every datagram as it comes (the fault
    /// connection, whose every datagram is on a fault's path).
    pub recv_batching: Option<recv_batch::RecvBatching>,
    /// A client's deny list (`pageserv src --deny-cert FILE`): a server presenting one of these
    /// certificates is refused right after the TLS handshake, before anything is sent to it.
    pub deny: Arc<DenyList>,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(1),
            congestion: Congestion::Cubic,
            scavenger: scavenger::ScavengerConfig::default(),
            stream_receive_window: 2 << 20,
            receive_window: 16 << 20,
            send_window: 12 << 20,
            max_concurrent_streams: 64,
            sparse_acks: None,
            udp_recv_buffer: 8 << 20,
            udp_send_buffer: 0,
            max_datagram: MAX_DATAGRAM,
            admit_timeout: Duration::from_secs(10),
            fault_lane: false,
            recv_batching: Some(recv_batch::RecvBatching::default()),
            deny: Arc::default(),
        }
    }
}

impl TransportOptions {
    /// quinn's own defaults for windows and congestion (kernel socket buffers), with our
    /// timeouts: for comparison in measurements.
    pub fn quinn_defaults() -> Self {
        TransportOptions {
            stream_receive_window: 1_250_000,
            receive_window: VarInt::MAX.into_inner(),
            send_window: 10_000_000,
            max_concurrent_streams: 100,
            udp_recv_buffer: 0,
            udp_send_buffer: 0,
            max_datagram: QUINN_MAX_DATAGRAM,
            recv_batching: None,
            ..Self::default()
        }
    }

    /// These options with sparse ACKs as their controller suits them
    /// ([`Congestion::bulk_sparse_acks`]): for the connections that carry the bulk of the
    /// pages, the post-copy's push connection and the stop-and-copy session's.
    pub fn with_sparse_bulk_acks(self) -> Self {
        TransportOptions {
            sparse_acks: self.congestion.bulk_sparse_acks(),
            ..self
        }
    }

    /// The fault connection's settings on top of these: driven on the fault lane, with sparse
    /// ACKs. Both ends of the fault connection (src's client, dst's fault endpoint) use this.
    pub fn for_faults(self) -> Self {
        TransportOptions {
            fault_lane: true,
            recv_batching: None,
            sparse_acks: Some(FAULT_SPARSE_ACKS),
            ..self
        }
    }

    /// The quinn transport configuration these options describe.
    pub fn transport_config(&self) -> Result<Arc<TransportConfig>, TransportError> {
        let varint = |what, v: u64| {
            VarInt::from_u64(v).map_err(|e| TransportError::Config {
                what,
                why: e.to_string(),
            })
        };
        let mut t = TransportConfig::default();
        let idle = self
            .idle_timeout
            .try_into()
            .map_err(|e| TransportError::Config {
                what: "idle_timeout",
                why: format!("{e}"),
            })?;
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keep_alive))
            .stream_receive_window(varint("stream_receive_window", self.stream_receive_window)?)
            .receive_window(varint("receive_window", self.receive_window)?)
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(self.max_concurrent_streams.into())
            .max_concurrent_uni_streams(self.max_concurrent_streams.into())
            .datagram_receive_buffer_size(None)
            .enable_segmentation_offload(true);
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        // Search to the byte: quinn stops within 20 bytes by default, 1,466 on a 1,500-byte
        // path, 0.4% of each packet's payload left unused for the connection's whole life, for
        // 3 more probes (21 lost ones instead of 18, once, after the handshake).
        mtu.upper_bound(self.checked_max_datagram()?)
            .minimum_change(1)
            .black_hole_cooldown(BLACK_HOLE_COOLDOWN);
        t.mtu_discovery_config(Some(mtu));
        if let Some(sparse) = self.sparse_acks {
            let mut acks = quinn::AckFrequencyConfig::default();
            acks.ack_eliciting_threshold(sparse.threshold.into())
                .max_ack_delay(Some(sparse.max_delay));
            t.ack_frequency_config(Some(acks));
        }
        // Only the loss-based controllers ever ask for sparse ACKs (bulk_sparse_acks, and the
        // fault connection runs cubic); every other connection keeps quinn's initial window.
        let initial_window = self.sparse_acks.map(SparseAcks::initial_window);
        match self.congestion {
            Congestion::Cubic => {
                let mut c = quinn::congestion::CubicConfig::default();
                if let Some(w) = initial_window {
                    c.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(c))
            }
            Congestion::NewReno => {
                let mut c = quinn::congestion::NewRenoConfig::default();
                if let Some(w) = initial_window {
                    c.initial_window(w);
                }
                t.congestion_controller_factory(Arc::new(c))
            }
            Congestion::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            Congestion::Scavenger => {
                t.congestion_controller_factory(Arc::new(self.scavenger.clone()))
            }
        };
        Ok(Arc::new(t))
    }

    /// The quinn endpoint configuration these options describe: the largest datagram it
    /// accepts, which it also announces to the peer (quinn's default is 1,472, which would cap
    /// the peer's MTU discovery there).
    pub fn endpoint_config(&self) -> Result<EndpointConfig, TransportError> {
        let mut e = EndpointConfig::default();
        e.max_udp_payload_size(self.max_datagram)
            .map_err(|_| self.datagram_out_of_range())?;
        Ok(e)
    }

    /// `max_datagram`, if QUIC can use it: quinn's MTU discovery would clamp it in silence.
    fn checked_max_datagram(&self) -> Result<u16, TransportError> {
        if (1_200..=65_527).contains(&self.max_datagram) {
            Ok(self.max_datagram)
        } else {
            Err(self.datagram_out_of_range())
        }
    }

    fn datagram_out_of_range(&self) -> TransportError {
        TransportError::Config {
            what: "max_datagram",
            why: format!(
                "{} bytes is outside the 1,200 to 65,527 a QUIC datagram may carry",
                self.max_datagram
            ),
        }
    }
}

/// quinn's own largest datagram, its `EndpointConfig` default: Ethernet's 1,500-byte MTU less
/// the IP and UDP headers (its MTU discovery stops at 1,452 by default).
pub const QUINN_MAX_DATAGRAM: u16 = 1_472;

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub addr: SocketAddr,
    /// The certificate's common name: the name it was issued for (`pageserv keygen issue --name`).
    pub common_name: Option<String>,
    /// DNS and IP subject alternative names.
    pub names: Vec<String>,
    /// The chain the peer presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the leaf: the identity a migration's connections must share.
    pub fingerprint: Fingerprint,
}

impl PeerIdentity {
    /// The common name, then every subject alternative name: what `--allow-source` matches.
    pub fn all_names(&self) -> Vec<String> {
        let mut all: Vec<String> = self.common_name.iter().cloned().collect();
        all.extend(
            self.names
                .iter()
                .filter(|n| !all.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
        all
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.common_name {
            Some(cn) => write!(f, "{cn} ({})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// The verified peer of `conn`, once its handshake is done.
pub fn peer_identity(conn: &Connection) -> Option<PeerIdentity> {
    let chain = *conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        names.push(std::net::Ipv4Addr::from(a).to_string());
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        names.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let fingerprint = Fingerprint::of(chain.first()?);
    Some(PeerIdentity {
        addr: conn.remote_address(),
        common_name,
        names,
        chain,
        fingerprint,
    })
}

fn tls_error(id: &Identity, why: impl std::fmt::Display) -> TransportError {
    TransportError::Tls {
        dir: id.dir.clone(),
        why: why.to_string(),
    }
}

/// The server's TLS: TLS 1.3 only, our certificate a destination one, a client certificate
/// chaining to the CA with the source role (clientAuth) required, ALPN "pageserv/1". Public so tests and tools can vary it.
pub fn server_tls(id: &Identity) -> Result<rustls::ServerConfig, TransportError> {
    // Only a destination certificate serves (see `keys`: roles are key usages).
    id.require(crate::keys::Role::Destination)?;
    let provider = crypto_provider();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots()?, provider.clone())
            .build()
            .map_err(|e| tls_error(id, e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(id, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| tls_error(id, e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The client's TLS: TLS 1.3 only, the server must chain to the CA with the destination role
/// (serverAuth) and the name the connection asks for (see [`connect_with`]), our source
/// certificate is presented, ALPN "pageserv/1".
pub fn client_tls(id: &Identity) -> Result<rustls::ClientConfig, TransportError> {
    // Only a source certificate opens migrations (see `keys`).
    id.require(crate::keys::Role::Source)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(id, e))?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(|e| tls_error(id, e))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A UDP socket with the configured buffer sizes.
fn udp_socket(addr: SocketAddr, opts: &TransportOptions) -> Result<UdpSocket, TransportError> {
    use nix::sys::socket::{setsockopt, sockopt};
    let bind_err = |source| TransportError::Bind { addr, source };
    let socket = UdpSocket::bind(addr).map_err(bind_err)?;
    // Forcing needs CAP_NET_ADMIN; without it the kernel caps at net.core.{r,w}mem_max. A
    // smaller buffer than asked only costs throughput, so failures are logged, not fatal.
    let n = opts.udp_recv_buffer;
    if n > 0
        && setsockopt(&socket, sockopt::RcvBufForce, &n).is_err()
        && let Err(e) = setsockopt(&socket, sockopt::RcvBuf, &n)
    {
        tracing::warn!(%addr, bytes = n, error = %e, "cannot set UDP receive buffer");
    }
    let n = opts.udp_send_buffer;
    if n > 0
        && setsockopt(&socket, sockopt::SndBufForce, &n).is_err()
        && let Err(e) = setsockopt(&socket, sockopt::SndBuf, &n)
    {
        tracing::warn!(%addr, bytes = n, error = %e, "cannot set UDP send buffer");
    }
    Ok(socket)
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    opts: &TransportOptions,
) -> Result<Endpoint, TransportError> {
    let socket = udp_socket(addr, opts)?;
    let bind_err = |source| TransportError::Bind { addr, source };
    let runtime: Arc<dyn quinn::Runtime> = if opts.fault_lane {
        Arc::new(crate::fault_lane::LaneRuntime)
    } else {
        Arc::new(quinn::TokioRuntime)
    };
    let socket: Arc<dyn quinn::AsyncUdpSocket> = match opts.recv_batching {
        Some(cfg) => Arc::new(batched_socket::BatchedSocket::new(socket, cfg).map_err(bind_err)?),
        None => runtime.wrap_udp_socket(socket).map_err(bind_err)?,
    };
    Endpoint::new_with_abstract_socket(opts.endpoint_config()?, server, socket, runtime)
        .map_err(bind_err)
}

/// Listens on `listen` (port 0 picks one: see `Endpoint::local_addr`) with default options.
/// Must run inside a tokio runtime.
pub fn server(listen: SocketAddr, id: &Identity) -> Result<Endpoint, TransportError> {
    server_with(listen, id, &TransportOptions::default())
}

/// [`server`] with explicit transport options.
pub fn server_with(
    listen: SocketAddr,
    id: &Identity,
    opts: &TransportOptions,
) -> Result<Endpoint, TransportError> {
    let tls = QuicServerConfig::try_from(server_tls(id)?).map_err(|e| tls_error(id, e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(tls));
    config.transport_config(opts.transport_config()?);
    endpoint(listen, Some(config), opts)
}

/// Waits for the next client, verifies it (mutual TLS, ALPN) and admits it. A refused client
/// yields `Err(TransportError::Refused)` naming who refused and why; the endpoint stays usable,
/// so a server loop logs the error and calls `accept` again. `Err(EndpointClosed)` ends the loop.
pub async fn accept(
    ep: &Endpoint,
    id: &Identity,
) -> Result<(Connection, PeerIdentity), TransportError> {
    admit(next_incoming(ep).await?, id).await
}

/// The next connection attempt, before any handshake: a server that must not let one slow
/// client hold up the others hands each to [`admit`] on a task of its own.
pub async fn next_incoming(ep: &Endpoint) -> Result<quinn::Incoming, TransportError> {
    ep.accept().await.ok_or(TransportError::EndpointClosed)
}

/// Completes one connection attempt: the TLS handshake (mutual TLS, ALPN) and the admission.
/// It takes as long as the client does: callers bound it with a deadline.
pub async fn admit(
    incoming: quinn::Incoming,
    id: &Identity,
) -> Result<(Connection, PeerIdentity), TransportError> {
    admit_checked(incoming, id, &Admission::default()).await
}

/// [`admit`] under `rule` (`--allow-source`, `--deny-cert`): a client it refuses is closed
/// before it is admitted, with a short reason ([`REFUSED_BY_POLICY`]); the whole reason, its
/// names and fingerprint are logged here and returned as [`TransportError::Policy`].
pub async fn admit_checked(
    incoming: quinn::Incoming,
    id: &Identity,
    rule: &Admission,
) -> Result<(Connection, PeerIdentity), TransportError> {
    let peer = incoming.remote_address();
    let idle = Duration::ZERO;
    let conn = incoming
        .await
        .map_err(|e| explain(e, "server", peer, id, DURING_HANDSHAKE, idle))?;
    let who = peer_identity(&conn).ok_or_else(|| {
        tls_error(
            id,
            format!("client {peer} passed verification without a certificate"),
        )
    })?;
    if let Err(why) = rule.judge(&who.all_names(), &who.fingerprint) {
        conn.close(REFUSED_BY_POLICY.into(), why.to_peer().as_bytes());
        tracing::warn!(peer = %who, fingerprint = %who.fingerprint, "refused a source: {why}");
        return Err(TransportError::Policy {
            peer,
            who: who.to_string(),
            why,
        });
    }
    let admit = async {
        let mut s = conn.open_uni().await?;
        s.write_all(ADMITTED).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(e) => e,
            _ => quinn::ConnectionError::LocallyClosed,
        })?;
        let _ = s.finish();
        Ok::<_, quinn::ConnectionError>(())
    };
    admit
        .await
        .map_err(|e| explain(e, "server", peer, id, "while admitting it", idle))?;
    tracing::info!(peer = %who, "admitted pageserv client");
    Ok((conn, who))
}

/// The endpoints of this process's client connections that may still have something to send
/// (a CONNECTION_CLOSE), for [`flush_client_closes`]. Pruned of endpoints with no open
/// connection at each new one, so it holds at most the live ones and one more.
static CLIENT_ENDPOINTS: Mutex<Vec<Endpoint>> = Mutex::new(Vec::new());

fn remember_client(ep: &Endpoint) {
    if let Ok(mut eps) = CLIENT_ENDPOINTS.lock() {
        eps.retain(|e| e.open_connections() > 0);
        eps.push(ep.clone());
    }
}

/// Before the process exits: gives every client connection closed so far up to `within` to
/// deliver its CONNECTION_CLOSE and drain. A closed connection's close frame goes out only when
/// the endpoint's driver runs, and a runtime that stops right after `close` drops that driver:
/// the peer then learns of the end only at its idle timeout (dst waited 30 s for a source that
/// had failed after the freeze). Connections still open are not waited for past `within`.
pub async fn flush_client_closes(within: Duration) {
    let eps: Vec<Endpoint> = match CLIENT_ENDPOINTS.lock() {
        Ok(mut eps) => std::mem::take(&mut *eps),
        Err(_) => return,
    };
    let idle = async {
        for ep in &eps {
            ep.wait_idle().await;
        }
    };
    let _ = tokio::time::timeout(within, idle).await;
}

/// Connects from `local_bind` (e.g. `0.0.0.0:0`) to the server at `remote` with default options,
/// returning once both sides have verified each other. The server's certificate must carry
/// `name` (see [`crate::keys::trust::dst_name`]).
pub async fn connect(
    local_bind: SocketAddr,
    remote: SocketAddr,
    name: &str,
    id: &Identity,
) -> Result<Connection, TransportError> {
    connect_with(local_bind, remote, name, id, &TransportOptions::default()).await
}

/// [`connect`] with explicit transport options.
pub async fn connect_with(
    local_bind: SocketAddr,
    remote: SocketAddr,
    name: &str,
    id: &Identity,
    opts: &TransportOptions,
) -> Result<Connection, TransportError> {
    let tls = QuicClientConfig::try_from(client_tls(id)?).map_err(|e| tls_error(id, e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(tls));
    config.transport_config(opts.transport_config()?);
    let ep = endpoint(local_bind, None, opts)?;
    remember_client(&ep);
    let idle = opts.idle_timeout;
    let conn = ep
        .connect_with(config, remote, name)
        .map_err(|source| TransportError::Connect { remote, source })?
        .await
        .map_err(
            |e| match explain(e, "client", remote, id, DURING_HANDSHAKE, idle) {
                TransportError::Refused(mut r) => {
                    r.dialled_name = name.to_string();
                    TransportError::Refused(r)
                }
                other => other,
            },
        )?;
    if !opts.deny.is_empty()
        && let Some(peer) = peer_identity(&conn)
        && opts.deny.denies(&peer.fingerprint)
    {
        conn.close(
            VarInt::from_u32(REFUSED_BY_POLICY),
            b"certificate revoked at this source",
        );
        return Err(TransportError::DeniedServer {
            peer: remote,
            who: peer.to_string(),
            fingerprint: peer.fingerprint.to_string(),
        });
    }
    let admitted = async {
        let mut s = conn.accept_uni().await?;
        match s.read_to_end(ADMITTED.len()).await {
            Ok(msg) => Ok(msg == ADMITTED),
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Err(e),
            Err(_) => Ok(false),
        }
    };
    let refused_by_policy = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(REFUSED_BY_POLICY) =>
        {
            Some(String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    };
    match tokio::time::timeout(opts.admit_timeout, admitted).await {
        Ok(Ok(true)) => Ok(conn),
        Ok(Err(e)) => match refused_by_policy(&e) {
            Some(reason) => Err(TransportError::RefusedByPolicy {
                peer: remote,
                reason,
            }),
            None => Err(explain(e, "client", remote, id, DURING_HANDSHAKE, idle)),
        },
        Ok(Ok(false)) | Err(_) => {
            conn.close(VarInt::from_u32(0), b"not admitted");
            Err(TransportError::NotAdmitted {
                peer: remote,
                after: opts.admit_timeout,
            })
        }
    }
}
