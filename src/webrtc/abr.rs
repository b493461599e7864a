//! Adaptive bitrate for WHEP viewers (`auto`), sans-IO: what the browser reports and the time
//! in; an estimate of the viewer's available bandwidth, a pacing rate, probe requests and the
//! rendition to play out. Three parts, each driven by its caller with explicit instants (the
//! tests run them on a virtual clock):
//!
//! - [`Bwe`], the estimator, lives in the viewer's media sender, which tells it every packet it
//!   sends (transport-wide sequence number, size, time) and every report that comes back.
//!   Transport-wide congestion control feedback (TWCC: the browser's arrival time of each
//!   packet) is the main signal; the sender writes the transport-cc header extension on every
//!   packet when the offer had it (Chrome's always does). From it:
//!   - *delay*: packets are grouped by send time (5 ms bursts); the growth of one-way delay
//!     between groups, accumulated and smoothed, goes through a least-squares trend over the
//!     last 20 groups (GCC's trendline, draft-ietf-rmcat-gcc §5.3, with a fixed threshold).
//!     Overuse is a rising trend *and* a queue (the smallest delay of the newest packets above
//!     the 30-second minimum) of at least [`QUEUE_OVERUSE`]: a queue that drains (after a
//!     keyframe's burst) or scheduling noise on a loaded host does not count;
//!   - *loss*: over [`LOSS_OVERUSE`] of the packets reported in the last half second;
//!   - *throughput*: the bytes that arrived over the last [`ACKED_WINDOW`] of arrival time.
//!
//!   On overuse the estimate falls to [`BACKOFF`] × the throughput that got through (what the
//!   path carries once it queues), at most once per [`DECREASE_INTERVAL`]. Otherwise it is never
//!   below what got through. It rises past what the viewer is sent only through a probe.
//!   Receiver reports add loss (their fraction lost), jitter and the round-trip time (from
//!   LSR/DLSR); without TWCC they are the only signal (loss over [`LOSS_OVERUSE`], or jitter
//!   over [`JITTER_OVERUSE`], is overuse; the sent rate stands in for the throughput). A REMB,
//!   when the browser sends one, caps the estimate.
//! - [`Controller`] picks the rung: rungs are ordered top first (the source, when it can be
//!   played as it is, then the ladder's rungs by height) with the bandwidth each needs (its
//!   measured video bitrate plus the audio's). Down is fast: on overuse, as soon as the estimate
//!   is below what the current rung needs, the target is the best rung that fits (several steps
//!   at once). Up is slow and proven first: after [`UP_HOLD`] without overuse and
//!   [`SWITCH_HOLD`] since the last switch, the controller asks for a *probe* at
//!   [`PROBE_HEADROOM`] × what the next rung up needs; only a probe that passes moves the
//!   target up, one rung at a time. A failed probe backs off (from [`PROBE_BACKOFF`], doubling
//!   to 8×).
//! - [`Switcher`] moves a viewer between rungs at keyframes only, on one RTP stream (see
//!   below).
//!
//! Why probe with padding: loss and delay show only that a path is full, never how much room
//! is left, and stepping up blind to find out would overload a full path, lose packets and
//! freeze the picture until the next keyframe, up to a group (2 s) later. A probe sends RTP
//! padding on the viewer's RTX stream (RFC 4588 SSRC, padding-only packets: the browser counts
//! and drops them; a lost one leaves no gap in the media stream and is never NACKed) so that
//! the viewer's whole stream runs at the next rung's rate plus headroom for [`PROBE_DURATION`];
//! TWCC then shows whether that got through without the delay trend rising or a queue forming
//! (a probe stops early when it does). Only then does the viewer step up. Without TWCC or RTX
//! nothing can be measured: such a viewer steps up only after [`BLIND_UP_HOLD`] without loss,
//! and comes down again by the loss-based rule if that was wrong.
//!
//! Switching (the [`Switcher`]): one RTP stream per viewer, the same SSRC, sequence numbers
//! that stay contiguous (the media sender numbers packets as they leave) and RTP timestamps
//! from the frames' pts, which the rungs share with the source: a switch is invisible on the
//! wire but for the new picture size. A switch waits for the *cut*, a source keyframe (a group
//! start: every rung has a keyframe at that pts, a little later in the log by its encoder's
//! delay); the old rung is played up to the cut, the new one from its keyframe at the cut
//! (SPS/PPS in band before it), held back until the old one has passed the cut so that no
//! frame is shown twice or out of order. So the browser decodes every frame it is given and
//! never shows a grey or broken picture. A cut whose keyframe never comes (the rung went away)
//! gives up after [`CUT_PATIENCE`] of the old rung's frames past it, and the viewer resumes at
//! the next keyframe.
//!
//! Guarantees: nothing here allocates after construction (the histories are fixed rings), and
//! nothing panics on any feedback (reports from a hostile browser included).

use std::time::{Duration, Instant};

// ---------------------------------------------------------------- estimator

/// Sent packets remembered for matching transport-wide feedback (a power of two).
const SENT_HISTORY: usize = 4096;
/// Packets of one send burst form one delay group.
const GROUP_SPAN_US: i64 = 5_000;
/// Delay groups in the trend.
const TREND_WINDOW: usize = 20;
/// Smoothing of the accumulated delay.
const TREND_SMOOTHING: f64 = 0.9;
/// The trend (scaled as GCC's: × min(groups, 60) × 4) above which delay counts as rising.
const TREND_THRESHOLD: f64 = 12.5;
/// The queue (smallest delay of the newest packets over the base) that a rising trend must
/// come with to be overuse.
pub(crate) const QUEUE_OVERUSE: Duration = Duration::from_millis(25);
/// The newest packets whose smallest delay is the queue, by send time.
const QUEUE_WINDOW_US: i64 = 30_000;
/// The base delay is the minimum over this many buckets of [`BASE_BUCKET_US`].
const BASE_BUCKETS: usize = 10;
const BASE_BUCKET_US: i64 = 3_000_000;
/// Loss above which the path counts as overused.
pub(crate) const LOSS_OVERUSE: f64 = 0.10;
/// Jitter (from receiver reports) above which a viewer without TWCC counts as overused.
pub(crate) const JITTER_OVERUSE: Duration = Duration::from_millis(40);
/// The window of arrival time over which throughput is measured.
pub(crate) const ACKED_WINDOW: Duration = Duration::from_millis(250);
/// The window of feedback over which loss is counted.
const LOSS_WINDOW: Duration = Duration::from_millis(500);
/// What the estimate falls to on overuse, as a share of the throughput.
pub(crate) const BACKOFF: f64 = 0.85;
/// The shortest interval between two decreases (the first must have had time to show).
pub(crate) const DECREASE_INTERVAL: Duration = Duration::from_millis(300);
/// How long after an overuse the path counts as congested: the pacer sends at the estimate.
pub(crate) const CONGESTED_FOR: Duration = Duration::from_secs(1);
/// The estimate before any feedback.
pub(crate) const START_ESTIMATE: u64 = 1_500_000;
/// The estimate never goes below this.
const MIN_ESTIMATE: u64 = 100_000;
/// The pacer's rate over the estimate when the path is not congested (bursts leave at 2.5×).
pub(crate) const PACE_FACTOR: f64 = 2.5;
/// How long a probe sends at its rate.
pub(crate) const PROBE_DURATION: Duration = Duration::from_millis(500);
/// The first part of a probe, not judged (a token bucket's burst would hide the limit).
const PROBE_SETTLE: Duration = Duration::from_millis(150);
/// A probe fails when the queue grows this much during it.
pub(crate) const PROBE_QUEUE: Duration = Duration::from_millis(25);
/// A probe whose feedback has not come this long after its end failed.
const PROBE_PATIENCE: Duration = Duration::from_secs(1);
/// A REMB older than this is forgotten.
const REMB_AGE: Duration = Duration::from_secs(5);

/// A fixed-capacity ring, oldest first; pushing onto a full one drops the oldest.
struct Ring<T> {
    buf: Box<[T]>,
    head: usize,
    len: usize,
}

