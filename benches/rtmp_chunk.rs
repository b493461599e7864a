//! RTMP chunk stream decode throughput on the 720p fixture cut into 4096-byte chunks (what OBS
//! sends), and chunk encoding of the same messages.

use bytes::BytesMut;
use castnode::rtmp::chunk::{ChunkDecoder, encode_message};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "common/mod.rs"]
mod common;

fn chunks(c: &mut Criterion) {
    let tags = common::bench_tags();
    let mut wire = BytesMut::new();
    for t in &tags {
        let csid = if t.tag_type == 8 { 4 } else { 6 };
        encode_message(&mut wire, csid, t.ts_ms, t.tag_type, 1, &[&t.body], 4096);
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("rtmp_chunk");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("decode_720p_clip", |b| {
        b.iter(|| {
            let mut d = ChunkDecoder::new(8 << 20);
            d.set_chunk_size(4096).unwrap();
            let mut buf = BytesMut::new();
            let mut n = 0;
            // Feed as a socket would: 16 KiB reads.
            for piece in wire.chunks(16 << 10) {
                buf.extend_from_slice(piece);
                while let Some(m) = d.decode(&mut buf).unwrap() {
                    n += m.payload.len();
                }
            }
            n
        })
    });
    g.bench_function("encode_720p_clip", |b| {
        let mut out = BytesMut::with_capacity(wire.len() + 1024);
        b.iter(|| {
            out.clear();
            for t in &tags {
                encode_message(&mut out, 6, t.ts_ms, t.tag_type, 1, &[&t.body], 4096);
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, chunks);
criterion_main!(benches);
