//! The audio half of a mix: per input an AAC or Opus decoder resampled to 48 kHz stereo
//! ([`AudioDecoder`], shared with the audio transcoder), its samples placed on the output's
//! clock, mixed with the layout's per-input gain and mute, and encoded once to AAC and to Opus
//! ([`AudioEncoder`], shared too).
//!
//! Guarantees:
//! - Sans-IO: time comes only from the caller (`now`, microseconds on the output's clock).
//! - Alignment: an input's first frame fixes its offset (its arrival `now` minus its pts); each
//!   later frame goes at its pts plus that offset, so an input's own timing (not its arrival
//!   jitter) places its samples. Gaps in an input's timestamps are silence; overlaps are dropped;
//!   a jump of more than [`RESYNC_US`] (a publisher that restarted) re-anchors the offset.
//! - [`AudioMixer::mix`] mixes everything up to `now - latency` (the latency lets late frames
//!   arrive) and never again before: samples that arrive for a time already mixed are dropped.
//!   An input with nothing for a stretch contributes silence to it; an input the layout does not
//!   place is not heard; a muted one neither.
//! - Output: one continuous 48 kHz stereo timeline, starting at the first mixed sample's time,
//!   AAC-LC ([`AAC_CONFIG`]) and Opus (20 ms) frames with pts in microseconds on the output's
//!   clock; the mix is clamped to [-1, 1].
//! - Gain and mute changes take effect at the next [`AudioMixer::mix`] (no ramp).

use std::collections::VecDeque;

use super::MixError;
use super::layout::Layout;
use crate::ffmpeg::audio::{AAC_48K_STEREO_ASC, AudioDecoder, AudioEncoder};
use crate::media::Frame;

/// The AudioSpecificConfig of the mixer's AAC output: AAC-LC, 48 kHz, stereo.
pub const AAC_CONFIG: [u8; 2] = AAC_48K_STEREO_ASC;
/// An input whose timestamps jump by more than this from where its samples were expected is
/// placed anew by its arrival.
pub const RESYNC_US: i64 = 1_000_000;
/// Timestamp jitter (in samples, 2 ms) absorbed without inserting silence or dropping samples.
const JITTER: i64 = 96;

/// The sample index (48 kHz) at `us` microseconds.
fn sample_at(us: i64) -> i64 {
    (us * 48).div_euclid(1000)
}

/// What an input carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudioIn {
    /// AAC, with its AudioSpecificConfig.
    Aac(Vec<u8>),
    /// Opus.
    Opus,
}

struct AudioInput {
    id: String,
    decoder: AudioDecoder,
    /// Output time minus input pts, fixed by the first frame.
    offset: Option<i64>,
    /// Queued samples (interleaved stereo) from output sample `start` on.
    buf: VecDeque<f32>,
    start: i64,
    /// The gain the layout gives it (0: muted or not placed).
    gain: f32,
    pcm: Vec<f32>,
}

impl AudioInput {
    fn end(&self) -> i64 {
        self.start + (self.buf.len() / 2) as i64
    }

    /// Drops the queued samples before output sample `until`.
    fn drop_before(&mut self, until: i64) {
        if self.start < until {
            let n = ((until - self.start) as usize * 2).min(self.buf.len());
            self.buf.drain(..n);
            self.start += (n / 2) as i64;
            if self.buf.is_empty() {
                self.start = until;
            }
        }
    }
}

/// Mixes the inputs' audio on the output's clock and encodes it to AAC and Opus.
pub struct AudioMixer {
    inputs: Vec<AudioInput>,
    /// Each placed input's gain, from the layout.
    gains: Vec<(String, f32)>,
    latency_us: i64,
    /// The output sample up to which everything is mixed.
    mixed_until: Option<i64>,
    mix: Vec<f32>,
    aac: AudioEncoder,
    opus: AudioEncoder,
}

