//! Audio transcoders, once per broadcast: AAC → Opus (for WebRTC viewers of RTMP sources) and
//! Opus → AAC (for RTMP/HTTP-FLV players of WHIP sources). Decode (AAC is fed as ADTS, so no
//! extradata has to be set through FFmpeg's raw pointers), resample to 48 kHz stereo, cut into
//! the encoder's frame size and encode. The two halves are pieces of their own,
//! [`AudioDecoder`] (AAC or Opus in, 48 kHz stereo `f32` out) and [`AudioEncoder`] (those samples
//! in, AAC or Opus out), which the mixer ([`super::mix`]) shares.
//!
//! Guarantees: output timestamps continue from the first input frame's, in 48 kHz samples, so
//! the new track stays in sync with the video it was published with; a frame FFmpeg cannot
//! decode is skipped (counted), never fatal.

use bytes::Bytes;
use ff::ChannelLayout;
use ff::format::Sample;
use ff::format::sample::Type as SampleType;
use ffmpeg_next as ff;

use super::FfmpegError;
use crate::media::Frame;

/// Opus frame length at 48 kHz (20 ms).
pub(crate) const OPUS_FRAME: usize = 960;
/// AAC frame length.
pub(crate) const AAC_FRAME: usize = 1024;
/// The AudioSpecificConfig of what [`AudioTranscoder::opus_to_aac`] produces: AAC-LC, 48 kHz,
/// stereo.
pub(crate) const AAC_48K_STEREO_ASC: [u8; 2] = [0x11, 0x90];

/// How input frames reach the decoder.
enum Framing {
    /// Raw AAC access units, wrapped in ADTS with this fixed header.
    Adts([u8; 7]),
    /// Packets as they are (Opus).
    Raw,
}

/// An AAC or Opus decoder whose output is resampled to 48 kHz interleaved stereo `f32`: the
/// decoding half of [`AudioTranscoder`], and each input of the mixer ([`super::mix`]).
pub(crate) struct AudioDecoder {
    framing: Framing,
    decoder: ff::decoder::Audio,
    resampler: Option<ff::software::resampling::Context>,
    decoded: ff::frame::Audio,
    resampled: ff::frame::Audio,
    packet: Vec<u8>,
    /// Frames FFmpeg could not decode.
    pub(crate) errors: u64,
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

impl AudioDecoder {
    /// A decoder of AAC described by `asc` (its AudioSpecificConfig).
    pub(crate) fn aac(asc: &[u8]) -> Result<Self, FfmpegError> {
        super::init();
        let adts = adts_template(asc)?;
        let aac = ff::decoder::find(ff::codec::Id::AAC)
            .ok_or(FfmpegError::MissingCodec("AAC decoder"))?;
        let decoder = ff::codec::context::Context::new_with_codec(aac)
            .decoder()
            .audio()?;
        Ok(Self::with(Framing::Adts(adts), decoder))
    }

    /// A decoder of Opus (48 kHz, mono or stereo).
    pub(crate) fn opus() -> Result<Self, FfmpegError> {
        super::init();
        let opus = ff::decoder::find(ff::codec::Id::OPUS)
            .ok_or(FfmpegError::MissingCodec("Opus decoder"))?;
        let decoder = ff::codec::context::Context::new_with_codec(opus)
            .decoder()
            .audio()?;
        Ok(Self::with(Framing::Raw, decoder))
    }

    fn with(framing: Framing, decoder: ff::decoder::Audio) -> Self {
        Self {
            framing,
            decoder,
            resampler: None,
            decoded: ff::frame::Audio::empty(),
            resampled: ff::frame::Audio::empty(),
            packet: Vec::with_capacity(2048),
            errors: 0,
        }
    }

    /// Decodes one frame's payload and appends what it completed to `pcm`: 48 kHz stereo,
    /// interleaved `f32`. False (nothing appended, counted in `errors`) when FFmpeg refused the
    /// frame.
    pub(crate) fn decode(
        &mut self,
        payload: &[u8],
        pcm: &mut Vec<f32>,
    ) -> Result<bool, FfmpegError> {
        self.packet.clear();
        if let Framing::Adts(template) = &self.framing {
            let len = payload.len() + 7;
            self.packet.extend_from_slice(template);
            self.packet[3] |= ((len >> 11) & 3) as u8;
            self.packet[4] = (len >> 3) as u8;
            self.packet[5] |= ((len & 7) << 5) as u8;
        }
        self.packet.extend_from_slice(payload);
        if self
            .decoder
            .send_packet(&ff::Packet::copy(&self.packet))
            .is_err()
        {
            self.errors += 1;
            return Ok(false);
        }
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
                pcm.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                );
            }
        }
        Ok(true)
    }
}

