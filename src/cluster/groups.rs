//! The group policy of the cluster link, both ways, over any kind of stream handle.
//!
//! - Sending ([`GroupCursor`]): a group stream starts at each hub entry marked as a group start
//!   ([`Entry::group_start`]), so the wire's groups are the hub's; when a group starts, the one
//!   before is finished and the one two back is reset if still unsent; a consumer the hub made
//!   skip ends its current group incomplete.
//! - Receiving ([`GroupOrder`]): groups are read one at a time, in sequence order; a group older
//!   than one already read is refused; the current group is dropped when it made no progress for
//!   [`GROUP_STALL`] while a newer one waits.
//!
//! Both are plain state: no streams, no clock of their own (time is passed in).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::encoding::encoded;
use crate::media::{Entry, Item};

/// A group that made no progress for this long while a newer one is waiting is dropped by the
/// receiver.
pub(crate) const GROUP_STALL: Duration = Duration::from_millis(500);

/// Where a sender of one subscription's groups stands, and the policy every sender of groups
/// follows (serving a subscription, publishing upstream: [`super::session`]), over its kind of stream
/// handle `S`: which entries go out, which streams are finished or reset. Groups start where the
/// hub marked them ([`Entry::group_start`]): the wire's groups are the hub's.
pub(crate) struct GroupCursor<S> {
    seq: u64,
    current: Option<S>,
    previous: Option<S>,
}

/// What to do with a hub entry.
pub(crate) enum Step {
    /// Nothing: not sent on the link, or the middle of a group this sender has not started.
    Skip,
    /// Write this (an encoded header or config item, then its payload) on the current group.
    Write(Bytes, Bytes),
    /// A frame that starts a group: open a stream, write the group's opening, hand the stream
    /// to [`GroupCursor::begin`], then write this.
    Start(Bytes, Bytes),
}

/// What becomes of a group stream that a new group replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retire {
    /// The group two back: dropped if still unsent (reset with `GroupDropped`).
    Reset,
    /// The group before: it may finish behind the new one.
    Finish,
}

impl<S> Default for GroupCursor<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> GroupCursor<S> {
    /// A sender of a subscription's groups, before its first group.
    pub(crate) fn new() -> Self {
        Self {
            seq: 0,
            current: None,
            previous: None,
        }
    }

    /// What to do with `e`, the next entry read from the hub.
    pub(crate) fn step(&mut self, e: &Entry) -> Step {
        let Some(encoding) = encoded(e).clone() else {
            return Step::Skip;
        };
        match &e.item {
            Item::Config { .. } => {
                if self.current.is_none() {
                    // The next group's opening carries it.
                    return Step::Skip;
                }
                Step::Write(encoding, Bytes::new())
            }
            Item::Frame { frame, .. } => {
                if e.group_start {
                    Step::Start(encoding, frame.payload.clone())
                } else if self.current.is_none() {
                    // Mid-group (a config came first, or after a skip): wait for the next start.
                    Step::Skip
                } else {
                    Step::Write(encoding, frame.payload.clone())
                }
            }
        }
    }

    /// The sequence number the next group gets.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The group of [`Self::seq`] began on `stream`; the streams it replaces go through
    /// `retire` (the one two back to be reset, the last one to be finished).
    pub(crate) fn begin(&mut self, stream: S, mut retire: impl FnMut(&mut S, Retire)) {
        if let Some(mut old) = self.previous.take() {
            retire(&mut old, Retire::Reset);
        }
        if let Some(mut cur) = self.current.take() {
            retire(&mut cur, Retire::Finish);
            self.previous = Some(cur);
        }
        self.current = Some(stream);
        self.seq += 1;
    }

    /// The current group's stream.
    pub(crate) fn current(&mut self) -> Option<&mut S> {
        self.current.as_mut()
    }

    /// Gives up the current group (it was reset, stopped by the peer, skipped, or the
    /// broadcast ended): the caller resets or finishes what is returned.
    pub(crate) fn take_current(&mut self) -> Option<S> {
        self.current.take()
    }

    /// Every stream still held (the current and the previous group), for a sender that stops.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = S> {
        [self.current.take(), self.previous.take()]
            .into_iter()
            .flatten()
    }
}

