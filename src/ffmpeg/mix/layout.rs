//! What a mix looks like: the canvas (size, frame rate, background), where each input goes
//! (a rectangle, a z-order, its audio gain and mute) and the image overlays on top.
//!
//! Guarantees: [`Layout::validate`] accepts only a layout the compositor can draw exactly, and
//! names the first offending field (`inputs[1].w`) in its error:
//! - the canvas is non-empty, even-sized (4:2:0 chroma) and at most [`MAX_SIDE`] a side; its
//!   frame rate is 1 to 240;
//! - an input's rectangle is non-empty, even in position and size, and lies wholly inside the
//!   canvas: one reaching outside is refused, not clipped (a clipped input would silently show
//!   a crop the user did not ask for); ids are non-empty and unique; gains are finite, 0 to
//!   [`MAX_GAIN`];
//! - an overlay starts at an even position inside the canvas; the part of its image past the
//!   canvas's right or bottom edge is clipped (a logo may hang off the edge).
//!
//! A picture is scaled to fill its rectangle (the aspect ratio is the rectangle's: give it the
//! source's to avoid distortion). Items are drawn in ascending `z`; at equal `z` inputs before
//! overlays, each in list order.

use std::fmt;
use std::sync::Arc;

use super::image::Image;

/// The longest canvas side accepted.
pub const MAX_SIDE: u32 = 8192;
/// The largest audio gain accepted (+24 dB).
pub const MAX_GAIN: f32 = 16.0;

/// A colour in limited-range BT.601 YUV, as the canvas holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Yuv {
    /// Luma, 16–235.
    pub y: u8,
    /// Blue-difference chroma, 16–240.
    pub u: u8,
    /// Red-difference chroma, 16–240.
    pub v: u8,
}

impl Yuv {
    /// Black.
    pub const BLACK: Yuv = Yuv {
        y: 16,
        u: 128,
        v: 128,
    };
    /// Mid grey: the default slate.
    pub const GREY: Yuv = Yuv {
        y: 126,
        u: 128,
        v: 128,
    };

    /// The YUV of a full-range sRGB colour (BT.601, limited range).
    pub fn from_rgb(r: u8, g: u8, b: u8) -> Yuv {
        let (r, g, b) = (f32::from(r), f32::from(g), f32::from(b));
        let y = 16.0 + 0.2568 * r + 0.5041 * g + 0.0979 * b;
        let u = 128.0 - 0.1482 * r - 0.2910 * g + 0.4392 * b;
        let v = 128.0 + 0.4392 * r - 0.3678 * g - 0.0714 * b;
        let c = |x: f32| x.round().clamp(0.0, 255.0) as u8;
        Yuv {
            y: c(y),
            u: c(u),
            v: c(v),
        }
    }

    /// The full-range RGB of a (possibly averaged) YUV colour, unclamped.
    pub fn to_rgb(y: f32, u: f32, v: f32) -> [f32; 3] {
        let (y, u, v) = (1.164 * (y - 16.0), u - 128.0, v - 128.0);
        [y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u]
    }

    /// `[y, u, v]`.
    pub fn planes(self) -> [u8; 3] {
        [self.y, self.u, self.v]
    }
}

/// Where one input goes, and how loud.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The input's id (what it was added under).
    pub id: String,
    /// Left edge on the canvas (even).
    pub x: u32,
    /// Top edge (even).
    pub y: u32,
    /// Width (even, non-zero).
    pub w: u32,
    /// Height (even, non-zero).
    pub h: u32,
    /// Drawing order: higher is on top.
    pub z: i32,
    /// Audio gain (1.0: as it is).
    pub gain: f32,
    /// Audio muted (its picture still shows).
    pub muted: bool,
}

impl Placement {
    /// `id` at `(x, y)`, `w`×`h`, z 0, gain 1, not muted.
    pub fn new(id: impl Into<String>, x: u32, y: u32, w: u32, h: u32) -> Placement {
        Placement {
            id: id.into(),
            x,
            y,
            w,
            h,
            z: 0,
            gain: 1.0,
            muted: false,
        }
    }

    /// The gain the mixer applies: 0 when muted.
    pub fn effective_gain(&self) -> f32 {
        if self.muted { 0.0 } else { self.gain }
    }
}