/// A 48 kHz stereo AAC or Opus encoder fed interleaved `f32` samples of any count: it cuts them
/// into the encoder's frame size. The encoding half of [`AudioTranscoder`], and the mixer's
/// outputs.
pub(crate) struct AudioEncoder {
    encoder: ff::encoder::Audio,
    /// Samples per channel in one encoded frame.
    frame_size: usize,
    /// The encoder takes planar samples (one plane per channel).
    planar: bool,
    /// Interleaved stereo samples waiting for a whole encoder frame.
    fifo: Vec<f32>,
    /// Presentation time of the first sample in `fifo`, microseconds.
    fifo_pts: Option<i64>,
    packet: ff::Packet,
}

/// An opened 48 kHz stereo encoder taking `format`.
fn open_encoder(
    codec: ff::Codec,
    format: Sample,
    bitrate: usize,
) -> Result<ff::encoder::Audio, FfmpegError> {
    let mut enc = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .audio()?;
    enc.set_rate(48_000);
    enc.set_channel_layout(ChannelLayout::STEREO);
    enc.set_channels(2);
    enc.set_format(format);
    enc.set_bit_rate(bitrate);
    enc.set_time_base((1, 48_000));
    Ok(enc.open_as(codec)?)
}

impl AudioEncoder {
    /// Opus at `bitrate`, 20 ms frames.
    pub(crate) fn opus(bitrate: usize) -> Result<Self, FfmpegError> {
        super::init();
        let opus = ff::encoder::find_by_name("libopus")
            .ok_or(FfmpegError::MissingCodec("libopus encoder"))?;
        let encoder = open_encoder(opus, Sample::F32(SampleType::Packed), bitrate)?;
        Ok(Self::with(encoder, OPUS_FRAME, false))
    }

    /// AAC-LC at `bitrate`; its AudioSpecificConfig is [`AAC_48K_STEREO_ASC`].
    pub(crate) fn aac(bitrate: usize) -> Result<Self, FfmpegError> {
        super::init();
        let aac = ff::encoder::find(ff::codec::Id::AAC)
            .ok_or(FfmpegError::MissingCodec("AAC encoder"))?;
        let encoder = open_encoder(aac, Sample::F32(SampleType::Planar), bitrate)?;
        Ok(Self::with(encoder, AAC_FRAME, true))
    }

    fn with(encoder: ff::encoder::Audio, frame_size: usize, planar: bool) -> Self {
        Self {
            encoder,
            frame_size,
            planar,
            fifo: Vec::with_capacity(frame_size * 8),
            fifo_pts: None,
            packet: ff::Packet::empty(),
        }
    }

    /// Queues `pcm` (48 kHz interleaved stereo) and appends every frame now complete to `out`.
    /// `pts` (microseconds) places the first sample of the first call; later calls continue
    /// the timeline sample by sample, whatever `pts` they pass.
    pub(crate) fn push(
        &mut self,
        pts: i64,
        pcm: &[f32],
        out: &mut Vec<Frame>,
    ) -> Result<(), FfmpegError> {
        self.fifo_pts.get_or_insert(pts);
        self.fifo.extend_from_slice(pcm);
        while self.fifo.len() >= self.frame_size * 2 {
            self.encode_one(out)?;
        }
        Ok(())
    }

