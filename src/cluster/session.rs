//! One cluster connection's protocol, without I/O: a [`Session`] wraps quinn-proto's
//! [`Connection`] (itself a state machine: datagrams and time in, datagrams out) and speaks the
//! cluster protocol on it (`docs/cluster-protocol.md`), for either end. A driver
//! ([`super::driver`]) feeds it the connection's events and the time, sends what
//! [`Session::poll_transmit`] gives, and answers its [`SessionEvent`]s; tests connect two
//! sessions in memory.
//!
//! Both ends are the same machine: the client opens the control stream and proves the token
//! first (HELLO), the server answers (HELLO_OK). After that a *flow* is a broadcast going one
//! way: a flow this end sends ([`Session::serve`] answering a SUBSCRIBE, or
//! [`Session::publish`]) reads a hub consumer and writes its groups
//! ([`super::groups::GroupCursor`]); a flow this end receives ([`Session::subscribe`], or a
//! peer's PUBLISH accepted with [`Session::feed`]) reads its groups in order
//! ([`super::groups::GroupOrder`]) into a [`Sink`].
//!
//! Guarantees:
//! - Nothing is sent or taken before HELLO / HELLO_OK proved, over this connection's TLS
//!   exporter, that the peer holds the cluster token; a server that hears no valid HELLO within
//!   [`HELLO_TIMEOUT`] answers ERROR and closes; a client that hears no valid HELLO_OK within it
//!   gives up ([`SessionEvent::Failed`]).
//! - A flow this end receives is read only once it is fed (its sink may write to the hub): group
//!   streams that overtook the answer wait unread.
//! - Every flow ends with exactly one [`SessionEvent::InEnded`] / [`SessionEvent::OutEnded`],
//!   which gives its sink or consumer back (to fail over elsewhere), whether the peer ended it,
//!   the broadcast ended, or the connection went; except the two this end stops itself
//!   ([`Session::unsubscribe`] gives the sink back at once; [`Session::refuse_publish`] had
//!   none). [`SessionEvent::Closed`] comes once, after the flows' ends.
//! - A blocked stream (flow control, congestion) holds its flow's reading until it is writable
//!   again, so the hub (not the session) decides what a slow peer skips.
//! - Malformed control messages or group headers close only this connection (a server answers
//!   ERROR first); nothing here panics on a peer's input.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{
    Connection, ConnectionEvent, Dir, EndpointEvent, Event, StreamEvent, StreamId, VarInt,
    WriteError,
};
use tracing::{debug, info, warn};

use super::encoding::{Sink, group_opening, shared_tracks};
use super::groups::{GroupCursor, GroupOrder, Retire, Step};
use super::wire::{
    self, ControlDecoder, ControlMessage, ErrorCode, GroupDecoder, GroupEvent, ResetCode, Side,
    SubscriptionId,
};
use crate::media::{BroadcastConsumer, Entry, Metadata, ReadOutcome, TrackId, TrackInfo};
use crate::metrics::ClusterStats;

/// How long a peer has to finish HELLO (the client: the QUIC handshake, then HELLO_OK).
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ERROR is given to leave before its connection is closed.
const ERROR_LINGER: Duration = Duration::from_millis(50);
/// Entries read from the hub at once for one flow.
const READ_MAX: usize = 256;

/// What every session of a node shares.
pub(crate) struct SessionConfig {
    /// The cluster token both ends prove they hold.
    pub token: Vec<u8>,
    /// This node's id (HELLO / HELLO_OK).
    pub node_id: String,
    /// This node's role (a client's HELLO).
    pub role: String,
    /// The link's counters.
    pub stats: Arc<ClusterStats>,
}

/// Why a client's connection failed before HELLO_OK.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    /// No HELLO_OK (or no handshake) within [`HELLO_TIMEOUT`].
    #[error("timed out")]
    Timeout,
    /// The TLS session gave no exporter to prove the token over.
    #[error("no TLS exporter")]
    NoExporter,
    /// HELLO_OK's token proof is wrong.
    #[error("the upstream does not hold the cluster token")]
    WrongProof,
    /// The upstream answered HELLO with ERROR.
    #[error("refused ({code:?}): {reason}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its reason.
        reason: String,
    },
    /// The upstream answered HELLO with something else, or sent bytes the codec refuses.
    #[error("unexpected answer to HELLO: {0}")]
    Unexpected(String),
    /// The connection closed first.
    #[error("connection lost: {0}")]
    Lost(String),
}