/// An image drawn over the canvas.
#[derive(Clone, Debug)]
pub struct Overlay {
    /// The image (shared: a layout change that keeps it does not decode it again).
    pub image: Arc<Image>,
    /// Left edge (even, inside the canvas).
    pub x: u32,
    /// Top edge (even, inside the canvas).
    pub y: u32,
    /// Drawing order: higher is on top.
    pub z: i32,
}

/// A whole mix layout.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Canvas width (even).
    pub width: u32,
    /// Canvas height (even).
    pub height: u32,
    /// Output frames a second.
    pub fps: u32,
    /// What shows where nothing is drawn.
    pub background: Yuv,
    /// The inputs' places.
    pub inputs: Vec<Placement>,
    /// The overlays.
    pub overlays: Vec<Overlay>,
}

/// Why a layout was refused: the field (`inputs[1].w`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct LayoutError {
    /// The offending field, as a path into the layout.
    pub field: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn refuse(field: impl fmt::Display, reason: &'static str) -> LayoutError {
    LayoutError {
        field: field.to_string(),
        reason,
    }
}

impl Layout {
    /// An empty canvas (background only).
    pub fn new(width: u32, height: u32, fps: u32) -> Layout {
        Layout {
            width,
            height,
            fps,
            background: Yuv::BLACK,
            inputs: Vec::new(),
            overlays: Vec::new(),
        }
    }

