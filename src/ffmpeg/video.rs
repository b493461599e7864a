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
use crate::codec::h264;
use crate::media::Frame;

/// The re-encoder of one broadcast's video.
pub(crate) struct Reencoder {
    decoder: ff::decoder::Video,
    encoder: Option<ff::encoder::Video>,
    decoded: ff::frame::Video,
    /// The output's AVCDecoderConfigurationRecord, once the encoder produced SPS and PPS.
    pub(crate) config: Option<Bytes>,
    /// Frames FFmpeg could not decode.
    pub(crate) errors: u64,
    /// The source's frame rate (frames per second), for the encoder's rate control and level.
    fps: u32,
}

impl Reencoder {
    /// A re-encoder for a source of about `fps` frames a second (30 when not known yet); the
    /// encoder opens on the first decoded picture (its size comes from it).
    pub(crate) fn new(fps: Option<f64>) -> Result<Self, FfmpegError> {
        super::init();
        let codec = ff::decoder::find(ff::codec::Id::H264)
            .ok_or(FfmpegError::MissingCodec("H.264 decoder"))?;
        let decoder = ff::codec::context::Context::new_with_codec(codec)
            .decoder()
            .video()?;
        Ok(Self {
            decoder,
            encoder: None,
            decoded: ff::frame::Video::empty(),
            config: None,
            errors: 0,
            fps: fps.map_or(30, |f| f.round().clamp(1.0, 240.0) as u32),
        })
    }

    fn open_encoder(&mut self) -> Result<(), FfmpegError> {
        let x264 = ff::encoder::find_by_name("libx264")
            .ok_or(FfmpegError::MissingCodec("libx264 encoder"))?;
        let mut enc = ff::codec::context::Context::new_with_codec(x264)
            .encoder()
            .video()?;
        enc.set_width(self.decoded.width());
        enc.set_height(self.decoded.height());
        enc.set_format(ff::format::Pixel::YUV420P);
        enc.set_time_base((1, 1_000_000));
        // Without it x264 takes the time base for the frame rate (a million a second): a wrong
        // level in the SPS and rate control for the wrong rate.
        enc.set_frame_rate(Some((self.fps as i32, 1)));
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
        self.encoder = Some(enc.open_as_with(x264, opts)?);
        Ok(())
    }

    /// Re-encodes one source frame (`avcc` is the source track's config); appends finished
    /// frames, length-prefixed, to `out`.
    pub(crate) fn push(
        &mut self,
        frame: &Frame,
        avcc: Option<&[u8]>,
        out: &mut Vec<Frame>,
    ) -> Result<(), FfmpegError> {
        let annexb = h264::avcc_to_annexb(&frame.payload, avcc, frame.keyframe);
        let mut packet = ff::Packet::copy(&annexb);
        packet.set_pts(Some(frame.pts));
        packet.set_dts(Some(frame.dts));
        if self.decoder.send_packet(&packet).is_err() {
            self.errors += 1;
            return Ok(());
        }
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            if self.decoded.format() != ff::format::Pixel::YUV420P {
                return Err(FfmpegError::BadConfig(
                    "only 4:2:0 8-bit video can be re-encoded",
                ));
            }
            if self.encoder.is_none() {
                self.open_encoder()?;
            }
            let pts = self.decoded.timestamp().or(self.decoded.pts());
            self.decoded.set_pts(pts);
            // An IDR in the source is an IDR in the output: groups stay aligned.
            let kind = if self.decoded.is_key() {
                ff::picture::Type::I
            } else {
                ff::picture::Type::None
            };
            self.decoded.set_kind(kind);
            let Some(enc) = self.encoder.as_mut() else {
                continue;
            };
            enc.send_frame(&self.decoded)?;
            let mut packet = ff::Packet::empty();
            while enc.receive_packet(&mut packet).is_ok() {
                let Some(data) = packet.data() else { continue };
                let mut payload = BytesMut::with_capacity(data.len() + 16);
                let au = h264::annexb_to_avcc(data, &mut payload);
                if let (Some(sps), Some(pps)) = (au.sps, au.pps) {
                    self.config = h264::avcc_record(sps, pps).or(self.config.take());
                }
                let pts = packet.pts().unwrap_or(frame.pts);
                out.push(Frame {
                    pts,
                    dts: pts,
                    keyframe: packet.is_key(),
                    payload: payload.freeze(),
                });
            }
        }
        Ok(())
    }
}
