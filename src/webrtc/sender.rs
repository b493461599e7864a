//! One WebRTC viewer's outgoing media, once its DTLS handshake is done: RTP headers, SRTP,
//! retransmissions and sender reports, written straight into the node's egress batches.
//!
//! Guarantees:
//! - The payloads come from shared [`RtpFrame`]s (packetized once per frame for every viewer);
//!   per packet a viewer costs a 12-byte header, one copy of the payload into the egress
//!   buffer and its encryption, and no allocation.
//! - Sequence numbers are the viewer's own and contiguous: frames the viewer skipped (it joined
//!   late, or fell behind in the hub) leave no gap that would look like loss.
//! - NACKs are answered from the frames already sent — references to the shared frames kept for
//!   [`HISTORY`], not copies — with the original sequence number and timestamp (RFC 4585
//!   retransmission on the media stream); sequence numbers no longer held are ignored.
//! - Each stream gets a sender report about every [`SR_INTERVAL`]; both streams' reports map
//!   RTP time to wall-clock time through one media clock, so receivers keep audio and video in
//!   sync.
//! - Nothing from the network can make it panic: unauthentic or malformed RTCP is dropped.
//! - With ABR ([`MediaSender::enable_abr`], for `auto` viewers) every packet carries the
//!   transport-cc header extension (RFC 5285 one-byte form: 8 more header bytes, within the
//!   1,200-byte budget), and the viewer's feedback (TWCC, receiver reports with their loss,
//!   jitter and round-trip time, REMB) drives its [`Bwe`]. Video is then paced: frames wait in a
//!   queue of references to the shared frames and leave at the estimator's pacing rate, so that
//!   on a path that narrowed the excess waits here, where a switch to a lower rung drops it
//!   ([`MediaSender::drop_queued`]), instead of in the network, where it would be lost. Sequence
//!   numbers are given as packets leave, so dropped frames leave no gap. Audio and
//!   retransmissions are never held. Probes are RTP padding on the viewer's RTX stream (own SSRC
//!   and sequence numbers, padding-only packets).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::abr::Bwe;
use super::keys::Keying;
use super::packetize::RtpFrame;
use super::rtcp::{self, Feedback, SenderInfo};
use super::srtp::{Srtp, SrtpError};

/// How long sent frames are kept for retransmission.
pub(crate) const HISTORY: Duration = Duration::from_millis(1_000);
/// The interval between two sender reports of a stream.
pub(crate) const SR_INTERVAL: Duration = Duration::from_millis(1_000);
/// The most bytes the pacer lets out at once after an idle spell: its rate over this.
const PACE_BURST: Duration = Duration::from_millis(20);
/// The SRTP tag (AES-GCM's; HMAC-SHA1-80's is shorter), for the size the estimator is told.
const TAG_LEN: usize = 16;
/// The most padding in one packet.
const MAX_PADDING: usize = 255;

/// Where protected datagrams go: the egress batch of one peer.
pub trait Sink {
    /// The buffer to append one datagram to.
    fn buffer(&mut self) -> &mut Vec<u8>;
    /// The datagram appended from `start` on is complete.
    fn commit(&mut self, start: usize);
}

/// The two streams of a viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// H.264, 90 kHz.
    Video = 0,
    /// Opus, 48 kHz.
    Audio = 1,
}

/// What the sender counted since the last [`MediaSender::take_counters`].
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    /// RTP bytes sent (headers, payload, SRTP tag), retransmissions included.
    pub(crate) bytes: u64,
    /// Of those, retransmitted.
    pub(crate) retransmitted: u64,
    /// NACK entries received.
    pub(crate) nacks: u64,
    /// PLIs received.
    pub(crate) plis: u64,
    /// FIRs received.
    pub(crate) firs: u64,
    /// Of `bytes`, probe padding.
    pub(crate) padding: u64,
}

struct Sent {
    /// Extended sequence number (rollover counter << 16 | sequence number) of its first packet.
    first: u64,
    pt: u8,
    rtp_time: u32,
    at: Instant,
    frame: Arc<RtpFrame>,
}

struct Stream {
    /// The SSRC announced in the SDP answer.
    ssrc: u32,
    /// RTP clock rate.
    clock: u64,
    /// Extended sequence number of the next packet.
    next: u64,
    /// Added to every RTP timestamp (random, RFC 3550 §5.1).
    ts_base: u32,
    packets: u32,
    octets: u32,
    history: VecDeque<Sent>,
    last_sr: Option<Instant>,
}

