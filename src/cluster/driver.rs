//! The cluster link's I/O: castnode's own driver around quinn-proto, one per UDP socket. It
//! reads datagrams and hands them to the endpoint and the connections' `Session`s, sends what
//! they have (GSO batches), keeps their timers in one heap, wakes the flows of a broadcast when
//! the hub has new entries for it, and answers the sessions' events with the node's hub.
//!
//! Two kinds run, the same type:
//! - **serving** drivers (`--cluster-threads` of them, by default
//!   [`crate::config::default_cluster_threads`]), each on its own thread (a single-threaded
//!   tokio runtime) with one SO_REUSEPORT socket on the listening address (the kernel keeps each
//!   peer on one socket), accepting other nodes;
//! - one **connecting** driver on its own socket, taking `Command`s from [`super::link`]'s
//!   tasks (connect upstream, subscribe, publish) on the first serving thread's runtime, so on a
//!   relay a frame received from upstream reaches the hub and is served on one thread, with no
//!   wake across threads.
//!
//! Why not quinn's async API: a relay serving a broadcast to 100 edges paid one task wake, one
//! connection lock and one connection-driver wake per frame copy there, and that cost twice what
//! the QUIC state machine and the socket cost (`benches/quic_driver.rs`, BENCHMARKS.md "Cluster
//! link"). Here a broadcast's new frames wake the driver once, every flow of it is served in
//! that pass, and each connection sends what it has in one GSO batch.
//!
//! Guarantees:
//! - One connection's failure (a bad peer, a malformed message, a loss) ends only its session
//!   and flows; nothing here panics on a peer's input.
//! - A peer's SUBSCRIBE is answered from the hub, or (a relay) fetched from upstream first in a
//!   task beside this driver while the peer's other requests go on; a peer's PUBLISH becomes a
//!   local broadcast ([`crate::media::Hub::publish`] decides).
//! - Every flow a link task started hears how it ended (`FlowEvent`), with its sink or
//!   consumer back; a task never waits on a flow the driver forgot.

use std::cmp::Reverse;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BinaryHeap, HashMap};
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, ServerConfig,
};
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::encoding::Sink;
use super::link::Link;
use super::session::{FlowEnd, HelloError, Session, SessionConfig, SessionEvent};
use super::wire::ErrorCode;
use crate::media::hub::{Broadcast, LadderError};
use crate::media::{
    BroadcastConsumer, BroadcastProducer, ConsumerKind, Metadata, PublishError, TrackId, TrackInfo,
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

/// Socket buffers asked for, each way (the kernel caps them at `net.core.rmem_max` /
/// `wmem_max`).
pub(crate) const SOCKET_BUFFER: usize = 8 << 20;

/// Binds `threads` serving sockets to `addr` (SO_REUSEPORT: the kernel spreads peers over them
/// by address, and keeps each peer on one); a driver per socket starts with [`spawn`].
pub(crate) fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
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

/// The connecting driver's socket: any port; room for fetched media's bursts (a relay takes
/// every broadcast it serves through it) while the thread is busy sending, as the serving
/// sockets have.
pub(crate) fn bind_client() -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    socket.set_nonblocking(true)?;
    let s = socket2::SockRef::from(&socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    Ok(socket)
}

/// Starts a serving driver for `socket` on its own thread. It serves for as long as the
/// process runs (it keeps `link` alive).
pub(crate) fn spawn(
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
                Driver::new(link, socket, udp, Some(config), None)
                    .run()
                    .await;
            });
        })?;
    Ok(())
}

/// Starts the connecting driver on `rt` (the caller's runtime must be `rt`'s or it must run).
pub(crate) fn spawn_client(
    link: Arc<Link>,
    socket: std::net::UdpSocket,
    client: ClientConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    rt: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
    let _in = rt.enter();
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    rt.spawn(Driver::new(link, socket, udp, None, Some((client, commands))).run());
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

/// A connection of the connecting driver, as the link's tasks name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerId {
    slot: usize,
    generation: u64,
}

