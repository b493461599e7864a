//! The video half of a mix: per input an H.264 decoder ([`SourceDecoder`], the ladder's) whose
//! newest picture is kept; at each output tick the canvas is drawn (background, then inputs and
//! overlays in z-order) and, in [`VideoMixer`], encoded once ([`VideoEncoder`], [`X264`] by
//! default: no B-frames, `zerolatency`).
//!
//! Guarantees:
//! - Sans-IO: time comes only from the caller (`now`, microseconds on the output's clock, as
//!   [`Compositor::push`] and [`Compositor::tick`] are given it); nothing here sleeps or reads a
//!   clock.
//! - The output is paced by the ticks, not by the inputs: each tick draws every input's newest
//!   picture (a picture is shown on as many ticks as come before the next one: inputs at other
//!   frame rates repeat or skip pictures). An input whose newest picture is older than the slate
//!   timeout, or that has none, or that the layout names but was never added, shows the slate
//!   (a solid colour) in its rectangle; it comes back with its next picture.
//! - A tick whose `now` is not after the previous tick's draws nothing and returns `None`: the
//!   output's timestamps (the ticks' `now`) only go forward.
//! - A layout given with [`Compositor::set_layout`] is validated at once and takes effect at
//!   the next tick, whole (never half a layout in a picture). The canvas size and frame rate are
//!   the output's and cannot change.
//! - Per input one scaler (swscale, bilinear), rebuilt only when the source's size or format, or
//!   the rectangle's size, changes; a picture is scaled at most once per tick, and only when it
//!   is new or its rectangle changed. Per tick nothing is allocated: the canvas, the kept
//!   pictures and the scaled ones are reused (a picture is reallocated only when its size
//!   changes).
//! - [`VideoMixer`] output is what the hub holds: length-prefixed NAL units, SPS/PPS in band
//!   before every IDR, dts = pts = the tick's `now`, an IDR on the first picture and every
//!   `keyint` pictures after; a [`VideoEvent::Config`] before the first frame and whenever the
//!   parameter sets change.
//!
//! Not `Send` (swscale contexts are not): build it on the thread that drives it.

use bytes::Bytes;
use ff::format::Pixel;
use ff::software::scaling;
use ffmpeg_next as ff;

use super::MixError;
use super::layout::{Layout, Yuv};
use crate::ffmpeg::FfmpegError;
use crate::ffmpeg::ladder::{EncoderSettings, OpenEncoder, SourceDecoder, VideoEncoder, X264};
use crate::ladder::Profile;
use crate::media::{Codec, Frame, TrackInfo};

/// One input's decoder and pictures.
struct VideoInput {
    id: String,
    decoder: SourceDecoder,
    /// A copy of the newest decoded picture (the decoder reuses its own).
    latest: ff::frame::Video,
    /// When (output clock) `latest` arrived; `None` until a first picture.
    arrived: Option<i64>,
    /// `latest` is newer than `scaled`.
    fresh: bool,
    scaler: Option<scaling::Context>,
    /// `latest` at its rectangle's size.
    scaled: ff::frame::Video,
}

/// Copies `src` into `dst`, reallocating `dst` only when the format or size differs.
fn copy_picture(src: &ff::frame::Video, dst: &mut ff::frame::Video) {
    if dst.format() != src.format() || dst.width() != src.width() || dst.height() != src.height() {
        *dst = ff::frame::Video::new(src.format(), src.width(), src.height());
    }
    for plane in 0..src.planes() {
        let rows = src.plane_height(plane) as usize;
        let (ss, ds) = (src.stride(plane), dst.stride(plane));
        let n = ss.min(ds);
        let from = src.data(plane);
        let to = dst.data_mut(plane);
        for row in 0..rows {
            to[row * ds..row * ds + n].copy_from_slice(&from[row * ss..row * ss + n]);
        }
    }
}

/// Fills a rectangle (even position and size, inside) of a YUV 4:2:0 picture with `colour`.
fn fill_rect(canvas: &mut ff::frame::Video, x: u32, y: u32, w: u32, h: u32, colour: Yuv) {
    for (plane, value) in colour.planes().into_iter().enumerate() {
        let shift = usize::from(plane > 0);
        let (px, py) = ((x as usize) >> shift, (y as usize) >> shift);
        let (pw, ph) = ((w as usize) >> shift, (h as usize) >> shift);
        let stride = canvas.stride(plane);
        let data = canvas.data_mut(plane);
        for row in py..py + ph {
            data[row * stride + px..][..pw].fill(value);
        }
    }
}

