//! The ladder encoder: one H.264 source in, one H.264 rendition per rung of a
//! [`crate::ladder::Ladder`] out. The source is decoded once ([`SourceDecoder`]); each rung
//! scales the picture once (swscale, bilinear, one scaler per rung, none where the rung is the
//! source's size and format) and encodes it behind the small [`VideoEncoder`] interface
//! ([`X264`] today: `veryfast`, `zerolatency`, no B-frames, CBR-like with a one-second VBV buffer
//! at the rung's bitrate, the rung's profile). A hardware encoder is another [`OpenEncoder`].
//!
//! Guarantees:
//! - Keyframes line up: the encoder decides once per decoded picture whether it is a keyframe
//!   (the source's keyframe, the first picture it encodes, or [`MAX_GOP_US`] since the last one,
//!   or a timestamp that went back) and forces an IDR for that picture in every rung; the encoders never place one of
//!   their own (`keyint=infinite`, `scenecut=0`), and a rung with a lower frame rate never drops
//!   a keyframe. So every rendition has its IDRs at the same source timestamps, and a player can
//!   switch at any of them.
//! - Output is what the hub holds and what [`super::video::Reencoder`] gives: length-prefixed
//!   NAL units with SPS and PPS in band before every IDR, pts the source's (microseconds), dts
//!   equal to pts (no B-frames), in presentation order. A rung's [`LadderEvent::Config`] (its
//!   `TrackInfo`, avcC and size) comes before its first frame and again whenever its parameter
//!   sets change.
//! - Sizes come from [`Ladder::for_source`] on the first decoded picture (never upscaled); a
//!   later change of the source's size keeps the renditions' sizes (the scalers follow).
//! - A frame FFmpeg cannot decode is counted ([`LadderEncoder::errors`]) and skipped, never fatal.
//! - Per frame, nothing is allocated where a reused buffer serves: the Annex B input, the scaled
//!   pictures, the packets and the output payloads (carved from one growing buffer per rung) are
//!   reused; what remains is FFmpeg's own copy of each input packet.
//!
//! Not `Send` (ffmpeg-next's swscale context is not): build it on the thread that feeds it.
//! Encoding a ladder is whole-core work (BENCHMARKS.md, "Transcoder ladder"); it belongs on a
//! thread of its own, not on the runtime's workers.

use bytes::{Bytes, BytesMut};
use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;

use super::FfmpegError;
use crate::codec::h264;
use crate::ladder::{Ladder, Profile, Rung};
use crate::media::{Codec, Frame, TrackInfo};

/// The longest run without a keyframe: a source that has none for this long (in microseconds)
/// gets one forced in every rung, so players can join and switch (the re-encode's rule too).
pub const MAX_GOP_US: i64 = 2_000_000;

/// What an encoder is opened for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Picture width (even).
    pub width: u32,
    /// Picture height (even).
    pub height: u32,
    /// Frames a second, for rate control and the level.
    pub fps: u32,
    /// Target bitrate, kbit/s.
    pub bitrate_kbps: u32,
    /// The H.264 profile.
    pub profile: Profile,
}

/// An H.264 encoder of one rung: YUV 4:2:0 pictures in, access units out.
pub trait VideoEncoder {
    /// Encodes `picture` (YUV 4:2:0 at the opened size) at `pts` microseconds, an IDR when
    /// `idr`; appends the access units it finished to `out`: length-prefixed NAL units, SPS and
    /// PPS in band before every IDR, dts equal to pts, keyframes flagged.
    fn encode(
        &mut self,
        picture: &mut ff::frame::Video,
        pts: i64,
        idr: bool,
        out: &mut Vec<Frame>,
    ) -> Result<(), FfmpegError>;

    /// Appends what it still holds to `out`; nothing may be encoded after.
    fn flush(&mut self, out: &mut Vec<Frame>) -> Result<(), FfmpegError>;

    /// The AVCDecoderConfigurationRecord of its output, once it produced SPS and PPS.
    fn config(&self) -> Option<&Bytes>;
}