/// An upstream connection that finished HELLO.
pub(crate) struct Connected {
    /// Which.
    pub id: PeerId,
    /// False once the connection closed.
    pub alive: Arc<AtomicBool>,
}

/// Why [`Command::Connect`] failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectFailure {
    /// quinn-proto refused to start the connection.
    #[error(transparent)]
    Start(#[from] quinn_proto::ConnectError),
    /// The connection failed before HELLO_OK.
    #[error(transparent)]
    Hello(#[from] HelloError),
}

/// What the link's tasks ask of the connecting driver.
pub(crate) enum Command {
    /// Connects to an upstream and says HELLO.
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The answer, once HELLO_OK came (or the connection failed).
        reply: oneshot::Sender<Result<Connected, ConnectFailure>>,
    },
    /// SUBSCRIBE `broadcast` as flow `id`; its groups go into `sink` (a new producer is made
    /// in the hub when it has none, once the upstream answered).
    Subscribe {
        /// On which connection.
        peer: PeerId,
        /// The flow (unique on the link).
        id: u64,
        /// What.
        broadcast: String,
        /// Where its frames go.
        sink: Sink,
        /// Where the flow's news go.
        events: mpsc::UnboundedSender<FlowEvent>,
    },
    /// PUBLISH `consumer`'s broadcast as flow `id`.
    Publish {
        /// On which connection.
        peer: PeerId,
        /// The flow.
        id: u64,
        /// What.
        consumer: BroadcastConsumer,
        /// Only its ABR ladder's rungs (a transcoder's publication).
        ladder_only: bool,
        /// Where the flow's news go.
        events: mpsc::UnboundedSender<FlowEvent>,
    },
    /// Ends publication `id` before its broadcast ends.
    Unpublish {
        /// On which connection.
        peer: PeerId,
        /// The flow.
        id: u64,
    },
    /// Ends received flow `id` (UNSUBSCRIBE) if `decide`, given its sink, says so; the answer
    /// says whether it did.
    Release {
        /// On which connection.
        peer: PeerId,
        /// The flow.
        id: u64,
        /// Decides with the sink in hand (on the driver's thread).
        decide: Box<dyn FnOnce(&mut Sink) -> bool + Send>,
        /// Whether the flow ended.
        reply: oneshot::Sender<bool>,
    },
    /// Closes a connection (its flows end as lost).
    Close {
        /// Which.
        peer: PeerId,
        /// Why, for the peer's logs.
        why: &'static str,
    },
}

