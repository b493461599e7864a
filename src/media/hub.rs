//! The in-node hub: live broadcasts, their publishers and their consumers.
//!
//! Guarantees:
//! - Every broadcast's name passes [`valid_name`], whatever protocol published it: [`Hub::publish`]
//!   refuses any other ([`PublishError::BadName`]).
//! - Fan-out is zero-copy: every consumer reads the same `Arc<Entry>`; derived serializations
//!   (an RTMP chunk stream, an FLV tag) are computed once per entry in a [`MemoSlot`] and shared.
//!   The slots are one list ([`MemoSlot`]) that also sizes the memo: each output format has its
//!   own, and none lies past the end.
//! - Group boundaries are decided once, where a frame enters, and marked on its entry
//!   ([`Entry::group_start`]); every consumer reads the mark (new and skipping consumers start at
//!   one, the cluster link opens a group stream at one) rather than deciding again. The rule: a
//!   group starts at a keyframe of the source's video ([`TrackId::is_source`]); in a broadcast
//!   without video, at the source's first audio frame [`GROUP_SPAN_AUDIO_ONLY_US`] or more
//!   after the last group's start. A rendition's frames (made on this node) never start one.
//! - A new consumer starts at the newest group, after the tracks' configs.
//! - The publisher never waits for a consumer. A consumer that falls behind by more than
//!   [`HubConfig::max_lag`], or whose position was evicted, skips ahead to the newest group; the
//!   skipped frames are counted.
//! - Memory per broadcast is bounded: the log keeps [`HubConfig::retain_groups`] groups and at most
//!   [`HubConfig::max_log_bytes`] of payload.
//! - A publisher that comes back under the same name within [`HubConfig::reconnect_grace`]
//!   continues the broadcast: its timeline is rebased to follow on, consumers resume at its first
//!   keyframe without reconnecting. After the grace, consumers read [`ReadOutcome::Ended`].
//! - A producer nobody comes back for (a fetch from upstream) ends its broadcast at once
//!   ([`BroadcastProducer::end`]), or only while no consumer is attached
//!   ([`BroadcastProducer::end_if_unwatched`], atomic with [`Hub::subscribe`]); an ended
//!   broadcast takes no new consumer, so a consumer never attaches to a broadcast that nothing
//!   feeds any more.
//!
//! A group here spans all tracks of a broadcast (one GOP of the video track and the audio
//! interleaved with it), so the publisher's interleaving is kept for muxed outputs.
//!
//! Time is passed in where the callers have it: [`Hub::publish`] takes the broadcast's start,
//! [`Broadcast::describe`] the time its uptime is measured at, [`Hub::reap`] the time the
//! reconnect grace is checked against. Where no caller can pass it, the hub asks its own
//! monotonic clock, given at construction ([`Hub::new`]: the real one; unit tests give a
//! virtual one, so the grace and the rebase are tested without sleeping):
//! - A [`BroadcastProducer`]'s drop stamps when its publisher left (a drop takes no argument),
//!   for the reconnect grace.
//! - The first frame after a publisher came back reads it once, to rebase the timeline by the
//!   real gap; every other push reads no monotonic clock.
//!
//! The wall clock is read once per logged entry whose producer gave no ingest time
//! ([`BroadcastProducer::push_at`] with `None`, [`wall_clock_us`]): the ingest stamp travels with
//! the frame to other nodes (the cluster link's latency since origin ingest), so it must be wall
//! time, not a node's monotonic clock, and no hub test depends on its value.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::frame::{Frame, Item, Metadata, TrackId, TrackInfo, TrackKind};

/// In a broadcast without video, a group starts at the source's first audio frame this long
/// (µs of media time) or more after the last group's start: late joiners and skips stay cheap.
pub(crate) const GROUP_SPAN_AUDIO_ONLY_US: i64 = 1_000_000;

/// Declares [`MemoSlot`] and sizes every entry's memo from the same list: a slot added here
/// gets its storage, so no output format can index past the end or share another's slot.
macro_rules! memo_slots {
    ($($(#[$doc:meta])* $slot:ident,)+) => {
        /// A slot for one derived serialization of entries: one per output format, each always
        /// storing the same type ([`Entry::memo`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum MemoSlot {
            $($(#[$doc])* $slot,)+
        }

        /// How many derived serializations an entry can memoize: one per [`MemoSlot`].
        const MEMO_SLOTS: usize = [$(MemoSlot::$slot),+].len();
    };
}

memo_slots! {
    /// An RTMP chunk stream's message of the entry (`rtmp::mux::RtmpMuxer`).
    Rtmp,
    /// An FLV tag of the entry (`rtmp::mux::FlvMuxer`, HTTP-FLV).
    Flv,
    /// A frame's RTP payloads (`webrtc::packetize::RtpFrame`, WHEP viewers).
    Rtp,
    /// The entry's encoding on a cluster group stream (`cluster::encoding::encoded`).
    Cluster,
}

/// Hub tuning.
#[derive(Clone, Debug)]
pub(crate) struct HubConfig {
    /// How long a broadcast waits for its publisher to come back.
    pub(crate) reconnect_grace: Duration,
    /// Groups kept per broadcast (the newest is the one being written).
    pub(crate) retain_groups: usize,
    /// Payload bytes kept per broadcast at most.
    pub(crate) max_log_bytes: usize,
    /// A consumer further behind the newest frame than this skips to the newest group.
    pub(crate) max_lag: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            reconnect_grace: Duration::from_secs(5),
            retain_groups: 2,
            max_log_bytes: 64 << 20,
            max_lag: Duration::from_secs(1),
        }
    }
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// Another publisher is live under this name.
    #[error("broadcast {0} already has a live publisher")]
    AlreadyLive(String),
    /// The name breaks the broadcast name rule ([`valid_name`]).
    #[error("{0:?} is not a valid broadcast name (printable ASCII; no empty, . or .. parts)")]
    BadName(String),
}

/// The broadcast name rule, for every protocol (a stream key, a URL path, a cluster PUBLISH):
/// printable ASCII without `\`, at most 256 bytes, no empty, `.` or `..` part between `/`s.
/// So a name goes into a URL path, a log line or a file name as it is.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        && name.chars().all(|c| c.is_ascii_graphic() && c != '\\')
}

/// One item of a broadcast's log.
#[derive(Debug)]
pub struct Entry {
    /// Position in the broadcast's log.
    pub(crate) seq: u64,
    /// Decode time of the item (for configs: of the frame before it), microseconds.
    pub(crate) dts: i64,
    /// The item.
    pub item: Item,
    /// When the item entered the cluster: wall clock, microseconds since the UNIX epoch (stamped
    /// by the first node's hub, carried unchanged over the cluster link).
    pub ingest_us: i64,
    /// Whether a group starts at this entry: a frame where a new consumer starts and a skipping
    /// one resumes, and where the cluster link opens a new group stream. Marked once, as the
    /// frame enters the hub, by the one rule of group boundaries (the module docs); never set on
    /// a config or on a rendition's frame.
    pub(crate) group_start: bool,
    memo: [OnceLock<Box<dyn Any + Send + Sync>>; MEMO_SLOTS],
}

impl Entry {
    fn new(seq: u64, dts: i64, item: Item, ingest_us: i64, group_start: bool) -> Self {
        Self {
            seq,
            dts,
            item,
            ingest_us,
            group_start,
            memo: Default::default(),
        }
    }

    /// An entry outside any log (a config sent to one player); its memo serves only itself.
    pub(crate) fn detached(dts: i64, item: Item) -> Self {
        Self::new(u64::MAX, dts, item, 0, false)
    }

    /// The serialization of this entry in `slot`, computed by `encode` on first use and shared
    /// with every later caller.
    ///
    /// # Panics
    /// When `slot` was first used with another type: each [`MemoSlot`] belongs to one output
    /// format, which always stores the same type.
    pub(crate) fn memo<T: Send + Sync + 'static>(
        &self,
        slot: MemoSlot,
        encode: impl FnOnce(&Item) -> T,
    ) -> &T {
        let v = self.memo[slot as usize].get_or_init(|| Box::new(encode(&self.item)));
        v.downcast_ref::<T>().expect("a memo slot holds one type")
    }

    fn payload_len(&self) -> usize {
        match &self.item {
            Item::Frame { frame, .. } => frame.payload.len(),
            Item::Config { .. } => 0,
        }
    }
}

/// Counters of one broadcast; readable without locks.
#[derive(Debug, Default)]
pub(crate) struct BroadcastStats {
    /// Payload bytes received from publishers.
    pub(crate) bytes_in: AtomicU64,
    /// Bytes written to players (drivers add to it).
    pub(crate) bytes_out: AtomicU64,
    /// Frames received from publishers.
    pub(crate) frames_in: AtomicU64,
    /// Frames players skipped because they fell behind.
    pub(crate) frames_skipped: AtomicU64,
    /// Players attached now: people's RTMP, HTTP-FLV and WebRTC sessions
    /// ([`ConsumerKind::Player`]).
    pub(crate) players: AtomicU64,
    /// Other nodes reading it over the cluster link now ([`ConsumerKind::Node`]).
    pub(crate) node_subscriptions: AtomicU64,
    /// Every consumer attached now, whatever its kind (players, nodes, this node's transcoders
    /// and its publication upstream): whether anything still reads the broadcast.
    pub(crate) consumers: AtomicU64,
}

