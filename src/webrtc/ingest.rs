//! WHIP ingest, sans-IO: the frames a WebRTC publisher sends (already depacketized by str0m)
//! become hub frames.
//!
//! Guarantees:
//! - Video is H.264: each access unit is stored length-prefixed (the hub's form); its SPS/PPS
//!   become the track's AVCDecoderConfigurationRecord, announced before the first frame and
//!   again whenever they change. Nothing is emitted before the first IDR with parameter sets.
//! - After a gap in the RTP sequence (`contiguous == false`) video is dropped until the next
//!   IDR, and a keyframe is asked for: players never get a picture that references a lost one.
//! - Times: RTP timestamps are unwrapped (32-bit rollover) and turned into microseconds; each
//!   track is anchored at the arrival time of its first frame, then audio is re-aligned with
//!   video once both tracks' RTCP sender reports are known (they map RTP time to the
//!   publisher's wall clock). Per track, times never go backwards.
//! - Audio is Opus, passed through unchanged (RTMP/FLV players get an AAC rendition).

use bytes::{Bytes, BytesMut};

use crate::codec::h264;
use crate::media::{AudioInfo, Codec, Frame, TrackId, TrackInfo};

/// The hub track of a WHIP publisher's video.
pub(crate) const VIDEO: TrackId = TrackId(0);
/// The hub track of a WHIP publisher's audio.
pub(crate) const AUDIO: TrackId = TrackId(1);

/// One depacketized frame as it arrived.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arrival {
    /// RTP timestamp (as on the wire, 32 bits).
    pub(crate) rtp: u32,
    /// Arrival time, microseconds on the ingest's own clock.
    pub(crate) at_us: i64,
    /// The newest sender report of this stream: (its RTP timestamp, its wall clock in
    /// microseconds since the UNIX epoch).
    pub(crate) sender_report: Option<(u32, i64)>,
    /// No RTP packet was lost since the previous frame.
    pub(crate) contiguous: bool,
}

/// What the ingest asks of its driver.
#[derive(Debug, PartialEq)]
pub(crate) enum Output {
    /// Declare (or re-declare) a track.
    Track(TrackId, TrackInfo),
    /// Append a frame.
    Frame(TrackId, Frame),
    /// Ask the publisher for a keyframe (PLI).
    KeyframeNeeded,
}

/// The Opus track's description.
pub(crate) fn opus_track() -> TrackInfo {
    TrackInfo {
        codec: Codec::Opus,
        config: None,
        video: None,
        audio: Some(AudioInfo {
            sample_rate: 48_000,
            channels: 2,
        }),
        rendition: None,
    }
}

/// One track's clock: unwrapped RTP time → microseconds on the broadcast's timeline.
#[derive(Debug)]
struct Clock {
    rate: i64,
    last_raw: Option<u32>,
    /// Unwrapped RTP ticks since the first frame.
    ticks: i64,
    /// Timeline position of the first frame, microseconds.
    offset_us: Option<i64>,
}

impl Clock {
    fn new(rate: i64) -> Self {
        Self {
            rate,
            last_raw: None,
            ticks: 0,
            offset_us: None,
        }
    }

    /// The timeline time of a frame.
    fn time(&mut self, a: &Arrival) -> i64 {
        self.offset_us.get_or_insert(a.at_us);
        if let Some(last) = self.last_raw {
            self.ticks += i64::from(a.rtp.wrapping_sub(last) as i32);
        }
        self.last_raw = Some(a.rtp);
        self.now()
    }

    /// The timeline time of the last frame.
    fn now(&self) -> i64 {
        self.offset_us.unwrap_or(0) + self.ticks * 1_000_000 / self.rate
    }

    /// The publisher's wall clock (µs) at RTP time `rtp`, from a sender report.
    fn wall(&self, rtp: u32, sr: (u32, i64)) -> i64 {
        sr.1 + i64::from(rtp.wrapping_sub(sr.0) as i32) * 1_000_000 / self.rate
    }
}

/// A WHIP publisher's ingest state.
#[derive(Debug)]
pub(crate) struct Ingest {
    video: Clock,
    audio: Clock,
    /// Wall clock minus timeline time, learned from video's sender reports.
    wall_base: Option<i64>,
    audio_synced: bool,
    audio_declared: bool,
    /// Times of the last frames emitted.
    last_video: i64,
    last_audio: i64,
    config: Option<Bytes>,
    /// Video is being dropped until the next IDR.
    waiting_idr: bool,
}