impl<T: Copy + Default> Ring<T> {
    fn new(capacity: usize) -> Self {
        Self {
            buf: vec![T::default(); capacity].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    fn push(&mut self, v: T) {
        let n = self.buf.len();
        if self.len == n {
            self.buf[self.head] = v;
            self.head = (self.head + 1) % n;
        } else {
            self.buf[(self.head + self.len) % n] = v;
            self.len += 1;
        }
    }

    fn get(&self, i: usize) -> T {
        self.buf[(self.head + i) % self.buf.len()]
    }

    fn last(&self) -> Option<T> {
        self.len.checked_sub(1).map(|i| self.get(i))
    }

    /// Newest first.
    fn rev(&self) -> impl Iterator<Item = T> + '_ {
        (0..self.len).rev().map(|i| self.get(i))
    }
}

#[derive(Clone, Copy, Default)]
struct SentPacket {
    /// Transport-wide sequence number (to tell a stale slot).
    seq: u16,
    /// Send time, µs since the estimator's origin.
    at: i64,
    size: u32,
    valid: bool,
}

/// A delay group: packets sent within [`GROUP_SPAN_US`] of its first.
#[derive(Clone, Copy)]
struct Group {
    first_send: i64,
    last_send: i64,
    last_arrival: i64,
}

/// A running probe.
#[derive(Clone, Copy, Debug)]
struct Probe {
    rate: u64,
    start: Instant,
    /// Bytes sent since it started (media and padding).
    sent: u64,
    /// The queue when it started.
    queue_before: Option<i64>,
    /// The largest queue seen of packets sent during its judged part.
    queue_max: i64,
    /// Packets of its judged part reported, and of those lost.
    reported: u32,
    lost: u32,
    /// Overuse was seen during it.
    overuse: bool,
    /// The newest send time (µs) of its packets that feedback has reported.
    reported_until: i64,
}

/// What a probe came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeOutcome {
    /// The path carried the probe's rate: the estimate is at least that.
    Passed(u64),
    /// It did not (a queue, a rising delay or loss), or nothing could be learned.
    Failed,
}

/// One viewer's bandwidth estimator (see the module docs).
pub(crate) struct Bwe {
    origin: Instant,
    sent: Box<[SentPacket]>,
    next_seq: u16,
    /// Transport-wide feedback has been seen.
    twcc: bool,
    base: [i64; BASE_BUCKETS],
    base_at: i64,
    base_i: usize,
    /// (send µs, one-way delay µs, both clocks mixed) of received packets, as reported.
    delays: Ring<(i64, i64)>,
    group: Option<Group>,
    prev_group: Option<Group>,
    accumulated: f64,
    smoothed: f64,
    /// (arrival ms, smoothed accumulated delay ms) per group.
    trend: Ring<(f64, f64)>,
    trend_groups: u32,
    rising: u32,
    /// (arrival µs, bytes) of received packets.
    acked: Ring<(i64, u32)>,
    /// (µs when reported, received, lost) per feedback.
    losses: Ring<(i64, u32, u32)>,
    /// (µs, bytes) of what was sent, for the sent rate.
    sends: Ring<(i64, u32)>,
    estimate: u64,
    last_decrease: Option<Instant>,
    last_overuse: Option<Instant>,
    remb: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    rr_loss: Option<(f64, Instant)>,
    jitter: Option<Duration>,
    probe: Option<Probe>,
    outcome: Option<ProbeOutcome>,
}