/// Who reads a broadcast, for its counts ([`BroadcastStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsumerKind {
    /// A person's player (RTMP, HTTP-FLV, a WebRTC viewer): what [`Hub::subscribe`] gives.
    Player,
    /// Another node fetching the broadcast over the cluster link.
    Node,
    /// This node's own work: a transcoder, the publication upstream.
    Internal,
}

impl ConsumerKind {
    /// The counter of this kind, if it has one (every kind also counts in `consumers`).
    fn counter(self, stats: &BroadcastStats) -> Option<&AtomicU64> {
        match self {
            ConsumerKind::Player => Some(&stats.players),
            ConsumerKind::Node => Some(&stats.node_subscriptions),
            ConsumerKind::Internal => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Publisher {
    Live(u64),
    Gone(Instant),
    Ended,
}

/// Per-track figures measured at ingest.
#[derive(Debug, Default, Clone)]
struct TrackFigures {
    window_start: Option<i64>,
    window_frames: u32,
    window_bytes: u64,
    fps: f64,
    bitrate: f64,
    last_pts: Option<i64>,
    b_frames: bool,
    last_key_dts: Option<i64>,
    keyframe_interval: Option<f64>,
    /// Frames seen since the track began (saturating).
    seen: u64,
}

impl TrackFigures {
    fn observe(&mut self, f: &Frame, video: bool) {
        let start = *self.window_start.get_or_insert(f.dts);
        self.seen = self.seen.saturating_add(1);
        self.window_frames += 1;
        self.window_bytes += f.payload.len() as u64;
        let span = f.dts - start;
        if span >= 1_000_000 {
            let secs = span as f64 / 1e6;
            self.fps = f64::from(self.window_frames - 1) / secs;
            self.bitrate = (self.window_bytes - f.payload.len() as u64) as f64 * 8.0 / secs;
            self.window_start = Some(f.dts);
            self.window_frames = 1;
            self.window_bytes = f.payload.len() as u64;
        }
        if video {
            if let Some(last) = self.last_pts {
                // Presentation order differs from decode order only when frames are reordered.
                if f.pts < last {
                    self.b_frames = true;
                }
            }
            self.last_pts = Some(f.pts);
            if f.keyframe {
                if let Some(k) = self.last_key_dts {
                    self.keyframe_interval = Some((f.dts - k) as f64 / 1e6);
                }
                self.last_key_dts = Some(f.dts);
            }
        }
    }
}

struct State {
    tracks: Vec<Option<TrackInfo>>,
    figures: Vec<TrackFigures>,
    /// Rendition tracks withdrawn, oldest first, with the sequence number the log had reached
    /// then: a slot is reused once every entry logged before it was withdrawn has left the log.
    retired: VecDeque<(TrackId, u64)>,
    metadata: Metadata,
    log: VecDeque<Arc<Entry>>,
    next_seq: u64,
    group_starts: VecDeque<u64>,
    log_bytes: usize,
    publisher: Publisher,
    ts_offset: i64,
    last_dts: i64,
    /// Set on resume: the next frame rebases the timeline (the gap started at this instant).
    rebase_from: Option<Instant>,
    /// Set on resume: video waits for a keyframe.
    needs_keyframe: bool,
    /// The ingest time of the item being appended, when it came from another node.
    ingest_us: Option<i64>,
    /// The node whose transcoder publishes the broadcast's ABR ladder here over the cluster
    /// link, while it does ([`LadderWriter`]).
    ladder_from: Option<Arc<str>>,
    /// The rungs an earlier [`LadderWriter`] wrote: name, track id and last dts, so that the
    /// next writer (a transcoder taking over) continues each rung on its id.
    rung_history: Vec<(Arc<str>, TrackId, i64)>,
}

/// Wall clock, microseconds since the UNIX epoch.
pub fn wall_clock_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl State {
    fn first_seq(&self) -> u64 {
        self.log.front().map_or(self.next_seq, |e| e.seq)
    }

    fn has_video(&self) -> bool {
        self.tracks
            .iter()
            .flatten()
            .any(|t| t.codec.kind() == TrackKind::Video)
    }

    fn append(&mut self, item: Item, group_start: bool, retain_groups: usize, max_bytes: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if group_start {
            self.group_starts.push_back(seq);
        }
        let ingest = self.ingest_us.take().unwrap_or_else(wall_clock_us);
        let entry = Arc::new(Entry::new(seq, self.last_dts, item, ingest, group_start));
        self.log_bytes += entry.payload_len();
        self.log.push_back(entry);
        while self.group_starts.len() > retain_groups.max(1) {
            self.group_starts.pop_front();
            let keep_from = self.group_starts[0];
            while self.log.front().is_some_and(|e| e.seq < keep_from) {
                self.pop_front();
            }
        }
        while self.log_bytes > max_bytes && self.log.len() > 1 {
            self.pop_front();
        }
        let first = self.first_seq();
        while self.group_starts.front().is_some_and(|&g| g < first) {
            self.group_starts.pop_front();
        }
    }

    /// Sets track `track`'s description and logs it for consumers; false when unchanged.
    fn declare_track(&mut self, track: TrackId, info: TrackInfo, cfg: &HubConfig) -> bool {
        let i = usize::from(track.0);
        if self.tracks.len() <= i {
            self.tracks.resize(i + 1, None);
            self.figures.resize(i + 1, TrackFigures::default());
        }
        if self.tracks[i].as_ref() == Some(&info) {
            return false;
        }
        self.tracks[i] = Some(info.clone());
        self.append(
            Item::Config { track, info },
            false,
            cfg.retain_groups,
            cfg.max_log_bytes,
        );
        true
    }

    /// Whether a frame of `track` (a video track when `video`) starts a group: the one rule of
    /// group boundaries, marked on the frame's entry ([`Entry::group_start`]) for every consumer.
    fn starts_group(&self, track: TrackId, frame: &Frame, video: bool) -> bool {
        if !track.is_source() {
            // Groups follow the source only: a rendition's keyframe a few frames after the
            // source's would start a group in the middle of the source's GOP, where players of
            // the source track would start on frames they cannot decode.
            false
        } else if video {
            frame.keyframe
        } else if !self.has_video() {
            // Audio-only: a group per second keeps late joiners and skips cheap.
            let last_start = self
                .group_starts
                .back()
                .and_then(|&g| self.log.get((g - self.first_seq()) as usize).map(|e| e.dts));
            last_start.is_none_or(|d| frame.dts - d >= GROUP_SPAN_AUDIO_ONLY_US)
        } else {
            false
        }
    }

    /// Appends a frame (already on the broadcast's timeline), marking it when a group starts.
    fn push_frame(&mut self, track: TrackId, frame: Frame, video: bool, cfg: &HubConfig) {
        self.last_dts = self.last_dts.max(frame.dts);
        let group_start = self.starts_group(track, &frame, video);
        if let Some(f) = self.figures.get_mut(usize::from(track.0)) {
            f.observe(&frame, video);
        }
        self.append(
            Item::Frame { track, frame },
            group_start,
            cfg.retain_groups,
            cfg.max_log_bytes,
        );
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.log.pop_front() {
            self.log_bytes -= e.payload_len();
        }
    }

    /// The track id for a new rendition, never one of the source's ([`TrackId::is_source`]): a
    /// ladder rung's among the ids that travel ([`TrackId::is_ladder`]), a node's own rendition's
    /// above them. The oldest withdrawn slot of that kind none of whose frames is left in the
    /// log (a consumer then never mistakes the old rendition's frames for the new one's), else a
    /// free id. Only when every id of the kind is taken and the oldest withdrawn one still has
    /// frames in the log is that one reused anyway; `None` when a ladder has every rung id
    /// running.
    fn rendition_slot(&mut self, ladder: bool) -> Option<TrackId> {
        let kind = |t: TrackId| t.is_ladder() == ladder;
        let first = self.first_seq();
        if let Some(pos) = self
            .retired
            .iter()
            .position(|&(t, seq)| kind(t) && seq <= first)
        {
            let (track, _) = self.retired.remove(pos)?;
            if let Some(f) = self.figures.get_mut(usize::from(track.0)) {
                *f = TrackFigures::default();
            }
            return Some(track);
        }
        let free = |t: &TrackId| {
            self.tracks
                .get(usize::from(t.0))
                .is_none_or(Option::is_none)
                && !self.retired.iter().any(|(r, _)| r == t)
        };
        let new = if ladder {
            (TrackId::SOURCE_TRACKS..TrackId::SHARED_TRACKS)
                .map(TrackId)
                .find(free)
        } else {
            u8::try_from(self.tracks.len().max(usize::from(TrackId::SHARED_TRACKS)))
                .ok()
                .map(TrackId)
        };
        if new.is_some() {
            return new;
        }
        // Every id of the kind is in use or withdrawn: the oldest withdrawn one.
        let pos = self.retired.iter().position(|&(t, _)| kind(t))?;
        self.retired.remove(pos).map(|(t, _)| t)
    }
}

/// A live (or lingering) broadcast.
pub struct Broadcast {
    name: String,
    created: Instant,
    state: Mutex<State>,
    notify: watch::Sender<()>,
    /// Counters, readable without locks.
    pub(crate) stats: BroadcastStats,
}

impl Broadcast {
    fn new(name: &str, publisher_id: u64, now: Instant) -> Self {
        Self {
            name: name.to_owned(),
            created: now,
            state: Mutex::new(State {
                tracks: Vec::new(),
                figures: Vec::new(),
                retired: VecDeque::new(),
                metadata: Vec::new(),
                log: VecDeque::new(),
                next_seq: 0,
                group_starts: VecDeque::new(),
                log_bytes: 0,
                publisher: Publisher::Live(publisher_id),
                ts_offset: 0,
                last_dts: 0,
                rebase_from: None,
                needs_keyframe: false,
                ingest_us: None,
                ladder_from: None,
                rung_history: Vec::new(),
            }),
            notify: watch::channel(()).0,
            stats: BroadcastStats::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; recover the data
        // rather than poisoning every other session of the broadcast.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that wakes when the broadcast changes (an item appended, ended): one for a
    /// driver serving many consumers of it.
    pub(crate) fn watch(&self) -> watch::Receiver<()> {
        self.notify.subscribe()
    }

    /// Whether a publisher is live (not gone within the grace, not ended).
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.lock().publisher, Publisher::Live(_))
    }

    /// The broadcast's name (`app/key`).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A description for APIs: tracks with measured figures, players, uptime (at `now`).
    pub(crate) fn describe(&self, now: Instant) -> BroadcastInfo {
        let st = self.lock();
        let tracks = st
            .tracks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, t)))
            .map(|(i, t)| {
                let f = st.figures.get(i).cloned().unwrap_or_default();
                TrackSummary {
                    id: i as u8,
                    kind: match t.codec.kind() {
                        TrackKind::Video => "video",
                        TrackKind::Audio => "audio",
                    },
                    codec: t.codec.name(),
                    width: t.video.as_ref().map(|v| v.width),
                    height: t.video.as_ref().map(|v| v.height),
                    profile: t.video.as_ref().map(|v| v.profile.clone()),
                    sample_rate: t.audio.as_ref().map(|a| a.sample_rate),
                    channels: t.audio.as_ref().map(|a| a.channels),
                    fps: round2(f.fps),
                    bitrate_kbps: round2(f.bitrate / 1000.0),
                    b_frames: (t.codec.kind() == TrackKind::Video).then_some(f.b_frames),
                    keyframe_interval_s: f.keyframe_interval.map(round2),
                    rendition: t.rendition.as_deref().map(str::to_owned),
                }
            })
            .collect::<Vec<_>>();
        let renditions = tracks.iter().filter_map(|t| t.rendition.clone()).collect();
        BroadcastInfo {
            name: self.name.clone(),
            publishing: matches!(st.publisher, Publisher::Live(_)),
            tracks,
            renditions,
            players: self.stats.players.load(Relaxed),
            node_subscriptions: self.stats.node_subscriptions.load(Relaxed),
            uptime_s: round2(now.saturating_duration_since(self.created).as_secs_f64()),
            bytes_in: self.stats.bytes_in.load(Relaxed),
            bytes_out: self.stats.bytes_out.load(Relaxed),
            frames_skipped: self.stats.frames_skipped.load(Relaxed),
            ladder_from: st.ladder_from.as_deref().map(str::to_owned),
        }
    }