impl Stream {
    fn new(ssrc: u32, clock: u64) -> Self {
        Self {
            ssrc,
            clock,
            // A random start (RFC 3550 §5.1), below 2^15 so the first rollover is far away.
            next: u64::from(rand::random::<u16>() >> 1),
            ts_base: rand::random(),
            packets: 0,
            octets: 0,
            history: VecDeque::with_capacity(64),
            last_sr: None,
        }
    }

    fn rtp_time(&self, pts_us: i64) -> u32 {
        let ticks = ((pts_us.max(0) as u128 * u128::from(self.clock) + 500_000) / 1_000_000) as u32;
        self.ts_base.wrapping_add(ticks)
    }

    /// The extended form of `seq`, the one nearest to what was sent last.
    fn extend(&self, seq: u16) -> u64 {
        let last = self.next.wrapping_sub(1);
        let candidate = (last & !0xffff) | u64::from(seq);
        if candidate > last + 0x8000 && candidate >= 0x1_0000 {
            candidate - 0x1_0000
        } else if candidate + 0x8000 < last {
            candidate + 0x1_0000
        } else {
            candidate
        }
    }
}

/// A video frame waiting for the pacer.
struct Queued {
    frame: Arc<RtpFrame>,
    pt: u8,
    rtp_time: u32,
    /// Its next packet to send.
    next: usize,
    /// When it was queued.
    at: Instant,
}

/// The RTX stream probes pad on.
struct Rtx {
    ssrc: u32,
    pt: u8,
    /// Extended sequence number of the next packet.
    next: u64,
}

/// What ABR adds to a sender.
struct Abr {
    bwe: Bwe,
    /// The transport-cc extension's id.
    ext: Option<u8>,
    rtx: Option<Rtx>,
    queue: VecDeque<Queued>,
    /// Bytes the pacer may still send.
    budget: f64,
    last_pace: Instant,
    /// The middle 32 bits of our last sender reports' NTP times and when they left.
    reports: [(u32, Option<Instant>); 4],
    /// The RTP timestamp and payload type of the last video frame (for padding).
    last_video: (u32, u8),
}

/// One viewer's media sender.
pub struct MediaSender {
    srtp: Srtp,
    streams: [Option<Stream>; 2],
    /// The media clock: a frame's pts and the moment it was sent first (for sender reports).
    origin: Option<(i64, Instant)>,
    cname: Arc<str>,
    plain: Vec<u8>,
    feedback: Vec<Feedback>,
    counters: Counters,
    /// A PLI or FIR arrived since the last [`MediaSender::take_keyframe_request`].
    keyframe_requested: bool,
    abr: Option<Box<Abr>>,
}

impl MediaSender {
    /// A sender with `keying`'s SRTP keys for the streams of the given SSRCs.
    pub fn new(
        keying: &Keying,
        video: Option<u32>,
        audio: Option<u32>,
        cname: Arc<str>,
    ) -> Result<Self, SrtpError> {
        Ok(Self {
            srtp: Srtp::new(keying.profile, &keying.material, keying.client)?,
            streams: [
                video.map(|ssrc| Stream::new(ssrc, 90_000)),
                audio.map(|ssrc| Stream::new(ssrc, 48_000)),
            ],
            origin: None,
            cname,
            plain: Vec::with_capacity(1500),
            feedback: Vec::with_capacity(16),
            counters: Counters::default(),
            keyframe_requested: false,
            abr: None,
        })
    }

    /// Turns on what ABR needs (see the module docs): the transport-cc extension with id `ext`
    /// (when negotiated), the RTX stream (`ssrc`, payload type) probes pad on (when negotiated),
    /// the estimator and the pacer.
    pub(crate) fn enable_abr(&mut self, ext: Option<u8>, rtx: Option<(u32, u8)>, now: Instant) {
        self.abr = Some(Box::new(Abr {
            bwe: Bwe::new(now),
            ext,
            rtx: rtx.map(|(ssrc, pt)| Rtx {
                ssrc,
                pt,
                next: u64::from(rand::random::<u16>() >> 1),
            }),
            queue: VecDeque::with_capacity(128),
            budget: 0.0,
            last_pace: now,
            reports: [(0, None); 4],
            last_video: (0, 0),
        }));
    }