/// How a [`LadderEncoder`] opens each rung's encoder.
pub type OpenEncoder = fn(&EncoderSettings) -> Result<Box<dyn VideoEncoder>, FfmpegError>;

/// Output payloads are carved from a buffer of at least this many bytes per rung: one
/// allocation per this many bytes of output instead of one per frame.
const PAYLOAD_CHUNK: usize = 256 * 1024;

/// libx264 in-process: `veryfast`, `zerolatency` (no lookahead: a frame in, its access unit
/// out), no B-frames, one thread (the caller's), keyframes only when asked.
pub struct X264 {
    encoder: ff::encoder::Video,
    packet: ff::Packet,
    payloads: BytesMut,
    config: Option<Bytes>,
}

impl X264 {
    /// Opens libx264 for `s`.
    pub fn open(s: &EncoderSettings) -> Result<X264, FfmpegError> {
        super::init();
        let x264 = ff::encoder::find_by_name("libx264")
            .ok_or(FfmpegError::MissingCodec("libx264 encoder"))?;
        let mut ctx = ff::codec::context::Context::new_with_codec(x264);
        // One thread: the caller's (libx264 would start its own threads otherwise).
        ctx.set_threading(ff::threading::Config::count(1));
        let mut enc = ctx.encoder().video()?;
        enc.set_width(s.width);
        enc.set_height(s.height);
        enc.set_format(Pixel::YUV420P);
        enc.set_time_base((1, 1_000_000));
        // Without it x264 takes the time base for the frame rate (a million a second): a wrong
        // level in the SPS and rate control for the wrong rate.
        enc.set_frame_rate(Some((s.fps.max(1) as i32, 1)));
        enc.set_max_b_frames(0);
        enc.set_bit_rate(s.bitrate_kbps as usize * 1000);
        let mut opts = ff::Dictionary::new();
        opts.set("preset", "veryfast");
        opts.set("tune", "zerolatency");
        opts.set("profile", s.profile.name());
        // A picture sent as type I becomes an IDR, not a recovery-point I-frame.
        opts.set("forced-idr", "1");
        // Keyframes only where the ladder forces them, so every rung has them at the same
        // pictures; VBV: peaks at the bitrate over a one-second buffer.
        let params = format!(
            "keyint=infinite:min-keyint=1:scenecut=0:repeat-headers=1:bframes=0:\
             bitrate={k}:vbv-maxrate={k}:vbv-bufsize={k}",
            k = s.bitrate_kbps
        );
        opts.set("x264-params", &params);
        Ok(X264 {
            encoder: enc.open_as_with(x264, opts)?,
            packet: ff::Packet::empty(),
            payloads: BytesMut::new(),
            config: None,
        })
    }

    /// [`X264::open`] as an [`OpenEncoder`].
    pub fn open_boxed(s: &EncoderSettings) -> Result<Box<dyn VideoEncoder>, FfmpegError> {
        Ok(Box::new(X264::open(s)?))
    }

    fn drain(&mut self, out: &mut Vec<Frame>) {
        while self.encoder.receive_packet(&mut self.packet).is_ok() {
            let Some(data) = self.packet.data() else {
                continue;
            };
            if self.payloads.capacity() < data.len() + 16 {
                self.payloads.reserve(PAYLOAD_CHUNK.max(data.len() + 16));
            }
            let au = h264::annexb_to_avcc(data, &mut self.payloads);
            if let (Some(sps), Some(pps)) = (au.sps, au.pps)
                && self
                    .config
                    .as_deref()
                    .is_none_or(|c| !same_sets(c, sps, pps))
            {
                self.config = h264::avcc_record(sps, pps).or(self.config.take());
            }
            let pts = self.packet.pts().unwrap_or_default();
            out.push(Frame {
                pts,
                dts: pts,
                keyframe: self.packet.is_key(),
                payload: self.payloads.split().freeze(),
            });
        }
    }
}

