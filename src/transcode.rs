//! On-demand renditions: tasks that read a broadcast from the hub, transcode one of its tracks
//! with [`crate::ffmpeg`] and write the result back as an extra track of the same broadcast.
//!
//! Guarantees: one transcoder per broadcast and rendition kind, however many viewers need it; it
//! starts with the first viewer that asks ([`opus_for`]) and stops when the last one drops its
//! handle. A transcoder that cannot start (no libopus, odd AAC) logs why and viewers go on without
//! that track. It reads only the source's tracks ([`TrackId::is_source`]), and its own frames
//! start no group in the hub (its keyframes fall a few frames after the source's;
//! [`crate::media::Entry::group_start`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::cluster::link::Link;
use crate::codec::h264;
use crate::ffmpeg::FfmpegError;
use crate::ffmpeg::audio::{AAC_48K_STEREO_ASC, AudioTranscoder};
use crate::ffmpeg::ladder::{LadderEncoder, LadderEvent};
use crate::ffmpeg::log::Scope;
use crate::ffmpeg::video::Reencoder;
use crate::ladder::Ladder;
use crate::media::hub::{Broadcast, wall_clock_us};
use crate::media::{
    AudioInfo, BroadcastConsumer, Codec, ConsumerKind, Entry, Hub, Item, ReadOutcome, TrackId,
    TrackInfo,
};

/// A running transcoder; dropping the last handle stops it.
pub(crate) struct Rendition {
    task: JoinHandle<()>,
    /// The track it writes, once it has declared it.
    track: Arc<OnceLock<TrackId>>,
}

impl Rendition {
    /// The track this rendition writes (`None` until it produced its first output). Viewers
    /// take only this track's frames: a stopped rendition's frames may still be in the log.
    pub(crate) fn track(&self) -> Option<TrackId> {
        self.track.get().copied()
    }
}

impl Drop for Rendition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The transcoders of a node, by broadcast name.
#[derive(Default)]
pub(crate) struct Transcoders {
    opus: Mutex<HashMap<String, Weak<Rendition>>>,
    aac: Mutex<HashMap<String, Weak<Rendition>>>,
    video: Mutex<HashMap<String, Weak<Rendition>>>,
}

/// How many transcoders of each kind run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Running {
    /// AAC → Opus (WebRTC viewers of RTMP sources).
    pub(crate) aac_to_opus: usize,
    /// Opus → AAC (RTMP/FLV players of WHIP sources).
    pub(crate) opus_to_aac: usize,
    /// B-frame-free re-encodes (WebRTC viewers of sources with B-frames).
    pub(crate) bframe_reencode: usize,
}

impl Transcoders {
    /// Running transcoders by kind.
    pub(crate) fn running(&self) -> Running {
        let count = |m: &Mutex<HashMap<String, Weak<Rendition>>>| {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|w| w.strong_count() > 0)
                .count()
        };
        Running {
            aac_to_opus: count(&self.opus),
            opus_to_aac: count(&self.aac),
            bframe_reencode: count(&self.video),
        }
    }
}

/// The running rendition in `map` for `name`, or a new one from `start`.
fn get_or_start(
    map: &Mutex<HashMap<String, Weak<Rendition>>>,
    name: &str,
    start: impl FnOnce(Arc<OnceLock<TrackId>>) -> JoinHandle<()>,
) -> Arc<Rendition> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = map.get(name).and_then(Weak::upgrade) {
        return r;
    }
    let track = Arc::new(OnceLock::new());
    let r = Arc::new(Rendition {
        task: start(track.clone()),
        track,
    });
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(name.to_owned(), Arc::downgrade(&r));
    r
}

/// The B-frame-free H.264 rendition of `bc` for WebRTC, started if needed; `None` when its
/// video has no B-frames (it is sent as it is).
pub(crate) fn video_for(
    registry: &Transcoders,
    hub: &Hub,
    bc: &Arc<Broadcast>,
) -> Option<Arc<Rendition>> {
    let (id, source) = bc
        .tracks()
        .into_iter()
        .find(|(id, t)| t.codec == Codec::H264 && id.is_source())?;
    if !bc.has_b_frames(id) {
        return None;
    }
    let (hub, bc2) = (hub.clone(), bc.clone());
    Some(get_or_start(&registry.video, bc.name(), move |track| {
        tokio::spawn(run_video(hub, bc2, id, source, track))
    }))
}

