//! What one frame copy on the cluster link costs the sending node below castnode's own code: the
//! floor under the relay's cost per forwarded frame (BENCHMARKS.md, "Cluster link").
//!
//! - `quic_floor/proto/{10kb,300b}`: quinn-proto alone, no sockets and no runtime. Two endpoints
//!   with castnode's own cluster TLS and transport settings (`cluster::tls`) are connected in
//!   memory; each iteration writes one frame (a 30-byte header and the payload, as one
//!   `write_chunks`) on the sender's group stream, builds and encrypts its packets
//!   (`poll_transmit`), hands them to the receiver (not timed), and processes the ACKs the
//!   receiver sends back. Only the sender's calls are timed: what a relay pays per copy in
//!   quinn-proto and the AEAD. `…_100_connections`: the same over 100 connections, each frame
//!   sent on each in turn as a relay fans out (caches as cold as the relay's).
//! - `quic_floor/udp_loopback/{10kb_gso,300b}`: the kernel's part, one `sendmsg` on 127.0.0.1
//!   (quinn-udp, as quinn sends): 10 KB as 1,400-byte GSO segments, or one small datagram, to a
//!   socket with GRO that a thread drains. On loopback this includes the receive path that the
//!   sender's softirq runs. `…/recv_{10kb_gro,300b}`: the receiving node's `recvmsg` of the same.
//! - `quic_floor/proto_receive/{10kb,300b}`: the receiver's quinn-proto side of those frames
//!   (decrypting, reassembling, reading the stream, sending its ACKs): what a relay pays per
//!   frame it takes in from upstream before it sends the frame on.
//!
//! A relay's frame copy at 2.5 Mbit/s is on average 30 video frames of ≈ 10 KB and 47 audio
//! frames of ≈ 300 bytes per second: (30 × (proto 10kb + udp 10kb) + 47 × (proto 300b + udp
//! 300b)) / 77 is the per-copy floor before any scheduling, task or driver cost.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use castnode::cluster::tls::{TlsFiles, client_config, server_config};
use criterion::{Criterion, criterion_group, criterion_main};
#[path = "common/quic.rs"]
mod quic_common;

use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, StreamId,
};

/// Frames per group stream (a 2 s group at 77 frames/s), then a new stream as the link does.
const FRAMES_PER_GROUP: u64 = 154;

struct Peer {
    endpoint: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    addr: SocketAddr,
}

impl Peer {
    fn new(port: u16, server: bool) -> Peer {
        let server = server.then(|| {
            Arc::new(server_config("bench", &TlsFiles::default()).expect("server config"))
        });
        Peer {
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
            conn: None,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        }
    }

    fn conn(&mut self) -> &mut Connection {
        &mut self.conn.as_mut().expect("connected").1
    }

    /// Every datagram this peer's connection wants to send now.
    fn transmit(&mut self, buf: &mut Vec<u8>, out: &mut Vec<BytesMut>) {
        let Some((_, conn)) = self.conn.as_mut() else {
            return;
        };
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|t| t <= now) {
            conn.handle_timeout(now);
        }
        loop {
            buf.clear();
            let Some(t) = conn.poll_transmit(now, 10, buf) else {
                break;
            };
            let seg = t.segment_size.unwrap_or(t.size);
            for d in buf[..t.size].chunks(seg) {
                out.push(BytesMut::from(d));
            }
        }
    }

    /// Hands datagrams from `from` to this peer's endpoint and connection.
    fn receive(&mut self, from: SocketAddr, datagrams: &mut Vec<BytesMut>, buf: &mut Vec<u8>) {
        let now = Instant::now();
        for d in datagrams.drain(..) {
            match self.endpoint.handle(now, from, None, None, d, buf) {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    let c = self
                        .endpoint
                        .accept(incoming, now, buf, None)
                        .expect("accept");
                    self.conn = Some(c);
                }
                Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                    if let Some((_, conn)) = self.conn.as_mut() {
                        conn.handle_event(ev);
                    }
                    self.endpoint_events(ch);
                }
                Some(DatagramEvent::Response(_)) | None => {}
            }
        }
    }

    fn endpoint_events(&mut self, ch: ConnectionHandle) {
        let Some((_, conn)) = self.conn.as_mut() else {
            return;
        };
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(ch, ev) {
                conn.handle_event(back);
            }
        }
    }

    fn drain_streams(&mut self, open: &mut Vec<StreamId>) -> u64 {
        quic_common::drain_uni(self.conn(), open)
    }
}