/// Copies `src` (YUV 4:2:0) into `canvas` at the even position `(x, y)`; it fits.
fn blit(canvas: &mut ff::frame::Video, src: &ff::frame::Video, x: u32, y: u32) {
    for plane in 0..3 {
        let shift = usize::from(plane > 0);
        let (px, py) = ((x as usize) >> shift, (y as usize) >> shift);
        let pw = (src.width() as usize) >> shift;
        let ph = (src.height() as usize) >> shift;
        let (ss, ds) = (src.stride(plane), canvas.stride(plane));
        let from = src.data(plane);
        let to = canvas.data_mut(plane);
        for row in 0..ph {
            to[(py + row) * ds + px..][..pw].copy_from_slice(&from[row * ss..][..pw]);
        }
    }
}

/// Something drawn on the canvas: `(z, kind: 0 input, 1 overlay, index)`.
type Item = (i32, u8, usize);

/// Draws the canvas from the inputs' newest pictures, at the caller's ticks.
pub struct Compositor {
    layout: Layout,
    pending: Option<Layout>,
    inputs: Vec<VideoInput>,
    canvas: ff::frame::Video,
    slate: Yuv,
    slate_after_us: i64,
    last_tick: Option<i64>,
    order: Vec<Item>,
}

impl Compositor {
    /// A compositor for `layout` (validated) whose inputs show `slate` when their newest
    /// picture is more than `slate_after_us` old.
    pub fn new(layout: Layout, slate: Yuv, slate_after_us: i64) -> Result<Compositor, MixError> {
        layout.validate()?;
        crate::ffmpeg::init();
        Ok(Compositor {
            canvas: ff::frame::Video::new(Pixel::YUV420P, layout.width, layout.height),
            order: Vec::with_capacity(layout.inputs.len() + layout.overlays.len()),
            layout,
            pending: None,
            inputs: Vec::new(),
            slate,
            slate_after_us,
            last_tick: None,
        })
    }

    /// The layout the next tick draws.
    pub fn layout(&self) -> &Layout {
        self.pending.as_ref().unwrap_or(&self.layout)
    }

    /// Replaces the layout from the next tick on. Refused (nothing changes) when it is invalid
    /// or changes the canvas's size or frame rate.
    pub fn set_layout(&mut self, layout: Layout) -> Result<(), MixError> {
        layout.validate()?;
        if (layout.width, layout.height, layout.fps)
            != (self.layout.width, self.layout.height, self.layout.fps)
        {
            return Err(MixError::CanvasChanged);
        }
        self.pending = Some(layout);
        Ok(())
    }

    /// Adds an input (an H.264 decoder) under `id`; until its first picture it shows the slate.
    pub fn add_input(&mut self, id: &str) -> Result<(), MixError> {
        if self.inputs.iter().any(|i| i.id == id) {
            return Err(MixError::DuplicateInput(id.into()));
        }
        self.inputs.push(VideoInput {
            id: id.into(),
            decoder: SourceDecoder::new()?,
            latest: ff::frame::Video::empty(),
            arrived: None,
            fresh: false,
            scaler: None,
            scaled: ff::frame::Video::empty(),
        });
        Ok(())
    }

    /// Removes input `id` (its rectangle, if the layout keeps it, shows the slate); false when
    /// there was none.
    pub fn remove_input(&mut self, id: &str) -> bool {
        let before = self.inputs.len();
        self.inputs.retain(|i| i.id != id);
        self.inputs.len() != before
    }