impl Bwe {
    /// An estimator whose clock starts at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            origin: now,
            sent: vec![SentPacket::default(); SENT_HISTORY].into_boxed_slice(),
            next_seq: 0,
            twcc: false,
            base: [i64::MAX; BASE_BUCKETS],
            base_at: i64::MIN,
            base_i: 0,
            delays: Ring::new(512),
            group: None,
            prev_group: None,
            accumulated: 0.0,
            smoothed: 0.0,
            trend: Ring::new(TREND_WINDOW),
            trend_groups: 0,
            rising: 0,
            acked: Ring::new(1024),
            losses: Ring::new(64),
            sends: Ring::new(1024),
            estimate: START_ESTIMATE,
            last_decrease: None,
            last_overuse: None,
            remb: None,
            rtt: None,
            rr_loss: None,
            jitter: None,
            probe: None,
            outcome: None,
        }
    }

    fn us(&self, t: Instant) -> i64 {
        t.saturating_duration_since(self.origin).as_micros() as i64
    }

    /// The transport-wide sequence number for the next packet, which the caller sends now
    /// with `size` bytes on the wire.
    pub(crate) fn on_send(&mut self, size: usize, now: Instant) -> u16 {
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        let at = self.us(now);
        self.sent[usize::from(seq) % SENT_HISTORY] = SentPacket {
            seq,
            at,
            size: size as u32,
            valid: true,
        };
        self.sends.push((at, size as u32));
        if let Some(p) = &mut self.probe {
            p.sent += size as u64;
        }
        seq
    }

    /// A transport-wide feedback arrived: `reports` are its (sequence number, arrival µs on
    /// the browser's clock) in order, as [`super::rtcp::transport_cc`] yields them. (The same
    /// as [`Bwe::report`] for each, then [`Bwe::end_feedback`].)
    #[cfg(test)]
    pub(crate) fn on_transport_feedback(
        &mut self,
        reports: impl IntoIterator<Item = (u16, Option<i64>)>,
        now: Instant,
    ) {
        let mut counts = (0, 0);
        for (seq, arrival) in reports {
            self.report(seq, arrival, &mut counts);
        }
        self.end_feedback(counts, now);
    }

    /// One packet of a transport-wide feedback: its sequence number and arrival (µs on the
    /// browser's clock; `None`: lost). `counts` (received, lost) add up the feedback's packets
    /// for [`Bwe::end_feedback`].
    pub(crate) fn report(&mut self, seq: u16, arrival: Option<i64>, counts: &mut (u32, u32)) {
        self.twcc = true;
        let s = self.sent[usize::from(seq) % SENT_HISTORY];
        if !s.valid || s.seq != seq {
            return;
        }
        let probe_from = self
            .probe
            .map(|p| self.us(p.start + PROBE_SETTLE))
            .unwrap_or(i64::MAX);
        let in_probe = s.at >= probe_from;
        // The browser's clock as 24 bits of 64 ms and 16-bit deltas can say no more.
        let arrival = arrival.filter(|a| (-(1 << 50)..1 << 50).contains(a));
        let Some(arrival) = arrival else {
            counts.1 += 1;
            if in_probe && let Some(p) = &mut self.probe {
                p.reported += 1;
                p.lost += 1;
                p.reported_until = p.reported_until.max(s.at);
            }
            return;
        };
        counts.0 += 1;
        self.acked.push((arrival, s.size));
        let owd = arrival - s.at;
        self.note_base(s.at, owd);
        self.delays.push((s.at, owd));
        self.group_packet(s.at, arrival);
        if in_probe {
            let queue = owd - self.base();
            if let Some(p) = &mut self.probe {
                p.reported += 1;
                p.queue_max = p.queue_max.max(queue);
                p.reported_until = p.reported_until.max(s.at);
            }
        }
    }

    /// The end of a transport-wide feedback whose packets [`Bwe::report`] counted.
    pub(crate) fn end_feedback(&mut self, (received, lost): (u32, u32), now: Instant) {
        self.twcc = true;
        let t = self.us(now);
        self.losses.push((t, received, lost));
        let (delay, loss) = (self.delay_overuse(), self.loss());
        let overuse = delay || loss > LOSS_OVERUSE;
        if overuse {
            tracing::debug!(
                queue_ms = self.queue().unwrap_or(0) / 1000,
                rising = self.rising,
                loss,
                acked = self.acked_rate(ACKED_WINDOW),
                estimate = self.estimate,
                "WHEP viewer's path overused"
            );
        }
        self.after_feedback(overuse, now);
    }

    /// A receiver report block about one of the viewer's streams: its fraction lost (1/256),
    /// jitter (µs) and, where it names one of our sender reports, the round-trip time.
    pub(crate) fn on_receiver_report(
        &mut self,
        fraction_lost: u8,
        jitter: Duration,
        rtt: Option<Duration>,
        now: Instant,
    ) {
        let loss = f64::from(fraction_lost) / 256.0;
        self.rr_loss = Some((loss, now));
        self.jitter = Some(jitter);
        if rtt.is_some() {
            self.rtt = rtt;
        }
        if !self.twcc {
            // The only signal: the sent rate stands in for the throughput.
            let overuse = loss > LOSS_OVERUSE || jitter > JITTER_OVERUSE;
            self.after_feedback(overuse, now);
        } else if loss > LOSS_OVERUSE {
            self.after_feedback(true, now);
        }
    }

    /// A REMB: the browser's own estimate, a cap on ours.
    pub(crate) fn on_remb(&mut self, bps: u64, now: Instant) {
        self.remb = Some((bps, now));
    }

    fn after_feedback(&mut self, overuse: bool, now: Instant) {
        let throughput = if self.twcc {
            // What got through: over a short window once the path queues (it carries no more
            // than its rate then), over a longer one otherwise (bursts average out).
            self.acked_rate(if overuse {
                ACKED_WINDOW
            } else {
                ACKED_WINDOW * 2
            })
        } else {
            self.sent_rate(now, Duration::from_secs(1))
        };
        if overuse {
            self.last_overuse = Some(now);
            if let Some(p) = &mut self.probe {
                p.overuse = true;
            }
            // The decrease must have had a round trip to show.
            let interval = DECREASE_INTERVAL.max(self.rtt.unwrap_or_default());
            if self
                .last_decrease
                .is_none_or(|t| now.duration_since(t) >= interval)
            {
                let lower = match throughput {
                    Some(bps) => (bps as f64 * BACKOFF) as u64,
                    None => (self.estimate as f64 * 0.7) as u64,
                };
                self.estimate = self.estimate.min(lower).max(MIN_ESTIMATE);
                self.last_decrease = Some(now);
            }
        } else if let Some(bps) = throughput
            && !self.congested(now)
        {
            self.estimate = self.estimate.max(bps);
        }
        self.judge_probe(now);
    }

    /// The base one-way delay: the minimum over the last 30 s of send time.
    fn base(&self) -> i64 {
        self.base.iter().copied().min().unwrap_or(i64::MAX)
    }

    fn note_base(&mut self, sent: i64, owd: i64) {
        if self.base_at == i64::MIN || sent - self.base_at >= BASE_BUCKET_US {
            self.base_i = (self.base_i + 1) % BASE_BUCKETS;
            self.base[self.base_i] = owd;
            self.base_at = sent;
        } else {
            self.base[self.base_i] = self.base[self.base_i].min(owd);
        }
    }

    /// The queue now: the smallest delay over the base of the packets sent in the newest
    /// [`QUEUE_WINDOW_US`] that were reported.
    fn queue(&self) -> Option<i64> {
        let (newest, _) = self.delays.last()?;
        let base = self.base();
        self.delays
            .rev()
            .take_while(|(s, _)| newest - s <= QUEUE_WINDOW_US)
            .map(|(_, d)| d - base)
            .min()
    }

    fn group_packet(&mut self, sent: i64, arrival: i64) {
        match &mut self.group {
            Some(g) if sent - g.first_send <= GROUP_SPAN_US && sent >= g.first_send => {
                g.last_send = g.last_send.max(sent);
                g.last_arrival = g.last_arrival.max(arrival);
            }
            _ => {
                if let Some(done) = self.group.take() {
                    self.close_group(done);
                }
                self.group = Some(Group {
                    first_send: sent,
                    last_send: sent,
                    last_arrival: arrival,
                });
            }
        }
    }

    fn close_group(&mut self, g: Group) {
        let Some(prev) = self.prev_group.replace(g) else {
            return;
        };
        let arrival_delta = g.last_arrival - prev.last_arrival;
        let send_delta = g.last_send - prev.last_send;
        if arrival_delta < 0 || send_delta < 0 {
            // Reordered: not a delay sample.
            return;
        }
        let d_ms = (arrival_delta - send_delta) as f64 / 1000.0;
        self.accumulated += d_ms;
        self.smoothed =
            TREND_SMOOTHING * self.smoothed + (1.0 - TREND_SMOOTHING) * self.accumulated;
        self.trend
            .push((g.last_arrival as f64 / 1000.0, self.smoothed));
        self.trend_groups = self.trend_groups.saturating_add(1);
        let slope = self.slope();
        let modified = slope * f64::from(self.trend_groups.min(60)) * 4.0;
        if modified > TREND_THRESHOLD {
            self.rising = self.rising.saturating_add(1);
        } else {
            self.rising = 0;
        }
    }

    /// Least-squares slope of the smoothed accumulated delay over arrival time.
    fn slope(&self) -> f64 {
        let n = self.trend.len;
        if n < 5 {
            return 0.0;
        }
        let (mut sx, mut sy) = (0.0, 0.0);
        for (x, y) in self.trend.rev() {
            sx += x;
            sy += y;
        }
        let (mx, my) = (sx / n as f64, sy / n as f64);
        let (mut num, mut den) = (0.0, 0.0);
        for (x, y) in self.trend.rev() {
            num += (x - mx) * (y - my);
            den += (x - mx) * (x - mx);
        }
        if den == 0.0 { 0.0 } else { num / den }
    }

    /// Delay overuse: a rising trend (two groups in a row) with a queue behind it, or a queue
    /// twice as long that grew over the last 90 ms of sends (faster where the path is so
    /// narrow that few groups arrive).
    fn delay_overuse(&self) -> bool {
        let Some(q) = self.queue() else {
            return false;
        };
        let threshold = QUEUE_OVERUSE.as_micros() as i64;
        (self.rising >= 2 && q >= threshold) || (q >= 2 * threshold && self.queue_grew(q))
    }

    /// Whether the queue was shorter (by 10 ms) for the packets sent 30 to 90 ms before the
    /// newest reported.
    fn queue_grew(&self, now: i64) -> bool {
        let Some((newest, _)) = self.delays.last() else {
            return false;
        };
        let base = self.base();
        self.delays
            .rev()
            .skip_while(|(s, _)| newest - s <= QUEUE_WINDOW_US)
            .take_while(|(s, _)| newest - s <= 3 * QUEUE_WINDOW_US)
            .map(|(_, d)| d - base)
            .min()
            .is_some_and(|before| before + 10_000 < now)
    }

    /// The share of packets reported lost over the last [`LOSS_WINDOW`] of feedback (0 with
    /// fewer than 20 reported).
    fn loss(&self) -> f64 {
        let Some((newest, _, _)) = self.losses.last() else {
            return 0.0;
        };
        let window = LOSS_WINDOW.as_micros() as i64;
        let (r, l) = self
            .losses
            .rev()
            .take_while(|(t, _, _)| newest - t <= window)
            .fold((0u32, 0u32), |(r, l), (_, a, b)| (r + a, l + b));
        if r + l < 20 {
            0.0
        } else {
            f64::from(l) / f64::from(r + l)
        }
    }

    /// Bits per second that arrived over the last `window` of arrival time (`None` when that
    /// is too little to tell).
    fn acked_rate(&self, window: Duration) -> Option<u64> {
        let (newest, _) = self.acked.last()?;
        let window = window.as_micros() as i64;
        let (mut bytes, mut oldest, mut first_size, mut n) = (0u64, newest, 0u32, 0);
        for (at, size) in self.acked.rev() {
            if newest - at > window {
                break;
            }
            bytes += u64::from(size);
            oldest = at;
            first_size = size;
            n += 1;
        }
        let span = newest - oldest;
        if n < 5 || span < window / 2 {
            return None;
        }
        Some((bytes - u64::from(first_size)) * 8 * 1_000_000 / span as u64)
    }

    /// Bits per second sent over the last `window`.
    fn sent_rate(&self, now: Instant, window: Duration) -> Option<u64> {
        let t = self.us(now);
        let w = window.as_micros() as i64;
        let bytes: u64 = self
            .sends
            .rev()
            .take_while(|(at, _)| t - at <= w)
            .map(|(_, s)| u64::from(s))
            .sum();
        (bytes > 0).then(|| bytes * 8 * 1_000_000 / w as u64)
    }

    /// Whether the path was overused within [`CONGESTED_FOR`].
    pub(crate) fn congested(&self, now: Instant) -> bool {
        self.last_overuse
            .is_some_and(|t| now.duration_since(t) < CONGESTED_FOR)
    }

    /// When the path was last overused.
    pub(crate) fn last_overuse(&self) -> Option<Instant> {
        self.last_overuse
    }

    /// The estimate, bits per second (capped by a recent REMB).
    pub(crate) fn estimate(&self, now: Instant) -> u64 {
        match self.remb {
            Some((bps, at)) if now.duration_since(at) < REMB_AGE => self.estimate.min(bps),
            _ => self.estimate,
        }
    }

    /// The rate the pacer sends video at: the estimate while congested, [`PACE_FACTOR`] × it
    /// otherwise.
    pub(crate) fn pacing_rate(&self, now: Instant) -> u64 {
        let e = self.estimate(now);
        if self.congested(now) {
            e
        } else {
            (e as f64 * PACE_FACTOR) as u64
        }
    }

    /// Whether transport-wide feedback has been seen (probes can be judged).
    pub(crate) fn has_transport_feedback(&self) -> bool {
        self.twcc
    }

    /// Starts a probe at `rate` bits per second (the viewer's whole stream); replaces one that
    /// runs.
    pub(crate) fn start_probe(&mut self, rate: u64, now: Instant) {
        self.outcome = None;
        self.probe = Some(Probe {
            rate,
            start: now,
            sent: 0,
            queue_before: self.queue(),
            queue_max: i64::MIN,
            reported: 0,
            lost: 0,
            overuse: false,
            reported_until: i64::MIN,
        });
    }

    /// Whether a probe runs.
    pub(crate) fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// Bytes of padding to send now for the running probe to keep its rate (0 when none
    /// runs, or it is over).
    pub(crate) fn padding_wanted(&self, now: Instant) -> usize {
        let Some(p) = &self.probe else {
            return 0;
        };
        let elapsed = now.saturating_duration_since(p.start);
        if elapsed >= PROBE_DURATION || p.overuse {
            return 0;
        }
        // Up to 10 ms ahead, so a tick's padding leaves in one burst.
        let due =
            (p.rate as f64 * (elapsed + Duration::from_millis(10)).as_secs_f64() / 8.0) as u64;
        due.saturating_sub(p.sent) as usize
    }

    /// The outcome of the last probe, once (see [`ProbeOutcome`]).
    pub(crate) fn take_probe_outcome(&mut self) -> Option<ProbeOutcome> {
        self.outcome.take()
    }

    fn judge_probe(&mut self, now: Instant) {
        let Some(p) = self.probe else {
            return;
        };
        let end = p.start + PROBE_DURATION;
        let grew = |q: i64| q - p.queue_before.unwrap_or(0).max(0);
        let failed = p.overuse
            || (p.queue_max != i64::MIN && grew(p.queue_max) > PROBE_QUEUE.as_micros() as i64)
            || (p.reported >= 10 && f64::from(p.lost) / f64::from(p.reported) > 0.05);
        let done = p.reported_until >= self.us(end) - 20_000;
        let outcome = if failed {
            ProbeOutcome::Failed
        } else if done && p.reported >= 10 {
            ProbeOutcome::Passed(p.rate)
        } else if now >= end + PROBE_PATIENCE {
            ProbeOutcome::Failed
        } else {
            return;
        };
        if let ProbeOutcome::Passed(rate) = outcome {
            self.estimate = self.estimate.max(rate);
        }
        self.probe = None;
        self.outcome = Some(outcome);
    }

    /// Time passes without feedback (a probe whose feedback never comes fails).
    pub(crate) fn poll(&mut self, now: Instant) {
        self.judge_probe(now);
    }
}