impl AudioMixer {
    /// A mixer with `layout`'s gains, mixing `latency_us` behind the clock, encoding AAC at
    /// `aac_bitrate` and Opus at `opus_bitrate` (bit/s).
    pub fn new(
        layout: &Layout,
        latency_us: i64,
        aac_bitrate: usize,
        opus_bitrate: usize,
    ) -> Result<AudioMixer, MixError> {
        let mut mixer = AudioMixer {
            inputs: Vec::new(),
            gains: Vec::new(),
            latency_us: latency_us.max(0),
            mixed_until: None,
            mix: Vec::new(),
            aac: AudioEncoder::aac(aac_bitrate)?,
            opus: AudioEncoder::opus(opus_bitrate)?,
        };
        mixer.set_layout(layout)?;
        Ok(mixer)
    }

    /// Takes `layout`'s gains and mutes (validated; refused whole when invalid), from the next
    /// [`AudioMixer::mix`] on.
    pub fn set_layout(&mut self, layout: &Layout) -> Result<(), MixError> {
        layout.validate()?;
        self.gains.clear();
        self.gains.extend(
            layout
                .inputs
                .iter()
                .map(|p| (p.id.clone(), p.effective_gain())),
        );
        for input in &mut self.inputs {
            input.gain = gain_of(&self.gains, &input.id);
        }
        Ok(())
    }

    /// Adds an input under `id`.
    pub fn add_input(&mut self, id: &str, codec: AudioIn) -> Result<(), MixError> {
        if self.inputs.iter().any(|i| i.id == id) {
            return Err(MixError::DuplicateInput(id.into()));
        }
        let decoder = match codec {
            AudioIn::Aac(asc) => AudioDecoder::aac(&asc)?,
            AudioIn::Opus => AudioDecoder::opus()?,
        };
        self.inputs.push(AudioInput {
            id: id.into(),
            decoder,
            offset: None,
            buf: VecDeque::with_capacity(48_000),
            start: 0,
            gain: gain_of(&self.gains, id),
            pcm: Vec::with_capacity(4096),
        });
        Ok(())
    }

    /// Removes input `id` (and what it had queued); false when there was none.
    pub fn remove_input(&mut self, id: &str) -> bool {
        let before = self.inputs.len();
        self.inputs.retain(|i| i.id != id);
        self.inputs.len() != before
    }

    /// Decodes one frame of input `id` that arrived at `now` on the output's clock and queues
    /// its samples at their place.
    pub fn push(&mut self, id: &str, frame: &Frame, now: i64) -> Result<(), MixError> {
        let mixed_until = self.mixed_until;
        let input = self
            .inputs
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or_else(|| MixError::UnknownInput(id.into()))?;
        input.pcm.clear();
        if !input.decoder.decode(&frame.payload, &mut input.pcm)? {
            return Ok(());
        }
        let offset = *input.offset.get_or_insert(now - frame.pts);
        let mut at = frame.pts + offset;
        let expected = if input.buf.is_empty() {
            sample_at(now)
        } else {
            input.end()
        };
        if (sample_at(at) - expected).abs() > sample_at(RESYNC_US) {
            input.offset = Some(now - frame.pts);
            at = now;
            input.buf.clear();
        }
        let pos = sample_at(at);
        if let Some(m) = mixed_until {
            input.drop_before(m);
        }
        let mut pcm = &input.pcm[..];
        if input.buf.is_empty() {
            input.start = pos;
        } else {
            let end = input.end();
            if pos > end + JITTER {
                input
                    .buf
                    .extend(std::iter::repeat_n(0.0, (pos - end) as usize * 2));
            } else if pos < end - JITTER {
                let skip = ((end - pos) as usize).min(pcm.len() / 2);
                pcm = &pcm[skip * 2..];
            }
        }
        input.buf.extend(pcm);
        if let Some(m) = mixed_until {
            input.drop_before(m);
        }
        Ok(())
    }

