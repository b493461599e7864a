//! FLV tag body → media frame (the ingest conversion), per tag, on the 720p fixture.

use castnode::rtmp::flv::{TAG_AUDIO, TAG_VIDEO, Tag, parse_audio, parse_video};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "common/mod.rs"]
mod common;

fn demux(c: &mut Criterion) {
    let tags: Vec<_> = common::bench_tags()
        .into_iter()
        .filter(|t| t.tag_type != 18)
        .collect();
    let mut g = c.benchmark_group("flv_demux");
    g.throughput(Throughput::Elements(tags.len() as u64));
    g.bench_function("tag_to_frame_720p_clip", |b| {
        b.iter(|| {
            let mut frames = 0;
            for t in &tags {
                let tag = match t.tag_type {
                    TAG_VIDEO => parse_video(t.ts_ms, &t.body),
                    TAG_AUDIO => parse_audio(t.ts_ms, &t.body),
                    _ => continue,
                };
                if let Ok(Tag::Frame(..)) = tag {
                    frames += 1;
                }
            }
            frames
        })
    });
    g.finish();
}

criterion_group!(benches, demux);
criterion_main!(benches);
