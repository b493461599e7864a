//! AAC → Opus, once per broadcast: decode AAC (fed as ADTS, so no extradata has to be set
//! through FFmpeg's raw pointers), resample to 48 kHz stereo, cut into 20 ms frames and encode
//! with libopus.
//!
//! Guarantees: output timestamps continue from the first input frame's, in 48 kHz samples, so
//! the Opus track stays in sync with the video it was published with; a frame FFmpeg cannot
//! decode is skipped (counted), never fatal.

use bytes::Bytes;
use ff::ChannelLayout;
use ff::format::Sample;
use ff::format::sample::Type as SampleType;
use ffmpeg_next as ff;

use super::FfmpegError;
use crate::media::Frame;

/// Opus frame length at 48 kHz (20 ms).
pub const OPUS_FRAME: usize = 960;

/// The AAC → Opus transcoder of one broadcast.
pub struct AacToOpus {
    adts: [u8; 7],
    decoder: ff::decoder::Audio,
    resampler: Option<ff::software::resampling::Context>,
    encoder: ff::encoder::Audio,
    fifo: Vec<f32>,
    /// Presentation time of the first sample in `fifo`, microseconds.
    fifo_pts: Option<i64>,
    decoded: ff::frame::Audio,
    resampled: ff::frame::Audio,
    /// Frames FFmpeg could not decode.
    pub errors: u64,
}

/// The fixed part of an ADTS header for an AudioSpecificConfig.
fn adts_template(asc: &[u8]) -> Result<[u8; 7], FfmpegError> {
    let object = asc
        .first()
        .ok_or(FfmpegError::BadConfig("empty AudioSpecificConfig"))?
        >> 3;
    let freq = ((asc[0] & 7) << 1)
        | (asc
            .get(1)
            .ok_or(FfmpegError::BadConfig("short AudioSpecificConfig"))?
            >> 7);
    let channels = (asc[1] >> 3) & 0x0f;
    if !(1..=4).contains(&object) || freq > 12 || channels == 0 || channels > 7 {
        return Err(FfmpegError::BadConfig(
            "AAC profile, rate or channels ADTS cannot carry",
        ));
    }
    let profile = object - 1;
    Ok([
        0xFF,
        0xF1,
        (profile << 6) | (freq << 2) | (channels >> 2),
        (channels & 3) << 6,
        0,
        0x1F,
        0xFC,
    ])
}

impl AacToOpus {
    /// A transcoder for AAC described by `asc` (its AudioSpecificConfig).
    pub fn new(asc: &[u8], bitrate: usize) -> Result<Self, FfmpegError> {
        super::init();
        let adts = adts_template(asc)?;
        let aac = ff::decoder::find(ff::codec::Id::AAC)
            .ok_or(FfmpegError::MissingCodec("AAC decoder"))?;
        let decoder = ff::codec::context::Context::new_with_codec(aac)
            .decoder()
            .audio()?;
        let opus = ff::encoder::find_by_name("libopus")
            .ok_or(FfmpegError::MissingCodec("libopus encoder"))?;
        let mut enc = ff::codec::context::Context::new_with_codec(opus)
            .encoder()
            .audio()?;
        enc.set_rate(48_000);
        enc.set_channel_layout(ChannelLayout::STEREO);
        enc.set_channels(2);
        enc.set_format(Sample::F32(SampleType::Packed));
        enc.set_bit_rate(bitrate);
        enc.set_time_base((1, 48_000));
        let encoder = enc.open_as(opus)?;
        Ok(Self {
            adts,
            decoder,
            resampler: None,
            encoder,
            fifo: Vec::with_capacity(OPUS_FRAME * 4),
            fifo_pts: None,
            decoded: ff::frame::Audio::empty(),
            resampled: ff::frame::Audio::empty(),
            errors: 0,
        })
    }

    /// Transcodes one AAC frame; appends the Opus frames that are now complete to `out`.
    pub fn push(&mut self, aac: &Frame, out: &mut Vec<Frame>) -> Result<(), FfmpegError> {
        let len = aac.payload.len() + 7;
        let mut adts = Vec::with_capacity(len);
        adts.extend_from_slice(&self.adts);
        adts[3] |= ((len >> 11) & 3) as u8;
        adts[4] = (len >> 3) as u8;
        adts[5] |= ((len & 7) << 5) as u8;
        adts.extend_from_slice(&aac.payload);
        if self.decoder.send_packet(&ff::Packet::copy(&adts)).is_err() {
            self.errors += 1;
            return Ok(());
        }
        self.fifo_pts.get_or_insert(aac.pts);
        while self.decoder.receive_frame(&mut self.decoded).is_ok() {
            if self.resampler.is_none() {
                let layout = match self.decoded.channel_layout() {
                    l if l.is_empty() => ChannelLayout::default(i32::from(self.decoded.channels())),
                    l => l,
                };
                self.resampler = Some(ff::software::resampling::Context::get(
                    self.decoded.format(),
                    layout,
                    self.decoded.rate(),
                    Sample::F32(SampleType::Packed),
                    ChannelLayout::STEREO,
                    48_000,
                )?);
            }
            if let Some(r) = &mut self.resampler {
                r.run(&self.decoded, &mut self.resampled)?;
                let n = self.resampled.samples() * 2;
                let bytes = &self.resampled.data(0)[..n * 4];
                self.fifo.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
        }
        while self.fifo.len() >= OPUS_FRAME * 2 {
            self.encode_one(out)?;
        }
        Ok(())
    }

    fn encode_one(&mut self, out: &mut Vec<Frame>) -> Result<(), FfmpegError> {
        let pts_us = self.fifo_pts.unwrap_or(0);
        let mut frame = ff::frame::Audio::new(
            Sample::F32(SampleType::Packed),
            OPUS_FRAME,
            ChannelLayout::STEREO,
        );
        frame.set_rate(48_000);
        let dst = frame.data_mut(0);
        for (d, s) in dst
            .chunks_exact_mut(4)
            .zip(self.fifo.drain(..OPUS_FRAME * 2))
        {
            d.copy_from_slice(&s.to_ne_bytes());
        }
        frame.set_pts(Some(pts_us * 48 / 1000));
        self.fifo_pts = Some(pts_us + (OPUS_FRAME as i64) * 1_000_000 / 48_000);
        self.encoder.send_frame(&frame)?;
        let mut packet = ff::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            let pts = packet.pts().map_or(pts_us, |p| p * 1000 / 48);
            let payload = Bytes::copy_from_slice(packet.data().unwrap_or_default());
            out.push(Frame {
                pts,
                dts: pts,
                keyframe: true,
                payload,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adts_header_from_asc() {
        // AAC-LC, 48 kHz, stereo.
        assert_eq!(
            adts_template(&[0x11, 0x90]).unwrap(),
            [0xFF, 0xF1, 0x4C, 0x80, 0, 0x1F, 0xFC]
        );
        assert!(adts_template(&[0x11]).is_err());
    }
}
