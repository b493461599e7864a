//! The serving side of the cluster link: castnode's own driver around quinn-proto's state
//! machines. Each serving thread (a single-threaded tokio runtime; `--cluster-threads`, by
//! default [`crate::config::default_cluster_threads`]) owns one UDP socket on the listening address (SO_REUSEPORT: the kernel
//! keeps each peer on one socket), a QUIC endpoint and the connections that reach it; it reads
//! the hub for the subscriptions it serves and writes their frames straight into the
//! connections' streams. The first thread's runtime also runs [`super::link`]'s tasks (fetching
//! and publishing upstream on quinn), so on a relay a frame received from upstream reaches the
//! hub and is served on one thread, with no wake across threads.
//!
//! Why not quinn's async API, as the fetching side uses: a relay serving a broadcast to 100 edges
//! paid one task wake, one connection lock and one connection-driver wake per frame copy there,
//! and that cost twice what the QUIC state machine and the socket cost
//! (`benches/quic_driver.rs`, BENCHMARKS.md "Cluster link"). Here a broadcast's new frames wake
//! the driver once, every subscription of it is served in that pass, and each connection sends
//! what it has in one GSO batch.
//!
//! Guarantees (the same protocol as [`super::link`]'s client side; `docs/cluster-protocol.md`):
//! - A connection is used only after the peer proved the cluster token over the TLS exporter
//!   (HELLO → HELLO_OK) within [`HELLO_TIMEOUT`]; a peer that fails is told why (ERROR) and
//!   closed, nothing else noticed.
//! - Every SUBSCRIBE becomes one hub consumer (fetched from upstream first on a relay, in a task
//!   beside this driver); each group of the broadcast goes on its own unidirectional stream,
//!   newer groups at higher priority. When a group starts, the group two back is reset if the peer has not
//!   received all of it yet; a consumer the hub makes skip resets its current group. A stream
//!   that is blocked (flow control, congestion) holds its subscription's reading until it is
//!   writable again, so the hub (not this driver) decides what a slow peer skips.
//! - Groups are the hub's: a group stream starts at each entry the hub marked
//!   ([`crate::media::Entry::group_start`]), through the one sending policy ([`GroupCursor`])
//!   that publishing upstream shares.
//! - A frame's header is encoded once per hub entry ([`MemoSlot::Cluster`]); copies share it and
//!   the payload by reference count.
//! - PUBLISH makes the peer's broadcast a local one: its groups are read in order, a group that
//!   stalls for [`GROUP_STALL`] while a newer one waits is dropped, and frames go into the hub
//!   with their origin ingest times.
//! - Malformed control messages or group headers close only that connection; nothing here
//!   panics on a peer's input.

use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event,
    ServerConfig, StreamEvent, StreamId, VarInt, WriteError,
};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::link::{GROUP_STALL, HELLO_TIMEOUT, Link, Sink, source_tracks};
use super::wire::{
    self, ControlDecoder, ControlMessage, ErrorCode, GroupDecoder, GroupEvent, GroupHeader,
    GroupSeq, ResetCode, Side, SubscriptionId,
};
use crate::media::hub::Broadcast;
use crate::media::{
    BroadcastConsumer, ConsumerKind, Entry, Item, MemoSlot, PublishError, ReadOutcome, TrackId,
};

/// Datagrams read per receive call (each may be a GRO batch).
const RECV_BATCH: usize = 32;
/// Receive calls in one pass at most, so that a flood of datagrams does not hold up sending.
const RECV_PASSES: usize = 16;
/// Bytes of one receive buffer (a GRO batch of up to 64 KiB).
const RECV_BUF: usize = 64 * 1024;
/// Datagrams in one GSO send at most: 10 full-size QUIC packets stay under the 64 KiB a UDP
/// send takes (the kernel offers up to 64 segments; a bigger batch fails whole). quinn uses 10.
const MAX_SEGMENTS: usize = 10;
/// Entries read from the hub at once for one subscription.
const READ_MAX: usize = 256;
/// How long an ERROR is given to leave before its connection is closed.
const ERROR_LINGER: Duration = Duration::from_millis(50);

/// The encoding of `e` on a group stream: a frame header (its payload follows) or a whole config
/// item; `None` for a rendition track (each node makes its own) or what cannot be encoded.
/// Memoized in the entry ([`MemoSlot::Cluster`]), shared by every subscription.
pub fn encoded(e: &Entry) -> &Option<Bytes> {
    let ingest = e.ingest_us.max(0) as u64;
    e.memo(MemoSlot::Cluster, |item| {
        let mut buf = BytesMut::with_capacity(40);
        let ok = match item {
            Item::Config { track, info } if track.is_source() => {
                wire::encode_config_item(*track, info, &mut buf).is_ok()
            }
            Item::Frame { track, frame } if track.is_source() => {
                wire::encode_frame_header(*track, frame, ingest, &mut buf).is_ok()
            }
            _ => false,
        };
        ok.then(|| buf.freeze())
    })
}

/// A group stream's opening: its header, then the current config of each source track (a config
/// change inside a dropped group is not lost).
pub fn group_opening(id: SubscriptionId, seq: u64, bc: &Broadcast) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(64);
    let header = GroupHeader {
        subscription: id,
        sequence: GroupSeq(seq),
    };
    wire::encode_group_header(&header, &mut buf).ok()?;
    for track in TrackId::sources() {
        if let Some(info) = bc.track(track) {
            let _ = wire::encode_config_item(track, &info, &mut buf);
        }
    }
    Some(buf.freeze())
}

/// Where a sender of one subscription's groups stands, and the policy every sender of groups
/// follows (serving here, publishing upstream in [`super::link`]), over its kind of stream
/// handle `S`: which entries go out, which streams are finished or reset. Groups start where the
/// hub marked them ([`Entry::group_start`]): the wire's groups are the hub's.
pub struct GroupCursor<S> {
    seq: u64,
    current: Option<S>,
    previous: Option<S>,
}

/// What to do with a hub entry.
pub enum Step {
    /// Nothing: not sent on the link, or the middle of a group this sender has not started.
    Skip,
    /// Write this (an encoded header or config item, then its payload) on the current group.
    Write(Bytes, Bytes),
    /// A frame that starts a group: open a stream, write the group's opening, hand the stream
    /// to [`GroupCursor::begin`], then write this.
    Start(Bytes, Bytes),
}

/// What becomes of a group stream that a new group replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retire {
    /// The group two back: dropped if still unsent (reset with `GroupDropped`).
    Reset,
    /// The group before: it may finish behind the new one.
    Finish,
}

impl<S> Default for GroupCursor<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> GroupCursor<S> {
    /// A sender of a subscription's groups, before its first group.
    pub fn new() -> Self {
        Self {
            seq: 0,
            current: None,
            previous: None,
        }
    }