async fn run_video(
    hub: Hub,
    bc: Arc<Broadcast>,
    source_track: TrackId,
    source: TrackInfo,
    declared: Arc<OnceLock<TrackId>>,
) {
    let Some(mut consumer) = hub.subscribe_as(bc.name(), ConsumerKind::Internal) else {
        return;
    };
    let mut reencoder = match Reencoder::new(bc.fps(source_track)) {
        Ok(r) => r,
        Err(e) => {
            warn!(broadcast = %bc.name(), error = %e, "cannot re-encode video; WebRTC viewers get it with B-frames");
            return;
        }
    };
    let mut source = SourceVideo::new(source_track, &source);
    let mut rendition = None;
    info!(broadcast = %bc.name(), "B-frame re-encode for WebRTC started");
    let name: Arc<str> = bc.name().into();
    let mut entries = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(4);
    while next_entries(&mut consumer, &mut entries).await {
        for e in entries.drain(..) {
            let Some(frame) = source.frame(&e) else {
                continue;
            };
            // Re-encoding is CPU work: keep it off the runtime's I/O threads.
            let r = tokio::task::block_in_place(|| {
                let _scope = Scope::enter(&name);
                reencoder.push(frame, source.config(), &mut out)
            });
            if let Err(err) = r {
                warn!(broadcast = %bc.name(), error = %err, "re-encode failed; stopping it");
                return;
            }
            let Some(avcc) = reencoder.config.clone() else {
                continue;
            };
            let producer = rendition.get_or_insert_with(|| {
                let video = h264::parse_avcc(&avcc);
                let r = bc.add_rendition(
                    &hub,
                    TrackInfo {
                        codec: Codec::H264,
                        config: Some(avcc),
                        video,
                        audio: None,
                        rendition: None,
                    },
                );
                let _ = declared.set(r.track());
                r
            });
            for f in out.drain(..) {
                producer.push(f);
            }
        }
    }
    info!(broadcast = %bc.name(), "B-frame re-encode stopped");
}

/// The Opus rendition of `bc` (for WebRTC viewers), started if needed; `None` when the
/// broadcast has no AAC track or was published with Opus.
pub(crate) fn opus_for(
    registry: &Transcoders,
    hub: &Hub,
    bc: &Arc<Broadcast>,
) -> Option<Arc<Rendition>> {
    audio_for(&registry.opus, hub, bc, Codec::Aac, Codec::Opus)
}

/// The AAC rendition of `bc` (for RTMP and HTTP-FLV players, which cannot carry Opus), started
/// if needed; `None` when the broadcast has no Opus track or was published with AAC.
pub(crate) fn aac_for(
    registry: &Transcoders,
    hub: &Hub,
    bc: &Arc<Broadcast>,
) -> Option<Arc<Rendition>> {
    audio_for(&registry.aac, hub, bc, Codec::Opus, Codec::Aac)
}

/// The `to` rendition of `bc`'s `from` audio, started in `map` if needed.
fn audio_for(
    map: &Mutex<HashMap<String, Weak<Rendition>>>,
    hub: &Hub,
    bc: &Arc<Broadcast>,
    from: Codec,
    to: Codec,
) -> Option<Arc<Rendition>> {
    let tracks = bc.tracks();
    // Published in `to` already. Only the source's tracks tell: a rendition's track
    // outlives its handles until its aborted task is dropped, and a viewer arriving just after
    // the last one left must get a transcoder of its own, not that dying track.
    if tracks.iter().any(|(id, t)| id.is_source() && t.codec == to) {
        return None;
    }
    let (_, source) = tracks
        .into_iter()
        .find(|(id, t)| id.is_source() && t.codec == from)?;
    let (hub, bc2) = (hub.clone(), bc.clone());
    Some(get_or_start(map, bc.name(), move |track| {
        tokio::spawn(run_audio(hub, bc2, source, to, track))
    }))
}

/// A source video track as a decoder fed from the hub reads it: its frames from the first
/// keyframe on (frames before one refer to parameter sets and pictures the decoder never got),
/// with the track's current config.
struct SourceVideo {
    track: TrackId,
    config: Option<bytes::Bytes>,
    started: bool,
}

impl SourceVideo {
    fn new(track: TrackId, info: &TrackInfo) -> Self {
        Self {
            track,
            config: info.config.clone(),
            started: false,
        }
    }

    /// The frame in `e` to decode, if it holds one (a config entry updates the config).
    fn frame<'e>(&mut self, e: &'e Entry) -> Option<&'e crate::media::Frame> {
        match &e.item {
            Item::Config { track, info } if *track == self.track => {
                self.config = info.config.clone();
                None
            }
            Item::Frame { track, frame } if *track == self.track => {
                self.started |= frame.keyframe;
                self.started.then_some(frame)
            }
            _ => None,
        }
    }

    /// The track's config (avcC).
    fn config(&self) -> Option<&[u8]> {
        self.config.as_deref()
    }
}

