//! The WebRTC driver: one tokio task owns the node's UDP socket and the session table
//! ([`Sessions`], sans-IO: every peer's `str0m::Rtc`, routing, handover, reaping). It runs on
//! its own thread (a single-threaded runtime), so its many short wakes (a datagram, a media
//! tick) do not wake the node runtime's idle workers as well; the transcoders the table starts
//! run on the node's runtime.
//!
//! The driver is only the loop: it waits for datagrams (`recvmmsg`, GRO), commands from the HTTP
//! side (the channel behind [`Webrtc`]), the table's next deadline and the [`MEDIA_TICK`], hands
//! each to the table, and sends what the table wrote through the [`Egress`] (flushed after each
//! receive batch and each tick). What the sessions guarantee (routing by source address, reaping after [`CONNECT_TIMEOUT`](super::table::CONNECT_TIMEOUT), handover, keyframe
//! requests) is stated in [`super::table`].
//!
//! Guarantees:
//! - Bound to a wildcard address (`0.0.0.0`, `[::]`, the default), the socket offers every
//!   address of the host as a candidate, and every datagram to a peer leaves from the local
//!   address that peer's datagrams arrived at (read with `IP_PKTINFO` / `IPV6_PKTINFO`, set on
//!   send by [`Egress`]): a host with several addresses answers each peer from the one it
//!   reached. Received GRO batches are split into their datagrams (by the table).
//! - IPv4 peers of a dual-stack socket are handed to the table as plain IPv4 addresses.

use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, UdpSocketState};
use str0m::change::SdpOffer;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::WebrtcError;
use super::egress::Egress;
use super::table::{Play, Sessions};
use crate::media::{BroadcastConsumer, BroadcastProducer};
use crate::node::NodeContext;

/// How often viewers' hub consumers are read: frames come every ~12 ms (30 video + 50 audio a
/// second), so most ticks find one; a shorter tick costs CPU on idle passes over every viewer.
pub(crate) const MEDIA_TICK: Duration = Duration::from_millis(10);
/// Receive buffers read by one system call (`recvmmsg`).
const RECV_BATCH: usize = 8;
/// One receive buffer: a GRO batch of up to 64 datagrams fits (a single datagram needs 1,500).
const RECV_BUFFER: usize = 64 << 10;

enum Command {
    Whep {
        consumer: BroadcastConsumer,
        offer: SdpOffer,
        play: Play,
        reply: oneshot::Sender<Result<(u64, String), WebrtcError>>,
    },
    Whip {
        producer: BroadcastProducer,
        offer: SdpOffer,
        reply: oneshot::Sender<Result<(u64, String), WebrtcError>>,
    },
    Close {
        id: u64,
        publisher: bool,
        reply: oneshot::Sender<bool>,
    },
}

/// Handle to the node's WebRTC task.
pub(crate) struct Webrtc {
    tx: mpsc::Sender<Command>,
    local: SocketAddr,
}

impl Webrtc {
    /// Binds `addr` and starts the task. `public_ips` are the addresses handed to peers as
    /// candidates (with the bound port); empty means the bound address, or every address of
    /// this host (primary first) when bound to all interfaces.
    pub(crate) async fn start(
        addr: SocketAddr,
        public_ips: &[IpAddr],
        ctx: Arc<NodeContext>,
    ) -> std::io::Result<Arc<Self>> {
        let socket = UdpSocket::bind(addr).await?;
        let local = socket.local_addr()?;
        let mut ips = public_ips.to_vec();
        if ips.is_empty() {
            if local.ip().is_unspecified() {
                let dual = local.is_ipv6() && !socket2::SockRef::from(&socket).only_v6()?;
                ips = host_ips(local.is_ipv4() || dual, local.is_ipv6());
            } else {
                ips.push(local.ip());
            }
        }
        let candidates = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, local.port()))
            .collect();
        let (tx, rx) = mpsc::channel(256);
        let socket = socket.into_std()?;
        let node = tokio::runtime::Handle::current();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("castnode-webrtc".into())
            .spawn(move || {
                rt.block_on(async move {
                    match UdpSocket::from_std(socket) {
                        Ok(socket) => run(socket, local, candidates, rx, ctx, node).await,
                        Err(e) => warn!(error = %e, "WebRTC socket unusable; WebRTC is off"),
                    }
                })
            })?;
        Ok(Arc::new(Self { tx, local }))
    }

    /// The bound UDP address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Answers a WHEP offer for `consumer`'s broadcast: (session id, SDP answer).
    pub(crate) async fn whep(
        &self,
        consumer: BroadcastConsumer,
        offer: &str,
        play: Play,
    ) -> Result<(u64, String), WebrtcError> {
        let offer = parse_offer(offer)?;
        self.call(|reply| Command::Whep {
            consumer,
            offer,
            play,
            reply,
        })
        .await
    }

    /// Answers a WHIP offer that publishes into `producer`: (session id, SDP answer).
    pub(crate) async fn whip(
        &self,
        producer: BroadcastProducer,
        offer: &str,
    ) -> Result<(u64, String), WebrtcError> {
        let offer = parse_offer(offer)?;
        self.call(|reply| Command::Whip {
            producer,
            offer,
            reply,
        })
        .await
    }

    async fn call(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(u64, String), WebrtcError>>) -> Command,
    ) -> Result<(u64, String), WebrtcError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| WebrtcError::Stopped)?;
        rx.await.map_err(|_| WebrtcError::Stopped)?
    }

    /// Ends session `id` (a publisher's when `publisher`, else a viewer's); false when there
    /// is none.
    pub(crate) async fn close(&self, id: u64, publisher: bool) -> bool {
        let (reply, rx) = oneshot::channel();
        let close = Command::Close {
            id,
            publisher,
            reply,
        };
        if self.tx.send(close).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// Parses an SDP offer; the error keeps what a client can use of the parser's message.
fn parse_offer(offer: &str) -> Result<SdpOffer, WebrtcError> {
    SdpOffer::from_sdp_string(offer).map_err(|e| {
        // The parser's message names memory offsets; keep what a client can use.
        let text = e.to_string();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("PointerOffset") && !l.trim().is_empty())
            .collect();
        WebrtcError::BadOffer(lines.join("; "))
    })
}