impl Default for Ingest {
    fn default() -> Self {
        Self::new()
    }
}

impl Ingest {
    /// A fresh ingest: waits for an IDR with parameter sets.
    pub(crate) fn new() -> Self {
        Self {
            video: Clock::new(90_000),
            audio: Clock::new(48_000),
            wall_base: None,
            audio_synced: false,
            audio_declared: false,
            last_video: i64::MIN,
            last_audio: i64::MIN,
            config: None,
            waiting_idr: true,
        }
    }

    /// A video access unit in Annex B form.
    pub(crate) fn video(&mut self, a: Arrival, annexb: &[u8], out: &mut Vec<Output>) {
        let pts = self.video.time(&a).max(self.last_video);
        if let Some(sr) = a.sender_report {
            self.wall_base = Some(self.video.wall(a.rtp, sr) - pts);
        }
        if !a.contiguous && !self.waiting_idr {
            self.waiting_idr = true;
            out.push(Output::KeyframeNeeded);
        }
        let mut payload = BytesMut::with_capacity(annexb.len() + 16);
        let au = h264::annexb_to_avcc(annexb, &mut payload);
        if let (Some(sps), Some(pps)) = (au.sps, au.pps)
            && self.config.as_deref().is_none_or(|c| {
                h264::avcc_parameter_sets(c)
                    .is_none_or(|(_, sets)| sets.first() != Some(&sps) || sets.get(1) != Some(&pps))
            })
            && let Some(config) = h264::avcc_record(sps, pps)
        {
            let video = h264::parse_avcc(&config);
            self.config = Some(config.clone());
            out.push(Output::Track(
                VIDEO,
                TrackInfo {
                    codec: Codec::H264,
                    config: Some(config),
                    video,
                    audio: None,
                    rendition: None,
                },
            ));
        }
        if self.waiting_idr {
            if !(au.idr && self.config.is_some()) {
                return;
            }
            self.waiting_idr = false;
        }
        if payload.is_empty() {
            return;
        }
        self.last_video = pts;
        out.push(Output::Frame(
            VIDEO,
            Frame {
                pts,
                dts: pts,
                keyframe: au.idr,
                payload: payload.freeze(),
            },
        ));
    }

    /// An Opus packet.
    pub(crate) fn audio(&mut self, a: Arrival, opus: Bytes, out: &mut Vec<Output>) {
        if !self.audio_declared {
            self.audio_declared = true;
            out.push(Output::Track(AUDIO, opus_track()));
        }
        let mut pts = self.audio.time(&a);
        if !self.audio_synced
            && let (Some(sr), Some(base)) = (a.sender_report, self.wall_base)
        {
            // Both clocks are known: put audio where the publisher's wall clock says it is
            // relative to video. One step, taken once; frames that would go back in time are
            // dropped.
            self.audio_synced = true;
            let want = self.audio.wall(a.rtp, sr) - base;
            if let Some(o) = self.audio.offset_us.as_mut() {
                *o += want - pts;
            }
            pts = self.audio.now();
        }
        if opus.is_empty() || pts <= self.last_audio {
            return;
        }
        self.last_audio = pts;
        out.push(Output::Frame(
            AUDIO,
            Frame {
                pts,
                dts: pts,
                keyframe: true,
                payload: opus,
            },
        ));
    }

