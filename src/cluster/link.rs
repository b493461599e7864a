//! The node's end of the cluster link on quinn: fetching broadcasts from upstream on demand,
//! and publishing local ones upstream. Serving other nodes is [`super::serve`]'s, on its own
//! socket and thread; this module owns the [`Link`] handle both use (its counters are
//! [`crate::metrics::ClusterStats`]). A link holds the node's [`Hub`], not the node's context,
//! which holds the link.
//!
//! Guarantees:
//! - A connection is used only after both ends proved the cluster token over its TLS exporter
//!   (HELLO / HELLO_OK); an upstream that fails is told why (ERROR) and closed, nothing else
//!   noticed.
//! - Fetching: the first local subscriber of a broadcast the hub lacks makes one upstream
//!   subscription (however many ask at once); its frames are written into the local hub with
//!   their origin ingest times. It is dropped [`ClusterConfig::linger`] after the last local
//!   subscriber leaves. When its upstream fails, it re-subscribes through the next one; frames
//!   the hub already has are skipped, so local players see no repeat and keep their sessions.
//! - A local subscriber is always fed from upstream, whenever it arrives: a fetched broadcast is
//!   in the hub only while its fetch runs. When a fetch ends (dropped unwatched, ended upstream,
//!   no upstream left) its broadcast ends at once, with no publish grace; dropping it unwatched
//!   is decided atomically with subscribers attaching (`Fetches`), so one that arrives as the
//!   fetch lets go either keeps it going or starts a new one. The same holds for the serving
//!   side's subscriptions from downstream nodes (they are local subscribers).
//! - Only a broadcast's own tracks ([`TrackId::is_source`]) travel; each node makes its own
//!   on-demand renditions (Opus, B-frame-free video) from them.
//! - Publishing upstream sends the hub's groups ([`crate::media::Entry::group_start`]) through
//!   the serving side's policy ([`serve::GroupCursor`]).
//! - Errors in one connection, subscription or stream close only that; they never panic.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::serve::{self, GroupCursor, Retire, Step};
use super::tls::{self, TlsFiles};
use super::wire::{
    self, ControlDecoder, ControlMessage, ErrorCode, GroupDecoder, GroupEvent, ResetCode, Side,
    SubscriptionId,
};
use crate::config::ClusterConfig;
use crate::manager::BoxFuture;
use crate::media::hub::Hub;
use crate::media::hub::wall_clock_us;
use crate::media::{BroadcastConsumer, BroadcastProducer, ReadOutcome, TrackId, TrackInfo};
use crate::metrics::ClusterStats;

/// How long a peer has to finish HELLO.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SUBSCRIBE may wait for its answer.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A group that made no progress for this long while a newer one is waiting is dropped by the
/// receiver.
pub const GROUP_STALL: Duration = Duration::from_millis(500);
/// Chooses the upstream nodes a broadcast is fetched from (or published to), in the order they
/// are tried: the `--upstream` list ([`StaticUpstreams`]), or the stream manager's answer
/// ([`crate::manager::remote::ManagerUpstreams`]).
pub trait UpstreamChoice: Send + Sync {
    /// Candidate `HOST:PORT`s for `broadcast`.
    fn candidates<'a>(&'a self, broadcast: &'a str) -> BoxFuture<'a, Vec<String>>;
    /// Whether this node has upstreams at all.
    fn any(&self) -> bool;
}

/// The `--upstream` list.
pub struct StaticUpstreams(pub Vec<String>);

impl UpstreamChoice for StaticUpstreams {
    fn candidates<'a>(&'a self, _broadcast: &'a str) -> BoxFuture<'a, Vec<String>> {
        Box::pin(std::future::ready(self.0.clone()))
    }

    fn any(&self) -> bool {
        !self.0.is_empty()
    }
}

/// An upstream that failed is tried last for this long.
pub const FAILED_UPSTREAM_BACKOFF: Duration = Duration::from_secs(10);

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS set-up failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("binding the cluster link: {0}")]
    Bind(#[from] std::io::Error),
}

/// What a fetch came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FetchState {
    Waiting,
    Ready,
    Gone,
}

/// A fetch's entry in [`Fetches`].
struct FetchEntry {
    /// Which fetch: a later one of the same broadcast has another.
    serial: u64,
    state: watch::Receiver<FetchState>,
}

/// The fetch task's end of its entry in [`Fetches`].
struct FetchHandle {
    name: String,
    serial: u64,
    state: watch::Sender<FetchState>,
}

/// What a local subscriber gets from [`Fetches::attach`].
enum Attach {
    /// The broadcast is in the hub: published here, or fed by a running fetch.
    Consumer(BroadcastConsumer),
    /// A fetch of it is starting: wait for its answer, then attach again.
    Wait(watch::Receiver<FetchState>),
    /// Nothing fetches it: run this fetch, wait for its answer, then attach again.
    Start(FetchHandle, watch::Receiver<FetchState>),
}

/// The broadcasts being fetched from upstream.
///
/// A subscriber attaches ([`Fetches::attach`]) and a fetch lets go of its broadcast
/// ([`Fetches::let_go`]) under this registry's lock, and the hub decides an unwatched end
/// atomically with its consumers attaching ([`BroadcastProducer::end_if_unwatched`]). So a
/// fetched broadcast is in the hub only while its fetch runs: a subscriber either attaches to a
/// broadcast whose fetch goes on (and then keeps it going), or finds none and starts a fetch;
/// never one that nothing feeds.
#[derive(Default)]
struct Fetches {
    map: Mutex<HashMap<String, FetchEntry>>,
    serials: AtomicU64,
}