    /// The estimator, with ABR.
    pub(crate) fn bwe_mut(&mut self) -> Option<&mut Bwe> {
        self.abr.as_deref_mut().map(|a| &mut a.bwe)
    }

    /// Whether probes can be sent and judged: transport-wide feedback and an RTX stream.
    pub(crate) fn can_probe(&self) -> bool {
        self.abr
            .as_deref()
            .is_some_and(|a| a.ext.is_some() && a.rtx.is_some() && a.bwe.has_transport_feedback())
    }

    /// Drops the queued video frames that have not started to leave (a partly sent one
    /// finishes): after a switch they are no longer wanted.
    pub(crate) fn drop_queued(&mut self) {
        if let Some(a) = self.abr.as_deref_mut() {
            let keep = usize::from(a.queue.front().is_some_and(|q| q.next > 0));
            a.queue.truncate(keep);
        }
    }

    /// How long the oldest queued video frame has waited.
    pub(crate) fn queued_for(&self, now: Instant) -> Duration {
        self.abr
            .as_deref()
            .and_then(|a| a.queue.front())
            .map_or(Duration::ZERO, |q| now.saturating_duration_since(q.at))
    }

    /// Sends one frame of `kind` with payload type `pt` and presentation time `pts_us` (video
    /// waits for the pacer with ABR).
    pub fn send(
        &mut self,
        kind: Kind,
        pt: u8,
        frame: &Arc<RtpFrame>,
        pts_us: i64,
        now: Instant,
        sink: &mut impl Sink,
    ) {
        let Some(s) = self.streams[kind as usize].as_ref() else {
            return;
        };
        if frame.is_empty() {
            return;
        }
        self.origin.get_or_insert((pts_us, now));
        let rtp_time = s.rtp_time(pts_us);
        if kind == Kind::Video
            && let Some(a) = self.abr.as_deref_mut()
        {
            a.last_video = (rtp_time, pt);
            a.queue.push_back(Queued {
                frame: frame.clone(),
                pt,
                rtp_time,
                next: 0,
                at: now,
            });
            self.pace(now, sink);
            return;
        }
        self.send_packets(kind, pt, frame, rtp_time, 0, usize::MAX, now, sink);
    }

    /// Sends packets `from..` of a frame, at most `budget` bytes' worth (at least one packet);
    /// returns the next packet's index and the bytes sent.
    #[allow(clippy::too_many_arguments)]
    fn send_packets(
        &mut self,
        kind: Kind,
        pt: u8,
        frame: &Arc<RtpFrame>,
        rtp_time: u32,
        from: usize,
        budget: usize,
        now: Instant,
        sink: &mut impl Sink,
    ) -> (usize, usize) {
        let Some(s) = self.streams[kind as usize].as_mut() else {
            return (frame.len(), 0);
        };
        if from == 0 {
            while s
                .history
                .front()
                .is_some_and(|h| now.duration_since(h.at) > HISTORY)
            {
                s.history.pop_front();
            }
            s.history.push_back(Sent {
                first: s.next,
                pt,
                rtp_time,
                at: now,
                frame: frame.clone(),
            });
        }
        let last = frame.len() - 1;
        let (mut i, mut sent) = (from, 0);
        while i < frame.len() && (i == from || sent < budget) {
            let payload = frame.packet(i);
            let ext = self.abr.as_deref_mut().and_then(|a| {
                let seq = a.bwe.on_send(12 + 8 + payload.len() + TAG_LEN, now);
                a.ext.map(|id| (id, seq))
            });
            let n = write_rtp(
                &self.srtp,
                sink,
                (s.ssrc, pt),
                s.next,
                rtp_time,
                i == last,
                payload,
                ext,
                0,
            );
            s.next += 1;
            s.packets = s.packets.wrapping_add(1);
            s.octets = s.octets.wrapping_add(payload.len() as u32);
            self.counters.bytes += n as u64;
            sent += n;
            i += 1;
        }
        (i, sent)
    }

