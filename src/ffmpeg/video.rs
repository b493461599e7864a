//! H.264 with B-frames → H.264 without, once per broadcast, for WebRTC receivers (which do not
//! reorder frames): decode, re-encode with libx264 (`zerolatency`, constrained baseline, same
//! size), forcing an IDR wherever the source has one so groups stay aligned, and at least every
//! 2 s so long-GOP sources start fast.
//!
//! The decoder is fed Annex B with SPS/PPS in band before every IDR, and the encoder's parameter
//! sets are read from its in-band output, so no extradata has to pass through raw pointers.

use bytes::{Bytes, BytesMut};
use ffmpeg_next as ff;

use super::FfmpegError;
use super::ladder::SourceDecoder;
use crate::codec::h264;
use crate::media::Frame;

/// The re-encoder of one broadcast's video.
pub(crate) struct Reencoder {
    /// The source's decoder ([`SourceDecoder`], shared with the ladder).
    decoder: SourceDecoder,
    encoder: Option<ff::encoder::Video>,
    /// The output's AVCDecoderConfigurationRecord, once the encoder produced SPS and PPS.
    pub(crate) config: Option<Bytes>,
    /// The source's frame rate (frames per second), for the encoder's rate control and level.
    fps: u32,
}

impl Reencoder {
    /// A re-encoder for a source of about `fps` frames a second (30 when not known yet); the
    /// encoder opens on the first decoded picture (its size comes from it).
    pub(crate) fn new(fps: Option<f64>) -> Result<Self, FfmpegError> {
        Ok(Self {
            decoder: SourceDecoder::new()?,
            encoder: None,
            config: None,
            fps: fps.map_or(30, |f| f.round().clamp(1.0, 240.0) as u32),
        })
    }

    /// Re-encodes one source frame (`avcc` is the source track's config); appends finished
    /// frames, length-prefixed, to `out`.
    pub(crate) fn push(
        &mut self,
        frame: &Frame,
        avcc: Option<&[u8]>,
        out: &mut Vec<Frame>,
    ) -> Result<(), FfmpegError> {
        let (encoder, config, fps) = (&mut self.encoder, &mut self.config, self.fps);
        self.decoder.push(frame, avcc, |picture| {
            if picture.format() != ff::format::Pixel::YUV420P {
                return Err(FfmpegError::BadConfig(
                    "only 4:2:0 8-bit video can be re-encoded",
                ));
            }
            let enc = match encoder {
                Some(enc) => enc,
                None => encoder.insert(open_encoder(picture.width(), picture.height(), fps)?),
            };
            // An IDR in the source is an IDR in the output: groups stay aligned.
            let kind = if picture.is_key() {
                ff::picture::Type::I
            } else {
                ff::picture::Type::None
            };
            picture.set_kind(kind);
            enc.send_frame(picture)?;
            let mut packet = ff::Packet::empty();
            while enc.receive_packet(&mut packet).is_ok() {
                let Some(data) = packet.data() else { continue };
                let mut payload = BytesMut::with_capacity(data.len() + 16);
                let au = h264::annexb_to_avcc(data, &mut payload);
                if let (Some(sps), Some(pps)) = (au.sps, au.pps) {
                    *config = h264::avcc_record(sps, pps).or(config.take());
                }
                let pts = packet.pts().unwrap_or(frame.pts);
                out.push(Frame {
                    pts,
                    dts: pts,
                    keyframe: packet.is_key(),
                    payload: payload.freeze(),
                });
            }
            Ok(())
        })
    }
}

/// libx264 for a `width`×`height` picture at `fps`: zerolatency, constrained baseline, no
/// B-frames, a keyframe at least every 60 frames.
fn open_encoder(width: u32, height: u32, fps: u32) -> Result<ff::encoder::Video, FfmpegError> {
    let x264 =
        ff::encoder::find_by_name("libx264").ok_or(FfmpegError::MissingCodec("libx264 encoder"))?;
    let mut enc = ff::codec::context::Context::new_with_codec(x264)
        .encoder()
        .video()?;
    enc.set_width(width);
    enc.set_height(height);
    enc.set_format(ff::format::Pixel::YUV420P);
    enc.set_time_base((1, 1_000_000));
    // Without it x264 takes the time base for the frame rate (a million a second): a wrong
    // level in the SPS and rate control for the wrong rate.
    enc.set_frame_rate(Some((fps as i32, 1)));
    enc.set_max_b_frames(0);
    enc.set_gop(60);
    let mut opts = ff::Dictionary::new();
    opts.set("preset", "veryfast");
    opts.set("tune", "zerolatency");
    opts.set("profile", "baseline");
    opts.set(
        "x264-params",
        "keyint=60:min-keyint=1:scenecut=0:repeat-headers=1",
    );
    Ok(enc.open_as_with(x264, opts)?)
}