/// Whether `avcc` holds exactly this SPS and PPS.
fn same_sets(avcc: &[u8], sps: &[u8], pps: &[u8]) -> bool {
    h264::avcc_parameter_sets(avcc).is_some_and(|(_, sets)| sets == [sps, pps])
}

impl VideoEncoder for X264 {
    fn encode(
        &mut self,
        picture: &mut ff::frame::Video,
        pts: i64,
        idr: bool,
        out: &mut Vec<Frame>,
    ) -> Result<(), FfmpegError> {
        picture.set_pts(Some(pts));
        // Always set: a decoded picture carries its own type (P, B), which libx264 would obey.
        picture.set_kind(if idr {
            ff::picture::Type::I
        } else {
            ff::picture::Type::None
        });
        self.encoder.send_frame(picture)?;
        self.drain(out);
        Ok(())
    }

    fn flush(&mut self, out: &mut Vec<Frame>) -> Result<(), FfmpegError> {
        self.encoder.send_eof()?;
        self.drain(out);
        Ok(())
    }

    fn config(&self) -> Option<&Bytes> {
        self.config.as_ref()
    }
}

/// Decodes a source's H.264 access units once for every rung.
pub struct SourceDecoder {
    decoder: ff::decoder::Video,
    decoded: ff::frame::Video,
    annexb: Vec<u8>,
    /// Frames FFmpeg could not decode, and pictures without a timestamp.
    pub errors: u64,
}

impl SourceDecoder {
    /// An H.264 decoder (FFmpeg's, one thread: no frame-threading delay).
    pub fn new() -> Result<SourceDecoder, FfmpegError> {
        super::init();
        let codec = ff::decoder::find(ff::codec::Id::H264)
            .ok_or(FfmpegError::MissingCodec("H.264 decoder"))?;
        let mut ctx = ff::codec::context::Context::new_with_codec(codec);
        ctx.set_threading(ff::threading::Config::count(1));
        let decoder = ctx.decoder().video()?;
        Ok(SourceDecoder {
            decoder,
            decoded: ff::frame::Video::empty(),
            annexb: Vec::new(),
            errors: 0,
        })
    }

    /// Decodes one access unit (`avcc`: the source track's config, whose parameter sets go in
    /// band before a keyframe that lacks them) and calls `each` with every picture it finished,
    /// in presentation order, its pts set to the source's (microseconds).
    pub fn push(
        &mut self,
        frame: &Frame,
        avcc: Option<&[u8]>,
        each: impl FnMut(&mut ff::frame::Video) -> Result<(), FfmpegError>,
    ) -> Result<(), FfmpegError> {
        h264::avcc_to_annexb_into(&frame.payload, avcc, frame.keyframe, &mut self.annexb);
        let mut packet = ff::Packet::copy(&self.annexb);
        packet.set_pts(Some(frame.pts));
        packet.set_dts(Some(frame.dts));
        if self.decoder.send_packet(&packet).is_err() {
            self.errors += 1;
            return Ok(());
        }
        self.receive(each)
    }

    /// Ends the input and calls `each` with the pictures the decoder still held (those waiting
    /// for reordering behind B-frames).
    pub fn flush(
        &mut self,
        each: impl FnMut(&mut ff::frame::Video) -> Result<(), FfmpegError>,
    ) -> Result<(), FfmpegError> {
        self.decoder.send_eof()?;
        self.receive(each)
    }

    fn receive(
        &mut self,
        mut each: impl FnMut(&mut ff::frame::Video) -> Result<(), FfmpegError>,
    ) -> Result<(), FfmpegError> {
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            let Some(pts) = self.decoded.timestamp().or(self.decoded.pts()) else {
                self.errors += 1;
                continue;
            };
            self.decoded.set_pts(Some(pts));
            each(&mut self.decoded)?;
        }
        Ok(())
    }
}

/// What a [`LadderEncoder`] hands back, per rung (the rung's index in
/// [`LadderEncoder::rungs`]).
#[derive(Clone, Debug, PartialEq)]
pub enum LadderEvent {
    /// The rung's track description: before its first frame, and again when it changes.
    Config {
        /// The rung.
        rung: usize,
        /// H.264, its avcC, its size and profile.
        info: TrackInfo,
    },
    /// An encoded frame of the rung.
    Frame {
        /// The rung.
        rung: usize,
        /// The frame (pts the source's, dts = pts).
        frame: Frame,
    },
}