    /// Frames of input `id` FFmpeg could not decode.
    pub fn errors(&self, id: &str) -> Option<u64> {
        self.inputs
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.decoder.errors)
    }

    /// Input `id`, or [`MixError::UnknownInput`].
    fn input_mut(&mut self, id: &str) -> Result<&mut VideoInput, MixError> {
        self.inputs
            .iter_mut()
            .find(|i| i.id == id)
            .ok_or_else(|| MixError::UnknownInput(id.into()))
    }

    /// Decodes one H.264 access unit of input `id` (`avcc`: its track's config) that arrived at
    /// `now` on the output's clock; the pictures it completes become the input's newest.
    pub fn push(
        &mut self,
        id: &str,
        frame: &Frame,
        avcc: Option<&[u8]>,
        now: i64,
    ) -> Result<(), MixError> {
        let VideoInput {
            decoder,
            latest,
            arrived,
            fresh,
            ..
        } = self.input_mut(id)?;
        decoder.push(frame, avcc, |picture| {
            copy_picture(picture, latest);
            *arrived = Some(now);
            *fresh = true;
            Ok(())
        })?;
        Ok(())
    }

    /// Takes a picture of input `id` decoded elsewhere (any format swscale reads) that arrived
    /// at `now`: it becomes the input's newest, as a decoded frame from [`Compositor::push`]
    /// does.
    pub fn push_picture(
        &mut self,
        id: &str,
        picture: &ff::frame::Video,
        now: i64,
    ) -> Result<(), MixError> {
        let input = self.input_mut(id)?;
        copy_picture(picture, &mut input.latest);
        input.arrived = Some(now);
        input.fresh = true;
        Ok(())
    }

    /// Draws the canvas for the output frame at `now`; `None` (nothing drawn) when `now` is not
    /// after the previous tick's.
    pub fn tick(&mut self, now: i64) -> Result<Option<&mut ff::frame::Video>, FfmpegError> {
        if self.last_tick.is_some_and(|t| now <= t) {
            return Ok(None);
        }
        self.last_tick = Some(now);
        if let Some(layout) = self.pending.take() {
            self.layout = layout;
        }
        let layout = &self.layout;
        fill_rect(
            &mut self.canvas,
            0,
            0,
            layout.width,
            layout.height,
            layout.background,
        );
        self.order.clear();
        self.order
            .extend(layout.inputs.iter().enumerate().map(|(i, p)| (p.z, 0, i)));
        self.order
            .extend(layout.overlays.iter().enumerate().map(|(i, o)| (o.z, 1, i)));
        self.order.sort_unstable();
        for &(_, kind, index) in &self.order {
            if kind == 1 {
                let o = &layout.overlays[index];
                o.image.blend(&mut self.canvas, o.x, o.y);
                continue;
            }
            let p = &layout.inputs[index];
            let live = self.inputs.iter_mut().find(|i| {
                i.id == p.id && i.arrived.is_some_and(|t| now - t <= self.slate_after_us)
            });
            match live {
                Some(input) => {
                    scale(input, p.w, p.h)?;
                    blit(&mut self.canvas, &input.scaled, p.x, p.y);
                }
                None => fill_rect(&mut self.canvas, p.x, p.y, p.w, p.h, self.slate),
            }
        }
        Ok(Some(&mut self.canvas))
    }
}

/// Brings `input.scaled` to `w`×`h` from its newest picture, if it is not already.
fn scale(input: &mut VideoInput, w: u32, h: u32) -> Result<(), FfmpegError> {
    let src = &input.latest;
    let wanted_in = scaling::context::Definition {
        format: src.format(),
        width: src.width(),
        height: src.height(),
    };
    let fits = input.scaler.as_ref().is_some_and(|s| {
        *s.input() == wanted_in && (s.output().width, s.output().height) == (w, h)
    });
    if fits && !input.fresh {
        return Ok(());
    }
    if !fits {
        input.scaler = Some(scaling::Context::get(
            src.format(),
            src.width(),
            src.height(),
            Pixel::YUV420P,
            w,
            h,
            scaling::Flags::BILINEAR,
        )?);
        if (input.scaled.width(), input.scaled.height()) != (w, h) {
            input.scaled = ff::frame::Video::new(Pixel::YUV420P, w, h);
        }
    }
    if let Some(scaler) = &mut input.scaler {
        scaler.run(src, &mut input.scaled)?;
    }
    input.fresh = false;
    Ok(())
}

/// How a [`VideoMixer`] encodes and fills in.
#[derive(Clone, Debug)]
pub struct MixSettings {
    /// Output bitrate, kbit/s.
    pub bitrate_kbps: u32,
    /// H.264 profile.
    pub profile: Profile,
    /// An IDR every this many output frames (at least 1).
    pub keyint: u32,
    /// What an input without a recent picture shows.
    pub slate: Yuv,
    /// How old an input's newest picture may be before its slate shows, microseconds.
    pub slate_after_us: i64,
}

impl Default for MixSettings {
    /// 2.5 Mbit/s High profile, an IDR every 60 frames, a grey slate after 2 s.
    fn default() -> Self {
        MixSettings {
            bitrate_kbps: 2500,
            profile: Profile::High,
            keyint: 60,
            slate: Yuv::GREY,
            slate_after_us: 2_000_000,
        }
    }
}

