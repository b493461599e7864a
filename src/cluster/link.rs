//! The node's end of the cluster link: the [`Link`] handle the roles and the drivers share,
//! fetching broadcasts from upstream on demand, and publishing local ones upstream. The
//! protocol is `super::session`'s; the sockets are [`super::driver`]'s (serving drivers for
//! other nodes, one connecting driver for upstreams); here live the tasks that decide which
//! upstream, when to fail over and when to let go. Its counters are
//! [`crate::metrics::ClusterStats`]. A link holds the node's [`Hub`], not the node's context,
//! which holds the link.
//!
//! Guarantees:
//! - A connection is used only after both ends proved the cluster token over its TLS exporter
//!   (HELLO / HELLO_OK); an upstream that fails is closed, nothing else noticed.
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
//! - Only the tracks that travel with a broadcast ([`crate::media::TrackId::travels`]: the
//!   source's and its ladder's rungs) go upstream or downstream; each node makes its own
//!   on-demand renditions (Opus, B-frame-free video) from them.
//! - Errors in one connection, subscription or stream close only that; they never panic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::driver::{self, Command, ConnectFailure, FlowEvent, PeerId};
use super::encoding::Sink;
use super::session::{FlowEnd, SessionConfig};
use super::tls::{self, TlsFiles};
use crate::config::ClusterConfig;
use crate::media::hub::Hub;
use crate::media::{BroadcastConsumer, BroadcastProducer};
use crate::metrics::ClusterStats;

/// A boxed future, as [`UpstreamChoice`] returns (the same shape as the stream manager's).
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long a SUBSCRIBE (or PUBLISH) may wait for its answer.
pub(crate) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);
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
pub(crate) const FAILED_UPSTREAM_BACKOFF: Duration = Duration::from_secs(10);

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

/// The node's end of the cluster link.
pub struct Link {
    /// The node's broadcasts: what is fetched goes in, what is published here goes up.
    hub: Hub,
    /// Where the link's tasks (and the connecting driver) run: the first serving thread's
    /// runtime on a node that serves, so a frame fetched from upstream is served on the thread
    /// that received it with no wake across threads; else the node's.
    rt: tokio::runtime::Handle,
    /// The connecting driver.
    commands: mpsc::UnboundedSender<Command>,
    /// Where the connecting driver's socket is bound.
    connects_from: SocketAddr,
    /// Where the serving drivers listen.
    served: Option<SocketAddr>,
    /// What every session shares (token, node id, role, counters).
    session: Arc<SessionConfig>,
    upstreams: Box<dyn UpstreamChoice>,
    /// Upstream connections, by address.
    peers: tokio::sync::Mutex<HashMap<String, Upstream>>,
    /// Upstreams that failed, and when: tried last for [`FAILED_UPSTREAM_BACKOFF`].
    failed: Mutex<HashMap<String, Instant>>,
    fetches: Fetches,
    /// Local broadcasts being published upstream.
    publishing: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    next_id: AtomicU64,
    linger: Duration,
    /// Fetched broadcasts keep their ABR ladder's rungs (not on a transcoder, which makes its
    /// own).
    keep_ladders: bool,
    /// Counters for `/metrics`.
    pub stats: Arc<ClusterStats>,
}

/// An upstream connection, as the link's tasks hold it.
#[derive(Clone)]
struct Upstream {
    id: PeerId,
    addr: String,
    /// False once the connection closed.
    alive: Arc<AtomicBool>,
}