/// One rung: its scaler, its scaled picture and its encoder.
pub struct RungEncoder {
    rung: Rung,
    scaler: Option<scaling::Context>,
    picture: ff::frame::Video,
    encoder: Box<dyn VideoEncoder>,
    /// Microseconds between frames when the rung caps the frame rate.
    interval: Option<i64>,
    /// The next frame's due time, under a frame-rate cap.
    due: Option<i64>,
    /// The config last announced.
    declared: Option<Bytes>,
    frames: Vec<Frame>,
}

impl RungEncoder {
    /// The encoder of `rung` (its size as [`Ladder::for_source`] gave it) for a source of
    /// `source_fps` frames a second (30 when not known), opened with `open`.
    pub fn new(
        rung: Rung,
        source_fps: Option<f64>,
        open: OpenEncoder,
    ) -> Result<RungEncoder, FfmpegError> {
        let source_fps = source_fps.map_or(30, |f| f.round().clamp(1.0, 240.0) as u32);
        let fps = rung.fps.map_or(source_fps, |f| f.min(source_fps));
        let encoder = open(&EncoderSettings {
            width: rung.width,
            height: rung.height,
            fps,
            bitrate_kbps: rung.bitrate_kbps,
            profile: rung.profile,
        })?;
        Ok(RungEncoder {
            interval: rung.fps.map(|f| 1_000_000 / i64::from(f.max(1))),
            picture: ff::frame::Video::new(Pixel::YUV420P, rung.width, rung.height),
            rung,
            scaler: None,
            encoder,
            due: None,
            declared: None,
            frames: Vec::with_capacity(4),
        })
    }

    /// The rung.
    pub fn rung(&self) -> &Rung {
        &self.rung
    }

    /// Scales `source` into the rung's picture; false (nothing done) when the source already is
    /// the rung's size and format and is encoded as it is.
    pub fn scale(&mut self, source: &ff::frame::Video) -> Result<bool, FfmpegError> {
        let (format, width, height) = (source.format(), source.width(), source.height());
        if format == Pixel::YUV420P && width == self.rung.width && height == self.rung.height {
            return Ok(false);
        }
        let current = self.scaler.as_ref().map(|s| *s.input());
        let wanted = scaling::context::Definition {
            format,
            width,
            height,
        };
        let scaler = match &mut self.scaler {
            Some(s) if current == Some(wanted) => s,
            slot => slot.insert(scaling::Context::get(
                format,
                width,
                height,
                Pixel::YUV420P,
                self.rung.width,
                self.rung.height,
                scaling::Flags::BILINEAR,
            )?),
        };
        scaler.run(source, &mut self.picture)?;
        Ok(true)
    }

    /// Whether the rung takes a picture at `pts`: always a keyframe, else under its frame-rate
    /// cap once the next frame is due (a grid of the cap's interval, restarted at keyframes and
    /// after gaps).
    fn takes(&mut self, pts: i64, key: bool) -> bool {
        let Some(interval) = self.interval else {
            return true;
        };
        // An eighth of an interval early still counts: timestamps are rounded to microseconds.
        let take = key || self.due.is_none_or(|due| pts >= due - interval / 8);
        if take {
            let next = self.due.filter(|_| !key).unwrap_or(pts) + interval;
            // Behind by more than a frame (a gap in the source): restart the grid here.
            self.due = Some(if next <= pts { pts + interval } else { next });
        }
        take
    }

