//! Cluster link codec: a frame header + 10 KB payload encoded and decoded, and a whole group of
//! 60 such frames decoded, at once and as 1200-byte reads (about what one QUIC packet delivers).

use bytes::{Bytes, BytesMut};
use castnode::cluster::wire::{
    GroupDecoder, GroupEvent, GroupHeader, GroupSeq, SubscriptionId, encode_frame_header,
    encode_group_header,
};
use castnode::media::{Frame, TrackId};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

const PAYLOAD: usize = 10_000;
const GROUP: usize = 60;
/// A wall-clock ingest time in microseconds, so the varint takes its 8-byte form as it will.
const INGEST_US: u64 = 1_760_000_000_000_000;

fn frame(i: usize) -> Frame {
    let dts = i as i64 * 33_333;
    Frame {
        pts: dts + 66_666,
        dts,
        keyframe: i == 0,
        payload: Bytes::from(vec![i as u8; PAYLOAD]),
    }
}

fn group_bytes() -> Bytes {
    let mut b = BytesMut::new();
    let header = GroupHeader {
        subscription: SubscriptionId(1),
        sequence: GroupSeq(42),
    };
    encode_group_header(&header, &mut b).expect("small values");
    for i in 0..GROUP {
        let f = frame(i);
        encode_frame_header(TrackId(0), &f, INGEST_US + i as u64, &mut b).expect("small frame");
        b.extend_from_slice(&f.payload);
    }
    b.freeze()
}

fn decode_all(buf: &mut BytesMut, d: &mut GroupDecoder) -> usize {
    let mut frames = 0;
    while let Some(e) = d.decode(buf).expect("valid group") {
        if let GroupEvent::Frame(_) = e {
            frames += 1;
        }
    }
    frames
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("cluster_wire");

    let f = frame(1);
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_frame_header", |b| {
        let mut out = BytesMut::with_capacity(64);
        b.iter(|| {
            out.clear();
            encode_frame_header(TrackId(0), &f, INGEST_US, &mut out).expect("small frame");
            out.len()
        })
    });
    g.throughput(Throughput::Bytes(PAYLOAD as u64));
    g.bench_function("encode_frame_10kb_copied", |b| {
        // What a sender pays if it copies the payload behind the header instead of writing the
        // two buffers vectored.
        let mut out = BytesMut::with_capacity(PAYLOAD + 64);
        b.iter(|| {
            out.clear();
            encode_frame_header(TrackId(0), &f, INGEST_US, &mut out).expect("small frame");
            out.extend_from_slice(&f.payload);
            out.len()
        })
    });

    let group = group_bytes();
    let one_frame = {
        // The header plus the first frame.
        let mut d = GroupDecoder::new();
        let mut b = BytesMut::from(&group[..]);
        d.decode(&mut b).expect("header");
        let header_len = group.len() - b.len();
        let before = b.len();
        d.decode(&mut b).expect("frame");
        group.slice(..header_len + before - b.len())
    };
    // The routines hand the drained buffer back so that freeing it is not timed.
    g.bench_function("decode_frame_10kb", |b| {
        b.iter_batched(
            || BytesMut::from(&one_frame[..]),
            |mut buf| (decode_all(&mut buf, &mut GroupDecoder::new()), buf),
            BatchSize::SmallInput,
        )
    });

    g.throughput(Throughput::Elements(GROUP as u64));
    g.bench_function("decode_group_60x10kb", |b| {
        b.iter_batched(
            || BytesMut::from(&group[..]),
            |mut buf| (decode_all(&mut buf, &mut GroupDecoder::new()), buf),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decode_group_60x10kb_1200b_reads", |b| {
        // Includes copying each read into the buffer, as a driver does.
        b.iter(|| {
            let mut d = GroupDecoder::new();
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut frames = 0;
            for chunk in group.chunks(1200) {
                buf.extend_from_slice(chunk);
                frames += decode_all(&mut buf, &mut d);
            }
            frames
        })
    });
    g.finish();
}

criterion_group!(benches, wire);
criterion_main!(benches);