/// What a link task hears about its flow.
pub(crate) enum FlowEvent {
    /// The upstream answered SUBSCRIBE; the flow's producer is in the hub, as this broadcast.
    SubscribeOk(Arc<Broadcast>),
    /// The upstream took the PUBLISH.
    PublishOk,
    /// The upstream refused the PUBLISH (the flow ends).
    PublishError {
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// A received flow ended (refused, ended upstream, or lost): its sink.
    InEnded(Sink, FlowEnd),
    /// A sent flow ended: its consumer.
    OutEnded(BroadcastConsumer, FlowEnd),
}

/// A subscription's answer from the node runtime (a relay fetching from upstream first).
struct Answer {
    slot: usize,
    generation: u64,
    id: u64,
    broadcast: String,
    consumer: Option<BroadcastConsumer>,
}

/// What the connecting driver keeps for a connection it opened.
struct Outgoing {
    connecting: Option<oneshot::Sender<Result<Connected, ConnectFailure>>>,
    alive: Arc<AtomicBool>,
    /// The tasks' flows on it.
    flows: HashMap<u64, mpsc::UnboundedSender<FlowEvent>>,
}

/// One connection.
struct Slot {
    session: Session,
    generation: u64,
    dirty: bool,
    /// The deadline last put in the driver's heap.
    timer: Option<Instant>,
    /// Set for a connection this driver opened.
    outgoing: Option<Outgoing>,
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
    config: Arc<SessionConfig>,
    client: Option<ClientConfig>,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    slots: Vec<Option<Slot>>,
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
}

/// The next command, or never when this driver takes none (or its senders are gone).
async fn next_command(commands: &mut Option<mpsc::UnboundedReceiver<Command>>) -> Command {
    if let Some(rx) = commands {
        if let Some(c) = rx.recv().await {
            return c;
        }
        *commands = None;
    }
    std::future::pending().await
}

impl Driver {
    fn new(
        link: Arc<Link>,
        socket: tokio::net::UdpSocket,
        udp: quinn_udp::UdpSocketState,
        server: Option<Arc<ServerConfig>>,
        client: Option<(ClientConfig, mpsc::UnboundedReceiver<Command>)>,
    ) -> Self {
        let (wake_tx, wakes) = mpsc::unbounded_channel();
        let (answer_tx, answers) = mpsc::unbounded_channel();
        let (client, commands) = client.unzip();
        Self {
            config: link.session_config().clone(),
            link,
            socket,
            udp,
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
            client,
            commands,
            slots: Vec::new(),
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
            // Media, answers and commands first: they come at most once per broadcast change
            // or request, while datagrams may keep coming (a pass reads at most RECV_PASSES
            // batches).
            tokio::select! {
                biased;
                Some(key) = self.wakes.recv() => {
                    self.pump_broadcast(key).await;
                    while let Ok(key) = self.wakes.try_recv() {
                        self.pump_broadcast(key).await;
                    }
                }
                Some(a) = self.answers.recv() => self.answered(a),
                c = next_command(&mut self.commands) => self.command(c),
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
                    Ok((ch, conn)) => {
                        self.link.stats.peers_in.fetch_add(1, Relaxed);
                        let session = Session::server(conn, self.config.clone(), now);
                        self.insert(ch, session, None);
                    }
                    Err(e) => {
                        debug!(remote = %from, error = %e.cause, "cluster connection refused");
                        if let Some(t) = e.response {
                            self.send_response(&t);
                        }
                    }
                }
            }
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(Some(s)) = self.slots.get_mut(ch.0) {
                    s.session.handle_event(ev);
                    mark(&mut self.dirty, ch.0, s);
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

    fn insert(&mut self, ch: ConnectionHandle, session: Session, outgoing: Option<Outgoing>) {
        if self.slots.len() <= ch.0 {
            self.slots.resize_with(ch.0 + 1, || None);
        }
        self.generations += 1;
        self.slots[ch.0] = Some(Slot {
            session,
            generation: self.generations,
            dirty: true,
            timer: None,
            outgoing,
        });
        self.dirty.push(ch.0);
    }

    // ---- the service pass ------------------------------------------------------------------

    /// The earliest deadline of any connection.
    fn next_timer(&mut self) -> Option<Instant> {
        let slots = &self.slots;
        self.timers.next(|i| slot_timer(slots, i))
    }

    /// Due timers, then every connection touched since the last pass: its events, its
    /// datagrams out, its next deadline.
    async fn service(&mut self) {
        let now = Instant::now();
        let slots = &self.slots;
        self.timers
            .pop_due(now, |i| slot_timer(slots, i), &mut self.due);
        for i in self.due.drain(..) {
            if let Some(Some(s)) = self.slots.get_mut(i) {
                mark(&mut self.dirty, i, s);
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
                let Some(Some(s)) = self.slots.get_mut(i) else {
                    continue;
                };
                s.dirty = false;
                s.session.handle_timeout(now);
                while let Some(ev) = s.session.poll_endpoint_event() {
                    if let Some(back) = self.endpoint.handle_event(ConnectionHandle(i), ev) {
                        s.session.handle_event(back);
                    }
                }
                s.session.process(now);
                self.events(i);
                self.transmit(i).await;
                let Some(Some(s)) = self.slots.get_mut(i) else {
                    continue;
                };
                let timer = s.session.poll_timeout();
                self.timers.set(i, &mut s.timer, timer);
                if s.session.is_drained() {
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
            let Some(Some(s)) = self.slots.get_mut(i) else {
                return;
            };
            self.out.clear();
            let Some(t) = s.session.poll_transmit(now, max, &mut self.out) else {
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

    // ---- the sessions' events --------------------------------------------------------------

    /// Acts on what connection `i`'s session has to say.
    fn events(&mut self, i: usize) {
        loop {
            let Some(Some(s)) = self.slots.get_mut(i) else {
                return;
            };
            let Some(ev) = s.session.poll_event() else {
                return;
            };
            match ev {
                SessionEvent::Ready { peer } => {
                    debug!(%peer, remote = %s.session.remote(), "cluster session ready");
                    if let Some(o) = s.outgoing.as_mut()
                        && let Some(reply) = o.connecting.take()
                    {
                        let id = PeerId {
                            slot: i,
                            generation: s.generation,
                        };
                        let alive = o.alive.clone();
                        let _ = reply.send(Ok(Connected { id, alive }));
                    }
                }
                SessionEvent::Failed(e) => {
                    if let Some(reply) = s.outgoing.as_mut().and_then(|o| o.connecting.take()) {
                        let _ = reply.send(Err(e.into()));
                    }
                }
                SessionEvent::Closed { reason } => {
                    if let Some(o) = s.outgoing.as_mut() {
                        o.alive.store(false, Relaxed);
                        o.flows.clear();
                        if let Some(reply) = o.connecting.take() {
                            let _ = reply.send(Err(HelloError::Lost(reason).into()));
                        }
                    }
                }
                SessionEvent::Subscribe { id, broadcast } => self.subscribe(i, id, broadcast),
                SessionEvent::Publish {
                    id,
                    broadcast,
                    tracks,
                    metadata,
                } => {
                    let now = Instant::now();
                    if !tracks.is_empty() && tracks.iter().all(|(t, _)| t.is_ladder()) {
                        // Only ladder rungs: a transcoder's ladder of a broadcast live here.
                        let peer = s.session.peer().unwrap_or("?").to_owned();
                        match self.link.hub().ladder_writer(&broadcast, &peer) {
                            Ok(mut ladder) => {
                                for (track, info) in tracks {
                                    ladder.set_track(track, info);
                                }
                                info!(%peer, %broadcast, id, "ABR ladder published over the cluster link");
                                self.link.stats.publications_in.fetch_add(1, Relaxed);
                                if let Some(sink) = s.session.sink_mut(id) {
                                    sink.ladder = Some(ladder);
                                }
                                s.session.feed(id, None, now);
                            }
                            Err(e) => {
                                info!(%peer, %broadcast, "ladder PUBLISH refused: {e}");
                                let code = match e {
                                    LadderError::NotLive(_) => ErrorCode::NotFound,
                                    LadderError::Taken(..) => ErrorCode::AlreadyLive,
                                };
                                s.session.refuse_publish(id, code, e.to_string());
                            }
                        }
                        continue;
                    }
                    match self.link.hub().publish(&broadcast, now) {
                        Ok(mut producer) => {
                            describe(&mut producer, tracks, metadata);
                            let peer = s.session.peer().unwrap_or("?");
                            info!(%peer, %broadcast, id, "broadcast published over the cluster link");
                            self.link.stats.publications_in.fetch_add(1, Relaxed);
                            s.session.feed(id, Some(producer), now);
                        }
                        Err(e) => {
                            let peer = s.session.peer().unwrap_or("?");
                            info!(%peer, %broadcast, "PUBLISH refused: {e}");
                            let code = match e {
                                PublishError::AlreadyLive(_) => ErrorCode::AlreadyLive,
                                PublishError::BadName(_) => ErrorCode::ProtocolViolation,
                            };
                            s.session.refuse_publish(id, code, e.to_string());
                        }
                    }
                }
                SessionEvent::SubscribeOk {
                    id,
                    broadcast,
                    tracks,
                    metadata,
                } => self.subscribed(i, id, broadcast, tracks, metadata),
                SessionEvent::SubscribeError { id, code, reason } => {
                    debug!(id, ?code, %reason, "upstream has no such broadcast");
                }
                SessionEvent::PublishOk { id } => forward(s, id, FlowEvent::PublishOk, false),
                SessionEvent::PublishError { id, code, reason } => {
                    forward(s, id, FlowEvent::PublishError { code, reason }, false);
                }
                SessionEvent::InEnded { id, sink, end } => {
                    if s.outgoing.is_some() {
                        forward(s, id, FlowEvent::InEnded(sink, end), true);
                    } else if sink.is_ready() {
                        // A publication from downstream: its broadcast waits out the publish
                        // grace in the hub (the producer drops here).
                        self.link.stats.publications_in.fetch_sub(1, Relaxed);
                        info!(id, "publication over the cluster link ended");
                    }
                }
                SessionEvent::OutEnded { id, consumer, end } => {
                    let key = Arc::as_ptr(consumer.broadcast()) as usize;
                    if s.outgoing.is_some() {
                        forward(s, id, FlowEvent::OutEnded(consumer, end), true);
                    } else {
                        self.link.stats.subscriptions_down.fetch_sub(1, Relaxed);
                    }
                    self.unwatch(key, i, id);
                }
            }
        }
    }

    /// A peer's SUBSCRIBE: from the hub, or fetched from upstream first, or not found.
    fn subscribe(&mut self, i: usize, id: u64, broadcast: String) {
        let hub = self.link.hub();
        if let Some(consumer) = hub.subscribe_as(&broadcast, ConsumerKind::Node) {
            self.serve(i, id, consumer);
        } else if self.link.has_upstreams() {
            // Fetching from upstream may take a moment: other requests of this peer go on
            // meanwhile.
            let Some(Some(s)) = self.slots.get(i) else {
                return;
            };
            let (link, tx, generation) = (self.link.clone(), self.answer_tx.clone(), s.generation);
            self.link.runtime().spawn(async move {
                let consumer = link.subscribe(&broadcast).await.map(|mut c| {
                    c.set_kind(ConsumerKind::Node);
                    c
                });
                let _ = tx.send(Answer {
                    slot: i,
                    generation,
                    id,
                    broadcast,
                    consumer,
                });
            });
        } else if let Some(Some(s)) = self.slots.get_mut(i) {
            s.session.not_found(id, &broadcast);
        }
    }

    fn answered(&mut self, a: Answer) {
        let Some(Some(s)) = self.slots.get_mut(a.slot) else {
            return;
        };
        if s.generation != a.generation {
            return;
        }
        match a.consumer {
            Some(consumer) => self.serve(a.slot, a.id, consumer),
            None => s.session.not_found(a.id, &a.broadcast),
        }
        self.touched(a.slot);
    }

    /// Serves a peer's SUBSCRIBE from `consumer`, woken by its broadcast.
    fn serve(&mut self, i: usize, id: u64, consumer: BroadcastConsumer) {
        let bc = consumer.broadcast().clone();
        let key = self.watch(&bc, i, id);
        let Some(Some(s)) = self.slots.get_mut(i) else {
            return;
        };
        match s.session.serve(id, consumer) {
            Ok(()) => {
                self.link.stats.subscriptions_down.fetch_add(1, Relaxed);
            }
            Err(_) => self.unwatch(key, i, id),
        }
    }

    /// Upstream answered our SUBSCRIBE: the broadcast in the hub (a new producer, or the one a
    /// failover kept), then its groups are read.
    fn subscribed(
        &mut self,
        i: usize,
        id: u64,
        broadcast: String,
        tracks: Vec<(TrackId, TrackInfo)>,
        metadata: Metadata,
    ) {
        let now = Instant::now();
        let Some(Some(s)) = self.slots.get_mut(i) else {
            return;
        };
        let upstream = s.session.remote();
        let Some(sink) = s.session.sink_mut(id) else {
            return;
        };
        let kept = sink.producer.is_some();
        // A transcoder leaves upstream's ladder out: its own takes those ids.
        let mut tracks = tracks;
        tracks.retain(|(t, _)| sink.keeps(*t));
        let bc = if kept {
            self.link.stats.failovers.fetch_add(1, Relaxed);
            info!(%broadcast, %upstream, "fetch moved to another upstream");
            let Some(p) = s.session.sink_mut(id).and_then(|k| k.producer.as_mut()) else {
                return;
            };
            describe(p, tracks, metadata);
            let bc = p.broadcast().clone();
            s.session.feed(id, None, now);
            bc
        } else {
            match self.link.hub().publish(&broadcast, now) {
                Ok(mut p) => {
                    describe(&mut p, tracks, metadata);
                    let bc = p.broadcast().clone();
                    s.session.feed(id, Some(p), now);
                    bc
                }
                Err(e) => {
                    warn!(%broadcast, error = %e, "cannot fetch into the hub");
                    if let Some(sink) = s.session.unsubscribe(id) {
                        forward(s, id, FlowEvent::InEnded(sink, FlowEnd::Stopped), true);
                    }
                    return;
                }
            }
        };
        forward(s, id, FlowEvent::SubscribeOk(bc), false);
    }

    // ---- commands (the connecting driver) --------------------------------------------------

    fn command(&mut self, c: Command) {
        let now = Instant::now();
        match c {
            Command::Connect { addr, reply } => {
                let Some(client) = self.client.clone() else {
                    return;
                };
                match self.endpoint.connect(now, client, addr, "castnode") {
                    Ok((ch, conn)) => {
                        let session = Session::client(conn, self.config.clone(), now);
                        let outgoing = Outgoing {
                            connecting: Some(reply),
                            alive: Arc::new(AtomicBool::new(true)),
                            flows: HashMap::new(),
                        };
                        self.insert(ch, session, Some(outgoing));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Subscribe {
                peer,
                id,
                broadcast,
                sink,
                events,
            } => {
                let Some(s) = self.peer(peer) else {
                    let _ = events.send(FlowEvent::InEnded(sink, FlowEnd::Lost));
                    return;
                };
                if let Some(o) = s.outgoing.as_mut() {
                    o.flows.insert(id, events);
                }
                s.session.subscribe(id, &broadcast, sink, now);
                self.touched(peer.slot);
            }
            Command::Publish {
                peer,
                id,
                consumer,
                ladder_only,
                events,
            } => {
                if self.peer(peer).is_none() {
                    let _ = events.send(FlowEvent::OutEnded(consumer, FlowEnd::Lost));
                    return;
                }
                let bc = consumer.broadcast().clone();
                self.watch(&bc, peer.slot, id);
                let Some(s) = self.peer(peer) else { return };
                if let Some(o) = s.outgoing.as_mut() {
                    o.flows.insert(id, events);
                }
                s.session.publish(id, consumer, ladder_only);
                self.touched(peer.slot);
            }
            Command::Release {
                peer,
                id,
                decide,
                reply,
            } => {
                let Some(s) = self.peer(peer) else {
                    let _ = reply.send(false);
                    return;
                };
                let released = s.session.sink_mut(id).is_some_and(decide);
                if released {
                    s.session.unsubscribe(id);
                    if let Some(o) = s.outgoing.as_mut() {
                        o.flows.remove(&id);
                    }
                }
                let _ = reply.send(released);
                self.touched(peer.slot);
            }
            Command::Unpublish { peer, id } => {
                let Some(s) = self.peer(peer) else { return };
                s.session.unpublish(id);
                self.touched(peer.slot);
            }
            Command::Close { peer, why } => {
                let Some(s) = self.peer(peer) else { return };
                s.session.close(now, super::wire::CLOSE_NO_ERROR, why);
                self.touched(peer.slot);
            }
        }
    }

    fn peer(&mut self, peer: PeerId) -> Option<&mut Slot> {
        match self.slots.get_mut(peer.slot) {
            Some(Some(s)) if s.generation == peer.generation && s.session.is_ready() => Some(s),
            _ => None,
        }
    }

    /// Connection `i` has news (events) and may have something to send.
    fn touched(&mut self, i: usize) {
        self.events(i);
        if let Some(Some(s)) = self.slots.get_mut(i) {
            mark(&mut self.dirty, i, s);
        }
    }

    // ---- flows woken by their broadcast ----------------------------------------------------

    /// Flow `id` of connection `i` reads `bc`: woken when it changes. Returns its key.
    fn watch(&mut self, bc: &Arc<Broadcast>, i: usize, id: u64) -> usize {
        let key = Arc::as_ptr(bc) as usize;
        match self.watched.entry(key) {
            MapEntry::Occupied(mut w) => w.get_mut().flows.push((i, id)),
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
                    flows: vec![(i, id)],
                    task: task.abort_handle(),
                });
            }
        }
        key
    }

    fn unwatch(&mut self, key: usize, i: usize, id: u64) {
        if let MapEntry::Occupied(mut w) = self.watched.entry(key) {
            w.get_mut().flows.retain(|&f| f != (i, id));
            if w.get().flows.is_empty() {
                w.remove().task.abort();
            }
        }
    }

    /// Serves every flow of broadcast `key`. Each connection sends right after its flow was
    /// written, so the first peers do not wait for the last ones' encryption.
    async fn pump_broadcast(&mut self, key: usize) {
        let n = self.watched.get(&key).map_or(0, |w| w.flows.len());
        let mut k = 0;
        while k < n {
            let Some(&(i, id)) = self.watched.get(&key).and_then(|w| w.flows.get(k)) else {
                break;
            };
            if let Some(Some(s)) = self.slots.get_mut(i) {
                s.session.pump(id);
                mark(&mut self.dirty, i, s);
            }
            // A flow that ended leaves the list: the next one took its place.
            let len_before = self.watched.get(&key).map_or(0, |w| w.flows.len());
            self.events(i);
            self.transmit(i).await;
            let len_after = self.watched.get(&key).map_or(0, |w| w.flows.len());
            if len_after == len_before {
                k += 1;
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some(Some(s)) = self.slots.get_mut(i) {
            // Drained: its flows ended already, unless the connection went without a word.
            s.session.forget();
        }
        self.events(i);
        if let Some(s) = self.slots.get_mut(i).and_then(Option::take)
            && s.outgoing.is_none()
        {
            self.link.stats.peers_in.fetch_sub(1, Relaxed);
        }
    }
}

/// Sets a broadcast's tracks and metadata as a peer described them.
fn describe(p: &mut BroadcastProducer, tracks: Vec<(TrackId, TrackInfo)>, metadata: Metadata) {
    for (t, info) in tracks {
        p.set_track(t, info);
    }
    p.set_metadata(metadata);
}

/// Hands a flow's news to its task; `last` forgets the flow.
fn forward(s: &mut Slot, id: u64, ev: FlowEvent, last: bool) {
    let Some(o) = s.outgoing.as_mut() else { return };
    let tx = if last {
        o.flows.remove(&id)
    } else {
        o.flows.get(&id).cloned()
    };
    if let Some(tx) = tx {
        let _ = tx.send(ev);
    }
}

fn slot_timer(slots: &[Option<Slot>], i: usize) -> Option<Instant> {
    slots.get(i).and_then(|s| s.as_ref()).and_then(|s| s.timer)
}

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

/// Puts connection `i` on the dirty list once.
fn mark(dirty: &mut Vec<usize>, i: usize, s: &mut Slot) {
    if !s.dirty {
        s.dirty = true;
        dirty.push(i);
    }
}
