//! In-process FFmpeg (ffmpeg-next over Debian's libraries): the transcoders that make a
//! broadcast playable where its original codecs are not, and the ladder encoder that makes its
//! ABR renditions ([`ladder`]), and the mixing core that composites several inputs into one
//! output ([`mix`]). Pure frame-in, frames-out objects; the tasks that feed them from
//! the hub live in [`crate::transcode`].

pub(crate) mod audio;
pub mod ladder;
pub(crate) mod log;
pub mod mix;
pub mod testsrc;
pub(crate) mod video;

/// Why a transcoder could not be built or failed.
#[derive(Debug, thiserror::Error)]
pub enum FfmpegError {
    /// FFmpeg lacks a codec castnode needs (e.g. a build without libopus).
    #[error("FFmpeg has no {0}")]
    MissingCodec(&'static str),
    /// The source's configuration cannot be used.
    #[error("unusable source configuration: {0}")]
    BadConfig(&'static str),
    /// An FFmpeg call failed.
    #[error("FFmpeg: {0}")]
    Call(#[from] ffmpeg_next::Error),
}

/// Initialises FFmpeg once per process.
pub(crate) fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ffmpeg_next::init();
        log::install();
    });
}