/// What a [`VideoMixer`] hands back.
#[derive(Clone, Debug, PartialEq)]
pub enum VideoEvent {
    /// The output track's description (H.264, its avcC and size): before the first frame and
    /// again when it changes.
    Config(TrackInfo),
    /// An encoded output frame.
    Frame(Frame),
}

/// The compositor and the output's one encoder.
pub struct VideoMixer {
    compositor: Compositor,
    encoder: Box<dyn VideoEncoder>,
    keyint: u64,
    encoded: u64,
    declared: Option<Bytes>,
    frames: Vec<Frame>,
}

impl VideoMixer {
    /// A mixer for `layout` encoding with libx264 ([`X264`]).
    pub fn new(layout: Layout, settings: &MixSettings) -> Result<VideoMixer, MixError> {
        Self::with_encoder(layout, settings, X264::open_boxed)
    }

    /// [`VideoMixer::new`] with another encoder.
    pub fn with_encoder(
        layout: Layout,
        settings: &MixSettings,
        open: OpenEncoder,
    ) -> Result<VideoMixer, MixError> {
        let encoder = open(&EncoderSettings {
            width: layout.width,
            height: layout.height,
            fps: layout.fps,
            bitrate_kbps: settings.bitrate_kbps,
            profile: settings.profile,
        })?;
        Ok(VideoMixer {
            compositor: Compositor::new(layout, settings.slate, settings.slate_after_us)?,
            encoder,
            keyint: u64::from(settings.keyint.max(1)),
            encoded: 0,
            declared: None,
            frames: Vec::with_capacity(2),
        })
    }

    /// The compositor (layout, inputs, pushing frames).
    pub fn compositor(&mut self) -> &mut Compositor {
        &mut self.compositor
    }

    /// Draws and encodes the output frame at `now` (pts = dts = `now`) and appends what the
    /// encoder gave to `out`; false (nothing done) when `now` is not after the last tick.
    pub fn tick(&mut self, now: i64, out: &mut Vec<VideoEvent>) -> Result<bool, MixError> {
        let Some(canvas) = self.compositor.tick(now)? else {
            return Ok(false);
        };
        let idr = self.encoded.is_multiple_of(self.keyint);
        self.encoded += 1;
        self.encoder.encode(canvas, now, idr, &mut self.frames)?;
        self.emit(out);
        Ok(true)
    }

    /// Drains the encoder into `out`; nothing may be ticked after.
    pub fn flush(&mut self, out: &mut Vec<VideoEvent>) -> Result<(), MixError> {
        self.encoder.flush(&mut self.frames)?;
        self.emit(out);
        Ok(())
    }

    fn emit(&mut self, out: &mut Vec<VideoEvent>) {
        if self.frames.is_empty() {
            return;
        }
        if let Some(config) = self.encoder.config()
            && self.declared.as_ref() != Some(config)
        {
            self.declared = Some(config.clone());
            out.push(VideoEvent::Config(TrackInfo::from_config(
                Codec::H264,
                Some(config.clone()),
            )));
        }
        out.extend(self.frames.drain(..).map(VideoEvent::Frame));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ffmpeg::mix::image::{Image, tests::png};
    use crate::ffmpeg::mix::layout::Overlay;
    use crate::ffmpeg::testsrc::{self, Source, SourceSpec};

    const W: u32 = 320;
    const H: u32 = 180;

    fn red() -> Yuv {
        Yuv::from_rgb(255, 0, 0)
    }

    fn blue() -> Yuv {
        Yuv::from_rgb(0, 0, 255)
    }

    fn solid(colour: Yuv, frames: u32) -> Source {
        testsrc::solid(
            &SourceSpec {
                width: W,
                height: H,
                fps: 30,
                frames,
                keyint: 30,
                b_frames: 0,
                bitrate_kbps: 300,
            },
            colour.planes(),
        )
        .unwrap()
    }

    /// The average colour (RGB) of a rectangle of a YUV 4:2:0 picture.
    fn average(p: &ff::frame::Video, x: u32, y: u32, w: u32, h: u32) -> [f32; 3] {
        let mean = |plane: usize, shift: u32| {
            let stride = p.stride(plane);
            let (x, y, w, h) = (x >> shift, y >> shift, w >> shift, h >> shift);
            let mut sum = 0u64;
            for row in y..y + h {
                for col in x..x + w {
                    sum += u64::from(p.data(plane)[row as usize * stride + col as usize]);
                }
            }
            sum as f32 / (w * h) as f32
        };
        Yuv::to_rgb(mean(0, 0), mean(1, 1), mean(2, 1))
    }

    /// Which named colour `rgb` is, if it is one of them clearly.
    fn name(rgb: [f32; 3]) -> &'static str {
        let near = |c: [f32; 3]| rgb.iter().zip(c).all(|(a, b)| (a - b).abs() < 40.0);
        if near([255.0, 0.0, 0.0]) {
            "red"
        } else if near([0.0, 0.0, 255.0]) {
            "blue"
        } else if near([0.0, 255.0, 0.0]) {
            "green"
        } else if near([128.0, 128.0, 128.0]) {
            "grey"
        } else if near([0.0, 0.0, 0.0]) {
            "black"
        } else {
            "other"
        }
    }

