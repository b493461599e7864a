//! The transcoder's ladder (`src/ffmpeg/ladder.rs`) on a 720p30 source: what decoding it once
//! costs, and what each rung of the default ladder costs to scale and encode, per frame. The
//! source is `castnode::ffmpeg::testsrc` (moving bars with a band of per-frame noise; libx264
//! `ultrafast`, 2 B-frames, an IDR every 60 frames, 3 Mbit/s), made in process: no fixture file.
//!
//! Reported per element = per source frame:
//! - `decode_720p`: the source's H.264 decoded (FFmpeg, one thread), paid once for all rungs.
//! - `scale/{rung}`: swscale (bilinear) from the 720p picture to the rung's size.
//! - `scale_encode/{rung}`: the rung's whole share: scale, then libx264 (`veryfast`,
//!   `zerolatency`, one thread) at the rung's bitrate, an IDR every 60th frame as the source has.
//!   The 720p rung is encoded from the decoded picture as it is (no scaling).
//! - `ladder_720p_default`: everything for one source frame: decode, then every rung.
//!
//! Pictures cycle through the 60 decoded frames of the clip, with timestamps that keep rising, so
//! the encoders see motion and a steady frame rate.

use std::hint::black_box;

use castnode::ffmpeg::ladder::{LadderEncoder, LadderEvent, RungEncoder, SourceDecoder, X264};
use castnode::ladder::Ladder;
#[path = "common/clip.rs"]
mod clip;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use clip::FPS;

fn ladder(c: &mut Criterion) {
    let src = clip::clip_720p();
    let nth = |n: usize| clip::nth(&src, n);

    let mut pictures = clip::decoded(&src);

    let mut g = c.benchmark_group("ladder");
    g.throughput(Throughput::Elements(1));

    let mut decoder = SourceDecoder::new().unwrap();
    let mut n = 0;
    g.bench_function("decode_720p", |b| {
        b.iter(|| {
            let f = nth(n);
            n += 1;
            decoder
                .push(&f, Some(&src.avcc), |p| {
                    black_box(p.pts());
                    Ok(())
                })
                .unwrap();
        })
    });

    let rungs = Ladder::default_ladder().for_source(1280, 720);
    for rung in &rungs {
        let mut r = RungEncoder::new(rung.clone(), Some(FPS as f64), X264::open_boxed).unwrap();
        if rung.height != 720 {
            let mut n = 0;
            g.bench_function(BenchmarkId::new("scale", &rung.name), |b| {
                b.iter(|| {
                    black_box(r.scale(&pictures[n % pictures.len()]).unwrap());
                    n += 1;
                })
            });
        }
        let mut out = Vec::with_capacity(8);
        let mut n = 0;
        g.bench_function(BenchmarkId::new("scale_encode", &rung.name), |b| {
            b.iter(|| {
                let i = n % pictures.len();
                let picture = &mut pictures[i];
                picture.set_pts(Some(n as i64 * 1_000_000 / FPS));
                r.push(picture, i == 0, 0, &mut out).unwrap();
                out.clear();
                n += 1;
            })
        });
    }

    let mut enc = LadderEncoder::new(Ladder::default_ladder(), Some(FPS as f64)).unwrap();
    let mut out: Vec<LadderEvent> = Vec::with_capacity(16);
    let mut n = 0;
    g.bench_function("ladder_720p_default", |b| {
        b.iter(|| {
            enc.push(&nth(n), Some(&src.avcc), &mut out).unwrap();
            out.clear();
            n += 1;
        })
    });
    g.finish();
}

criterion_group!(benches, ladder);
criterion_main!(benches);
