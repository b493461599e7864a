//! A synthetic H.264 source made in process with libx264, for tests and benchmarks that need a
//! real bitstream (B-frames, a keyframe every N frames) without files or the ffmpeg CLI.
//!
//! Guarantees: frames come out in decode order as the hub holds them (length-prefixed NAL units,
//! SPS and PPS in band before every IDR, pts/dts in microseconds from 0, keyframes flagged), with
//! the source's AVCDecoderConfigurationRecord. The pictures are deterministic: moving XOR bars
//! with a band of noise that changes every frame, so the encoders that read them have real work
//! (motion and texture) and cannot meet a bitrate by skipping blocks; or, from [`solid`], one
//! colour throughout.

use bytes::{Bytes, BytesMut};
use ffmpeg_next as ff;

use super::FfmpegError;
use crate::codec::h264;
use crate::media::Frame;

/// What to make.
#[derive(Clone, Copy, Debug)]
pub struct SourceSpec {
    /// Picture width (even).
    pub width: u32,
    /// Picture height (even).
    pub height: u32,
    /// Frames a second.
    pub fps: u32,
    /// How many frames.
    pub frames: u32,
    /// A keyframe (IDR) every this many frames.
    pub keyint: u32,
    /// B-frames between references (x264 `bframes`, adaptive placement off: always this many).
    pub b_frames: u32,
    /// The source's bitrate, kbit/s.
    pub bitrate_kbps: u32,
}

/// A made source.
pub struct Source {
    /// Its AVCDecoderConfigurationRecord.
    pub avcc: Bytes,
    /// Its frames, in decode order.
    pub frames: Vec<Frame>,
}

/// Fills `picture` (YUV 4:2:0) with frame `n` of the pattern.
pub fn fill(picture: &mut ff::frame::Video, n: u32) {
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    let stride = picture.stride(0);
    let luma = picture.data_mut(0);
    let mut x_state = 0x9E37_79B9u32 ^ n.wrapping_mul(0x85EB_CA6B);
    for y in 0..h {
        let row = &mut luma[y * stride..y * stride + w];
        let noisy = (y * 4 / h.max(1)) == 2;
        for (x, p) in row.iter_mut().enumerate() {
            let bars = ((x as u32 + 3 * n) ^ (y as u32 + n)) as u8;
            *p = if noisy {
                x_state ^= x_state << 13;
                x_state ^= x_state >> 17;
                x_state ^= x_state << 5;
                bars.wrapping_add((x_state & 0x3f) as u8)
            } else {
                bars
            };
        }
    }
    for plane in 1..3 {
        let stride = picture.stride(plane);
        let (cw, ch) = (w / 2, h / 2);
        let data = picture.data_mut(plane);
        for y in 0..ch {
            for (x, p) in data[y * stride..y * stride + cw].iter_mut().enumerate() {
                *p = (128 + (((x + y) as u32 + n * plane as u32) % 64) as i32 - 32) as u8;
            }
        }
    }
}

/// Fills `picture` (YUV 4:2:0) with one colour, `[y, u, v]`.
pub fn fill_solid(picture: &mut ff::frame::Video, [y, u, v]: [u8; 3]) {
    for (plane, value) in [y, u, v].into_iter().enumerate() {
        let (stride, rows) = (picture.stride(plane), picture.plane_height(plane) as usize);
        picture.data_mut(plane)[..stride * rows].fill(value);
    }
}

/// Encodes `spec.frames` pictures of the pattern with libx264 (`ultrafast`, closed GOPs).
pub fn h264(spec: &SourceSpec) -> Result<Source, FfmpegError> {
    encode(spec, fill)
}

/// Encodes `spec.frames` pictures of one colour (`[y, u, v]`, e.g. from
/// [`crate::ffmpeg::mix::Yuv`]) like [`h264`]: a source whose colour a test can recognise after
/// scaling and re-encoding.
pub fn solid(spec: &SourceSpec, yuv: [u8; 3]) -> Result<Source, FfmpegError> {
    encode(spec, |picture, _| fill_solid(picture, yuv))
}

fn encode(
    spec: &SourceSpec,
    mut fill: impl FnMut(&mut ff::frame::Video, u32),
) -> Result<Source, FfmpegError> {
    super::init();
    let x264 =
        ff::encoder::find_by_name("libx264").ok_or(FfmpegError::MissingCodec("libx264 encoder"))?;
    let mut enc = ff::codec::context::Context::new_with_codec(x264)
        .encoder()
        .video()?;
    enc.set_width(spec.width);
    enc.set_height(spec.height);
    enc.set_format(ff::format::Pixel::YUV420P);
    enc.set_time_base((1, 1_000_000));
    enc.set_frame_rate(Some((spec.fps as i32, 1)));
    enc.set_max_b_frames(spec.b_frames as usize);
    enc.set_bit_rate(spec.bitrate_kbps as usize * 1000);
    let mut opts = ff::Dictionary::new();
    opts.set("preset", "ultrafast");
    let params = format!(
        "bframes={b}:b-adapt=0:keyint={k}:min-keyint={k}:scenecut=0:repeat-headers=1",
        b = spec.b_frames,
        k = spec.keyint
    );
    opts.set("x264-params", &params);
    let mut enc = enc.open_as_with(x264, opts)?;
    let mut picture = ff::frame::Video::new(ff::format::Pixel::YUV420P, spec.width, spec.height);
    let mut packet = ff::Packet::empty();
    let mut avcc = None;
    let mut frames = Vec::with_capacity(spec.frames as usize);
    let mut drain = |enc: &mut ff::encoder::Video, frames: &mut Vec<Frame>| {
        while enc.receive_packet(&mut packet).is_ok() {
            let Some(data) = packet.data() else { continue };
            let mut payload = BytesMut::with_capacity(data.len() + 16);
            let au = h264::annexb_to_avcc(data, &mut payload);
            if let (Some(sps), Some(pps), None) = (au.sps, au.pps, &avcc) {
                avcc = h264::avcc_record(sps, pps);
            }
            let pts = packet.pts().unwrap_or_default();
            frames.push(Frame {
                pts,
                dts: packet.dts().unwrap_or(pts),
                keyframe: packet.is_key(),
                payload: payload.freeze(),
            });
        }
    };
    for n in 0..spec.frames {
        fill(&mut picture, n);
        picture.set_pts(Some(i64::from(n) * 1_000_000 / i64::from(spec.fps)));
        enc.send_frame(&picture)?;
        drain(&mut enc, &mut frames);
    }
    enc.send_eof()?;
    drain(&mut enc, &mut frames);
    let avcc = avcc.ok_or(FfmpegError::BadConfig("libx264 gave no SPS/PPS"))?;
    Ok(Source { avcc, frames })
}