    /// The tracks as they are now.
    pub(crate) fn tracks(&self) -> Vec<(TrackId, TrackInfo)> {
        let st = self.lock();
        st.tracks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.clone().map(|t| (TrackId(i as u8), t)))
            .collect()
    }

    /// Whether a video track's frames are reordered (B-frames), as seen at ingest.
    pub(crate) fn has_b_frames(&self, track: TrackId) -> bool {
        self.lock()
            .figures
            .get(usize::from(track.0))
            .is_some_and(|f| f.b_frames)
    }

    /// A video track's frame rate as measured at ingest (`None` before a second's worth).
    pub(crate) fn fps(&self, track: TrackId) -> Option<f64> {
        self.lock()
            .figures
            .get(usize::from(track.0))
            .map(|f| f.fps)
            .filter(|&fps| fps > 0.0)
    }

    /// Frames of `track` seen since it began: whether it has B-frames ([`Self::has_b_frames`])
    /// is known only after its first few.
    pub(crate) fn frames_seen(&self, track: TrackId) -> u64 {
        self.lock()
            .figures
            .get(usize::from(track.0))
            .map_or(0, |f| f.seen)
    }

    /// The rungs of the broadcast's ABR ladder: their tracks and descriptions, lowest id first.
    pub fn renditions(&self) -> Vec<(TrackId, TrackInfo)> {
        let mut r = self.tracks();
        r.retain(|(id, t)| id.is_ladder() && t.rendition.is_some());
        r
    }

    /// The node whose transcoder publishes the ladder here over the cluster link, while one
    /// does (on the origin of a cluster with transcoder nodes).
    pub(crate) fn ladder_from(&self) -> Option<Arc<str>> {
        self.lock().ladder_from.clone()
    }

    /// Whether the ladder has a rung named `name`.
    pub fn has_rendition(&self, name: &str) -> bool {
        self.lock()
            .tracks
            .iter()
            .flatten()
            .any(|t| t.rendition.as_deref() == Some(name))
    }

    /// One track's description.
    pub(crate) fn track(&self, track: TrackId) -> Option<TrackInfo> {
        self.lock()
            .tracks
            .get(usize::from(track.0))
            .cloned()
            .flatten()
    }

    /// Ingest bitrate over the last measured second, all tracks, bits per second.
    pub(crate) fn ingest_bitrate(&self) -> f64 {
        self.lock().figures.iter().map(|f| f.bitrate).sum()
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// JSON view of a broadcast.
#[derive(Debug, Serialize)]
pub(crate) struct BroadcastInfo {
    /// `app/key`.
    pub(crate) name: String,
    /// Whether a publisher is connected now.
    pub(crate) publishing: bool,
    /// Tracks with measured figures.
    pub(crate) tracks: Vec<TrackSummary>,
    /// The names of its ABR ladder's rungs (`?rendition=NAME`), tallest first as the ladder
    /// lists them; each is one of `tracks` (its size, frame rate and bitrate there).
    pub renditions: Vec<String>,
    /// Players attached now (people: RTMP, HTTP-FLV, WebRTC viewers).
    pub(crate) players: u64,
    /// Other nodes reading it over the cluster link now (not players).
    pub(crate) node_subscriptions: u64,
    /// Seconds since the broadcast started.
    pub(crate) uptime_s: f64,
    /// Payload bytes in.
    pub(crate) bytes_in: u64,
    /// Bytes out to players.
    pub(crate) bytes_out: u64,
    /// Frames skipped by slow players.
    pub(crate) frames_skipped: u64,
    /// The transcoder node whose ladder `renditions` are, when another node makes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ladder_from: Option<String>,
}

/// JSON view of a track.
#[derive(Debug, Serialize)]
pub(crate) struct TrackSummary {
    /// Track id.
    pub(crate) id: u8,
    /// "video" or "audio".
    pub(crate) kind: &'static str,
    /// Codec name.
    pub(crate) codec: &'static str,
    /// Width, video only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) width: Option<u32>,
    /// Height, video only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) height: Option<u32>,
    /// Profile, video only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) profile: Option<String>,
    /// Sample rate, audio only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) sample_rate: Option<u32>,
    /// Channels, audio only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) channels: Option<u8>,
    /// Frames per second over the last second of media time.
    pub(crate) fps: f64,
    /// Kilobits per second over the last second of media time.
    pub(crate) bitrate_kbps: f64,
    /// Whether frames are reordered (B-frames), video only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) b_frames: Option<bool>,
    /// Seconds between the last two keyframes, video only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) keyframe_interval_s: Option<f64>,
    /// The ABR ladder rung this track is (`?rendition=` names it), if it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rendition: Option<String>,
}

/// Hub-wide counters.
#[derive(Debug, Default)]
pub(crate) struct HubStats {
    /// Payload bytes received from publishers, all broadcasts ever.
    pub(crate) bytes_in: AtomicU64,
    /// Bytes written to players, all broadcasts ever.
    pub(crate) bytes_out: AtomicU64,
    /// Frames skipped by slow players, all broadcasts ever.
    pub(crate) frames_skipped: AtomicU64,
}

/// The monotonic clock a [`Hub`] reads where no caller can pass the time in (see the module
/// doc): the real one ([`Hub::new`]), or a virtual one in unit tests ([`Hub::with_clock`]).
pub(crate) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

struct HubInner {
    cfg: HubConfig,
    clock: Clock,
    broadcasts: Mutex<HashMap<String, Arc<Broadcast>>>,
    next_id: AtomicU64,
    stats: HubStats,
}

/// The broadcasts of this node. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(HubConfig::default())
    }
}

impl Hub {
    /// An empty hub on the real clock.
    pub(crate) fn new(cfg: HubConfig) -> Self {
        Self::with_clock(cfg, Arc::new(Instant::now))
    }

    /// An empty hub reading `clock` where no caller passes the time in: a producer's drop, the
    /// first frame after its publisher came back.
    pub(crate) fn with_clock(cfg: HubConfig, clock: Clock) -> Self {
        Self {
            inner: Arc::new(HubInner {
                cfg,
                clock,
                broadcasts: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                stats: HubStats::default(),
            }),
        }
    }