// ---------------------------------------------------------------- controller

/// How long after an overuse before stepping up is considered.
pub(crate) const UP_HOLD: Duration = Duration::from_secs(4);
/// How long after a switch before the next step up is considered.
pub(crate) const SWITCH_HOLD: Duration = Duration::from_secs(2);
/// A probe runs at this × what the next rung up needs.
pub(crate) const PROBE_HEADROOM: f64 = 1.25;
/// The wait after a failed probe (doubling up to 8× after each further failure).
pub(crate) const PROBE_BACKOFF: Duration = Duration::from_secs(4);
/// Without TWCC (no probing): how long without overuse before a blind step up.
pub(crate) const BLIND_UP_HOLD: Duration = Duration::from_secs(15);

/// What the estimator tells the controller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signals {
    /// The estimate, bits per second.
    pub(crate) estimate: u64,
    /// The last overuse.
    pub(crate) last_overuse: Option<Instant>,
    /// Probes can be judged (transport-wide feedback and an RTX stream).
    pub(crate) can_probe: bool,
    /// A probe runs.
    pub(crate) probing: bool,
    /// The outcome of a probe that just ended.
    pub(crate) outcome: Option<ProbeOutcome>,
}

/// What the controller wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    /// The rung to play (an index into the needs, 0 the top).
    pub(crate) target: usize,
    /// Start a probe at this many bits per second.
    pub(crate) probe: Option<u64>,
}

/// Picks a viewer's rung (see the module docs).
#[derive(Debug)]
pub(crate) struct Controller {
    start: Instant,
    last_switch: Option<Instant>,
    next_probe: Instant,
    backoff: Duration,
}

impl Controller {
    /// A controller for a viewer that starts at `now`.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            start: now,
            last_switch: None,
            next_probe: now,
            backoff: PROBE_BACKOFF,
        }
    }

    /// The rung to start with: the best one that fits `estimate` (the lowest when none does).
    pub(crate) fn fit(needs: &[u64], estimate: u64) -> usize {
        needs
            .iter()
            .position(|&n| n <= estimate)
            .unwrap_or(needs.len().saturating_sub(1))
    }

    /// The viewer now plays a different rung.
    pub(crate) fn switched(&mut self, now: Instant) {
        self.last_switch = Some(now);
    }

    /// What to do now, the viewer playing (or about to play) rung `current` of `needs`
    /// (bits per second each rung needs, top first).
    pub(crate) fn decide(
        &mut self,
        now: Instant,
        s: &Signals,
        needs: &[u64],
        current: usize,
    ) -> Decision {
        let mut d = Decision {
            target: current.min(needs.len().saturating_sub(1)),
            probe: None,
        };
        if needs.is_empty() {
            return d;
        }
        let current = d.target;
        let recent_overuse = s
            .last_overuse
            .is_some_and(|t| now.duration_since(t) < UP_HOLD);
        // Down: fast, as far as needed.
        if recent_overuse && s.estimate < needs[current] {
            d.target = Self::fit(needs, s.estimate).max(current);
            return d;
        }
        match s.outcome {
            Some(ProbeOutcome::Passed(_)) => self.backoff = PROBE_BACKOFF,
            Some(ProbeOutcome::Failed) => {
                self.next_probe = now + self.backoff;
                self.backoff = (self.backoff * 2).min(PROBE_BACKOFF * 8);
            }
            None => {}
        }
        if current == 0 || recent_overuse {
            return d;
        }
        let since_switch = now.duration_since(self.last_switch.unwrap_or(self.start));
        if since_switch < SWITCH_HOLD {
            return d;
        }
        let up = current - 1;
        if s.estimate >= needs[up] {
            // One rung per SWITCH_HOLD: the next step waits as after a switch.
            self.last_switch = Some(now);
            d.target = up;
        } else if !s.can_probe {
            let quiet = now.duration_since(s.last_overuse.unwrap_or(self.start).max(self.start));
            if quiet >= BLIND_UP_HOLD && since_switch >= BLIND_UP_HOLD {
                self.last_switch = Some(now);
                d.target = up;
            }
        } else if !s.probing && now >= self.next_probe {
            d.probe = Some((needs[up] as f64 * PROBE_HEADROOM) as u64);
        }
        d
    }
}