    /// What to do with `e`, the next entry read from the hub.
    pub fn step(&mut self, e: &Entry) -> Step {
        let Some(encoding) = encoded(e).clone() else {
            return Step::Skip;
        };
        match &e.item {
            Item::Config { .. } => {
                if self.current.is_none() {
                    // The next group's opening carries it.
                    return Step::Skip;
                }
                Step::Write(encoding, Bytes::new())
            }
            Item::Frame { frame, .. } => {
                if e.group_start {
                    Step::Start(encoding, frame.payload.clone())
                } else if self.current.is_none() {
                    // Mid-group (a config came first, or after a skip): wait for the next start.
                    Step::Skip
                } else {
                    Step::Write(encoding, frame.payload.clone())
                }
            }
        }
    }

    /// The sequence number the next group gets.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The group of [`Self::seq`] began on `stream`; the streams it replaces go through
    /// `retire` (the one two back to be reset, the last one to be finished).
    pub fn begin(&mut self, stream: S, mut retire: impl FnMut(&mut S, Retire)) {
        if let Some(mut old) = self.previous.take() {
            retire(&mut old, Retire::Reset);
        }
        if let Some(mut cur) = self.current.take() {
            retire(&mut cur, Retire::Finish);
            self.previous = Some(cur);
        }
        self.current = Some(stream);
        self.seq += 1;
    }

    /// The current group's stream.
    pub fn current(&mut self) -> Option<&mut S> {
        self.current.as_mut()
    }

    /// Gives up the current group (it was reset, stopped by the peer, skipped, or the
    /// broadcast ended): the caller resets or finishes what is returned.
    pub fn take_current(&mut self) -> Option<S> {
        self.current.take()
    }

    /// Every stream still held (the current and the previous group), for a sender that stops.
    pub fn take_all(&mut self) -> impl Iterator<Item = S> {
        [self.current.take(), self.previous.take()]
            .into_iter()
            .flatten()
    }
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

/// Socket buffers asked for, each way (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`).
pub(super) const SOCKET_BUFFER: usize = 8 << 20;

/// Binds `threads` serving sockets to `addr` (SO_REUSEPORT: the kernel spreads peers over them
/// by address, and keeps each peer on one); a driver per socket starts with [`spawn`].
pub fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    if addr.port() != 0 {
        // A port another process serves on (even a castnode with SO_REUSEPORT) is refused, as
        // without SO_REUSEPORT, rather than shared.
        drop(std::net::UdpSocket::bind(addr)?);
    }
    let mut sockets: Vec<std::net::UdpSocket> = Vec::with_capacity(threads);
    for _ in 0..threads.max(1) {
        // Port 0 is chosen by the first bind; the others share it.
        let at = match sockets.first() {
            Some(s) => s.local_addr()?,
            None => addr,
        };
        let s = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        // Room for a burst: many connections' copies of a keyframe.
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
        s.bind(&at.into())?;
        sockets.push(s.into());
    }
    Ok(sockets)
}

/// Starts a driver for `socket` on its own thread. It serves for as long as the process runs
/// (it keeps `link` alive).
pub fn spawn(
    link: Arc<Link>,
    socket: std::net::UdpSocket,
    config: Arc<ServerConfig>,
    n: usize,
    rt: tokio::runtime::Runtime,
) -> std::io::Result<()> {
    let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
    std::thread::Builder::new()
        .name(format!("cluster-serve-{n}"))
        .spawn(move || {
            rt.block_on(async move {
                let socket = match tokio::net::UdpSocket::from_std(socket) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "cluster link: cannot register the serving socket");
                        return;
                    }
                };
                Driver::new(link, socket, udp, config).run().await;
            });
        })?;
    Ok(())
}

/// The deadlines of many connections in one heap. An entry is stale, and skipped, when its
/// connection's deadline moved after it was pushed: callers keep each connection's current
/// deadline and pass a lookup of it.
#[derive(Default)]
pub struct Timers(BinaryHeap<Reverse<(Instant, usize)>>);

impl Timers {
    /// Connection `i`'s deadline is now `new`; `current` holds its last one.
    pub fn set(&mut self, i: usize, current: &mut Option<Instant>, new: Option<Instant>) {
        if new != *current {
            *current = new;
            if let Some(t) = new {
                self.0.push(Reverse((t, i)));
            }
        }
    }

    /// Appends to `due` the connections whose deadline passed by `now`.
    pub fn pop_due(
        &mut self,
        now: Instant,
        current: impl Fn(usize) -> Option<Instant>,
        due: &mut Vec<usize>,
    ) {
        while let Some(&Reverse((t, i))) = self.0.peek() {
            if t > now {
                break;
            }
            self.0.pop();
            if current(i) == Some(t) {
                due.push(i);
            }
        }
    }

    /// The earliest deadline still current.
    pub fn next(&mut self, current: impl Fn(usize) -> Option<Instant>) -> Option<Instant> {
        loop {
            let &Reverse((t, i)) = self.0.peek()?;
            if current(i) == Some(t) {
                return Some(t);
            }
            self.0.pop();
        }
    }
}

/// A subscription's answer from the node runtime (a relay fetching from upstream first).
struct Answer {
    conn: usize,
    generation: u64,
    id: SubscriptionId,
    broadcast: String,
    consumer: Option<BroadcastConsumer>,
}

/// Where a connection stands.
enum Phase {
    /// Waiting for the control stream and HELLO until this.
    Hello(Instant),
    /// HELLO done: the peer's node id.
    Ready(String),
    /// Refused or failed: closed at this instant (after its ERROR left).
    Closing(Instant, ErrorCode, String),
    /// Closed; waiting to drain.
    Closed,
}

/// A subscription this node serves.
struct Flow {
    id: SubscriptionId,
    consumer: BroadcastConsumer,
    /// The broadcast's key in [`Driver::watched`].
    key: usize,
    groups: GroupCursor<StreamId>,
    /// Entries read from the hub, not written yet.
    queue: VecDeque<Arc<Entry>>,
    /// What is left of the item being written (group opening, header, payload).
    pending: [Bytes; 3],
    /// Waiting for its stream to be writable (or a stream to be available).
    blocked: bool,
}

/// A broadcast a peer publishes here.
struct Publication {
    broadcast: String,
    sink: Sink,
    /// Group streams whose header was read, by sequence, waiting their turn.
    waiting: BTreeMap<u64, StreamId>,
    current: Option<(u64, StreamId)>,
    done_below: u64,
    /// The last time the current group made progress.
    progress: Instant,
    /// The first group: a burst from up to a GOP back, whose ages say nothing of the link.
    first_group: Option<u64>,
}

/// A group stream the peer opened.
struct InGroup {
    decoder: GroupDecoder,
    buf: BytesMut,
    /// The publication and sequence, once the header was read.
    route: Option<(u64, u64)>,
}

