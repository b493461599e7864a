//! Hub fan-out: one publisher pushing the 720p fixture's frames, N players each reading every
//! frame and taking its shared RTMP encoding (what a player does per frame). Reported per
//! element = per player per frame.

use std::sync::Arc;

use bytes::Bytes;
use castnode::media::feed::Muxer;
use castnode::media::{Entry, Hub, Item, TrackId, TrackInfo};
use castnode::rtmp::flv::{TAG_AUDIO, TAG_VIDEO, Tag, parse_audio, parse_video};
use castnode::rtmp::mux::RtmpMuxer;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

#[path = "common/mod.rs"]
mod common;

fn fanout(c: &mut Criterion) {
    // Decode the clip once: configs and frames in publish order.
    let mut configs: Vec<(TrackId, TrackInfo)> = Vec::new();
    let mut frames = Vec::new();
    for t in common::bench_tags() {
        let (track, tag) = match t.tag_type {
            TAG_VIDEO => (TrackId(0), parse_video(t.ts_ms, &t.body)),
            TAG_AUDIO => (TrackId(1), parse_audio(t.ts_ms, &t.body)),
            _ => continue,
        };
        match tag {
            Ok(Tag::Config(info)) => configs.push((track, info)),
            Ok(Tag::Frame(_, f)) => frames.push((track, f)),
            _ => {}
        }
    }
    let frames = &frames[..600.min(frames.len())];
    let mut g = c.benchmark_group("hub_fanout");
    for players in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements((players * frames.len()) as u64));
        g.bench_with_input(
            BenchmarkId::new("read_and_mux_per_player_frame", players),
            &players,
            |b, &players| {
                b.iter(|| {
                    let hub = Hub::default();
                    let mut producer = hub
                        .publish("live/bench", std::time::Instant::now())
                        .unwrap();
                    for (t, info) in &configs {
                        producer.set_track(*t, info.clone());
                    }
                    let infos: Vec<TrackInfo> = configs.iter().map(|(_, i)| i.clone()).collect();
                    let mut consumers: Vec<_> = (0..players)
                        .map(|_| hub.subscribe("live/bench").unwrap())
                        .collect();
                    let mut entries: Vec<Arc<Entry>> = Vec::with_capacity(64);
                    let mut out: Vec<Bytes> = Vec::with_capacity(64);
                    let mut sent = 0usize;
                    for (t, f) in frames {
                        producer.push(*t, f.clone());
                        for c in &mut consumers {
                            c.read(&mut entries, 64);
                            for e in entries.drain(..) {
                                if let Item::Frame { track, .. } = &e.item
                                    && let Some(b) =
                                        RtmpMuxer.entry(&e, &infos[usize::from(track.0)])
                                {
                                    out.push(b);
                                }
                            }
                            sent += out.len();
                            out.clear();
                        }
                    }
                    sent
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