/// What a session tells its driver.
pub(crate) enum SessionEvent {
    /// HELLO / HELLO_OK done: the peer's node id. Flows may start.
    Ready {
        /// The peer's node id.
        peer: String,
    },
    /// Client: the connection failed before it was ready (it is closed).
    Failed(HelloError),
    /// Server: the peer asks for a broadcast. Answer with [`Session::serve`] or
    /// [`Session::not_found`] (now, or later: other requests go on meanwhile).
    Subscribe {
        /// The flow.
        id: u64,
        /// Its name.
        broadcast: String,
    },
    /// Server: the peer publishes a broadcast. Accept with [`Session::feed`] or refuse with
    /// [`Session::refuse_publish`].
    Publish {
        /// The flow.
        id: u64,
        /// Its name.
        broadcast: String,
        /// Its tracks.
        tracks: Vec<(TrackId, TrackInfo)>,
        /// Its metadata.
        metadata: Metadata,
    },
    /// Client: SUBSCRIBE accepted. Feed the flow ([`Session::feed`]) to read its groups.
    SubscribeOk {
        /// The flow.
        id: u64,
        /// The broadcast asked for.
        broadcast: String,
        /// The broadcast's tracks.
        tracks: Vec<(TrackId, TrackInfo)>,
        /// Its metadata.
        metadata: Metadata,
    },
    /// Client: SUBSCRIBE refused (the flow ends with [`SessionEvent::InEnded`]).
    SubscribeError {
        /// The flow.
        id: u64,
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// Client: PUBLISH accepted; the flow's groups go out.
    PublishOk {
        /// The flow.
        id: u64,
    },
    /// Client: PUBLISH refused (the flow ends with [`SessionEvent::OutEnded`]).
    PublishError {
        /// The flow.
        id: u64,
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// A flow this end received is over; its sink comes back.
    InEnded {
        /// The flow.
        id: u64,
        /// Its sink.
        sink: Sink,
        /// How it ended.
        end: FlowEnd,
    },
    /// A flow this end sent is over; its consumer comes back.
    OutEnded {
        /// The flow.
        id: u64,
        /// Its consumer.
        consumer: BroadcastConsumer,
        /// How it ended.
        end: FlowEnd,
    },
    /// The connection is closed (after [`SessionEvent::Failed`], or lost, or closed here): every
    /// flow ended before this.
    Closed {
        /// Why.
        reason: String,
    },
}

/// How a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlowEnd {
    /// The broadcast ended (ENDED, either way).
    Ended,
    /// Refused (SUBSCRIBE_ERROR, PUBLISH_ERROR), or stopped by its receiver (UNSUBSCRIBE).
    Stopped,
    /// The connection went.
    Lost,
}

/// Where a connection stands.
enum Phase {
    /// Waiting for HELLO (server) or for the handshake and HELLO_OK (client) until this.
    Hello(Instant),
    /// HELLO done: the peer's node id.
    Ready(String),
    /// Refused or failed: closed at this instant (after its ERROR left).
    Closing(Instant, ErrorCode, String),
    /// Closed; waiting to drain.
    Closed,
}

/// A flow this end sends.
struct OutFlow {
    id: SubscriptionId,
    consumer: BroadcastConsumer,
    groups: GroupCursor<StreamId>,
    /// Entries read from the hub, not written yet.
    queue: VecDeque<Arc<Entry>>,
    /// What is left of the item being written (group opening, header, payload).
    pending: [Bytes; 3],
    /// Waiting for its stream to be writable (or a stream to be available).
    blocked: bool,
    /// A publication waiting for PUBLISH_OK sends nothing yet.
    open: bool,
    /// It sends only the ladder's rungs (a transcoder's publication): groups still open at the
    /// source's keyframes, without the source's frames.
    ladder_only: bool,
}

/// A flow this end receives.
struct InFlow {
    sink: Sink,
    /// Its groups are read (the driver made its sink ready).
    fed: bool,
    order: GroupOrder<StreamId>,
    broadcast: String,
}

/// A group stream the peer opened.
struct InGroup {
    decoder: GroupDecoder,
    buf: BytesMut,
    /// The flow and sequence, once the header was read.
    route: Option<(u64, u64)>,
}

enum Pump {
    Idle,
    Blocked,
    Ended,
}

/// One cluster connection: quinn-proto's connection and the protocol on it.
pub(crate) struct Session {
    conn: Connection,
    side: Side,
    config: Arc<SessionConfig>,
    remote: SocketAddr,
    phase: Phase,
    ctl: Option<StreamId>,
    ctl_in: BytesMut,
    ctl_decoder: ControlDecoder,
    ctl_out: BytesMut,
    outs: HashMap<u64, OutFlow>,
    ins: HashMap<u64, InFlow>,
    /// Server: SUBSCRIBEs not answered yet.
    asked: HashSet<u64>,
    groups: HashMap<StreamId, InGroup>,
    events: VecDeque<SessionEvent>,
    /// Scratch: entries read from the hub (kept for its capacity).
    entries: Vec<Arc<Entry>>,
    /// Scratch: flows to pump (kept for its capacity).
    scratch: Vec<u64>,
    /// Scratch: group streams just opened (kept for its capacity).
    opened: Vec<StreamId>,
    closed_told: bool,
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

impl Session {
    /// The session of a connection this end accepted.
    pub(crate) fn server(conn: Connection, config: Arc<SessionConfig>, now: Instant) -> Self {
        Self::new(conn, Side::Server, config, now)
    }

    /// The session of a connection this end opened: HELLO goes out once the handshake is done.
    pub(crate) fn client(conn: Connection, config: Arc<SessionConfig>, now: Instant) -> Self {
        Self::new(conn, Side::Client, config, now)
    }

    fn new(conn: Connection, side: Side, config: Arc<SessionConfig>, now: Instant) -> Self {
        Self {
            remote: conn.remote_address(),
            conn,
            side,
            config,
            phase: Phase::Hello(now + HELLO_TIMEOUT),
            ctl: None,
            ctl_in: BytesMut::new(),
            ctl_decoder: ControlDecoder::new(),
            ctl_out: BytesMut::new(),
            outs: HashMap::new(),
            ins: HashMap::new(),
            asked: HashSet::new(),
            groups: HashMap::new(),
            events: VecDeque::new(),
            entries: Vec::with_capacity(READ_MAX),
            scratch: Vec::new(),
            opened: Vec::new(),
            closed_told: false,
        }
    }

    /// The peer's address.
    pub(crate) fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The peer's node id, once ready.
    pub(crate) fn peer(&self) -> Option<&str> {
        match &self.phase {
            Phase::Ready(p) => Some(p),
            _ => None,
        }
    }

    /// Whether HELLO / HELLO_OK are done and the connection is not closing.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    // ---- input -----------------------------------------------------------------------------

    /// An event from the endpoint (a datagram for this connection).
    pub(crate) fn handle_event(&mut self, ev: ConnectionEvent) {
        self.conn.handle_event(ev);
    }