/// One connection from another node.
struct Conn {
    conn: Connection,
    generation: u64,
    remote: SocketAddr,
    phase: Phase,
    ctl: Option<StreamId>,
    ctl_in: BytesMut,
    ctl_decoder: ControlDecoder,
    ctl_out: BytesMut,
    flows: HashMap<u64, Flow>,
    /// SUBSCRIBEs being answered on the node runtime.
    asked: HashSet<u64>,
    pubs: HashMap<u64, Publication>,
    groups: HashMap<StreamId, InGroup>,
    dirty: bool,
    /// The deadline last put in the driver's heap.
    timer: Option<Instant>,
}

/// A broadcast some flows read, and its watcher task.
struct Watched {
    flows: Vec<(usize, u64)>,
    task: tokio::task::AbortHandle,
}

struct Driver {
    link: Arc<Link>,
    socket: tokio::net::UdpSocket,
    udp: quinn_udp::UdpSocketState,
    endpoint: Endpoint,
    conns: Vec<Option<Conn>>,
    generations: u64,
    dirty: Vec<usize>,
    /// The dirty list being served (kept for its capacity).
    listed: Vec<usize>,
    timers: Timers,
    /// Scratch: connections whose timer fired.
    due: Vec<usize>,
    watched: HashMap<usize, Watched>,
    wake_tx: mpsc::UnboundedSender<usize>,
    wakes: mpsc::UnboundedReceiver<usize>,
    answer_tx: mpsc::UnboundedSender<Answer>,
    answers: mpsc::UnboundedReceiver<Answer>,
    out: Vec<u8>,
    recv: Box<[Vec<u8>; RECV_BATCH]>,
    meta: [quinn_udp::RecvMeta; RECV_BATCH],
    entries: Vec<Arc<Entry>>,
    /// Flows that ended in the current pass: (connection, flow id).
    ended: Vec<(usize, u64)>,
    /// Scratch: a connection's blocked flows (kept for its capacity).
    unblocked: Vec<u64>,
}

impl Driver {
    fn new(
        link: Arc<Link>,
        socket: tokio::net::UdpSocket,
        udp: quinn_udp::UdpSocketState,
        config: Arc<ServerConfig>,
    ) -> Self {
        let (wake_tx, wakes) = mpsc::unbounded_channel();
        let (answer_tx, answers) = mpsc::unbounded_channel();
        Self {
            link,
            socket,
            udp,
            endpoint: Endpoint::new(
                Arc::new(EndpointConfig::default()),
                Some(config),
                true,
                None,
            ),
            conns: Vec::new(),
            generations: 0,
            dirty: Vec::new(),
            listed: Vec::new(),
            timers: Timers::default(),
            due: Vec::new(),
            watched: HashMap::new(),
            wake_tx,
            wakes,
            answer_tx,
            answers,
            out: Vec::with_capacity(64 * 1024),
            recv: Box::new(std::array::from_fn(|_| vec![0u8; RECV_BUF])),
            meta: [quinn_udp::RecvMeta::default(); RECV_BATCH],
            entries: Vec::with_capacity(READ_MAX),
            ended: Vec::new(),
            unblocked: Vec::new(),
        }
    }

    async fn run(mut self) {
        let mut sleep = pin!(tokio::time::sleep(Duration::from_secs(1)));
        let mut armed: Option<Instant> = None;
        loop {
            let next = self.next_timer();
            if next != armed || sleep.is_elapsed() {
                armed = next;
                let at = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                sleep.as_mut().reset(at.into());
            }
            // Media and answers first: they come at most once per broadcast change or request,
            // while datagrams may keep coming (a pass reads at most RECV_PASSES batches).
            tokio::select! {
                biased;
                Some(key) = self.wakes.recv() => {
                    self.pump_broadcast(key).await;
                    while let Ok(key) = self.wakes.try_recv() {
                        self.pump_broadcast(key).await;
                    }
                }
                Some(a) = self.answers.recv() => self.answered(a),
                r = self.socket.readable() => {
                    if r.is_ok() {
                        self.receive();
                    }
                }
                () = &mut sleep => {}
            }
            self.service().await;
        }
    }

    // ---- socket ----------------------------------------------------------------------------

    /// Reads the datagrams waiting (at most [`RECV_PASSES`] batches) and feeds them to the
    /// endpoint and its connections.
    fn receive(&mut self) {
        for _ in 0..RECV_PASSES {
            // On the stack: no allocation per read.
            let mut bufs = self.recv.each_mut().map(|b| IoSliceMut::new(b));
            let (socket, udp, meta) = (&self.socket, &self.udp, &mut self.meta);
            let n = match socket.try_io(Interest::READABLE, || {
                udp.recv(socket.into(), &mut bufs, meta)
            }) {
                Ok(n) => n,
                Err(_) => return,
            };
            let now = Instant::now();
            for i in 0..n {
                let meta = self.meta[i];
                let stride = meta.stride.max(1);
                // One allocation per GRO batch; its datagrams are views of it.
                let mut data = BytesMut::from(&self.recv[i][..meta.len]);
                while !data.is_empty() {
                    let d = data.split_to(stride.min(data.len()));
                    self.datagram(now, meta.addr, d);
                }
            }
        }
    }