/// This host's IPv4 address on its default route, found without sending anything (a UDP
/// connect only selects a route).
fn primary_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    s.local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// The addresses of this host's interfaces that are up (IPv4 when `v4`, IPv6 when `v6`; no
/// link-local IPv6, which needs a scope a candidate cannot carry): the primary address first,
/// loopback last.
fn host_ips(v4: bool, v6: bool) -> Vec<IpAddr> {
    use nix::net::if_::InterfaceFlags;
    let mut ips: Vec<IpAddr> = Vec::new();
    if v4 {
        ips.extend(primary_ip());
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs.filter(|a| a.flags.contains(InterfaceFlags::IFF_UP)) {
            let Some(addr) = a.address else { continue };
            let ip = if let Some(sin) = addr.as_sockaddr_in() {
                IpAddr::V4(sin.ip())
            } else if let Some(sin6) = addr.as_sockaddr_in6() {
                IpAddr::V6(sin6.ip())
            } else {
                continue;
            };
            let wanted = match ip {
                IpAddr::V4(_) => v4,
                IpAddr::V6(ip) => v6 && !ip.is_unicast_link_local() && !ip.is_loopback(),
            };
            if wanted && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if ips.is_empty() && v4 {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    // Loopback last: a browser on another host tries it in vain.
    ips.sort_by_key(|ip| ip.is_loopback());
    ips
}

/// `addr` with an IPv4-mapped IPv6 address written as IPv4 (a dual-stack socket reports IPv4
/// peers that way; SDP candidates and ICE name them as IPv4).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Reads up to [`RECV_BATCH`] datagrams (or GRO batches) in one system call: their number;
/// `metas` says where each came from, where it arrived and its length and stride.
async fn recv_batch(
    socket: &UdpSocket,
    state: &UdpSocketState,
    bufs: &mut [u8],
    metas: &mut [RecvMeta; RECV_BATCH],
) -> std::io::Result<usize> {
    loop {
        socket.readable().await?;
        let mut chunks = bufs.chunks_mut(RECV_BUFFER);
        // `bufs` holds RECV_BATCH buffers (see `run`): every slot gets one.
        let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        match socket.try_io(Interest::READABLE, || {
            state.recv(socket.into(), &mut slices, metas)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn run(
    socket: UdpSocket,
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    mut rx: mpsc::Receiver<Command>,
    ctx: Arc<NodeContext>,
    node: tokio::runtime::Handle,
) {
    let mut egress = Egress::new(socket);
    let Some(state) = egress.state.take() else {
        warn!("WebRTC socket refused its options (GRO, PKTINFO); WebRTC is off");
        return;
    };
    let state = &state;
    let mut table = Sessions::new(ctx, node, local, candidates, Instant::now());
    let mut bufs = vec![0u8; RECV_BATCH * RECV_BUFFER];
    let mut metas = [RecvMeta::default(); RECV_BATCH];
    let mut tick = tokio::time::interval(MEDIA_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        // Recomputed each turn: every branch below may have moved a session's deadline.
        let next_deadline = table.next_deadline(Instant::now());
        tokio::select! {
            r = recv_batch(&egress.socket, state, &mut bufs, &mut metas) => {
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        debug!(error = %e, "WebRTC receive failed");
                        continue;
                    }
                };
                let now = Instant::now();
                for (meta, buf) in metas[..n].iter().zip(bufs.chunks(RECV_BUFFER)) {
                    // Where the datagram arrived: what the answer leaves from, and the local
                    // candidate it names for ICE.
                    let local_ip = meta.dst_ip.map(|ip| ip.to_canonical());
                    let source = canonical(meta.addr);
                    // A GRO batch holds datagrams of `stride` bytes (the last may be shorter).
                    table.receive(&buf[..meta.len], meta.stride.max(1), source, local_ip, now, &mut egress);
                }
                egress.flush();
            }
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Whep { consumer, offer, play, reply }) => {
                    let _ = reply.send(table.whep(consumer, offer, play, &mut egress));
                }
                Some(Command::Whip { producer, offer, reply }) => {
                    let _ = reply.send(table.whip(producer, offer, &mut egress));
                }
                Some(Command::Close { id, publisher, reply }) => {
                    let _ = reply.send(table.close(id, publisher));
                }
            },
            _ = tokio::time::sleep_until(next_deadline.into()) => {
                table.timeout(Instant::now(), &mut egress);
            }
            _ = tick.tick() => table.tick(Instant::now(), &mut egress),
        }
        // Reap: disconnected, or never connected in time (at most every REAP_INTERVAL).
        table.reap(Instant::now());
    }
}
