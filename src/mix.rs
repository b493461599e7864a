//! The mixer role's runner: the inputs of a mix ([`MixConfig`]) fetched over the cluster link,
//! fed into the mixing core ([`crate::ffmpeg::mix`]), and the mix written into the local hub as
//! a broadcast of its own, which the link publishes upstream like any broadcast published here
//! ([`Link::publish_local`]).
//!
//! Guarantees:
//! - One thread of its own with a current-thread tokio runtime (FFmpeg's scalers cannot move
//!   between threads; mixing is whole-core work): the inputs' readers, the output clock, the
//!   decoders and the encoders all run there; nothing here blocks the node's runtime.
//! - Each input is asked of upstream ([`Link::subscribe`]) every 500 ms until it is live, and
//!   again 500 ms after it ends: an input that is not (or no longer) live shows the slate in its
//!   rectangle and is silent in the mix, and comes back by itself.
//! - The output clock is a tokio interval at the layout's frame rate; every tick composites and
//!   encodes one picture (H.264, libx264, no B-frames, an IDR every two seconds) and mixes the
//!   audio up to the tick minus [`AUDIO_LATENCY_US`] (AAC-LC, 48 kHz stereo). Output timestamps
//!   are the ticks' scheduled times on that clock (from 1 s, so that the audio's, which trail,
//!   are never negative): they only go forward, whatever the inputs' timestamps do; a tick
//!   missed because the thread was late is skipped, not caught up.
//! - Inputs are aligned by arrival: each input's video shows its newest picture at each tick,
//!   and an input's audio is placed by the arrival of its first frame (then by its own
//!   timestamps), so inputs are in sync with each other only as far as they arrive in sync.
//!   Audio that was already old when an input was fetched (the group a fetch starts with, up to
//!   a GOP) is dropped, so that an input's sound is as live as its picture.
//! - The output broadcast (video as track 0, AAC as track 1) is published in the local hub when
//!   the encoder gives its first picture, and ends when the runner does (the node stops, or the
//!   encoder fails: logged). An input's undecodable frames are counted by the core and logged;
//!   they fail nothing else.
//!
//! Not here yet: the manager's mix API, layout changes while running, failover between
//! mixers, input offsets; the core's Opus output is made and dropped (WebRTC viewers get the
//! node's own AAC → Opus rendition).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::cluster::link::Link;
use crate::config::MixConfig;
use crate::ffmpeg::log::Scope;
use crate::ffmpeg::mix::VideoMixer;
use crate::ffmpeg::mix::{AAC_CONFIG, AudioIn, AudioMixer, MixError, MixSettings, VideoEvent};
use crate::media::hub::wall_clock_us;
use crate::media::{
    BroadcastConsumer, BroadcastProducer, Codec, ConsumerKind, Entry, Frame, Hub, Item,
    ReadOutcome, TrackId, TrackInfo,
};

/// How often a missing input is asked for again.
const RETRY: Duration = Duration::from_millis(500);
/// How far behind the output clock the audio is mixed (late frames' room).
pub const AUDIO_LATENCY_US: i64 = 150_000;
/// The output clock's first time: the audio, mixed [`AUDIO_LATENCY_US`] behind, starts above 0.
const CLOCK_BASE_US: i64 = 1_000_000;
/// Audio ingested this long before its fetch started is old (dropped).
const LIVE_SLACK_US: i64 = 300_000;
/// After this long on a fetch, audio counts as live whatever its ingest stamp says (clocks of
/// other machines may disagree).
const LIVE_WAIT: Duration = Duration::from_secs(3);
/// AAC output bitrate, bit/s.
const AAC_BITRATE: usize = 128_000;
/// Opus output bitrate, bit/s (made by the core, not published yet).
const OPUS_BITRATE: usize = 96_000;

/// What an input's reader hands the mixing loop.
enum InputEvent {
    /// An H.264 access unit (from a keyframe on) and its track's avcC.
    Video { frame: Frame, avcc: Option<Bytes> },
    /// The input's audio codec, at each new fetch and when it changes: its audio starts anew.
    AudioCodec(AudioIn),
    /// An audio frame of the last codec given.
    Audio(Frame),
}

/// Starts the mix on a thread of its own, its inputs fetched with `link` and its output
/// written into `hub`; returns once the mixers are built (or with why they cannot be).
pub async fn start(hub: Hub, link: Arc<Link>, mix: MixConfig) -> anyhow::Result<()> {
    let (ready, built) = oneshot::channel();
    let name = mix.name.clone();
    std::thread::Builder::new()
        .name(format!("mix-{name}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
                    return;
                }
            };
            rt.block_on(run(hub, link, mix, ready));
        })?;
    match built.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("mix {name}: {e}")),
        Err(_) => Err(anyhow::anyhow!("mix {name}: its thread ended")),
    }
}