    /// The endpoint's answer to one of [`Self::poll_endpoint_event`]'s events.
    pub(crate) fn poll_endpoint_event(&mut self) -> Option<EndpointEvent> {
        self.conn.poll_endpoint_events()
    }

    /// The earliest time [`Self::handle_timeout`] has work.
    pub(crate) fn poll_timeout(&mut self) -> Option<Instant> {
        let phase = match self.phase {
            Phase::Hello(t) | Phase::Closing(t, ..) => Some(t),
            Phase::Ready(_) | Phase::Closed => None,
        };
        let stalls = self
            .ins
            .values()
            .filter(|f| f.fed)
            .filter_map(|f| f.order.stall_deadline());
        [self.conn.poll_timeout(), phase]
            .into_iter()
            .flatten()
            .chain(stalls)
            .min()
    }

    /// Time passed: the connection's timers, the HELLO deadline, an ERROR's linger, stalled
    /// groups.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
        }
        match &self.phase {
            Phase::Hello(deadline) if *deadline <= now => match self.side {
                Side::Server => self.refuse(ErrorCode::ProtocolViolation, "no HELLO".into(), now),
                Side::Client => self.fail(HelloError::Timeout, now),
            },
            Phase::Closing(at, ..) if *at <= now => {
                if let Phase::Closing(_, code, why) =
                    std::mem::replace(&mut self.phase, Phase::Closed)
                {
                    self.conn
                        .close(now, varint(code.code()), Bytes::from(why.into_bytes()));
                }
            }
            _ => {}
        }
        self.stalls(now);
    }

    /// Handles what the connection has to say (streams opened, readable, writable; the
    /// handshake; loss). Call after [`Self::handle_event`] and [`Self::handle_timeout`].
    pub(crate) fn process(&mut self, now: Instant) {
        let mut blocked_ready = false;
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::Connected => {
                    if self.side == Side::Client {
                        self.hello(now);
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    let mut control = false;
                    while let Some(id) = self.conn.streams().accept(Dir::Bi) {
                        if self.ctl.is_none() && self.side == Side::Server {
                            // Answers go before any group's media.
                            let _ = self.conn.send_stream(id).set_priority(i32::MAX);
                            self.ctl = Some(id);
                            control = true;
                        } else {
                            let _ = self.conn.recv_stream(id).stop(varint(0));
                        }
                    }
                    if control {
                        self.read_control(now);
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    let mut opened = std::mem::take(&mut self.opened);
                    opened.clear();
                    while let Some(id) = self.conn.streams().accept(Dir::Uni) {
                        self.groups.insert(
                            id,
                            InGroup {
                                decoder: GroupDecoder::new(),
                                buf: BytesMut::new(),
                                route: None,
                            },
                        );
                        opened.push(id);
                    }
                    for &s in &opened {
                        self.read_group(s, now);
                    }
                    self.opened = opened;
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    if self.ctl == Some(id) {
                        self.read_control(now);
                    } else {
                        self.read_group(id, now);
                    }
                }
                Event::Stream(StreamEvent::Writable { .. } | StreamEvent::Available { .. }) => {
                    blocked_ready = true;
                }
                Event::Stream(StreamEvent::Finished { .. } | StreamEvent::Stopped { .. }) => {}
                Event::ConnectionLost { reason } => {
                    match (&self.phase, self.side) {
                        (Phase::Hello(_), Side::Client) => {
                            self.events.push_back(SessionEvent::Failed(HelloError::Lost(
                                reason.to_string(),
                            )));
                        }
                        (Phase::Ready(peer), _) => {
                            info!(remote = %self.remote, %peer, %reason, "cluster peer left");
                        }
                        _ => {}
                    }
                    self.phase = Phase::Closed;
                    self.end_all(FlowEnd::Lost);
                    self.tell_closed(reason.to_string());
                }
                Event::HandshakeDataReady | Event::DatagramReceived | Event::DatagramsUnblocked => {
                }
            }
        }
        if blocked_ready {
            self.flush_control();
            self.pump_blocked();
        }
    }

    // ---- output ----------------------------------------------------------------------------