/// A sender (the relay) and a receiver (an edge), connected in memory.
struct Pair {
    tx: Peer,
    rx: Peer,
    buf: Vec<u8>,
    datagrams: Vec<BytesMut>,
    rx_streams: Vec<StreamId>,
    stream: Option<StreamId>,
    sent: u64,
    /// Stream bytes written by the sender and read by the receiver: the bench checks they match,
    /// so a stalled sender cannot pass for a fast one.
    written: u64,
    received: u64,
}

impl Pair {
    fn new() -> Pair {
        let tx = Peer::new(4443, true);
        let mut rx = Peer::new(4444, false);
        let client = client_config(&TlsFiles::default()).expect("client config");
        let c = rx
            .endpoint
            .connect(Instant::now(), client, tx.addr, "castnode")
            .expect("connect");
        rx.conn = Some(c);
        let mut pair = Pair {
            tx,
            rx,
            buf: Vec::with_capacity(64 * 1024),
            datagrams: Vec::new(),
            rx_streams: Vec::new(),
            stream: None,
            sent: 0,
            written: 0,
            received: 0,
        };
        for _ in 0..100 {
            pair.exchange();
            if pair
                .tx
                .conn
                .as_ref()
                .is_some_and(|(_, c)| !c.is_handshaking())
                && !pair.rx.conn().is_handshaking()
            {
                break;
            }
        }
        // Let the handshake's last packets (HANDSHAKE_DONE, new connection IDs) settle.
        for _ in 0..10 {
            pair.exchange();
        }
        assert!(!pair.rx.conn().is_handshaking(), "handshake did not finish");
        pair
    }

    /// Both ways until quiet.
    fn exchange(&mut self) {
        for _ in 0..20 {
            self.rx.transmit(&mut self.buf, &mut self.datagrams);
            let quiet_rx = self.datagrams.is_empty();
            self.tx
                .receive(self.rx.addr, &mut self.datagrams, &mut self.buf);
            self.tx.transmit(&mut self.buf, &mut self.datagrams);
            let quiet_tx = self.datagrams.is_empty();
            self.rx
                .receive(self.tx.addr, &mut self.datagrams, &mut self.buf);
            if self.rx.conn.is_some() {
                self.received += self.rx.drain_streams(&mut self.rx_streams);
            }
            if quiet_rx && quiet_tx {
                break;
            }
        }
    }

    /// Sends one frame; returns the time the sender spent on it (write, packets, the ACKs) and
    /// the time the receiver spent (taking the packets, reading the stream, sending its ACKs).
    fn frame(&mut self, header: &Bytes, payload: &Bytes) -> (Duration, Duration) {
        let start = Instant::now();
        let conn = self.tx.conn();
        if self.sent.is_multiple_of(FRAMES_PER_GROUP) {
            if let Some(old) = self.stream.take() {
                let _ = conn.send_stream(old).finish();
            }
            self.stream = conn.streams().open(Dir::Uni);
        }
        let id = self.stream.expect("a stream could be opened");
        let mut chunks = [header.clone(), payload.clone()];
        let written = conn
            .send_stream(id)
            .write_chunks(&mut chunks)
            .expect("write");
        self.written += written.bytes as u64;
        self.sent += 1;
        self.tx.transmit(&mut self.buf, &mut self.datagrams);
        let mut spent = start.elapsed();
        // The receiver takes the packets and answers (not the sender's cost).
        let start = Instant::now();
        self.rx
            .receive(self.tx.addr, &mut self.datagrams, &mut self.buf);
        self.received += self.rx.drain_streams(&mut self.rx_streams);
        self.rx.transmit(&mut self.buf, &mut self.datagrams);
        let received = start.elapsed();
        // The sender processes the ACKs (and sends whatever they release).
        let start = Instant::now();
        self.tx
            .receive(self.rx.addr, &mut self.datagrams, &mut self.buf);
        self.tx.transmit(&mut self.buf, &mut self.datagrams);
        spent += start.elapsed();
        // Anything the sender sent in answer goes to the receiver (not timed).
        self.rx
            .receive(self.tx.addr, &mut self.datagrams, &mut self.buf);
        (spent, received)
    }
}