impl Fetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FetchEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A consumer of `name` from `hub`, else the fetch to wait for (started by the caller when
    /// it is new).
    fn attach(&self, hub: &Hub, name: &str) -> Attach {
        let mut map = self.lock();
        if let Some(c) = hub.subscribe(name) {
            return Attach::Consumer(c);
        }
        if let Some(f) = map.get(name)
            && *f.state.borrow() != FetchState::Gone
        {
            return Attach::Wait(f.state.clone());
        }
        let (state, rx) = watch::channel(FetchState::Waiting);
        let serial = self.serials.fetch_add(1, Relaxed);
        map.insert(
            name.to_owned(),
            FetchEntry {
                serial,
                state: rx.clone(),
            },
        );
        let fetch = FetchHandle {
            name: name.to_owned(),
            serial,
            state,
        };
        Attach::Start(fetch, rx)
    }

    /// Ends `fetch`: its broadcast (`producer`, when it has one) ends at once, its waiters hear
    /// [`FetchState::Gone`] and its entry goes. With `unwatched_only`, only while no consumer
    /// is attached; else the producer comes back and the fetch goes on.
    fn let_go(
        &self,
        fetch: &FetchHandle,
        producer: Option<BroadcastProducer>,
        unwatched_only: bool,
    ) -> Result<(), BroadcastProducer> {
        let mut map = self.lock();
        match producer {
            Some(p) if unwatched_only => p.end_if_unwatched()?,
            Some(p) => p.end(),
            None => {}
        }
        fetch.state.send_replace(FetchState::Gone);
        if map
            .get(&fetch.name)
            .is_some_and(|f| f.serial == fetch.serial)
        {
            map.remove(&fetch.name);
        }
        Ok(())
    }

    fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

/// What a subscription's receiver hears about.
enum FlowEvent {
    Control(ControlMessage),
    Group(u64, IncomingGroup),
}

/// A group stream whose header has been read.
struct IncomingGroup {
    stream: RecvStream,
    decoder: GroupDecoder,
    buf: BytesMut,
}

/// One connection to another node, after HELLO.
struct Peer {
    conn: Connection,
    addr: String,
    ctl: mpsc::UnboundedSender<ControlMessage>,
    /// Flows this end receives (its subscriptions), by id.
    flows: Mutex<HashMap<u64, mpsc::UnboundedSender<FlowEvent>>>,
}

impl Peer {
    fn route(&self, id: u64, ev: FlowEvent) -> bool {
        let flows = self.flows.lock().unwrap_or_else(|p| p.into_inner());
        flows.get(&id).is_some_and(|tx| tx.send(ev).is_ok())
    }

    fn alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// A new flow this end receives: its id (from `ids`) and where its events arrive.
    fn open_flow(&self, ids: &AtomicU64) -> (u64, mpsc::UnboundedReceiver<FlowEvent>) {
        let id = ids.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        (id, rx)
    }
}

/// The node's end of the cluster link.
pub struct Link {
    /// The node's broadcasts: what is fetched goes in, what is published here goes up.
    hub: Hub,
    /// Where the link's tasks (and quinn's endpoint and connection drivers) run: the first
    /// serving thread's runtime on a node that serves, so a frame fetched from upstream is
    /// served on the thread that received it with no wake across threads; else the node's.
    rt: tokio::runtime::Handle,
    /// Connects to upstreams.
    endpoint: quinn::Endpoint,
    /// Where [`super::serve`] listens.
    served: Option<SocketAddr>,
    client: quinn::ClientConfig,
    token: Vec<u8>,
    node_id: String,
    role: String,
    upstreams: Box<dyn UpstreamChoice>,
    /// Upstream connections, by address.
    peers: tokio::sync::Mutex<HashMap<String, Arc<Peer>>>,
    /// Upstreams that failed, and when: tried last for [`FAILED_UPSTREAM_BACKOFF`].
    failed: Mutex<HashMap<String, Instant>>,
    fetches: Fetches,
    /// Local broadcasts being published upstream.
    publishing: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    next_id: AtomicU64,
    linger: Duration,
    /// Counters for `/metrics`.
    pub stats: ClusterStats,
}

/// Why a control stream could not be read.
#[derive(Debug, thiserror::Error)]
enum ControlReadError {
    /// The peer sent bytes the codec refuses.
    #[error(transparent)]
    Malformed(#[from] wire::WireError),
    /// The stream or its connection failed (reset, closed, lost): nothing to answer.
    #[error(transparent)]
    Stream(#[from] quinn::ReadError),
}

/// Why an upstream could not be connected to (logged; the next candidate is tried).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// The upstream's name did not resolve.
    #[error(transparent)]
    Resolve(std::io::Error),
    /// The upstream's name resolved to no address.
    #[error("no address")]
    NoAddress,
    /// quinn refused to start the connection.
    #[error(transparent)]
    Start(#[from] quinn::ConnectError),
    /// The QUIC handshake did not finish within [`HELLO_TIMEOUT`].
    #[error("timed out")]
    Timeout,
    /// The connection failed (handshake, or opening the control stream).
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// The TLS session gave no exporter to prove the token over.
    #[error("no TLS exporter")]
    NoExporter,
    /// HELLO could not be encoded.
    #[error(transparent)]
    Encode(#[from] wire::WireError),
    /// HELLO could not be sent.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// No answer to HELLO within [`HELLO_TIMEOUT`].
    #[error("no HELLO_OK")]
    NoHelloOk,
    /// The answer to HELLO could not be read.
    #[error(transparent)]
    Control(#[from] ControlReadError),
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
    /// The upstream answered HELLO with something else (shown as it was decoded).
    #[error("unexpected answer to HELLO: {0}")]
    Unexpected(String),
}

/// Reads the next control message from `recv`; `Ok(None)` at a clean end.
async fn read_control(
    recv: &mut RecvStream,
    decoder: &mut ControlDecoder,
    buf: &mut BytesMut,
) -> Result<Option<ControlMessage>, ControlReadError> {
    loop {
        if let Some(m) = decoder.decode(buf)? {
            return Ok(Some(m));
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                decoder.finish(buf)?;
                return Ok(None);
            }
            Err(e) => return Err(ControlReadError::Stream(e)),
        }
    }
}

/// Writes control messages queued on the returned sender to `send`, in order.
fn control_writer(mut send: SendStream) -> mpsc::UnboundedSender<ControlMessage> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ControlMessage>();
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(1024);
        while let Some(m) = rx.recv().await {
            buf.clear();
            if let Err(e) = wire::encode_control(&m, &mut buf) {
                warn!(error = %e, message = m.name(), "cluster control message not encodable");
                continue;
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    tx
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

impl Link {
    /// Starts the link of a `role` node: serving on `cfg.listen` when set, fetching from
    /// `upstreams`.
    pub fn start(
        hub: Hub,
        cfg: &ClusterConfig,
        role: &str,
        upstreams: Box<dyn UpstreamChoice>,
    ) -> Result<Arc<Self>, LinkError> {
        let files = TlsFiles {
            cert: cfg.cert.as_deref(),
            key: cfg.key.as_deref(),
            ca: cfg.ca.as_deref(),
        };
        let client = tls::client_config(&files)?;
        // Serving has its own socket and driver (`serve`); quinn's endpoint only connects out.
        let serving = match cfg.listen {
            Some(addr) => {
                let sockets = serve::bind(addr, cfg.threads)?;
                let runtimes = sockets
                    .iter()
                    .map(|_| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some((
                    sockets,
                    runtimes,
                    Arc::new(tls::server_config(&cfg.node_id, &files)?),
                ))
            }
            None => None,
        };
        let rt = match serving.as_ref().and_then(|(_, r, _)| r.first()) {
            Some(first) => first.handle().clone(),
            None => tokio::runtime::Handle::current(),
        };
        let endpoint = {
            // Fetched media arrives here in bursts (a relay takes every broadcast it serves
            // through this socket): room for them while the thread is busy sending, as the
            // serving sockets have.
            let socket = std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(serve::SOCKET_BUFFER);
            // quinn spawns its endpoint driver on the runtime entered here.
            let _in = rt.enter();
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(quinn::TokioRuntime),
            )?
        };
        let served = match serving.as_ref().and_then(|(s, ..)| s.first()) {
            Some(socket) => Some(socket.local_addr()?),
            None => None,
        };
        let link = Arc::new(Self {
            hub,
            rt,
            endpoint,
            served,
            client,
            token: cfg.token.as_bytes().to_vec(),
            node_id: cfg.node_id.clone(),
            role: role.to_owned(),
            upstreams,
            peers: tokio::sync::Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            fetches: Fetches::default(),
            publishing: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            linger: cfg.linger,
            stats: ClusterStats::default(),
        });
        if let Some((sockets, runtimes, config)) = serving {
            for (n, (socket, rt)) in sockets.into_iter().zip(runtimes).enumerate() {
                serve::spawn(link.clone(), socket, config.clone(), n, rt)?;
            }
        }
        Ok(link)
    }

    /// Where the link's tasks run.
    pub(super) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// The node's broadcasts.
    pub(super) fn hub(&self) -> &Hub {
        &self.hub
    }

    pub(super) fn has_upstreams(&self) -> bool {
        self.upstreams.any()
    }

    pub(super) fn token(&self) -> &[u8] {
        &self.token
    }

    pub(super) fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether `name` is being fetched from upstream (not published here).
    pub fn fetches(&self, name: &str) -> bool {
        self.fetches.contains(name)
    }

    /// The UDP address the link serves on (else the one it connects from).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.served.or_else(|| self.endpoint.local_addr().ok())
    }

    /// A consumer of `name`: from the local hub, or fetched from upstream (waiting until the
    /// upstream answered). `None` when nobody has it.
    ///
    /// Whenever it is called — even while a fetch of `name` is letting go of it — the consumer
    /// it returns is fed by a running fetch (or a local publisher): see `Fetches`.
    pub async fn subscribe(self: &Arc<Self>, name: &str) -> Option<BroadcastConsumer> {
        if !self.upstreams.any() {
            return self.hub.subscribe(name);
        }
        let deadline = tokio::time::Instant::now() + SUBSCRIBE_TIMEOUT * 2;
        // A fetch that answered and ended before this subscriber attached (the upstream ended
        // the broadcast just then) sends it round again, to a new fetch; a few rounds at most.
        for _ in 0..4 {
            let mut rx = match self.fetches.attach(&self.hub, name) {
                Attach::Consumer(c) => return Some(c),
                Attach::Wait(rx) => rx,
                Attach::Start(fetch, rx) => {
                    self.rt.spawn(self.clone().fetch(fetch));
                    rx
                }
            };
            let ready =
                tokio::time::timeout_at(deadline, rx.wait_for(|s| *s != FetchState::Waiting))
                    .await
                    .is_ok_and(|s| s.is_ok_and(|s| *s == FetchState::Ready));
            if !ready {
                return None;
            }
        }
        None
    }

    /// Publishes this node's own broadcasts upstream (PUBLISH): every live broadcast of the hub
    /// that was not fetched from upstream and is not published yet. Called periodically by the
    /// role; does nothing on a node without upstreams. So a broadcast pushed to any node reaches
    /// the origin, and every edge can fetch it from there.
    pub fn publish_local(self: &Arc<Self>) {
        if !self.upstreams.any() {
            return;
        }
        let fetched = self.fetches.names();
        let mut publishing = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        publishing.retain(|_, h| !h.is_finished());
        for bc in self.hub.broadcasts() {
            let name = bc.name();
            if !bc.is_live() || fetched.iter().any(|f| f == name) || publishing.contains_key(name) {
                continue;
            }
            let task = self.rt.spawn(self.clone().publish(name.to_owned()));
            publishing.insert(name.to_owned(), task);
        }
    }

    /// Pushes local broadcast `name` upstream until it ends; follows upstream failures.
    async fn publish(self: Arc<Self>, name: String) {
        let Some(mut consumer) = self
            .hub
            .subscribe_as(&name, crate::media::ConsumerKind::Internal)
        else {
            return;
        };
        self.stats.publications_out.fetch_add(1, Relaxed);
        let _guard = Gauge(&self.stats.publications_out);
        loop {
            let Some(peer) = self.upstream(&name).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !consumer.broadcast().is_live() {
                    return;
                }
                continue;
            };
            let (id, mut rx) = peer.open_flow(&self.next_id);
            let (tracks, metadata) = source_tracks(&consumer);
            let _ = peer.ctl.send(ControlMessage::Publish {
                id: SubscriptionId(id),
                broadcast: name.clone(),
                tracks,
                metadata,
            });
            let answer = tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.recv()).await;
            let remove = |peer: &Peer| {
                peer.flows
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
            };
            match answer {
                Ok(Some(FlowEvent::Control(ControlMessage::PublishOk { .. }))) => {
                    info!(broadcast = %name, upstream = %peer.addr, "published upstream");
                }
                Ok(Some(FlowEvent::Control(ControlMessage::PublishError {
                    code, reason, ..
                }))) => {
                    warn!(broadcast = %name, upstream = %peer.addr, ?code, %reason, "upstream refused the broadcast");
                    remove(&peer);
                    return;
                }
                _ => {
                    remove(&peer);
                    self.upstream_failed(&peer).await;
                    continue;
                }
            }
            let ended = self
                .send_groups(&peer.conn, SubscriptionId(id), &mut consumer)
                .await;
            remove(&peer);
            if ended {
                let _ = peer.ctl.send(ControlMessage::Ended {
                    id: SubscriptionId(id),
                });
                info!(broadcast = %name, "local broadcast ended; upstream told");
                return;
            }
            warn!(broadcast = %name, upstream = %peer.addr, "upstream lost while publishing; publishing again");
            self.upstream_failed(&peer).await;
        }
    }

    /// Sends `consumer`'s groups on `conn` as flow `id` until the broadcast ends (true) or the
    /// connection goes (false). (A publication upstream; the serving side writes its groups in
    /// [`super::serve`].)
    async fn send_groups(
        &self,
        conn: &Connection,
        id: SubscriptionId,
        consumer: &mut BroadcastConsumer,
    ) -> bool {
        let mut groups: GroupCursor<SendStream> = GroupCursor::new();
        let mut entries = Vec::with_capacity(64);
        loop {
            match consumer.read(&mut entries, 256) {
                ReadOutcome::Ended => {
                    if let Some(mut s) = groups.take_current() {
                        let _ = s.finish();
                    }
                    return true;
                }
                ReadOutcome::Read(0) => {
                    consumer.changed().await;
                    continue;
                }
                ReadOutcome::Skipped { .. } => {
                    // The consumer jumped to the newest group: the current one is incomplete.
                    if let Some(mut s) = groups.take_current() {
                        let _ = s.reset(varint(ResetCode::GroupDropped.code()));
                        self.stats.groups_reset.fetch_add(1, Relaxed);
                    }
                }
                ReadOutcome::Read(_) => {}
            }
            for e in entries.drain(..) {
                let (encoding, payload) = match groups.step(&e) {
                    Step::Skip => continue,
                    Step::Write(encoding, payload) => (encoding, payload),
                    Step::Start(encoding, payload) => {
                        let Some(s) = self
                            .open_group(conn, id, groups.seq(), consumer.broadcast())
                            .await
                        else {
                            return false;
                        };
                        groups.begin(s, |old, retire| match retire {
                            Retire::Reset => {
                                if old.reset(varint(ResetCode::GroupDropped.code())).is_ok() {
                                    debug!(id = id.0, "older group reset (unfinished)");
                                }
                            }
                            Retire::Finish => {
                                let _ = old.finish();
                            }
                        });
                        (encoding, payload)
                    }
                };
                let Some(stream) = groups.current() else {
                    continue;
                };
                // Header and payload in one write: one lock of the connection and one wake of
                // its driver per frame.
                let mut chunks = [encoding, payload];
                let len = (chunks[0].len() + chunks[1].len()) as u64;
                if stream.write_all_chunks(&mut chunks).await.is_err() {
                    // Reset by the peer (it dropped this group) or the connection is gone.
                    if conn.close_reason().is_some() {
                        return false;
                    }
                    groups.take_current();
                    continue;
                }
                self.stats.bytes_out.fetch_add(len, Relaxed);
            }
        }
    }

    /// Opens group `seq` with its opening ([`serve::group_opening`]).
    async fn open_group(
        &self,
        conn: &Connection,
        id: SubscriptionId,
        seq: u64,
        bc: &crate::media::hub::Broadcast,
    ) -> Option<SendStream> {
        let mut s = conn.open_uni().await.ok()?;
        // Newer groups first.
        let _ = s.set_priority(seq.min(i32::MAX as u64) as i32);
        let opening = serve::group_opening(id, seq, bc)?;
        s.write_all(&opening).await.ok()?;
        self.stats.groups_out.fetch_add(1, Relaxed);
        Some(s)
    }

    // ---- fetching --------------------------------------------------------------------------

    /// A connection to the first upstream candidate for `broadcast` that answers: an open one
    /// when there is, else a new one. Candidates that failed lately are tried last.
    async fn upstream(&self, broadcast: &str) -> Option<Arc<Peer>> {
        let mut candidates = self.upstreams.candidates(broadcast).await;
        {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.retain(|_, t| t.elapsed() < FAILED_UPSTREAM_BACKOFF);
            // Stable: the order among the healthy (and among the failed) stays as chosen.
            candidates.sort_by_key(|c| failed.contains_key(c));
        }
        let mut peers = self.peers.lock().await;
        peers.retain(|_, p| p.alive());
        for addr in &candidates {
            if let Some(p) = peers.get(addr) {
                return Some(p.clone());
            }
            match self.connect(addr).await {
                Ok(p) => {
                    peers.insert(addr.clone(), p.clone());
                    return Some(p);
                }
                Err(e) => {
                    warn!(upstream = %addr, error = %e, "cannot reach upstream");
                    self.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(addr.clone(), Instant::now());
                }
            }
        }
        None
    }

    /// Marks `failed` as unusable: it is closed (so it stops sending what nobody reads; its
    /// other flows fail over too) and tried last for a while.
    async fn upstream_failed(&self, failed: &Arc<Peer>) {
        failed
            .conn
            .close(varint(wire::CLOSE_NO_ERROR), b"upstream failed");
        let mut peers = self.peers.lock().await;
        if peers
            .get(&failed.addr)
            .is_some_and(|p| Arc::ptr_eq(p, failed))
        {
            peers.remove(&failed.addr);
        }
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(failed.addr.clone(), Instant::now());
    }

    async fn connect(&self, addr: &str) -> Result<Arc<Peer>, ConnectError> {
        let sa = tokio::net::lookup_host(addr)
            .await
            .map_err(ConnectError::Resolve)?
            .next()
            .ok_or(ConnectError::NoAddress)?;
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), sa, "castnode")?;
        let conn = tokio::time::timeout(HELLO_TIMEOUT, connecting)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let (mut send, mut recv) = conn.open_bi().await?;
        // Requests and answers go before any group's media (docs/cluster-protocol.md).
        let _ = send.set_priority(i32::MAX);
        let exporter = tls::exporter(&conn).ok_or(ConnectError::NoExporter)?;
        let mut buf = BytesMut::new();
        wire::encode_control(
            &ControlMessage::Hello {
                version: wire::VERSION,
                token_proof: wire::token_proof(&self.token, Side::Client, &exporter),
                node_id: self.node_id.clone(),
                role: self.role.clone(),
            },
            &mut buf,
        )?;
        send.write_all(&buf).await?;
        let mut decoder = ControlDecoder::new();
        let mut buf = BytesMut::new();
        let answer = tokio::time::timeout(
            HELLO_TIMEOUT,
            read_control(&mut recv, &mut decoder, &mut buf),
        )
        .await
        .map_err(|_| ConnectError::NoHelloOk)??;
        match answer {
            Some(ControlMessage::HelloOk {
                node_id,
                token_proof,
            }) if wire::verify_token_proof(&self.token, Side::Server, &exporter, &token_proof) => {
                info!(upstream = %addr, peer = %node_id, "connected upstream");
            }
            Some(ControlMessage::HelloOk { .. }) => {
                conn.close(varint(ErrorCode::Unauthorized.code()), b"wrong token proof");
                return Err(ConnectError::WrongProof);
            }
            Some(ControlMessage::Error { code, reason }) => {
                return Err(ConnectError::Refused { code, reason });
            }
            other => return Err(ConnectError::Unexpected(format!("{other:?}"))),
        }
        let peer = Arc::new(Peer {
            conn: conn.clone(),
            addr: addr.to_owned(),
            ctl: control_writer(send),
            flows: Mutex::new(HashMap::new()),
        });
        // Control messages from upstream, routed to their flows.
        let p = peer.clone();
        tokio::spawn(async move {
            loop {
                match read_control(&mut recv, &mut decoder, &mut buf).await {
                    Ok(Some(m)) => {
                        let id = match &m {
                            ControlMessage::SubscribeOk { id, .. }
                            | ControlMessage::SubscribeError { id, .. }
                            | ControlMessage::PublishOk { id }
                            | ControlMessage::PublishError { id, .. }
                            | ControlMessage::Ended { id } => Some(id.0),
                            ControlMessage::Error { code, reason } => {
                                warn!(upstream = %p.addr, ?code, %reason, "upstream reported an error");
                                None
                            }
                            _ => None,
                        };
                        if let Some(id) = id {
                            p.route(id, FlowEvent::Control(m));
                        }
                    }
                    Ok(None) | Err(_) => {
                        p.conn.close(
                            varint(ErrorCode::ProtocolViolation.code()),
                            b"control stream",
                        );
                        break;
                    }
                }
            }
            // Wake every flow: they fail over.
            p.flows.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        spawn_group_acceptor(peer.clone());
        Ok(peer)
    }

    /// Fetches a broadcast from upstream into the local hub until it ends or lingers unwatched;
    /// then its broadcast ends in the hub at once ([`Fetches::let_go`]).
    async fn fetch(self: Arc<Self>, fetch: FetchHandle) {
        let name = fetch.name.clone();
        self.stats.subscriptions_up.fetch_add(1, Relaxed);
        let _guard = Gauge(&self.stats.subscriptions_up);
        let mut sink = Sink::new(None);
        let mut tries = 0;
        loop {
            let Some(peer) = self.upstream(&name).await else {
                tries += 1;
                if sink.producer.is_none() || tries > 10 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (id, mut rx) = peer.open_flow(&self.next_id);
            let _ = peer.ctl.send(ControlMessage::Subscribe {
                id: SubscriptionId(id),
                broadcast: name.clone(),
            });
            // Group streams may overtake the answer on the control stream: keep them.
            let mut early = Vec::new();
            let answer = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
                loop {
                    match rx.recv().await {
                        Some(FlowEvent::Group(seq, g)) => early.push((seq, g)),
                        other => return other,
                    }
                }
            })
            .await;
            match answer {
                Ok(Some(FlowEvent::Control(ControlMessage::SubscribeOk {
                    tracks,
                    metadata,
                    ..
                }))) => {
                    if sink.producer.is_none() {
                        match self.hub.publish(&name, Instant::now()) {
                            Ok(p) => sink.producer = Some(p),
                            Err(e) => {
                                warn!(broadcast = %name, error = %e, "cannot fetch into the hub");
                                break;
                            }
                        }
                    } else {
                        self.stats.failovers.fetch_add(1, Relaxed);
                        info!(broadcast = %name, upstream = %peer.addr, "fetch moved to another upstream");
                    }
                    if let Some(p) = sink.producer.as_mut() {
                        for (t, info) in tracks {
                            p.set_track(t, info);
                        }
                        p.set_metadata(metadata);
                    }
                    fetch.state.send_replace(FetchState::Ready);
                    tries = 0;
                }
                Ok(Some(FlowEvent::Control(ControlMessage::SubscribeError {
                    code,
                    reason,
                    ..
                }))) => {
                    debug!(broadcast = %name, ?code, %reason, "upstream has no such broadcast");
                    peer.flows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    break;
                }
                _ => {
                    // No answer: this upstream is gone; try the next.
                    peer.flows
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    self.upstream_failed(&peer).await;
                    continue;
                }
            }
            let end = self.receive(&fetch, &mut rx, &mut sink, early).await;
            peer.flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            match end {
                FlowEnd::Ended => break,
                FlowEnd::Unwatched => {
                    // The broadcast has already ended here (`receive` let go of it).
                    let _ = peer.ctl.send(ControlMessage::Unsubscribe {
                        id: SubscriptionId(id),
                    });
                    info!(broadcast = %name, "no local viewers: upstream subscription dropped");
                    return;
                }
                FlowEnd::Lost => {
                    warn!(broadcast = %name, upstream = %peer.addr, "upstream lost; re-subscribing");
                    self.upstream_failed(&peer).await;
                }
            }
        }
        // Nobody will feed the broadcast any more: it ends now, not after a publish grace in
        // which new local subscribers would attach to it.
        let _ = self.fetches.let_go(&fetch, sink.producer.take(), false);
    }

    /// Reads a subscription's groups in order into `sink` until it ends, or until the broadcast
    /// has had no local consumer for the linger and `fetch` let go of it.
    async fn receive(
        &self,
        fetch: &FetchHandle,
        rx: &mut mpsc::UnboundedReceiver<FlowEvent>,
        sink: &mut Sink,
        early: Vec<(u64, IncomingGroup)>,
    ) -> FlowEnd {
        let name = fetch.name.as_str();
        let mut waiting: BTreeMap<u64, IncomingGroup> = early.into_iter().collect();
        let mut current: Option<(u64, IncomingGroup)> = None;
        let mut done_below = 0u64;
        let mut progress = Instant::now();
        let mut unwatched_since: Option<Instant> = None;
        // The first group comes as a burst from its start (up to a GOP old): its frames' ages
        // say nothing about the link's latency.
        let mut first_group: Option<u64> = None;
        let mut check = tokio::time::interval(Duration::from_millis(250));
        // A frame comes as several chunks (one per packet): they are taken together.
        let mut chunks: [bytes::Bytes; READ_CHUNKS] = Default::default();
        loop {
            if current.is_none()
                && let Some((seq, g)) = waiting.pop_first()
            {
                current = Some((seq, g));
                progress = Instant::now();
            }
            let stalled = current.is_some() && !waiting.is_empty();
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(FlowEvent::Group(seq, mut g)) => {
                        if seq < done_below || current.as_ref().is_some_and(|(c, _)| seq <= *c) {
                            let _ = g.stream.stop(varint(ResetCode::GroupDropped.code()));
                        } else {
                            waiting.insert(seq, g);
                        }
                    }
                    Some(FlowEvent::Control(ControlMessage::Ended { .. })) => return FlowEnd::Ended,
                    Some(FlowEvent::Control(_)) => {}
                    None => return FlowEnd::Lost,
                },
                r = read_group(&mut current, &mut chunks) => {
                    progress = Instant::now();
                    match r {
                        GroupRead::Data(n) => {
                            if let Some((seq, g)) = current.as_mut() {
                                let mut read = 0;
                                for c in &mut chunks[..n] {
                                    read += c.len() as u64;
                                    g.buf.extend_from_slice(c);
                                    *c = bytes::Bytes::new();
                                }
                                self.stats.bytes_in.fetch_add(read, Relaxed);
                                let backlog = *first_group.get_or_insert(*seq) == *seq;
                                if let Err(e) = sink.drain(&mut g.decoder, &mut g.buf, &self.stats, backlog) {
                                    warn!(broadcast = %name, group = *seq, error = %e, "malformed group stream; dropped");
                                    let _ = g.stream.stop(varint(ResetCode::Cancelled.code()));
                                    done_below = *seq + 1;
                                    current = None;
                                }
                            }
                        }
                        GroupRead::End | GroupRead::Reset => {
                            if let Some((seq, _)) = current.take() {
                                done_below = seq + 1;
                                if matches!(r, GroupRead::Reset) {
                                    self.stats.groups_reset.fetch_add(1, Relaxed);
                                }
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until((progress + GROUP_STALL).into()), if stalled => {
                    // A newer group is waiting and this one is stuck: drop it.
                    if let Some((seq, mut g)) = current.take() {
                        let _ = g.stream.stop(varint(ResetCode::GroupDropped.code()));
                        self.stats.groups_reset.fetch_add(1, Relaxed);
                        done_below = seq + 1;
                    }
                }
                _ = check.tick() => {
                    let watched = sink
                        .producer
                        .as_ref()
                        .is_some_and(|p| p.broadcast().stats.consumers.load(Relaxed) > 0);
                    if watched {
                        unwatched_since = None;
                    } else if unwatched_since.get_or_insert_with(Instant::now).elapsed() >= self.linger {
                        // Still nobody? Decided where consumers attach: one that came meanwhile
                        // keeps the fetch going.
                        match self.fetches.let_go(fetch, sink.producer.take(), true) {
                            Ok(()) => return FlowEnd::Unwatched,
                            Err(p) => {
                                sink.producer = Some(p);
                                unwatched_since = None;
                            }
                        }
                    }
                }
            }
        }
    }
}

enum FlowEnd {
    Ended,
    Unwatched,
    Lost,
}

enum GroupRead {
    /// This many chunks were read.
    Data(usize),
    End,
    Reset,
}

/// Chunks of a group read at once.
const READ_CHUNKS: usize = 32;

/// The next chunks of the current group, into `chunks`; never resolves when there is none.
async fn read_group(
    current: &mut Option<(u64, IncomingGroup)>,
    chunks: &mut [bytes::Bytes],
) -> GroupRead {
    let Some((_, g)) = current.as_mut() else {
        return std::future::pending().await;
    };
    match g.stream.read_chunks(chunks).await {
        Ok(Some(n)) => GroupRead::Data(n),
        Ok(None) => GroupRead::End,
        Err(_) => GroupRead::Reset,
    }
}

/// Where a fetched (or published) broadcast goes: the local hub.
pub(super) struct Sink {
    producer: Option<BroadcastProducer>,
    /// The newest dts written per source track (a peer's frame of another id counts with the
    /// last): after a failover, frames the hub already has are skipped.
    last_dts: [i64; TrackId::SOURCE_TRACKS as usize],
}

impl Sink {
    pub(super) fn new(producer: Option<BroadcastProducer>) -> Self {
        Self {
            producer,
            last_dts: [i64::MIN; TrackId::SOURCE_TRACKS as usize],
        }
    }

    /// Writes the items `decoder` finds in `buf` into the hub; `backlog`: the frames are a
    /// burst from the past, whose ages are not the link's latency.
    pub(super) fn drain(
        &mut self,
        decoder: &mut GroupDecoder,
        buf: &mut BytesMut,
        stats: &ClusterStats,
        backlog: bool,
    ) -> Result<(), wire::WireError> {
        let Some(p) = self.producer.as_mut() else {
            return Ok(());
        };
        while let Some(ev) = decoder.decode(buf)? {
            match ev {
                GroupEvent::Header(_) => {}
                GroupEvent::Config { track, info } => p.set_track(track, info),
                GroupEvent::Frame(f) => {
                    let i = usize::from(f.track.0).min(self.last_dts.len() - 1);
                    if f.frame.dts <= self.last_dts[i] {
                        continue;
                    }
                    self.last_dts[i] = f.frame.dts;
                    let ingest = f.ingest_us as i64;
                    if !backlog {
                        let age = wall_clock_us().saturating_sub(ingest).max(0);
                        stats.latency.observe(Duration::from_micros(age as u64));
                    }
                    p.push_at(f.track, f.frame, Some(ingest));
                }
            }
        }
        Ok(())
    }
}

/// Routes the group streams the peer opens to their flows, by the subscription id in their
/// header (a stream of no flow is dropped; one whose header does not come within
/// [`HELLO_TIMEOUT`] too).
fn spawn_group_acceptor(peer: Arc<Peer>) {
    let p = peer;
    tokio::spawn(async move {
        while let Ok(stream) = p.conn.accept_uni().await {
            let p = p.clone();
            tokio::spawn(async move {
                let mut g = IncomingGroup {
                    stream,
                    decoder: GroupDecoder::new(),
                    buf: BytesMut::new(),
                };
                let header = loop {
                    match g.decoder.decode(&mut g.buf) {
                        Ok(Some(GroupEvent::Header(h))) => break h,
                        Ok(Some(_)) | Err(_) => return,
                        Ok(None) => {}
                    }
                    let chunk =
                        tokio::time::timeout(HELLO_TIMEOUT, g.stream.read_chunk(64 << 10, true));
                    match chunk.await {
                        Ok(Ok(Some(c))) => g.buf.extend_from_slice(&c.bytes),
                        _ => return,
                    }
                };
                let (id, seq) = (header.subscription.0, header.sequence.0);
                if !p.route(id, FlowEvent::Group(seq, g)) {
                    debug!(id, "group stream of no flow");
                }
            });
        }
    });
}

/// A consumer's source tracks ([`TrackId::is_source`]: renditions are made on every node) and
/// metadata.
pub(super) fn source_tracks(
    consumer: &BroadcastConsumer,
) -> (Vec<(TrackId, TrackInfo)>, crate::media::Metadata) {
    let (tracks, metadata) = consumer.snapshot();
    (
        tracks.into_iter().filter(|(t, _)| t.is_source()).collect(),
        metadata,
    )
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Codec;
    use crate::media::hub::testing::{frame, track};

    /// What a fetch does once its upstream answered: the broadcast in the hub, with a group.
    fn fetched(hub: &Hub, fetch: &FetchHandle) -> BroadcastProducer {
        let mut p = hub.publish(&fetch.name, Instant::now()).unwrap();
        p.set_track(TrackId(0), track(Codec::H264));
        p.push(TrackId(0), frame(0, true));
        fetch.state.send_replace(FetchState::Ready);
        p
    }

    fn started(a: Attach) -> (FetchHandle, watch::Receiver<FetchState>) {
        match a {
            Attach::Start(f, rx) => (f, rx),
            Attach::Wait(_) => panic!("waits for a fetch"),
            Attach::Consumer(_) => panic!("got a consumer"),
        }
    }

    #[test]
    fn concurrent_subscribers_share_one_fetch() {
        let (hub, fetches) = (Hub::default(), Fetches::default());
        let (fetch, _rx) = started(fetches.attach(&hub, "live/a"));
        let Attach::Wait(rx) = fetches.attach(&hub, "live/a") else {
            panic!("a second fetch");
        };
        let _p = fetched(&hub, &fetch);
        assert_eq!(*rx.borrow(), FetchState::Ready);
        assert!(matches!(
            fetches.attach(&hub, "live/a"),
            Attach::Consumer(_)
        ));
    }

    /// The fetch's linger ran out: a subscriber that attached before keeps it going; once it
    /// let go, the next one starts a new fetch, never attaching to the broadcast let go of.
    #[test]
    fn a_subscriber_arriving_as_the_fetch_lets_go_gets_a_fed_broadcast() {
        let (hub, fetches) = (Hub::default(), Fetches::default());
        let (fetch, rx) = started(fetches.attach(&hub, "live/a"));
        let p = fetched(&hub, &fetch);
        let Attach::Consumer(c) = fetches.attach(&hub, "live/a") else {
            panic!("no consumer of a fetched broadcast");
        };
        let Err(p) = fetches.let_go(&fetch, Some(p), true) else {
            panic!("watched, yet let go of");
        };
        assert!(p.broadcast().is_live() && fetches.contains("live/a"));
        assert_eq!(*rx.borrow(), FetchState::Ready);
        drop(c);
        let old = p.broadcast().clone();
        assert!(fetches.let_go(&fetch, Some(p), true).is_ok());
        assert_eq!(*rx.borrow(), FetchState::Gone);
        assert!(!fetches.contains("live/a") && !old.is_live());
        let (again, _) = started(fetches.attach(&hub, "live/a"));
        let p = fetched(&hub, &again);
        assert!(!Arc::ptr_eq(p.broadcast(), &old));
        // The old fetch, late, cannot remove the new one's entry.
        assert!(fetches.let_go(&fetch, None, false).is_ok());
        assert!(fetches.contains("live/a"));
        assert!(matches!(
            fetches.attach(&hub, "live/a"),
            Attach::Consumer(c) if Arc::ptr_eq(c.broadcast(), p.broadcast())
        ));
    }

    /// A fetch that ends (the upstream ended the broadcast, or every upstream is gone) ends its
    /// broadcast at once: its consumers read Ended, a new subscriber starts a new fetch.
    #[test]
    fn an_ended_fetch_leaves_nothing_to_attach_to() {
        let (hub, fetches) = (Hub::default(), Fetches::default());
        let (fetch, _rx) = started(fetches.attach(&hub, "live/a"));
        let p = fetched(&hub, &fetch);
        let Attach::Consumer(mut c) = fetches.attach(&hub, "live/a") else {
            panic!("no consumer");
        };
        assert!(fetches.let_go(&fetch, Some(p), false).is_ok());
        let mut out = Vec::new();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(1));
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Ended);
        started(fetches.attach(&hub, "live/a"));
    }
}