    /// The next datagram (or GSO batch of up to `max` datagrams) to send, built into `buf`.
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        max: usize,
        buf: &mut Vec<u8>,
    ) -> Option<quinn_proto::Transmit> {
        self.conn.poll_transmit(now, max, buf)
    }

    /// What happened, for the driver to act on.
    pub(crate) fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Whether the connection is closed and drained: the session can go.
    pub(crate) fn is_drained(&self) -> bool {
        self.conn.is_drained()
    }

    // ---- requests (client) -----------------------------------------------------------------

    /// Asks the peer for `broadcast` as flow `id` (unique among this end's flows); its groups
    /// go into `sink` once fed ([`SessionEvent::SubscribeOk`], then [`Self::feed`]).
    pub(crate) fn subscribe(&mut self, id: u64, broadcast: &str, sink: Sink, now: Instant) {
        self.ins.insert(
            id,
            InFlow {
                sink,
                fed: false,
                order: GroupOrder::new(now),
                broadcast: broadcast.to_owned(),
            },
        );
        self.send_control(&ControlMessage::Subscribe {
            id: SubscriptionId(id),
            broadcast: broadcast.to_owned(),
        });
        self.route_waiting(id, now);
    }

    /// Stops receiving flow `id` (UNSUBSCRIBE); its sink comes back (no event).
    pub(crate) fn unsubscribe(&mut self, id: u64) -> Option<Sink> {
        let flow = self.remove_in(id)?;
        self.send_control(&ControlMessage::Unsubscribe {
            id: SubscriptionId(id),
        });
        Some(flow.sink)
    }

    /// Pushes `consumer`'s broadcast to the peer as flow `id` (PUBLISH); its groups go out
    /// after PUBLISH_OK. `ladder_only`: only its ABR ladder's rungs, which the peer adds to
    /// its live broadcast of that name (a transcoder's publication).
    pub(crate) fn publish(&mut self, id: u64, consumer: BroadcastConsumer, ladder_only: bool) {
        let (tracks, metadata) = shared_tracks(&consumer, ladder_only);
        let broadcast = consumer.broadcast().name().to_owned();
        let mut flow = OutFlow::new(SubscriptionId(id), consumer, false);
        flow.ladder_only = ladder_only;
        self.outs.insert(id, flow);
        self.send_control(&ControlMessage::Publish {
            id: SubscriptionId(id),
            broadcast,
            tracks,
            metadata,
        });
    }

    // ---- answers (server) ------------------------------------------------------------------

    /// Serves the peer's SUBSCRIBE `id` from `consumer` (SUBSCRIBE_OK, then its groups). The
    /// consumer comes back when the SUBSCRIBE is no longer asked (withdrawn, or the connection
    /// closed).
    pub(crate) fn serve(
        &mut self,
        id: u64,
        consumer: BroadcastConsumer,
    ) -> Result<(), BroadcastConsumer> {
        if !self.asked.remove(&id) {
            return Err(consumer);
        }
        let (tracks, metadata) = shared_tracks(&consumer, false);
        self.send_control(&ControlMessage::SubscribeOk {
            id: SubscriptionId(id),
            tracks,
            metadata,
        });
        if let Phase::Ready(peer) = &self.phase {
            let broadcast = consumer.broadcast().name();
            info!(%peer, %broadcast, id, "cluster subscription from downstream");
        }
        self.outs
            .insert(id, OutFlow::new(SubscriptionId(id), consumer, true));
        self.pump(id);
        Ok(())
    }

    /// Answers the peer's SUBSCRIBE `id`: not here.
    pub(crate) fn not_found(&mut self, id: u64, broadcast: &str) {
        if !self.asked.remove(&id) {
            return;
        }
        debug!(%broadcast, "SUBSCRIBE: not found");
        self.send_control(&ControlMessage::SubscribeError {
            id: SubscriptionId(id),
            code: ErrorCode::NotFound,
            reason: format!("broadcast {broadcast} is not live here"),
        });
    }

    /// Refuses the peer's PUBLISH `id`.
    pub(crate) fn refuse_publish(&mut self, id: u64, code: ErrorCode, reason: String) {
        if self.remove_in(id).is_none() {
            return;
        }
        self.send_control(&ControlMessage::PublishError {
            id: SubscriptionId(id),
            code,
            reason,
        });
    }

    /// The sink of flow `id`, which this end receives.
    pub(crate) fn sink_mut(&mut self, id: u64) -> Option<&mut Sink> {
        self.ins.get_mut(&id).map(|f| &mut f.sink)
    }

    /// Flow `id`'s sink is ready (a producer, when it had none, is `producer`): its groups are
    /// read from now on. For the peer's PUBLISH, this accepts it (PUBLISH_OK).
    pub(crate) fn feed(
        &mut self,
        id: u64,
        producer: Option<crate::media::BroadcastProducer>,
        now: Instant,
    ) {
        let Some(flow) = self.ins.get_mut(&id) else {
            return;
        };
        if producer.is_some() {
            flow.sink.producer = producer;
        }
        let was_fed = std::mem::replace(&mut flow.fed, true);
        if self.side == Side::Server && !was_fed {
            self.send_control(&ControlMessage::PublishOk {
                id: SubscriptionId(id),
            });
        }
        self.advance(id, now);
    }

    // ---- sending flows ---------------------------------------------------------------------

    /// Writes flow `id` until it has nothing to write or its stream blocks; a flow whose
    /// broadcast ended is ended (ENDED).
    pub(crate) fn pump(&mut self, id: u64) {
        if self.conn.is_closed() {
            return;
        }
        let Some(flow) = self.outs.get_mut(&id) else {
            return;
        };
        if flow.blocked || !flow.open {
            return;
        }
        let conn = &mut self.conn;
        let stats = &self.config.stats;
        let entries = &mut self.entries;
        let (mut bytes, mut groups, mut resets) = (0u64, 0u64, 0u64);
        let outcome = loop {
            // What is left of the last item.
            if flow.pending.iter().any(|b| !b.is_empty()) {
                let Some(&mut s) = flow.groups.current() else {
                    flow.pending = Default::default();
                    continue;
                };
                match conn.send_stream(s).write_chunks(&mut flow.pending) {
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
                entries.clear();
                match flow.consumer.read(entries, READ_MAX) {
                    ReadOutcome::Ended => {
                        if let Some(s) = flow.groups.take_current() {
                            let _ = conn.send_stream(s).finish();
                        }
                        break Pump::Ended;
                    }
                    ReadOutcome::Read(0) => break Pump::Idle,
                    ReadOutcome::Skipped { .. } => {
                        // The consumer jumped to the newest group: the current one is
                        // incomplete.
                        if let Some(s) = flow.groups.take_current() {
                            let _ = conn
                                .send_stream(s)
                                .reset(varint(ResetCode::GroupDropped.code()));
                            resets += 1;
                        }
                    }
                    ReadOutcome::Read(_) => {}
                }
                flow.queue.extend(entries.drain(..));
                continue;
            };
            let (encoding, payload) = match flow.groups.step(&e) {
                Step::Skip => continue,
                Step::Write(encoding, payload) => (encoding, payload),
                Step::Start(encoding, payload) => {
                    let Some(s) = conn.streams().open(Dir::Uni) else {
                        // No stream credit yet: wait for the peer to give some.
                        flow.queue.push_front(e);
                        flow.blocked = true;
                        break Pump::Blocked;
                    };
                    let seq = flow.groups.seq();
                    let _ = conn
                        .send_stream(s)
                        .set_priority(seq.min(i32::MAX as u64) as i32);
                    let Some(opening) =
                        group_opening(flow.id, seq, flow.consumer.broadcast(), flow.ladder_only)
                    else {
                        let _ = conn
                            .send_stream(s)
                            .reset(varint(ResetCode::Cancelled.code()));
                        continue;
                    };
                    flow.groups.begin(s, |old, retire| {
                        let mut old = conn.send_stream(*old);
                        match retire {
                            Retire::Reset => {
                                if old.reset(varint(ResetCode::GroupDropped.code())).is_ok() {
                                    debug!(id, "older group reset (unfinished)");
                                    resets += 1;
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
            if flow.ladder_only && !entry_track(&e).is_ladder() {
                // A source entry of a ladder-only flow: it opened the group, if it did; its
                // bytes stay here.
                continue;
            }
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
        if matches!(outcome, Pump::Ended)
            && let Some(flow) = self.outs.remove(&id)
        {
            self.send_control(&ControlMessage::Ended { id: flow.id });
            self.events.push_back(SessionEvent::OutEnded {
                id,
                consumer: flow.consumer,
                end: FlowEnd::Ended,
            });
        }
    }

    /// Pumps the flows that waited for a writable stream.
    fn pump_blocked(&mut self) {
        let mut unblocked = std::mem::take(&mut self.scratch);
        unblocked.clear();
        for (id, f) in self.outs.iter_mut().filter(|(_, f)| f.blocked) {
            f.blocked = false;
            unblocked.push(*id);
        }
        for &id in &unblocked {
            self.pump(id);
        }
        self.scratch = unblocked;
    }

    /// Ends publication `id` before its broadcast ends (ENDED; the peer lets go of what it
    /// wrote); its consumer comes back in [`SessionEvent::OutEnded`].
    pub(crate) fn unpublish(&mut self, id: u64) {
        if let Some(flow) = self.outs.get(&id) {
            let sid = flow.id;
            self.drop_out(id, FlowEnd::Ended);
            self.send_control(&ControlMessage::Ended { id: sid });
        }
    }

    /// Ends flow `id` that this end sends, its groups reset; its consumer comes back in
    /// [`SessionEvent::OutEnded`].
    fn drop_out(&mut self, id: u64, end: FlowEnd) {
        let Some(mut flow) = self.outs.remove(&id) else {
            return;
        };
        for s in flow.groups.take_all() {
            let _ = self
                .conn
                .send_stream(s)
                .reset(varint(ResetCode::Cancelled.code()));
        }
        self.events.push_back(SessionEvent::OutEnded {
            id,
            consumer: flow.consumer,
            end,
        });
    }

    // ---- control ---------------------------------------------------------------------------

    /// Client: the handshake is done; open the control stream and say HELLO.
    fn hello(&mut self, now: Instant) {
        let Some(exporter) = self.exporter() else {
            self.fail(HelloError::NoExporter, now);
            return;
        };
        let Some(s) = self.conn.streams().open(Dir::Bi) else {
            self.fail(HelloError::Unexpected("no stream credit".into()), now);
            return;
        };
        // Requests and answers go before any group's media (docs/cluster-protocol.md).
        let _ = self.conn.send_stream(s).set_priority(i32::MAX);
        self.ctl = Some(s);
        // The HELLO_OK deadline runs from here, as the handshake's ran from the start.
        self.phase = Phase::Hello(now + HELLO_TIMEOUT);
        // HELLO goes first, before requests made while the handshake ran.
        let queued = std::mem::take(&mut self.ctl_out);
        self.send_control(&ControlMessage::Hello {
            version: wire::VERSION,
            token_proof: wire::token_proof(&self.config.token, Side::Client, &exporter),
            node_id: self.config.node_id.clone(),
            role: self.config.role.clone(),
        });
        self.ctl_out.extend_from_slice(&queued);
        self.flush_control();
    }

    fn exporter(&self) -> Option<[u8; wire::EXPORTER_LEN]> {
        let mut exporter = [0u8; wire::EXPORTER_LEN];
        self.conn
            .crypto_session()
            .export_keying_material(&mut exporter, wire::EXPORTER_LABEL, b"")
            .ok()?;
        Some(exporter)
    }

    fn read_control(&mut self, now: Instant) {
        let Some(id) = self.ctl else { return };
        let mut ended = false;
        let mut failed = None;
        if let Ok(mut chunks) = self.conn.recv_stream(id).read(true) {
            loop {
                match chunks.next(64 << 10) {
                    Ok(Some(chunk)) => {
                        if self.ctl_in.len() + chunk.bytes.len() > 2 * wire::MAX_CONTROL_MESSAGE {
                            failed = Some("control stream overflow".to_owned());
                            break;
                        }
                        self.ctl_in.extend_from_slice(&chunk.bytes);
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
            if matches!(self.phase, Phase::Closing(..) | Phase::Closed) {
                return;
            }
            match self.ctl_decoder.decode(&mut self.ctl_in) {
                Ok(Some(m)) => self.control(m, now),
                Ok(None) => break,
                Err(e) => {
                    if self.side == Side::Client {
                        warn!(remote = %self.remote, error = %e, "malformed cluster control message from upstream; closing the connection");
                        self.protocol_failure(e.to_string(), now);
                        return;
                    }
                    let why = if matches!(self.phase, Phase::Hello(_)) {
                        format!("malformed HELLO: {e}")
                    } else {
                        warn!(remote = %self.remote, error = %e, "malformed cluster control message; closing the connection");
                        e.to_string()
                    };
                    self.refuse(ErrorCode::ProtocolViolation, why, now);
                    return;
                }
            }
        }
        if let Some(why) = failed {
            info!(remote = %self.remote, error = %why, "cluster peer's control stream failed");
            self.protocol_failure(why, now);
        } else if ended {
            match (&self.phase, self.side) {
                (Phase::Hello(_), Side::Server) => {
                    self.refuse(ErrorCode::ProtocolViolation, "no HELLO".into(), now);
                }
                _ => self.protocol_failure("control stream ended".into(), now),
            }
        }
    }

    /// The control stream failed or carried garbage: the connection closes (a client before
    /// HELLO_OK reports it).
    fn protocol_failure(&mut self, why: String, now: Instant) {
        if self.side == Side::Client && matches!(self.phase, Phase::Hello(_)) {
            self.fail(HelloError::Unexpected(why), now);
        } else {
            let code = match self.side {
                Side::Client => ErrorCode::ProtocolViolation.code(),
                Side::Server => wire::CLOSE_NO_ERROR,
            };
            self.close(now, code, &why);
        }
    }

    fn control(&mut self, msg: ControlMessage, now: Instant) {
        if let Phase::Hello(_) = self.phase {
            match self.side {
                Side::Server => self.hello_in(msg, now),
                Side::Client => self.hello_ok(msg, now),
            }
            return;
        }
        let Phase::Ready(peer) = &self.phase else {
            return;
        };
        let peer = peer.clone();
        match (self.side, msg) {
            (Side::Server, ControlMessage::Subscribe { id, broadcast }) => {
                self.drop_out(id.0, FlowEnd::Stopped);
                self.asked.insert(id.0);
                self.events.push_back(SessionEvent::Subscribe {
                    id: id.0,
                    broadcast,
                });
            }
            (Side::Server, ControlMessage::Unsubscribe { id }) => {
                self.asked.remove(&id.0);
                self.drop_out(id.0, FlowEnd::Stopped);
            }
            (
                Side::Server,
                ControlMessage::Publish {
                    id,
                    broadcast,
                    tracks,
                    metadata,
                },
            ) => {
                if let Some(old) = self.ins.remove(&id.0) {
                    self.events.push_back(SessionEvent::InEnded {
                        id: id.0,
                        sink: old.sink,
                        end: FlowEnd::Stopped,
                    });
                }
                self.ins.insert(
                    id.0,
                    InFlow {
                        sink: Sink::new(None),
                        fed: false,
                        order: GroupOrder::new(now),
                        broadcast: broadcast.clone(),
                    },
                );
                // Group streams that overtook the PUBLISH wait for its answer.
                self.route_waiting(id.0, now);
                self.events.push_back(SessionEvent::Publish {
                    id: id.0,
                    broadcast,
                    tracks,
                    metadata,
                });
            }
            (_, ControlMessage::Ended { id }) => {
                if let Some(flow) = self.remove_in(id.0) {
                    self.events.push_back(SessionEvent::InEnded {
                        id: id.0,
                        sink: flow.sink,
                        end: FlowEnd::Ended,
                    });
                }
            }
            (
                Side::Client,
                ControlMessage::SubscribeOk {
                    id,
                    tracks,
                    metadata,
                },
            ) => {
                let Some(flow) = self.ins.get(&id.0) else {
                    return;
                };
                self.events.push_back(SessionEvent::SubscribeOk {
                    id: id.0,
                    broadcast: flow.broadcast.clone(),
                    tracks,
                    metadata,
                });
            }
            (Side::Client, ControlMessage::SubscribeError { id, code, reason }) => {
                if let Some(flow) = self.remove_in(id.0) {
                    self.events.push_back(SessionEvent::SubscribeError {
                        id: id.0,
                        code,
                        reason,
                    });
                    self.events.push_back(SessionEvent::InEnded {
                        id: id.0,
                        sink: flow.sink,
                        end: FlowEnd::Stopped,
                    });
                }
            }
            (Side::Client, ControlMessage::PublishOk { id }) => {
                if let Some(flow) = self.outs.get_mut(&id.0) {
                    flow.open = true;
                    self.events.push_back(SessionEvent::PublishOk { id: id.0 });
                    self.pump(id.0);
                }
            }
            (Side::Client, ControlMessage::PublishError { id, code, reason }) => {
                if self.outs.contains_key(&id.0) {
                    self.events.push_back(SessionEvent::PublishError {
                        id: id.0,
                        code,
                        reason,
                    });
                    self.drop_out(id.0, FlowEnd::Stopped);
                }
            }
            (_, ControlMessage::Error { code, reason }) => {
                warn!(remote = %self.remote, %peer, ?code, %reason, "cluster peer reported an error");
            }
            (
                _,
                ControlMessage::GoAway
                | ControlMessage::Announce { .. }
                | ControlMessage::Unannounce { .. },
            ) => {}
            (Side::Server, other) => {
                let why = format!("{} is not a request this node takes", other.name());
                warn!(%peer, reason = %why, "cluster peer sent a wrong request; closing the connection");
                self.refuse(ErrorCode::ProtocolViolation, why, now);
            }
            (Side::Client, other) => {
                debug!(%peer, message = other.name(), "ignored from upstream");
            }
        }
    }

    /// Server: the peer's first message.
    fn hello_in(&mut self, msg: ControlMessage, now: Instant) {
        let exporter = self.exporter();
        let ControlMessage::Hello {
            version,
            token_proof,
            node_id,
            role,
        } = msg
        else {
            let why = format!("expected HELLO, got {}", msg.name());
            self.refuse(ErrorCode::ProtocolViolation, why, now);
            return;
        };
        if version != wire::VERSION {
            let why = format!("wire version {version} is not {}", wire::VERSION);
            self.refuse(ErrorCode::UnsupportedVersion, why, now);
            return;
        }
        let token = &self.config.token;
        let Some(exporter) =
            exporter.filter(|e| wire::verify_token_proof(token, Side::Client, e, &token_proof))
        else {
            self.refuse(ErrorCode::Unauthorized, "wrong cluster token".into(), now);
            return;
        };
        info!(remote = %self.remote, peer = %node_id, %role, "cluster peer connected");
        let answer = ControlMessage::HelloOk {
            node_id: self.config.node_id.clone(),
            token_proof: wire::token_proof(token, Side::Server, &exporter),
        };
        self.phase = Phase::Ready(node_id.clone());
        self.send_control(&answer);
        self.events.push_back(SessionEvent::Ready { peer: node_id });
    }

    /// Client: the answer to HELLO.
    fn hello_ok(&mut self, msg: ControlMessage, now: Instant) {
        match msg {
            ControlMessage::HelloOk {
                node_id,
                token_proof,
            } => {
                let valid = self.exporter().is_some_and(|e| {
                    wire::verify_token_proof(&self.config.token, Side::Server, &e, &token_proof)
                });
                if !valid {
                    self.conn.close(
                        now,
                        varint(ErrorCode::Unauthorized.code()),
                        Bytes::from_static(b"wrong token proof"),
                    );
                    self.phase = Phase::Closed;
                    self.events
                        .push_back(SessionEvent::Failed(HelloError::WrongProof));
                    self.end_all(FlowEnd::Lost);
                    self.tell_closed("wrong token proof".into());
                    return;
                }
                info!(upstream = %self.remote, peer = %node_id, "connected upstream");
                self.phase = Phase::Ready(node_id.clone());
                self.events.push_back(SessionEvent::Ready { peer: node_id });
            }
            ControlMessage::Error { code, reason } => {
                self.fail(HelloError::Refused { code, reason }, now);
            }
            other => self.fail(HelloError::Unexpected(format!("{other:?}")), now),
        }
    }

    /// Client: gives up before ready.
    fn fail(&mut self, why: HelloError, now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        self.conn.close(
            now,
            varint(wire::CLOSE_NO_ERROR),
            Bytes::from(why.to_string().into_bytes()),
        );
        self.phase = Phase::Closed;
        let reason = why.to_string();
        self.events.push_back(SessionEvent::Failed(why));
        self.end_all(FlowEnd::Lost);
        self.tell_closed(reason);
    }

    /// Refuses (or gives up on) a peer: ERROR, then close after [`ERROR_LINGER`].
    fn refuse(&mut self, code: ErrorCode, why: String, now: Instant) {
        if matches!(self.phase, Phase::Closing(..) | Phase::Closed) {
            return;
        }
        if let Phase::Hello(_) = self.phase {
            self.config.stats.refused.fetch_add(1, Relaxed);
            warn!(remote = %self.remote, reason = %why, "cluster peer refused");
        }
        self.send_control(&ControlMessage::Error {
            code,
            reason: why.clone(),
        });
        if let Some(s) = self.ctl {
            let _ = self.conn.send_stream(s).finish();
        }
        self.phase = Phase::Closing(now + ERROR_LINGER, code, why.clone());
        self.end_all(FlowEnd::Lost);
        self.tell_closed(why);
    }

    /// Closes the connection now with `code`; every flow ends.
    pub(crate) fn close(&mut self, now: Instant, code: u64, why: &str) {
        if !matches!(self.phase, Phase::Closed) {
            self.conn
                .close(now, varint(code), Bytes::copy_from_slice(why.as_bytes()));
            self.phase = Phase::Closed;
        }
        self.end_all(FlowEnd::Lost);
        self.tell_closed(why.to_owned());
    }

    fn send_control(&mut self, msg: &ControlMessage) {
        if let Err(e) = wire::encode_control(msg, &mut self.ctl_out) {
            warn!(error = %e, message = msg.name(), "cluster control message not encodable");
            return;
        }
        self.flush_control();
    }

    fn flush_control(&mut self) {
        let Some(s) = self.ctl else { return };
        if self.ctl_out.is_empty() {
            return;
        }
        if let Ok(n) = self.conn.send_stream(s).write(&self.ctl_out) {
            let _ = self.ctl_out.split_to(n);
        }
    }

    // ---- receiving flows -------------------------------------------------------------------

    /// Group streams of flow `id` whose header was read before the flow existed.
    fn route_waiting(&mut self, id: u64, now: Instant) {
        let early: Vec<StreamId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.route.is_some_and(|(f, _)| f == id))
            .map(|(s, _)| *s)
            .collect();
        for s in early {
            let Some((_, seq)) = self.groups.get(&s).and_then(|g| g.route) else {
                continue;
            };
            self.offer(id, seq, s, now);
        }
    }

    /// Group `seq` of flow `id` arrived on `s`.
    fn offer(&mut self, id: u64, seq: u64, s: StreamId, now: Instant) {
        let Some(flow) = self.ins.get_mut(&id) else {
            return;
        };
        if let Err(s) = flow.order.offer(seq, s) {
            self.drop_group(s, ResetCode::GroupDropped);
            return;
        }
        self.advance(id, now);
    }

    /// Reads group stream `s`: its header (to route it), then, when it is its fed flow's
    /// current group, its frames into the flow's sink.
    fn read_group(&mut self, s: StreamId, now: Instant) {
        let Some(g) = self.groups.get_mut(&s) else {
            return;
        };
        // A routed group that is not its fed flow's current one waits unread.
        if let Some((f, seq)) = g.route
            && !self
                .ins
                .get(&f)
                .is_some_and(|f| f.fed && f.order.current().map(|c| c.0) == Some(seq))
        {
            return;
        }
        if g.route.is_none() && !matches!(self.phase, Phase::Ready(_)) {
            self.drop_group(s, ResetCode::Cancelled);
            return;
        }
        let mut end = None;
        let mut read = 0u64;
        if let Ok(mut chunks) = self.conn.recv_stream(s).read(true) {
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
        let stats = &self.config.stats;
        stats.bytes_in.fetch_add(read, Relaxed);
        if g.route.is_none() {
            match g.decoder.decode(&mut g.buf) {
                Ok(Some(GroupEvent::Header(h))) => {
                    let (f, seq) = (h.subscription.0, h.sequence.0);
                    g.route = Some((f, seq));
                    if self.ins.contains_key(&f) {
                        self.offer(f, seq, s, now);
                    } else if end.is_some() || self.side == Side::Client {
                        // A server keeps a group whose PUBLISH it overtook, for as long as the
                        // connection lasts; a client's flows all exist before their groups.
                        self.drop_group(s, ResetCode::Cancelled);
                    }
                    return;
                }
                Ok(Some(_)) | Err(_) => {
                    debug!(remote = %self.remote, "group stream without a header; dropped");
                    self.drop_group(s, ResetCode::Cancelled);
                    return;
                }
                Ok(None) => {
                    if end.is_some() {
                        self.groups.remove(&s);
                    }
                    return;
                }
            }
        }
        let Some((f, seq)) = g.route else { return };
        let Some(flow) = self.ins.get_mut(&f) else {
            return;
        };
        let backlog = flow.order.progressed(now);
        let drained = flow.sink.drain(&mut g.decoder, &mut g.buf, stats, backlog);
        if let Err(e) = drained {
            warn!(broadcast = %flow.broadcast, group = seq, error = %e, "malformed group stream; dropped");
            let _ = self
                .conn
                .recv_stream(s)
                .stop(varint(ResetCode::Cancelled.code()));
            end = Some(false);
        }
        if let Some(reset) = end {
            self.groups.remove(&s);
            if reset {
                stats.groups_reset.fetch_add(1, Relaxed);
            }
            flow.order.done();
            self.advance(f, now);
        }
    }

    /// Reads flow `id`'s current group (the next waiting one, when none is current).
    fn advance(&mut self, id: u64, now: Instant) {
        let Some(flow) = self.ins.get_mut(&id) else {
            return;
        };
        if !flow.fed {
            return;
        }
        let before = flow.order.current();
        if let Some((_, s)) = flow.order.advance(now)
            && before.is_none()
        {
            self.read_group(s, now);
        }
    }

    /// Drops current groups that made no progress for the stall time while a newer one waits.
    fn stalls(&mut self, now: Instant) {
        let mut stalled = std::mem::take(&mut self.scratch);
        stalled.clear();
        stalled.extend(
            self.ins
                .iter()
                .filter(|(_, f)| f.fed && f.order.stall_deadline().is_some_and(|t| t <= now))
                .map(|(id, _)| *id),
        );
        for &id in &stalled {
            let Some(flow) = self.ins.get_mut(&id) else {
                continue;
            };
            if let Some((_, s)) = flow.order.done() {
                self.drop_group(s, ResetCode::GroupDropped);
                self.config.stats.groups_reset.fetch_add(1, Relaxed);
            }
            self.advance(id, now);
        }
        self.scratch = stalled;
    }

    /// Removes flow `id` that this end receives, its group streams stopped.
    fn remove_in(&mut self, id: u64) -> Option<InFlow> {
        let mut flow = self.ins.remove(&id)?;
        for s in flow.order.take_all() {
            self.drop_group(s, ResetCode::Cancelled);
        }
        Some(flow)
    }

    /// Stops group stream `s` (STOP_SENDING `code`) and forgets it.
    fn drop_group(&mut self, s: StreamId, code: ResetCode) {
        let _ = self.conn.recv_stream(s).stop(varint(code.code()));
        self.groups.remove(&s);
    }

    // ---- the end ---------------------------------------------------------------------------

    /// Ends every flow (the connection is closing or lost).
    fn end_all(&mut self, end: FlowEnd) {
        self.asked.clear();
        self.groups.clear();
        for (id, flow) in self.ins.drain() {
            self.events.push_back(SessionEvent::InEnded {
                id,
                sink: flow.sink,
                end,
            });
        }
        for (id, flow) in self.outs.drain() {
            self.events.push_back(SessionEvent::OutEnded {
                id,
                consumer: flow.consumer,
                end,
            });
        }
    }

    /// The connection is drained: flows still held end as lost (a connection that went without
    /// a word).
    pub(crate) fn forget(&mut self) {
        self.phase = Phase::Closed;
        self.end_all(FlowEnd::Lost);
        self.tell_closed("drained".into());
    }

    fn tell_closed(&mut self, reason: String) {
        if !std::mem::replace(&mut self.closed_told, true) {
            self.events.push_back(SessionEvent::Closed { reason });
        }
    }
}

#[cfg(test)]
impl Session {
    /// The connection underneath, for tests that write streams by hand.
    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Pumps every flow this end sends (tests have no hub wakes).
    pub(crate) fn pump_all(&mut self) {
        let ids: Vec<u64> = self.outs.keys().copied().collect();
        for id in ids {
            self.pump(id);
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;

impl OutFlow {
    fn new(id: SubscriptionId, consumer: BroadcastConsumer, open: bool) -> Self {
        Self {
            id,
            consumer,
            groups: GroupCursor::new(),
            queue: VecDeque::new(),
            pending: Default::default(),
            blocked: false,
            open,
            ladder_only: false,
        }
    }
}

/// The track an entry belongs to.
fn entry_track(e: &Entry) -> TrackId {
    match &e.item {
        crate::media::Item::Config { track, .. } | crate::media::Item::Frame { track, .. } => {
            *track
        }
    }
}
