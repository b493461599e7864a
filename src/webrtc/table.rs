//! The node's WebRTC sessions, sans-IO: every peer's str0m `Rtc` (and, once handed over, a
//! viewer's media sender alone), the routing of received datagrams, handover, reaping and
//! keyframe requests. [`super::driver`] owns the socket, the command channel and the clocks and
//! calls in here: [`Sessions`] takes datagrams (with their source, the local address they
//! arrived at and the time), timeouts, media ticks and commands (accept a WHEP or WHIP offer,
//! close a session), writes what is to be sent through an [`Out`] (the driver's
//! [`super::egress::Egress`], a buffer in tests) and says when it next needs a timeout
//! ([`Sessions::next_deadline`]). Timeouts, ticks and reaping go by the instants they are
//! given; the connect time, counters and keyframe-request times of events inside a session are
//! read from the clock, as before the table was split out.
//!
//! Guarantees:
//! - Datagrams are routed by source address (learned from the first STUN check a peer's `Rtc`
//!   accepts); a datagram no session accepts (garbage, spoofed STUN, stray DTLS) is dropped,
//!   counted (`webrtc_datagrams_dropped`) and disturbs nothing.
//! - Every datagram to a peer leaves from the local address that peer's datagrams arrived at
//!   (per remote address: one per ICE pair the peer checked).
//! - A session whose ICE/DTLS has not connected within [`CONNECT_TIMEOUT`] is reaped; so is one
//!   whose ICE disconnects, or that was closed. Reaping is a pass over every session, done at
//!   most every [`REAP_INTERVAL`].
//! - A connected viewer keeps its `Rtc` for [`HANDOVER_AFTER`], then goes on with its media
//!   sender and a [`Consent`] responder alone.
//! - A viewer's media starts at the newest keyframe once its connection is up; frames are read
//!   from the hub every media tick, packetized once per frame for every viewer (memoized in the
//!   hub entry, [`MemoSlot::Rtp`]) and encrypted per viewer by its [`MediaSender`] straight into
//!   the output batch. str0m does ICE, DTLS and the SDP for viewers; their RTP and RTCP are
//!   castnode's own (str0m's are dropped), with the keys [`super::keys`] takes from the DTLS
//!   handshake.
//! - A WHIP publisher's frames go through [`super::ingest`] into the hub as they arrive. It is
//!   asked for a keyframe (PLI) when it connects, after a loss, when none came for
//!   [`PUBLISHER_KEYFRAME_INTERVAL`], and when one of its WebRTC viewers asks; never more often
//!   than every [`KEYFRAME_REQUEST_INTERVAL`].
//! - The output is a generic [`Out`], not a trait object: a datagram written costs no indirect
//!   call, and the per-datagram paths allocate nothing of their own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use str0m::change::SdpOffer;
use str0m::format::Codec as RtcCodec;
use str0m::media::{KeyframeRequestKind, MediaData, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::Extension;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tracing::{debug, info, warn};

use super::WebrtcError;
use super::abr::{self, Controller, RateMeter, Signals, Switcher, Verdict};
use super::consent::Consent;
use super::egress::Out;
use super::ingest::{self, Arrival, Ingest};
use super::keys::{self, KeySlot};
use super::packetize::RtpFrame;
use super::sender::{Kind, MediaSender, Sink};
use super::stats::BroadcastRtcStats;
use crate::media::{
    BroadcastConsumer, BroadcastProducer, Codec, Entry, Frame, Item, MemoSlot, ReadOutcome,
    TrackId, TrackInfo,
};
use crate::node::NodeContext;
use crate::transcode::{Rendition, opus_for, video_for};

/// A session must connect (ICE + DTLS) within this.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Send buffers str0m keeps per viewer (video and audio): it sends no media for viewers (the
/// media sender does), so they stay small.
pub(crate) const VIDEO_SEND_BUFFER: usize = 16;
/// How long a connected viewer keeps its str0m `Rtc` (for DTLS retransmissions and the last
/// ICE checks) before it goes on with its media sender and a [`Consent`] responder alone.
pub(crate) const HANDOVER_AFTER: Duration = Duration::from_secs(3);
/// How often ended sessions are looked for.
pub(crate) const REAP_INTERVAL: Duration = Duration::from_millis(20);
/// How often a viewer's counters are added to its broadcast's figures.
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);
/// A WHIP publisher that sent no keyframe for this long is asked for one, so that groups (what
/// late joiners start from and the hub keeps) stay short.
pub(crate) const PUBLISHER_KEYFRAME_INTERVAL: Duration = Duration::from_secs(2);
/// The shortest interval between two keyframe requests to one publisher.
pub(crate) const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// How often an `auto` viewer's controller decides.
const ABR_INTERVAL: Duration = Duration::from_millis(50);
/// An `auto` viewer whose paced video waited longer than this resumes at the next keyframe.
const MAX_QUEUED: Duration = Duration::from_secs(1);
/// What a rung needs over its video and audio bitrates (RTP, SRTP and header extensions).
const OVERHEAD: f64 = 1.1;
/// The transport-cc header extension's URI in SDP.
const TRANSPORT_CC_URI: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// What a WHEP viewer plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Play {
    /// The source's video (its B-frame-free re-encode where it has B-frames).
    Source,
    /// One ladder rung, by name (`?rendition=NAME`).
    Rung(Arc<str>),
    /// The ladder with ABR ([`super::abr`]); `source`: the source is its top rung (it has no
    /// B-frames, so it plays as it is).
    Auto {
        /// Whether the source is a rung.
        source: bool,
    },
}

/// Every WebRTC session of the node.
pub(crate) struct Sessions {
    ctx: Arc<NodeContext>,
    /// The node's runtime, where the transcoders a viewer starts run.
    node: tokio::runtime::Handle,
    /// The address the socket is bound to (the ICE destination of a datagram whose local
    /// address is unknown).
    local: SocketAddr,
    /// The local candidates handed to peers.
    candidates: Vec<SocketAddr>,
    sessions: HashMap<u64, Session>,
    /// Connected viewers handed over from their Rtc (see [`HANDOVER_AFTER`]).
    lite: HashMap<u64, Lite>,
    handover: Vec<u64>,
    by_source: HashMap<SocketAddr, u64>,
    /// Broadcast name → its WHIP publisher's session.
    publishers: HashMap<Arc<str>, u64>,
    keyframe_wanted: Vec<Arc<str>>,
    next_id: u64,
    last_reap: Instant,
}

impl Sessions {
    /// An empty table for a socket bound to `local` that hands peers `candidates`; the
    /// transcoders viewers start run on `node`.
    pub(crate) fn new(
        ctx: Arc<NodeContext>,
        node: tokio::runtime::Handle,
        local: SocketAddr,
        candidates: Vec<SocketAddr>,
        now: Instant,
    ) -> Self {
        Self {
            ctx,
            node,
            local,
            candidates,
            sessions: HashMap::new(),
            lite: HashMap::new(),
            handover: Vec::new(),
            by_source: HashMap::new(),
            publishers: HashMap::new(),
            keyframe_wanted: Vec::new(),
            next_id: 1,
            last_reap: now,
        }
    }

    /// (sessions with an `Rtc`: connecting, publishing, or viewers not handed over yet;
    /// handed-over viewers).
    #[cfg(test)]
    pub(crate) fn count(&self) -> (usize, usize) {
        (self.sessions.len(), self.lite.len())
    }

    /// When [`Sessions::timeout`] is next due: the earliest `Rtc` deadline, or 100 ms from `now`
    /// when there is no session; never before `now`.
    pub(crate) fn next_deadline(&self, now: Instant) -> Instant {
        self.sessions
            .values()
            .map(|s| s.deadline)
            .min()
            .unwrap_or(now + Duration::from_millis(100))
            .max(now)
    }