    /// The colours of the left and right halves (inner parts) of a side-by-side picture.
    fn halves(p: &ff::frame::Video) -> (&'static str, &'static str) {
        let (w, h) = (p.width(), p.height());
        (
            name(average(p, 16, 16, w / 2 - 32, h - 32)),
            name(average(p, w / 2 + 16, 16, w / 2 - 32, h - 32)),
        )
    }

    #[test]
    fn side_by_side_is_red_left_blue_right_and_a_swap_applies_at_the_next_frame() {
        let (r, b) = (solid(red(), 60), solid(blue(), 60));
        let layout = Layout::grid(["red", "blue"], W, H, 30).unwrap();
        let mut swapped = layout.clone();
        swapped.inputs[0].id = "blue".into();
        swapped.inputs[1].id = "red".into();
        let settings = MixSettings {
            bitrate_kbps: 500,
            keyint: 30,
            ..MixSettings::default()
        };
        let mut mixer = VideoMixer::new(layout, &settings).unwrap();
        mixer.compositor().add_input("red").unwrap();
        mixer.compositor().add_input("blue").unwrap();
        let mut out = Vec::new();
        let mut swap_at = None;
        for (fr, fb) in r.frames.iter().zip(&b.frames) {
            let now = fr.pts;
            let c = mixer.compositor();
            c.push("red", fr, Some(&r.avcc), now).unwrap();
            c.push("blue", fb, Some(&b.avcc), now).unwrap();
            if now >= 1_000_000 && swap_at.is_none() {
                mixer.compositor().set_layout(swapped.clone()).unwrap();
                swap_at = Some(now);
            }
            assert!(mixer.tick(now, &mut out).unwrap());
            // A tick back in time (or at the same time) draws nothing.
            assert!(!mixer.tick(now, &mut out).unwrap());
            assert!(!mixer.tick(now - 10_000, &mut out).unwrap());
        }
        mixer.flush(&mut out).unwrap();
        let swap_at = swap_at.unwrap();

        let Some(VideoEvent::Config(info)) = out.first() else {
            panic!("the config comes first: {:?}", out.first());
        };
        let video = info.video.clone().unwrap();
        assert_eq!((video.width, video.height), (W, H));
        let avcc = info.config.clone().unwrap();
        let frames: Vec<&Frame> = out
            .iter()
            .filter_map(|e| match e {
                VideoEvent::Frame(f) => Some(f),
                VideoEvent::Config(_) => None,
            })
            .collect();
        assert_eq!(frames.len(), 60);
        assert!(
            frames
                .windows(2)
                .all(|w| w[0].pts < w[1].pts && w[1].dts == w[1].pts)
        );
        let keys: Vec<usize> = (0..60).filter(|&i| frames[i].keyframe).collect();
        assert_eq!(keys, [0, 30]);

        let mut decoder = SourceDecoder::new().unwrap();
        let mut seen = Vec::new();
        for f in &frames {
            decoder
                .push(f, Some(&avcc), |p| {
                    seen.push((p.pts().unwrap(), halves(p)));
                    Ok(())
                })
                .unwrap();
        }
        decoder
            .flush(|p| {
                seen.push((p.pts().unwrap(), halves(p)));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len(), 60);
        for (pts, colours) in seen {
            let want = if pts < swap_at {
                ("red", "blue")
            } else {
                ("blue", "red")
            };
            assert_eq!(colours, want, "at {pts}");
        }
    }

    #[test]
    fn an_input_that_stops_shows_the_slate_after_the_timeout_the_other_keeps_its_picture() {
        let (r, b) = (solid(red(), 45), solid(blue(), 45));
        let layout = Layout::grid(["red", "blue"], W, H, 30).unwrap();
        let mut c = Compositor::new(layout, Yuv::GREY, 300_000).unwrap();
        c.add_input("red").unwrap();
        c.add_input("blue").unwrap();
        // Frames for an input never added are refused (its rectangle shows the slate).
        assert!(matches!(
            c.push("green", &r.frames[0], None, 0),
            Err(MixError::UnknownInput(_))
        ));
        let stop = b.frames[15].pts;
        for (fr, fb) in r.frames.iter().zip(&b.frames) {
            let now = fr.pts;
            c.push("red", fr, Some(&r.avcc), now).unwrap();
            if now <= stop {
                c.push("blue", fb, Some(&b.avcc), now).unwrap();
            }
            let colours = halves(c.tick(now).unwrap().unwrap());
            let right = if now - stop <= 300_000 {
                "blue"
            } else {
                "grey"
            };
            assert_eq!(colours, ("red", right), "at {now}");
        }
        // It comes back with its next picture.
        let now = r.frames[44].pts + 40_000;
        let mut again = solid(blue(), 1).frames.remove(0);
        again.pts = now;
        again.dts = now;
        c.remove_input("blue");
        c.add_input("blue").unwrap();
        c.push("blue", &again, Some(&b.avcc), now).unwrap();
        assert_eq!(halves(c.tick(now).unwrap().unwrap()), ("red", "blue"));
        // Removed: the slate again.
        assert!(c.remove_input("blue"));
        assert_eq!(halves(c.tick(now + 1).unwrap().unwrap()), ("red", "grey"));
    }

    #[test]
    fn z_order_and_an_alpha_overlay_are_drawn_and_clipped() {
        let r = solid(red(), 1);
        // Red fills the canvas at z 0; a "blue" rectangle (never added: slate) on top at z 1;
        // a green PNG, left half opaque and right half transparent, on top of everything.
        let mut layout = Layout::new(W, H, 30);
        layout
            .inputs
            .push(super::super::Placement::new("red", 0, 0, W, H));
        let mut top = super::super::Placement::new("blue", 0, 0, 160, 90);
        top.z = 1;
        layout.inputs.push(top);
        let mut rgba = Vec::new();
        for _y in 0..64 {
            for x in 0..64 {
                rgba.extend_from_slice(if x < 32 {
                    &[0, 255, 0, 255]
                } else {
                    &[0, 255, 0, 0]
                });
            }
        }
        let image = Arc::new(Image::from_png(&png(64, 64, &rgba)).unwrap());
        layout.overlays.push(Overlay {
            image: image.clone(),
            x: 200,
            y: 40,
            z: 5,
        });
        // Past the bottom-right corner: clipped.
        layout.overlays.push(Overlay {
            image,
            x: W - 20,
            y: H - 20,
            z: 5,
        });
        let mut c = Compositor::new(layout.clone(), Yuv::GREY, 1_000_000).unwrap();
        c.add_input("red").unwrap();
        c.push("red", &r.frames[0], Some(&r.avcc), 0).unwrap();
        let p = c.tick(0).unwrap().unwrap();
        assert_eq!(name(average(p, 8, 8, 140, 70)), "grey", "the slate on top");
        assert_eq!(
            name(average(p, 200, 100, 100, 60)),
            "red",
            "the input beneath"
        );
        assert_eq!(
            name(average(p, 204, 44, 24, 56)),
            "green",
            "the opaque half"
        );
        assert_eq!(
            name(average(p, 236, 44, 24, 56)),
            "red",
            "the transparent half"
        );
        assert_eq!(name(average(p, W - 18, H - 18, 16, 16)), "green", "clipped");
        // Swap the z-order: the red input on top of the slate.
        layout.inputs[0].z = 2;
        c.set_layout(layout.clone()).unwrap();
        let p = c.tick(1).unwrap().unwrap();
        assert_eq!(name(average(p, 8, 8, 140, 70)), "red");
        // A canvas change is refused and changes nothing.
        layout.width = 640;
        assert!(matches!(c.set_layout(layout), Err(MixError::CanvasChanged)));
        assert_eq!(c.layout().width, W);
    }
}