/// Waits for the next entries of `consumer`; false when the broadcast ended.
async fn next_entries(consumer: &mut BroadcastConsumer, entries: &mut Vec<Arc<Entry>>) -> bool {
    loop {
        match consumer.read(entries, 256) {
            ReadOutcome::Ended => return false,
            ReadOutcome::Read(0) => consumer.changed().await,
            _ => return true,
        }
    }
}

/// An audio transcoder from `source` to `to` and the description of the track it writes.
fn audio_transcoder(
    source: &TrackInfo,
    to: Codec,
) -> Result<(AudioTranscoder, TrackInfo), FfmpegError> {
    let (transcoder, config) = match to {
        Codec::Opus => {
            let asc = source.config.clone().unwrap_or_default();
            (AudioTranscoder::aac_to_opus(&asc, 96_000)?, None)
        }
        _ => (
            AudioTranscoder::opus_to_aac(128_000)?,
            Some(bytes::Bytes::from_static(&AAC_48K_STEREO_ASC)),
        ),
    };
    let info = TrackInfo {
        codec: to,
        config,
        video: None,
        audio: Some(AudioInfo {
            sample_rate: 48_000,
            channels: 2,
        }),
        rendition: None,
    };
    Ok((transcoder, info))
}

async fn run_audio(
    hub: Hub,
    bc: Arc<Broadcast>,
    source: TrackInfo,
    to: Codec,
    track: Arc<OnceLock<TrackId>>,
) {
    let Some(mut consumer) = hub.subscribe_as(bc.name(), ConsumerKind::Internal) else {
        return;
    };
    let (from, to_name) = (source.codec.name(), to.name());
    let (mut transcoder, info) = match audio_transcoder(&source, to) {
        Ok(t) => t,
        Err(e) => {
            warn!(broadcast = %bc.name(), error = %e, "cannot transcode {from} to {to_name}; its players get no audio");
            return;
        }
    };
    let mut rendition = bc.add_rendition(&hub, info);
    let _ = track.set(rendition.track());
    info!(broadcast = %bc.name(), track = rendition.track().0, "{from} → {to_name} transcoder started");
    let name: Arc<str> = bc.name().into();
    let mut entries = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(8);
    while next_entries(&mut consumer, &mut entries).await {
        for e in entries.drain(..) {
            let Item::Frame { track, frame } = &e.item else {
                continue;
            };
            if !track.is_source() || bc.track(*track).is_none_or(|t| t.codec != source.codec) {
                continue;
            }
            let r = {
                let _scope = Scope::enter(&name);
                transcoder.push(frame, &mut out)
            };
            if let Err(err) = r {
                warn!(broadcast = %bc.name(), error = %err, "{from} → {to_name} failed; stopping the transcoder");
                return;
            }
            for f in out.drain(..) {
                rendition.push(f);
            }
        }
    }
    info!(broadcast = %bc.name(), "{from} → {to_name} transcoder stopped");
}

/// The ABR ladders a node makes itself: `castnode standalone --ladder NAME` makes one per live
/// broadcast published here; a transcoder makes one per job ([`Jobs`]), of a broadcast fetched
/// from upstream. Each rung is a named track of the broadcast
/// ([`Broadcast::add_ladder_rendition`]) that players choose with `?rendition=`.
///
/// Guarantees: a ladder starts for every broadcast whose source video is H.264 and that carries
/// no ladder yet (one fetched from upstream brings its own), within [`Ladders::start_new`]'s
/// period of going live, on a thread of its own (a ladder is whole-core work, and FFmpeg's
/// scaler cannot move between threads); it stops when its broadcast ends or it is stopped
/// ([`Ladders::stop`], within a frame), its rung tracks withdrawn. Every rung's keyframes fall
/// on the same source timestamps ([`crate::ffmpeg::ladder`]). A ladder that fails logs why;
/// viewers keep the source.
pub struct Ladders {
    ladder: Ladder,
    /// Running ladders, by broadcast (the broadcast's address: a new broadcast of the same
    /// name gets its own).
    running: Mutex<HashMap<usize, LadderThread>>,
}

/// A running ladder: its broadcast, its thread, and the flag that stops it.
struct LadderThread {
    bc: Weak<Broadcast>,
    thread: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl LadderThread {
    fn running(&self) -> bool {
        self.bc.strong_count() > 0 && !self.thread.is_finished()
    }
}

impl Ladders {
    /// Ladders of `ladder`'s rungs.
    pub fn new(ladder: Ladder) -> Self {
        Self {
            ladder,
            running: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<usize, LadderThread>> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|_, t| t.running());
        running
    }

