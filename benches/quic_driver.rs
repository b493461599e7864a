//! A relay's fan-out over real loopback sockets with a minimal driver of our own around
//! quinn-proto instead of quinn's: what the sending side costs per frame copy when no task, lock
//! or runtime sits between the QUIC state machines and the socket. It answers whether a driver
//! of castnode's own could reach the cluster link's goal (≥ 5 Gbit/s per core; BENCHMARKS.md,
//! "Cluster link"), to compare with castnode's relay on quinn at the same load.
//!
//! ```sh
//! cargo bench --bench quic_driver -- 100 20        # EDGES SECONDS
//! cargo bench --bench quic_driver -- 100 20 1000   # … RX_GAP_US: at most one receive pass per ms
//! ```
//!
//! - The *relay* (this thread) and the *edges* (a second thread) each hold one quinn-proto
//!   `Endpoint` on one UDP socket (quinn-udp: GSO out, GRO in), with castnode's cluster TLS and
//!   transport settings. The edges open EDGES connections to the relay.
//! - Both run the same loop ([`Host`]): wait for the socket or the next deadline (`poll(2)`; with
//!   RX_GAP_US, no sooner than that after the last wake), read every datagram that is there
//!   (GRO, 32 buffers per call), feed the connections, fire due timers (one heap for all
//!   connections), and send what each connection touched since the last pass has to send (one
//!   `sendmsg` per GSO batch).
//! - The relay writes a 10 KB video frame every 33.3 ms and a 300-byte audio frame every 21.3 ms
//!   (a 2.5 Mbit/s broadcast's 77 frames/s) with a 30-byte header, on every connection's group
//!   stream (a new stream every 154 frames, as the link's 2 s groups); the edges read and drop.
//! - Measured over the window after a 2 s warmup: the relay thread's CPU time
//!   (`/proc/thread-self/schedstat`) per frame copy, and frame bytes per CPU second; the edges'
//!   received bytes are checked against what was sent.

use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use castnode::cluster::driver::Timers;
use castnode::cluster::tls::{TlsFiles, client_config, server_config};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
#[path = "common/quic.rs"]
mod quic_common;

use quinn_proto::{
    Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, StreamId,
};

const VIDEO: usize = 10_000;
const AUDIO: usize = 300;
const HEADER: usize = 30;
const FRAMES_PER_GROUP: u64 = 154;
const WARMUP: Duration = Duration::from_secs(2);
const BATCH: usize = 32;

/// One connection and what the bench keeps beside it.
struct Conn {
    conn: Connection,
    stream: Option<StreamId>,
    frames: u64,
    incoming: Vec<StreamId>,
    /// In the host's dirty list.
    dirty: bool,
    /// The timer last put in the host's heap.
    timer: Option<Instant>,
}

/// An endpoint on a socket, and its connections, driven by one thread.
struct Host {
    socket: UdpSocket,
    udp: quinn_udp::UdpSocketState,
    endpoint: Endpoint,
    conns: Vec<Option<Conn>>,
    /// Connections with something to do: datagrams in, frames written, a timer due.
    dirty: Vec<usize>,
    /// Connections' timers (the serving driver's heap).
    timers: Timers,
    due: Vec<usize>,
    buf: Vec<u8>,
    recv: Vec<Vec<u8>>,
    meta: Vec<quinn_udp::RecvMeta>,
    /// Stream bytes read (edges).
    read: u64,
    woke: Instant,
    gap: Duration,
}