    /// Lets queued video out as the pacing rate allows.
    fn pace(&mut self, now: Instant, sink: &mut impl Sink) {
        let Some(a) = self.abr.as_deref_mut() else {
            return;
        };
        let rate = a.bwe.pacing_rate(now) as f64 / 8.0;
        let elapsed = now.saturating_duration_since(a.last_pace).as_secs_f64();
        a.last_pace = now;
        a.budget = (a.budget + rate * elapsed).min(rate * PACE_BURST.as_secs_f64());
        loop {
            let Some(a) = self.abr.as_deref_mut() else {
                return;
            };
            if a.budget <= 0.0 {
                return;
            }
            let Some(q) = a.queue.front() else {
                return;
            };
            let (frame, pt, rtp_time, from) = (q.frame.clone(), q.pt, q.rtp_time, q.next);
            let budget = a.budget as usize;
            let (next, sent) =
                self.send_packets(Kind::Video, pt, &frame, rtp_time, from, budget, now, sink);
            let Some(a) = self.abr.as_deref_mut() else {
                return;
            };
            a.budget -= sent as f64;
            if next >= frame.len() {
                a.queue.pop_front();
            } else if let Some(q) = a.queue.front_mut() {
                q.next = next;
            }
        }
    }

    /// Sends `bytes` of padding on the RTX stream (for a probe).
    fn pad(&mut self, mut bytes: usize, now: Instant, sink: &mut impl Sink) {
        let Some(a) = self.abr.as_deref_mut() else {
            return;
        };
        let Some(rtx) = a.rtx.as_mut() else {
            return;
        };
        let (rtp_time, _) = a.last_video;
        while bytes > 0 {
            let padding = bytes.min(MAX_PADDING);
            let seq = a.bwe.on_send(12 + 8 + padding + TAG_LEN, now);
            let n = write_rtp(
                &self.srtp,
                sink,
                (rtx.ssrc, rtx.pt),
                rtx.next,
                rtp_time,
                false,
                &[],
                a.ext.map(|id| (id, seq)),
                padding,
            );
            rtx.next += 1;
            self.counters.bytes += n as u64;
            self.counters.padding += n as u64;
            bytes = bytes.saturating_sub(n.max(1));
        }
    }