    /// Frames of input `id` FFmpeg could not decode.
    pub fn errors(&self, id: &str) -> Option<u64> {
        self.inputs
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.decoder.errors)
    }

    /// Mixes everything up to `now` minus the latency and appends the frames the encoders
    /// completed to `aac` and `opus`.
    pub fn mix(
        &mut self,
        now: i64,
        aac: &mut Vec<Frame>,
        opus: &mut Vec<Frame>,
    ) -> Result<(), MixError> {
        let end = sample_at(now - self.latency_us);
        let start = *self.mixed_until.get_or_insert(end);
        if end <= start {
            return Ok(());
        }
        let n = (end - start) as usize;
        self.mix.clear();
        self.mix.resize(n * 2, 0.0);
        for input in &mut self.inputs {
            input.drop_before(start);
            if input.gain > 0.0 && input.start < end {
                let from = (input.start - start) as usize * 2;
                let take = (input.buf.len()).min(self.mix.len() - from);
                for (m, s) in self.mix[from..from + take].iter_mut().zip(&input.buf) {
                    *m += s * input.gain;
                }
            }
            input.drop_before(end);
        }
        for m in &mut self.mix {
            *m = m.clamp(-1.0, 1.0);
        }
        let pts = start * 1000 / 48;
        self.aac.push(pts, &self.mix, aac)?;
        self.opus.push(pts, &self.mix, opus)?;
        self.mixed_until = Some(end);
        Ok(())
    }
}