    /// Scales and encodes `source` (pts set) unless the rung's frame rate skips it, an IDR when
    /// `key`; appends its config (when new) and frames to `out` as rung `index`.
    pub fn push(
        &mut self,
        source: &mut ff::frame::Video,
        key: bool,
        index: usize,
        out: &mut Vec<LadderEvent>,
    ) -> Result<(), FfmpegError> {
        let pts = source.pts().unwrap_or_default();
        if !self.takes(pts, key) {
            return Ok(());
        }
        let picture = match self.scale(source)? {
            true => &mut self.picture,
            false => source,
        };
        self.encoder.encode(picture, pts, key, &mut self.frames)?;
        self.emit(index, out);
        Ok(())
    }

    /// Drains the encoder into `out`.
    pub fn flush(&mut self, index: usize, out: &mut Vec<LadderEvent>) -> Result<(), FfmpegError> {
        self.encoder.flush(&mut self.frames)?;
        self.emit(index, out);
        Ok(())
    }

    fn emit(&mut self, rung: usize, out: &mut Vec<LadderEvent>) {
        if self.frames.is_empty() {
            return;
        }
        if let Some(config) = self.encoder.config()
            && self.declared.as_ref() != Some(config)
        {
            self.declared = Some(config.clone());
            let mut info = TrackInfo::from_config(Codec::H264, Some(config.clone()));
            info.rendition = Some(self.rung.name.as_str().into());
            out.push(LadderEvent::Config { rung, info });
        }
        out.extend(
            self.frames
                .drain(..)
                .map(|frame| LadderEvent::Frame { rung, frame }),
        );
    }
}

/// The rungs and the keyframe decision shared by every rung.
struct Rungs {
    ladder: Ladder,
    fps: Option<f64>,
    open: OpenEncoder,
    rungs: Vec<RungEncoder>,
    /// The pts of the last keyframe forced in every rung.
    last_key: Option<i64>,
    /// Pictures before this pts are decoded (later ones refer to them) but not encoded.
    encode_from: i64,
}

impl Rungs {
    fn picture(
        &mut self,
        picture: &mut ff::frame::Video,
        out: &mut Vec<LadderEvent>,
    ) -> Result<(), FfmpegError> {
        if self.rungs.is_empty() {
            let rungs = self.ladder.for_source(picture.width(), picture.height());
            if rungs.is_empty() {
                return Err(FfmpegError::BadConfig("a picture of zero size"));
            }
            for rung in rungs {
                self.rungs
                    .push(RungEncoder::new(rung, self.fps, self.open)?);
            }
        }
        let pts = picture.pts().unwrap_or_default();
        if pts < self.encode_from {
            return Ok(());
        }
        let key = picture.is_key()
            || self
                .last_key
                .is_none_or(|k| pts < k || pts - k >= MAX_GOP_US);
        if key {
            self.last_key = Some(pts);
        }
        for (i, rung) in self.rungs.iter_mut().enumerate() {
            rung.push(picture, key, i, out)?;
        }
        Ok(())
    }
}

/// A source's ABR ladder: decode once, per rung scale once and encode.
pub struct LadderEncoder {
    decoder: SourceDecoder,
    rungs: Rungs,
}

impl LadderEncoder {
    /// The ladder encoder of a source of about `fps` frames a second (30 when not known), with
    /// libx264 ([`X264`]); the rungs are opened on the first decoded picture (their sizes come
    /// from it).
    pub fn new(ladder: Ladder, fps: Option<f64>) -> Result<LadderEncoder, FfmpegError> {
        Self::with_encoder(ladder, fps, X264::open_boxed)
    }

    /// [`LadderEncoder::new`] with another encoder.
    pub fn with_encoder(
        ladder: Ladder,
        fps: Option<f64>,
        open: OpenEncoder,
    ) -> Result<LadderEncoder, FfmpegError> {
        Ok(LadderEncoder {
            decoder: SourceDecoder::new()?,
            rungs: Rungs {
                ladder,
                fps,
                open,
                rungs: Vec::new(),
                last_key: None,
                encode_from: i64::MIN,
            },
        })
    }

    /// The rungs made, in the ladder's order (the index [`LadderEvent`]s name); empty until the
    /// first picture is decoded.
    pub fn rungs(&self) -> impl Iterator<Item = &Rung> {
        self.rungs.rungs.iter().map(RungEncoder::rung)
    }