impl Host {
    fn new(server: bool, gap: Duration) -> Host {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        socket.set_nonblocking(true).expect("nonblocking");
        let udp = quinn_udp::UdpSocketState::new((&socket).into()).expect("udp state");
        // Room for a burst: 100 connections' copies of a keyframe-sized frame.
        let s2 = socket2::SockRef::from(&socket);
        let _ = s2.set_recv_buffer_size(8 << 20);
        let _ = s2.set_send_buffer_size(8 << 20);
        let server = server.then(|| {
            Arc::new(server_config("bench", &TlsFiles::default()).expect("server config"))
        });
        Host {
            socket,
            udp,
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), server, true, None),
            conns: Vec::new(),
            dirty: Vec::new(),
            timers: Timers::default(),
            due: Vec::new(),
            buf: Vec::with_capacity(64 * 1024),
            recv: (0..BATCH).map(|_| vec![0u8; 64 * 1024]).collect(),
            meta: vec![quinn_udp::RecvMeta::default(); BATCH],
            read: 0,
            woke: Instant::now(),
            gap,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("addr")
    }

    /// Waits until the socket is readable or `deadline`, but no sooner than `gap` after the last
    /// wake: a gap lets ACKs from many connections gather into one receive pass.
    fn wait(&mut self, deadline: Instant) {
        let earliest = self.woke + self.gap;
        let now = Instant::now();
        if now < earliest {
            std::thread::sleep(earliest.min(deadline) - now);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_micros().div_ceil(1000).min(100) as u16;
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(ms));
        self.woke = Instant::now();
    }

    /// Reads every datagram waiting and feeds it to the endpoint and its connections.
    fn receive(&mut self) {
        loop {
            let mut bufs: Vec<IoSliceMut<'_>> =
                self.recv.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = match self
                .udp
                .recv((&self.socket).into(), &mut bufs, &mut self.meta)
            {
                Ok(n) => n,
                Err(_) => return,
            };
            let now = Instant::now();
            for i in 0..n {
                let meta = self.meta[i];
                let data = &self.recv[i][..meta.len];
                for d in data.chunks(meta.stride.max(1)) {
                    let event = self.endpoint.handle(
                        now,
                        meta.addr,
                        None,
                        None,
                        BytesMut::from(d),
                        &mut self.buf,
                    );
                    match event {
                        Some(DatagramEvent::NewConnection(incoming)) => {
                            if let Ok(c) = self.endpoint.accept(incoming, now, &mut self.buf, None)
                            {
                                insert(&mut self.conns, &mut self.dirty, c);
                            }
                        }
                        Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                            if let Some(Some(c)) = self.conns.get_mut(ch.0) {
                                c.conn.handle_event(ev);
                                if !c.dirty {
                                    c.dirty = true;
                                    self.dirty.push(ch.0);
                                }
                            }
                        }
                        Some(DatagramEvent::Response(_)) | None => {}
                    }
                }
            }
        }
    }

    /// Timers, endpoint events, incoming streams (read and dropped), then every connection's
    /// datagrams out. Returns the earliest timer.
    fn service(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let conns = &self.conns;
        self.timers
            .pop_due(now, |i| timer_of(conns, i), &mut self.due);
        for i in self.due.drain(..) {
            if let Some(Some(c)) = self.conns.get_mut(i)
                && !c.dirty
            {
                c.dirty = true;
                self.dirty.push(i);
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            let Some(Some(c)) = self.conns.get_mut(i) else {
                continue;
            };
            c.dirty = false;
            if c.conn.poll_timeout().is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
            while let Some(ev) = c.conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(ConnectionHandle(i), ev) {
                    c.conn.handle_event(back);
                }
            }
            self.read += quic_common::drain_uni(&mut c.conn, &mut c.incoming);
            loop {
                self.buf.clear();
                let Some(t) = c.conn.poll_transmit(now, 10, &mut self.buf) else {
                    break;
                };
                let transmit = quinn_udp::Transmit {
                    destination: t.destination,
                    ecn: None,
                    contents: &self.buf[..t.size],
                    segment_size: t.segment_size,
                    src_ip: None,
                };
                if self.udp.send((&self.socket).into(), &transmit).is_err() {
                    break;
                }
            }
            let timer = c.conn.poll_timeout();
            self.timers.set(i, &mut c.timer, timer);
        }
        dirty.clear();
        // Connections made dirty while serving (none today) wait for the next pass.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
        let conns = &self.conns;
        self.timers.next(|i| timer_of(conns, i))
    }

    /// Writes one frame on every established connection's group stream; returns the copies.
    fn fan_out(&mut self, header: &Bytes, payload: &Bytes) -> u64 {
        let mut copies = 0;
        for (i, slot) in self.conns.iter_mut().enumerate() {
            let Some(c) = slot.as_mut() else { continue };
            if c.conn.is_handshaking() {
                continue;
            }
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(i);
            }
            if c.frames.is_multiple_of(FRAMES_PER_GROUP) {
                if let Some(old) = c.stream.take() {
                    let _ = c.conn.send_stream(old).finish();
                }
                c.stream = c.conn.streams().open(Dir::Uni);
            }
            let Some(id) = c.stream else { continue };
            let mut chunks = [header.clone(), payload.clone()];
            if c.conn.send_stream(id).write_chunks(&mut chunks).is_ok() {
                c.frames += 1;
                copies += 1;
            }
        }
        copies
    }
}