    /// Handles one SRTCP datagram from the viewer: retransmits what it NACKs, notes PLI/FIR.
    pub(crate) fn handle_rtcp(
        &mut self,
        datagram: &[u8],
        now: Instant,
        sink: &mut impl Sink,
    ) -> Result<(), SrtpError> {
        let mut plain = std::mem::take(&mut self.plain);
        let r = self.srtp.unprotect_rtcp(datagram, &mut plain);
        if r.is_ok() {
            self.feedback.clear();
            rtcp::parse(&plain, &mut self.feedback);
            for i in 0..self.feedback.len() {
                match self.feedback[i] {
                    Feedback::Nack { ssrc, pid, blp } => {
                        for seq in Feedback::nacked(pid, blp) {
                            self.counters.nacks += 1;
                            self.retransmit(ssrc, seq, now, sink);
                        }
                    }
                    Feedback::Pli { ssrc } if self.is_video(ssrc) => {
                        self.counters.plis += 1;
                        self.keyframe_requested = true;
                    }
                    Feedback::Fir { ssrc } if self.is_video(ssrc) => {
                        self.counters.firs += 1;
                        self.keyframe_requested = true;
                    }
                    Feedback::Report {
                        ssrc,
                        fraction_lost,
                        jitter,
                        lsr,
                        dlsr,
                    } if self.is_video(ssrc) => {
                        if let Some(a) = self.abr.as_deref_mut() {
                            let rtt = a
                                .reports
                                .iter()
                                .find(|(mid, at)| *mid == lsr && lsr != 0 && at.is_some())
                                .and_then(|(_, at)| {
                                    let held =
                                        Duration::from_micros(u64::from(dlsr) * 1_000_000 / 65_536);
                                    now.checked_duration_since((*at)?)?.checked_sub(held)
                                });
                            // Video's RTP clock: 90 kHz.
                            let jitter = Duration::from_micros(u64::from(jitter) * 100 / 9);
                            a.bwe.on_receiver_report(fraction_lost, jitter, rtt, now);
                        }
                    }
                    Feedback::Remb { bps } => {
                        if let Some(a) = self.abr.as_deref_mut() {
                            a.bwe.on_remb(bps, now);
                        }
                    }
                    Feedback::TransportCc { start, end } => {
                        if let Some(a) = self.abr.as_deref_mut()
                            && let Some(packet) = plain.get(start..end)
                        {
                            let bwe = &mut a.bwe;
                            let mut counts = (0, 0);
                            rtcp::transport_cc(packet, |seq, at| bwe.report(seq, at, &mut counts));
                            bwe.end_feedback(counts, now);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.plain = plain;
        r
    }

    fn is_video(&self, ssrc: u32) -> bool {
        self.streams[0].as_ref().is_some_and(|s| s.ssrc == ssrc)
    }

    fn retransmit(&mut self, ssrc: u32, seq: u16, now: Instant, sink: &mut impl Sink) {
        let Some(s) = self.streams.iter().flatten().find(|s| s.ssrc == ssrc) else {
            return;
        };
        let ext = s.extend(seq);
        if ext >= s.next {
            return;
        }
        // Newest first: NACKs are about recent packets.
        let Some(sent) = s
            .history
            .iter()
            .rev()
            .find(|h| h.first <= ext && ext < h.first + h.frame.len() as u64)
        else {
            return;
        };
        let i = (ext - sent.first) as usize;
        let payload = sent.frame.packet(i);
        let twcc = self.abr.as_deref_mut().and_then(|a| {
            let seq = a.bwe.on_send(12 + 8 + payload.len() + TAG_LEN, now);
            a.ext.map(|id| (id, seq))
        });
        let n = write_rtp(
            &self.srtp,
            sink,
            (s.ssrc, sent.pt),
            ext,
            sent.rtp_time,
            i + 1 == sent.frame.len(),
            payload,
            twcc,
            0,
        );
        self.counters.bytes += n as u64;
        self.counters.retransmitted += n as u64;
    }

    /// Sends the sender reports that are due, the paced video the pacer allows and a running
    /// probe's padding.
    pub(crate) fn poll(&mut self, now: Instant, sink: &mut impl Sink) {
        self.pace(now, sink);
        if let Some(a) = self.abr.as_deref_mut() {
            a.bwe.poll(now);
            let padding = if a.rtx.is_some() && a.ext.is_some() {
                a.bwe.padding_wanted(now)
            } else {
                0
            };
            self.pad(padding, now, sink);
        }
        let Some((origin_pts, origin_at)) = self.origin else {
            return;
        };
        let mut wall = None;
        for s in self.streams.iter_mut().flatten() {
            if s.packets == 0
                || s.last_sr
                    .is_some_and(|t| now.duration_since(t) < SR_INTERVAL)
            {
                continue;
            }
            s.last_sr = Some(now);
            let wall = *wall.get_or_insert_with(SystemTime::now);
            let media_now = origin_pts + now.duration_since(origin_at).as_micros() as i64;
            let ntp = rtcp::ntp(wall);
            if let Some(a) = self.abr.as_deref_mut() {
                a.reports.rotate_right(1);
                a.reports[0] = ((ntp >> 16) as u32, Some(now));
            }
            let info = SenderInfo {
                ssrc: s.ssrc,
                ntp,
                rtp_time: s.rtp_time(media_now),
                packets: s.packets,
                octets: s.octets,
            };
            let buf = sink.buffer();
            let start = buf.len();
            rtcp::sender_report(buf, &info, self.cname.as_bytes());
            if self.srtp.protect_rtcp(buf, start).is_ok() {
                sink.commit(start);
            } else {
                buf.truncate(start);
            }
        }
    }

    /// What was counted since the last call.
    pub(crate) fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }

    /// Whether the viewer asked for a keyframe since the last call.
    pub(crate) fn take_keyframe_request(&mut self) -> bool {
        std::mem::take(&mut self.keyframe_requested)
    }
}

/// Writes and protects one RTP packet; returns its size on the wire. `twcc`: the
/// transport-cc extension's (id, transport-wide sequence number); `padding`: bytes of RTP
/// padding after the payload (1..=255, 0 for none).
#[allow(clippy::too_many_arguments)]
fn write_rtp(
    srtp: &Srtp,
    sink: &mut impl Sink,
    (ssrc, pt): (u32, u8),
    ext: u64,
    rtp_time: u32,
    marker: bool,
    payload: &[u8],
    twcc: Option<(u8, u16)>,
    padding: usize,
) -> usize {
    let buf = sink.buffer();
    let start = buf.len();
    let padding = padding.min(MAX_PADDING);
    let first = 0x80 | (u8::from(twcc.is_some()) << 4) | (u8::from(padding > 0) << 5);
    buf.extend_from_slice(&[first, (u8::from(marker) << 7) | (pt & 0x7f)]);
    buf.extend_from_slice(&(ext as u16).to_be_bytes());
    buf.extend_from_slice(&rtp_time.to_be_bytes());
    buf.extend_from_slice(&ssrc.to_be_bytes());
    let mut header = 12;
    if let Some((id, seq)) = twcc {
        // RFC 8285 one-byte header: 0xBEDE, one word: id and length - 1, the 16-bit number, pad.
        let [hi, lo] = seq.to_be_bytes();
        buf.extend_from_slice(&[0xbe, 0xde, 0, 1, (id << 4) | 1, hi, lo, 0]);
        header += 8;
    }
    buf.extend_from_slice(payload);
    if padding > 0 {
        buf.resize(buf.len() + padding - 1, 0);
        buf.push(padding as u8);
    }
    if srtp
        .protect_rtp(buf, start, header, (ext >> 16) as u32)
        .is_err()
    {
        buf.truncate(start);
        return 0;
    }
    let n = buf.len() - start;
    sink.commit(start);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webrtc::srtp::Profile;

    /// Collects datagrams.
    #[derive(Default)]
    struct Out {
        buf: Vec<u8>,
        packets: Vec<Vec<u8>>,
    }

    impl Sink for Out {
        fn buffer(&mut self) -> &mut Vec<u8> {
            &mut self.buf
        }
        fn commit(&mut self, start: usize) {
            self.packets.push(self.buf[start..].to_vec());
            self.buf.clear();
        }
    }

    fn keying(client: bool) -> Keying {
        let profile = Profile::AeadAes128Gcm;
        let material: Vec<u8> = (0..profile.keying_material_len() as u8).collect();
        Keying {
            material,
            profile,
            client,
        }
    }

    const VIDEO: u32 = 11;
    const AUDIO: u32 = 22;

    fn frame(packets: usize) -> Arc<RtpFrame> {
        let nal: Vec<u8> = std::iter::once(0x65)
            .chain((0..packets * 1000).map(|i| i as u8))
            .collect();
        let mut avcc = (nal.len() as u32).to_be_bytes().to_vec();
        avcc.extend_from_slice(&nal);
        Arc::new(RtpFrame::h264(&avcc, None, false))
    }

    fn seq(packet: &[u8]) -> u16 {
        u16::from_be_bytes([packet[2], packet[3]])
    }

    #[test]
    fn contiguous_sequence_numbers_decrypt_and_marker() {
        let mut tx =
            MediaSender::new(&keying(false), Some(VIDEO), Some(AUDIO), "c".into()).unwrap();
        let rx = Srtp::new(Profile::AeadAes128Gcm, &keying(true).material, true).unwrap();
        let mut out = Out::default();
        let now = Instant::now();
        let f = frame(3);
        tx.send(Kind::Video, 102, &f, 0, now, &mut out);
        tx.send(Kind::Video, 102, &f, 33_333, now, &mut out);
        assert_eq!(out.packets.len(), 2 * f.len());
        let seqs: Vec<u16> = out.packets.iter().map(|p| seq(p)).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
        let mut plain = Vec::new();
        for (k, p) in out.packets.iter().enumerate() {
            rx.unprotect_rtp(p, 0, &mut plain).unwrap();
            assert_eq!(&plain[12..], f.packet(k % f.len()));
            assert_eq!(plain[1] >> 7 == 1, k % f.len() == f.len() - 1, "marker");
            assert_eq!(plain[1] & 0x7f, 102);
        }
        let ts = |p: &Vec<u8>| u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        assert_eq!(
            ts(&out.packets[f.len()]).wrapping_sub(ts(&out.packets[0])),
            3000
        );
        let c = tx.take_counters();
        assert_eq!(
            c.bytes,
            out.packets.iter().map(|p| p.len() as u64).sum::<u64>()
        );
    }

    #[test]
    fn nack_retransmits_the_same_packet_and_pli_is_noted() {
        let mut tx = MediaSender::new(&keying(false), Some(VIDEO), None, "c".into()).unwrap();
        let mut rx = Srtp::new(Profile::AeadAes128Gcm, &keying(true).material, true).unwrap();
        let mut out = Out::default();
        let now = Instant::now();
        let f = frame(4);
        tx.send(Kind::Video, 102, &f, 0, now, &mut out);
        let sent = std::mem::take(&mut out.packets);
        // The receiver NACKs the 2nd and 4th packets, and sends a PLI.
        let pid = seq(&sent[1]);
        let mut fb = vec![0x81, 205, 0, 3, 0, 0, 0, 9, 0, 0, 0, 11];
        fb.extend_from_slice(&pid.to_be_bytes());
        fb.extend_from_slice(&2u16.to_be_bytes());
        fb.extend_from_slice(&[0x81, 206, 0, 2, 0, 0, 0, 9, 0, 0, 0, 11]);
        let start = 0;
        rx.protect_rtcp(&mut fb, start).unwrap();
        tx.handle_rtcp(&fb, now, &mut out).unwrap();
        assert_eq!(out.packets, vec![sent[1].clone(), sent[3].clone()]);
        assert!(tx.take_keyframe_request());
        let c = tx.take_counters();
        assert_eq!((c.nacks, c.plis), (2, 1));
        assert_eq!(c.retransmitted, (sent[1].len() + sent[3].len()) as u64);
        // A replayed or forged datagram is refused and changes nothing.
        assert!(tx.handle_rtcp(&fb, now, &mut out).is_err());
        assert!(
            tx.handle_rtcp(&[0x80, 201, 0, 1, 1, 2, 3, 4], now, &mut out)
                .is_err()
        );
        // Frames older than the history are gone.
        tx.send(Kind::Video, 102, &f, 33_000, now + HISTORY * 2, &mut out);
        out.packets.clear();
        let mut fb = vec![0x81, 205, 0, 3, 0, 0, 0, 9, 0, 0, 0, 11];
        fb.extend_from_slice(&pid.to_be_bytes());
        fb.extend_from_slice(&0u16.to_be_bytes());
        rx.protect_rtcp(&mut fb, 0).unwrap();
        tx.handle_rtcp(&fb, now, &mut out).unwrap();
        assert!(out.packets.is_empty());
    }

    #[test]
    fn sender_reports_share_one_media_clock() {
        let mut tx =
            MediaSender::new(&keying(false), Some(VIDEO), Some(AUDIO), "cn".into()).unwrap();
        let mut rx = Srtp::new(Profile::AeadAes128Gcm, &keying(true).material, true).unwrap();
        let mut out = Out::default();
        let now = Instant::now();
        tx.poll(now, &mut out);
        assert!(out.packets.is_empty(), "nothing sent, no report");
        tx.send(Kind::Video, 102, &frame(1), 1_000_000, now, &mut out);
        tx.send(
            Kind::Audio,
            111,
            &Arc::new(RtpFrame::opus(&[1, 2, 3])),
            1_000_000,
            now,
            &mut out,
        );
        out.packets.clear();
        tx.poll(now + Duration::from_millis(500), &mut out);
        assert_eq!(out.packets.len(), 2);
        let mut plain = Vec::new();
        let mut rtp = Vec::new();
        for p in &out.packets {
            rx.unprotect_rtcp(p, &mut plain).unwrap();
            assert_eq!(plain[1], 200);
            rtp.push(u32::from_be_bytes([
                plain[16], plain[17], plain[18], plain[19],
            ]));
        }
        let video = tx.streams[0].as_ref().unwrap();
        let audio = tx.streams[1].as_ref().unwrap();
        assert_eq!(rtp[0].wrapping_sub(video.ts_base), 90_000 * 3 / 2);
        assert_eq!(rtp[1].wrapping_sub(audio.ts_base), 48_000 * 3 / 2);
        out.packets.clear();
        tx.poll(now + Duration::from_millis(900), &mut out);
        assert!(out.packets.is_empty(), "not due yet");
    }

    #[test]
    fn extended_sequence_numbers_across_a_wrap() {
        let mut s = Stream::new(VIDEO, 90_000);
        s.next = 0x1_0005;
        assert_eq!(s.extend(0xfffe), 0xfffe);
        assert_eq!(s.extend(3), 0x1_0003);
        s.next = 0xfff0;
        assert_eq!(s.extend(0xffe0), 0xffe0);
        assert_eq!(s.extend(2), 0x1_0002);
    }
}