    fn datagram(&mut self, now: Instant, from: SocketAddr, data: BytesMut) {
        self.out.clear();
        match self
            .endpoint
            .handle(now, from, None, None, data, &mut self.out)
        {
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.out.clear();
                match self.endpoint.accept(incoming, now, &mut self.out, None) {
                    Ok((ch, conn)) => self.insert(ch, conn, now),
                    Err(e) => {
                        debug!(remote = %from, error = %e.cause, "cluster connection refused");
                        if let Some(t) = e.response {
                            self.send_response(&t);
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(Some(c)) = self.conns.get_mut(ch.0) {
                    c.conn.handle_event(ev);
                    mark(&mut self.dirty, ch.0, c);
                }
            }
            Some(DatagramEvent::Response(t)) => self.send_response(&t),
            None => {}
        }
    }

    /// An endpoint's own answer (version negotiation, stateless reset, refusal): best effort.
    fn send_response(&mut self, t: &quinn_proto::Transmit) {
        let transmit = udp_transmit(t, &self.out);
        let (socket, udp) = (&self.socket, &self.udp);
        let _ = socket.try_io(Interest::WRITABLE, || udp.send(socket.into(), &transmit));
    }

    fn insert(&mut self, ch: ConnectionHandle, conn: Connection, now: Instant) {
        if self.conns.len() <= ch.0 {
            self.conns.resize_with(ch.0 + 1, || None);
        }
        self.generations += 1;
        let remote = conn.remote_address();
        self.link.stats.peers_in.fetch_add(1, Relaxed);
        self.conns[ch.0] = Some(Conn {
            conn,
            generation: self.generations,
            remote,
            phase: Phase::Hello(now + HELLO_TIMEOUT),
            ctl: None,
            ctl_in: BytesMut::new(),
            ctl_decoder: ControlDecoder::new(),
            ctl_out: BytesMut::new(),
            flows: HashMap::new(),
            asked: HashSet::new(),
            pubs: HashMap::new(),
            groups: HashMap::new(),
            dirty: true,
            timer: None,
        });
        self.dirty.push(ch.0);
    }

    // ---- the service pass ------------------------------------------------------------------

    /// The earliest deadline of any connection.
    fn next_timer(&mut self) -> Option<Instant> {
        let conns = &self.conns;
        self.timers.next(|i| conn_timer(conns, i))
    }

    /// Due timers, then every connection touched since the last pass: its events, its
    /// datagrams out, its next deadline.
    async fn service(&mut self) {
        let now = Instant::now();
        let conns = &self.conns;
        self.timers
            .pop_due(now, |i| conn_timer(conns, i), &mut self.due);
        for i in self.due.drain(..) {
            if let Some(Some(c)) = self.conns.get_mut(i) {
                mark(&mut self.dirty, i, c);
            }
        }
        // Serving a connection may make it dirty again (an answer written after its transmit):
        // one more round takes those.
        // The two lists swap, so neither is allocated again per pass.
        let mut dirty = std::mem::take(&mut self.listed);
        for _ in 0..2 {
            dirty.clear();
            std::mem::swap(&mut dirty, &mut self.dirty);
            if dirty.is_empty() {
                break;
            }
            for &i in &dirty {
                if let Some(Some(c)) = self.conns.get_mut(i) {
                    c.dirty = false;
                } else {
                    continue;
                }
                self.serve_conn(i, now);
                self.transmit(i).await;
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    continue;
                };
                let timer = [c.conn.poll_timeout(), app_deadline(c)]
                    .into_iter()
                    .flatten()
                    .min();
                self.timers.set(i, &mut c.timer, timer);
                if c.conn.is_drained() {
                    self.remove(i);
                }
            }
        }
        dirty.clear();
        self.listed = dirty;
    }

    /// Sends what connection `i` has to send, in GSO batches (paced as of now: a pass over
    /// many connections takes a while).
    async fn transmit(&mut self, i: usize) {
        let max = self.udp.max_gso_segments().min(MAX_SEGMENTS);
        let now = Instant::now();
        loop {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return;
            };
            self.out.clear();
            let Some(t) = c.conn.poll_transmit(now, max, &mut self.out) else {
                return;
            };
            let transmit = udp_transmit(&t, &self.out);
            loop {
                let (socket, udp) = (&self.socket, &self.udp);
                match socket.try_io(Interest::WRITABLE, || udp.send(socket.into(), &transmit)) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Connection `i`'s timers and events.
    fn serve_conn(&mut self, i: usize, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if c.conn.poll_timeout().is_some_and(|t| t <= now) {
            c.conn.handle_timeout(now);
        }
        match &c.phase {
            Phase::Hello(deadline) if *deadline <= now => {
                self.refuse(i, ErrorCode::ProtocolViolation, "no HELLO".into());
            }
            Phase::Closing(at, ..) if *at <= now => {
                if let Phase::Closing(_, code, why) = std::mem::replace(&mut c.phase, Phase::Closed)
                {
                    c.conn
                        .close(now, varint(code.code()), Bytes::from(why.into_bytes()));
                }
            }
            _ => {}
        }
        self.stalls(i, now);
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        while let Some(ev) = c.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ConnectionHandle(i), ev) {
                c.conn.handle_event(back);
            }
        }
        let mut blocked_ready = false;
        loop {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return;
            };
            let Some(ev) = c.conn.poll() else { break };
            match ev {
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    let mut control = false;
                    while let Some(id) = c.conn.streams().accept(Dir::Bi) {
                        if c.ctl.is_none() {
                            // Answers go before any group's media.
                            let _ = c.conn.send_stream(id).set_priority(i32::MAX);
                            c.ctl = Some(id);
                            control = true;
                        } else {
                            let _ = c.conn.recv_stream(id).stop(varint(0));
                        }
                    }
                    if control {
                        self.read_control(i, now);
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    let mut opened = Vec::new();
                    while let Some(id) = c.conn.streams().accept(Dir::Uni) {
                        c.groups.insert(
                            id,
                            InGroup {
                                decoder: GroupDecoder::new(),
                                buf: BytesMut::new(),
                                route: None,
                            },
                        );
                        opened.push(id);
                    }
                    for id in opened {
                        self.read_group(i, id, now);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    if c.ctl == Some(id) {
                        self.read_control(i, now);
                    } else {
                        self.read_group(i, id, now);
                    }
                }
                Event::Stream(StreamEvent::Writable { .. } | StreamEvent::Available { .. }) => {
                    blocked_ready = true;
                }
                Event::Stream(StreamEvent::Finished { .. } | StreamEvent::Stopped { .. }) => {}
                Event::ConnectionLost { reason } => {
                    if let Phase::Ready(peer) = &c.phase {
                        info!(remote = %c.remote, %peer, %reason, "cluster peer left");
                    }
                    self.end_conn(i);
                }
                Event::HandshakeDataReady
                | Event::Connected
                | Event::DatagramReceived
                | Event::DatagramsUnblocked => {}
            }
        }
        if blocked_ready {
            self.flush_control(i);
            self.pump_conn(i);
        }
    }

    // ---- control ---------------------------------------------------------------------------

    fn read_control(&mut self, i: usize, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(id) = c.ctl else { return };
        let mut ended = false;
        let mut failed = None;
        if let Ok(mut chunks) = c.conn.recv_stream(id).read(true) {
            loop {
                match chunks.next(64 << 10) {
                    Ok(Some(chunk)) => {
                        if c.ctl_in.len() + chunk.bytes.len() > 2 * wire::MAX_CONTROL_MESSAGE {
                            failed = Some("control stream overflow".to_owned());
                            break;
                        }
                        c.ctl_in.extend_from_slice(&chunk.bytes);
                    }
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(quinn_proto::ReadError::Reset(code)) => {
                        failed = Some(format!("control stream reset ({code})"));
                        break;
                    }
                }
            }
            let _ = chunks.finalize();
        }
        loop {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return;
            };
            if matches!(c.phase, Phase::Closing(..) | Phase::Closed) {
                return;
            }
            match c.ctl_decoder.decode(&mut c.ctl_in) {
                Ok(Some(m)) => self.control(i, m, now),
                Ok(None) => break,
                Err(e) => {
                    let why = if matches!(c.phase, Phase::Hello(_)) {
                        format!("malformed HELLO: {e}")
                    } else {
                        warn!(remote = %c.remote, error = %e, "malformed cluster control message; closing the connection");
                        e.to_string()
                    };
                    self.refuse(i, ErrorCode::ProtocolViolation, why);
                    return;
                }
            }
        }
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if let Some(why) = failed {
            info!(remote = %c.remote, error = %why, "cluster peer's control stream failed");
            self.close(i, wire::CLOSE_NO_ERROR, &why);
        } else if ended {
            if let Phase::Hello(_) = c.phase {
                self.refuse(i, ErrorCode::ProtocolViolation, "no HELLO".into());
            } else {
                self.close(i, wire::CLOSE_NO_ERROR, "control stream ended");
            }
        }
    }