    /// Audio has been aligned with video by sender reports.
    #[cfg(test)]
    pub(crate) fn synced(&self) -> bool {
        self.audio_synced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPS: [u8; 4] = [0x67, 0x42, 0xc0, 0x1f];
    const PPS: [u8; 2] = [0x68, 0xce];

    fn arrival(rtp: u32, at_us: i64) -> Arrival {
        Arrival {
            rtp,
            at_us,
            sender_report: None,
            contiguous: true,
        }
    }

    fn idr() -> Vec<u8> {
        let mut v = vec![0, 0, 0, 1];
        v.extend_from_slice(&SPS);
        v.extend_from_slice(&[0, 0, 0, 1]);
        v.extend_from_slice(&PPS);
        v.extend_from_slice(&[0, 0, 0, 1, 0x65, 0x88, 0x84]);
        v
    }

    const P: [u8; 7] = [0, 0, 0, 1, 0x41, 0x9a, 0x02];

    fn frames(out: &[Output]) -> Vec<(TrackId, i64, bool)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Frame(t, f) => Some((*t, f.pts, f.keyframe)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn video_waits_for_an_idr_then_declares_its_config() {
        let mut ingest = Ingest::new();
        let mut out = Vec::new();
        ingest.video(arrival(1000, 0), &P, &mut out);
        assert!(out.is_empty(), "nothing before the first IDR");
        ingest.video(arrival(4000, 33_333), &idr(), &mut out);
        let Output::Track(VIDEO, info) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(
            h264::avcc_parameter_sets(info.config.as_ref().unwrap())
                .unwrap()
                .1,
            vec![&SPS[..], &PPS[..]]
        );
        ingest.video(arrival(7000, 66_000), &P, &mut out);
        // Anchored at the first frame's arrival; 3000 ticks at 90 kHz = 33.333 ms.
        assert_eq!(
            frames(&out),
            vec![(VIDEO, 33_333, true), (VIDEO, 66_666, false)]
        );
        // The same parameter sets again are not a new config.
        out.clear();
        ingest.video(arrival(10_000, 100_000), &idr(), &mut out);
        assert!(matches!(out[..], [Output::Frame(..)]), "{out:?}");
    }

    #[test]
    fn a_gap_drops_video_until_the_next_idr_and_asks_for_one() {
        let mut ingest = Ingest::new();
        let mut out = Vec::new();
        ingest.video(arrival(0, 0), &idr(), &mut out);
        out.clear();
        let mut lost = arrival(3000, 33_000);
        lost.contiguous = false;
        ingest.video(lost, &P, &mut out);
        assert_eq!(out, vec![Output::KeyframeNeeded]);
        out.clear();
        ingest.video(arrival(6000, 66_000), &P, &mut out);
        assert!(out.is_empty());
        ingest.video(arrival(9000, 100_000), &idr(), &mut out);
        assert_eq!(frames(&out), vec![(VIDEO, 100_000, true)]);
    }

    #[test]
    fn rtp_rollover_keeps_time_moving() {
        let mut ingest = Ingest::new();
        let mut out = Vec::new();
        ingest.video(arrival(u32::MAX - 1499, 0), &idr(), &mut out);
        ingest.video(arrival(1500, 40_000), &P, &mut out);
        assert_eq!(frames(&out), vec![(VIDEO, 0, true), (VIDEO, 33_333, false)]);
    }

    #[test]
    fn audio_is_aligned_with_video_by_sender_reports() {
        let mut ingest = Ingest::new();
        let mut out = Vec::new();
        // Video: RTP 90_000 is wall clock 10 s.
        let mut v = arrival(90_000, 0);
        v.sender_report = Some((90_000, 10_000_000));
        ingest.video(v, &idr(), &mut out);
        // Audio arrives 50 ms after video but was captured at the same instant (its RTP
        // 48_000 is also wall clock 10 s).
        ingest.audio(arrival(48_000, 50_000), Bytes::from_static(b"o1"), &mut out);
        let mut a = arrival(48_960, 70_000);
        a.sender_report = Some((48_000, 10_000_000));
        ingest.audio(a, Bytes::from_static(b"o2"), &mut out);
        ingest.audio(arrival(49_920, 90_000), Bytes::from_static(b"o3"), &mut out);
        ingest.audio(
            arrival(50_880, 110_000),
            Bytes::from_static(b"o4"),
            &mut out,
        );
        assert!(ingest.synced());
        // Moved 50 ms back, in line with video; frames that would go back in time are dropped.
        assert_eq!(
            frames(&out),
            vec![
                (VIDEO, 0, true),
                (AUDIO, 50_000, true),
                (AUDIO, 60_000, true)
            ]
        );
    }

    #[test]
    fn garbage_video_never_panics() {
        let mut ingest = Ingest::new();
        let mut out = Vec::new();
        for data in [&[][..], &[0, 0, 1], &[0, 0, 0, 1, 0x67], &[0xff; 9]] {
            ingest.video(arrival(0, 0), data, &mut out);
        }
        assert!(frames(&out).is_empty());
    }
}
