//! WebRTC egress per packet: what the server spends on one outgoing RTP packet — str0m
//! packetizing a frame written through its `Writer` (frame mode), SRTP-encrypting each packet,
//! and handing the datagrams out (`Output::Transmit`, each copied into one reused buffer, as the
//! driver's egress batch does; the send system call is not included). Reported per element = per
//! RTP packet; RTCP the sender emits along the way (about one per second of media) is timed but
//! not counted.
//!
//! Two `str0m::Rtc` peers live in this process. The sender is built like the server's viewer
//! session in `src/webrtc/driver.rs` (ICE-lite, H.264 + Opus only, 1 s stats, a 500-packet video
//! send buffer, the answerer); the receiver like a browser/WHEP client (full ICE, frame mode,
//! recvonly video + audio, the offerer). Offer/answer go through str0m's SDP API, both add a host
//! candidate with a fake address (10.0.0.1:1000 sender, 10.0.0.2:2000 receiver), and a loop moves
//! every `Output::Transmit` of one into the other as `Input::Receive` while a virtual clock
//! advances through `Input::Timeout`, until both are connected (ICE + DTLS + SRTP).
//!
//! Measured (timed), per frame, as the driver does it: write the frame with the clock at the
//! frame's time (+1/30 s video, +20 ms audio), drain `poll_output` (nothing comes out yet: str0m
//! packetizes in `handle_input`, and its deadline is now due), `Input::Timeout(now)`, drain again
//! until `Output::Timeout`, counting the RTP `Transmit`s. Not timed: after
//! each batch the datagrams are delivered to the receiver at their send times and its replies
//! (RTCP receiver reports, STUN consent checks) fed back to the sender, so the session stays
//! alive and realistic however long criterion runs.
//!
//! - `video_frame_10kb`: a 10 000-byte non-IDR H.264 slice (pseudo-random payload without zero
//!   bytes, so no start-code emulation), in the Annex B form the driver writes, one per 1/30 s.
//! - `audio_frame_opus`: a 160-byte Opus frame, one per 20 ms (one packet).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use castnode::codec::h264::avcc_to_annexb;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

const SENDER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 1000);
const RECEIVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 2000);
/// Frames written between two (untimed) deliveries to the receiver.
const BATCH: u64 = 16;
const VIDEO_FRAME: usize = 10_000;
const OPUS_FRAME: usize = 160;

/// One datagram in flight: (send time, source, destination, its bytes in [`Wire::bytes`]).
type Datagram = (Instant, SocketAddr, SocketAddr, Range<usize>);

/// Datagrams and one buffer holding their bytes (what the driver's egress batch is).
#[derive(Default)]
struct Wire {
    datagrams: Vec<Datagram>,
    bytes: Vec<u8>,
}

impl Wire {
    fn get(&self, i: usize) -> &[u8] {
        &self.bytes[self.datagrams[i].3.clone()]
    }

    fn len(&self) -> usize {
        self.datagrams.len()
    }

    fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    fn clear(&mut self) {
        self.datagrams.clear();
        self.bytes.clear();
    }
}

/// Polls until `Output::Timeout`, which it returns; datagrams go to `out`, events to `events`.
fn drain(rtc: &mut Rtc, now: Instant, out: &mut Wire, events: &mut Vec<Event>) -> Instant {
    loop {
        match rtc.poll_output().expect("poll_output") {
            Output::Timeout(t) => return t,
            Output::Transmit(t) => {
                let start = out.bytes.len();
                out.bytes.extend_from_slice(&t.contents);
                let range = start..out.bytes.len();
                out.datagrams.push((now, t.source, t.destination, range));
            }
            Output::Event(e) => events.push(e),
        }
    }
}