fn timer_of(conns: &[Option<Conn>], i: usize) -> Option<Instant> {
    conns.get(i).and_then(|c| c.as_ref()).and_then(|c| c.timer)
}

fn insert(
    conns: &mut Vec<Option<Conn>>,
    dirty: &mut Vec<usize>,
    (ch, conn): (ConnectionHandle, Connection),
) {
    if conns.len() <= ch.0 {
        conns.resize_with(ch.0 + 1, || None);
    }
    conns[ch.0] = Some(Conn {
        conn,
        stream: None,
        frames: 0,
        incoming: Vec::new(),
        dirty: true,
        timer: None,
    });
    dirty.push(ch.0);
}

/// This thread's time on the CPU.
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: u64 = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("schedstat field");
    Duration::from_nanos(ns)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let edges = args.first().copied().unwrap_or(100) as usize;
    let seconds = args.get(1).copied().unwrap_or(20);
    let gap = Duration::from_micros(args.get(2).copied().unwrap_or(0));

    let mut relay = Host::new(true, gap);
    let relay_addr = relay.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let edge_thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("edges".into())
            .spawn(move || {
                let mut host = Host::new(false, gap);
                let client = client_config(&TlsFiles::default()).expect("client config");
                for _ in 0..edges {
                    let c = host
                        .endpoint
                        .connect(Instant::now(), client.clone(), relay_addr, "castnode")
                        .expect("connect");
                    insert(&mut host.conns, &mut host.dirty, c);
                }
                while !stop.load(Ordering::Relaxed) {
                    host.receive();
                    let next = host.service();
                    host.wait(next.unwrap_or_else(|| Instant::now() + Duration::from_millis(5)));
                }
                (host.read, thread_cpu())
            })
            .expect("edge thread")
    };

    let header = Bytes::from(vec![0x5a; HEADER]);
    let video = Bytes::from(vec![0xa5; VIDEO]);
    let audio = Bytes::from(vec![0xa6; AUDIO]);
    let start = Instant::now();
    let window = start + WARMUP;
    let end = window + Duration::from_secs(seconds);
    let (mut next_video, mut next_audio) = (start, start + Duration::from_millis(7));
    let (mut copies, mut bytes, mut sent_bytes) = (0u64, 0u64, 0u64);
    let mut cpu_start = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if cpu_start.is_none() && now >= window {
            cpu_start = Some(thread_cpu());
        }
        relay.receive();
        for (due, payload, every) in [
            (&mut next_video, &video, Duration::from_micros(33_333)),
            (&mut next_audio, &audio, Duration::from_micros(21_333)),
        ] {
            if now >= *due {
                *due += every;
                let n = relay.fan_out(&header, payload);
                let frame_bytes = n * (HEADER + payload.len()) as u64;
                sent_bytes += frame_bytes;
                if cpu_start.is_some() {
                    copies += n;
                    bytes += frame_bytes;
                }
            }
        }
        let timer = relay.service();
        let deadline = [Some(next_video), Some(next_audio), timer]
            .into_iter()
            .flatten()
            .min()
            .expect("frame deadlines");
        relay.wait(deadline);
    }
    let cpu = thread_cpu() - cpu_start.expect("a window");
    // Let the edges read what is in flight, then stop them.
    let drain = Instant::now() + Duration::from_millis(500);
    while Instant::now() < drain {
        relay.receive();
        let _ = relay.service();
        relay.wait(Instant::now() + Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let (read, edge_cpu) = edge_thread.join().expect("edge thread");
    let connected = relay.conns.iter().flatten().count();
    let per_copy = cpu.as_secs_f64() * 1e6 / copies.max(1) as f64;
    let gbps = bytes as f64 * 8.0 / cpu.as_secs_f64() / 1e9;
    println!(
        "quic_driver: {connected} of {edges} edges connected; {seconds} s window after {} s warmup; receive gap {} us",
        WARMUP.as_secs(),
        gap.as_micros()
    );
    println!(
        "  relay thread  {:.3} cores: {copies} frame copies, {:.2} us per copy, {:.2} Gbit/s of frames per core",
        cpu.as_secs_f64() / seconds as f64,
        per_copy,
        gbps
    );
    println!(
        "  edges         read {read} of {sent_bytes} bytes written ({:.2} %); edge thread {:.2} s of CPU in all",
        read as f64 * 100.0 / sent_bytes.max(1) as f64,
        edge_cpu.as_secs_f64()
    );
}