// ---------------------------------------------------------------- switcher

/// A cut whose new keyframe has not come after the old rung went this far past it is given
/// up.
pub(crate) const CUT_PATIENCE: Duration = Duration::from_secs(1);
/// The most frames of the new rung held back for the old one to reach the cut.
pub(crate) const MAX_HELD: usize = 30;

/// What to do with one video frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Send it.
    Send,
    /// Not for this viewer (another rung, or before a keyframe).
    Skip,
    /// Keep it: [`Switcher::take_held`] hands it back when the switch completes.
    Hold,
}

/// What happened to the switch with the last frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Nothing.
    None,
    /// The viewer now plays `to` (`from` before, `None` at the start): frames queued for the
    /// old one and not sent yet are no longer wanted; the held frames go out first.
    Switched {
        /// The rung played before.
        from: Option<u8>,
        /// The rung played now.
        to: u8,
    },
    /// The switch was given up; the viewer resumes at the next keyframe of its rung.
    GaveUp,
}

/// A viewer's rung changes at keyframes (see the module docs). Tracks are named by `u8` ids
/// (the hub's track ids); `T` is what a held frame is (the hub entry).
#[derive(Debug)]
pub(crate) struct Switcher<T> {
    current: Option<u8>,
    /// The pts of the last frame sent.
    sent_pts: Option<i64>,
    target: Option<u8>,
    cut: Option<i64>,
    /// The current rung has passed the cut.
    current_done: bool,
    held: Vec<T>,
    /// After a skip or giving up: the current rung resumes at its next keyframe.
    await_key: bool,
}

impl<T> Switcher<T> {
    /// A switcher that plays nothing yet.
    pub(crate) fn new() -> Self {
        Self {
            current: None,
            sent_pts: None,
            target: None,
            cut: None,
            current_done: false,
            held: Vec::with_capacity(MAX_HELD),
            await_key: true,
        }
    }

    /// The rung played (the one switched from while a switch is under way).
    pub(crate) fn current(&self) -> Option<u8> {
        self.current
    }

    /// The rung asked for: where the viewer is going (or is).
    pub(crate) fn target(&self) -> Option<u8> {
        self.target.or(self.current)
    }

    /// Asks for rung `track`; a switch under way to another rung is replaced (its held frames
    /// dropped; the current rung resumes at its next keyframe if it was cut already).
    pub(crate) fn request(&mut self, track: u8) {
        if self.target() == Some(track) {
            return;
        }
        if self.current_done {
            self.await_key = true;
        }
        self.held.clear();
        self.cut = None;
        self.current_done = false;
        self.target = (self.current != Some(track)).then_some(track);
        if self.current.is_none() {
            self.target = Some(track);
        }
    }

    /// The viewer fell behind (frames were skipped): resume at the next keyframe.
    pub(crate) fn skipped(&mut self) {
        self.await_key = true;
        self.held.clear();
        self.cut = None;
        self.current_done = false;
    }

    /// The frames held for a completed switch, in order; send them.
    pub(crate) fn take_held(&mut self) -> std::vec::Drain<'_, T> {
        self.held.drain(..)
    }

    /// One video frame of `track` at `pts`; `group_start` marks a source keyframe (the cut of
    /// every rung). `item` is kept when the verdict is [`Verdict::Hold`].
    pub(crate) fn frame(
        &mut self,
        track: u8,
        pts: i64,
        keyframe: bool,
        group_start: bool,
        item: impl FnOnce() -> T,
    ) -> (Verdict, Event) {
        let Some(target) = self.target else {
            return (self.steady(track, pts, keyframe), Event::None);
        };
        let Some(current) = self.current.filter(|_| !self.await_key) else {
            // Nothing plays (the start, or after a skip): the target's first keyframe starts it.
            if track == target && keyframe {
                let from = self.current;
                self.finish(target, pts);
                return (Verdict::Send, Event::Switched { from, to: target });
            }
            return (Verdict::Skip, Event::None);
        };
        // The cut: the first source keyframe (or target keyframe) past what was sent.
        if self.cut.is_none()
            && (group_start || (track == target && keyframe))
            && self.sent_pts.is_none_or(|s| pts > s)
        {
            self.cut = Some(pts);
        }
        let Some(cut) = self.cut else {
            return (self.steady(track, pts, keyframe), Event::None);
        };
        if track == current {
            if pts < cut {
                self.sent_pts = Some(pts);
                return (Verdict::Send, Event::None);
            }
            self.current_done = true;
            if !self.held.is_empty() {
                return (Verdict::Skip, self.complete(current, target));
            }
            if pts - cut > CUT_PATIENCE.as_micros() as i64 {
                // The target's keyframe at the cut never came.
                self.target = None;
                self.cut = None;
                self.current_done = false;
                self.await_key = true;
                return (Verdict::Skip, Event::GaveUp);
            }
            return (Verdict::Skip, Event::None);
        }
        if track != target || pts < cut || (self.held.is_empty() && !keyframe) {
            return (Verdict::Skip, Event::None);
        }
        if self.current_done || self.held.len() >= MAX_HELD {
            if self.held.is_empty() {
                let from = self.current;
                self.finish(target, pts);
                return (Verdict::Send, Event::Switched { from, to: target });
            }
            self.held.push(item());
            return (Verdict::Hold, self.complete(current, target));
        }
        self.held.push(item());
        (Verdict::Hold, Event::None)
    }

    /// No switch under way: the current rung's frames go (from a keyframe after a skip).
    fn steady(&mut self, track: u8, pts: i64, keyframe: bool) -> Verdict {
        if Some(track) != self.current {
            return Verdict::Skip;
        }
        if self.await_key {
            if !keyframe {
                return Verdict::Skip;
            }
            self.await_key = false;
        }
        self.sent_pts = Some(pts);
        Verdict::Send
    }

    fn complete(&mut self, from: u8, to: u8) -> Event {
        // The held frames are sent by the caller (take_held), the newest one last.
        self.current = Some(to);
        self.target = None;
        self.cut = None;
        self.current_done = false;
        self.await_key = false;
        Event::Switched {
            from: Some(from),
            to,
        }
    }

    fn finish(&mut self, to: u8, pts: i64) {
        self.current = Some(to);
        self.target = None;
        self.cut = None;
        self.current_done = false;
        self.await_key = false;
        self.sent_pts = Some(pts);
    }

    /// Records the pts of a held frame sent after a switch.
    pub(crate) fn sent(&mut self, pts: i64) {
        self.sent_pts = Some(self.sent_pts.map_or(pts, |s| s.max(pts)));
    }
}

// ---------------------------------------------------------------- rate meter

/// A track's bitrate from its frames' sizes and pts, over windows of a second.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RateMeter {
    window_start: Option<i64>,
    bytes: u64,
    bps: u64,
}

impl RateMeter {
    /// A frame of `bytes` at `pts` (µs).
    pub(crate) fn add(&mut self, pts: i64, bytes: usize) {
        let start = *self.window_start.get_or_insert(pts);
        let span = pts - start;
        if !(0..=10_000_000).contains(&span) {
            // A jump: start again.
            self.window_start = Some(pts);
            self.bytes = bytes as u64;
            return;
        }
        if span >= 1_000_000 {
            self.bps = self.bytes * 8 * 1_000_000 / span as u64;
            self.window_start = Some(pts);
            self.bytes = 0;
        }
        self.bytes += bytes as u64;
    }