/// Delivers datagram `i` of `wire` at `now`.
fn receive(rtc: &mut Rtc, now: Instant, wire: &Wire, i: usize) {
    let d = &wire.datagrams[i];
    let input = Input::Receive(
        now,
        Receive {
            proto: Protocol::Udp,
            source: d.1,
            destination: d.2,
            contents: wire.get(i).try_into().expect("datagram"),
        },
    );
    rtc.handle_input(input).expect("handle_input(Receive)");
}

/// An RTCP datagram (RFC 5761: packet type 192..=223 in the second byte), not an RTP packet.
fn is_rtcp(d: &[u8]) -> bool {
    d.len() > 1 && (192..=223).contains(&d[1])
}

/// Pseudo-random bytes in 1..=255 (xorshift), deterministic.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 255) as u8 + 1
        })
        .collect()
}

/// One length-prefixed (AVCC) access unit of the given NAL units, as the hub holds frames.
fn avcc(nals: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in nals {
        out.extend_from_slice(&(n.len() as u32).to_be_bytes());
        out.extend_from_slice(n);
    }
    out
}

struct Pair {
    sender: Rtc,
    receiver: Rtc,
    now: Instant,
    video: Mid,
    audio: Mid,
    video_pt: Pt,
    audio_pt: Pt,
    video_rtp: u64,
    audio_rtp: u64,
    /// The sender's datagrams not yet delivered to the receiver.
    out: Wire,
    sender_events: Vec<Event>,
    receiver_events: Vec<Event>,
    /// RTCP datagrams the sender sent from `send` (not counted as packets).
    rtcp: u64,
}

impl Pair {
    fn connect() -> Pair {
        let start = Instant::now();
        // The server's viewer session (driver.rs `accept`, publisher = false).
        let mut sender = Rtc::builder()
            .set_ice_lite(true)
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .set_stats_interval(Some(Duration::from_secs(1)))
            .set_send_buffer_video(castnode::webrtc::driver::VIDEO_SEND_BUFFER)
            .build(start);
        sender.add_local_candidate(Candidate::host(SENDER, "udp").unwrap());
        // A browser-like WHEP client.
        let mut receiver = Rtc::builder()
            .clear_codecs()
            .enable_h264(true)
            .enable_opus(true, false)
            .build(start);
        receiver.add_local_candidate(Candidate::host(RECEIVER, "udp").unwrap());

        let mut api = receiver.sdp_api();
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        let (offer, pending) = api.apply().expect("offer");
        let answer = sender.sdp_api().accept_offer(offer).expect("accept_offer");
        receiver
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("accept_answer");

        let mut now = start;
        let (mut video, mut audio) = (None, None);
        let mut connected = false;
        for _ in 0..1000 {
            sender.handle_input(Input::Timeout(now)).unwrap();
            receiver.handle_input(Input::Timeout(now)).unwrap();
            loop {
                let (mut a, mut b, mut ev) = (Wire::default(), Wire::default(), Vec::new());
                drain(&mut sender, now, &mut a, &mut ev);
                for e in ev.drain(..) {
                    if let Event::MediaAdded(m) = e {
                        match m.kind {
                            MediaKind::Video => video = Some(m.mid),
                            MediaKind::Audio => audio = Some(m.mid),
                        }
                    }
                }
                drain(&mut receiver, now, &mut b, &mut ev);
                if a.is_empty() && b.is_empty() {
                    break;
                }
                (0..a.len()).for_each(|i| receive(&mut receiver, now, &a, i));
                (0..b.len()).for_each(|i| receive(&mut sender, now, &b, i));
            }
            if sender.is_connected() && receiver.is_connected() && video.is_some() {
                connected = true;
                break;
            }
            now += Duration::from_millis(10);
        }
        assert!(
            connected,
            "peers not connected after 10 s virtual: sender {} receiver {} video mid {video:?}",
            sender.is_connected(),
            receiver.is_connected()
        );
        let (video, audio) = (video.unwrap(), audio.expect("audio mid"));
        // The driver's choice: packetization mode 1 H.264, the Opus entry.
        let w = sender.writer(video).expect("video writer");
        let video_pt = w
            .payload_params()
            .find(|p| {
                p.spec().codec == Codec::H264 && p.spec().format.packetization_mode == Some(1)
            })
            .expect("H.264 pt")
            .pt();
        let w = sender.writer(audio).expect("audio writer");
        let audio_pt = w
            .payload_params()
            .find(|p| p.spec().codec == Codec::Opus)
            .expect("Opus pt")
            .pt();
        Pair {
            sender,
            receiver,
            now,
            video,
            audio,
            video_pt,
            audio_pt,
            video_rtp: 0,
            audio_rtp: 0,
            out: Wire::default(),
            sender_events: Vec::new(),
            receiver_events: Vec::new(),
            rtcp: 0,
        }
    }

