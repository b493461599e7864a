//! The mixing core of the `mixer` role (issue 18): several live inputs composited into one
//! output, with layouts that change live. A library, driven by the caller's clock (sans-IO):
//! no tasks, sockets or sleeps here; a driver feeds input frames with their arrival time and
//! ticks the output at its frame rate.
//!
//! - [`Layout`] ([`layout`]): the canvas, each input's rectangle, z-order, gain and mute, image
//!   overlays ([`Image`]: PNG with alpha); validation naming the offending field; the
//!   [`Layout::grid`] and [`Layout::picture_in_picture`] helpers.
//! - [`Compositor`] and [`VideoMixer`] ([`video`]): H.264 inputs decoded with the ladder's
//!   [`SourceDecoder`](crate::ffmpeg::ladder::SourceDecoder), scaled into their rectangles,
//!   drawn at each tick (repeat the last picture, a slate after a timeout), encoded once with the
//!   ladder's [`VideoEncoder`](crate::ffmpeg::ladder::VideoEncoder) (libx264, no B-frames).
//! - [`AudioMixer`] ([`audio`]): AAC or Opus inputs decoded and resampled with the audio
//!   transcoder's pieces, aligned on the output's clock, mixed with gain and mute, encoded to AAC
//!   and Opus.
//!
//! Each module states its own guarantees. Text overlays are not here: FFmpeg's `drawtext`
//! (libavfilter with freetype) is on the system, but ffmpeg-next is built without its `filter`
//! feature.

pub mod audio;
pub mod image;
pub mod layout;
pub mod video;

pub use audio::{AAC_CONFIG, AudioIn, AudioMixer};
pub use image::Image;
pub use layout::{Layout, LayoutError, Overlay, Placement, Yuv};
pub use video::{Compositor, MixSettings, VideoEvent, VideoMixer};

use super::FfmpegError;

/// Why a mix operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// The layout is invalid.
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    /// A new layout changes the canvas's size or frame rate, which are the output's.
    #[error("the canvas's size and frame rate cannot change while the output runs")]
    CanvasChanged,
    /// No input has this id.
    #[error("no input {0:?}")]
    UnknownInput(String),
    /// An input with this id already exists.
    #[error("input {0:?} exists already")]
    DuplicateInput(String),
    /// FFmpeg failed.
    #[error(transparent)]
    Ffmpeg(#[from] FfmpegError),
}