    /// Handles what arrived from `source` at the local address `local_ip` (`None`: unknown):
    /// `batch` holds datagrams of `stride` bytes (a GRO batch; the last may be shorter; 0: one
    /// datagram). Answers are written to `out`, which is not flushed.
    pub(crate) fn receive(
        &mut self,
        batch: &[u8],
        stride: usize,
        source: SocketAddr,
        local_ip: Option<IpAddr>,
        now: Instant,
        out: &mut impl Out,
    ) {
        let Self {
            ctx,
            sessions,
            lite,
            by_source,
            candidates,
            local,
            ..
        } = self;
        // The local candidate the datagrams were sent to, for ICE.
        let destination = ice_destination(candidates, local_ip.unwrap_or(local.ip()), local.port());
        let stride = if stride == 0 { batch.len() } else { stride };
        for data in batch.chunks(stride.max(1)) {
            if let Some(l) = by_source.get(&source).and_then(|id| lite.get_mut(id)) {
                l.local = local_ip;
                if !l.input(data, now, out) {
                    ctx.stats.webrtc_datagrams_dropped.fetch_add(1, Relaxed);
                }
                continue;
            }
            // A viewer's SRTCP (NACK, PLI, reports) goes to its media sender.
            if is_rtp(data)
                && let Some(s) = by_source.get(&source).and_then(|id| sessions.get_mut(id))
                && let Role::Viewer(v) = &mut s.role
                && v.sender.is_some()
            {
                let mut to = To {
                    egress: &mut *out,
                    peer: source,
                    src: local_ip,
                };
                if !v.rtcp(data, now, &mut to) {
                    ctx.stats.webrtc_datagrams_dropped.fetch_add(1, Relaxed);
                }
                continue;
            }
            let Ok(contents) = data.try_into() else {
                ctx.stats.webrtc_datagrams_dropped.fetch_add(1, Relaxed);
                continue;
            };
            let input = Input::Receive(
                now,
                Receive {
                    proto: Protocol::Udp,
                    source,
                    destination,
                    contents,
                },
            );
            let id = by_source
                .get(&source)
                .copied()
                .filter(|id| sessions.get(id).is_some_and(|s| s.rtc.accepts(&input)))
                .or_else(|| {
                    sessions
                        .values()
                        .find(|s| s.rtc.accepts(&input))
                        .map(|s| s.id)
                });
            let Some(id) = id else {
                ctx.stats.webrtc_datagrams_dropped.fetch_add(1, Relaxed);
                continue;
            };
            by_source.insert(source, id);
            if let Some(s) = sessions.get_mut(&id) {
                s.heard(source, local_ip);
                if let Err(e) = s.rtc.handle_input(input) {
                    debug!(session = id, error = %e, "WebRTC input rejected");
                }
                s.deadline = s.drain(out, ctx);
            }
        }
    }

    /// Accepts a WHEP viewer's offer: (session id, answer SDP). `play` says which video the
    /// viewer gets: the source's, one ladder rung's, or the ladder with ABR.
    pub(crate) fn whep(
        &mut self,
        consumer: BroadcastConsumer,
        offer: SdpOffer,
        play: Play,
        out: &mut impl Out,
    ) -> Result<(u64, String), WebrtcError> {
        let id = self.next_id;
        self.next_id += 1;
        let ctx = &self.ctx;
        let broadcast: Arc<str> = consumer.broadcast().name().into();
        let auto = matches!(play, Play::Auto { .. });
        accept(id, offer, &self.candidates, false, auto).map(|(rtc, keys, answer)| {
            let twcc = auto.then(|| transport_cc_id(&answer)).flatten();
            // Start the broadcast's audio rendition now, not at connect: it is ready by the
            // time ICE and DTLS are.
            let bc = consumer.broadcast().clone();
            // The transcoders started here run on the node's runtime.
            let _node = self.node.enter();
            let viewer = Viewer {
                _opus: opus_for(&ctx.transcoders, &ctx.hub, &bc),
                // A ladder's rung has no B-frames: no re-encode for its viewers; `auto` plays
                // the source only where it has none.
                video_rendition: match &play {
                    Play::Source => video_for(&ctx.transcoders, &ctx.hub, &bc),
                    _ => None,
                },
                ladder: match &play {
                    Play::Rung(name) => Some(name.clone()),
                    _ => None,
                },
                auto: match play {
                    Play::Auto { source } => {
                        Some(Box::new(Auto::new(source, twcc, Instant::now())))
                    }
                    _ => None,
                },
                rtx_pt: None,
                rung: None,
                await_key: false,
                consumer,
                entries: Vec::with_capacity(64),
                tracks: Vec::new(),
                video: None,
                h264_pts: Vec::new(),
                video_pt: None,
                audio: None,
                audio_pt: None,
                ended: false,
                video_started: false,
                wants_keyframe: false,
                stats: ctx.webrtc.broadcast(&broadcast),
                keys,
                sender: None,
                counted: Instant::now(),
            };
            viewer.stats.viewers.fetch_add(1, Relaxed);
            let mut s = Session::new(id, rtc, broadcast, Role::Viewer(Box::new(viewer)));
            s.deadline = s.drain(out, ctx);
            self.sessions.insert(id, s);
            ctx.stats.webrtc_viewers.fetch_add(1, Relaxed);
            (id, answer)
        })
    }

    /// Accepts a WHIP publisher's offer: (session id, answer SDP).
    pub(crate) fn whip(
        &mut self,
        mut producer: BroadcastProducer,
        offer: SdpOffer,
        out: &mut impl Out,
    ) -> Result<(u64, String), WebrtcError> {
        let id = self.next_id;
        self.next_id += 1;
        let ctx = &self.ctx;
        let broadcast: Arc<str> = producer.broadcast().name().into();
        accept(id, offer, &self.candidates, true, false).map(|(rtc, _, answer)| {
            if answer.contains("opus") {
                // Declared now so that players joining before the first packet see the track
                // (and start its AAC rendition).
                producer.set_track(ingest::AUDIO, ingest::opus_track());
            }
            let publisher = Publisher {
                producer,
                ingest: Ingest::new(),
                out: Vec::with_capacity(4),
                start: Instant::now(),
                video: None,
                audio: None,
                last_keyframe: None,
                last_request: None,
            };
            let mut s = Session::new(
                id,
                rtc,
                broadcast.clone(),
                Role::Publisher(Box::new(publisher)),
            );
            s.deadline = s.drain(out, ctx);
            self.sessions.insert(id, s);
            self.publishers.insert(broadcast, id);
            ctx.stats.webrtc_publishers.fetch_add(1, Relaxed);
            (id, answer)
        })
    }

    /// Ends session `id` (a WHIP publisher's when `publisher`, else a WHEP viewer's); false when
    /// there is no such session. It is removed by the next [`Sessions::reap`].
    pub(crate) fn close(&mut self, id: u64, publisher: bool) -> bool {
        match self.lite.get_mut(&id).filter(|_| !publisher) {
            Some(l) => {
                l.closed = true;
                true
            }
            None => self
                .sessions
                .get_mut(&id)
                .filter(|s| s.publisher() == publisher)
                .map(|s| s.rtc.disconnect())
                .is_some(),
        }
    }

    /// Hands `now` to every `Rtc` whose deadline has come.
    pub(crate) fn timeout(&mut self, now: Instant, out: &mut impl Out) {
        for s in self.sessions.values_mut().filter(|s| s.deadline <= now) {
            let _ = s.rtc.handle_input(Input::Timeout(now));
            s.deadline = s.drain(out, &self.ctx);
        }
    }

