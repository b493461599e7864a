//! On-demand renditions: tasks that read a broadcast from the hub, transcode one of its tracks
//! with [`crate::ffmpeg`] and write the result back as an extra track of the same broadcast.
//!
//! Guarantees: one transcoder per broadcast and rendition kind, however many viewers need it; it
//! starts with the first viewer that asks ([`opus_for`]) and stops when the last one drops its
//! handle. A transcoder that cannot start (no libopus, odd AAC) logs why and viewers go on without
//! that track.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::codec::h264;
use crate::ffmpeg::audio::AacToOpus;
use crate::ffmpeg::video::Reencoder;
use crate::media::hub::Broadcast;
use crate::media::{AudioInfo, BroadcastConsumer, Codec, Entry, Hub, Item, ReadOutcome, TrackInfo};

/// A running transcoder; dropping the last handle stops it.
pub struct Rendition {
    task: JoinHandle<()>,
}

/// The AAC → Opus rendition.
pub type OpusRendition = Rendition;

impl Drop for Rendition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The transcoders of a node, by broadcast name.
#[derive(Default)]
pub struct Transcoders {
    opus: Mutex<HashMap<String, Weak<Rendition>>>,
    video: Mutex<HashMap<String, Weak<Rendition>>>,
}

impl Transcoders {
    /// Running transcoders: (AAC → Opus, B-frame re-encodes).
    pub fn running(&self) -> (usize, usize) {
        let count = |m: &Mutex<HashMap<String, Weak<Rendition>>>| {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|w| w.strong_count() > 0)
                .count()
        };
        (count(&self.opus), count(&self.video))
    }
}

/// The running rendition in `map` for `name`, or a new one from `start`.
fn get_or_start(
    map: &Mutex<HashMap<String, Weak<Rendition>>>,
    name: &str,
    start: impl FnOnce() -> JoinHandle<()>,
) -> Arc<Rendition> {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = map.get(name).and_then(Weak::upgrade) {
        return r;
    }
    let r = Arc::new(Rendition { task: start() });
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(name.to_owned(), Arc::downgrade(&r));
    r
}

/// The B-frame-free H.264 rendition of `bc` for WebRTC, started if needed; `None` when its
/// video has no B-frames (it is sent as it is).
pub fn video_for(registry: &Transcoders, hub: &Hub, bc: &Arc<Broadcast>) -> Option<Arc<Rendition>> {
    let (id, source) = bc
        .tracks()
        .into_iter()
        .find(|(id, t)| t.codec == Codec::H264 && id.0 < 2)?;
    if !bc.has_b_frames(id) {
        return None;
    }
    let (hub, bc2) = (hub.clone(), bc.clone());
    Some(get_or_start(&registry.video, bc.name(), move || {
        tokio::spawn(run_video(hub, bc2, id, source))
    }))
}

async fn run_video(
    hub: Hub,
    bc: Arc<Broadcast>,
    source_track: crate::media::TrackId,
    source: TrackInfo,
) {
    let Some(mut consumer) = hub.subscribe(bc.name()) else {
        return;
    };
    let mut reencoder = match Reencoder::new() {
        Ok(r) => r,
        Err(e) => {
            warn!(broadcast = %bc.name(), error = %e, "cannot re-encode video; WebRTC viewers get it with B-frames");
            return;
        }
    };
    let mut config = source.config.clone();
    let mut rendition = None;
    info!(broadcast = %bc.name(), "B-frame re-encode for WebRTC started");
    let mut entries = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(4);
    while next_entries(&mut consumer, &mut entries).await {
        for e in entries.drain(..) {
            match &e.item {
                Item::Config { track, info } if *track == source_track => {
                    config = info.config.clone()
                }
                Item::Frame { track, frame } if *track == source_track => {
                    // Re-encoding is CPU work: keep it off the runtime's I/O threads.
                    let r = tokio::task::block_in_place(|| {
                        reencoder.push(frame, config.as_deref(), &mut out)
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
                        bc.add_rendition(
                            &hub,
                            TrackInfo {
                                codec: Codec::H264,
                                config: Some(avcc),
                                video,
                                audio: None,
                            },
                        )
                    });
                    for f in out.drain(..) {
                        producer.push(f);
                    }
                }
                _ => {}
            }
        }
    }
    info!(broadcast = %bc.name(), "B-frame re-encode stopped");
}

/// The Opus rendition of `bc`, started if needed; `None` when the broadcast has no AAC track or
/// already carries Opus.
pub fn opus_for(
    registry: &Transcoders,
    hub: &Hub,
    bc: &Arc<Broadcast>,
) -> Option<Arc<OpusRendition>> {
    let tracks = bc.tracks();
    if tracks.iter().any(|(_, t)| t.codec == Codec::Opus) && !registry_has(registry, bc.name()) {
        return None;
    }
    let (_, aac) = tracks
        .into_iter()
        .find(|(_, t)| t.codec == Codec::Aac && t.config.is_some())?;
    let (hub, bc2) = (hub.clone(), bc.clone());
    Some(get_or_start(&registry.opus, bc.name(), move || {
        tokio::spawn(run_opus(hub, bc2, aac))
    }))
}

fn registry_has(registry: &Transcoders, name: &str) -> bool {
    let map = registry.opus.lock().unwrap_or_else(|p| p.into_inner());
    map.get(name).is_some_and(|w| w.strong_count() > 0)
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

async fn run_opus(hub: Hub, bc: Arc<Broadcast>, aac: TrackInfo) {
    let Some(mut consumer) = hub.subscribe(bc.name()) else {
        return;
    };
    let config = aac.config.clone().unwrap_or_default();
    let mut transcoder = match AacToOpus::new(&config, 96_000) {
        Ok(t) => t,
        Err(e) => {
            warn!(broadcast = %bc.name(), error = %e, "cannot transcode AAC to Opus; WebRTC viewers get no audio");
            return;
        }
    };
    let info = TrackInfo {
        codec: Codec::Opus,
        config: None,
        video: None,
        audio: Some(AudioInfo {
            sample_rate: 48_000,
            channels: 2,
        }),
    };
    let mut rendition = bc.add_rendition(&hub, info);
    info!(broadcast = %bc.name(), track = rendition.track().0, "AAC → Opus transcoder started");
    let mut entries = Vec::with_capacity(64);
    let mut out = Vec::with_capacity(8);
    while next_entries(&mut consumer, &mut entries).await {
        for e in entries.drain(..) {
            let Item::Frame { track, frame } = &e.item else {
                continue;
            };
            if *track == rendition.track() || bc.track(*track).is_none_or(|t| t.codec != Codec::Aac)
            {
                continue;
            }
            if let Err(err) = transcoder.push(frame, &mut out) {
                warn!(broadcast = %bc.name(), error = %err, "AAC → Opus failed; stopping the transcoder");
                return;
            }
            for f in out.drain(..) {
                rendition.push(f);
            }
        }
    }
    info!(broadcast = %bc.name(), "AAC → Opus transcoder stopped");
}
