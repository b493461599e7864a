//! A player's feed: reads a broadcast from the hub and turns it into the byte buffers one output
//! format needs; what it has read since its last call goes out as one batch (one write).
//!
//! Guarantees: the first bytes are the format's prelude (metadata and the tracks' configs), then
//! entries from the start of a group (a keyframe of the source's video, [`Entry::group_start`]),
//! as after a skip; of each kind (video, audio) only one track is played: the lowest
//! numbered one the format can carry (the source's own, or a rendition where the format cannot
//! carry the source's codec, e.g. AAC made from a WHIP publisher's Opus), or for video the
//! ABR ladder's rung the player asked for ([`Feed::with_rendition`]), from that rung's next
//! keyframe on (a rung's keyframe follows its group's start by the encoder's delay); a config that did not
//! change is not sent twice; buffers come from the format's [`Muxer`], which shares them between
//! players; a feed never waits: players call it on their turns on the node's write clock
//! ([`super::pace`]).

use std::sync::Arc;

use bytes::Bytes;

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

/// What [`Feed::poll_batch`] produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FeedStatus {
    /// Buffers were appended; the number of frames skipped first (0 when none).
    Data {
        /// Frames passed over because the player was behind.
        skipped: u64,
    },
    /// The broadcast ended.
    Ended,
}

/// One player's reading of a broadcast in one format.
pub(crate) struct Feed<M> {
    consumer: BroadcastConsumer,
    muxer: M,
    entries: Vec<Arc<Entry>>,
    tracks: Vec<Option<TrackInfo>>,
    /// Per track: whether it is the one played of its kind.
    played: Vec<bool>,
    sent_config: Vec<Option<Bytes>>,
    started: bool,
    /// The ladder rung played instead of the source's video, by name.
    rendition: Option<Arc<str>>,
    /// The played video track's frames are passed over until its next keyframe.
    await_key: bool,
}

/// The ladder rung a player's query string asks for (`rendition=360p`); `None` when it names
/// none, `source`, or `auto` (which only WHEP plays as such; other players get the source).
pub fn rendition_param(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("rendition="))
        .filter(|v| !v.is_empty() && *v != "auto" && *v != "source")
}

impl<M: Muxer> Feed<M> {
    /// A feed of `consumer`'s broadcast in `muxer`'s format.
    pub(crate) fn new(consumer: BroadcastConsumer, muxer: M) -> Self {
        Self {
            consumer,
            muxer,
            entries: Vec::with_capacity(16),
            tracks: Vec::new(),
            played: Vec::new(),
            sent_config: Vec::new(),
            started: false,
            rendition: None,
            await_key: false,
        }
    }

    /// Plays the ladder rung named `rendition` for video instead of the source's (`None`: the
    /// source).
    pub fn with_rendition(mut self, rendition: Option<&str>) -> Self {
        self.rendition = rendition.map(Arc::from);
        self
    }

    /// The consumer underneath.
    pub(crate) fn consumer(&self) -> &BroadcastConsumer {
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
            let wanted = match kind {
                TrackKind::Video => self.rendition.as_deref(),
                TrackKind::Audio => None,
            };
            let first = self.tracks.iter().position(|t| {
                t.as_ref().is_some_and(|t| {
                    t.codec.kind() == kind
                        && self.muxer.carries(t.codec)
                        && t.rendition.as_deref() == wanted
                })
            });
            for (j, t) in self.tracks.iter().enumerate() {
                if t.as_ref().is_some_and(|t| t.codec.kind() == kind) {
                    self.played[j] = Some(j) == first;
                }
            }
        }
    }

    /// Appends the buffers of what the hub has that this feed did not read yet to `out`;
    /// `None` when there is nothing new.
    pub(crate) fn poll_batch(&mut self, out: &mut Vec<Bytes>) -> Option<FeedStatus> {
        let outcome = self.consumer.read(&mut self.entries, 512);
        let skipped = match outcome {
            ReadOutcome::Ended => return Some(FeedStatus::Ended),
            ReadOutcome::Read(0) => return None,
            ReadOutcome::Read(_) => 0,
            ReadOutcome::Skipped { skipped, .. } => skipped,
        };
        // The hub starts and resumes its consumers on the entries it marked.
        debug_assert!(
            (self.started && skipped == 0) || self.entries.first().is_none_or(|e| e.group_start),
            "a feed starts or resumes at a group's start"
        );
        if skipped > 0 || !self.started {
            // A rung's keyframe comes a few frames after its group's start.
            self.await_key = self.rendition.is_some();
        }
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
                Item::Frame { track, frame } => {
                    let i = usize::from(track.0);
                    if self.played.get(i) != Some(&true) {
                        continue;
                    }
                    let Some(Some(info)) = self.tracks.get(i) else {
                        continue;
                    };
                    if self.await_key && info.codec.kind() == TrackKind::Video {
                        if !frame.keyframe {
                            continue;
                        }
                        self.await_key = false;
                    }
                    if let Some(b) = self.muxer.entry(&entry, info) {
                        out.push(b);
                    }
                }
            }
        }
        self.entries = entries;
        Some(FeedStatus::Data { skipped })
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