    /// An automatic grid of the inputs `ids`, in reading order: ⌈√n⌉ columns, as many rows as
    /// needed, equal even-sized cells, a short last row centred.
    pub fn grid<S: Into<String>>(
        ids: impl IntoIterator<Item = S>,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<Layout, LayoutError> {
        let ids: Vec<String> = ids.into_iter().map(Into::into).collect();
        let mut layout = Layout::new(width, height, fps);
        let n = ids.len() as u32;
        if n > 0 {
            let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
            let rows = n.div_ceil(cols);
            let (cw, ch) = ((width / cols) & !1, (height / rows) & !1);
            for (i, id) in ids.into_iter().enumerate() {
                let (col, row) = (i as u32 % cols, i as u32 / cols);
                let in_row = (n - row * cols).min(cols);
                let indent = ((cols - in_row) * cw / 2) & !1;
                layout
                    .inputs
                    .push(Placement::new(id, indent + col * cw, row * ch, cw, ch));
            }
        }
        layout.validate()?;
        Ok(layout)
    }

    /// Picture-in-picture: `main` fills the canvas, `inset` a quarter of each side in the
    /// bottom-right corner (a margin of 1/24 of the height), on top.
    pub fn picture_in_picture(
        main: impl Into<String>,
        inset: impl Into<String>,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<Layout, LayoutError> {
        let mut layout = Layout::new(width, height, fps);
        layout
            .inputs
            .push(Placement::new(main, 0, 0, width, height));
        let (w, h, margin) = ((width / 4) & !1, (height / 4) & !1, (height / 24) & !1);
        let mut small = Placement::new(
            inset,
            width.saturating_sub(w + margin) & !1,
            height.saturating_sub(h + margin) & !1,
            w,
            h,
        );
        small.z = 1;
        layout.inputs.push(small);
        layout.validate()?;
        Ok(layout)
    }

    /// The placement of input `id`, if the layout shows it.
    pub fn input(&self, id: &str) -> Option<&Placement> {
        self.inputs.iter().find(|p| p.id == id)
    }

    /// Checks the rules in the module's documentation; the first broken one names its field.
    pub fn validate(&self) -> Result<(), LayoutError> {
        for (name, side) in [("width", self.width), ("height", self.height)] {
            if side == 0 {
                return Err(refuse(name, "zero"));
            }
            if side % 2 == 1 {
                return Err(refuse(name, "odd (4:2:0 needs even sizes)"));
            }
            if side > MAX_SIDE {
                return Err(refuse(name, "larger than 8192"));
            }
        }
        if !(1..=240).contains(&self.fps) {
            return Err(refuse("fps", "not 1 to 240"));
        }
        for (i, p) in self.inputs.iter().enumerate() {
            let field = |f: &str| format!("inputs[{i}].{f}");
            if p.id.is_empty() {
                return Err(refuse(field("id"), "empty"));
            }
            if self.inputs[..i].iter().any(|q| q.id == p.id) {
                return Err(refuse(field("id"), "named twice"));
            }
            for (name, v) in [("x", p.x), ("y", p.y), ("w", p.w), ("h", p.h)] {
                if v % 2 == 1 {
                    return Err(refuse(
                        field(name),
                        "odd (4:2:0 needs even positions and sizes)",
                    ));
                }
            }
            for (name, v) in [("w", p.w), ("h", p.h)] {
                if v == 0 {
                    return Err(refuse(field(name), "zero"));
                }
            }
            if u64::from(p.x) + u64::from(p.w) > u64::from(self.width) {
                return Err(refuse(field("x"), "the rectangle reaches past the canvas"));
            }
            if u64::from(p.y) + u64::from(p.h) > u64::from(self.height) {
                return Err(refuse(field("y"), "the rectangle reaches past the canvas"));
            }
            if !p.gain.is_finite() || !(0.0..=MAX_GAIN).contains(&p.gain) {
                return Err(refuse(field("gain"), "not 0 to 16"));
            }
        }
        for (i, o) in self.overlays.iter().enumerate() {
            for (name, v, side) in [("x", o.x, self.width), ("y", o.y, self.height)] {
                if v % 2 == 1 {
                    return Err(refuse(format!("overlays[{i}].{name}"), "odd"));
                }
                if v >= side {
                    return Err(refuse(
                        format!("overlays[{i}].{name}"),
                        "outside the canvas",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rects(l: &Layout) -> Vec<(u32, u32, u32, u32)> {
        l.inputs.iter().map(|p| (p.x, p.y, p.w, p.h)).collect()
    }

    #[test]
    fn grids_fill_the_canvas_in_reading_order() {
        let two = Layout::grid(["a", "b"], 1280, 720, 30).unwrap();
        assert_eq!(rects(&two), [(0, 0, 640, 720), (640, 0, 640, 720)]);
        // Three: two columns, the short last row centred.
        let three = Layout::grid(["a", "b", "c"], 1280, 720, 30).unwrap();
        assert_eq!(
            rects(&three),
            [(0, 0, 640, 360), (640, 0, 640, 360), (320, 360, 640, 360)]
        );
        let five = Layout::grid(["a", "b", "c", "d", "e"], 1280, 720, 30).unwrap();
        assert_eq!(rects(&five)[0], (0, 0, 426, 360));
        assert_eq!(rects(&five)[4], (638, 360, 426, 360));
        assert!(
            Layout::grid(Vec::<String>::new(), 64, 64, 30)
                .unwrap()
                .inputs
                .is_empty()
        );
    }

    #[test]
    fn picture_in_picture_puts_the_inset_on_top_in_the_corner() {
        let l = Layout::picture_in_picture("main", "guest", 1280, 720, 30).unwrap();
        assert_eq!(rects(&l), [(0, 0, 1280, 720), (930, 510, 320, 180)]);
        assert_eq!(l.input("guest").unwrap().z, 1);
        assert_eq!(l.input("main").unwrap().z, 0);
    }

    #[test]
    fn bad_layouts_are_refused_naming_the_field() {
        let ok = Layout::grid(["a", "b"], 640, 360, 30).unwrap();
        let err = |f: &dyn Fn(&mut Layout)| {
            let mut l = ok.clone();
            f(&mut l);
            l.validate().unwrap_err().field
        };
        assert_eq!(err(&|l| l.width = 0), "width");
        assert_eq!(err(&|l| l.height = 361), "height");
        assert_eq!(err(&|l| l.fps = 0), "fps");
        assert_eq!(err(&|l| l.inputs[1].w = 0), "inputs[1].w");
        assert_eq!(err(&|l| l.inputs[0].h = 99), "inputs[0].h");
        assert_eq!(err(&|l| l.inputs[1].x = 322), "inputs[1].x");
        assert_eq!(err(&|l| l.inputs[1].y = 2), "inputs[1].y");
        assert_eq!(err(&|l| l.inputs[1].id = "a".into()), "inputs[1].id");
        assert_eq!(err(&|l| l.inputs[0].gain = f32::NAN), "inputs[0].gain");
        assert!(Layout::grid(["a"], 640, 360, 30).is_ok());
    }

    #[test]
    fn colours_convert_both_ways() {
        for rgb in [[255u8, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 255]] {
            let c = Yuv::from_rgb(rgb[0], rgb[1], rgb[2]);
            let back = Yuv::to_rgb(f32::from(c.y), f32::from(c.u), f32::from(c.v));
            for (a, b) in back.iter().zip(rgb) {
                assert!((a - f32::from(b)).abs() < 3.0, "{rgb:?} → {c:?} → {back:?}");
            }
        }
    }
}