    /// Frames FFmpeg could not decode.
    pub fn errors(&self) -> u64 {
        self.decoder.errors
    }

    /// Takes one source access unit (`avcc`: the source track's config) and appends what every
    /// rung made of the pictures it completed to `out`. Feed it from a keyframe on: frames
    /// before one refer to pictures the decoder never got.
    pub fn push(
        &mut self,
        frame: &Frame,
        avcc: Option<&[u8]>,
        out: &mut Vec<LadderEvent>,
    ) -> Result<(), FfmpegError> {
        let rungs = &mut self.rungs;
        self.decoder
            .push(frame, avcc, |picture| rungs.picture(picture, out))
    }

    /// Encodes only the pictures from `pts` on (those before are still decoded): a ladder that
    /// starts on a broadcast already running joins at its live edge, not a group behind it. The
    /// first picture encoded is an IDR in every rung; the following ones fall on the source's
    /// keyframes again.
    pub fn encode_from(&mut self, pts: i64) {
        self.rungs.encode_from = pts;
    }

    /// Ends the source: the pictures still held for reordering are encoded and every encoder
    /// drained into `out`.
    pub fn flush(&mut self, out: &mut Vec<LadderEvent>) -> Result<(), FfmpegError> {
        let rungs = &mut self.rungs;
        self.decoder.flush(|picture| rungs.picture(picture, out))?;
        for (i, rung) in rungs.rungs.iter_mut().enumerate() {
            rung.flush(i, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffmpeg::testsrc::{self, Source, SourceSpec};

    fn source(width: u32, height: u32, frames: u32, keyint: u32) -> Source {
        testsrc::h264(&SourceSpec {
            width,
            height,
            fps: 30,
            frames,
            keyint,
            b_frames: 2,
            bitrate_kbps: 1500,
        })
        .unwrap()
    }

    #[derive(Default)]
    struct Rendition {
        info: Option<TrackInfo>,
        frames: Vec<Frame>,
    }

    /// Runs `ladder` over `source`; the rungs made and what each produced.
    fn run(ladder: Ladder, source: &Source) -> (Vec<Rung>, Vec<Rendition>) {
        let mut enc = LadderEncoder::new(ladder, Some(30.0)).unwrap();
        let mut out = Vec::new();
        for f in &source.frames {
            enc.push(f, Some(&source.avcc), &mut out).unwrap();
        }
        enc.flush(&mut out).unwrap();
        assert_eq!(enc.errors(), 0);
        let rungs: Vec<Rung> = enc.rungs().cloned().collect();
        let mut made: Vec<Rendition> = rungs.iter().map(|_| Rendition::default()).collect();
        for e in out {
            match e {
                LadderEvent::Config { rung, info } => made[rung].info = Some(info),
                LadderEvent::Frame { rung, frame } => {
                    assert!(
                        made[rung].info.is_some(),
                        "rung {rung}: a frame before its config"
                    );
                    made[rung].frames.push(frame);
                }
            }
        }
        (rungs, made)
    }

    /// A picture decoded back: width, height, pts, keyframe.
    type Picture = (u32, u32, i64, bool);

    fn decode(r: &Rendition) -> Vec<Picture> {
        let mut decoder = SourceDecoder::new().unwrap();
        let avcc = r.info.as_ref().unwrap().config.clone().unwrap();
        let mut pictures = Vec::new();
        let mut each = |p: &mut ff::frame::Video| {
            pictures.push((p.width(), p.height(), p.pts().unwrap(), p.is_key()));
            Ok(())
        };
        for f in &r.frames {
            decoder.push(f, Some(&avcc), &mut each).unwrap();
        }
        decoder.flush(&mut each).unwrap();
        assert_eq!(decoder.errors, 0);
        pictures
    }

    fn keyframes(frames: &[Frame]) -> Vec<i64> {
        let mut k: Vec<i64> = frames
            .iter()
            .filter(|f| f.keyframe)
            .map(|f| f.pts)
            .collect();
        k.sort_unstable();
        k
    }

    /// A ladder that joins a running source mid-GOP (a transcoder taking a job over) encodes
    /// from there, starting with an IDR in every rung, and is back on the source's keyframes
    /// from the next one.
    #[test]
    fn a_ladder_joining_mid_gop_starts_with_an_idr_there() {
        let src = source(640, 360, 60, 20);
        let mut sorted: Vec<i64> = src.frames.iter().map(|f| f.pts).collect();
        sorted.sort_unstable();
        let join = sorted[25]; // between the source's IDRs at frames 20 and 40
        let ladder = Ladder::new(
            "test",
            vec![
                Rung::new("360p", 360, None, 800, Profile::High),
                Rung::new("180p", 180, None, 200, Profile::Baseline),
            ],
        )
        .unwrap();
        let mut enc = LadderEncoder::new(ladder, Some(30.0)).unwrap();
        enc.encode_from(join);
        let mut out = Vec::new();
        for f in &src.frames {
            enc.push(f, Some(&src.avcc), &mut out).unwrap();
        }
        enc.flush(&mut out).unwrap();
        for rung in 0..2 {
            let frames: Vec<&Frame> = out
                .iter()
                .filter_map(|e| match e {
                    LadderEvent::Frame { rung: r, frame } if *r == rung => Some(frame),
                    _ => None,
                })
                .collect();
            assert_eq!(frames.len(), 60 - 25, "rung {rung}");
            assert_eq!(frames[0].pts, join, "rung {rung}");
            let keys: Vec<i64> = frames
                .iter()
                .filter(|f| f.keyframe)
                .map(|f| f.pts)
                .collect();
            assert_eq!(keys, [join, sorted[40]], "rung {rung}");
        }
    }

    #[test]
    fn renditions_are_sized_b_frame_free_and_switchable_at_the_same_keyframes() {
        // 3 s of 640×360 at 30 fps with 2 B-frames and an IDR every 20 frames.
        let src = source(640, 360, 90, 20);
        assert!(
            src.frames.iter().any(|f| f.dts != f.pts),
            "the source has B-frames"
        );
        let source_keys = keyframes(&src.frames);
        assert_eq!(source_keys.len(), 5);
        let mut source_pts: Vec<i64> = src.frames.iter().map(|f| f.pts).collect();
        source_pts.sort_unstable();
        let ladder = Ladder::new(
            "test",
            vec![
                Rung::new("360p", 360, None, 800, Profile::High),
                Rung::new("240p", 240, None, 400, Profile::Main),
                Rung::new("180p", 180, Some(15), 200, Profile::Baseline),
            ],
        )
        .unwrap();
        let (rungs, made) = run(ladder, &src);
        let sizes: Vec<(u32, u32)> = rungs.iter().map(|r| (r.width, r.height)).collect();
        assert_eq!(sizes, [(640, 360), (426, 240), (320, 180)]);
        for (rung, r) in rungs.iter().zip(&made) {
            let name = &rung.name;
            let video = r.info.as_ref().unwrap().video.clone().unwrap();
            assert_eq!(
                (video.width, video.height),
                (rung.width, rung.height),
                "{name}"
            );
            assert_eq!(video.profile, rung.profile.name(), "{name}");
            // No B-frames: decode order is presentation order.
            assert!(r.frames.iter().all(|f| f.dts == f.pts), "{name}");
            assert!(r.frames.windows(2).all(|w| w[0].pts < w[1].pts), "{name}");
            // IDRs exactly where the source has them, in every rung.
            assert_eq!(keyframes(&r.frames), source_keys, "{name}");
            let pictures = decode(r);
            assert_eq!(pictures.len(), r.frames.len(), "{name}");
            for (p, f) in pictures.iter().zip(&r.frames) {
                assert_eq!(*p, (rung.width, rung.height, f.pts, f.keyframe), "{name}");
            }
            let bits: usize = r.frames.iter().map(|f| f.payload.len() * 8).sum();
            let kbps = bits as f64 / 3.0 / 1000.0;
            eprintln!("{name}: {kbps:.0} kbit/s for {}", rung.bitrate_kbps);
            // Measured: 904, 451 and 231 kbit/s (five IDRs in 3 s cost their share); x264 is
            // deterministic on one thread.
            let asked = f64::from(rung.bitrate_kbps);
            assert!(
                (0.75 * asked..=1.25 * asked).contains(&kbps),
                "{name}: {kbps:.0} kbit/s for {asked}"
            );
        }
        // Full rate: every source picture; capped at 15 fps: every other one (the keyframes
        // fall on even frames).
        let pts = |r: &Rendition| r.frames.iter().map(|f| f.pts).collect::<Vec<_>>();
        assert_eq!(pts(&made[0]), source_pts);
        assert_eq!(pts(&made[1]), source_pts);
        let half: Vec<i64> = source_pts.iter().copied().step_by(2).collect();
        assert_eq!(pts(&made[2]), half);
    }

    #[test]
    fn a_small_source_is_never_upscaled() {
        let src = source(320, 180, 30, 30);
        let (rungs, made) = run(Ladder::default_ladder(), &src);
        assert_eq!(rungs.len(), 1);
        assert_eq!((rungs[0].width, rungs[0].height), (320, 180));
        let pictures = decode(&made[0]);
        assert_eq!(pictures.len(), 30);
        assert!(pictures.iter().all(|p| (p.0, p.1) == (320, 180)));
    }

    #[test]
    fn a_long_gop_gets_keyframes_every_two_seconds_in_every_rung() {
        // 2.5 s with one IDR, at the start.
        let src = source(320, 180, 75, 1000);
        assert_eq!(keyframes(&src.frames), [0]);
        let ladder = Ladder::new(
            "test",
            vec![
                Rung::new("180p", 180, None, 300, Profile::High),
                Rung::new("120p", 120, Some(20), 150, Profile::Baseline),
            ],
        )
        .unwrap();
        let (rungs, made) = run(ladder, &src);
        assert_eq!((rungs[1].width, rungs[1].height), (214, 120));
        for r in &made {
            assert_eq!(keyframes(&r.frames), [0, MAX_GOP_US]);
        }
    }

    /// An encoder that encodes nothing: one empty frame per picture.
    struct Null;

    impl VideoEncoder for Null {
        fn encode(
            &mut self,
            _: &mut ff::frame::Video,
            pts: i64,
            idr: bool,
            out: &mut Vec<Frame>,
        ) -> Result<(), FfmpegError> {
            out.push(Frame {
                pts,
                dts: pts,
                keyframe: idr,
                payload: Bytes::new(),
            });
            Ok(())
        }

        fn flush(&mut self, _: &mut Vec<Frame>) -> Result<(), FfmpegError> {
            Ok(())
        }

        fn config(&self) -> Option<&Bytes> {
            None
        }
    }

    #[test]
    fn a_frame_rate_cap_keeps_a_steady_grid_and_every_keyframe() {
        let open: OpenEncoder = |_| Ok(Box::new(Null));
        let taken = |source_fps: i64, cap: u32, keys: &[i64]| {
            let mut r =
                RungEncoder::new(Rung::new("r", 180, Some(cap), 1, Profile::High), None, open)
                    .unwrap();
            (0..source_fps * 10)
                .map(|n| n * 1_000_000 / source_fps)
                .filter(|&pts| r.takes(pts, keys.contains(&pts)))
                .collect::<Vec<_>>()
        };
        // 60 → 30: every other frame; 30 → 25: 25 a second; 25 → 30: all of them.
        assert_eq!(taken(60, 30, &[0]).len(), 300);
        assert_eq!(taken(30, 25, &[0]).len(), 250);
        assert_eq!(taken(25, 30, &[0]).len(), 250);
        // A keyframe on an odd frame is taken, and the grid restarts from it.
        let t = taken(60, 30, &[0, 7_000_000 / 60]);
        assert!(t.contains(&(7_000_000 / 60)));
        assert!(t.contains(&(9_000_000 / 60)));
    }
}
