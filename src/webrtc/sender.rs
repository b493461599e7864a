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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::keys::Keying;
use super::packetize::RtpFrame;
use super::rtcp::{self, Feedback, SenderInfo};
use super::srtp::{Srtp, SrtpError};

/// How long sent frames are kept for retransmission.
pub(crate) const HISTORY: Duration = Duration::from_millis(1_000);
/// The interval between two sender reports of a stream.
pub(crate) const SR_INTERVAL: Duration = Duration::from_millis(1_000);

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
        })
    }

    /// Sends one frame of `kind` with payload type `pt` and presentation time `pts_us`.
    pub fn send(
        &mut self,
        kind: Kind,
        pt: u8,
        frame: &Arc<RtpFrame>,
        pts_us: i64,
        now: Instant,
        sink: &mut impl Sink,
    ) {
        let Some(s) = self.streams[kind as usize].as_mut() else {
            return;
        };
        if frame.is_empty() {
            return;
        }
        self.origin.get_or_insert((pts_us, now));
        let rtp_time = s.rtp_time(pts_us);
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
        let last = frame.len() - 1;
        for i in 0..frame.len() {
            let payload = frame.packet(i);
            let n = write_rtp(
                &self.srtp,
                sink,
                (s.ssrc, pt),
                s.next,
                rtp_time,
                i == last,
                payload,
            );
            s.next += 1;
            s.packets = s.packets.wrapping_add(1);
            s.octets = s.octets.wrapping_add(payload.len() as u32);
            self.counters.bytes += n as u64;
        }
    }

    /// Handles one SRTCP datagram from the viewer: retransmits what it NACKs, notes PLI/FIR.
    pub(crate) fn handle_rtcp(
        &mut self,
        datagram: &[u8],
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
                            self.retransmit(ssrc, seq, sink);
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

    fn retransmit(&mut self, ssrc: u32, seq: u16, sink: &mut impl Sink) {
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
        let n = write_rtp(
            &self.srtp,
            sink,
            (s.ssrc, sent.pt),
            ext,
            sent.rtp_time,
            i + 1 == sent.frame.len(),
            sent.frame.packet(i),
        );
        self.counters.bytes += n as u64;
        self.counters.retransmitted += n as u64;
    }

    /// Sends the sender reports that are due.
    pub(crate) fn poll(&mut self, now: Instant, sink: &mut impl Sink) {
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
            let info = SenderInfo {
                ssrc: s.ssrc,
                ntp: rtcp::ntp(wall),
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

/// Writes and protects one RTP packet; returns its size on the wire.
fn write_rtp(
    srtp: &Srtp,
    sink: &mut impl Sink,
    (ssrc, pt): (u32, u8),
    ext: u64,
    rtp_time: u32,
    marker: bool,
    payload: &[u8],
) -> usize {
    let buf = sink.buffer();
    let start = buf.len();
    buf.extend_from_slice(&[0x80, (u8::from(marker) << 7) | (pt & 0x7f)]);
    buf.extend_from_slice(&(ext as u16).to_be_bytes());
    buf.extend_from_slice(&rtp_time.to_be_bytes());
    buf.extend_from_slice(&ssrc.to_be_bytes());
    buf.extend_from_slice(payload);
    if srtp
        .protect_rtp(buf, start, 12, (ext >> 16) as u32)
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
        tx.handle_rtcp(&fb, &mut out).unwrap();
        assert_eq!(out.packets, vec![sent[1].clone(), sent[3].clone()]);
        assert!(tx.take_keyframe_request());
        let c = tx.take_counters();
        assert_eq!((c.nacks, c.plis), (2, 1));
        assert_eq!(c.retransmitted, (sent[1].len() + sent[3].len()) as u64);
        // A replayed or forged datagram is refused and changes nothing.
        assert!(tx.handle_rtcp(&fb, &mut out).is_err());
        assert!(
            tx.handle_rtcp(&[0x80, 201, 0, 1, 1, 2, 3, 4], &mut out)
                .is_err()
        );
        // Frames older than the history are gone.
        tx.send(Kind::Video, 102, &f, 33_000, now + HISTORY * 2, &mut out);
        out.packets.clear();
        let mut fb = vec![0x81, 205, 0, 3, 0, 0, 0, 9, 0, 0, 0, 11];
        fb.extend_from_slice(&pid.to_be_bytes());
        fb.extend_from_slice(&0u16.to_be_bytes());
        rx.protect_rtcp(&mut fb, 0).unwrap();
        tx.handle_rtcp(&fb, &mut out).unwrap();
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