/// `quic_floor/proto/…`: the sender's side of a frame copy; `quic_floor/proto_receive/…`: the
/// receiver's side of the same frames (what a relay pays per frame it takes in from upstream).
fn proto(c: &mut Criterion) {
    proto_side(c, "quic_floor/proto", false);
    proto_side(c, "quic_floor/proto_receive", true);
}

fn proto_side(c: &mut Criterion, group: &str, receiver: bool) {
    let mut g = c.benchmark_group(group);
    let header = Bytes::from(vec![0x5a; 30]);
    let cases: &[(&str, usize, usize)] = if receiver {
        &[("10kb", 10_000, 1), ("300b", 300, 1)]
    } else {
        &[
            ("10kb", 10_000, 1),
            ("300b", 300, 1),
            ("10kb_100_connections", 10_000, 100),
            ("300b_100_connections", 300, 100),
        ]
    };
    for &(name, size, conns) in cases {
        let payload = Bytes::from(vec![0xa5; size]);
        let mut pairs: Vec<Pair> = (0..conns).map(|_| Pair::new()).collect();
        let mut next = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // As a relay fans out: each frame goes to every connection in turn.
                (0..iters)
                    .map(|_| {
                        next = (next + 1) % pairs.len();
                        let (sent, received) = pairs[next].frame(&header, &payload);
                        if receiver { received } else { sent }
                    })
                    .sum::<Duration>()
            })
        });
        for pair in &mut pairs {
            pair.exchange();
            assert!(
                pair.written >= pair.sent * (30 + size as u64)
                    && pair.received + 64 * 1024 >= pair.written,
                "{name}: {} frames, {} bytes written, {} received",
                pair.sent,
                pair.written,
                pair.received
            );
        }
    }
    g.finish();
}

fn udp(c: &mut Criterion) {
    let mut g = c.benchmark_group("quic_floor/udp_loopback");
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let rx_state = quinn_udp::UdpSocketState::new((&rx).into()).expect("udp state (GRO)");
    let to = rx.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut meta = [quinn_udp::RecvMeta::default()];
            while !stop.load(Ordering::Relaxed) {
                let mut bufs = [std::io::IoSliceMut::new(&mut buf)];
                let _ = rx_state.recv((&rx).into(), &mut bufs, &mut meta);
            }
        })
    };
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let tx_state = quinn_udp::UdpSocketState::new((&tx).into()).expect("udp state (GSO)");
    for (name, size, segment) in [("10kb_gso", 10_000, Some(1_400)), ("300b", 300, None)] {
        let data = vec![0x3c; size];
        g.bench_function(name, |b| {
            b.iter(|| {
                let _ = tx_state.send((&tx).into(), &datagrams(to, &data, segment));
            })
        });
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    // The receiving side: one `recvmsg` (quinn-udp, GRO) of what was just sent; the send and the
    // loopback delivery (the sender's softirq) are not timed.
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let rx_state = quinn_udp::UdpSocketState::new((&rx).into()).expect("udp state (GRO)");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let to = rx.local_addr().expect("addr");
    let mut buf = vec![0u8; 64 * 1024];
    let mut meta = [quinn_udp::RecvMeta::default()];
    for (name, size, segment) in [
        ("recv_10kb_gro", 10_000, Some(1_400)),
        ("recv_300b", 300, None),
    ] {
        let data = vec![0x3c; size];
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    tx_state
                        .send((&tx).into(), &datagrams(to, &data, segment))
                        .expect("send");
                    let start = Instant::now();
                    let mut bufs = [std::io::IoSliceMut::new(&mut buf)];
                    let n = rx_state
                        .recv((&rx).into(), &mut bufs, &mut meta)
                        .expect("recv");
                    spent += start.elapsed();
                    assert!(n == 1 && meta[0].len == size, "one whole datagram batch");
                }
                spent
            })
        });
    }
    g.finish();
}

/// `data` to `to` as one datagram, or as GSO segments of `segment` bytes.
fn datagrams<'a>(
    to: SocketAddr,
    data: &'a [u8],
    segment: Option<usize>,
) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: to,
        ecn: None,
        contents: data,
        segment_size: segment,
        src_ip: None,
    }
}

criterion_group!(benches, proto, udp);
criterion_main!(benches);