    fn encode_one(&mut self, out: &mut Vec<Frame>) -> Result<(), FfmpegError> {
        let pts_us = self.fifo_pts.unwrap_or(0);
        let n = self.frame_size;
        let format = if self.planar {
            Sample::F32(SampleType::Planar)
        } else {
            Sample::F32(SampleType::Packed)
        };
        // A new frame each time: the encoder may keep a reference to the one it was sent.
        let mut frame = ff::frame::Audio::new(format, n, ChannelLayout::STEREO);
        frame.set_rate(48_000);
        if self.planar {
            // One plane per channel, de-interleaved from the FIFO.
            for ch in 0..2 {
                for (i, d) in frame.data_mut(ch).chunks_exact_mut(4).take(n).enumerate() {
                    d.copy_from_slice(&self.fifo[i * 2 + ch].to_ne_bytes());
                }
            }
        } else {
            for (d, s) in frame
                .data_mut(0)
                .chunks_exact_mut(4)
                .zip(&self.fifo[..n * 2])
            {
                d.copy_from_slice(&s.to_ne_bytes());
            }
        }
        self.fifo.drain(..n * 2);
        frame.set_pts(Some(pts_us * 48 / 1000));
        self.fifo_pts = Some(pts_us + (n as i64) * 1_000_000 / 48_000);
        self.encoder.send_frame(&frame)?;
        while self.encoder.receive_packet(&mut self.packet).is_ok() {
            let pts = self.packet.pts().map_or(pts_us, |p| p * 1000 / 48);
            let payload = Bytes::copy_from_slice(self.packet.data().unwrap_or_default());
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

/// One broadcast's audio transcoder: an [`AudioDecoder`] feeding an [`AudioEncoder`].
pub(crate) struct AudioTranscoder {
    decoder: AudioDecoder,
    encoder: AudioEncoder,
    /// Decoded samples on their way to the encoder.
    pcm: Vec<f32>,
}

impl AudioTranscoder {
    /// AAC described by `asc` (its AudioSpecificConfig) → Opus at `bitrate`, 20 ms frames.
    pub(crate) fn aac_to_opus(asc: &[u8], bitrate: usize) -> Result<Self, FfmpegError> {
        Ok(Self::with(
            AudioDecoder::aac(asc)?,
            AudioEncoder::opus(bitrate)?,
        ))
    }

    /// Opus (48 kHz, mono or stereo) → AAC-LC 48 kHz stereo at `bitrate`; the output's
    /// AudioSpecificConfig is [`AAC_48K_STEREO_ASC`].
    pub(crate) fn opus_to_aac(bitrate: usize) -> Result<Self, FfmpegError> {
        Ok(Self::with(
            AudioDecoder::opus()?,
            AudioEncoder::aac(bitrate)?,
        ))
    }

    fn with(decoder: AudioDecoder, encoder: AudioEncoder) -> Self {
        Self {
            decoder,
            encoder,
            pcm: Vec::with_capacity(AAC_FRAME * 8),
        }
    }

    /// Transcodes one input frame; appends the output frames that are now complete to `out`.
    pub(crate) fn push(&mut self, input: &Frame, out: &mut Vec<Frame>) -> Result<(), FfmpegError> {
        self.pcm.clear();
        if !self.decoder.decode(&input.payload, &mut self.pcm)? {
            return Ok(());
        }
        self.encoder.push(input.pts, &self.pcm, out)
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

    /// The amplitude of `hz` in the left channel of interleaved 48 kHz stereo `pcm`.
    fn level(pcm: &[f32], hz: f64) -> f64 {
        let (mut re, mut im, mut n) = (0f64, 0f64, 0usize);
        for (i, s) in pcm.chunks_exact(2).enumerate() {
            let phase = 2.0 * std::f64::consts::PI * hz * i as f64 / 48_000.0;
            re += f64::from(s[0]) * phase.cos();
            im += f64::from(s[0]) * phase.sin();
            n += 1;
        }
        2.0 * (re * re + im * im).sqrt() / n as f64
    }

    #[test]
    fn a_tone_survives_aac_to_opus_and_back() {
        let pcm: Vec<f32> = (0..48_000)
            .flat_map(|i| {
                let s = 0.3 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 48_000.0).sin();
                [s, s]
            })
            .collect();
        let mut aac = Vec::new();
        AudioEncoder::aac(128_000)
            .unwrap()
            .push(1_000, &pcm, &mut aac)
            .unwrap();
        let mut to_opus = AudioTranscoder::aac_to_opus(&AAC_48K_STEREO_ASC, 96_000).unwrap();
        let mut opus = Vec::new();
        for f in &aac {
            to_opus.push(f, &mut opus).unwrap();
        }
        assert!(opus.len() >= 40, "{} Opus frames", opus.len());
        // 20 ms apart, to within the rounding of 48 kHz sample counts to microseconds.
        assert!(
            opus.windows(2)
                .all(|w| (19_950..=20_050).contains(&(w[1].pts - w[0].pts)))
        );
        let mut to_aac = AudioTranscoder::opus_to_aac(128_000).unwrap();
        let mut back = Vec::new();
        for f in &opus {
            to_aac.push(f, &mut back).unwrap();
        }
        let mut decoder = AudioDecoder::aac(&AAC_48K_STEREO_ASC).unwrap();
        let mut out = Vec::new();
        for f in &back {
            assert!(decoder.decode(&f.payload, &mut out).unwrap());
        }
        let middle = &out[2 * 12_000..2 * 36_000];
        let (l440, l700) = (level(middle, 440.0), level(middle, 700.0));
        assert!((0.25..0.35).contains(&l440), "440 Hz at {l440}");
        assert!(l700 < 0.01, "700 Hz at {l700}");
    }
}