fn gain_of(gains: &[(String, f32)], id: &str) -> f32 {
    gains
        .iter()
        .find(|(g, _)| g == id)
        .map_or(0.0, |&(_, gain)| gain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `seconds` of a sine at `hz` (amplitude `amp`, both channels) encoded to AAC, pts from 0.
    fn tone(hz: f32, amp: f32, seconds: f32) -> Vec<Frame> {
        let n = (48_000.0 * seconds) as usize;
        let mut pcm = Vec::with_capacity(n * 2);
        for i in 0..n {
            let s = amp * (2.0 * std::f32::consts::PI * hz * i as f32 / 48_000.0).sin();
            pcm.extend([s, s]);
        }
        let mut enc = AudioEncoder::aac(128_000).unwrap();
        let mut frames = Vec::new();
        enc.push(0, &pcm, &mut frames).unwrap();
        frames
    }

    /// The left channel of decoded output frames.
    fn decode(frames: &[Frame], mut decoder: AudioDecoder) -> Vec<f32> {
        let mut pcm = Vec::new();
        for f in frames {
            assert!(decoder.decode(&f.payload, &mut pcm).unwrap());
        }
        pcm.chunks_exact(2).map(|s| s[0]).collect()
    }

    /// The amplitude of `hz` in `x` (48 kHz), by a plain DFT at that one frequency.
    fn level(x: &[f32], hz: f32) -> f32 {
        let (mut re, mut im) = (0f64, 0f64);
        for (i, &s) in x.iter().enumerate() {
            let phase = 2.0 * std::f64::consts::PI * f64::from(hz) * i as f64 / 48_000.0;
            re += f64::from(s) * phase.cos();
            im += f64::from(s) * phase.sin();
        }
        (2.0 * (re * re + im * im).sqrt() / x.len() as f64) as f32
    }

    /// Mixes a 440 Hz and a 1000 Hz input under `layout`; the output's AAC and Opus left
    /// channels, 0.5 s from the middle.
    fn mixed(layout: &Layout) -> (Vec<f32>, Vec<f32>) {
        let (a, b) = (tone(440.0, 0.25, 2.0), tone(1000.0, 0.25, 2.0));
        let mut m = AudioMixer::new(layout, 100_000, 128_000, 96_000).unwrap();
        let asc = AAC_CONFIG.to_vec();
        m.add_input("a", AudioIn::Aac(asc.clone())).unwrap();
        m.add_input("b", AudioIn::Aac(asc)).unwrap();
        let (mut aac, mut opus) = (Vec::new(), Vec::new());
        // The two arrive on the output's clock 5 s in, b 3 ms after a (jitter).
        let base = 5_000_000;
        for (fa, fb) in a.iter().zip(&b) {
            m.push("a", fa, base + fa.pts).unwrap();
            m.push("b", fb, base + fb.pts + 3_000).unwrap();
            m.mix(base + fa.pts, &mut aac, &mut opus).unwrap();
        }
        assert!(aac.windows(2).all(|w| w[0].pts < w[1].pts));
        assert!(opus.windows(2).all(|w| w[0].pts < w[1].pts));
        assert!(
            aac[0].pts >= base - 200_000,
            "on the output's clock: {}",
            aac[0].pts
        );
        let middle = |pcm: Vec<f32>| pcm[24_000..48_000].to_vec();
        (
            middle(decode(&aac, AudioDecoder::aac(&AAC_CONFIG).unwrap())),
            middle(decode(&opus, AudioDecoder::opus().unwrap())),
        )
    }

    #[test]
    fn two_tones_mix_and_mute_and_gain_act_on_one() {
        let layout = Layout::grid(["a", "b"], 64, 64, 30).unwrap();
        for (codec, pcm) in ["aac", "opus"].into_iter().zip({
            let (aac, opus) = mixed(&layout);
            [aac, opus]
        }) {
            let (l440, l1000, l700) = (level(&pcm, 440.0), level(&pcm, 1000.0), level(&pcm, 700.0));
            eprintln!("{codec}: 440 Hz {l440:.3}, 1000 Hz {l1000:.3}, 700 Hz {l700:.4}");
            assert!((0.18..0.32).contains(&l440), "{codec}: 440 Hz at {l440}");
            assert!((0.18..0.32).contains(&l1000), "{codec}: 1000 Hz at {l1000}");
            assert!(l700 < 0.01, "{codec}: 700 Hz at {l700}");
        }

        let mut muted = layout.clone();
        muted.inputs[1].muted = true;
        let (pcm, _) = mixed(&muted);
        let (l440, l1000) = (level(&pcm, 440.0), level(&pcm, 1000.0));
        assert!(l440 > 0.18, "440 Hz stays: {l440}");
        assert!(l1000 < 0.01, "1000 Hz muted: {l1000}");

        let mut half = layout.clone();
        half.inputs[1].gain = 0.5;
        let (pcm, _) = mixed(&half);
        let ratio = level(&pcm, 1000.0) / level(&pcm, 440.0);
        assert!((0.45..0.55).contains(&ratio), "1000 Hz at half: {ratio}");

        // An input the layout does not place is not heard.
        let only_a = Layout::grid(["a"], 64, 64, 30).unwrap();
        let (pcm, _) = mixed(&only_a);
        assert!(level(&pcm, 1000.0) < 0.01);
    }

    #[test]
    fn a_missing_input_is_silence_and_late_samples_are_dropped() {
        let layout = Layout::grid(["a", "b"], 64, 64, 30).unwrap();
        let mut m = AudioMixer::new(&layout, 50_000, 128_000, 96_000).unwrap();
        m.add_input("a", AudioIn::Aac(AAC_CONFIG.to_vec())).unwrap();
        m.add_input("b", AudioIn::Opus).unwrap();
        assert!(matches!(
            m.add_input("a", AudioIn::Opus),
            Err(MixError::DuplicateInput(_))
        ));
        let a = tone(440.0, 0.25, 1.0);
        let (mut aac, mut opus) = (Vec::new(), Vec::new());
        // Nothing at all for 1 s: silence, but frames all the same (the clock drives output).
        for t in (0..1_000_000).step_by(20_000) {
            m.mix(t, &mut aac, &mut opus).unwrap();
        }
        let silent = decode(&aac, AudioDecoder::aac(&AAC_CONFIG).unwrap());
        assert!(silent.len() >= 40_000, "{} samples", silent.len());
        assert!(silent.iter().all(|s| s.abs() < 1e-3));
        // Frames that arrive after their time was mixed are dropped, not mixed late.
        let before = m.inputs[0].buf.len();
        m.push("a", &a[0], 1_000_000 - 200_000 - a[0].pts).unwrap();
        assert!(m.inputs[0].buf.len() <= before);
        assert!(m.push("c", &a[0], 0).is_err());
        assert!(m.remove_input("b"));
        assert!(!m.remove_input("b"));
    }
}