impl Upstream {
    fn alive(&self) -> bool {
        self.alive.load(Relaxed)
    }
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
    /// The connection failed (start, handshake, HELLO).
    #[error(transparent)]
    Failed(#[from] ConnectFailure),
    /// The connecting driver is gone (the process is stopping).
    #[error("the cluster link is stopping")]
    Stopping,
}

/// A flow's end as its task sees it.
enum Received {
    /// The upstream ended the broadcast.
    Ended(Option<Sink>),
    /// The broadcast was let go of (no local consumer for the linger).
    Unwatched,
    /// The upstream went: fail over.
    Lost(Option<Sink>),
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
        let serving = match cfg.listen {
            Some(addr) => {
                let sockets = driver::bind(addr, cfg.threads)?;
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
        let served = match serving.as_ref().and_then(|(s, ..)| s.first()) {
            Some(socket) => Some(socket.local_addr()?),
            None => None,
        };
        let client_socket = driver::bind_client()?;
        let connects_from = client_socket.local_addr()?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ClusterStats::default());
        let link = Arc::new(Self {
            hub,
            rt,
            commands,
            connects_from,
            served,
            session: Arc::new(SessionConfig {
                token: cfg.token.as_bytes().to_vec(),
                node_id: cfg.node_id.clone(),
                role: role.to_owned(),
                stats: stats.clone(),
            }),
            upstreams,
            peers: tokio::sync::Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            fetches: Fetches::default(),
            publishing: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            linger: cfg.linger,
            keep_ladders: role != "transcoder",
            stats,
        });
        driver::spawn_client(link.clone(), client_socket, client, command_rx, &link.rt)?;
        if let Some((sockets, runtimes, config)) = serving {
            for (n, (socket, rt)) in sockets.into_iter().zip(runtimes).enumerate() {
                driver::spawn(link.clone(), socket, config.clone(), n, rt)?;
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

    /// What every session of this node shares.
    pub(super) fn session_config(&self) -> &Arc<SessionConfig> {
        &self.session
    }

    /// Whether `name` is being fetched from upstream (not published here).
    pub(crate) fn fetches(&self, name: &str) -> bool {
        self.fetches.contains(name)
    }

    /// The UDP address the link serves on (else the one it connects from).
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        self.served.or(Some(self.connects_from))
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
    pub(crate) fn publish_local(self: &Arc<Self>) {
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
        self.publish_flow(name, false, None).await;
    }

    /// Publishes the ABR ladder this node makes of broadcast `name` (fetched from upstream) to
    /// an upstream, which adds the rungs to its live broadcast: until `stop` turns true (then
    /// the upstream lets go of the rungs at once) or the broadcast ends. Follows upstream
    /// failures; an upstream that refuses (another node's ladder still attached there, the
    /// broadcast not live there yet) is asked again every second.
    pub(crate) async fn publish_ladder(self: Arc<Self>, name: String, stop: watch::Receiver<bool>) {
        self.publish_flow(name, true, Some(stop)).await;
    }

    /// PUBLISH of `name` (only its ladder when `ladder_only`) until it ends or `stop`.
    async fn publish_flow(
        self: Arc<Self>,
        name: String,
        ladder_only: bool,
        mut stop: Option<watch::Receiver<bool>>,
    ) {
        let subscribe = || {
            self.hub
                .subscribe_as(&name, crate::media::ConsumerKind::Internal)
        };
        let Some(mut consumer) = subscribe() else {
            return;
        };
        self.stats.publications_out.fetch_add(1, Relaxed);
        let _guard = Gauge(&self.stats.publications_out);
        let stopped =
            |stop: &Option<watch::Receiver<bool>>| stop.as_ref().is_some_and(|s| *s.borrow());
        loop {
            if stopped(&stop) {
                return;
            }
            let Some(peer) = self.upstream(&name).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !consumer.broadcast().is_live() {
                    return;
                }
                continue;
            };
            let id = self.next_id.fetch_add(1, Relaxed);
            let (events, mut rx) = mpsc::unbounded_channel();
            let sent = self.commands.send(Command::Publish {
                peer: peer.id,
                id,
                consumer,
                ladder_only,
                events,
            });
            if sent.is_err() {
                return;
            }
            let answer = tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.recv()).await;
            match answer {
                Ok(Some(FlowEvent::PublishOk)) => {
                    let what = if ladder_only {
                        "ABR ladder"
                    } else {
                        "broadcast"
                    };
                    info!(broadcast = %name, upstream = %peer.addr, "{what} published upstream");
                }
                Ok(Some(FlowEvent::PublishError { code, reason })) => {
                    warn!(broadcast = %name, upstream = %peer.addr, ?code, %reason, "upstream refused the broadcast");
                    if !ladder_only {
                        return;
                    }
                    // The flow ended on the refusal: its consumer comes back.
                    consumer = match take_back(&mut rx, |ev| match ev {
                        FlowEvent::OutEnded(c, _) => Some(c),
                        _ => None,
                    })
                    .await
                    .or_else(subscribe)
                    {
                        Some(c) => c,
                        None => return,
                    };
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                other => {
                    // No answer: this upstream is gone; the consumer comes back as the
                    // connection closes.
                    let back = match other {
                        Ok(Some(FlowEvent::OutEnded(c, _))) => Some(c),
                        Err(_) => {
                            self.upstream_failed(&peer).await;
                            take_back(&mut rx, |ev| match ev {
                                FlowEvent::OutEnded(c, _) => Some(c),
                                _ => None,
                            })
                            .await
                        }
                        _ => None,
                    };
                    self.upstream_failed(&peer).await;
                    consumer = match back.or_else(subscribe) {
                        Some(c) => c,
                        None => return,
                    };
                    continue;
                }
            }
            let end = loop {
                let stop_now = async {
                    match stop.as_mut() {
                        Some(s) => {
                            let _ = s.wait_for(|v| *v).await;
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(FlowEvent::OutEnded(c, end)) => break Some((c, end)),
                        Some(_) => {}
                        None => break None,
                    },
                    () = stop_now => {
                        let _ = self.commands.send(Command::Unpublish { peer: peer.id, id });
                        stop = None;
                    }
                }
            };
            match end {
                Some((_, FlowEnd::Ended)) => {
                    info!(broadcast = %name, ladder_only, "publication ended; upstream told");
                    return;
                }
                Some((c, _)) => consumer = c,
                None => match subscribe() {
                    Some(c) => consumer = c,
                    None => return,
                },
            }
            warn!(broadcast = %name, upstream = %peer.addr, "upstream lost while publishing; publishing again");
            self.upstream_failed(&peer).await;
        }
    }

    // ---- fetching --------------------------------------------------------------------------

    /// A connection to the first upstream candidate for `broadcast` that answers: an open one
    /// when there is, else a new one. Candidates that failed lately are tried last.
    async fn upstream(&self, broadcast: &str) -> Option<Upstream> {
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
    async fn upstream_failed(&self, failed: &Upstream) {
        let _ = self.commands.send(Command::Close {
            peer: failed.id,
            why: "upstream failed",
        });
        let mut peers = self.peers.lock().await;
        if peers.get(&failed.addr).is_some_and(|p| p.id == failed.id) {
            peers.remove(&failed.addr);
        }
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(failed.addr.clone(), Instant::now());
    }

    /// Connects to `addr` and says HELLO (on the connecting driver).
    async fn connect(&self, addr: &str) -> Result<Upstream, ConnectError> {
        let sa = tokio::net::lookup_host(addr)
            .await
            .map_err(ConnectError::Resolve)?
            .next()
            .ok_or(ConnectError::NoAddress)?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Connect { addr: sa, reply })
            .map_err(|_| ConnectError::Stopping)?;
        // The session gives up by itself (HELLO_TIMEOUT for the handshake, then for HELLO_OK).
        let connected = answer.await.map_err(|_| ConnectError::Stopping)??;
        Ok(Upstream {
            id: connected.id,
            addr: addr.to_owned(),
            alive: connected.alive,
        })
    }

    /// Fetches a broadcast from upstream into the local hub until it ends or lingers unwatched;
    /// then its broadcast ends in the hub at once ([`Fetches::let_go`]).
    async fn fetch(self: Arc<Self>, fetch: FetchHandle) {
        let fetch = Arc::new(fetch);
        let name = fetch.name.clone();
        self.stats.subscriptions_up.fetch_add(1, Relaxed);
        let _guard = Gauge(&self.stats.subscriptions_up);
        // The sink travels with the subscription (on the connecting driver) and comes back when
        // it ends: after a failover it keeps the hub's producer, so local players go on.
        let new_sink = || match self.keep_ladders {
            true => Sink::new(None),
            false => Sink::new(None).without_ladder(),
        };
        let mut sink = Some(new_sink());
        let mut tries = 0;
        loop {
            let has_producer = sink.as_ref().is_some_and(|s| s.producer.is_some());
            let Some(peer) = self.upstream(&name).await else {
                tries += 1;
                if !has_producer || tries > 10 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let id = self.next_id.fetch_add(1, Relaxed);
            let (events, mut rx) = mpsc::unbounded_channel();
            let sent = self.commands.send(Command::Subscribe {
                peer: peer.id,
                id,
                broadcast: name.clone(),
                sink: sink.take().unwrap_or_else(new_sink),
                events,
            });
            if sent.is_err() {
                break;
            }
            let answer = tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.recv()).await;
            let bc = match answer {
                Ok(Some(FlowEvent::SubscribeOk(bc))) => {
                    fetch.state.send_replace(FetchState::Ready);
                    tries = 0;
                    bc
                }
                Ok(Some(FlowEvent::InEnded(s, FlowEnd::Stopped | FlowEnd::Ended))) => {
                    // Not found there (or the hub would not take it).
                    sink = Some(s);
                    break;
                }
                other => {
                    // No answer: this upstream is gone; try the next. The sink comes back as
                    // the connection closes.
                    if let Ok(Some(FlowEvent::InEnded(s, _))) = other {
                        sink = Some(s);
                    } else {
                        self.upstream_failed(&peer).await;
                        sink = take_back(&mut rx, |ev| match ev {
                            FlowEvent::InEnded(s, _) => Some(s),
                            _ => None,
                        })
                        .await;
                    }
                    self.upstream_failed(&peer).await;
                    continue;
                }
            };
            match self.receive(&fetch, &peer, id, &mut rx, bc).await {
                Received::Ended(s) => {
                    sink = s;
                    break;
                }
                Received::Unwatched => {
                    // The broadcast has already ended here (`Fetches::let_go` on the driver).
                    info!(broadcast = %name, "no local viewers: upstream subscription dropped");
                    return;
                }
                Received::Lost(s) => {
                    sink = s;
                    warn!(broadcast = %name, upstream = %peer.addr, "upstream lost; re-subscribing");
                    self.upstream_failed(&peer).await;
                }
            }
        }
        // Nobody will feed the broadcast any more: it ends now, not after a publish grace in
        // which new local subscribers would attach to it.
        let producer = sink.and_then(|s| s.producer);
        let _ = self.fetches.let_go(&fetch, producer, false);
    }

    /// Waits for flow `id` (reading into the hub on the driver) to end, or for the broadcast
    /// `bc` to have had no local consumer for the linger, and then lets go of it (decided on
    /// the driver, with the sink in hand, atomically with subscribers attaching).
    async fn receive(
        self: &Arc<Self>,
        fetch: &Arc<FetchHandle>,
        peer: &Upstream,
        id: u64,
        rx: &mut mpsc::UnboundedReceiver<FlowEvent>,
        bc: Arc<crate::media::hub::Broadcast>,
    ) -> Received {
        let mut unwatched_since: Option<Instant> = None;
        let mut check = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(FlowEvent::InEnded(sink, FlowEnd::Ended)) => return Received::Ended(Some(sink)),
                    Some(FlowEvent::InEnded(sink, _)) => return Received::Lost(Some(sink)),
                    Some(_) => {}
                    None => return Received::Lost(None),
                },
                _ = check.tick() => {
                    if bc.stats.consumers.load(Relaxed) > 0 {
                        unwatched_since = None;
                    } else if unwatched_since.get_or_insert_with(Instant::now).elapsed() >= self.linger {
                        // Still nobody? Decided where consumers attach: one that came meanwhile
                        // keeps the fetch going.
                        let (link, f) = (self.clone(), fetch.clone());
                        let decide = Box::new(move |sink: &mut Sink| {
                            match link.fetches.let_go(&f, sink.producer.take(), true) {
                                Ok(()) => true,
                                Err(p) => {
                                    sink.producer = Some(p);
                                    false
                                }
                            }
                        });
                        let (reply, answer) = oneshot::channel();
                        let asked = self.commands.send(Command::Release { peer: peer.id, id, decide, reply });
                        if asked.is_ok() && answer.await.unwrap_or(false) {
                            return Received::Unwatched;
                        }
                        unwatched_since = None;
                    }
                }
            }
        }
    }
}

/// What a flow's task gets back (its sink or consumer) after it closed the flow's connection:
/// the driver ends the flow as lost and sends it; at most a second is waited.
async fn take_back<T>(
    rx: &mut mpsc::UnboundedReceiver<FlowEvent>,
    pick: impl Fn(FlowEvent) -> Option<T>,
) -> Option<T> {
    let wait = async {
        while let Some(ev) = rx.recv().await {
            if let Some(t) = pick(ev) {
                return Some(t);
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .ok()
        .flatten()
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
    use crate::media::hub::testing::{frame, track};
    use crate::media::{Codec, ReadOutcome, TrackId};

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