    /// Bits per second over the last whole window (0 before one).
    pub(crate) fn bps(&self) -> u64 {
        self.bps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A simulated path: a bottleneck of `rate` bits per second with a FIFO queue (no loss
    /// below `buffer` of queueing delay, drops above), and the browser's transport-wide
    /// feedback every 50 ms. Time is virtual.
    struct Path {
        rate: u64,
        buffer: Duration,
        /// When the bottleneck is free again (ms since t0, fractional).
        free_at: f64,
        /// (seq, arrival µs) not yet reported.
        pending: Vec<(u16, Option<i64>)>,
        last_feedback: f64,
    }

    impl Path {
        fn new(rate: u64) -> Self {
            Self {
                rate,
                buffer: Duration::from_secs(1),
                free_at: 0.0,
                pending: Vec::new(),
                last_feedback: 0.0,
            }
        }

        /// A packet of `size` bytes sent at `t` ms.
        fn send(&mut self, seq: u16, size: usize, t: f64) {
            let start = self.free_at.max(t);
            if start - t > self.buffer.as_secs_f64() * 1000.0 {
                self.pending.push((seq, None));
                return;
            }
            let done = start + size as f64 * 8.0 / self.rate as f64 * 1000.0;
            self.free_at = done;
            // 5 ms of propagation; the browser's clock is off by 1 s.
            self.pending
                .push((seq, Some(((done + 5.0) * 1000.0) as i64 + 1_000_000)));
        }

        /// Feedback due at `t` ms: what has arrived by then.
        fn feedback(&mut self, t: f64) -> Option<Vec<(u16, Option<i64>)>> {
            if t - self.last_feedback < 50.0 {
                return None;
            }
            self.last_feedback = t;
            let arrived = |a: &Option<i64>| a.is_none_or(|a| (a - 1_000_000) as f64 / 1000.0 <= t);
            let n = self.pending.iter().take_while(|(_, a)| arrived(a)).count();
            Some(self.pending.drain(..n).collect())
        }
    }

    /// A viewer's sender at `video_bps` (30 fps frames of 1,100-byte packets) plus 20 ms audio
    /// packets of 160 bytes, through `path`, for `ms` milliseconds from `from` ms; the
    /// estimator's estimate every 100 ms.
    fn run(
        bwe: &mut Bwe,
        path: &mut Path,
        t0: Instant,
        from: u64,
        ms: u64,
        mut video_bps: impl FnMut(u64) -> u64,
    ) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut owed = 0.0f64;
        for t in from..from + ms {
            let now = t0 + Duration::from_millis(t);
            if t % 20 == 0 {
                let seq = bwe.on_send(160, now);
                path.send(seq, 160, t as f64);
            }
            if t % 33 == 0 {
                owed += video_bps(t) as f64 / 8.0 / 30.0;
                // Paced: what the pacer lets out now, the rest stays (an unbounded queue).
                while owed >= 1100.0 {
                    let seq = bwe.on_send(1100, now);
                    path.send(seq, 1100, t as f64);
                    owed -= 1100.0;
                }
            }
            let pad = bwe.padding_wanted(now);
            let mut left = pad;
            while left > 0 {
                let n = left.min(280);
                let seq = bwe.on_send(n, now);
                path.send(seq, n, t as f64);
                left -= n;
            }
            if let Some(fb) = path.feedback(t as f64) {
                bwe.on_transport_feedback(fb, now);
            }
            bwe.poll(now);
            if t % 100 == 0 {
                out.push((t, bwe.estimate(now)));
            }
        }
        out
    }

    #[test]
    fn an_unlimited_path_keeps_the_estimate_at_what_is_sent_and_no_overuse() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        let mut path = Path::new(100_000_000);
        let est = run(&mut bwe, &mut path, t0, 0, 5_000, |_| 2_800_000);
        let now = t0 + Duration::from_secs(5);
        assert!(bwe.last_overuse().is_none());
        assert!(!bwe.congested(now));
        // What is sent (2.8 Mbit/s of video and 64 kbit/s of audio) got through.
        let last = est.last().unwrap().1;
        assert!((2_700_000..3_300_000).contains(&last), "{est:?}");
    }