    fn control(&mut self, i: usize, msg: ControlMessage, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if let Phase::Hello(_) = c.phase {
            self.hello(i, msg);
            return;
        }
        let peer = match &c.phase {
            Phase::Ready(p) => p.clone(),
            _ => return,
        };
        match msg {
            ControlMessage::Subscribe { id, broadcast } => {
                self.drop_flow(i, id.0);
                let hub = &self.link.hub();
                if let Some(consumer) = hub.subscribe_as(&broadcast, ConsumerKind::Node) {
                    self.start_flow(i, id, &broadcast, consumer);
                } else if self.link.has_upstreams() {
                    // Fetching from upstream may take a moment: other requests of this peer go
                    // on meanwhile.
                    let Some(Some(c)) = self.conns.get_mut(i) else {
                        return;
                    };
                    c.asked.insert(id.0);
                    let (link, tx, generation) =
                        (self.link.clone(), self.answer_tx.clone(), c.generation);
                    self.link.runtime().spawn(async move {
                        let consumer = link.subscribe(&broadcast).await.map(|mut c| {
                            c.set_kind(ConsumerKind::Node);
                            c
                        });
                        let _ = tx.send(Answer {
                            conn: i,
                            generation,
                            id,
                            broadcast,
                            consumer,
                        });
                    });
                } else {
                    self.not_found(i, id, &broadcast);
                }
            }
            ControlMessage::Unsubscribe { id } => {
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    return;
                };
                c.asked.remove(&id.0);
                self.drop_flow(i, id.0);
            }
            ControlMessage::Publish {
                id,
                broadcast,
                tracks,
                metadata,
            } => {
                let mut producer = match self.link.hub().publish(&broadcast, now) {
                    Ok(p) => p,
                    Err(e) => {
                        info!(%peer, %broadcast, "PUBLISH refused: {e}");
                        self.send_control(
                            i,
                            &ControlMessage::PublishError {
                                id,
                                code: match e {
                                    PublishError::AlreadyLive(_) => ErrorCode::AlreadyLive,
                                    PublishError::BadName(_) => ErrorCode::ProtocolViolation,
                                },
                                reason: e.to_string(),
                            },
                        );
                        return;
                    }
                };
                for (t, info) in tracks {
                    producer.set_track(t, info);
                }
                producer.set_metadata(metadata);
                info!(%peer, %broadcast, id = id.0, "broadcast published over the cluster link");
                self.link.stats.publications_in.fetch_add(1, Relaxed);
                let publication = Publication {
                    broadcast,
                    sink: Sink::new(Some(producer)),
                    waiting: BTreeMap::new(),
                    current: None,
                    done_below: 0,
                    progress: now,
                    first_group: None,
                };
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    return;
                };
                if let Some(old) = c.pubs.insert(id.0, publication) {
                    self.publication_ended(old);
                }
                self.send_control(i, &ControlMessage::PublishOk { id });
                // Group streams that overtook the PUBLISH.
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    return;
                };
                let early: Vec<StreamId> = c
                    .groups
                    .iter()
                    .filter(|(_, g)| g.route.is_some_and(|(p, _)| p == id.0))
                    .map(|(s, _)| *s)
                    .collect();
                for s in early {
                    self.read_group(i, s, now);
                }
            }
            ControlMessage::Ended { id } => {
                let Some(Some(c)) = self.conns.get_mut(i) else {
                    return;
                };
                if let Some(p) = c.pubs.remove(&id.0) {
                    self.publication_ended(p);
                }
            }
            ControlMessage::GoAway
            | ControlMessage::Announce { .. }
            | ControlMessage::Unannounce { .. } => {}
            other => {
                let why = format!("{} is not a request this node takes", other.name());
                warn!(%peer, reason = %why, "cluster peer sent a wrong request; closing the connection");
                self.refuse(i, ErrorCode::ProtocolViolation, why);
            }
        }
    }

    fn hello(&mut self, i: usize, msg: ControlMessage) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let mut exporter = [0u8; wire::EXPORTER_LEN];
        let have_exporter = c
            .conn
            .crypto_session()
            .export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
            .is_ok();
        let ControlMessage::Hello {
            version,
            token_proof,
            node_id,
            role,
        } = msg
        else {
            let why = format!("expected HELLO, got {}", msg.name());
            self.refuse(i, ErrorCode::ProtocolViolation, why);
            return;
        };
        if version != wire::VERSION {
            let why = format!("wire version {version} is not {}", wire::VERSION);
            self.refuse(i, ErrorCode::UnsupportedVersion, why);
            return;
        }
        let token = self.link.token();
        if !have_exporter || !wire::verify_token_proof(token, Side::Client, &exporter, &token_proof)
        {
            self.refuse(i, ErrorCode::Unauthorized, "wrong cluster token".into());
            return;
        }
        info!(remote = %c.remote, peer = %node_id, %role, "cluster peer connected");
        c.phase = Phase::Ready(node_id);
        let answer = ControlMessage::HelloOk {
            node_id: self.link.node_id().to_owned(),
            token_proof: wire::token_proof(token, Side::Server, &exporter),
        };
        self.send_control(i, &answer);
    }

    /// Refuses (or gives up on) a peer: ERROR, then close after [`ERROR_LINGER`].
    fn refuse(&mut self, i: usize, code: ErrorCode, why: String) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if matches!(c.phase, Phase::Closing(..) | Phase::Closed) {
            return;
        }
        if let Phase::Hello(_) = c.phase {
            self.link.stats.refused.fetch_add(1, Relaxed);
            warn!(remote = %c.remote, reason = %why, "cluster peer refused");
        }
        let msg = ControlMessage::Error {
            code,
            reason: why.clone(),
        };
        self.send_control(i, &msg);
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if let Some(s) = c.ctl {
            let _ = c.conn.send_stream(s).finish();
        }
        c.phase = Phase::Closing(Instant::now() + ERROR_LINGER, code, why);
        self.end_conn(i);
        if let Some(Some(c)) = self.conns.get_mut(i) {
            mark(&mut self.dirty, i, c);
        }
    }

    fn close(&mut self, i: usize, code: u64, why: &str) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        c.conn.close(
            Instant::now(),
            varint(code),
            Bytes::copy_from_slice(why.as_bytes()),
        );
        c.phase = Phase::Closed;
        self.end_conn(i);
    }

    fn send_control(&mut self, i: usize, msg: &ControlMessage) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if let Err(e) = wire::encode_control(msg, &mut c.ctl_out) {
            warn!(error = %e, message = msg.name(), "cluster control message not encodable");
            return;
        }
        self.flush_control(i);
    }

    fn flush_control(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(s) = c.ctl else { return };
        if c.ctl_out.is_empty() {
            return;
        }
        if let Ok(n) = c.conn.send_stream(s).write(&c.ctl_out) {
            let _ = c.ctl_out.split_to(n);
        }
        mark(&mut self.dirty, i, c);
    }

    fn not_found(&mut self, i: usize, id: SubscriptionId, broadcast: &str) {
        debug!(%broadcast, "SUBSCRIBE: not found");
        let msg = ControlMessage::SubscribeError {
            id,
            code: ErrorCode::NotFound,
            reason: format!("broadcast {broadcast} is not live here"),
        };
        self.send_control(i, &msg);
    }

    fn answered(&mut self, a: Answer) {
        let Some(Some(c)) = self.conns.get_mut(a.conn) else {
            return;
        };
        if c.generation != a.generation || !c.asked.remove(&a.id.0) {
            return;
        }
        match a.consumer {
            Some(consumer) => self.start_flow(a.conn, a.id, &a.broadcast, consumer),
            None => self.not_found(a.conn, a.id, &a.broadcast),
        }
    }

    // ---- serving subscriptions -------------------------------------------------------------

    fn start_flow(
        &mut self,
        i: usize,
        id: SubscriptionId,
        broadcast: &str,
        consumer: BroadcastConsumer,
    ) {
        let (tracks, metadata) = source_tracks(&consumer);
        self.send_control(
            i,
            &ControlMessage::SubscribeOk {
                id,
                tracks,
                metadata,
            },
        );
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if let Phase::Ready(peer) = &c.phase {
            info!(%peer, %broadcast, id = id.0, "cluster subscription from downstream");
        }
        let bc = consumer.broadcast().clone();
        let key = Arc::as_ptr(&bc) as usize;
        let flow = Flow {
            id,
            groups: GroupCursor::new(),
            consumer,
            key,
            queue: VecDeque::new(),
            pending: Default::default(),
            blocked: false,
        };
        c.flows.insert(id.0, flow);
        self.link.stats.subscriptions_down.fetch_add(1, Relaxed);
        match self.watched.entry(key) {
            MapEntry::Occupied(mut w) => w.get_mut().flows.push((i, id.0)),
            MapEntry::Vacant(v) => {
                let mut rx = bc.watch();
                let tx = self.wake_tx.clone();
                let task = tokio::spawn(async move {
                    while rx.changed().await.is_ok() {
                        if tx.send(key).is_err() {
                            return;
                        }
                    }
                });
                v.insert(Watched {
                    flows: vec![(i, id.0)],
                    task: task.abort_handle(),
                });
            }
        }
        self.pump(i, id.0);
        self.reap_ended();
    }

    /// Removes a flow (UNSUBSCRIBE, a replacing SUBSCRIBE, its connection gone): its current
    /// group is reset.
    fn drop_flow(&mut self, i: usize, id: u64) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(mut flow) = c.flows.remove(&id) else {
            return;
        };
        for s in flow.groups.take_all() {
            let _ = c
                .conn
                .send_stream(s)
                .reset(varint(ResetCode::Cancelled.code()));
        }
        mark(&mut self.dirty, i, c);
        self.forget_flow(i, &flow);
    }

    fn forget_flow(&mut self, i: usize, flow: &Flow) {
        self.link.stats.subscriptions_down.fetch_sub(1, Relaxed);
        if let MapEntry::Occupied(mut w) = self.watched.entry(flow.key) {
            w.get_mut().flows.retain(|&f| f != (i, flow.id.0));
            if w.get().flows.is_empty() {
                w.remove().task.abort();
            }
        }
    }

    /// Serves every flow of broadcast `key` that is not blocked.
    /// Each connection sends right after its flow was written, so the first peers do not wait
    /// for the last ones' encryption.
    async fn pump_broadcast(&mut self, key: usize) {
        let n = self.watched.get(&key).map_or(0, |w| w.flows.len());
        for k in 0..n {
            let Some(&(i, id)) = self.watched.get(&key).and_then(|w| w.flows.get(k)) else {
                break;
            };
            self.pump(i, id);
            self.transmit(i).await;
        }
        self.reap_ended();
    }

    /// Serves connection `i`'s blocked flows (a stream became writable or available).
    fn pump_conn(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        // Unblocked first, then pumped (pumping needs the driver); no allocation per event.
        let mut unblocked = std::mem::take(&mut self.unblocked);
        unblocked.clear();
        for (id, f) in c.flows.iter_mut().filter(|(_, f)| f.blocked) {
            f.blocked = false;
            unblocked.push(*id);
        }
        for &id in &unblocked {
            self.pump(i, id);
        }
        self.unblocked = unblocked;
        self.reap_ended();
    }

    /// Flows whose broadcast ended: ENDED, and gone.
    fn reap_ended(&mut self) {
        while let Some((i, id)) = self.ended.pop() {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                continue;
            };
            let Some(flow) = c.flows.remove(&id) else {
                continue;
            };
            self.forget_flow(i, &flow);
            self.send_control(i, &ControlMessage::Ended { id: flow.id });
        }
    }

    /// Writes flow `id` of connection `i` until it has nothing to write or its stream blocks.
    fn pump(&mut self, i: usize, id: u64) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        if c.conn.is_closed() {
            return;
        }
        let Some(flow) = c.flows.get_mut(&id) else {
            return;
        };
        if flow.blocked {
            return;
        }
        let stats = &self.link.stats;
        let (mut bytes, mut groups, mut resets) = (0u64, 0u64, 0u64);
        let outcome = loop {
            // What is left of the last item.
            if flow.pending.iter().any(|b| !b.is_empty()) {
                let Some(&mut s) = flow.groups.current() else {
                    flow.pending = Default::default();
                    continue;
                };
                match c.conn.send_stream(s).write_chunks(&mut flow.pending) {
                    Ok(w) => {
                        bytes += w.bytes as u64;
                        if flow.pending.iter().any(|b| !b.is_empty()) {
                            flow.blocked = true;
                            break Pump::Blocked;
                        }
                    }
                    Err(WriteError::Blocked) => {
                        flow.blocked = true;
                        break Pump::Blocked;
                    }
                    Err(WriteError::Stopped(_) | WriteError::ClosedStream) => {
                        // The peer dropped this group (or it was reset): wait for the next.
                        flow.groups.take_current();
                        flow.pending = Default::default();
                    }
                }
                continue;
            }
            let Some(e) = flow.queue.pop_front() else {
                self.entries.clear();
                match flow.consumer.read(&mut self.entries, READ_MAX) {
                    ReadOutcome::Ended => {
                        if let Some(s) = flow.groups.take_current() {
                            let _ = c.conn.send_stream(s).finish();
                        }
                        break Pump::Ended;
                    }
                    ReadOutcome::Read(0) => break Pump::Idle,
                    ReadOutcome::Skipped { .. } => {
                        // The consumer jumped to the newest group: the current one is
                        // incomplete.
                        if let Some(s) = flow.groups.take_current() {
                            let _ = c
                                .conn
                                .send_stream(s)
                                .reset(varint(ResetCode::GroupDropped.code()));
                            resets += 1;
                        }
                    }
                    ReadOutcome::Read(_) => {}
                }
                flow.queue.extend(self.entries.drain(..));
                continue;
            };
            let (encoding, payload) = match flow.groups.step(&e) {
                Step::Skip => continue,
                Step::Write(encoding, payload) => (encoding, payload),
                Step::Start(encoding, payload) => {
                    let Some(s) = c.conn.streams().open(Dir::Uni) else {
                        // No stream credit yet: wait for the peer to give some.
                        flow.queue.push_front(e);
                        flow.blocked = true;
                        break Pump::Blocked;
                    };
                    let seq = flow.groups.seq();
                    let _ = c
                        .conn
                        .send_stream(s)
                        .set_priority(seq.min(i32::MAX as u64) as i32);
                    let Some(opening) = group_opening(flow.id, seq, flow.consumer.broadcast())
                    else {
                        let _ = c
                            .conn
                            .send_stream(s)
                            .reset(varint(ResetCode::Cancelled.code()));
                        continue;
                    };
                    let id = flow.id.0;
                    flow.groups.begin(s, |old, retire| {
                        let mut old = c.conn.send_stream(*old);
                        match retire {
                            Retire::Reset => {
                                if old.reset(varint(ResetCode::GroupDropped.code())).is_ok() {
                                    debug!(id, "older group reset (unfinished)");
                                }
                            }
                            Retire::Finish => {
                                let _ = old.finish();
                            }
                        }
                    });
                    flow.pending[0] = opening;
                    groups += 1;
                    (encoding, payload)
                }
            };
            flow.pending[1] = encoding;
            flow.pending[2] = payload;
        };
        stats.bytes_out.fetch_add(bytes, Relaxed);
        if groups > 0 {
            stats.groups_out.fetch_add(groups, Relaxed);
        }
        if resets > 0 {
            stats.groups_reset.fetch_add(resets, Relaxed);
        }
        if matches!(outcome, Pump::Ended) {
            self.ended.push((i, id));
        }
        mark(&mut self.dirty, i, c);
    }

    // ---- receiving publications ------------------------------------------------------------

    /// Reads group stream `s` of connection `i`: its header (to route it), then, when it is its
    /// publication's current group, its frames into the hub.
    fn read_group(&mut self, i: usize, s: StreamId, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(g) = c.groups.get_mut(&s) else {
            return;
        };
        // A routed group that is not its publication's current one waits unread.
        if let Some((p, seq)) = g.route
            && c.pubs
                .get(&p)
                .is_some_and(|p| p.current.map(|c| c.0) != Some(seq))
        {
            return;
        }
        if g.route.is_none() && !matches!(c.phase, Phase::Ready(_)) {
            drop_group(c, s, ResetCode::Cancelled);
            return;
        }
        let mut end = None;
        let mut read = 0u64;
        if let Ok(mut chunks) = c.conn.recv_stream(s).read(true) {
            loop {
                match chunks.next(256 << 10) {
                    Ok(Some(chunk)) => {
                        read += chunk.bytes.len() as u64;
                        g.buf.extend_from_slice(&chunk.bytes);
                        if g.route.is_none() {
                            // Only the header is wanted now.
                            break;
                        }
                    }
                    Ok(None) => {
                        end = Some(false);
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(quinn_proto::ReadError::Reset(_)) => {
                        end = Some(true);
                        break;
                    }
                }
            }
            let _ = chunks.finalize();
        } else {
            end = Some(true);
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(i);
        }
        self.link.stats.bytes_in.fetch_add(read, Relaxed);
        if g.route.is_none() {
            match g.decoder.decode(&mut g.buf) {
                Ok(Some(GroupEvent::Header(h))) => {
                    let (p, seq) = (h.subscription.0, h.sequence.0);
                    g.route = Some((p, seq));
                    let Some(publication) = c.pubs.get_mut(&p) else {
                        // A PUBLISH this group overtook is taken up when it comes; a group of
                        // no publication waits for it as long as its connection lasts.
                        if end.is_some() {
                            c.groups.remove(&s);
                        }
                        return;
                    };
                    if seq < publication.done_below
                        || publication.current.is_some_and(|(c, _)| seq <= c)
                    {
                        drop_group(c, s, ResetCode::GroupDropped);
                        return;
                    }
                    publication.waiting.insert(seq, s);
                    self.advance(i, p, now);
                    return;
                }
                Ok(Some(_)) | Err(_) => {
                    debug!(remote = %c.remote, "group stream without a header; dropped");
                    drop_group(c, s, ResetCode::Cancelled);
                    return;
                }
                Ok(None) => {
                    if end.is_some() {
                        c.groups.remove(&s);
                    }
                    return;
                }
            }
        }
        let Some((p, seq)) = g.route else { return };
        let Some(publication) = c.pubs.get_mut(&p) else {
            return;
        };
        publication.progress = now;
        let backlog = *publication.first_group.get_or_insert(seq) == seq;
        let drained = publication
            .sink
            .drain(&mut g.decoder, &mut g.buf, &self.link.stats, backlog);
        if let Err(e) = drained {
            warn!(broadcast = %publication.broadcast, group = seq, error = %e, "malformed group stream; dropped");
            let _ = c
                .conn
                .recv_stream(s)
                .stop(varint(ResetCode::Cancelled.code()));
            end = Some(false);
        }
        if let Some(reset) = end {
            c.groups.remove(&s);
            if reset {
                self.link.stats.groups_reset.fetch_add(1, Relaxed);
            }
            publication.current = None;
            publication.done_below = seq + 1;
            self.advance(i, p, now);
        }
    }

    /// Makes the next waiting group of publication `p` current, and reads it.
    fn advance(&mut self, i: usize, p: u64, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let Some(publication) = c.pubs.get_mut(&p) else {
            return;
        };
        if publication.current.is_some() {
            return;
        }
        let Some((seq, s)) = publication.waiting.pop_first() else {
            return;
        };
        publication.current = Some((seq, s));
        publication.progress = now;
        self.read_group(i, s, now);
    }

    /// Drops current groups that made no progress for [`GROUP_STALL`] while a newer one waits.
    fn stalls(&mut self, i: usize, now: Instant) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let stalled: Vec<u64> = c
            .pubs
            .iter()
            .filter(|(_, p)| stall_deadline(p).is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for p in stalled {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                return;
            };
            let Some(publication) = c.pubs.get_mut(&p) else {
                continue;
            };
            if let Some((seq, s)) = publication.current.take() {
                publication.done_below = seq + 1;
                drop_group(c, s, ResetCode::GroupDropped);
                self.link.stats.groups_reset.fetch_add(1, Relaxed);
            }
            self.advance(i, p, now);
        }
    }

    fn publication_ended(&self, p: Publication) {
        self.link.stats.publications_in.fetch_sub(1, Relaxed);
        info!(broadcast = %p.broadcast, "publication over the cluster link ended");
    }

    // ---- connection end --------------------------------------------------------------------

    /// Ends everything connection `i` serves and receives (it is closing or lost).
    fn end_conn(&mut self, i: usize) {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return;
        };
        let flows: Vec<Flow> = c.flows.drain().map(|(_, f)| f).collect();
        let pubs: Vec<Publication> = c.pubs.drain().map(|(_, p)| p).collect();
        c.asked.clear();
        c.groups.clear();
        for f in &flows {
            self.forget_flow(i, f);
        }
        for p in pubs {
            self.publication_ended(p);
        }
    }

    fn remove(&mut self, i: usize) {
        self.end_conn(i);
        if self.conns.get_mut(i).and_then(Option::take).is_some() {
            self.link.stats.peers_in.fetch_sub(1, Relaxed);
        }
    }
}