    /// The hub's monotonic clock, now.
    fn now(&self) -> Instant {
        (self.inner.clock)()
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Broadcast>>> {
        self.inner
            .broadcasts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Hub-wide counters.
    pub(crate) fn stats(&self) -> &HubStats {
        &self.inner.stats
    }

    /// Start publishing `name` (at `now`, the broadcast's start for its uptime), or continue it
    /// when its publisher left within the grace. A name that breaks [`valid_name`] is refused,
    /// whatever protocol brought it.
    pub fn publish(&self, name: &str, now: Instant) -> Result<BroadcastProducer, PublishError> {
        if !valid_name(name) {
            return Err(PublishError::BadName(name.to_owned()));
        }
        let id = self.inner.next_id.fetch_add(1, Relaxed);
        let mut map = self.map();
        if let Some(bc) = map.get(name) {
            let mut st = bc.lock();
            match st.publisher {
                Publisher::Live(_) => return Err(PublishError::AlreadyLive(name.to_owned())),
                Publisher::Gone(since) => {
                    st.publisher = Publisher::Live(id);
                    st.rebase_from = Some(since);
                    st.needs_keyframe = st.has_video();
                    drop(st);
                    return Ok(BroadcastProducer {
                        hub: self.clone(),
                        bc: bc.clone(),
                        id,
                    });
                }
                Publisher::Ended => {}
            }
        }
        let bc = Arc::new(Broadcast::new(name, id, now));
        map.insert(name.to_owned(), bc.clone());
        Ok(BroadcastProducer {
            hub: self.clone(),
            bc,
            id,
        })
    }

    /// A player's consumer of `name`, or `None` when nothing is published under it.
    pub fn subscribe(&self, name: &str) -> Option<BroadcastConsumer> {
        self.subscribe_as(name, ConsumerKind::Player)
    }

    /// A consumer of `name` counted as `kind`, or `None` when nothing is published under it.
    ///
    /// The consumer is counted in the broadcast's `consumers` under the broadcast's lock, where
    /// [`BroadcastProducer::end_if_unwatched`] looks: a broadcast is never ended as unwatched
    /// with a consumer attached, and a consumer never attaches to one so ended.
    pub(crate) fn subscribe_as(&self, name: &str, kind: ConsumerKind) -> Option<BroadcastConsumer> {
        let bc = self.map().get(name)?.clone();
        let st = bc.lock();
        if st.publisher == Publisher::Ended {
            return None;
        }
        let consumer = BroadcastConsumer::new(self.clone(), bc.clone(), kind);
        drop(st);
        Some(consumer)
    }

    /// All broadcasts, sorted by name.
    pub(crate) fn broadcasts(&self) -> Vec<Arc<Broadcast>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Ends broadcasts whose publisher has been gone longer than the grace. Call about once a
    /// second.
    pub(crate) fn reap(&self, now: Instant) {
        let grace = self.inner.cfg.reconnect_grace;
        let mut ended = Vec::new();
        self.map().retain(|_, bc| {
            let mut st = bc.lock();
            match st.publisher {
                Publisher::Gone(since) if now.saturating_duration_since(since) >= grace => {
                    st.publisher = Publisher::Ended;
                    ended.push(bc.clone());
                    false
                }
                _ => true,
            }
        });
        for bc in ended {
            tracing::info!(broadcast = %bc.name, "publisher did not come back within the grace; broadcast ended");
            bc.notify.send_replace(());
        }
    }
}

/// The publishing side of a broadcast. Dropping it starts the reconnect grace.
pub struct BroadcastProducer {
    hub: Hub,
    bc: Arc<Broadcast>,
    id: u64,
}

impl BroadcastProducer {
    /// The broadcast being published.
    pub(crate) fn broadcast(&self) -> &Arc<Broadcast> {
        &self.bc
    }

    /// Declares or updates a track. Consumers get the new config before the track's next frame.
    pub fn set_track(&mut self, track: TrackId, info: TrackInfo) {
        let changed = self
            .bc
            .lock()
            .declare_track(track, info, &self.hub.inner.cfg);
        if changed {
            self.bc.notify.send_replace(());
        }
    }

    /// Replaces the broadcast's metadata.
    pub(crate) fn set_metadata(&mut self, metadata: Metadata) {
        self.bc.lock().metadata = metadata;
    }

    /// Appends a frame of `track` (declare the track first). Never waits for consumers.
    pub fn push(&mut self, track: TrackId, frame: Frame) {
        self.push_at(track, frame, None);
    }

    /// [`BroadcastProducer::push`] of a frame that entered the cluster elsewhere, at `ingest_us`
    /// (wall clock, µs since the UNIX epoch); `None` stamps now.
    pub(crate) fn push_at(&mut self, track: TrackId, mut frame: Frame, ingest_us: Option<i64>) {
        let cfg = &self.hub.inner.cfg;
        let len = frame.payload.len() as u64;
        let mut st = self.bc.lock();
        if st.publisher != Publisher::Live(self.id) {
            return;
        }
        let Some(kind) = st
            .tracks
            .get(usize::from(track.0))
            .and_then(|t| t.as_ref())
            .map(|t| t.codec.kind())
        else {
            return;
        };
        let video = kind == TrackKind::Video;
        if st.needs_keyframe {
            if video && !frame.keyframe {
                return;
            }
            st.needs_keyframe = !video;
        }
        if let Some(since) = st.rebase_from.take() {
            // Continue the timeline where the old publisher left it, plus the real gap (at
            // least a millisecond, the unit of RTMP timestamps).
            let gap = self.hub.now().saturating_duration_since(since).as_micros() as i64;
            st.ts_offset = st.last_dts + gap.max(1000) - frame.dts;
        }
        frame.dts += st.ts_offset;
        frame.pts += st.ts_offset;
        st.ingest_us = ingest_us;
        st.push_frame(track, frame, video, cfg);
        drop(st);
        self.bc.stats.bytes_in.fetch_add(len, Relaxed);
        self.bc.stats.frames_in.fetch_add(1, Relaxed);
        self.hub.inner.stats.bytes_in.fetch_add(len, Relaxed);
        self.bc.notify.send_replace(());
    }
}

impl BroadcastProducer {
    /// Ends the broadcast now, without the reconnect grace: for a producer nobody comes back
    /// for (a broadcast fetched from upstream whose fetch ended). Its consumers read what is
    /// logged, then [`ReadOutcome::Ended`]; [`Hub::subscribe`] finds nothing under the name
    /// from now on, and [`Hub::publish`] starts a new broadcast under it.
    pub(crate) fn end(self) {
        // Only an unwatched end can be refused.
        let _ = self.end_when(false);
    }

    /// [`BroadcastProducer::end`] when no consumer is attached; else the producer back, still
    /// live. Decided under the broadcast's lock, where [`Hub::subscribe`] counts a consumer in:
    /// a consumer that attached first keeps the broadcast (and its producer), one that comes
    /// after finds nothing under the name.
    pub(crate) fn end_if_unwatched(self) -> Result<(), Self> {
        self.end_when(true)
    }

    fn end_when(self, unwatched_only: bool) -> Result<(), Self> {
        let mut map = self.hub.map();
        let mut st = self.bc.lock();
        if unwatched_only && self.bc.stats.consumers.load(Relaxed) > 0 {
            drop(st);
            drop(map);
            return Err(self);
        }
        if st.publisher == Publisher::Live(self.id) {
            st.publisher = Publisher::Ended;
        }
        drop(st);
        if map
            .get(&self.bc.name)
            .is_some_and(|b| Arc::ptr_eq(b, &self.bc))
        {
            map.remove(&self.bc.name);
        }
        drop(map);
        // Dropping `self` wakes the consumers.
        Ok(())
    }
}

impl Drop for BroadcastProducer {
    fn drop(&mut self) {
        let mut st = self.bc.lock();
        if st.publisher == Publisher::Live(self.id) {
            st.publisher = Publisher::Gone(self.hub.now());
        }
        drop(st);
        self.bc.notify.send_replace(());
    }
}

/// Writes a track derived from the broadcast itself (transcoded audio, a rendition) into the
/// broadcast's log. Dropping it withdraws the track from new consumers.
pub(crate) struct RenditionProducer {
    hub: Hub,
    bc: Arc<Broadcast>,
    track: TrackId,
    video: bool,
}

impl Broadcast {
    /// Declares a rendition track (the first free track id) and returns its writer.
    pub(crate) fn add_rendition(self: &Arc<Self>, hub: &Hub, info: TrackInfo) -> RenditionProducer {
        self.declare_rendition(hub, info, false)
            .unwrap_or_else(|| unreachable!("a node's own rendition always gets an id"))
    }

    /// Declares a rung of the broadcast's ABR ladder (`info.rendition` names it), on a track id
    /// that travels with the broadcast ([`TrackId::is_ladder`]), and returns its writer; `None`
    /// when every ladder id is taken.
    pub(crate) fn add_ladder_rendition(
        self: &Arc<Self>,
        hub: &Hub,
        info: TrackInfo,
    ) -> Option<RenditionProducer> {
        self.declare_rendition(hub, info, true)
    }

    /// Declares a rendition track of the kind `ladder` says ([`State::rendition_slot`]).
    fn declare_rendition(
        self: &Arc<Self>,
        hub: &Hub,
        info: TrackInfo,
        ladder: bool,
    ) -> Option<RenditionProducer> {
        let mut st = self.lock();
        let track = match st.rendition_slot(ladder) {
            Some(t) => t,
            // All 246 ids of a node's own renditions taken and none withdrawn: the last one.
            None if !ladder => TrackId(u8::MAX),
            None => return None,
        };
        let video = info.codec.kind() == TrackKind::Video;
        st.declare_track(track, info, &hub.inner.cfg);
        drop(st);
        self.notify.send_replace(());
        Some(RenditionProducer {
            hub: hub.clone(),
            bc: self.clone(),
            track,
            video,
        })
    }
}

impl RenditionProducer {
    /// The rendition's track id.
    pub(crate) fn track(&self) -> TrackId {
        self.track
    }

    /// The rendition's description changed (a new codec config).
    pub fn set_info(&mut self, info: TrackInfo) {
        let changed = self
            .bc
            .lock()
            .declare_track(self.track, info, &self.hub.inner.cfg);
        if changed {
            self.bc.notify.send_replace(());
        }
    }

    /// Appends a frame whose times are on the broadcast's timeline.
    pub(crate) fn push(&mut self, frame: Frame) {
        self.push_at(frame, None);
    }

    /// [`RenditionProducer::push`] of a frame made on another node, stamped with its ingest time
    /// there (`None`: now).
    fn push_at(&mut self, frame: Frame, ingest_us: Option<i64>) {
        let mut st = self.bc.lock();
        st.ingest_us = ingest_us;
        st.push_frame(self.track, frame, self.video, &self.hub.inner.cfg);
        drop(st);
        self.bc.notify.send_replace(());
    }
}

/// Why a [`LadderWriter`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LadderError {
    /// No live broadcast of that name.
    #[error("broadcast {0} is not live here")]
    NotLive(String),
    /// Another node's ladder is attached, or this node makes the ladder itself.
    #[error("broadcast {0} has a ladder already (from {1})")]
    Taken(String, Arc<str>),
}

/// Writes the ABR ladder another node (a transcoder) makes of a live broadcast into it: each
/// rung the writer is told of becomes a ladder track of the broadcast ([`TrackId::is_ladder`]).
///
/// Guarantees: one writer per broadcast at a time ([`Hub::ladder_writer`]); its rungs are
/// withdrawn when it drops. A rung that an earlier writer wrote (a transcoder that died, and the
/// one that took its job over) continues on the same track id, from a keyframe later than the
/// last frame written there: players of the rung, here and on every node fetching from here,
/// see a gap and then a picture they can decode, never a frame from the past.
pub(crate) struct LadderWriter {
    hub: Hub,
    bc: Arc<Broadcast>,
    /// Per track id of the writer's peer: the rung's producer, the dts its next frame must pass
    /// (set when continuing an earlier writer's rung, until a keyframe past it), its name and
    /// the last dts written.
    rungs: Vec<Option<Rung>>,
}

struct Rung {
    producer: RenditionProducer,
    name: Arc<str>,
    resume_after: Option<i64>,
    last_dts: i64,
}

impl Hub {
    /// A writer of live broadcast `name`'s ladder, made on node `from`.
    pub(crate) fn ladder_writer(
        &self,
        name: &str,
        from: &str,
    ) -> Result<LadderWriter, LadderError> {
        let bc = self
            .map()
            .get(name)
            .cloned()
            .ok_or_else(|| LadderError::NotLive(name.to_owned()))?;
        let mut st = bc.lock();
        if !matches!(st.publisher, Publisher::Live(_)) {
            return Err(LadderError::NotLive(name.to_owned()));
        }
        if let Some(other) = &st.ladder_from {
            return Err(LadderError::Taken(name.to_owned(), other.clone()));
        }
        if st.tracks.iter().flatten().any(|t| t.rendition.is_some()) {
            return Err(LadderError::Taken(name.to_owned(), "this node".into()));
        }
        st.ladder_from = Some(from.into());
        drop(st);
        Ok(LadderWriter {
            hub: self.clone(),
            bc,
            rungs: Vec::new(),
        })
    }
}

impl LadderWriter {
    /// The writer's track `track` is (now) described by `info`; ignored unless it names a rung
    /// (`info.rendition`), or when every ladder id is taken.
    pub(crate) fn set_track(&mut self, track: TrackId, info: TrackInfo) {
        let Some(name) = info.rendition.as_deref().map(Arc::<str>::from) else {
            return;
        };
        let i = usize::from(track.0);
        if self.rungs.len() <= i {
            self.rungs.resize_with(i + 1, || None);
        }
        if let Some(r) = &mut self.rungs[i]
            && r.name == name
        {
            r.producer.set_info(info);
            return;
        }
        self.rungs[i] = None;
        let mut st = self.bc.lock();
        // The id this rung had under an earlier writer, when nothing took it since.
        let earlier = st
            .rung_history
            .iter()
            .position(|(n, id, _)| {
                *n == name && st.tracks.get(usize::from(id.0)).is_none_or(Option::is_none)
            })
            .map(|pos| st.rung_history.remove(pos));
        let (id, resume_after) = match earlier {
            Some((_, id, last)) => {
                st.retired.retain(|(t, _)| *t != id);
                (Some(id), Some(last))
            }
            None => (st.rendition_slot(true), None),
        };
        let Some(id) = id else { return };
        let video = info.codec.kind() == TrackKind::Video;
        st.declare_track(id, info, &self.hub.inner.cfg);
        drop(st);
        self.bc.notify.send_replace(());
        self.rungs[i] = Some(Rung {
            producer: RenditionProducer {
                hub: self.hub.clone(),
                bc: self.bc.clone(),
                track: id,
                video,
            },
            name,
            resume_after,
            last_dts: i64::MIN,
        });
    }

