//! Pure bitstream code: no I/O, no protocol. Parsers take untrusted bytes and return `None` or an
//! error rather than panic. What they find is given as [`VideoInfo`] and [`AudioInfo`], which the
//! media model ([`crate::media::TrackInfo`]) carries; this module depends on nothing else of
//! castnode's.

pub(crate) mod aac;
pub(crate) mod bits;
pub mod h264;

/// Facts about a video track, read from its codec config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VideoInfo {
    /// Picture width in pixels (after cropping).
    pub(crate) width: u32,
    /// Picture height in pixels (after cropping).
    pub(crate) height: u32,
    /// Profile name such as "high" or "baseline".
    pub(crate) profile: String,
    /// Level times ten (e.g. 31 for 3.1).
    pub(crate) level: u8,
}

/// Facts about an audio track, read from its codec config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AudioInfo {
    /// Samples per second.
    pub(crate) sample_rate: u32,
    /// Channel count.
    pub(crate) channels: u8,
}