enum Pump {
    Idle,
    Blocked,
    Ended,
}

fn conn_timer(conns: &[Option<Conn>], i: usize) -> Option<Instant> {
    conns.get(i).and_then(|c| c.as_ref()).and_then(|c| c.timer)
}

/// Stops group stream `s` (STOP_SENDING `code`) and forgets it.
fn drop_group(c: &mut Conn, s: StreamId, code: ResetCode) {
    let _ = c.conn.recv_stream(s).stop(varint(code.code()));
    c.groups.remove(&s);
}

/// Puts connection `i` on the dirty list once.
/// What quinn-proto built into `buf`, as quinn-udp sends it.
fn udp_transmit<'a>(t: &quinn_proto::Transmit, buf: &'a [u8]) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: t.destination,
        ecn: None,
        contents: &buf[..t.size],
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

fn mark(dirty: &mut Vec<usize>, i: usize, c: &mut Conn) {
    if !c.dirty {
        c.dirty = true;
        dirty.push(i);
    }
}

fn stall_deadline(p: &Publication) -> Option<Instant> {
    (p.current.is_some() && !p.waiting.is_empty()).then_some(p.progress + GROUP_STALL)
}

/// The earliest of connection `c`'s own deadlines (HELLO, a close after ERROR, stalled groups).
fn app_deadline(c: &Conn) -> Option<Instant> {
    let phase = match c.phase {
        Phase::Hello(t) | Phase::Closing(t, ..) => Some(t),
        Phase::Ready(_) | Phase::Closed => None,
    };
    c.pubs
        .values()
        .filter_map(stall_deadline)
        .chain(phase)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Codec;
    use crate::media::hub::Hub;
    use crate::media::hub::testing::{frame, track as info};

    /// What a sender does with each entry, as letters: S(kip), W(rite), N(ew group) with the
    /// streams it retires, in order.
    fn steps(cursor: &mut GroupCursor<u32>, entries: &[Arc<Entry>], next: &mut u32) -> Vec<String> {
        let mut out = Vec::new();
        for e in entries {
            let step = cursor.step(e);
            // A group starts on the wire exactly where the hub marked one.
            assert_eq!(
                matches!(step, Step::Start(..)),
                e.group_start,
                "{:?}",
                e.item
            );
            match step {
                Step::Skip => out.push("S".to_owned()),
                Step::Write(h, _) => {
                    assert!(!h.is_empty());
                    out.push("W".to_owned());
                }
                Step::Start(h, _) => {
                    assert!(!h.is_empty());
                    let mut retired = String::new();
                    *next += 1;
                    cursor.begin(*next, |s, r| {
                        retired.push_str(&format!(
                            "{}{s}",
                            if r == Retire::Reset { "r" } else { "f" }
                        ))
                    });
                    out.push(format!("N{next}{retired}"));
                }
            }
        }
        out
    }

    #[test]
    fn groups_start_at_video_keyframes_and_retire_the_two_before() {
        let hub = Hub::default();
        let mut p = hub.publish("live/g", Instant::now()).unwrap();
        p.set_track(TrackId(0), info(Codec::H264));
        p.set_track(TrackId(1), info(Codec::Aac));
        let mut consumer = hub.subscribe("live/g").unwrap();
        let mut cursor: GroupCursor<u32> = GroupCursor::new();
        // Audio before the first keyframe (not handed out), a group with audio and a config
        // change, two more groups; read as they come (a consumer that reads late joins at the
        // newest group).
        let mut entries = Vec::new();
        for (track, ms, key) in [
            (1, 0, true),
            (0, 10, false),
            (0, 20, true),
            (1, 21, true),
            (9, 0, false),
            (0, 30, false),
            (0, 40, true),
            (0, 50, true),
        ] {
            if track == 9 {
                let mut changed = info(Codec::Aac);
                changed.config = Some(Bytes::from_static(b"new"));
                p.set_track(TrackId(1), changed);
            } else {
                p.push(TrackId(track), frame(ms, key));
            }
            consumer.read(&mut entries, 64);
        }
        let mut next = 0;
        let got = steps(&mut cursor, &entries, &mut next);
        // Group 1 from the keyframe: its audio, the config change and a frame written on it;
        // group 2 finishes group 1; group 3 resets group 1 (two back) and finishes group 2.
        assert_eq!(got, ["N1", "W", "W", "W", "N2f1", "N3r1f2"], "{got:?}");
        assert!(matches!(entries[2].item, Item::Config { .. }));
        assert_eq!(cursor.seq(), 3);
        assert_eq!(cursor.current().copied(), Some(3));
        // A sender that stops holds the current and the previous group.
        let all: Vec<u32> = cursor.take_all().collect();
        assert_eq!(all, [3, 2]);
    }

    #[test]
    fn audio_only_groups_last_a_second_and_renditions_never_travel() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(1), info(Codec::Aac));
        let mut consumer = hub.subscribe("live/a").unwrap();
        let mut cursor: GroupCursor<u32> = GroupCursor::new();
        let bc = p.broadcast().clone();
        let mut r = bc.add_rendition(&hub, info(Codec::Opus));
        let mut entries = Vec::new();
        for ms in (0..2500).step_by(500) {
            p.push(TrackId(1), frame(ms, true));
            r.push(frame(ms, true));
            consumer.read(&mut entries, 64);
        }
        let mut next = 0;
        let got = steps(&mut cursor, &entries, &mut next);
        let audio: Vec<&str> = got
            .iter()
            .zip(&entries)
            .filter(|(_, e)| {
                matches!(
                    e.item,
                    Item::Frame {
                        track: TrackId(1),
                        ..
                    }
                )
            })
            .map(|(s, _)| s.as_str())
            .collect();
        // 0 starts, 500 writes, 1000 starts (a second later), 1500 writes, 2000 starts.
        assert_eq!(audio, ["N1", "W", "N2f1", "W", "N3r1f2"], "{got:?}");
        let rendition = got
            .iter()
            .zip(&entries)
            .filter(|(_, e)| {
                matches!(&e.item, Item::Frame { track, .. } | Item::Config { track, .. } if !track.is_source())
            })
            .map(|(s, _)| s.as_str());
        assert!(rendition.clone().count() > 0 && rendition.into_iter().all(|s| s == "S"));
    }
}