    #[test]
    fn a_cut_is_seen_within_half_a_second_and_the_estimate_falls_below_the_new_rate() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        let mut path = Path::new(100_000_000);
        run(&mut bwe, &mut path, t0, 0, 3_000, |_| 2_800_000);
        assert!(bwe.last_overuse().is_none());
        path.rate = 600_000;
        // The sender keeps sending 2.8 Mbit/s until told otherwise.
        let mut first = None;
        for ms in (3_000..4_000).step_by(10) {
            run(&mut bwe, &mut path, t0, ms, 10, |_| 2_800_000);
            first = first.or(bwe.last_overuse());
        }
        let seen = first.expect("overuse seen");
        let after = seen.duration_since(t0 + Duration::from_secs(3));
        assert!(after < 500 * MS, "seen {after:?} after the cut");
        let now = t0 + Duration::from_secs(4);
        assert!(bwe.congested(now));
        let e = bwe.estimate(now);
        assert!((300_000..=600_000).contains(&e), "estimate {e}");
        assert_eq!(bwe.pacing_rate(now), e, "congested: paced at the estimate");
    }

    #[test]
    fn a_keyframe_burst_through_a_narrow_path_keeps_the_estimate_near_the_paths_rate() {
        // 400 kbit/s with a 20 kB keyframe every 2 s, on a 600 kbit/s path: the burst queues
        // and drains. It may read as overuse, but the estimate stays what the path carries, so
        // a rung that fits is kept.
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        let mut path = Path::new(600_000);
        let mut last_key = 0;
        let mut video = |t: u64| {
            if t >= last_key + 2000 {
                last_key = t;
                20_000 * 8 * 30
            } else {
                400_000
            }
        };
        let mut est = Vec::new();
        for s in 0..10 {
            est.extend(run(&mut bwe, &mut path, t0, s * 1000, 1000, &mut video));
        }
        let e = bwe.estimate(t0 + Duration::from_secs(10));
        assert!((480_000..=700_000).contains(&e), "estimates {est:?}");
    }

    #[test]
    fn loss_alone_is_overuse() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        let now = t0 + Duration::from_secs(1);
        for s in 0..100u16 {
            bwe.on_send(1000, now);
            let _ = s;
        }
        // 30% lost, no delay.
        let fb: Vec<_> = (0..100u16)
            .map(|s| (s, (s % 10 >= 3).then_some(i64::from(s) * 100)))
            .collect();
        bwe.on_transport_feedback(fb, now + 50 * MS);
        assert!(bwe.congested(now + 60 * MS));
    }

    #[test]
    fn receiver_reports_alone_drive_a_viewer_without_transport_feedback() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        for t in 0..1000 {
            bwe.on_send(1000, t0 + Duration::from_millis(t));
        }
        let now = t0 + Duration::from_secs(1);
        bwe.on_receiver_report(2, Duration::from_millis(5), Some(20 * MS), now);
        assert!(!bwe.congested(now));
        assert_eq!(bwe.rtt, Some(20 * MS));
        // 8 Mbit/s sent, none lost: the estimate follows what was sent.
        assert!(bwe.estimate(now) >= 7_000_000, "{}", bwe.estimate(now));
        bwe.on_receiver_report(64, Duration::from_millis(5), None, now + 10 * MS);
        assert!(bwe.congested(now + 10 * MS));
        assert!(bwe.estimate(now) < 7_000_000);
        // A REMB caps the estimate.
        bwe.on_remb(300_000, now);
        assert_eq!(bwe.estimate(now + 10 * MS), 300_000);
        assert!(bwe.estimate(now + REMB_AGE * 2) > 300_000);
        assert!(!bwe.has_transport_feedback());
    }

    #[test]
    fn a_probe_passes_on_a_wide_path_and_fails_on_a_narrow_one() {
        for (capacity, passes) in [(10_000_000, true), (1_000_000, false)] {
            let t0 = Instant::now();
            let mut bwe = Bwe::new(t0);
            let mut path = Path::new(capacity);
            run(&mut bwe, &mut path, t0, 0, 2_000, |_| 500_000);
            let now = t0 + Duration::from_secs(2);
            bwe.start_probe(2_000_000, now);
            assert!(bwe.probing());
            assert!(bwe.padding_wanted(now) > 0);
            run(&mut bwe, &mut path, t0, 2_000, 2_000, |_| 500_000);
            let outcome = bwe.take_probe_outcome();
            assert!(!bwe.probing());
            if passes {
                assert_eq!(outcome, Some(ProbeOutcome::Passed(2_000_000)));
                assert!(bwe.estimate(t0 + Duration::from_secs(4)) >= 2_000_000);
            } else {
                assert_eq!(outcome, Some(ProbeOutcome::Failed), "{capacity}");
                assert!(bwe.estimate(t0 + Duration::from_secs(4)) < 2_000_000);
            }
            assert_eq!(bwe.padding_wanted(t0 + Duration::from_secs(4)), 0);
        }
    }

    #[test]
    fn a_probe_without_feedback_fails() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        bwe.start_probe(1_000_000, t0);
        bwe.poll(t0 + PROBE_DURATION + PROBE_PATIENCE);
        assert_eq!(bwe.take_probe_outcome(), Some(ProbeOutcome::Failed));
    }

    #[test]
    fn hostile_feedback_changes_nothing_it_should_not() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        // Reports of packets never sent, absurd arrival times: ignored.
        bwe.on_transport_feedback([(5u16, Some(i64::MAX)), (6, Some(i64::MIN)), (7, None)], t0);
        assert_eq!(bwe.estimate(t0), START_ESTIMATE);
        bwe.on_send(1000, t0);
        bwe.on_transport_feedback([(0u16, Some(i64::MAX)), (0, Some(i64::MIN))], t0);
        bwe.on_receiver_report(255, Duration::MAX, Some(Duration::MAX), t0);
        bwe.on_remb(0, t0);
        assert_eq!(bwe.estimate(t0), 0);
    }

    // ---- controller, on a virtual clock

    /// 720p, 480p, 360p, 240p as the default ladder's rungs need them with audio.
    const NEEDS: [u64; 4] = [3_000_000, 1_500_000, 900_000, 480_000];

    fn signals(estimate: u64, last_overuse: Option<Instant>) -> Signals {
        Signals {
            estimate,
            last_overuse,
            can_probe: true,
            probing: false,
            outcome: None,
        }
    }

    #[test]
    fn down_is_immediate_and_as_far_as_needed() {
        let t0 = Instant::now();
        let mut c = Controller::new(t0);
        let now = t0 + Duration::from_secs(30);
        let d = c.decide(now, &signals(500_000, Some(now)), &NEEDS, 0);
        assert_eq!(
            d,
            Decision {
                target: 3,
                probe: None
            }
        );
        // Overuse that still leaves room for the rung played: stay.
        let d = c.decide(now, &signals(3_200_000, Some(now)), &NEEDS, 0);
        assert_eq!(d.target, 0);
        // Never up on overuse.
        let d = c.decide(now, &signals(5_000_000, Some(now)), &NEEDS, 2);
        assert_eq!(d.target, 2);
    }

    #[test]
    fn up_waits_probes_and_steps_one_rung() {
        let t0 = Instant::now();
        let mut c = Controller::new(t0);
        let overuse = t0 + Duration::from_secs(10);
        c.switched(overuse);
        let mut s = signals(500_000, Some(overuse));
        // Within UP_HOLD of the overuse: nothing.
        let d = c.decide(overuse + UP_HOLD - MS, &s, &NEEDS, 3);
        assert_eq!(
            d,
            Decision {
                target: 3,
                probe: None
            }
        );
        // Then a probe for the next rung up (not further) with headroom.
        let t = overuse + UP_HOLD;
        let d = c.decide(t, &s, &NEEDS, 3);
        assert_eq!(d.target, 3);
        assert_eq!(d.probe, Some((NEEDS[2] as f64 * PROBE_HEADROOM) as u64));
        // While it runs: nothing more.
        s.probing = true;
        assert_eq!(c.decide(t + 100 * MS, &s, &NEEDS, 3).probe, None);
        // It passed: one rung up.
        s.probing = false;
        s.outcome = Some(ProbeOutcome::Passed(1_125_000));
        s.estimate = 1_125_000;
        let d = c.decide(t + 600 * MS, &s, &NEEDS, 3);
        assert_eq!(
            d,
            Decision {
                target: 2,
                probe: None
            }
        );
        c.switched(t + 1_000 * MS);
        s.outcome = None;
        // The next step waits SWITCH_HOLD after the switch.
        assert_eq!(c.decide(t + 2_000 * MS, &s, &NEEDS, 2).probe, None);
        let d = c.decide(t + 3_000 * MS, &s, &NEEDS, 2);
        assert_eq!(d.probe, Some((NEEDS[1] as f64 * PROBE_HEADROOM) as u64));
    }

    #[test]
    fn a_failed_probe_backs_off_doubling() {
        let t0 = Instant::now();
        let mut c = Controller::new(t0);
        let mut s = signals(500_000, None);
        let mut t = t0 + Duration::from_secs(10);
        let mut waits = Vec::new();
        for _ in 0..5 {
            let d = c.decide(t, &s, &NEEDS, 3);
            assert!(d.probe.is_some());
            s.outcome = Some(ProbeOutcome::Failed);
            let failed = t + 600 * MS;
            c.decide(failed, &s, &NEEDS, 3);
            s.outcome = None;
            // The next probe: not before the backoff.
            let mut next = failed;
            while c.decide(next, &s, &NEEDS, 3).probe.is_none() {
                next += 100 * MS;
            }
            waits.push(next.duration_since(failed).as_secs());
            t = next;
        }
        assert_eq!(waits, [4, 8, 16, 32, 32]);
    }

    #[test]
    fn without_probing_a_blind_step_up_waits_long() {
        let t0 = Instant::now();
        let mut c = Controller::new(t0);
        let mut s = signals(500_000, None);
        s.can_probe = false;
        assert_eq!(c.decide(t0 + UP_HOLD * 2, &s, &NEEDS, 3).target, 3);
        let d = c.decide(t0 + BLIND_UP_HOLD, &s, &NEEDS, 3);
        assert_eq!(
            d,
            Decision {
                target: 2,
                probe: None
            }
        );
    }

    #[test]
    fn the_start_fits_the_estimate() {
        assert_eq!(Controller::fit(&NEEDS, START_ESTIMATE), 1);
        assert_eq!(Controller::fit(&NEEDS, 10), 3);
        assert_eq!(Controller::fit(&NEEDS, u64::MAX), 0);
        assert_eq!(Controller::fit(&[], 10), 0);
    }

    /// The estimator and controller together through the acceptance test's story on a
    /// simulated path: unlimited, cut to 600 kbit/s, restored. The viewer's rung follows
    /// (down within 2 s of the cut, back to the top within 20 s of the restore), and the
    /// pacer's queue never holds more than a second.
    #[test]
    fn cut_and_restore_on_a_virtual_clock() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new(t0);
        let mut c = Controller::new(t0);
        let mut path = Path::new(100_000_000);
        let audio = 64_000;
        let video = [2_800_000u64, 1_400_000, 800_000, 400_000];
        let needs: Vec<u64> = video.iter().map(|v| v + audio).collect();
        let mut rung = Controller::fit(&needs, bwe.estimate(t0));
        let mut pending: Option<usize> = None;
        let mut queue = 0.0f64; // bytes the pacer holds
        let mut budget = 0.0f64;
        let mut history = Vec::new();
        for t in 0..60_000u64 {
            let now = t0 + Duration::from_millis(t);
            if t == 20_000 {
                path.rate = 600_000;
            }
            if t == 35_000 {
                path.rate = 100_000_000;
            }
            // Keyframes every 2 s: a pending switch happens there, and drops the queue.
            if t % 2_000 == 0
                && let Some(p) = pending.take()
            {
                rung = p;
                queue = 0.0;
                c.switched(now);
            }
            if t % 20 == 0 {
                let seq = bwe.on_send(160, now);
                path.send(seq, 160, t as f64);
            }
            if t % 33 == 0 {
                queue += video[rung] as f64 / 8.0 / 30.0;
            }
            budget = (budget + bwe.pacing_rate(now) as f64 / 8.0 / 1000.0).min(20_000.0);
            while queue >= 1100.0 && budget > 0.0 {
                let seq = bwe.on_send(1100, now);
                path.send(seq, 1100, t as f64);
                queue -= 1100.0;
                budget -= 1100.0;
            }
            let mut pad = bwe.padding_wanted(now);
            while pad > 0 {
                let n = pad.min(280);
                let seq = bwe.on_send(n, now);
                path.send(seq, n, t as f64);
                pad -= n;
            }
            if let Some(fb) = path.feedback(t as f64) {
                bwe.on_transport_feedback(fb, now);
            }
            bwe.poll(now);
            if t % 10 == 0 {
                let s = Signals {
                    estimate: bwe.estimate(now),
                    last_overuse: bwe.last_overuse(),
                    can_probe: true,
                    probing: bwe.probing(),
                    outcome: bwe.take_probe_outcome(),
                };
                let d = c.decide(now, &s, &needs, pending.unwrap_or(rung));
                if d.target != rung {
                    pending = Some(d.target);
                } else {
                    pending = None;
                }
                if let Some(rate) = d.probe {
                    bwe.start_probe(rate, now);
                }
            }
            assert!(
                queue < video[rung] as f64 / 8.0 * 1.5,
                "at {t} ms the pacer holds {queue} bytes"
            );
            if t % 500 == 0 {
                history.push((t, rung, bwe.estimate(now)));
            }
        }
        let at = |ms: u64| history.iter().find(|h| h.0 == ms).unwrap().1;
        assert_eq!(at(19_500), 0, "top before the cut: {history:?}");
        assert_eq!(at(22_000), 3, "240p 2 s after the cut: {history:?}");
        assert_eq!(at(34_500), 3, "stays down while cut: {history:?}");
        let up = history
            .iter()
            .find(|h| h.0 > 35_000 && h.1 == 0)
            .map(|h| h.0 - 35_000);
        assert!(
            up.is_some_and(|ms| ms <= 20_000),
            "back to the top after {up:?}: {history:?}"
        );
    }

    // ---- switcher

    /// Frames as the hub logs them for the default ladder: the source's frame at pts p, then
    /// each rung's frame at pts p - delay (the encoder's delay, in frames).
    fn log(frames: i64, gop: i64, delay: i64) -> Vec<(u8, i64, bool, bool)> {
        let mut out = Vec::new();
        for i in 0..frames {
            let key = i % gop == 0;
            out.push((0, i * 33_333, key, key));
            let j = i - delay;
            if j >= 0 {
                for rung in 2..=3 {
                    out.push((rung, j * 33_333, j % gop == 0, false));
                }
            }
        }
        out
    }

    /// Plays `log` through a switcher, asking for `asks` (frame index → track); returns the
    /// (track, pts) sent, in order, and the switches.
    fn play(log: &[(u8, i64, bool, bool)], asks: &[(usize, u8)]) -> (Vec<(u8, i64)>, Vec<Event>) {
        let mut sw = Switcher::new();
        let (mut sent, mut events) = (Vec::new(), Vec::new());
        for (i, &(track, pts, key, group)) in log.iter().enumerate() {
            for &(at, to) in asks {
                if at == i {
                    sw.request(to);
                }
            }
            let (v, e) = sw.frame(track, pts, key, group, || (track, pts));
            if v == Verdict::Send {
                sent.push((track, pts));
            }
            if e != Event::None {
                events.push(e);
                for h in sw.take_held() {
                    sent.push(h);
                }
            }
        }
        (sent, events)
    }

    /// Every frame's pts once, in order, no gap over one frame except where allowed.
    fn continuous(sent: &[(u8, i64)]) {
        for w in sent.windows(2) {
            assert_eq!(w[1].1 - w[0].1, 33_333, "{w:?} in {sent:?}");
        }
    }

    #[test]
    fn starts_at_the_targets_first_keyframe() {
        let log = log(200, 60, 3);
        let (sent, events) = play(&log, &[(0, 3)]);
        assert_eq!(sent[0], (3, 0));
        assert!(sent.iter().all(|(t, _)| *t == 3));
        continuous(&sent);
        assert_eq!(events, [Event::Switched { from: None, to: 3 }]);
    }

    #[test]
    fn between_rungs_at_the_cut_without_a_gap_or_a_repeat() {
        let log = log(300, 60, 3);
        // Asked mid-group: the switch happens at the next cut (frame 60 → pts 2 s).
        let (sent, events) = play(&log, &[(0, 3), (100, 2)]);
        continuous(&sent);
        let first2 = sent.iter().position(|(t, _)| *t == 2).unwrap();
        assert_eq!(sent[first2], (2, 60 * 33_333));
        assert!(sent[first2..].iter().all(|(t, _)| *t == 2));
        assert_eq!(
            events,
            [
                Event::Switched { from: None, to: 3 },
                Event::Switched {
                    from: Some(3),
                    to: 2
                }
            ]
        );
    }

    #[test]
    fn rung_to_source_holds_the_source_until_the_rung_reaches_the_cut() {
        // The source's keyframe comes first in the log; the rung's last frames before it follow.
        let log = log(300, 60, 5);
        let (sent, events) = play(&log, &[(0, 3), (100, 0)]);
        continuous(&sent);
        let first = sent.iter().position(|(t, _)| *t == 0).unwrap();
        assert_eq!(sent[first], (0, 60 * 33_333));
        assert_eq!(sent[first - 1], (3, 59 * 33_333));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn source_to_rung_waits_only_the_encoders_delay() {
        let log = log(300, 60, 4);
        let (sent, _) = play(&log, &[(0, 0), (70, 3)]);
        continuous(&sent);
        let first = sent.iter().position(|(t, _)| *t == 3).unwrap();
        assert_eq!(sent[first], (3, 60 * 33_333));
    }

    #[test]
    fn a_cut_whose_keyframe_never_comes_is_given_up() {
        // Rung 2 stops existing after frame 50.
        let log: Vec<_> = log(400, 60, 2)
            .into_iter()
            .filter(|(t, pts, _, _)| *t != 2 || *pts < 50 * 33_333)
            .collect();
        let (sent, events) = play(&log, &[(0, 3), (130, 2)]);
        assert!(events.contains(&Event::GaveUp), "{events:?}");
        // Rung 3 resumes at its next keyframe after giving up.
        let last = sent.last().unwrap();
        assert_eq!(last.0, 3);
        assert!(sent.iter().any(|(t, pts)| *t == 3 && *pts == 120 * 33_333));
        assert!(
            !sent
                .iter()
                .any(|(t, pts)| *t == 3 && (90..120).contains(&(pts / 33_333)))
        );
    }

    #[test]
    fn after_a_skip_the_current_rung_resumes_at_a_keyframe() {
        let log = log(200, 60, 1);
        let mut sw = Switcher::new();
        sw.request(2);
        let mut sent = Vec::new();
        for (i, &(track, pts, key, group)) in log.iter().enumerate() {
            if i == 150 {
                sw.skipped();
            }
            if sw.frame(track, pts, key, group, || ()).0 == Verdict::Send {
                sent.push((i, pts));
            }
        }
        let after: Vec<_> = sent.iter().filter(|(i, _)| *i >= 150).collect();
        assert_eq!(after[0].1, 60 * 33_333, "{after:?}");
        assert_eq!(sw.current(), Some(2));
    }

    #[test]
    fn rate_meter() {
        let mut m = RateMeter::default();
        for i in 0..90 {
            m.add(i * 33_333, 4_000);
        }
        let bps = m.bps();
        assert!((950_000..=970_000).contains(&bps), "{bps}");
        m.add(i64::MAX / 2, 10);
        assert_eq!(m.bps(), bps);
    }
}