    /// A frame of the writer's track `track`, made at `ingest_us` (wall clock) where the source
    /// entered the cluster; dropped when the track names no rung, or while a continued rung
    /// waits for its keyframe.
    pub(crate) fn push(&mut self, track: TrackId, frame: Frame, ingest_us: Option<i64>) {
        let Some(Some(r)) = self.rungs.get_mut(usize::from(track.0)) else {
            return;
        };
        if let Some(after) = r.resume_after {
            if !frame.keyframe || frame.dts <= after {
                return;
            }
            r.resume_after = None;
        }
        r.last_dts = frame.dts;
        r.producer.push_at(frame, ingest_us);
    }
}

impl Drop for LadderWriter {
    fn drop(&mut self) {
        let rungs = std::mem::take(&mut self.rungs);
        let mut history = Vec::new();
        for r in rungs.into_iter().flatten() {
            let last = match r.resume_after {
                // Nothing written since it was continued: the earlier writer's last frame.
                Some(after) => after.max(r.last_dts),
                None => r.last_dts,
            };
            history.push((r.name, r.producer.track, last));
            drop(r.producer);
        }
        let mut st = self.bc.lock();
        st.ladder_from = None;
        for h in history {
            st.rung_history.retain(|(n, _, _)| *n != h.0);
            st.rung_history.push(h);
        }
        drop(st);
        self.bc.notify.send_replace(());
    }
}

impl Drop for RenditionProducer {
    fn drop(&mut self) {
        let mut st = self.bc.lock();
        if let Some(t) = st.tracks.get_mut(usize::from(self.track.0)) {
            *t = None;
        }
        let seq = st.next_seq;
        st.retired.push_back((self.track, seq));
    }
}

/// What [`BroadcastConsumer::read`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// `n` entries were appended (possibly 0: wait with [`BroadcastConsumer::changed`]).
    Read(usize),
    /// The consumer was behind; `skipped` frames were passed over and reading resumed at the
    /// newest group, of which `n` entries were appended.
    Skipped {
        /// Frames passed over.
        skipped: u64,
        /// Entries appended.
        n: usize,
    },
    /// The broadcast ended and everything was read.
    Ended,
}

/// A reader of a broadcast. Each consumer keeps its own position; cloning a payload is a
/// reference count.
pub struct BroadcastConsumer {
    hub: Hub,
    bc: Arc<Broadcast>,
    /// Next entry to read.
    cursor: u64,
    /// Waiting for a group to start at or after the cursor (first read, after eviction, when
    /// too far behind).
    resync: bool,
    /// Nothing read yet: start at the newest group, whatever the cursor.
    fresh: bool,
    /// The last read stopped at its `max`: more entries are waiting.
    more: bool,
    rx: watch::Receiver<()>,
    /// Who reads, for the broadcast's counts.
    kind: ConsumerKind,
}

impl BroadcastConsumer {
    fn new(hub: Hub, bc: Arc<Broadcast>, kind: ConsumerKind) -> Self {
        bc.stats.consumers.fetch_add(1, Relaxed);
        if let Some(c) = kind.counter(&bc.stats) {
            c.fetch_add(1, Relaxed);
        }
        let rx = bc.notify.subscribe();
        Self {
            hub,
            kind,
            bc,
            cursor: 0,
            resync: true,
            fresh: true,
            more: false,
            rx,
        }
    }

    /// Counts this consumer as `kind` from now on (a consumer obtained for a player that turns
    /// out to serve another node).
    pub(crate) fn set_kind(&mut self, kind: ConsumerKind) {
        if kind == self.kind {
            return;
        }
        if let Some(c) = self.kind.counter(&self.bc.stats) {
            c.fetch_sub(1, Relaxed);
        }
        if let Some(c) = kind.counter(&self.bc.stats) {
            c.fetch_add(1, Relaxed);
        }
        self.kind = kind;
    }

    /// The broadcast being read.
    pub(crate) fn broadcast(&self) -> &Arc<Broadcast> {
        &self.bc
    }

