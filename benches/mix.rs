//! The mixing core (`src/ffmpeg/mix/`) on two 720p30 inputs side by side into a 720p30 output:
//! what one output frame costs. The inputs are `castnode::ffmpeg::testsrc` clips (moving bars
//! with a band of per-frame noise; libx264 `ultrafast`, 2 B-frames, an IDR every 60 frames,
//! 3 Mbit/s), made in process: no fixture file. The second input is the first clip started half
//! way through, so the two halves differ.
//!
//! Reported per element = per output frame:
//! - `composite_2x720p`: drawing the canvas from two new decoded pictures: each copied in
//!   ([`Compositor::push_picture`]), scaled (1280×720 into 640×720, swscale bilinear) and copied
//!   onto the canvas; no decode, no encode.
//! - `mix_2x720p30_side_by_side`: everything for one output frame: both inputs' frames decoded
//!   (FFmpeg, one thread each), scaled and composited, then the canvas encoded (libx264
//!   `veryfast`, `zerolatency`, one thread, 2.5 Mbit/s, an IDR every 60 frames).
//!
//! Inputs cycle through the clip with timestamps that keep rising; output ticks are 1/30 s
//! apart, so the encoder sees motion and a steady frame rate.

use std::hint::black_box;

use castnode::ffmpeg::mix::{Compositor, Layout, MixSettings, VideoMixer, Yuv};
#[path = "common/clip.rs"]
mod clip;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use clip::FPS;

fn mix(c: &mut Criterion) {
    let src = clip::clip_720p();
    let nth = |n: usize| clip::nth(&src, n);
    let layout = Layout::grid(["a", "b"], 1280, 720, FPS as u32).unwrap();

    let mut g = c.benchmark_group("mix");
    g.throughput(Throughput::Elements(1));

    // Composite only: the clip decoded beforehand, a new picture per input per tick.
    let pictures = clip::decoded(&src);
    let mut compositor = Compositor::new(layout.clone(), Yuv::GREY, i64::MAX).unwrap();
    compositor.add_input("a").unwrap();
    compositor.add_input("b").unwrap();
    let (mut n, mut now) = (0, 0);
    g.bench_function("composite_2x720p", |b| {
        b.iter(|| {
            let len = pictures.len();
            compositor
                .push_picture("a", &pictures[n % len], now)
                .unwrap();
            compositor
                .push_picture("b", &pictures[(n + 30) % len], now)
                .unwrap();
            black_box(compositor.tick(now).unwrap().is_some());
            n += 1;
            now += 1_000_000 / FPS;
        })
    });

    let settings = MixSettings::default();
    let mut mixer = VideoMixer::new(layout, &settings).unwrap();
    mixer.compositor().add_input("a").unwrap();
    mixer.compositor().add_input("b").unwrap();
    let mut out = Vec::with_capacity(4);
    let mut n = 0;
    let mut now = 0;
    g.bench_function("mix_2x720p30_side_by_side", |b| {
        b.iter(|| {
            let c = mixer.compositor();
            c.push("a", &nth(n), Some(&src.avcc), now).unwrap();
            c.push("b", &nth(n + 30), Some(&src.avcc), now).unwrap();
            mixer.tick(now, &mut out).unwrap();
            black_box(out.len());
            out.clear();
            n += 1;
            now += 1_000_000 / FPS;
        })
    });
    g.finish();
}

criterion_group!(benches, mix);
criterion_main!(benches);