    /// One media tick: viewers' frames and reports, publishers' keyframe requests, handovers;
    /// `out` is flushed.
    pub(crate) fn tick(&mut self, now: Instant, out: &mut impl Out) {
        let ctx = &self.ctx;
        for s in self.sessions.values_mut() {
            s.pump(now, out, ctx);
            match &mut s.role {
                // A viewer's media does not pass through its Rtc: nothing to drain.
                Role::Viewer(v) => {
                    if std::mem::take(&mut v.wants_keyframe) {
                        self.keyframe_wanted.push(s.broadcast.clone());
                    }
                }
                Role::Publisher(_) => s.deadline = s.drain(out, ctx),
            }
            if let Role::Viewer(v) = &s.role
                && v.sender.is_some()
                && !v.ended
                && s.peer.is_some()
                && s.rtc.is_alive()
                && s.connected_at
                    .is_some_and(|t| now.duration_since(t) >= HANDOVER_AFTER)
            {
                self.handover.push(s.id);
            }
        }
        for l in self.lite.values_mut() {
            l.pump(now, out, ctx);
            if std::mem::take(&mut l.viewer.wants_keyframe) {
                self.keyframe_wanted.push(l.broadcast.clone());
            }
        }
        for id in self.handover.drain(..) {
            let Some(mut s) = self.sessions.remove(&id) else {
                continue;
            };
            let (Role::Viewer(viewer), Some(peer)) = (s.role, s.peer) else {
                continue;
            };
            let creds = s.rtc.direct_api().local_ice_credentials();
            info!(
                session = id,
                "WHEP viewer handed over from its Rtc to its media sender"
            );
            self.lite.insert(
                id,
                Lite {
                    id,
                    viewer,
                    consent: Consent::new(&creds.ufrag, &creds.pass, now),
                    peer,
                    local: s.local,
                    broadcast: s.broadcast,
                    created: s.created,
                    closed: false,
                },
            );
        }
        out.flush();
        // Viewers' keyframe requests go to their broadcast's WHIP publisher.
        let now = Instant::now();
        for name in self.keyframe_wanted.drain(..) {
            if let Some(s) = self
                .publishers
                .get(&name)
                .and_then(|id| self.sessions.get_mut(id))
                && let Role::Publisher(p) = &mut s.role
                && p.request_keyframe(&mut s.rtc, now)
            {
                ctx.stats
                    .webrtc_keyframe_requests_sent
                    .fetch_add(1, Relaxed);
                s.deadline = s.drain(out, ctx);
            }
        }
    }

    /// Removes the sessions that ended (disconnected, closed, not connected within
    /// [`CONNECT_TIMEOUT`], a handed-over viewer's consent expired) and updates the counters.
    /// A pass over every session, so done at most every [`REAP_INTERVAL`]: true when it was.
    pub(crate) fn reap(&mut self, now: Instant) -> bool {
        if now.duration_since(self.last_reap) < REAP_INTERVAL {
            return false;
        }
        self.last_reap = now;
        let before = self.sessions.len();
        self.sessions.retain(|id, s| {
            let keep = s.rtc.is_alive()
                && (s.connected() || now.duration_since(s.created) < CONNECT_TIMEOUT);
            if !keep {
                if let Role::Viewer(v) = &mut s.role {
                    v.stats.viewers.fetch_sub(1, Relaxed);
                    v.add_counters();
                }
                let what = if s.publisher() {
                    "WHIP publisher"
                } else {
                    "WHEP viewer"
                };
                if !s.connected() {
                    warn!(
                        session = id,
                        broadcast = %s.broadcast,
                        "{what} did not connect within {CONNECT_TIMEOUT:?}; reaped"
                    );
                } else {
                    info!(session = id, broadcast = %s.broadcast, "{what} left");
                }
            }
            keep
        });
        let before_lite = self.lite.len();
        self.lite.retain(|id, l| {
            let expired = l.consent.expired(now);
            let keep = !l.closed && !l.viewer.ended && !expired;
            if !keep {
                l.viewer.stats.viewers.fetch_sub(1, Relaxed);
                l.viewer.add_counters();
                if expired {
                    info!(session = id, broadcast = %l.broadcast, "WHEP viewer sent no consent check for {:?}; gone", super::consent::CONSENT_TIMEOUT);
                } else {
                    info!(session = id, broadcast = %l.broadcast, "WHEP viewer left");
                }
            }
            keep
        });
        if self.sessions.len() != before || self.lite.len() != before_lite {
            let (sessions, lite) = (&self.sessions, &self.lite);
            let publishing = sessions.values().filter(|s| s.publisher()).count();
            let stats = &self.ctx.stats;
            stats
                .webrtc_viewers
                .store((sessions.len() - publishing + lite.len()) as u64, Relaxed);
            stats.webrtc_publishers.store(publishing as u64, Relaxed);
            self.by_source
                .retain(|_, id| sessions.contains_key(id) || lite.contains_key(id));
            self.publishers.retain(|_, id| sessions.contains_key(id));
        }
        true
    }
}

/// The local candidate a datagram that arrived at `ip` (on the bound `port`) was sent to, as
/// str0m's ICE agent knows it: the candidate with that address, or (behind a 1:1 NAT, where the
/// candidates are `--webrtc-public-ip` addresses) the first one of the same family.
fn ice_destination(candidates: &[SocketAddr], ip: IpAddr, port: u16) -> SocketAddr {
    let addr = SocketAddr::new(ip, port);
    if candidates.contains(&addr) {
        return addr;
    }
    candidates
        .iter()
        .find(|c| c.is_ipv4() == addr.is_ipv4())
        .or(candidates.first())
        .copied()
        .unwrap_or(addr)
}

struct Session {
    id: u64,
    rtc: Rtc,
    broadcast: Arc<str>,
    created: Instant,
    /// When ICE and DTLS completed.
    connected_at: Option<Instant>,
    deadline: Instant,
    /// Where str0m last sent to: the peer's address on the selected ICE pair.
    peer: Option<SocketAddr>,
    /// The local address `peer`'s datagrams arrive at: what everything to it leaves from.
    local: Option<IpAddr>,
    /// Each remote address this peer's datagrams came from, and the local address they arrived
    /// at (a few: one per ICE pair the peer checked).
    locals: Vec<(SocketAddr, Option<IpAddr>)>,
    role: Role,
}

enum Role {
    Viewer(Box<Viewer>),
    Publisher(Box<Publisher>),
}

/// A WHEP viewer's state.
struct Viewer {
    consumer: BroadcastConsumer,
    entries: Vec<Arc<Entry>>,
    tracks: Vec<Option<TrackInfo>>,
    video: Option<Mid>,
    /// The offer's H.264 payload types (packetization mode 1) and their profiles.
    h264_pts: Vec<(Pt, Option<u8>)>,
    video_pt: Option<Pt>,
    audio: Option<Mid>,
    audio_pt: Option<Pt>,
    /// The broadcast ended or the session cannot send: close it.
    ended: bool,
    /// Keeps the broadcast's AAC → Opus transcoder running while this viewer watches.
    _opus: Option<Arc<Rendition>>,
    /// The broadcast's B-frame-free video while this viewer watches; when set, only that
    /// rendition's frames are sent.
    video_rendition: Option<Arc<Rendition>>,
    /// The ABR ladder rung played instead of the source's video (`?rendition=NAME`).
    ladder: Option<Arc<str>>,
    /// `auto`: the ladder with ABR.
    auto: Option<Box<Auto>>,
    /// The RTX payload type probes pad with.
    rtx_pt: Option<Pt>,
    /// The track of that rung, once its description was seen.
    rung: Option<TrackId>,
    /// After a skip, a rung's frames wait for its next keyframe (it follows the group's start).
    await_key: bool,
    /// A keyframe of the chosen video track has been sent.
    video_started: bool,
    /// The viewer asked for a keyframe (PLI/FIR) since the last tick.
    wants_keyframe: bool,
    /// Its broadcast's WebRTC figures.
    stats: Arc<BroadcastRtcStats>,
    /// Filled with the SRTP keys when the DTLS handshake completes.
    keys: KeySlot,
    /// Sends the media once the keys are known.
    sender: Option<MediaSender>,
    /// When the sender's counters were last added to `stats`.
    counted: Instant,
}

/// A connected viewer without an `Rtc`: str0m's state (tens of KiB) is dropped once the
/// media sender runs; what stays is the sender and the answers to consent checks.
struct Lite {
    id: u64,
    viewer: Box<Viewer>,
    consent: Consent,
    peer: SocketAddr,
    /// The local address the peer's datagrams arrive at.
    local: Option<IpAddr>,
    broadcast: Arc<str>,
    created: Instant,
    /// Ended by a DELETE.
    closed: bool,
}

impl Lite {
    fn pump(&mut self, now: Instant, egress: &mut impl Out, ctx: &NodeContext) {
        let mut to = To {
            egress,
            peer: self.peer,
            src: self.local,
        };
        self.viewer
            .serve(None, self.id, self.created, now, &mut to, ctx);
    }