    /// The tracks and metadata as they are now: what a player needs before the first frame.
    pub(crate) fn snapshot(&self) -> (Vec<(TrackId, TrackInfo)>, Metadata) {
        let st = self.bc.lock();
        let tracks = st
            .tracks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.clone().map(|t| (TrackId(i as u8), t)))
            .collect();
        (tracks, st.metadata.clone())
    }

    /// Appends up to `max` entries to `out`. A first read starts at the newest group.
    pub fn read(&mut self, out: &mut Vec<Arc<Entry>>, max: usize) -> ReadOutcome {
        self.rx.borrow_and_update();
        let st = self.bc.lock();
        let first = st.first_seq();
        let frames_between = |from: u64, to: u64| -> u64 {
            let (a, b) = (from.max(first) - first, to.max(first) - first);
            let known = st.log.range(a as usize..b as usize);
            known
                .filter(|e| matches!(e.item, Item::Frame { .. }))
                .count() as u64
                + first.saturating_sub(from).min(to.saturating_sub(from))
        };
        let mut skipped = 0;
        if self.cursor < first && !self.fresh {
            // Evicted under this consumer: resynchronise on a group.
            self.resync = true;
        }
        let newest_group = st.group_starts.back().copied();
        if !self.resync
            && newest_group.is_some_and(|g| g > self.cursor)
            && st.log.get((self.cursor - first) as usize).is_some_and(|e| {
                st.last_dts - e.dts > self.hub.inner.cfg.max_lag.as_micros() as i64
            })
        {
            // Too far behind: jump to the newest group.
            self.resync = true;
        }
        if self.resync {
            let target = newest_group.filter(|&g| self.fresh || g >= self.cursor);
            let to = target.unwrap_or(st.next_seq);
            if !self.fresh {
                skipped = frames_between(self.cursor, to);
            }
            self.cursor = to;
            if target.is_some() {
                self.resync = false;
                self.fresh = false;
            }
        }
        let mut n = 0;
        if !self.resync {
            let start = (self.cursor - first) as usize;
            n = st.log.len().saturating_sub(start).min(max);
            out.extend(st.log.range(start..start + n).cloned());
            self.cursor += n as u64;
        }
        self.more = n == max;
        let ended = n == 0 && st.publisher == Publisher::Ended;
        drop(st);
        if skipped > 0 {
            self.bc.stats.frames_skipped.fetch_add(skipped, Relaxed);
            self.hub
                .inner
                .stats
                .frames_skipped
                .fetch_add(skipped, Relaxed);
        }
        if ended {
            ReadOutcome::Ended
        } else if skipped > 0 {
            ReadOutcome::Skipped { skipped, n }
        } else {
            ReadOutcome::Read(n)
        }
    }

    /// Whether a [`BroadcastConsumer::read`] now may return something: the broadcast changed
    /// since the last read, or that read was cut at its `max`, or nothing was read yet. Costs
    /// an atomic load and takes no lock, for callers that poll many consumers.
    pub(crate) fn has_news(&self) -> bool {
        self.fresh || self.resync || self.more || self.rx.has_changed().unwrap_or(true)
    }

    /// Waits until the broadcast has changed since the last read.
    pub async fn changed(&mut self) {
        // The sender lives in the broadcast, which this consumer keeps alive: it never closes.
        let _ = self.rx.changed().await;
    }
}

impl Drop for BroadcastConsumer {
    fn drop(&mut self) {
        self.bc.stats.consumers.fetch_sub(1, Relaxed);
        if let Some(c) = self.kind.counter(&self.bc.stats) {
            c.fetch_sub(1, Relaxed);
        }
    }
}