    /// The measured work for one frame: write, drain, timeout, drain. Returns the RTP packets.
    fn send(&mut self, video: bool, data: &Arc<[u8]>) -> usize {
        let (mid, pt, rtp_time) = if video {
            self.now += Duration::from_micros(33_333);
            self.video_rtp += 3000;
            (
                self.video,
                self.video_pt,
                MediaTime::from_90khz(self.video_rtp),
            )
        } else {
            self.now += Duration::from_millis(20);
            self.audio_rtp += 960;
            (
                self.audio,
                self.audio_pt,
                MediaTime::new(self.audio_rtp, Frequency::FORTY_EIGHT_KHZ),
            )
        };
        let now = self.now;
        let before = self.out.len();
        // As the driver's media tick: write, then drain (str0m has not packetized yet; its
        // deadline is due at once) ...
        self.sender
            .writer(mid)
            .expect("writer")
            .write(pt, now, rtp_time, data.clone())
            .expect("write");
        let due = drain(
            &mut self.sender,
            now,
            &mut self.out,
            &mut self.sender_events,
        );
        assert!(
            due <= now,
            "str0m's deadline after a write is not due: {due:?} > {now:?}"
        );
        // ... then the deadline branch: `Input::Timeout` packetizes and encrypts, drain sends.
        self.sender.handle_input(Input::Timeout(now)).unwrap();
        drain(
            &mut self.sender,
            now,
            &mut self.out,
            &mut self.sender_events,
        );
        self.sender_events.clear();
        let rtcp = (before..self.out.len())
            .filter(|&i| is_rtcp(self.out.get(i)))
            .count();
        self.rtcp += rtcp as u64;
        self.out.len() - before - rtcp
    }

    /// Not measured: delivers the sender's datagrams to the receiver at their send times, then
    /// lets the two talk (RTCP, STUN consent) until neither has anything more to say.
    fn deliver(&mut self) {
        let mut back = Wire::default();
        for i in 0..self.out.len() {
            let at = self.out.datagrams[i].0;
            receive(&mut self.receiver, at, &self.out, i);
            drain(&mut self.receiver, at, &mut back, &mut self.receiver_events);
        }
        self.out.clear();
        let now = self.now;
        self.receiver.handle_input(Input::Timeout(now)).unwrap();
        drain(
            &mut self.receiver,
            now,
            &mut back,
            &mut self.receiver_events,
        );
        let mut fwd = Wire::default();
        while !back.is_empty() {
            (0..back.len()).for_each(|i| receive(&mut self.sender, now, &back, i));
            back.clear();
            drain(&mut self.sender, now, &mut fwd, &mut self.sender_events);
            for i in 0..fwd.len() {
                receive(&mut self.receiver, now, &fwd, i);
                drain(
                    &mut self.receiver,
                    now,
                    &mut back,
                    &mut self.receiver_events,
                );
            }
            fwd.clear();
        }
        self.sender_events.clear();
    }

