//! A broadcast's entries on the cluster link's group streams, both ways.
//!
//! - Out: a hub entry's encoding ([`encoded`]: a frame header, its payload following by
//!   reference, or a whole config item) is made once per entry and memoized in it
//!   ([`MemoSlot::Cluster`]); every subscription's copy shares it. A group opens with its header
//!   and the current config of each source track ([`group_opening`]), so a config change inside
//!   a dropped group is not lost.
//! - In: [`Sink`] writes a group's items into the local hub with their origin ingest times, and
//!   skips frames the hub already has (after a failover to another upstream).
//! - Only the tracks that travel with a broadcast ([`TrackId::travels`]: the source's and its
//!   ladder's rungs) go on the link ([`shared_tracks`]); each node makes its own other renditions.
//!
//! The byte layout is [`super::wire`]'s (`docs/cluster-protocol.md`).

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::wire::{self, GroupDecoder, GroupEvent, GroupHeader, GroupSeq, SubscriptionId};
use crate::media::hub::{Broadcast, LadderWriter, wall_clock_us};
use crate::media::{
    BroadcastConsumer, BroadcastProducer, Entry, Item, MemoSlot, TrackId, TrackInfo,
};
use crate::metrics::ClusterStats;

/// The encoding of `e` on a group stream: a frame header (its payload follows) or a whole config
/// item; `None` for a rendition track (each node makes its own) or what cannot be encoded.
/// Memoized in the entry ([`MemoSlot::Cluster`]), shared by every subscription.
pub(crate) fn encoded(e: &Entry) -> &Option<Bytes> {
    let ingest = e.ingest_us.max(0) as u64;
    e.memo(MemoSlot::Cluster, |item| {
        let mut buf = BytesMut::with_capacity(40);
        let ok = match item {
            Item::Config { track, info } if track.travels() => {
                wire::encode_config_item(*track, info, &mut buf).is_ok()
            }
            Item::Frame { track, frame } if track.travels() => {
                wire::encode_frame_header(*track, frame, ingest, &mut buf).is_ok()
            }
            _ => false,
        };
        ok.then(|| buf.freeze())
    })
}

/// A group stream's opening: its header, then the current config of each track the flow sends
/// (`ladder_only`: only the ladder's rungs; else every track that travels), so a config change
/// inside a dropped group is not lost.
pub(crate) fn group_opening(
    id: SubscriptionId,
    seq: u64,
    bc: &Broadcast,
    ladder_only: bool,
) -> Option<Bytes> {
    let mut buf = BytesMut::with_capacity(64);
    let header = GroupHeader {
        subscription: id,
        sequence: GroupSeq(seq),
    };
    wire::encode_group_header(&header, &mut buf).ok()?;
    for (track, info) in bc.tracks() {
        if sends(track, ladder_only) {
            let _ = wire::encode_config_item(track, &info, &mut buf);
        }
    }
    Some(buf.freeze())
}

/// Whether a flow that sends `ladder_only` (only the ABR ladder's rungs, as a transcoder
/// publishes them) or every track that travels sends `track`.
pub(crate) fn sends(track: TrackId, ladder_only: bool) -> bool {
    if ladder_only {
        track.is_ladder()
    } else {
        track.travels()
    }
}

/// Where a fetched (or published) broadcast goes: the local hub, as a broadcast of its own
/// (`producer`), or as the ladder of a live one (`ladder`, a transcoder's publication).
pub(crate) struct Sink {
    pub(crate) producer: Option<BroadcastProducer>,
    pub(crate) ladder: Option<LadderWriter>,
    /// The peer's ladder rungs are not written (a transcoder fetching a source makes its own).
    skip_ladder: bool,
    /// The newest dts written per source track (a peer's frame of another id counts with the
    /// last): after a failover, frames the hub already has are skipped.
    last_dts: [i64; TrackId::SHARED_TRACKS as usize],
}

impl Sink {
    pub(crate) fn new(producer: Option<BroadcastProducer>) -> Self {
        Self {
            producer,
            ladder: None,
            skip_ladder: false,
            last_dts: [i64::MIN; TrackId::SHARED_TRACKS as usize],
        }
    }

    /// A sink that leaves the peer's ladder rungs out (they are made here).
    pub(crate) fn without_ladder(mut self) -> Self {
        self.skip_ladder = true;
        self
    }

    /// Whether it writes `track` (not a peer's ladder rung it leaves out): for the tracks a
    /// SUBSCRIBE_OK describes, as for those its groups carry.
    pub(crate) fn keeps(&self, track: TrackId) -> bool {
        !(self.skip_ladder && track.is_ladder())
    }

    /// Whether it writes anywhere yet.
    pub(crate) fn is_ready(&self) -> bool {
        self.producer.is_some() || self.ladder.is_some()
    }

    /// Writes the items `decoder` finds in `buf` into the hub; `backlog`: the frames are a
    /// burst from the past, whose ages are not the link's latency.
    pub(crate) fn drain(
        &mut self,
        decoder: &mut GroupDecoder,
        buf: &mut BytesMut,
        stats: &ClusterStats,
        backlog: bool,
    ) -> Result<(), wire::WireError> {
        if !self.is_ready() {
            return Ok(());
        }
        while let Some(ev) = decoder.decode(buf)? {
            match ev {
                GroupEvent::Header(_) => {}
                GroupEvent::Config { track, .. } if !self.keeps(track) => {}
                GroupEvent::Config { track, info } => {
                    match (&mut self.producer, &mut self.ladder) {
                        (Some(p), _) => p.set_track(track, *info),
                        (None, Some(l)) => l.set_track(track, *info),
                        (None, None) => {}
                    }
                }
                GroupEvent::Frame(f) if !self.keeps(f.track) => {}
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
                    match (&mut self.producer, &mut self.ladder) {
                        (Some(p), _) => p.push_at(f.track, f.frame, Some(ingest)),
                        (None, Some(l)) => l.push(f.track, f.frame, Some(ingest)),
                        (None, None) => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tracks of a consumer's broadcast that a flow sends ([`sends`]: a node's own renditions
/// are made on every node) and its metadata.
pub(crate) fn shared_tracks(
    consumer: &BroadcastConsumer,
    ladder_only: bool,
) -> (Vec<(TrackId, TrackInfo)>, crate::media::Metadata) {
    let (tracks, metadata) = consumer.snapshot();
    (
        tracks
            .into_iter()
            .filter(|(t, _)| sends(*t, ladder_only))
            .collect(),
        metadata,
    )
}
