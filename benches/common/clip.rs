//! Shared by the ladder and mix benches: a 720p30 H.264 clip made in process
//! (`castnode::ffmpeg::testsrc`: moving bars with a band of per-frame noise; libx264
//! `ultrafast`, 2 B-frames, an IDR every 60 frames, 3 Mbit/s), played in a loop.

use castnode::ffmpeg::ladder::SourceDecoder;
use castnode::ffmpeg::testsrc::{self, Source, SourceSpec};
use castnode::media::Frame;
use ffmpeg_next as ff;

/// Frames a second of the clip.
pub const FPS: i64 = 30;
/// Frames in the clip.
pub const FRAMES: u32 = 60;

/// The clip.
pub fn clip_720p() -> Source {
    testsrc::h264(&SourceSpec {
        width: 1280,
        height: 720,
        fps: FPS as u32,
        frames: FRAMES,
        keyint: 60,
        b_frames: 2,
        bitrate_kbps: 3000,
    })
    .expect("libx264 makes the source")
}

/// The n-th frame of `src` played in a loop, its timestamps moved on by whole clips, so encoders
/// see a steady frame rate and timestamps that keep rising.
pub fn nth(src: &Source, n: usize) -> Frame {
    let clip_us = src.frames.len() as i64 * 1_000_000 / FPS;
    let f = &src.frames[n % src.frames.len()];
    let shift = (n / src.frames.len()) as i64 * clip_us;
    Frame {
        pts: f.pts + shift,
        dts: f.dts + shift,
        ..f.clone()
    }
}

/// Every picture of `src`, decoded once (one per frame, in presentation order).
pub fn decoded(src: &Source) -> Vec<ff::frame::Video> {
    let mut pictures = Vec::new();
    let mut decoder = SourceDecoder::new().unwrap();
    for f in &src.frames {
        decoder
            .push(f, Some(&src.avcc), |p| {
                pictures.push(p.clone());
                Ok(())
            })
            .unwrap();
    }
    decoder
        .flush(|p| {
            pictures.push(p.clone());
            Ok(())
        })
        .unwrap();
    assert_eq!(pictures.len(), FRAMES as usize);
    pictures
}