    /// Frames (and their bytes) the receiver decrypted and depacketized since the last call.
    fn received(&mut self, mid: Mid) -> Vec<usize> {
        let v = self
            .receiver_events
            .iter()
            .filter_map(|e| match e {
                Event::MediaData(d) if d.mid == mid => Some(d.data.len()),
                _ => None,
            })
            .collect();
        self.receiver_events.clear();
        v
    }
}

fn packetize(c: &mut Criterion) {
    let mut pair = Pair::connect();

    // SPS/PPS of a 1280x720 High profile stream; the IDR and the measured non-IDR slice.
    let sps: &[u8] = &[
        0x67, 0x64, 0x00, 0x1f, 0xac, 0xd9, 0x40, 0x50, 0x05, 0xbb, 0x01, 0x10, 0x00, 0x00, 0x03,
        0x00, 0x10, 0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x83, 0x19, 0x60,
    ];
    let pps: &[u8] = &[0x68, 0xeb, 0xe3, 0xcb, 0x22, 0xc0];
    let mut idr = noise(VIDEO_FRAME * 3, 7);
    idr[0] = 0x65;
    let mut slice = noise(VIDEO_FRAME, 11);
    slice[0] = 0x41;
    // As the driver passes frames: the AVCC access unit converted to Annex B.
    let key: Arc<[u8]> = avcc_to_annexb(&avcc(&[sps, pps, &idr]), None, true).into();
    let delta: Arc<[u8]> = avcc_to_annexb(&avcc(&[&slice]), None, false).into();
    let opus: Arc<[u8]> = noise(OPUS_FRAME, 13).into();

    // Sanity: the viewer starts at a keyframe; then the measured frames reach the receiver
    // whole (decrypted, depacketized) and take the expected packet count.
    let key_packets = pair.send(true, &key);
    pair.deliver();
    let mut counts = Vec::new();
    for _ in 0..5 {
        counts.push(pair.send(true, &delta));
    }
    pair.deliver();
    let got = pair.received(pair.video);
    for _ in 0..5 {
        assert_eq!(pair.send(false, &opus), 1, "one Opus frame, one packet");
    }
    pair.deliver();
    let got_audio = pair.received(pair.audio);
    let per_frame = counts[0];
    eprintln!(
        "webrtc_packetize: keyframe {} B -> {key_packets} packets; delta frame {} B -> {counts:?} \
         packets; receiver got video frames of {got:?} B, audio frames of {got_audio:?} B",
        key.len(),
        delta.len(),
    );
    assert!(
        counts.iter().all(|&n| n == per_frame) && (8..=11).contains(&per_frame),
        "unexpected packets per 10 KB frame: {counts:?}"
    );
    assert!(
        got.len() >= 5 && got.iter().rev().take(5).all(|&n| n == delta.len()),
        "receiver did not get the frames whole: {got:?}"
    );
    assert_eq!(got_audio, vec![OPUS_FRAME; 5], "receiver audio frames");

    let mut g = c.benchmark_group("webrtc_packetize");
    for (name, video, data, packets) in [
        ("video_frame_10kb", true, &delta, per_frame),
        ("audio_frame_opus", false, &opus, 1),
    ] {
        g.throughput(Throughput::Elements(packets as u64));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(BATCH);
                    let t = Instant::now();
                    for _ in 0..n {
                        let sent = pair.send(video, data);
                        assert_eq!(sent, packets, "packets per frame");
                        black_box(sent);
                    }
                    spent += t.elapsed();
                    pair.deliver();
                    pair.receiver_events.clear();
                    left -= n;
                }
                spent
            })
        });
    }
    g.finish();
    eprintln!(
        "webrtc_packetize: {} RTCP datagrams were sent along the way (timed, not counted)",
        pair.rtcp
    );
    // The session survived the whole run: the receiver still gets what is sent.
    pair.receiver_events.clear();
    pair.send(true, &delta);
    pair.deliver();
    assert_eq!(pair.received(pair.video), vec![delta.len()]);
}

criterion_group!(benches, packetize);
criterion_main!(benches);