/// The order a receiver reads one flow's groups in, over its kind of stream handle `S`.
pub(crate) struct GroupOrder<S> {
    /// Groups whose header was read, by sequence, waiting their turn.
    waiting: BTreeMap<u64, S>,
    current: Option<(u64, S)>,
    /// Groups below this were read or dropped.
    done_below: u64,
    /// The last time the current group made progress.
    progress: Instant,
    /// The first group read: a burst from up to a GOP back, whose frames' ages say nothing of
    /// the link.
    first: Option<u64>,
}

impl<S: Copy> GroupOrder<S> {
    /// A receiver before its first group.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            waiting: BTreeMap::new(),
            current: None,
            done_below: 0,
            progress: now,
            first: None,
        }
    }

    /// Group `seq` arrived on `stream`: kept to be read in its turn, or given back (`Err`) when
    /// it is older than what was read already (the caller stops it).
    pub(crate) fn offer(&mut self, seq: u64, stream: S) -> Result<(), S> {
        if seq < self.done_below || self.current.is_some_and(|(c, _)| seq <= c) {
            return Err(stream);
        }
        self.waiting.insert(seq, stream);
        Ok(())
    }

    /// The group to read now: the current one, else the next waiting one becomes current.
    pub(crate) fn advance(&mut self, now: Instant) -> Option<(u64, S)> {
        if self.current.is_none() {
            self.current = self.waiting.pop_first();
            self.progress = now;
        }
        self.current
    }

    /// The current group, if any.
    pub(crate) fn current(&self) -> Option<(u64, S)> {
        self.current
    }

    /// The current group made progress at `now`; whether its frames are a backlog (the flow's
    /// first group).
    pub(crate) fn progressed(&mut self, now: Instant) -> bool {
        self.progress = now;
        match self.current {
            Some((seq, _)) => *self.first.get_or_insert(seq) == seq,
            None => false,
        }
    }

    /// The current group is over (finished, reset, malformed or stalled); it is given back.
    pub(crate) fn done(&mut self) -> Option<(u64, S)> {
        let cur = self.current.take();
        if let Some((seq, _)) = cur {
            self.done_below = seq + 1;
        }
        cur
    }

    /// When the current group counts as stalled: only while a newer one waits.
    pub(crate) fn stall_deadline(&self) -> Option<Instant> {
        (self.current.is_some() && !self.waiting.is_empty()).then_some(self.progress + GROUP_STALL)
    }

    /// Every stream held (the current and the waiting ones), for a receiver that stops.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = S> + use<S> {
        let current = self.current.take().map(|(_, s)| s);
        let waiting = std::mem::take(&mut self.waiting).into_values();
        current.into_iter().chain(waiting)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::media::hub::Hub;
    use crate::media::hub::testing::{frame, track as info};
    use crate::media::{Codec, TrackId};

    /// What a sender does with each entry, as letters: S(kip), W(rite), N(ew group) with the
    /// streams it retires, in order.
    fn steps(cursor: &mut GroupCursor<u32>, entries: &[Arc<Entry>], next: &mut u32) -> Vec<String> {
        let mut out = Vec::new();
        for e in entries {
            let step = cursor.step(e);
            // A group starts on the wire exactly where the hub marked one.
            assert_eq!(
                matches!(step, Step::Start(..)),
                e.group_start,
                "{:?}",
                e.item
            );
            match step {
                Step::Skip => out.push("S".to_owned()),
                Step::Write(h, _) => {
                    assert!(!h.is_empty());
                    out.push("W".to_owned());
                }
                Step::Start(h, _) => {
                    assert!(!h.is_empty());
                    let mut retired = String::new();
                    *next += 1;
                    cursor.begin(*next, |s, r| {
                        retired.push_str(&format!(
                            "{}{s}",
                            if r == Retire::Reset { "r" } else { "f" }
                        ))
                    });
                    out.push(format!("N{next}{retired}"));
                }
            }
        }
        out
    }

    #[test]
    fn groups_start_at_video_keyframes_and_retire_the_two_before() {
        let hub = Hub::default();
        let mut p = hub.publish("live/g", Instant::now()).unwrap();
        p.set_track(TrackId(0), info(Codec::H264));
        p.set_track(TrackId(1), info(Codec::Aac));
        let mut consumer = hub.subscribe("live/g").unwrap();
        let mut cursor: GroupCursor<u32> = GroupCursor::new();
        // Audio before the first keyframe (not handed out), a group with audio and a config
        // change, two more groups; read as they come (a consumer that reads late joins at the
        // newest group).
        let mut entries = Vec::new();
        for (track, ms, key) in [
            (1, 0, true),
            (0, 10, false),
            (0, 20, true),
            (1, 21, true),
            (9, 0, false),
            (0, 30, false),
            (0, 40, true),
            (0, 50, true),
        ] {
            if track == 9 {
                let mut changed = info(Codec::Aac);
                changed.config = Some(Bytes::from_static(b"new"));
                p.set_track(TrackId(1), changed);
            } else {
                p.push(TrackId(track), frame(ms, key));
            }
            consumer.read(&mut entries, 64);
        }
        let mut next = 0;
        let got = steps(&mut cursor, &entries, &mut next);
        // Group 1 from the keyframe: its audio, the config change and a frame written on it;
        // group 2 finishes group 1; group 3 resets group 1 (two back) and finishes group 2.
        assert_eq!(got, ["N1", "W", "W", "W", "N2f1", "N3r1f2"], "{got:?}");
        assert!(matches!(entries[2].item, Item::Config { .. }));
        assert_eq!(cursor.seq(), 3);
        assert_eq!(cursor.current().copied(), Some(3));
        // A sender that stops holds the current and the previous group.
        let all: Vec<u32> = cursor.take_all().collect();
        assert_eq!(all, [3, 2]);
    }

    #[test]
    fn audio_only_groups_last_a_second_and_renditions_never_travel() {
        let hub = Hub::default();
        let mut p = hub.publish("live/a", Instant::now()).unwrap();
        p.set_track(TrackId(1), info(Codec::Aac));
        let mut consumer = hub.subscribe("live/a").unwrap();
        let mut cursor: GroupCursor<u32> = GroupCursor::new();
        let bc = p.broadcast().clone();
        let mut r = bc.add_rendition(&hub, info(Codec::Opus));
        let mut entries = Vec::new();
        for ms in (0..2500).step_by(500) {
            p.push(TrackId(1), frame(ms, true));
            r.push(frame(ms, true));
            consumer.read(&mut entries, 64);
        }
        let mut next = 0;
        let got = steps(&mut cursor, &entries, &mut next);
        let audio: Vec<&str> = got
            .iter()
            .zip(&entries)
            .filter(|(_, e)| {
                matches!(
                    e.item,
                    Item::Frame {
                        track: TrackId(1),
                        ..
                    }
                )
            })
            .map(|(s, _)| s.as_str())
            .collect();
        // 0 starts, 500 writes, 1000 starts (a second later), 1500 writes, 2000 starts.
        assert_eq!(audio, ["N1", "W", "N2f1", "W", "N3r1f2"], "{got:?}");
        let rendition = got
            .iter()
            .zip(&entries)
            .filter(|(_, e)| {
                matches!(&e.item, Item::Frame { track, .. } | Item::Config { track, .. } if !track.travels())
            })
            .map(|(s, _)| s.as_str());
        assert!(rendition.clone().count() > 0 && rendition.into_iter().all(|s| s == "S"));
    }

    #[test]
    fn groups_are_read_in_order_and_a_stalled_one_is_dropped() {
        let t0 = Instant::now();
        let mut order: GroupOrder<u32> = GroupOrder::new(t0);
        assert_eq!(order.advance(t0), None);
        // Group 2 overtakes group 1 on the wire: 1 is still read first.
        order.offer(2, 20).unwrap();
        order.offer(1, 10).unwrap();
        assert_eq!(order.advance(t0), Some((1, 10)));
        assert!(order.progressed(t0), "the first group is a backlog");
        // A newer group waits: the current one stalls after GROUP_STALL without progress.
        assert_eq!(order.stall_deadline(), Some(t0 + GROUP_STALL));
        let t1 = t0 + Duration::from_millis(300);
        assert!(order.progressed(t1));
        assert_eq!(order.stall_deadline(), Some(t1 + GROUP_STALL));
        assert_eq!(order.done(), Some((1, 10)));
        // A late copy of a group already read is refused.
        assert_eq!(order.offer(1, 11), Err(11));
        assert_eq!(order.advance(t1), Some((2, 20)));
        assert!(!order.progressed(t1), "later groups are live");
        assert_eq!(order.offer(2, 21), Err(21));
        assert_eq!(order.stall_deadline(), None, "nothing newer waits");
        order.offer(4, 40).unwrap();
        order.offer(3, 30).unwrap();
        let all: Vec<u32> = order.take_all().collect();
        assert_eq!(all, [20, 30, 40]);
        assert_eq!(order.advance(t1), None);
    }
}