    /// How many rungs the ladder has at most (a source smaller than a rung gets no such rung).
    pub fn rungs(&self) -> usize {
        self.ladder.rungs.len()
    }

    /// How many ladders run.
    pub fn running(&self) -> usize {
        self.lock().len()
    }

    /// Starts a ladder for each live broadcast of `hub` that needs one; `fetched` tells the
    /// broadcasts that come from upstream (they are not laddered here).
    pub fn start_new(&self, hub: &Hub, fetched: impl Fn(&str) -> bool) {
        for bc in hub.broadcasts() {
            if bc.is_live() && !fetched(bc.name()) {
                self.start(hub, &bc);
            }
        }
    }

    /// Starts `bc`'s ladder unless it runs, or `bc` has no H.264 source video or carries a
    /// ladder already.
    pub(crate) fn start(&self, hub: &Hub, bc: &Arc<Broadcast>) {
        let mut running = self.lock();
        let key = Arc::as_ptr(bc) as usize;
        if running.contains_key(&key) {
            return;
        }
        let tracks = bc.tracks();
        let h264 = tracks
            .iter()
            .any(|(id, t)| id.is_source() && t.codec == Codec::H264);
        if !h264 || tracks.iter().any(|(id, _)| id.is_ladder()) {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (hub2, bc2, ladder, stop2) =
            (hub.clone(), bc.clone(), self.ladder.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ladder-{}", bc.name()))
            .spawn(move || run_ladder(hub2, bc2, ladder, stop2));
        match thread {
            Ok(thread) => {
                running.insert(
                    key,
                    LadderThread {
                        bc: Arc::downgrade(bc),
                        thread,
                        stop,
                    },
                );
            }
            Err(e) => warn!(broadcast = %bc.name(), error = %e, "cannot start the ladder's thread"),
        }
    }

    /// Stops `bc`'s ladder, if it runs (its thread ends after the frame it is on).
    pub(crate) fn stop(&self, bc: &Arc<Broadcast>) {
        if let Some(t) = self.lock().remove(&(Arc::as_ptr(bc) as usize)) {
            t.stop.store(true, Relaxed);
        }
    }
}

/// How far before a ladder's start a source frame may have been ingested and still count as
/// live (the ladder encodes from the first such frame).
const LIVE_SLACK_US: i64 = 300_000;
/// After this long, a ladder encodes whatever comes, whatever its ingest stamp says.
const LIVE_WAIT: Duration = Duration::from_secs(3);

/// A ladder's thread: reads the broadcast's source video, writes its rungs, until it ends or
/// `stop`.
fn run_ladder(hub: Hub, bc: Arc<Broadcast>, ladder: Ladder, stop: Arc<AtomicBool>) {
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(e) => {
            warn!(broadcast = %bc.name(), error = %e, "cannot start the ladder's runtime");
            return;
        }
    };
    rt.block_on(ladder_loop(hub, bc, ladder, stop));
}

async fn ladder_loop(hub: Hub, bc: Arc<Broadcast>, ladder: Ladder, stop: Arc<AtomicBool>) {
    let Some(mut consumer) = hub.subscribe_as(bc.name(), ConsumerKind::Internal) else {
        return;
    };
    let Some((source_track, source)) = bc
        .tracks()
        .into_iter()
        .find(|(id, t)| id.is_source() && t.codec == Codec::H264)
    else {
        return;
    };
    let name: Arc<str> = bc.name().into();
    let rungs = ladder.rungs.len();
    let mut encoder = match LadderEncoder::new(ladder, bc.fps(source_track)) {
        Ok(e) => e,
        Err(e) => {
            warn!(broadcast = %name, error = %e, "cannot start the ABR ladder");
            return;
        }
    };
    info!(broadcast = %name, rungs, "ABR ladder started");
    // Join at the live edge: frames ingested before the ladder started (the group a new
    // subscription starts with, up to a GOP old) are decoded but not encoded; the first frame
    // ingested since is, as an IDR. With clocks that disagree by more than the slack, whatever
    // comes after LIVE_WAIT counts as live.
    let started = (std::time::Instant::now(), wall_clock_us());
    let mut live = false;
    encoder.encode_from(i64::MAX);
    let mut source = SourceVideo::new(source_track, &source);
    let mut producers: Vec<Option<crate::media::hub::RenditionProducer>> = Vec::new();
    let mut entries = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(16);
    while !stop.load(Relaxed) && next_entries(&mut consumer, &mut entries).await {
        for e in entries.drain(..) {
            let Some(frame) = source.frame(&e) else {
                continue;
            };
            if !live
                && (e.ingest_us >= started.1 - LIVE_SLACK_US || started.0.elapsed() >= LIVE_WAIT)
            {
                live = true;
                encoder.encode_from(frame.pts);
            }
            let r = {
                let _scope = Scope::enter(&name);
                encoder.push(frame, source.config(), &mut out)
            };
            if let Err(err) = r {
                warn!(broadcast = %name, error = %err, "ABR ladder failed; stopping it");
                return;
            }
            for ev in out.drain(..) {
                match ev {
                    LadderEvent::Config { rung, info } => {
                        if producers.len() <= rung {
                            producers.resize_with(rung + 1, || None);
                        }
                        match &mut producers[rung] {
                            Some(p) => p.set_info(info),
                            slot => *slot = bc.add_ladder_rendition(&hub, info),
                        }
                    }
                    LadderEvent::Frame { rung, frame } => {
                        if let Some(Some(p)) = producers.get_mut(rung) {
                            p.push(frame);
                        }
                    }
                }
            }
        }
    }
    info!(broadcast = %name, "ABR ladder stopped");
}

/// A transcoder's jobs: the broadcasts whose ladders it makes (given by the stream manager, or
/// `--jobs`). For each: the broadcast fetched from upstream (without upstream's own ladder), its
/// ladder made here ([`Ladders`]), and the rungs published back upstream over the cluster link
/// ([`Link::publish_ladder`]), where they join the live broadcast as its ladder.
///
/// Guarantees: a job waits for its broadcast to be live upstream and starts again when it comes
/// back after ending; a job taken away stops its ladder and ends its publication at once (the
/// upstream withdraws the rungs, so another transcoder can take the job over); nothing a job
/// does fails another.
pub struct Jobs {
    running: Mutex<HashMap<String, Job>>,
}

struct Job {
    task: JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Job {
    fn drop(&mut self) {
        // The task ends its publication and its ladder when told; it is aborted only if it
        // does not end by itself.
        let _ = self.stop.send(true);
        let task = self.task.abort_handle();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    task.abort();
                });
            }
            Err(_) => task.abort(),
        }
    }
}

