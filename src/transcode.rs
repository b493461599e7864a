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

use crate::ffmpeg::audio::AacToOpus;
use crate::media::hub::Broadcast;
use crate::media::{AudioInfo, Codec, Hub, Item, ReadOutcome, TrackInfo};

/// A running AAC → Opus transcoder; dropping the last handle stops it.
pub struct OpusRendition {
    task: JoinHandle<()>,
}

impl Drop for OpusRendition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The transcoders of a node, by broadcast name.
#[derive(Default)]
pub struct Transcoders {
    opus: Mutex<HashMap<String, Weak<OpusRendition>>>,
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
    let mut map = registry.opus.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = map.get(bc.name()).and_then(Weak::upgrade) {
        return Some(r);
    }
    let task = tokio::spawn(run_opus(hub.clone(), bc.clone(), aac));
    let r = Arc::new(OpusRendition { task });
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(bc.name().to_owned(), Arc::downgrade(&r));
    Some(r)
}

fn registry_has(registry: &Transcoders, name: &str) -> bool {
    let map = registry.opus.lock().unwrap_or_else(|p| p.into_inner());
    map.get(name).is_some_and(|w| w.strong_count() > 0)
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
    loop {
        match consumer.read(&mut entries, 256) {
            ReadOutcome::Ended => break,
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
