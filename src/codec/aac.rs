//! AAC AudioSpecificConfig (ISO 14496-3 1.6.2.1): object type, sample rate, channels.

use super::AudioInfo;
use super::bits::BitReader;

const RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

/// Parses an AudioSpecificConfig (2 bytes from most encoders, 5 with explicit SBR signalling as
/// OBS sends). `None` when it is too short or names a reserved rate.
pub(crate) fn parse_asc(asc: &[u8]) -> Option<AudioInfo> {
    let mut r = BitReader::new(asc);
    let mut object = r.bits(5)?;
    if object == 31 {
        object = 32 + r.bits(6)?;
    }
    let _ = object;
    let idx = r.bits(4)?;
    let sample_rate = if idx == 15 {
        r.bits(24)?
    } else {
        *RATES.get(idx as usize)?
    };
    let channels = r.bits(4)? as u8;
    Some(AudioInfo {
        sample_rate,
        channels: if channels == 7 { 8 } else { channels },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_and_five_byte_configs() {
        // AAC-LC 48 kHz stereo.
        assert_eq!(
            parse_asc(&[0x11, 0x90]),
            Some(AudioInfo {
                sample_rate: 48000,
                channels: 2
            })
        );
        // AAC-LC 44.1 kHz stereo with explicit SBR extension (5 bytes).
        assert_eq!(
            parse_asc(&[0x12, 0x10, 0x56, 0xe5, 0x00]),
            Some(AudioInfo {
                sample_rate: 44100,
                channels: 2
            })
        );
        assert_eq!(parse_asc(&[0x11]), None);
        assert_eq!(parse_asc(&[0x17, 0x80]), None);
    }
}