impl Default for Jobs {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl Jobs {
    /// Runs exactly the jobs in `wanted` (broadcast names): starts the new ones, stops those
    /// no longer wanted.
    /// Jobs fetch through `link` into `hub` and make their ladders with `ladders`.
    pub(crate) fn set(
        &self,
        hub: &Hub,
        link: &Arc<Link>,
        ladders: &Arc<Ladders>,
        wanted: &[String],
    ) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|name, job| wanted.contains(name) && !job.task.is_finished());
        for name in wanted {
            if running.contains_key(name) {
                continue;
            }
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(run_job(
                hub.clone(),
                link.clone(),
                ladders.clone(),
                name.clone(),
                stopped,
            ));
            info!(broadcast = %name, "transcode job taken");
            running.insert(name.clone(), Job { task, stop });
        }
    }

    /// The jobs running, by broadcast name.
    pub(crate) fn names(&self) -> Vec<String> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = running.keys().cloned().collect();
        names.sort();
        names
    }
}

/// One job, until `stop`.
async fn run_job(
    hub: Hub,
    link: Arc<Link>,
    ladders: Arc<Ladders>,
    name: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let Some(mut consumer) = link.subscribe(&name).await else {
            // Not live upstream (yet): ask again soon.
            let _ = tokio::time::timeout(Duration::from_millis(500), stop.wait_for(|s| *s)).await;
            continue;
        };
        consumer.set_kind(ConsumerKind::Internal);
        let bc = consumer.broadcast().clone();
        ladders.start(&hub, &bc);
        // The rungs are declared from the first decoded picture; publish once they are.
        let mut changes = bc.watch();
        while bc.renditions().is_empty() && bc.is_live() && !*stop.borrow() {
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = stop.wait_for(|s| *s) => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        if !bc.renditions().is_empty() && !*stop.borrow() {
            link.clone()
                .publish_ladder(name.clone(), stop.clone())
                .await;
        }
        ladders.stop(&bc);
        drop(consumer);
        if !*stop.borrow() {
            // The broadcast ended (or its ladder failed): look again in a moment.
            let _ = tokio::time::timeout(Duration::from_millis(500), stop.wait_for(|s| *s)).await;
        }
    }
    info!(broadcast = %name, "transcode job ended");
}