    /// Handles a datagram from the viewer: SRTCP goes to the sender, a consent check is
    /// answered; anything else is dropped (false).
    fn input(&mut self, data: &[u8], now: Instant, egress: &mut impl Out) -> bool {
        if is_rtp(data) {
            let mut to = To {
                egress,
                peer: self.peer,
                src: self.local,
            };
            return self.viewer.rtcp(data, now, &mut to);
        }
        let start = egress.buf().len();
        if self.consent.handle(data, self.peer, now, egress.buf()) {
            egress.commit(self.peer, self.local, start);
            return true;
        }
        false
    }
}

/// A WHIP publisher's state.
struct Publisher {
    producer: BroadcastProducer,
    ingest: Ingest,
    out: Vec<ingest::Output>,
    /// The ingest clock's origin.
    start: Instant,
    video: Option<Mid>,
    audio: Option<Mid>,
    last_keyframe: Option<Instant>,
    last_request: Option<Instant>,
}

impl Publisher {
    /// Asks the publisher for a keyframe unless one was asked for very recently; true when
    /// asked.
    fn request_keyframe(&mut self, rtc: &mut Rtc, now: Instant) -> bool {
        if self
            .last_request
            .is_some_and(|t| now.duration_since(t) < KEYFRAME_REQUEST_INTERVAL)
        {
            return false;
        }
        let Some(mut writer) = self.video.and_then(|mid| rtc.writer(mid)) else {
            return false;
        };
        self.last_request = Some(now);
        writer
            .request_keyframe(None, KeyframeRequestKind::Pli)
            .is_ok()
    }

    /// Feeds one depacketized frame to the ingest and its results to the hub.
    fn media(&mut self, rtc: &mut Rtc, d: MediaData, ctx: &NodeContext) {
        let arrival = Arrival {
            rtp: d.time.numer() as u32,
            at_us: d
                .network_time
                .saturating_duration_since(self.start)
                .as_micros() as i64,
            sender_report: d.last_sender_info.map(|sr| {
                let wall = sr
                    .ntp_time
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_micros() as i64);
                (sr.rtp_time.numer() as u32, wall)
            }),
            contiguous: d.contiguous,
        };
        let mut out = std::mem::take(&mut self.out);
        if Some(d.mid) == self.video && d.params.spec().codec == RtcCodec::H264 {
            self.ingest.video(arrival, &d.data, &mut out);
        } else if Some(d.mid) == self.audio && d.params.spec().codec == RtcCodec::Opus {
            self.ingest
                .audio(arrival, bytes::Bytes::from_owner(d.data), &mut out);
        }
        for o in out.drain(..) {
            match o {
                ingest::Output::Track(id, info) => self.producer.set_track(id, info),
                ingest::Output::Frame(id, frame) => {
                    if frame.keyframe && id == ingest::VIDEO {
                        self.last_keyframe = Some(Instant::now());
                    }
                    self.producer.push(id, frame);
                }
                ingest::Output::KeyframeNeeded => {
                    ctx.stats.webrtc_ingest_gaps.fetch_add(1, Relaxed);
                    if self.request_keyframe(rtc, Instant::now()) {
                        ctx.stats
                            .webrtc_keyframe_requests_sent
                            .fetch_add(1, Relaxed);
                    }
                }
            }
        }
        self.out = out;
    }
}

impl Session {
    /// ICE and DTLS have completed.
    fn connected(&self) -> bool {
        self.connected_at.is_some()
    }

    fn publisher(&self) -> bool {
        matches!(self.role, Role::Publisher(_))
    }

