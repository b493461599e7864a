//! WebRTC egress per packet, as the driver does it (`src/webrtc/driver.rs`): a frame is
//! packetized once for every viewer ([`RtpFrame`], memoized in the hub entry), then each
//! viewer's [`MediaSender`] writes the 12-byte RTP header, copies the payload into the egress
//! buffer and encrypts it with that viewer's SRTP keys. The send system call is not included
//! (the driver batches a frame's packets into one GSO send).
//!
//! Reported per element = per RTP packet:
//! - `packetize/video_frame_10kb`: building the shared payloads of a 10 000-byte H.264 slice
//!   (9 packets) — paid once per frame whatever the number of viewers.
//! - `viewer/video_frame_10kb/{aes128gcm,aes256gcm}`: one viewer's copy of that frame (header,
//!   copy, AEAD-GCM, its history entry); the per-viewer, per-packet cost.
//! - `viewer/audio_frame_opus/aes128gcm`: a 160-byte Opus frame (one packet).
//!
//! AES-128-GCM is what castnode's DTLS server picks when a browser offers it (vendor/README.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use castnode::webrtc::keys::Keying;
use castnode::webrtc::packetize::RtpFrame;
use castnode::webrtc::sender::{Kind, MediaSender, Sink};
use castnode::webrtc::srtp::Profile;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const VIDEO_FRAME: usize = 10_000;
const OPUS_FRAME: usize = 160;

/// The egress buffer: datagrams appended, cleared once a frame's worth is "sent".
struct Buffer {
    buf: Vec<u8>,
    datagrams: usize,
}

impl Sink for Buffer {
    fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    fn commit(&mut self, _start: usize) {
        self.datagrams += 1;
    }
}

/// Pseudo-random bytes in 1..=255 (xorshift), deterministic.
fn bytes(n: usize, mut x: u32) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 255 + 1) as u8
        })
        .collect()
}

/// A non-IDR slice in the hub's length-prefixed form.
fn video_frame() -> Vec<u8> {
    let mut nal = bytes(VIDEO_FRAME - 4, 7);
    nal[0] = 0x41;
    let mut f = (nal.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&nal);
    f
}

fn sender(profile: Profile) -> MediaSender {
    let keying = Keying {
        material: bytes(profile.keying_material_len(), 3),
        profile,
        client: false,
    };
    MediaSender::new(&keying, Some(0x1111), Some(0x2222), "bench".into()).unwrap()
}

fn bench(c: &mut Criterion) {
    let frame = video_frame();
    let rtp = Arc::new(RtpFrame::h264(&frame, None, false));
    let packets = rtp.len() as u64;

    let mut g = c.benchmark_group("packetize");
    g.throughput(Throughput::Elements(packets));
    g.bench_function("video_frame_10kb", |b| {
        b.iter(|| black_box(RtpFrame::h264(black_box(&frame), None, false)))
    });
    g.finish();

    let mut g = c.benchmark_group("viewer");
    for (name, profile) in [
        ("aes128gcm", Profile::AeadAes128Gcm),
        ("aes256gcm", Profile::AeadAes256Gcm),
    ] {
        g.throughput(Throughput::Elements(packets));
        g.bench_function(format!("video_frame_10kb/{name}"), |b| {
            one_viewer(b, profile, Kind::Video, 102, &rtp, 33_333)
        });
    }
    let opus = Arc::new(RtpFrame::opus(&bytes(OPUS_FRAME, 5)));
    g.throughput(Throughput::Elements(1));
    g.bench_function("audio_frame_opus/aes128gcm", |b| {
        one_viewer(b, Profile::AeadAes128Gcm, Kind::Audio, 111, &opus, 20_000)
    });
    g.finish();
}

/// Times one viewer's copy of `frame`, one frame every `interval_us` of media time.
fn one_viewer(
    b: &mut criterion::Bencher,
    profile: Profile,
    kind: Kind,
    pt: u8,
    frame: &Arc<RtpFrame>,
    interval_us: i64,
) {
    let mut s = sender(profile);
    let mut out = Buffer {
        buf: Vec::with_capacity(64 << 10),
        datagrams: 0,
    };
    let start = Instant::now();
    let mut pts = 0i64;
    b.iter(|| {
        pts += interval_us;
        let now = start + Duration::from_micros(pts as u64);
        out.buf.clear();
        s.send(kind, pt, frame, pts, now, &mut out);
        black_box(out.buf.len())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