/// Tracks and frames for unit tests of the hub and of what reads it.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Frame, TrackInfo};
    use crate::media::Codec;
    use bytes::Bytes;

    /// A track of `codec` with a 3-byte config.
    pub(crate) fn track(codec: Codec) -> TrackInfo {
        TrackInfo {
            codec,
            config: Some(Bytes::from_static(b"cfg")),
            video: None,
            audio: None,
            rendition: None,
        }
    }

    /// A 10-byte frame at `ms` (pts = dts).
    pub(crate) fn frame(ms: i64, key: bool) -> Frame {
        Frame {
            pts: ms * 1000,
            dts: ms * 1000,
            keyframe: key,
            payload: Bytes::from(vec![0u8; 10]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::frame;
    use super::*;
    use crate::media::Codec;
    use bytes::Bytes;

    fn video() -> TrackInfo {
        super::testing::track(Codec::H264)
    }

    fn frames(out: &[Arc<Entry>]) -> Vec<i64> {
        out.iter()
            .filter_map(|e| match &e.item {
                Item::Frame { frame, .. } => Some(frame.dts / 1000),
                _ => None,
            })
            .collect()
    }

    fn opus() -> TrackInfo {
        TrackInfo {
            codec: Codec::Opus,
            config: None,
            video: None,
            audio: None,
            rendition: None,
        }
    }

    #[test]
    fn ladder_rungs_take_the_ids_that_travel_and_eight_at_most() {
        let hub = Hub::default();
        let mut p = hub.publish("live/l", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        let bc = p.broadcast().clone();
        let rung = |name: &str| TrackInfo {
            rendition: Some(name.into()),
            ..video()
        };
        let local = bc.add_rendition(&hub, opus());
        let rungs: Vec<RenditionProducer> = (0..8)
            .map(|i| {
                bc.add_ladder_rendition(&hub, rung(&format!("r{i}")))
                    .unwrap()
            })
            .collect();
        let ids: Vec<u8> = rungs.iter().map(|r| r.track().0).collect();
        assert_eq!(ids, [2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(!local.track().travels());
        assert!(bc.add_ladder_rendition(&hub, rung("r8")).is_none());
        assert_eq!(
            bc.track(TrackId(3)).unwrap().rendition.as_deref(),
            Some("r1")
        );
    }

    /// A transcoder's ladder written into a live broadcast: one writer at a time, its rungs
    /// withdrawn when it goes, and the next writer's rungs continue on the same ids from a
    /// keyframe past the last frame written there.
    #[test]
    fn a_ladder_writer_hands_its_rungs_to_the_next_one_on_the_same_ids() {
        let hub = Hub::default();
        assert!(matches!(
            hub.ladder_writer("live/w", "t1"),
            Err(LadderError::NotLive(_))
        ));
        let mut p = hub.publish("live/w", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        let bc = p.broadcast().clone();
        let rung = |name: &str| TrackInfo {
            rendition: Some(name.into()),
            ..video()
        };
        let mut c = hub.subscribe("live/w").unwrap();
        let mut w1 = hub.ladder_writer("live/w", "t1").unwrap();
        assert_eq!(bc.ladder_from().as_deref(), Some("t1"));
        assert!(matches!(
            hub.ladder_writer("live/w", "t2"),
            Err(LadderError::Taken(_, from)) if &*from == "t1"
        ));
        // The writer's ids are its peer's; the broadcast's are the first ladder ids.
        w1.set_track(TrackId(5), rung("360p"));
        w1.set_track(TrackId(6), rung("240p"));
        w1.set_track(TrackId(7), video()); // names no rung: ignored
        let ids: Vec<(u8, String)> = bc
            .renditions()
            .into_iter()
            .map(|(id, t)| (id.0, t.rendition.unwrap().to_string()))
            .collect();
        assert_eq!(ids, [(2, "360p".into()), (3, "240p".into())]);
        p.push(TrackId(0), frame(0, true));
        w1.push(TrackId(5), frame(0, true), None);
        w1.push(TrackId(5), frame(33, false), None);
        w1.push(TrackId(7), frame(33, false), None);
        drop(w1);
        assert_eq!(bc.ladder_from(), None);
        assert!(bc.renditions().is_empty());

        // The next transcoder starts from an older keyframe (its fetch's first group).
        let mut w2 = hub.ladder_writer("live/w", "t2").unwrap();
        w2.set_track(TrackId(2), rung("240p"));
        w2.set_track(TrackId(3), rung("360p"));
        let mut ids: Vec<(u8, String)> = bc
            .renditions()
            .into_iter()
            .map(|(id, t)| (id.0, t.rendition.unwrap().to_string()))
            .collect();
        ids.sort();
        assert_eq!(ids, [(2, "360p".into()), (3, "240p".into())]);
        w2.push(TrackId(3), frame(0, true), None); // in the past
        w2.push(TrackId(3), frame(66, false), None); // not a keyframe
        w2.push(TrackId(3), frame(100, true), None);
        w2.push(TrackId(3), frame(133, false), None);
        let mut out = Vec::new();
        c.read(&mut out, 100);
        let rung_frames: Vec<(u8, i64)> = out
            .iter()
            .filter_map(|e| match &e.item {
                Item::Frame { track, frame } if track.is_ladder() => {
                    Some((track.0, frame.dts / 1000))
                }
                _ => None,
            })
            .collect();
        assert_eq!(rung_frames, [(2, 0), (2, 33), (2, 100), (2, 133)]);
    }

    #[test]
    fn rendition_ids_are_reused_and_never_take_the_sources() {
        // One viewer after the other: each starts a rendition and stops it a little later.
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        p.set_track(TrackId(1), opus());
        let bc = p.broadcast().clone();
        let mut ids = Vec::new();
        for i in 0..1000 {
            let mut r = bc.add_rendition(&hub, opus());
            ids.push(r.track().0);
            r.push(frame(i * 100, false));
            // A group per 500 ms of video: older renditions' frames leave the log.
            p.push(TrackId(0), frame(i * 100, i % 5 == 0));
            drop(r);
        }
        // A node's own renditions never take the ids that travel (the source's, the ladder's).
        assert!(ids.iter().all(|&id| !TrackId(id).travels()), "{ids:?}");
        assert!(*ids.iter().max().unwrap() < 30, "{ids:?}");
        assert_eq!(bc.track(TrackId(0)), Some(video()));
        assert_eq!(bc.track(TrackId(1)), Some(opus()));
        assert_eq!(bc.tracks().len(), 2);
        // A slot is not reused while the log holds its frames: frames of a live rendition
        // and of the one before it in the same slot never mix.
        let r1 = bc.add_rendition(&hub, opus());
        let id1 = r1.track();
        drop(r1);
        let r2 = bc.add_rendition(&hub, opus());
        assert_ne!(r2.track(), id1);
    }

    /// The log as (track, ms, group start) per frame; and checks that the marks are the log's
    /// group index (what consumers start and resume on).
    fn marks(bc: &Broadcast) -> Vec<(u8, i64, bool)> {
        let st = bc.lock();
        let marked: Vec<u64> = st
            .log
            .iter()
            .filter(|e| e.group_start)
            .map(|e| e.seq)
            .collect();
        assert_eq!(marked, Vec::from(st.group_starts.clone()));
        st.log
            .iter()
            .filter_map(|e| match &e.item {
                Item::Frame { track, frame } => Some((track.0, frame.dts / 1000, e.group_start)),
                Item::Config { .. } => {
                    assert!(!e.group_start, "a config starts no group");
                    None
                }
            })
            .collect()
    }

    /// With video, groups start at the source's video keyframes only: not at audio, not at a
    /// config, not at a rendition's keyframe (video or audio).
    #[test]
    fn groups_are_marked_at_the_sources_video_keyframes() {
        let hub = Hub::new(HubConfig {
            retain_groups: 10,
            ..Default::default()
        });
        let mut p = hub.publish("live/m", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        p.set_track(TrackId(1), super::testing::track(Codec::Aac));
        let bc = p.broadcast().clone();
        let mut rv = bc.add_rendition(&hub, video());
        let mut ra = bc.add_rendition(&hub, opus());
        p.push(TrackId(1), frame(0, true));
        p.push(TrackId(0), frame(10, true));
        p.push(TrackId(1), frame(20, true));
        ra.push(frame(20, true));
        p.push(TrackId(0), frame(1500, false));
        rv.push(frame(1510, true));
        p.set_track(TrackId(0), super::testing::track(Codec::H265));
        p.push(TrackId(1), frame(2600, true));
        ra.push(frame(2600, true));
        p.push(TrackId(0), frame(2610, true));
        let (r, a) = (rv.track().0, ra.track().0);
        assert_eq!(
            marks(&bc),
            [
                (1, 0, false),
                (0, 10, true),
                (1, 20, false),
                (a, 20, false),
                (0, 1500, false),
                (r, 1510, false),
                (1, 2600, false),
                (a, 2600, false),
                (0, 2610, true),
            ]
        );
        assert!(
            !Entry::detached(
                0,
                Item::Frame {
                    track: TrackId(0),
                    frame: frame(0, true)
                }
            )
            .group_start
        );
    }

    /// Without video, a group starts at the source's first audio frame a second or more after
    /// the last group's start; a rendition's audio (all keyframes) never starts one, even a
    /// second after.
    #[test]
    fn audio_only_groups_are_marked_a_second_apart_on_the_source() {
        let hub = Hub::new(HubConfig {
            retain_groups: 10,
            ..Default::default()
        });
        let mut p = hub.publish("live/m", Instant::now()).unwrap();
        p.set_track(TrackId(1), super::testing::track(Codec::Aac));
        let bc = p.broadcast().clone();
        let mut ra = bc.add_rendition(&hub, opus());
        let a = ra.track().0;
        let mut want = Vec::new();
        for ms in (0..=2400).step_by(400) {
            p.push(TrackId(1), frame(ms, true));
            want.push((1, ms, ms % 1200 == 0));
            // The rendition's frames 1,100 ms after a group's start would have started one.
            ra.push(frame(ms + 300, true));
            want.push((a, ms + 300, false));
        }
        assert_eq!(marks(&bc), want);
        // A consumer starts at the newest group: the source's frame at 2,400 ms.
        let mut c = hub.subscribe("live/m").unwrap();
        let mut out = Vec::new();
        c.read(&mut out, 100);
        assert!(out[0].group_start);
        assert_eq!(frames(&out), [2400, 2700]);
    }

    /// A video rendition's keyframes (the B-frame-free re-encode's, a few frames after the
    /// source's) start no group: a consumer that arrives after one still starts on the source's
    /// keyframe, which players of the source track can decode from.
    #[test]
    fn rendition_keyframes_start_no_group() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        let bc = p.broadcast().clone();
        let mut r = bc.add_rendition(&hub, video());
        for i in 0..10 {
            p.push(TrackId(0), frame(i * 33, i == 0));
            if i >= 3 {
                // The rendition's IDR for the source's keyframe comes 3 frames later.
                r.push(frame((i - 3) * 33, i == 3));
            }
        }
        let mut c = hub.subscribe("live/a").unwrap();
        let mut out = Vec::new();
        c.read(&mut out, 100);
        let first = out
            .iter()
            .find_map(|e| match &e.item {
                Item::Frame { track, frame } => Some((*track, frame.keyframe)),
                _ => None,
            })
            .unwrap();
        assert_eq!(first, (TrackId(0), true), "started on {first:?}");
    }

    #[test]
    fn has_news_tells_when_a_read_can_return_something() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        let mut c = hub.subscribe("live/a").unwrap();
        assert!(c.has_news(), "nothing read yet");
        let mut out = Vec::new();
        c.read(&mut out, 100);
        assert!(c.has_news(), "no group yet: still waiting for one");
        for i in 0..5 {
            p.push(TrackId(0), frame(i * 33, i == 0));
        }
        assert!(c.has_news());
        out.clear();
        assert_eq!(c.read(&mut out, 3), ReadOutcome::Read(3));
        assert!(c.has_news(), "the read was cut at its max");
        out.clear();
        assert_eq!(c.read(&mut out, 3), ReadOutcome::Read(2));
        assert!(!c.has_news(), "all read, nothing new");
        p.push(TrackId(0), frame(200, false));
        assert!(c.has_news());
    }

    #[test]
    fn late_joiner_starts_at_newest_keyframe() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        for i in 0..10 {
            p.push(TrackId(0), frame(i * 33, i % 4 == 0));
        }
        let mut c = hub.subscribe("live/a").unwrap();
        let mut out = Vec::new();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(2));
        assert_eq!(frames(&out), vec![264, 297]);
        assert!(matches!(&out[0].item, Item::Frame { frame, .. } if frame.keyframe));
    }

    /// Every protocol publishes through `Hub::publish`: a name that breaks the rule is refused
    /// there, and nothing is left in the hub.
    #[test]
    fn bad_names_are_refused() {
        let hub = Hub::default();
        let long = "a".repeat(257);
        for bad in [
            "", "/a", "a/", "a//b", "live/..", "../x", "live/./a", "a b", "a\\b", "é", &long,
        ] {
            assert_eq!(
                hub.publish(bad, Instant::now()).err(),
                Some(PublishError::BadName(bad.into())),
                "{bad:?}"
            );
            assert!(hub.subscribe(bad).is_none());
        }
        assert!(hub.broadcasts().is_empty());
        for good in ["live/a", "a", "abc-1_2/x.y~z", &"a".repeat(256)] {
            assert!(hub.publish(good, Instant::now()).is_ok(), "{good:?}");
        }
    }

    /// A virtual monotonic clock for a hub: it moves only when the test advances it.
    #[derive(Clone)]
    struct VirtualClock(Arc<Mutex<Instant>>);

    impl VirtualClock {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(Instant::now())))
        }

        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }

        /// A hub with a `grace_s` reconnect grace, reading this clock.
        fn hub(&self, grace_s: u64) -> Hub {
            let clock = self.clone();
            let cfg = HubConfig {
                reconnect_grace: Duration::from_secs(grace_s),
                ..Default::default()
            };
            Hub::with_clock(cfg, Arc::new(move || clock.now()))
        }
    }

    /// The grace runs from the producer's drop on the hub's clock: a publisher back within it
    /// continues the broadcast, its timeline rebased by the gap the clock measured to its first
    /// keyframe; the broadcast ends exactly one grace after the last drop.
    #[test]
    fn second_publisher_refused_and_grace_resumes() {
        let clock = VirtualClock::new();
        let hub = clock.hub(5);
        let mut p = hub.publish("live/a", clock.now()).unwrap();
        assert_eq!(
            hub.publish("live/a", clock.now()).err(),
            Some(PublishError::AlreadyLive("live/a".into()))
        );
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(1000, true));
        let mut c = hub.subscribe("live/a").unwrap();
        let mut out = Vec::new();
        c.read(&mut out, 100);
        drop(p);
        clock.advance(Duration::from_millis(4999));
        hub.reap(clock.now());
        let mut p = hub.publish("live/a", clock.now()).unwrap();
        p.set_track(TrackId(0), video());
        clock.advance(Duration::from_millis(500));
        p.push(TrackId(0), frame(0, false)); // dropped: waits for a keyframe
        p.push(TrackId(0), frame(33, true));
        clock.advance(Duration::from_millis(33));
        p.push(TrackId(0), frame(66, false));
        out.clear();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(2));
        // The old timeline's last frame plus the 5.499 s gap, then on at the new pace.
        assert_eq!(frames(&out), [1000 + 5499, 1000 + 5499 + 33]);
        drop(p);
        clock.advance(Duration::from_millis(4999));
        hub.reap(clock.now());
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(0));
        clock.advance(Duration::from_millis(1));
        hub.reap(clock.now());
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Ended);
        assert!(hub.subscribe("live/a").is_none());
    }

    /// A publisher back at once (no time on the clock) follows on a millisecond after the old
    /// timeline, the unit of RTMP timestamps.
    #[test]
    fn a_publisher_back_at_once_follows_on_a_millisecond_later() {
        let clock = VirtualClock::new();
        let hub = clock.hub(5);
        let mut p = hub.publish("live/a", clock.now()).unwrap();
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(1000, true));
        let mut c = hub.subscribe("live/a").unwrap();
        let mut out = Vec::new();
        c.read(&mut out, 100);
        drop(p);
        let mut p = hub.publish("live/a", clock.now()).unwrap();
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(0, true));
        out.clear();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(1));
        assert_eq!(frames(&out), [1001]);
    }

    /// A fetched broadcast's producer (nobody comes back for it): ended as unwatched only while
    /// no consumer is attached, then gone at once, without the grace; a consumer that comes
    /// after finds nothing (so its node fetches again), and a new producer starts afresh.
    #[test]
    fn a_broadcast_whose_fetch_stopped_takes_no_new_consumer() {
        let hub = Hub::new(HubConfig {
            reconnect_grace: Duration::from_secs(5),
            ..Default::default()
        });
        let mut p = hub.publish("live/f", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(0, true));
        let c = hub.subscribe("live/f").unwrap();
        // Watched: the producer comes back, still live.
        let Err(mut p) = p.end_if_unwatched() else {
            panic!("ended with a consumer attached");
        };
        assert!(p.broadcast().is_live());
        p.push(TrackId(0), frame(33, false));
        drop(c);
        let old = p.broadcast().clone();
        assert!(p.end_if_unwatched().is_ok());
        assert!(!old.is_live());
        // No grace: nothing to attach to, at once.
        assert!(hub.subscribe("live/f").is_none());
        assert!(hub.broadcasts().is_empty());
        // A new fetch makes a new broadcast, not a resumption of the old one.
        let mut p = hub.publish("live/f", Instant::now()).unwrap();
        assert!(!Arc::ptr_eq(p.broadcast(), &old));
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(0, true));
        let mut c = hub.subscribe("live/f").unwrap();
        let mut out = Vec::new();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(1));
        assert_eq!(frames(&out), vec![0]);
    }

    /// A fetch that ends for good (its upstream ended the broadcast): its consumers read what
    /// is logged, then Ended, at once; no new consumer attaches.
    #[test]
    fn ending_a_broadcast_skips_the_grace() {
        let hub = Hub::new(HubConfig {
            reconnect_grace: Duration::from_secs(5),
            ..Default::default()
        });
        let mut p = hub.publish("live/e", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(0, true));
        let mut c = hub.subscribe("live/e").unwrap();
        p.push(TrackId(0), frame(33, false));
        p.end();
        assert!(hub.subscribe("live/e").is_none());
        let mut out = Vec::new();
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Read(2));
        assert_eq!(frames(&out), vec![0, 33]);
        assert_eq!(c.read(&mut out, 100), ReadOutcome::Ended);
    }

    /// Attaching and ending as unwatched at the same moment: either the consumer attached first
    /// and the producer comes back, or the consumer finds nothing; never a consumer of a
    /// broadcast that was ended.
    #[test]
    fn attaching_while_the_fetch_lets_go() {
        for _ in 0..500 {
            let hub = Hub::default();
            let mut p = hub.publish("live/r", Instant::now()).unwrap();
            p.set_track(TrackId(0), video());
            let bc = p.broadcast().clone();
            let start = Arc::new(std::sync::Barrier::new(2));
            let (h, s) = (hub.clone(), start.clone());
            let attacher = std::thread::spawn(move || {
                s.wait();
                h.subscribe("live/r")
            });
            start.wait();
            let ended = p.end_if_unwatched();
            let consumer = attacher.join().unwrap();
            match (consumer, ended) {
                (Some(c), Err(p)) => {
                    assert!(Arc::ptr_eq(c.broadcast(), &bc));
                    assert!(p.broadcast().is_live());
                }
                (None, Ok(())) => assert!(!bc.is_live()),
                (c, e) => panic!(
                    "consumer {} while the end was {}",
                    c.is_some(),
                    if e.is_ok() { "done" } else { "refused" }
                ),
            }
        }
    }

    #[test]
    fn slow_consumer_skips_to_newest_group() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(0), video());
        p.push(TrackId(0), frame(0, true));
        let mut c = hub.subscribe("live/a").unwrap();
        let mut out = Vec::new();
        c.read(&mut out, 100);
        for i in 1..200 {
            p.push(TrackId(0), frame(i * 33, i % 60 == 0));
        }
        out.clear();
        match c.read(&mut out, 1000) {
            ReadOutcome::Skipped { skipped, n } => {
                assert!(skipped > 0);
                assert_eq!(n, 200 - 180);
            }
            o => panic!("expected a skip, got {o:?}"),
        }
        assert_eq!(frames(&out)[0], 180 * 33);
        assert_eq!(hub.stats().frames_skipped.load(Relaxed), 179);
    }

    #[test]
    fn consumers_count_by_kind() {
        let hub = Hub::default();
        let _p = hub.publish("live/k", Instant::now()).unwrap();
        let stats = |h: &Hub| {
            let bc = h.broadcasts()[0].clone();
            let s = &bc.stats;
            [&s.players, &s.node_subscriptions, &s.consumers].map(|c| c.load(Relaxed))
        };
        let player = hub.subscribe("live/k").unwrap();
        let mut fetched = hub.subscribe("live/k").unwrap();
        let internal = hub.subscribe_as("live/k", ConsumerKind::Internal).unwrap();
        assert_eq!(stats(&hub), [2, 0, 3]);
        fetched.set_kind(ConsumerKind::Node);
        assert_eq!(stats(&hub), [1, 1, 3]);
        let info = hub.broadcasts()[0].describe(Instant::now());
        assert_eq!((info.players, info.node_subscriptions), (1, 1));
        drop(fetched);
        drop(internal);
        assert_eq!(stats(&hub), [1, 0, 1]);
        drop(player);
        assert_eq!(stats(&hub), [0, 0, 0]);
    }

    mod random_ops {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Push { video: bool, key: bool, size: usize },
            Read { consumer: usize, max: usize },
            Subscribe,
            Unsubscribe(usize),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (any::<bool>(), prop::bool::weighted(0.1), 1usize..5000)
                    .prop_map(|(video, key, size)| Op::Push { video, key, size }),
                4 => (0usize..8, 1usize..50).prop_map(|(consumer, max)| Op::Read { consumer, max }),
                1 => Just(Op::Subscribe),
                1 => (0usize..8).prop_map(Op::Unsubscribe),
            ]
        }

        proptest! {
            /// Whatever the interleaving: every consumer reads entries in log order, starts and
            /// resumes after a skip on a video keyframe, and the log stays within its bounds.
            #[test]
            fn consumers_read_in_order_from_keyframes(ops in prop::collection::vec(op(), 1..400)) {
                let cfg = HubConfig { max_log_bytes: 50_000, max_lag: Duration::from_millis(300), ..Default::default() };
                let hub = Hub::new(cfg);
                let mut p = hub.publish("live/p", Instant::now()).unwrap();
                p.set_track(TrackId(0), video());
                p.set_track(TrackId(1), TrackInfo { codec: Codec::Aac, config: None, video: None, audio: None, rendition: None });
                let mut consumers: Vec<(BroadcastConsumer, Option<u64>, bool)> = Vec::new();
                let mut t = 0i64;
                for op in ops {
                    match op {
                        Op::Push { video, key, size } => {
                            t += 10_000;
                            let f = Frame { pts: t, dts: t, keyframe: key || !video, payload: Bytes::from(vec![0u8; size]) };
                            p.push(TrackId(if video { 0 } else { 1 }), f);
                        }
                        Op::Subscribe => consumers.push((hub.subscribe("live/p").unwrap(), None, true)),
                        Op::Unsubscribe(i) if i < consumers.len() => { consumers.remove(i); }
                        Op::Unsubscribe(_) => {}
                        Op::Read { consumer, max } => {
                            let Some((c, last, fresh)) = consumers.get_mut(consumer) else { continue };
                            let mut out = Vec::new();
                            let outcome = c.read(&mut out, max);
                            prop_assert!(out.len() <= max);
                            if matches!(outcome, ReadOutcome::Skipped { .. }) {
                                *fresh = true;
                            }
                            let restart = *fresh;
                            if restart && !out.is_empty() {
                                let first_frame = out.iter().find_map(|e| match &e.item {
                                    Item::Frame { track, frame } => Some((*track, frame.keyframe)),
                                    _ => None,
                                });
                                prop_assert_eq!(first_frame.map(|f| f == (TrackId(0), true)), Some(true));
                                prop_assert!(out[0].group_start);
                                *fresh = false;
                            }
                            for e in &out {
                                prop_assert!(last.is_none_or(|l| e.seq == l + 1 || restart));
                                *last = Some(e.seq);
                            }
                        }
                    }
                    let st = p.broadcast().lock();
                    prop_assert!(st.log_bytes <= 50_000 || st.log.len() == 1);
                    prop_assert!(st.group_starts.len() <= 2);
                    // The marks on the entries are the log's group index.
                    prop_assert!(st.log.iter().all(|e| e.group_start == st.group_starts.contains(&e.seq)));
                }
                drop(p);
                let players = hub.broadcasts()[0].stats.players.load(Relaxed);
                prop_assert_eq!(players, consumers.len() as u64);
            }
        }
    }
}