/// The mixers of `mix`, every input added.
fn build(mix: &MixConfig) -> Result<(VideoMixer, AudioMixer), MixError> {
    let settings = MixSettings {
        bitrate_kbps: mix.bitrate_kbps,
        keyint: mix.layout.fps * 2,
        ..MixSettings::default()
    };
    let mut video = VideoMixer::new(mix.layout.clone(), &settings)?;
    for p in &mix.layout.inputs {
        video.compositor().add_input(&p.id)?;
    }
    let audio = AudioMixer::new(&mix.layout, AUDIO_LATENCY_US, AAC_BITRATE, OPUS_BITRATE)?;
    Ok((video, audio))
}

/// The mixing loop: the inputs' readers, the output clock.
async fn run(
    hub: Hub,
    link: Arc<Link>,
    mix: MixConfig,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let scope: Arc<str> = mix.output.as_str().into();
    let built = {
        let _scope = Scope::enter(&scope);
        build(&mix)
    };
    let (mut video, mut audio) = match built {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let ids: Vec<String> = mix.layout.inputs.iter().map(|p| p.id.clone()).collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (index, name) in ids.iter().enumerate() {
        tokio::spawn(follow_input(link.clone(), index, name.clone(), tx.clone()));
    }
    drop(tx);
    info!(mix = %mix.name, output = %mix.output, inputs = ids.len(), "mix started");

    let start = tokio::time::Instant::now();
    let clock = |at: tokio::time::Instant| {
        CLOCK_BASE_US + at.saturating_duration_since(start).as_micros() as i64
    };
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(mix.layout.fps)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut output = Output::new(hub, mix.output.clone());
    let (mut events, mut aac, mut opus) = (Vec::new(), Vec::new(), Vec::new());
    let mut inputs_open = true;
    loop {
        tokio::select! {
            biased;
            at = ticks.tick() => {
                let now = clock(at);
                let r = {
                    let _scope = Scope::enter(&scope);
                    video
                        .tick(now, &mut events)
                        .and_then(|_| audio.mix(now, &mut aac, &mut opus))
                };
                if let Err(e) = r {
                    error!(mix = %mix.name, error = %e, "the mix failed; its output ends");
                    return;
                }
                opus.clear();
                if !output.write(&mut events, &mut aac) {
                    return;
                }
            }
            ev = rx.recv(), if inputs_open => {
                let Some((index, ev)) = ev else {
                    inputs_open = false;
                    continue;
                };
                let now = clock(tokio::time::Instant::now());
                let id: &str = &ids[index];
                let _scope = Scope::enter(&scope);
                let r = match ev {
                    InputEvent::Video { frame, avcc } => {
                        video.compositor().push(id, &frame, avcc.as_deref(), now)
                    }
                    InputEvent::AudioCodec(codec) => {
                        audio.remove_input(id);
                        audio.add_input(id, codec)
                    }
                    InputEvent::Audio(frame) => audio.push(id, &frame, now),
                };
                if let Err(e) = r {
                    warn!(mix = %mix.name, input = %id, error = %e, "input frame not mixed");
                }
            }
        }
    }
}

/// The output broadcast, published at the first encoded picture.
struct Output {
    hub: Hub,
    name: String,
    producer: Option<BroadcastProducer>,
}

/// The output's tracks: video, then audio.
const VIDEO: TrackId = TrackId(0);
const AUDIO: TrackId = TrackId(1);

impl Output {
    fn new(hub: Hub, name: String) -> Output {
        Output {
            hub,
            name,
            producer: None,
        }
    }

    /// Writes the encoded `video` events and `aac` frames (draining both); false when the
    /// output cannot be published.
    fn write(&mut self, video: &mut Vec<VideoEvent>, aac: &mut Vec<Frame>) -> bool {
        for ev in video.drain(..) {
            match ev {
                VideoEvent::Config(info) => {
                    let producer = match &mut self.producer {
                        Some(p) => p,
                        None => match self.hub.publish(&self.name, Instant::now()) {
                            Ok(mut p) => {
                                p.set_track(
                                    AUDIO,
                                    TrackInfo::from_config(
                                        Codec::Aac,
                                        Some(Bytes::from_static(&AAC_CONFIG)),
                                    ),
                                );
                                info!(output = %self.name, "mix published");
                                self.producer.insert(p)
                            }
                            Err(e) => {
                                error!(output = %self.name, error = %e, "cannot publish the mix");
                                return false;
                            }
                        },
                    };
                    producer.set_track(VIDEO, info);
                }
                VideoEvent::Frame(f) => {
                    if let Some(p) = &mut self.producer {
                        p.push(VIDEO, f);
                    }
                }
            }
        }
        match &mut self.producer {
            Some(p) => aac.drain(..).for_each(|f| p.push(AUDIO, f)),
            None => aac.clear(),
        }
        true
    }
}

/// Input `name` (the mix's input `index`), fetched from upstream whenever it is live, its
/// frames sent to the mixing loop until that ends.
async fn follow_input(
    link: Arc<Link>,
    index: usize,
    name: String,
    tx: mpsc::UnboundedSender<(usize, InputEvent)>,
) {
    let mut waiting_said = false;
    while !tx.is_closed() {
        let Some(mut consumer) = link.subscribe(&name).await else {
            if !waiting_said {
                info!(input = %name, "mix input not live upstream; its slate shows until it is");
                waiting_said = true;
            }
            tokio::time::sleep(RETRY).await;
            continue;
        };
        waiting_said = false;
        consumer.set_kind(ConsumerKind::Internal);
        info!(input = %name, "mix input live");
        read_input(&mut consumer, index, &tx).await;
        info!(input = %name, "mix input ended");
        drop(consumer);
        tokio::time::sleep(RETRY).await;
    }
}

/// Sends `consumer`'s source video (from its first keyframe) and audio (from the live edge on)
/// to the mixing loop, until the broadcast ends or the loop is gone.
async fn read_input(
    consumer: &mut BroadcastConsumer,
    index: usize,
    tx: &mpsc::UnboundedSender<(usize, InputEvent)>,
) {
    let bc = consumer.broadcast().clone();
    let started = (Instant::now(), wall_clock_us());
    let mut reader = InputReader::default();
    let mut entries: Vec<Arc<Entry>> = Vec::with_capacity(64);
    loop {
        match consumer.read(&mut entries, 256) {
            ReadOutcome::Ended => return,
            ReadOutcome::Read(0) => {
                consumer.changed().await;
                continue;
            }
            _ => {}
        }
        for e in entries.drain(..) {
            let Item::Frame { track, frame } = &e.item else {
                continue;
            };
            if !track.is_source() {
                continue;
            }
            let Some(info) = bc.track(*track) else {
                continue;
            };
            let live = e.ingest_us >= started.1 - LIVE_SLACK_US || started.0.elapsed() >= LIVE_WAIT;
            for ev in reader.take(&info, frame, live) {
                if tx.send((index, ev)).is_err() {
                    return;
                }
            }
        }
    }
}

/// One fetch's state: which of its frames go to the mixers.
#[derive(Default)]
struct InputReader {
    /// A keyframe was seen: video frames go on from it.
    video_started: bool,
    /// Audio reached the live edge.
    audio_live: bool,
    /// The audio codec last given.
    audio: Option<AudioIn>,
}

impl InputReader {
    /// What `frame` of a track described by `info` gives the mixers; `live`: it was ingested
    /// after the fetch started (or long enough has passed).
    fn take(&mut self, info: &TrackInfo, frame: &Frame, live: bool) -> Vec<InputEvent> {
        let mut out = Vec::new();
        match info.codec {
            Codec::H264 => {
                self.video_started |= frame.keyframe;
                if self.video_started {
                    out.push(InputEvent::Video {
                        frame: frame.clone(),
                        avcc: info.config.clone(),
                    });
                }
            }
            Codec::Aac | Codec::Opus => {
                self.audio_live |= live;
                if !self.audio_live {
                    return out;
                }
                let codec = match info.codec {
                    Codec::Aac => AudioIn::Aac(info.config.as_deref().unwrap_or_default().to_vec()),
                    _ => AudioIn::Opus,
                };
                if self.audio.as_ref() != Some(&codec) {
                    self.audio = Some(codec.clone());
                    out.push(InputEvent::AudioCodec(codec));
                }
                out.push(InputEvent::Audio(frame.clone()));
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(pts: i64, keyframe: bool) -> Frame {
        Frame {
            pts,
            dts: pts,
            keyframe,
            payload: Bytes::from_static(b"x"),
        }
    }

    fn kinds(events: &[InputEvent]) -> Vec<&'static str> {
        events
            .iter()
            .map(|e| match e {
                InputEvent::Video { .. } => "video",
                InputEvent::AudioCodec(_) => "codec",
                InputEvent::Audio(_) => "audio",
            })
            .collect()
    }

    #[test]
    fn video_starts_at_a_keyframe_and_audio_at_the_live_edge_with_its_codec_first() {
        let h264 = TrackInfo::from_config(Codec::H264, None);
        let aac = TrackInfo::from_config(Codec::Aac, Some(Bytes::from_static(&AAC_CONFIG)));
        let mut r = InputReader::default();
        assert!(r.take(&h264, &frame(0, false), true).is_empty());
        assert_eq!(kinds(&r.take(&h264, &frame(33, true), false)), ["video"]);
        assert_eq!(kinds(&r.take(&h264, &frame(66, false), false)), ["video"]);
        // Old audio is dropped; the first live frame brings the codec, then frames alone.
        assert!(r.take(&aac, &frame(10, true), false).is_empty());
        assert_eq!(
            kinds(&r.take(&aac, &frame(31, true), true)),
            ["codec", "audio"]
        );
        assert_eq!(kinds(&r.take(&aac, &frame(52, true), false)), ["audio"]);
        // A change of codec is given again.
        let opus = TrackInfo::from_config(Codec::Opus, None);
        let ev = r.take(&opus, &frame(73, true), true);
        assert_eq!(kinds(&ev), ["codec", "audio"]);
        assert!(matches!(ev[0], InputEvent::AudioCodec(AudioIn::Opus)));
    }
}