    /// Sends what the Rtc has queued and handles its events; returns its next deadline.
    fn drain(&mut self, egress: &mut impl Out, ctx: &NodeContext) -> Instant {
        loop {
            if !self.rtc.is_alive() {
                return Instant::now();
            }
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    if self.peer != Some(t.destination) {
                        self.peer = Some(t.destination);
                        self.local = self.local_for(t.destination);
                    }
                    // A viewer's RTP and RTCP are the MediaSender's; str0m's (reports about
                    // streams it never sent on) would only confuse the receiver.
                    if !(matches!(self.role, Role::Viewer(_)) && is_rtp(&t.contents)) {
                        egress.push(t.destination, self.local, &t.contents);
                    }
                }
                Ok(Output::Timeout(t)) => {
                    egress.flush();
                    return t;
                }
                Ok(Output::Event(e)) => self.handle_event(e, ctx),
                Err(e) => {
                    debug!(session = self.id, error = %e, "WebRTC session failed");
                    self.rtc.disconnect();
                }
            }
        }
    }

    fn handle_event(&mut self, e: Event, ctx: &NodeContext) {
        match (e, &mut self.role) {
            (Event::Connected, role) => {
                self.connected_at = Some(Instant::now());
                ctx.stats.webrtc_connected.fetch_add(1, Relaxed);
                let after_ms = self.created.elapsed().as_millis() as u64;
                match role {
                    Role::Viewer(_) => {
                        info!(session = self.id, broadcast = %self.broadcast, after_ms, "WHEP viewer connected")
                    }
                    Role::Publisher(p) => {
                        info!(session = self.id, broadcast = %self.broadcast, after_ms, "WHIP publisher connected");
                        if p.request_keyframe(&mut self.rtc, Instant::now()) {
                            ctx.stats
                                .webrtc_keyframe_requests_sent
                                .fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            (Event::IceConnectionStateChange(IceConnectionState::Disconnected), _) => {
                self.rtc.disconnect()
            }
            (Event::MediaAdded(m), Role::Viewer(v)) => match m.kind {
                MediaKind::Video if v.video.is_none() => v.video = Some(m.mid),
                MediaKind::Audio if v.audio.is_none() => v.audio = Some(m.mid),
                _ => {}
            },
            (Event::MediaAdded(m), Role::Publisher(p)) => match m.kind {
                MediaKind::Video if p.video.is_none() => p.video = Some(m.mid),
                MediaKind::Audio if p.audio.is_none() => p.audio = Some(m.mid),
                _ => {}
            },
            (Event::MediaData(d), Role::Publisher(p)) => p.media(&mut self.rtc, d, ctx),
            _ => {}
        }
    }

    /// Writes the frames the hub has for this viewer and its due sender reports; asks a
    /// publisher for a keyframe when it sent none for a while.
    fn pump(&mut self, now: Instant, egress: &mut impl Out, ctx: &NodeContext) {
        if !self.connected() {
            return;
        }
        match &mut self.role {
            Role::Viewer(v) => {
                let Some(peer) = self.peer else { return };
                let mut to = To {
                    egress,
                    peer,
                    src: self.local,
                };
                v.serve(
                    Some(&mut self.rtc),
                    self.id,
                    self.created,
                    now,
                    &mut to,
                    ctx,
                );
                if v.ended {
                    self.rtc.disconnect();
                }
            }
            Role::Publisher(p) => {
                if p.last_keyframe
                    .is_none_or(|t| now.duration_since(t) >= PUBLISHER_KEYFRAME_INTERVAL)
                    && p.last_request
                        .is_none_or(|t| now.duration_since(t) >= PUBLISHER_KEYFRAME_INTERVAL)
                    && p.request_keyframe(&mut self.rtc, now)
                {
                    ctx.stats
                        .webrtc_keyframe_requests_sent
                        .fetch_add(1, Relaxed);
                }
            }
        }
    }
}

impl Viewer {
    /// Reads the negotiated payload types (H.264 with packetization mode 1 and their profiles;
    /// Opus) from the session, so that sending needs the `Rtc` no more.
    fn read_pts(&mut self, rtc: &mut Rtc) {
        if let Some(writer) = self.video.and_then(|mid| rtc.writer(mid)) {
            self.rtx_pt = writer
                .payload_params()
                .filter(|p| {
                    p.spec().codec == RtcCodec::H264
                        && p.spec().format.packetization_mode == Some(1)
                })
                .find_map(|p| p.resend());
            self.h264_pts = writer
                .payload_params()
                .filter(|p| {
                    p.spec().codec == RtcCodec::H264
                        && p.spec().format.packetization_mode == Some(1)
                })
                .map(|p| {
                    (
                        p.pt(),
                        p.spec().format.profile_level_id.map(|id| (id >> 16) as u8),
                    )
                })
                .collect();
        }
        if let Some(writer) = self.audio.and_then(|mid| rtc.writer(mid)) {
            self.audio_pt = writer
                .payload_params()
                .find(|p| p.spec().codec == RtcCodec::Opus)
                .map(|p| p.pt());
        }
    }

    /// Starts the media sender once the DTLS handshake has given the keys.
    fn start_sender(&mut self, rtc: &mut Rtc, id: u64) -> bool {
        if self.sender.is_some() {
            return true;
        }
        let keys = self.keys.clone();
        let Some(keying) = keys.get() else {
            return false;
        };
        let mut api = rtc.direct_api();
        let mut ssrc = |mid: Option<Mid>| {
            mid.and_then(|mid| api.stream_tx_by_mid(mid, None))
                .map(|s| *s.ssrc())
        };
        let (video, audio) = (ssrc(self.video), ssrc(self.audio));
        let rtx = self
            .video
            .and_then(|mid| api.stream_tx_by_mid(mid, None))
            .and_then(|s| s.rtx())
            .map(|s| *s);
        self.read_pts(rtc);
        match MediaSender::new(keying, video, audio, format!("castnode-{id}").into()) {
            Ok(mut sender) => {
                if let Some(auto) = &self.auto {
                    let rtx = rtx.zip(self.rtx_pt).map(|(ssrc, pt)| (ssrc, *pt));
                    sender.enable_abr(auto.twcc, rtx, Instant::now());
                    debug!(session = id, twcc = ?auto.twcc, rtx = ?rtx, "WHEP viewer plays auto");
                }
                debug!(session = id, profile = ?keying.profile, "WHEP media sender started");
                self.sender = Some(sender);
                true
            }
            Err(err) => {
                warn!(session = id, error = %err, "WHEP viewer has unusable SRTP keys");
                self.ended = true;
                false
            }
        }
    }

    /// One media tick: the frames the hub has, the due sender reports, the counters. `rtc` as
    /// for [`Viewer::pump`].
    fn serve(
        &mut self,
        rtc: Option<&mut Rtc>,
        id: u64,
        created: Instant,
        now: Instant,
        to: &mut To<'_, impl Out>,
        ctx: &NodeContext,
    ) {
        self.pump(rtc, id, created, now, to);
        self.abr_tick(id, now);
        if let Some(sender) = &mut self.sender {
            sender.poll(now, to);
        }
        self.count(now, ctx);
    }

    /// Hands an SRTCP datagram to the media sender (NACKs are answered through `to`); false
    /// when there is no sender yet or the datagram is not authentic.
    fn rtcp(&mut self, data: &[u8], now: Instant, to: &mut To<'_, impl Out>) -> bool {
        self.sender
            .as_mut()
            .is_some_and(|s| s.handle_rtcp(data, now, to).is_ok())
    }

    /// Adds the sender's counters to the broadcast's figures, once per [`COUNTERS_INTERVAL`],
    /// and passes on its keyframe requests.
    fn count(&mut self, now: Instant, ctx: &NodeContext) {
        let Some(sender) = &mut self.sender else {
            return;
        };
        if sender.take_keyframe_request() {
            ctx.stats.webrtc_keyframe_requests.fetch_add(1, Relaxed);
            self.wants_keyframe = true;
        }
        if now.duration_since(self.counted) >= COUNTERS_INTERVAL {
            self.counted = now;
            self.add_counters();
            if let Some(auto) = self.auto.as_deref_mut() {
                auto.count_time(now, &self.stats);
            }
        }
    }

    /// Adds what the sender counted since the last call to the broadcast's figures.
    fn add_counters(&mut self) {
        let Some(sender) = &mut self.sender else {
            return;
        };
        let c = sender.take_counters();
        self.stats.bytes_sent.fetch_add(c.bytes, Relaxed);
        self.stats
            .retransmitted_bytes
            .fetch_add(c.retransmitted, Relaxed);
        self.stats.nacks.fetch_add(c.nacks, Relaxed);
        self.stats.plis.fetch_add(c.plis, Relaxed);
        self.stats.firs.fetch_add(c.firs, Relaxed);
    }

    /// Sends the frames the hub has for this viewer. `rtc` is needed until the sender has
    /// started (it is gone once the session is handed over to [`Consent`]).
    fn pump(
        &mut self,
        rtc: Option<&mut Rtc>,
        id: u64,
        created: Instant,
        now: Instant,
        to: &mut To<'_, impl Out>,
    ) {
        if self.video.is_none() || self.ended {
            return;
        }
        if self.sender.is_none() && !rtc.is_some_and(|rtc| self.start_sender(rtc, id)) {
            return;
        }
        if self.tracks.is_empty() {
            let (tracks, _) = self.consumer.snapshot();
            for (id, info) in tracks {
                self.set_track(id, info);
            }
        }
        if !self.consumer.has_news() {
            return;
        }
        match self.consumer.read(&mut self.entries, 256) {
            ReadOutcome::Ended => {
                self.ended = true;
                return;
            }
            ReadOutcome::Skipped { .. } => {
                if self.ladder.is_some() {
                    self.await_key = true;
                }
                if let Some(auto) = self.auto.as_deref_mut() {
                    auto.switcher.skipped();
                }
            }
            _ => {}
        }
        let mut entries = std::mem::take(&mut self.entries);
        for e in entries.drain(..) {
            match &e.item {
                Item::Config { track, info } => self.set_track(*track, info.clone()),
                Item::Frame { track, frame } => {
                    let Some(Some(info)) = self.tracks.get(usize::from(track.0)) else {
                        continue;
                    };
                    match info.codec {
                        Codec::H264 if self.auto.is_some() => {
                            let Some(auto) = self.auto.as_deref_mut() else {
                                continue;
                            };
                            if let Some(i) = auto.index(*track) {
                                auto.rungs[i].rate.add(frame.pts, frame.payload.len());
                            }
                            let (verdict, event) = auto.switcher.frame(
                                track.0,
                                frame.pts,
                                frame.keyframe,
                                e.group_start,
                                || e.clone(),
                            );
                            let Some(sender) = self.sender.as_mut() else {
                                continue;
                            };
                            match event {
                                abr::Event::Switched { from, to: rung } => {
                                    sender.drop_queued();
                                    auto.switched(id, from, rung, &self.stats, now);
                                    let held: Vec<Arc<Entry>> = auto.switcher.take_held().collect();
                                    for h in &held {
                                        if let Item::Frame { track, frame } = &h.item
                                            && let Some(Some(info)) =
                                                self.tracks.get(usize::from(track.0))
                                        {
                                            send_h264(
                                                sender,
                                                &mut self.video_pt,
                                                &self.h264_pts,
                                                info,
                                                h,
                                                frame,
                                                now,
                                                to,
                                            );
                                            auto.switcher.sent(frame.pts);
                                        }
                                    }
                                }
                                abr::Event::GaveUp => {
                                    debug!(
                                        session = id,
                                        "ABR switch given up: no keyframe at the cut"
                                    )
                                }
                                abr::Event::None => {}
                            }
                            if verdict == Verdict::Send {
                                if !self.video_started {
                                    self.video_started = true;
                                    self.stats.ttff.observe(created.elapsed());
                                }
                                send_h264(
                                    sender,
                                    &mut self.video_pt,
                                    &self.h264_pts,
                                    info,
                                    &e,
                                    frame,
                                    now,
                                    to,
                                );
                            }
                        }
                        Codec::H264
                            if match (&self.ladder, &self.video_rendition) {
                                (Some(_), _) => self.rung == Some(*track),
                                (None, Some(r)) => r.track() == Some(*track),
                                (None, None) => track.is_source(),
                            } =>
                        {
                            if self.await_key {
                                if !frame.keyframe {
                                    continue;
                                }
                                self.await_key = false;
                            }
                            if !self.video_started {
                                if !frame.keyframe {
                                    continue;
                                }
                                self.video_started = true;
                                self.stats.ttff.observe(created.elapsed());
                            }
                            let profile = info
                                .config
                                .as_ref()
                                .and_then(|c| c.get(1).copied())
                                .unwrap_or(0x42);
                            let Some(pt) = choose_pt(&mut self.video_pt, &self.h264_pts, profile)
                            else {
                                continue;
                            };
                            let rtp: &Arc<RtpFrame> = e.memo(MemoSlot::Rtp, |_| {
                                Arc::new(RtpFrame::h264(
                                    &frame.payload,
                                    info.config.as_deref(),
                                    frame.keyframe,
                                ))
                            });
                            if let Some(sender) = &mut self.sender {
                                sender.send(Kind::Video, *pt, rtp, frame.pts, now, to);
                            }
                        }
                        // The source's Opus (WHIP), or this viewer's own transcoder's: a stopped
                        // transcoder's frames may still be in the log.
                        Codec::Opus
                            if track.is_source()
                                || self._opus.as_ref().and_then(|r| r.track()) == Some(*track) =>
                        {
                            let Some(pt) = self.audio_pt else {
                                continue;
                            };
                            if let Some(auto) = self.auto.as_deref_mut() {
                                auto.audio.add(frame.pts, frame.payload.len());
                            }
                            let rtp: &Arc<RtpFrame> =
                                e.memo(MemoSlot::Rtp, |_| Arc::new(RtpFrame::opus(&frame.payload)));
                            if let Some(sender) = &mut self.sender {
                                sender.send(Kind::Audio, *pt, rtp, frame.pts, now, to);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        self.entries = entries;
    }
}

/// The H.264 payload type to send with: packetization mode 1, preferring the offer's entry for
/// the stream's profile (chosen once, at the first frame, into `chosen`).
fn choose_pt(
    chosen: &mut Option<Pt>,
    h264_pts: &[(Pt, Option<u8>)],
    profile_idc: u8,
) -> Option<Pt> {
    if chosen.is_none() {
        *chosen = h264_pts
            .iter()
            .find(|(_, prof)| *prof == Some(profile_idc))
            .or(h264_pts.first())
            .map(|(pt, _)| *pt);
    }
    *chosen
}

impl Viewer {
    /// A track's description arrived: kept, and the ladder rung asked for found by its name once
    /// here rather than per frame.
    fn set_track(&mut self, id: TrackId, info: TrackInfo) {
        let i = usize::from(id.0);
        if self.tracks.len() <= i {
            self.tracks.resize(i + 1, None);
        }
        if self.ladder.is_some() {
            if info.rendition == self.ladder {
                self.rung = Some(id);
            } else if self.rung == Some(id) {
                self.rung = None;
            }
        }
        if let Some(auto) = self.auto.as_deref_mut() {
            auto.set_track(id, &info);
        }
        self.tracks[i] = Some(info);
    }

    /// An `auto` viewer's controller, every [`ABR_INTERVAL`]: the rung to go to, a probe to
    /// start; a paced queue that waited over [`MAX_QUEUED`] resumes at the next keyframe.
    fn abr_tick(&mut self, id: u64, now: Instant) {
        let (Some(auto), Some(sender)) = (self.auto.as_deref_mut(), self.sender.as_mut()) else {
            return;
        };
        if now.duration_since(auto.last_decide) < ABR_INTERVAL || auto.rungs.is_empty() {
            return;
        }
        auto.last_decide = now;
        if sender.queued_for(now) > MAX_QUEUED && auto.switcher.target() == auto.switcher.current()
        {
            debug!(
                session = id,
                "WHEP viewer's paced video over {MAX_QUEUED:?} behind; resuming at the next keyframe"
            );
            sender.drop_queued();
            auto.switcher.skipped();
        }
        let audio = auto.audio.bps();
        auto.needs.clear();
        auto.needs.extend(
            auto.rungs
                .iter()
                .map(|r| ((r.rate.bps() + audio) as f64 * OVERHEAD) as u64),
        );
        let measured = auto.rungs.iter().all(|r| r.rate.bps() > 0);
        let can_probe = sender.can_probe();
        let Some(bwe) = sender.bwe_mut() else {
            return;
        };
        let current = auto.switcher.target().and_then(|t| auto.index(TrackId(t)));
        let target = match current {
            // Until every rung's bitrate is known: the lowest (it climbs by probing).
            None if !measured => auto.rungs.len() - 1,
            None => Controller::fit(&auto.needs, bwe.estimate(now)),
            Some(current) if !measured => current,
            Some(current) => {
                let signals = Signals {
                    estimate: bwe.estimate(now),
                    last_overuse: bwe.last_overuse(),
                    can_probe,
                    probing: bwe.probing(),
                    outcome: bwe.take_probe_outcome(),
                };
                let d = auto.controller.decide(now, &signals, &auto.needs, current);
                if let Some(rate) = d.probe {
                    debug!(session = id, rate, "ABR probe");
                    bwe.start_probe(rate, now);
                }
                d.target
            }
        };
        if current != Some(target) {
            debug!(
                session = id,
                to = %auto.rungs[target].name,
                estimate = bwe.estimate(now),
                needs = ?auto.needs,
                "ABR target"
            );
            auto.switcher.request(auto.rungs[target].track.0);
        }
    }
}

/// Packetizes (once per frame, memoized in its entry) and sends one H.264 frame of a track
/// described by `info`.
#[allow(clippy::too_many_arguments)]
fn send_h264(
    sender: &mut MediaSender,
    video_pt: &mut Option<Pt>,
    h264_pts: &[(Pt, Option<u8>)],
    info: &TrackInfo,
    e: &Entry,
    frame: &Frame,
    now: Instant,
    to: &mut To<'_, impl Out>,
) {
    // High: what every rung's profile (high, main, constrained baseline) decodes as.
    let Some(pt) = choose_pt(video_pt, h264_pts, 0x64) else {
        return;
    };
    let rtp: &Arc<RtpFrame> = e.memo(MemoSlot::Rtp, |_| {
        Arc::new(RtpFrame::h264(
            &frame.payload,
            info.config.as_deref(),
            frame.keyframe,
        ))
    });
    sender.send(Kind::Video, *pt, rtp, frame.pts, now, to);
}

/// One rung an `auto` viewer can play.
struct AutoRung {
    track: TrackId,
    /// The rendition's name (`source` for the source).
    name: Arc<str>,
    height: u32,
    rate: RateMeter,
}

/// An `auto` viewer's ABR state ([`super::abr`]).
struct Auto {
    /// Whether the source is the top rung.
    source: bool,
    /// The transport-cc extension id the answer named.
    twcc: Option<u8>,
    /// Top first: the source (where it is a rung), then the ladder's rungs by height.
    rungs: Vec<AutoRung>,
    /// What each rung needs, bits per second (rebuilt at each decision).
    needs: Vec<u64>,
    controller: Controller,
    switcher: Switcher<Arc<Entry>>,
    audio: RateMeter,
    last_decide: Instant,
    /// When time in the current rung was last counted.
    counted: Instant,
}

impl Auto {
    fn new(source: bool, twcc: Option<u8>, now: Instant) -> Self {
        Self {
            source,
            twcc,
            rungs: Vec::with_capacity(8),
            needs: Vec::with_capacity(8),
            controller: Controller::new(now),
            switcher: Switcher::new(),
            audio: RateMeter::default(),
            last_decide: now,
            counted: now,
        }
    }

    fn index(&self, track: TrackId) -> Option<usize> {
        self.rungs.iter().position(|r| r.track == track)
    }

    /// A track's description arrived: a rung is added (or updated, or removed when it is no
    /// longer H.264), the rungs ordered again.
    fn set_track(&mut self, id: TrackId, info: &TrackInfo) {
        let name = match (&info.rendition, id.is_source()) {
            (Some(name), false) if id.is_ladder() => Some(name.clone()),
            (None, true) if self.source => Some(Arc::from("source")),
            _ => None,
        };
        let at = self.index(id);
        match (name, at) {
            (Some(name), at) if info.codec == Codec::H264 => {
                let height = info.video.as_ref().map_or(0, |v| v.height);
                match at {
                    Some(i) => {
                        self.rungs[i].name = name;
                        self.rungs[i].height = height;
                    }
                    None => self.rungs.push(AutoRung {
                        track: id,
                        name,
                        height,
                        rate: RateMeter::default(),
                    }),
                }
                self.rungs.sort_by_key(|r| {
                    (!r.track.is_source(), std::cmp::Reverse(r.height), r.track.0)
                });
            }
            (_, Some(i)) => {
                self.rungs.remove(i);
            }
            _ => {}
        }
    }

    /// The viewer now plays `to` (from `from`): counted by direction, the controller told.
    fn switched(
        &mut self,
        id: u64,
        from: Option<u8>,
        to: u8,
        stats: &BroadcastRtcStats,
        now: Instant,
    ) {
        if let Some(from) = from {
            let (rf, rt) = (self.index(TrackId(from)), self.index(TrackId(to)));
            let up = rt < rf;
            let counter = if up {
                &stats.abr_switches_up
            } else {
                &stats.abr_switches_down
            };
            counter.fetch_add(1, Relaxed);
            self.count_time_in(from, now, stats);
            self.controller.switched(now);
            let name = |r: Option<usize>| r.map_or("?".into(), |i| self.rungs[i].name.clone());
            info!(
                session = id,
                from = %name(rf),
                to = %name(rt),
                up,
                "ABR switch"
            );
        } else {
            self.counted = now;
        }
    }

    /// Adds the time since the last count to the rung played.
    fn count_time(&mut self, now: Instant, stats: &BroadcastRtcStats) {
        if let Some(current) = self.switcher.current() {
            self.count_time_in(current, now, stats);
        }
    }

    fn count_time_in(&mut self, track: u8, now: Instant, stats: &BroadcastRtcStats) {
        let ms = now.saturating_duration_since(self.counted).as_millis() as u64;
        self.counted = now;
        if let Some(i) = self.index(TrackId(track)) {
            stats.add_rendition_time(&self.rungs[i].name, ms);
        }
    }
}

/// The egress batches towards one peer, as a media sender's [`Sink`].
struct To<'a, O: Out> {
    egress: &'a mut O,
    peer: SocketAddr,
    /// The local address the peer's datagrams arrive at.
    src: Option<IpAddr>,
}

impl<O: Out> Sink for To<'_, O> {
    fn buffer(&mut self) -> &mut Vec<u8> {
        self.egress.buf()
    }

    fn commit(&mut self, start: usize) {
        self.egress.commit(self.peer, self.src, start);
    }
}

/// An RTP or RTCP datagram (RFC 7983: first byte 128–191), as opposed to STUN or DTLS.
fn is_rtp(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(128..=191))
}

impl Session {
    fn new(id: u64, rtc: Rtc, broadcast: Arc<str>, role: Role) -> Self {
        let now = Instant::now();
        Self {
            id,
            rtc,
            broadcast,
            connected_at: None,
            created: now,
            deadline: now,
            peer: None,
            local: None,
            locals: Vec::new(),
            role,
        }
    }

    /// A datagram the session accepted came from `remote` and arrived at `local`.
    fn heard(&mut self, remote: SocketAddr, local: Option<IpAddr>) {
        let known = self.locals.len();
        match self.locals.iter_mut().find(|(r, _)| *r == remote) {
            Some((_, l)) if *l == local => return,
            Some((_, l)) => *l = local,
            // Bounded: a peer checks one pair per local candidate and remote address.
            None if known < 32 => self.locals.push((remote, local)),
            None => return,
        }
        if self.peer == Some(remote) {
            self.local = local;
        }
    }

    /// The local address `remote`'s datagrams arrived at.
    fn local_for(&self, remote: SocketAddr) -> Option<IpAddr> {
        self.locals
            .iter()
            .find(|(r, _)| *r == remote)
            .and_then(|(_, l)| *l)
    }
}

/// Builds a peer from an offer: (peer, where a viewer's SRTP keys will be, answer SDP). A
/// publisher's offer must send H.264; a viewer's must receive H.264 and Opus.
fn accept(
    id: u64,
    offer: SdpOffer,
    candidates: &[SocketAddr],
    publisher: bool,
    abr: bool,
) -> Result<(Rtc, KeySlot, String), WebrtcError> {
    let builder = Rtc::builder()
        .set_ice_lite(true)
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false);
    let (mut rtc, keys) = if publisher {
        (
            keys::build_plain(builder, Instant::now()),
            KeySlot::default(),
        )
    } else {
        // castnode sends a viewer's media itself, without RTP header extensions but the
        // transport-wide sequence number of an `auto` viewer; str0m's send buffers stay unused.
        let mut builder = builder
            .clear_extension_map()
            .set_send_buffer_video(VIDEO_SEND_BUFFER)
            .set_send_buffer_audio(VIDEO_SEND_BUFFER);
        if abr {
            builder = builder.set_extension(3, Extension::TransportSequenceNumber);
        }
        keys::build(builder, Instant::now())
    };
    for c in candidates {
        if let Ok(c) = Candidate::host(*c, "udp") {
            rtc.add_local_candidate(c);
        }
    }
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| WebrtcError::Rejected(e.to_string()))?;
    let sdp = answer.to_sdp_string();
    if !sdp.contains("H264") {
        return Err(WebrtcError::NoCodec("H.264 video"));
    }
    if !publisher && !sdp.contains("opus") {
        return Err(WebrtcError::NoCodec("Opus audio"));
    }
    debug!(session = id, publisher, "offer accepted");
    Ok((rtc, keys, sdp))
}

/// The id the SDP answer gives the transport-cc header extension.
fn transport_cc_id(sdp: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=extmap:")?;
        let (id, uri) = rest.split_once(' ')?;
        let id = id.split('/').next()?.parse().ok()?;
        (uri.trim() == TRANSPORT_CC_URI && (1..=14).contains(&id)).then_some(id)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeArgs;
    use str0m::change::SdpAnswer;
    use str0m::ice::StunMessage;
    use str0m::media::Direction;

    /// What the table sent, datagram by datagram.
    #[derive(Default)]
    struct Sent {
        buf: Vec<u8>,
        datagrams: Vec<(SocketAddr, Option<IpAddr>, Vec<u8>)>,
    }

    impl Out for Sent {
        fn buf(&mut self) -> &mut Vec<u8> {
            &mut self.buf
        }

        fn commit(&mut self, dest: SocketAddr, src: Option<IpAddr>, start: usize) {
            let datagram = self.buf.split_off(start);
            self.datagrams.push((dest, src, datagram));
        }

        fn flush(&mut self) {}
    }

    const SERVER: &str = "192.0.2.1:8189";

    fn table() -> (Sessions, Arc<NodeContext>) {
        let ctx = NodeContext::new(NodeArgs::default().resolve().unwrap());
        let server: SocketAddr = SERVER.parse().unwrap();
        let table = Sessions::new(
            ctx.clone(),
            tokio::runtime::Handle::current(),
            server,
            vec![server],
            Instant::now(),
        );
        (table, ctx)
    }

    fn dropped(ctx: &NodeContext) -> u64 {
        ctx.stats.webrtc_datagrams_dropped.load(Relaxed)
    }

    /// A WHEP viewer's str0m `Rtc` at `addr` (as the load tool builds one) and its offer.
    fn client(addr: SocketAddr) -> (Rtc, SdpOffer, str0m::change::SdpPendingOffer) {
        let builder = Rtc::builder()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false);
        let mut rtc = keys::build_plain(builder, Instant::now());
        rtc.add_local_candidate(Candidate::host(addr, "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().unwrap();
        (rtc, offer, pending)
    }

    /// A viewer of `live/t` whose offer the table accepted: (session id, its client, the
    /// broadcast's producer).
    fn viewer(
        table: &mut Sessions,
        ctx: &NodeContext,
        out: &mut Sent,
    ) -> (u64, Rtc, BroadcastProducer) {
        let publisher = ctx.hub.publish("live/t", Instant::now()).unwrap();
        let consumer = ctx.hub.subscribe("live/t").unwrap();
        let (mut rtc, offer, pending) = client("192.0.2.50:40000".parse().unwrap());
        let (id, answer) = table.whep(consumer, offer, Play::Source, out).unwrap();
        let answer = SdpAnswer::from_sdp_string(&answer).unwrap();
        rtc.sdp_api().accept_answer(pending, answer).unwrap();
        (id, rtc, publisher)
    }

    /// A STUN binding request for `username`, signed with `pwd`.
    fn binding_request(username: &str, pwd: &str) -> Vec<u8> {
        super::super::consent::tests::request(username, pwd)
    }

    /// Garbage (a STUN-less, DTLS-less byte string, an RTP-looking datagram, a GRO batch of
    /// them) from anywhere is dropped, each datagram counted, and nothing is sent.
    #[tokio::test]
    async fn garbage_is_dropped_and_counted() {
        let (mut table, ctx) = table();
        let mut out = Sent::default();
        let now = Instant::now();
        let from: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        table.receive(b"\x00\x01garbage", 0, from, None, now, &mut out);
        assert_eq!(dropped(&ctx), 1);
        table.receive(&[0x80; 40], 0, from, None, now, &mut out);
        assert_eq!(dropped(&ctx), 2);
        // Three datagrams of 10 bytes and a 4-byte tail in one GRO batch.
        table.receive(&[0x17; 34], 10, from, None, now, &mut out);
        assert_eq!(dropped(&ctx), 6);
        // With a session present, garbage still disturbs nothing.
        let (id, _client, _publisher) = viewer(&mut table, &ctx, &mut out);
        table.receive(&[0xff; 100], 0, from, None, now, &mut out);
        assert_eq!(dropped(&ctx), 7);
        assert!(out.datagrams.is_empty());
        assert!(table.by_source.is_empty());
        assert_eq!(table.count(), (1, 0));
        assert!(table.sessions.contains_key(&id));
    }

    /// A well-formed STUN check from an unknown source that names no session's credentials is
    /// dropped: no session learns the source, nothing is answered.
    #[tokio::test]
    async fn a_check_from_an_unknown_source_matching_no_session_is_dropped() {
        let (mut table, ctx) = table();
        let mut out = Sent::default();
        let (_id, _client, _publisher) = viewer(&mut table, &ctx, &mut out);
        let from: SocketAddr = "198.51.100.9:5000".parse().unwrap();
        let check = binding_request("nosuchufrag:client", "some-password-of-24-chars");
        table.receive(&check, 0, from, None, Instant::now(), &mut out);
        assert_eq!(dropped(&ctx), 1);
        assert!(out.datagrams.is_empty());
        assert!(table.by_source.is_empty());
    }

    /// A session that never connects is kept for CONNECT_TIMEOUT, then reaped (time driven by
    /// the instants given); the viewer counters go back down.
    #[tokio::test]
    async fn a_session_that_never_connects_is_reaped_after_the_connect_timeout() {
        let (mut table, ctx) = table();
        let mut out = Sent::default();
        let start = Instant::now();
        let (id, _client, _publisher) = viewer(&mut table, &ctx, &mut out);
        assert_eq!(ctx.stats.webrtc_viewers.load(Relaxed), 1);
        assert!(table.next_deadline(start) >= start);
        assert!(table.reap(start + CONNECT_TIMEOUT / 2));
        assert_eq!(table.count(), (1, 0));
        // Within REAP_INTERVAL of the last pass: no pass.
        assert!(!table.reap(start + CONNECT_TIMEOUT / 2 + REAP_INTERVAL / 2));
        let later = Instant::now() + CONNECT_TIMEOUT + Duration::from_millis(1);
        table.timeout(later, &mut out);
        assert!(table.reap(later));
        assert_eq!(table.count(), (0, 0));
        assert!(!table.sessions.contains_key(&id));
        assert_eq!(ctx.stats.webrtc_viewers.load(Relaxed), 0);
        assert_eq!(
            ctx.webrtc.broadcast(&"live/t".into()).viewers.load(Relaxed),
            0
        );
    }

    /// Closing an unknown id, or a viewer's id as a publisher's, returns false; closing the
    /// viewer returns true and the next reap removes it.
    #[tokio::test]
    async fn close_finds_only_the_sessions_it_names() {
        let (mut table, ctx) = table();
        let mut out = Sent::default();
        assert!(!table.close(42, false));
        assert!(!table.close(42, true));
        let (id, _client, _publisher) = viewer(&mut table, &ctx, &mut out);
        assert!(!table.close(id + 1, false));
        assert!(!table.close(id, true));
        assert!(table.close(id, false));
        assert!(table.reap(Instant::now() + REAP_INTERVAL));
        assert_eq!(table.count(), (0, 0));
        assert_eq!(ctx.stats.webrtc_viewers.load(Relaxed), 0);
    }

    /// A real str0m client, in memory, through ICE and DTLS to connected: the table learns the
    /// client's source, answers from the local address the client's datagrams arrived at, and
    /// the viewer's SRTP keys arrive in its slot; HANDOVER_AFTER later the viewer goes on
    /// without its `Rtc` and its consent checks are still answered; closed, it is reaped.
    #[tokio::test]
    async fn a_str0m_client_connects_through_the_table() {
        let (mut table, ctx) = table();
        let mut out = Sent::default();
        let (id, mut client, _publisher) = viewer(&mut table, &ctx, &mut out);
        let client_addr: SocketAddr = "192.0.2.50:40000".parse().unwrap();
        let server: SocketAddr = SERVER.parse().unwrap();
        let arrived_at = Some(server.ip());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut connected = false;
        while !(connected && ctx.stats.webrtc_connected.load(Relaxed) == 1) {
            let now = Instant::now();
            assert!(now < deadline, "did not connect");
            // The client's output goes to the table...
            let client_timeout;
            loop {
                match client.poll_output().unwrap() {
                    Output::Transmit(t) => {
                        assert_eq!(t.destination, server);
                        table.receive(&t.contents, 0, client_addr, arrived_at, now, &mut out);
                    }
                    Output::Timeout(t) => {
                        client_timeout = t;
                        break;
                    }
                    Output::Event(Event::Connected) => connected = true,
                    Output::Event(_) => {}
                }
            }
            // ... and the table's to the client.
            for (dest, src, datagram) in out.datagrams.drain(..) {
                assert_eq!((dest, src), (client_addr, arrived_at));
                let input = Input::Receive(
                    now,
                    Receive {
                        proto: Protocol::Udp,
                        source: server,
                        destination: client_addr,
                        contents: datagram.as_slice().try_into().unwrap(),
                    },
                );
                client.handle_input(input).unwrap();
            }
            let now = Instant::now();
            if client_timeout <= now {
                client.handle_input(Input::Timeout(now)).unwrap();
            }
            table.timeout(now, &mut out);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dropped(&ctx), 0);
        assert_eq!(table.by_source.get(&client_addr), Some(&id));
        let Role::Viewer(v) = &table.sessions[&id].role else {
            panic!("not a viewer");
        };
        assert!(
            v.keys.get().is_some(),
            "the viewer's SRTP keys did not arrive"
        );
        assert!(table.sessions[&id].connected());
        // Still there after a reap: connected sessions are not reaped for their age.
        let reaped = Instant::now() + CONNECT_TIMEOUT * 2;
        assert!(table.reap(reaped));
        assert_eq!(table.count(), (1, 0));
        // A tick HANDOVER_AFTER later hands the viewer over to its media sender alone; the
        // client's next consent check is answered from the same local address.
        let creds = table
            .sessions
            .get_mut(&id)
            .unwrap()
            .rtc
            .direct_api()
            .local_ice_credentials();
        let later = Instant::now() + HANDOVER_AFTER;
        table.tick(later, &mut out);
        assert_eq!(table.count(), (0, 1));
        assert_eq!(ctx.stats.webrtc_viewers.load(Relaxed), 1);
        out.datagrams.clear();
        let check = binding_request(&format!("{}:client", creds.ufrag), &creds.pass);
        table.receive(&check, 0, client_addr, arrived_at, later, &mut out);
        assert_eq!(out.datagrams.len(), 1);
        assert_eq!(
            (out.datagrams[0].0, out.datagrams[0].1),
            (client_addr, arrived_at)
        );
        assert!(
            StunMessage::parse(&out.datagrams[0].2)
                .is_ok_and(|m| m.is_successful_binding_response())
        );
        assert_eq!(dropped(&ctx), 0);
        // Closed, it is gone at the next reap.
        assert!(table.close(id, false));
        assert!(table.reap(reaped + REAP_INTERVAL));
        assert_eq!(table.count(), (0, 0));
        assert_eq!(ctx.stats.webrtc_viewers.load(Relaxed), 0);
    }
}
