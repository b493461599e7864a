//! A player's feed: reads a broadcast from the hub and turns it into the byte buffers one output
//! format needs, batching frames so that a player costs one write per batch interval.
//!
//! Guarantees: the first bytes are the format's prelude (metadata and the tracks' configs), then
//! entries from a keyframe; of each kind (video, audio) only one track is played: the lowest
//! numbered one the format can carry (the source's own, or a rendition where the format cannot
//! carry the source's codec, e.g. AAC made from a WHIP publisher's Opus); a config that did not change is not sent twice; buffers come from the
//! format's [`Muxer`], which shares them between players; a feed never waits on anything but the
//! hub and its own batch timer, so dropping its future at an await point loses nothing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::frame::{Codec, Item, Metadata, TrackId, TrackInfo, TrackKind};
use super::hub::{BroadcastConsumer, Entry, ReadOutcome};

/// An output format.
pub trait Muxer {
    /// Bytes a player needs before any track config (stream header, metadata).
    fn prelude(&self, tracks: &[(TrackId, TrackInfo)], metadata: &Metadata, out: &mut Vec<Bytes>);
    /// The bytes of one entry of a track described by `info` (shared; computed once per entry),
    /// or `None` when the entry has nothing to send in this format.
    fn entry(&self, entry: &Entry, info: &TrackInfo) -> Option<Bytes>;
    /// Whether the format can carry `codec`.
    fn carries(&self, codec: Codec) -> bool {
        let _ = codec;
        true
    }
}

/// What [`Feed::next`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedStatus {
    /// Buffers were appended; the number of frames skipped first (0 when none).
    Data {
        /// Frames passed over because the player was behind.
        skipped: u64,
    },
    /// The broadcast ended.
    Ended,
}

/// One player's reading of a broadcast in one format.
pub struct Feed<M> {
    consumer: BroadcastConsumer,
    muxer: M,
    batch: Duration,
    entries: Vec<Arc<Entry>>,
    tracks: Vec<Option<TrackInfo>>,
    /// Per track: whether it is the one played of its kind.
    played: Vec<bool>,
    sent_config: Vec<Option<Bytes>>,
    started: bool,
    next_batch: Option<Instant>,
}

impl<M: Muxer> Feed<M> {
    /// A feed that writes at most once per `batch` interval.
    pub fn new(consumer: BroadcastConsumer, muxer: M, batch: Duration) -> Self {
        Self {
            consumer,
            muxer,
            batch,
            entries: Vec::with_capacity(16),
            tracks: Vec::new(),
            played: Vec::new(),
            sent_config: Vec::new(),
            started: false,
            next_batch: None,
        }
    }

    /// Changes the interval between batches (from the next batch on).
    pub fn set_batch(&mut self, batch: Duration) {
        self.batch = batch;
    }

    /// The consumer underneath.
    pub fn consumer(&self) -> &BroadcastConsumer {
        &self.consumer
    }

    fn set_track(&mut self, track: TrackId, info: TrackInfo) {
        let i = usize::from(track.0);
        if self.tracks.len() <= i {
            self.tracks.resize(i + 1, None);
            self.sent_config.resize(i + 1, None);
            self.played.resize(i + 1, false);
        }
        self.tracks[i] = Some(info);
        for kind in [TrackKind::Video, TrackKind::Audio] {
            let first = self.tracks.iter().position(|t| {
                t.as_ref()
                    .is_some_and(|t| t.codec.kind() == kind && self.muxer.carries(t.codec))
            });
            for (j, t) in self.tracks.iter().enumerate() {
                if t.as_ref().is_some_and(|t| t.codec.kind() == kind) {
                    self.played[j] = Some(j) == first;
                }
            }
        }
    }

    /// Waits for the next batch and appends its buffers to `out`.
    pub async fn next(&mut self, out: &mut Vec<Bytes>) -> FeedStatus {
        if let Some(at) = self.next_batch
            && at > Instant::now()
        {
            tokio::time::sleep_until(at).await;
        }
        loop {
            let outcome = self.consumer.read(&mut self.entries, 512);
            let skipped = match outcome {
                ReadOutcome::Ended => return FeedStatus::Ended,
                ReadOutcome::Read(0) => {
                    self.consumer.changed().await;
                    continue;
                }
                ReadOutcome::Read(_) => 0,
                ReadOutcome::Skipped { skipped, .. } => skipped,
            };
            if !self.started {
                self.started = true;
                let (tracks, metadata) = self.consumer.snapshot();
                self.muxer.prelude(&tracks, &metadata, out);
                for (id, info) in tracks {
                    self.set_track(id, info);
                }
                let dts = self.entries.first().map_or(0, |e| e.dts);
                self.push_configs(dts, out);
            }
            // Taken out (and put back below) so the loop can call &mut self methods; the Vec
            // keeps its allocation from batch to batch.
            let mut entries = std::mem::take(&mut self.entries);
            for entry in entries.drain(..) {
                match &entry.item {
                    Item::Config { track, info } => {
                        self.set_track(*track, info.clone());
                        self.push_configs(entry.dts, out);
                    }
                    Item::Frame { track, .. } => {
                        let i = usize::from(track.0);
                        if self.played.get(i) == Some(&true)
                            && let Some(Some(info)) = self.tracks.get(i)
                            && let Some(b) = self.muxer.entry(&entry, info)
                        {
                            out.push(b);
                        }
                    }
                }
            }
            self.entries = entries;
            self.next_batch = Some(Instant::now() + self.batch);
            return FeedStatus::Data { skipped };
        }
    }

    /// Sends the config of each track whose config differs from the last one sent.
    fn push_configs(&mut self, dts: i64, out: &mut Vec<Bytes>) {
        for i in 0..self.tracks.len() {
            let Some(info) = &self.tracks[i] else {
                continue;
            };
            if !self.played[i] {
                continue;
            }
            if info.config.is_some() && info.config != self.sent_config[i] {
                self.sent_config[i] = info.config.clone();
                let entry = Entry::detached(
                    dts,
                    Item::Config {
                        track: TrackId(i as u8),
                        info: info.clone(),
                    },
                );
                if let Some(b) = self.muxer.entry(&entry, info) {
                    out.push(b);
                }
            }
        }
    }
}
