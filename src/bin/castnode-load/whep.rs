//! WHEP viewers (`--protocol whep`): each is a str0m `Rtc` that offers to receive H.264 video and
//! Opus audio, POSTs the offer to the WHEP endpoint, connects (ICE as the controlling agent,
//! DTLS-SRTP) over a UDP socket of its own, and counts what arrives without decoding it.
//!
//! # Why one socket and one task per viewer
//!
//! The server routes datagrams by source address, so every viewer needs its own 5-tuple. Each
//! viewer is one tokio task that owns its `Rtc` and socket; on readiness it reads every datagram
//! queued (up to [`READ_BURST`]) before yielding, so a task wakes about once per packet burst.
//! All viewers share one DTLS certificate, generated once (a certificate per viewer costs a key
//! generation per connect and does not change what the server does).
//!
//! # Frame completeness without decoding
//!
//! The `Rtc` runs in RTP mode: str0m decrypts SRTP, unwraps retransmissions (RTX) to their
//! original sequence number, drops duplicates, sends NACKs and receiver reports, and hands over
//! each packet; nothing is depacketized. [`FrameTracker`] follows the video stream's extended
//! sequence numbers: a jump opens holes (lost packets), a packet older than the newest fills one
//! (recovered, by RTX or reordering). A frame is the run of packets with one RTP timestamp that
//! ends with the marker bit; it is **complete** when no hole lies between the previous frame's
//! marker and its own when its last packet arrives. A frame closed with holes is **repaired** if
//! retransmissions fill them all later, and **lost** otherwise. The first frame's packets are
//! checked for an IDR slice (single NAL, STAP-A and FU-A aware).
//!
//! # Timing
//!
//! Times are measured from the moment the viewer builds its offer and POSTs it (the Chromium
//! test's time to first frame starts at its POST too, but ends when the frame is rendered): the
//! 201 answer, ICE + DTLS connected (str0m's `Event::Connected`), and the arrival of the last
//! packet of the first complete video frame.

use std::collections::VecDeque;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;
use str0m::change::SdpAnswer;
use str0m::crypto::dtls::DtlsCert;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol as NetProtocol, Receive};
use str0m::rtp::RtpPacket;
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::{
    DONE, MEASURING, PlayerResult, Shared, TAG_AUDIO, TAG_VIDEO, Wake, connect, percentile,
    split_host_port, until_done,
};

/// Most datagrams read per wake before other viewers get a turn.
const READ_BURST: usize = 64;
/// Largest HTTP response read (an SDP answer is a few KiB).
const MAX_RESPONSE: usize = 256 << 10;
/// Sequence numbers remembered as missing; older holes are forgotten (counted lost).
const MAX_MISSING: usize = 4096;
/// Frames closed with holes that may still be repaired.
const MAX_DAMAGED: usize = 256;
/// A jump larger than this is a stream restart, not loss.
const MAX_GAP: u64 = 10_000;

// ---------------------------------------------------------------------------------------------
// Target and HTTP
// ---------------------------------------------------------------------------------------------

/// A WHEP endpoint: where to POST, and the local address viewers bind their sockets to.
#[derive(Debug, PartialEq)]
pub struct WhepTarget {
    pub addr: SocketAddr,
    authority: String,
    path: String,
    /// The address of this host on the route to `addr` (the viewers' ICE host candidate).
    pub local_ip: IpAddr,
    /// Viewers' sockets take coalesced datagrams (UDP GRO), as `--gro` asks.
    pub gro: bool,
}

impl WhepTarget {
    /// Parses `http://host:port/whep/app/key`; `addr` and `local_ip` are placeholders until
    /// [`WhepTarget::resolve`].
    pub fn parse(url: &str) -> anyhow::Result<(Self, String)> {
        let (host, port, path) = split_host_port(url, "http://", 80)?;
        Ok((
            Self {
                addr: SocketAddr::from(([0, 0, 0, 0], port)),
                authority: format!("{host}:{port}"),
                path: format!("/{path}"),
                local_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                gro: false,
            },
            host,
        ))
    }

    /// Sets the server's address and finds this host's address towards it (a UDP `connect`
    /// only selects a route; nothing is sent).
    pub fn resolve(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        self.addr = addr;
        let any = match addr {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let s = std::net::UdpSocket::bind((any, 0))?;
        s.connect(addr)?;
        self.local_ip = s.local_addr()?.ip();
        Ok(())
    }

    fn request(&self, method: &str, path: &str, sdp: Option<&str>) -> String {
        let host = &self.authority;
        match sdp {
            Some(body) => format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/sdp\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
            None => format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\
                 Connection: close\r\n\r\n"
            ),
        }
    }
}

/// The parts of an HTTP/1.1 response a WHEP client needs.
#[derive(Debug, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    /// The `Location` header's path (an absolute URL is cut to its path).
    pub location: Option<String>,
    pub body: String,
}

/// Parses a whole response (read until the server closed the connection).
pub fn parse_response(data: &[u8]) -> Result<HttpResponse, &'static str> {
    let split = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of the response head")?;
    let head = std::str::from_utf8(&data[..split]).map_err(|_| "response head not UTF-8")?;
    let mut body = &data[split + 4..];
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next().unwrap_or_default().split_whitespace();
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("no HTTP/1.x status line");
    }
    let status = status_line
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("bad status code")?;
    let mut location = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("location") {
            let path = match value.split_once("://") {
                Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
                None => value,
            };
            location = Some(path.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            let len: usize = value.parse().map_err(|_| "bad Content-Length")?;
            body = body.get(..len).ok_or("body shorter than Content-Length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported");
        }
    }
    let body = String::from_utf8_lossy(body).into_owned();
    Ok(HttpResponse {
        status,
        location,
        body,
    })
}

/// Sends one request on a new connection and reads the response until the server closes.
async fn http(
    addr: SocketAddr,
    request: &str,
    deadline: tokio::time::Instant,
) -> Result<HttpResponse, String> {
    let mut sock = connect(addr, deadline).await?;
    let exchange = async {
        sock.write_all(request.as_bytes()).await?;
        let mut data = Vec::with_capacity(4096);
        while data.len() <= MAX_RESPONSE {
            if sock.read_buf(&mut data).await? == 0 {
                break;
            }
        }
        Ok::<_, std::io::Error>(data)
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(data)) => parse_response(&data).map_err(|e| format!("HTTP: {e}")),
        Ok(Err(e)) => Err(format!("HTTP: {e}")),
        Err(_) => Err("HTTP: no response in time".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Frame completeness (sans-IO)
// ---------------------------------------------------------------------------------------------

/// Whether an H.264 RTP payload (RFC 6184) carries an IDR slice, or the start of one.
pub fn has_idr(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else {
        return false;
    };
    match b0 & 0x1f {
        5 => true,
        // STAP-A: 16-bit sizes, each followed by a NAL unit.
        24 => {
            let mut rest = &payload[1..];
            while rest.len() > 2 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let Some(nal) = rest.get(2..2 + size) else {
                    return false;
                };
                if nal.first().is_some_and(|b| b & 0x1f == 5) {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        // FU-A: the FU header names the fragmented unit's type.
        28 => payload.get(1).is_some_and(|h| h & 0x1f == 5),
        _ => false,
    }
}

/// A video frame whose last packet arrived (or whose end was inferred from the next frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameEnd {
    /// RTP time (extended, 90 kHz).
    pub time: u64,
    /// Payload bytes of its packets that arrived.
    pub bytes: u64,
    /// No packet of it was missing when it closed.
    pub complete: bool,
    /// One of its packets carries an IDR slice.
    pub idr: bool,
}

/// Counters of one video stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VideoCounts {
    pub packets: u64,
    /// Sequence numbers skipped when a newer packet arrived.
    pub lost: u64,
    /// Of those, packets that arrived later (retransmitted or reordered).
    pub recovered: u64,
    pub frames: u64,
    /// Frames with a hole when they closed.
    pub incomplete: u64,
    /// Of those, frames whose holes were all filled later.
    pub repaired: u64,
}

impl VideoCounts {
    fn since(&self, before: &Self) -> Self {
        Self {
            packets: self.packets - before.packets,
            lost: self.lost - before.lost,
            recovered: self.recovered - before.recovered,
            frames: self.frames - before.frames,
            incomplete: self.incomplete - before.incomplete,
            repaired: self.repaired - before.repaired,
        }
    }

    /// Frames never received whole.
    pub fn frames_lost(&self) -> u64 {
        self.incomplete.saturating_sub(self.repaired)
    }
}

#[derive(Clone, Copy, Debug)]
struct OpenFrame {
    time: u64,
    start: u64,
    bytes: u64,
    idr: bool,
}

/// Follows one video stream's packets (extended sequence number, RTP time, marker, payload) and
/// reports frames as they close; see the module doc.
#[derive(Debug, Default)]
pub struct FrameTracker {
    highest: Option<u64>,
    /// Missing sequence numbers, ascending.
    missing: VecDeque<u64>,
    open: Option<OpenFrame>,
    /// First sequence number of the next frame: the one after the last marker.
    next_start: Option<u64>,
    /// Sequence ranges of frames closed with holes, oldest first.
    damaged: VecDeque<(u64, u64)>,
    pub counts: VideoCounts,
}

impl FrameTracker {
    fn holes_in(&self, first: u64, last: u64) -> bool {
        self.missing.iter().any(|m| (first..=last).contains(m))
    }

    fn close(&mut self, f: OpenFrame, last: u64, on_frame: &mut impl FnMut(FrameEnd)) {
        let complete = !self.holes_in(f.start, last);
        self.counts.frames += 1;
        if !complete {
            self.counts.incomplete += 1;
            if self.damaged.len() == MAX_DAMAGED {
                self.damaged.pop_front();
            }
            self.damaged.push_back((f.start, last));
        }
        on_frame(FrameEnd {
            time: f.time,
            bytes: f.bytes,
            complete,
            idr: f.idr,
        });
    }

    /// Takes the packet with extended sequence number `seq`; calls `on_frame` for each frame it
    /// closes (at most two: the previous one if its marker never came, and its own).
    pub fn packet(
        &mut self,
        seq: u64,
        time: u64,
        marker: bool,
        payload: &[u8],
        on_frame: &mut impl FnMut(FrameEnd),
    ) {
        match self.highest {
            Some(h) if seq == h => return,
            Some(h) if seq < h => {
                // Late: fills a hole, or is a duplicate.
                let Ok(i) = self.missing.binary_search(&seq) else {
                    return;
                };
                self.missing.remove(i);
                self.counts.packets += 1;
                self.counts.recovered += 1;
                if let Some(f) = &mut self.open
                    && seq >= f.start
                {
                    f.bytes += payload.len() as u64;
                    f.idr |= has_idr(payload);
                }
                let before = self.damaged.len();
                let missing = &self.missing;
                self.damaged.retain(|&(a, b)| {
                    !(a..=b).contains(&seq) || missing.iter().any(|m| (a..=b).contains(m))
                });
                self.counts.repaired += (before - self.damaged.len()) as u64;
                return;
            }
            Some(h) => {
                let gap = seq - h - 1;
                self.counts.lost += gap;
                if gap <= MAX_GAP {
                    for m in (h + 1)..seq {
                        if self.missing.len() == MAX_MISSING {
                            self.missing.pop_front();
                        }
                        self.missing.push_back(m);
                    }
                }
            }
            None => {}
        }
        self.highest = Some(seq);
        self.counts.packets += 1;
        if let Some(f) = self.open
            && f.time != time
        {
            // The previous frame's marker never came: it ends just before this packet. The
            // holes right before this packet may be that marker or this frame's first packets;
            // both frames get them.
            let mut start = seq;
            while start > f.start + 1 && self.missing.binary_search(&(start - 1)).is_ok() {
                start -= 1;
            }
            self.open = None;
            self.next_start = Some(start);
            self.close(f, seq - 1, on_frame);
        }
        let start = self.next_start.unwrap_or(seq).min(seq);
        let f = self.open.get_or_insert(OpenFrame {
            time,
            start,
            bytes: 0,
            idr: false,
        });
        f.bytes += payload.len() as u64;
        f.idr |= has_idr(payload);
        if marker {
            let f = *f;
            self.open = None;
            self.next_start = Some(seq + 1);
            self.close(f, seq, on_frame);
        }
    }
}

/// Counters of the audio stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AudioCounts {
    pub packets: u64,
    /// Sequence numbers skipped (late arrivals are not subtracted: audio is rarely resent).
    pub lost: u64,
}

impl AudioCounts {
    fn since(&self, before: &Self) -> Self {
        Self {
            packets: self.packets - before.packets,
            lost: self.lost - before.lost,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The viewer
// ---------------------------------------------------------------------------------------------

/// What a WHEP viewer measured, beside the [`Recorder`](super::Recorder) it shares with the other
/// protocols (bytes, frames and lag in the window).
#[derive(Clone, Debug, Default)]
pub struct ViewerStats {
    /// Microseconds from the start of the POST to the 201 answer.
    pub answer_us: Option<u64>,
    /// … to ICE + DTLS connected.
    pub connected_us: Option<u64>,
    /// … to the last packet of the first complete video frame.
    pub first_frame_us: Option<u64>,
    /// Whether the first video frame (complete or not) carried an IDR slice.
    pub first_frame_idr: Option<bool>,
    /// Whole session.
    pub video: VideoCounts,
    pub audio: AudioCounts,
    /// Inside the measuring window.
    pub video_window: VideoCounts,
    pub audio_window: AudioCounts,
    /// The DELETE of the session's resource was answered 200.
    pub deleted: bool,
}

struct Viewer {
    rtc: Rtc,
    socket: UdpSocket,
    /// Set when the socket takes coalesced datagrams (GRO).
    gro: Option<quinn_udp::UdpSocketState>,
    local: SocketAddr,
    shared: Arc<Shared>,
    res: PlayerResult,
    stats: ViewerStats,
    video: FrameTracker,
    audio_highest: Option<u64>,
    post_at: Instant,
    /// Counters when the window opened.
    video_open: Option<VideoCounts>,
    audio_open: Option<AudioCounts>,
    measuring: bool,
    /// Until when the viewer stays.
    stay: Stay,
}

impl Viewer {
    /// Sends what the `Rtc` queued and handles its events; returns its next deadline.
    fn drain(&mut self) -> Result<Instant, String> {
        loop {
            if !self.rtc.is_alive() {
                return Err("the WebRTC session ended".into());
            }
            match self.rtc.poll_output() {
                Ok(Output::Transmit(t)) => {
                    // A full send buffer drops the datagram, as on a real network.
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Ok(Output::Timeout(t)) => return Ok(t),
                Ok(Output::Event(e)) => self.event(e)?,
                Err(e) => return Err(format!("WebRTC: {e}")),
            }
        }
    }

    fn since_post(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.post_at).as_micros() as u64
    }

    fn event(&mut self, e: Event) -> Result<(), String> {
        match e {
            Event::Connected => self.stats.connected_us = Some(self.since_post(Instant::now())),
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                return Err("ICE disconnected".into());
            }
            Event::RtpPacket(p) => self.rtp(&p),
            _ => {}
        }
        Ok(())
    }

    fn rtp(&mut self, p: &RtpPacket) {
        let now = p.timestamp;
        let measuring = self.measuring;
        if p.time.frequency().get() != 90_000 {
            let seq = *p.seq_no;
            let a = &mut self.stats.audio;
            match self.audio_highest {
                Some(h) if seq <= h => return,
                Some(h) => a.lost += (seq - h - 1).min(MAX_GAP),
                None => {}
            }
            self.audio_highest = Some(seq);
            a.packets += 1;
            let ms = (p.time.numer() / 48) as u32;
            self.res
                .rec
                .media(TAG_AUDIO, ms, p.payload.len() as u32, now, measuring);
            return;
        }
        let mut ends = [None; 2];
        let mut n = 0;
        self.video.packet(
            *p.seq_no,
            p.time.numer(),
            p.header.marker,
            &p.payload,
            &mut |f| {
                if let Some(slot) = ends.get_mut(n) {
                    *slot = Some(f);
                }
                n += 1;
            },
        );
        for f in ends.into_iter().flatten() {
            if self.stats.first_frame_idr.is_none() {
                self.stats.first_frame_idr = Some(f.idr);
            }
            if f.complete && self.stats.first_frame_us.is_none() {
                self.stats.first_frame_us = Some(self.since_post(now));
                self.res.started(&self.shared);
            }
            let ms = (f.time / 90) as u32;
            self.res
                .rec
                .media(TAG_VIDEO, ms, f.bytes as u32, now, measuring);
        }
    }

    /// Notes the run's phase; snapshots the counters when it first sees the window open.
    fn phase(&mut self) -> u8 {
        let p = self.shared.phase.load(Relaxed);
        if p != super::CONNECTING && self.video_open.is_none() {
            self.video_open = Some(self.video.counts);
            self.audio_open = Some(self.stats.audio);
        }
        self.measuring = p == MEASURING;
        p
    }

    fn close_window(&mut self) {
        self.stats.video = self.video.counts;
        if let (Some(v), Some(a)) = (self.video_open, self.audio_open) {
            self.stats.video_window = self.video.counts.since(&v);
            self.stats.audio_window = self.stats.audio.since(&a);
        }
    }

    /// Reads every queued datagram (up to [`READ_BURST`] reads) into the `Rtc`.
    fn read(&mut self, buf: &mut [u8]) -> Result<Instant, String> {
        let mut next = None;
        for _ in 0..READ_BURST {
            let r = match &self.gro {
                Some(state) => {
                    let mut meta = [quinn_udp::RecvMeta::default()];
                    let mut slices = [std::io::IoSliceMut::new(&mut *buf)];
                    self.socket
                        .try_io(tokio::io::Interest::READABLE, || {
                            state.recv((&self.socket).into(), &mut slices, &mut meta)
                        })
                        .map(|_| (meta[0].len, meta[0].stride, meta[0].addr))
                }
                None => self.socket.try_recv_from(buf).map(|(n, a)| (n, n, a)),
            };
            let (n, stride, source) = match r {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("UDP read: {e}")),
            };
            if self.measuring {
                self.res.rec.wire_bytes += n as u64;
            }
            // One read may hold several datagrams of `stride` bytes (the last may be shorter).
            for d in buf[..n].chunks(stride.max(1)) {
                let Ok(r) = Receive::new(NetProtocol::Udp, source, self.local, d) else {
                    continue;
                };
                // A datagram str0m rejects (not STUN/DTLS/SRTP) is dropped, like the server.
                let _ = self.rtc.handle_input(Input::Receive(Instant::now(), r));
                next = Some(self.drain()?);
            }
        }
        match next {
            Some(t) => Ok(t),
            None => self.drain(),
        }
    }
}

/// How long a viewer stays once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stay {
    /// Until the run ends.
    UntilDone,
    /// Until its first complete video frame (the `--cycles` mode).
    FirstFrame,
}

/// One WHEP viewer: POST, connect, receive until the run ends (or, with [`Stay::FirstFrame`],
/// until the first complete video frame), DELETE.
/// Kernel receive buffer of each viewer's socket.
const RECV_BUFFER: usize = 1 << 20;

pub async fn whep_player(
    target: Arc<WhepTarget>,
    cert: DtlsCert,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
    stay: Stay,
) -> PlayerResult {
    let deadline = tokio::time::Instant::now() + shared.connect_timeout;
    let mut location = None;
    let played = play(
        &target,
        cert,
        shared.clone(),
        done,
        deadline,
        stay,
        &mut location,
    )
    .await;
    let (mut res, outcome, mut stats) = match played {
        Ok(p) => (p.res, p.outcome, p.stats),
        Err((res, e)) => (res, Err(e), ViewerStats::default()),
    };
    if let Some(path) = location {
        let req = target.request("DELETE", &path, None);
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        stats.deleted = matches!(http(target.addr, &req, end).await, Ok(r) if r.status == 200);
    }
    res.whep = Some(Box::new(stats));
    match outcome {
        Ok(()) => res,
        Err(e) => res.end(&shared, e),
    }
}

/// A viewer that got as far as a session: its result and how it ended.
struct Played {
    res: PlayerResult,
    stats: ViewerStats,
    outcome: Result<(), String>,
}

async fn play(
    target: &WhepTarget,
    cert: DtlsCert,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
    stay: Stay,
    location: &mut Option<String>,
) -> Result<Played, (PlayerResult, String)> {
    let res = PlayerResult::new(&shared);
    let post_at = Instant::now();
    let socket = match UdpSocket::bind((target.local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => return Err((res, format!("UDP bind: {e}"))),
    };
    let local = match socket.local_addr() {
        Ok(a) => a,
        Err(e) => return Err((res, format!("UDP bind: {e}"))),
    };
    // Room for a whole keyframe arriving at loopback speed (a 2.5 Mbit/s keyframe is ~70
    // datagrams, over 200 KiB of kernel memory with their buffers: the 208 KiB default drops
    // its tail), as a browser's network path would pace it.
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RECV_BUFFER);
    // quinn-udp's set-up turns GRO on (and datagrams are then read through it).
    let gro = if target.gro {
        match quinn_udp::UdpSocketState::new((&socket).into()) {
            Ok(s) if s.gro_segments() > 1 => Some(s),
            _ => return Err((res, "UDP GRO is not available".into())),
        }
    } else {
        None
    };
    // castnode's DTLS provider: one shared dimpl configuration (see castnode::webrtc::keys).
    let builder = Rtc::builder()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false)
        .set_dtls_cert(cert);
    let mut rtc = castnode::webrtc::keys::build_plain(builder, post_at);
    match Candidate::host(local, "udp") {
        Ok(c) => {
            rtc.add_local_candidate(c);
        }
        Err(e) => return Err((res, format!("local candidate {local}: {e}"))),
    }
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let Some((offer, pending)) = api.apply() else {
        return Err((res, "str0m made no offer".into()));
    };
    let req = target.request("POST", &target.path, Some(&offer.to_sdp_string()));
    let resp = match http(target.addr, &req, deadline).await {
        Ok(r) => r,
        Err(e) => return Err((res, e)),
    };
    if resp.status != 201 {
        return Err((
            res,
            format!("POST answered {}: {}", resp.status, resp.body.trim()),
        ));
    }
    *location = resp.location;
    let stats = ViewerStats {
        answer_us: Some(post_at.elapsed().as_micros() as u64),
        ..ViewerStats::default()
    };
    let answer = match SdpAnswer::from_sdp_string(&resp.body) {
        Ok(a) => a,
        Err(e) => return Err((res, format!("answer SDP: {e}"))),
    };
    if let Err(e) = rtc.sdp_api().accept_answer(pending, answer) {
        return Err((res, format!("answer not accepted: {e}")));
    }
    let mut v = Viewer {
        rtc,
        socket,
        gro,
        local,
        shared,
        res,
        stats,
        video: FrameTracker::default(),
        audio_highest: None,
        post_at,
        video_open: None,
        audio_open: None,
        measuring: false,
        stay,
    };
    let outcome = receive(&mut v, done, deadline).await;
    v.close_window();
    v.rtc.disconnect();
    Ok(Played {
        res: v.res,
        stats: v.stats,
        outcome,
    })
}

async fn receive(
    v: &mut Viewer,
    done: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
) -> Result<(), String> {
    let mut buf = vec![0u8; if v.gro.is_some() { 1 << 16 } else { 2048 }];
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    let done = until_done(done);
    tokio::pin!(done);
    let mut next = v.drain()?;
    let timer = tokio::time::sleep_until(next.into());
    tokio::pin!(timer);
    loop {
        if v.phase() == DONE || (v.stay == Stay::FirstFrame && v.stats.first_frame_us.is_some()) {
            return Ok(());
        }
        let wake = tokio::select! {
            biased;
            () = &mut done => Wake::Done,
            () = &mut timeout, if !v.res.connected => Wake::Timeout,
            r = v.socket.readable() => Wake::Io(r.map(|()| true)),
            () = &mut timer => Wake::Io(Ok(false)),
        };
        let t = match wake {
            Wake::Done => return Ok(()),
            Wake::Timeout => {
                return Err(if v.stats.connected_us.is_none() {
                    "ICE/DTLS did not connect in time".into()
                } else {
                    "no complete video frame in time".into()
                });
            }
            Wake::Io(Err(e)) => return Err(format!("UDP: {e}")),
            Wake::Io(Ok(true)) => v.read(&mut buf)?,
            Wake::Io(Ok(false)) => {
                if let Err(e) = v.rtc.handle_input(Input::Timeout(Instant::now())) {
                    return Err(format!("WebRTC: {e}"));
                }
                v.drain()?
            }
        };
        if t != next {
            next = t;
            timer.as_mut().reset(next.into());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentiles of durations, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Millis {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Millis {
    pub fn of(mut us: Vec<u64>) -> Option<Self> {
        us.sort_unstable();
        let ms = |p: f64| Some(percentile(&us, p)? as f64 / 1000.0);
        Some(Self {
            p50: ms(50.0)?,
            p95: ms(95.0)?,
            p99: ms(99.0)?,
            max: ms(100.0)?,
            n: us.len(),
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        json!({ "p50": r1(self.p50), "p95": r1(self.p95), "p99": r1(self.p99),
                "max": r1(self.max), "viewers": self.n })
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.0}, p95 {:.0}, p99 {:.0}, max {:.0} ms",
            self.p50, self.p95, self.p99, self.max
        )
    }
}

/// The WHEP part of the report.
#[derive(Debug)]
pub struct Summary {
    /// POST → 201.
    answer: Option<Millis>,
    /// POST → ICE + DTLS connected.
    connected: Option<Millis>,
    /// POST → first complete video frame.
    first_frame: Option<Millis>,
    /// ICE + DTLS connected → first complete video frame.
    first_frame_after_connect: Option<Millis>,
    /// Viewers whose first video frame carried an IDR, and those whose did not.
    first_idr: (usize, usize),
    /// Complete-or-not video frames per second in the window, per viewer served throughout.
    fps_min: f64,
    fps_p50: f64,
    /// Sums over viewers, in the window.
    video: VideoCounts,
    audio: AudioCounts,
    viewers_losing_frames: usize,
    /// Audio packets per second per viewer served throughout the window (mean).
    audio_pps: f64,
    /// Sessions created, and of those, DELETEs answered 200.
    sessions: usize,
    deleted: usize,
    udp_buffer_errors: Option<(u64, u64)>,
}

impl Summary {
    pub fn build(
        results: &[PlayerResult],
        window: f64,
        udp_buffer_errors: Option<(u64, u64)>,
    ) -> Self {
        let mut s = Self {
            answer: None,
            connected: None,
            first_frame: None,
            first_frame_after_connect: None,
            first_idr: (0, 0),
            fps_min: 0.0,
            fps_p50: 0.0,
            video: VideoCounts::default(),
            audio: AudioCounts::default(),
            viewers_losing_frames: 0,
            audio_pps: 0.0,
            sessions: 0,
            deleted: 0,
            udp_buffer_errors,
        };
        let (mut answer, mut connected, mut first, mut after) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut fps = Vec::new();
        for r in results {
            let Some(w) = &r.whep else { continue };
            answer.extend(w.answer_us);
            connected.extend(w.connected_us);
            first.extend(w.first_frame_us);
            if let (Some(c), Some(f)) = (w.connected_us, w.first_frame_us) {
                after.push(f.saturating_sub(c));
            }
            match w.first_frame_idr {
                Some(true) => s.first_idr.0 += 1,
                Some(false) => s.first_idr.1 += 1,
                None => {}
            }
            s.sessions += usize::from(w.answer_us.is_some());
            s.deleted += usize::from(w.deleted);
            let v = &w.video_window;
            s.video.packets += v.packets;
            s.video.lost += v.lost;
            s.video.recovered += v.recovered;
            s.video.frames += v.frames;
            s.video.incomplete += v.incomplete;
            s.video.repaired += v.repaired;
            s.audio.packets += w.audio_window.packets;
            s.audio.lost += w.audio_window.lost;
            s.viewers_losing_frames += usize::from(v.frames_lost() > 0);
            if r.connected && !r.disconnected {
                fps.push(f64::from(r.rec.video_frames) / window);
                s.audio_pps += w.audio_window.packets as f64 / window;
            }
        }
        s.audio_pps /= fps.len().max(1) as f64;
        fps.sort_by(f64::total_cmp);
        s.fps_min = fps.first().copied().unwrap_or_default();
        s.fps_p50 = percentile(&fps, 50.0).unwrap_or_default();
        s.answer = Millis::of(answer);
        s.connected = Millis::of(connected);
        s.first_frame = Millis::of(first);
        s.first_frame_after_connect = Millis::of(after);
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let v = &self.video;
        json!({
            "answer_ms": self.answer.map(Millis::to_json),
            "connected_ms": self.connected.map(Millis::to_json),
            "first_frame_ms": self.first_frame.map(Millis::to_json),
            "first_frame_after_connect_ms": self.first_frame_after_connect.map(Millis::to_json),
            "first_frame_idr": { "yes": self.first_idr.0, "no": self.first_idr.1 },
            "video_fps": { "min": r1(self.fps_min), "p50": r1(self.fps_p50) },
            "video_window": {
                "frames": v.frames, "incomplete": v.incomplete, "repaired": v.repaired,
                "lost": v.frames_lost(), "viewers_losing_frames": self.viewers_losing_frames,
                "packets": v.packets, "packets_lost": v.lost, "packets_recovered": v.recovered,
            },
            "audio_window": { "packets": self.audio.packets, "packets_lost": self.audio.lost,
                              "packets_per_s_per_viewer": r1(self.audio_pps) },
            "udp_buffer_errors": self.udp_buffer_errors.map(|(r, s)| json!({
                "receive": r, "send": s,
            })),
            "sessions": self.sessions,
            "deleted": self.deleted,
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = |f: &mut fmt::Formatter<'_>, name: &str, m: &Option<Millis>| match m {
            Some(m) => writeln!(f, "  {name:<19}{m} ({} viewers)", m.n),
            None => writeln!(f, "  {name:<19}none"),
        };
        line(f, "first frame", &self.first_frame)?;
        line(f, "  after connected", &self.first_frame_after_connect)?;
        line(f, "ICE+DTLS connected", &self.connected)?;
        line(f, "WHEP answer", &self.answer)?;
        writeln!(
            f,
            "  first frame IDR    {} viewers; not an IDR: {}",
            self.first_idr.0, self.first_idr.1
        )?;
        let v = &self.video;
        writeln!(
            f,
            "  video (window)     {} frames, {} incomplete, {} repaired, {} lost ({} viewers \
             losing frames); {:.1} fps min, {:.1} p50; packets {} received, {} missed, {} \
             recovered",
            v.frames,
            v.incomplete,
            v.repaired,
            v.frames_lost(),
            self.viewers_losing_frames,
            self.fps_min,
            self.fps_p50,
            v.packets,
            v.lost,
            v.recovered
        )?;
        writeln!(
            f,
            "  audio (window)     {} packets ({:.1}/s per viewer; 20 ms Opus is 50/s), {} missed",
            self.audio.packets, self.audio_pps, self.audio.lost
        )?;
        if let Some((r, s)) = self.udp_buffer_errors {
            writeln!(
                f,
                "  UDP buffers        {r} datagrams dropped on receive, {s} on send (whole machine, window)"
            )?;
        }
        writeln!(
            f,
            "  sessions           {} created, {} deleted with 200",
            self.sessions, self.deleted
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tracker: &mut FrameTracker, packets: &[(u64, u64, bool)]) -> Vec<FrameEnd> {
        let mut out = Vec::new();
        for &(seq, time, marker) in packets {
            tracker.packet(seq, time, marker, &[0x41, 0], &mut |f| out.push(f));
        }
        out
    }

    #[test]
    fn frames_complete_in_order() {
        let mut t = FrameTracker::default();
        let ends = run(
            &mut t,
            &[
                (10, 0, false),
                (11, 0, false),
                (12, 0, true),
                (13, 3000, true),
            ],
        );
        assert_eq!(ends.len(), 2);
        assert!(ends.iter().all(|f| f.complete));
        assert_eq!((ends[0].time, ends[0].bytes), (0, 6));
        assert_eq!(t.counts.lost, 0);
        assert_eq!((t.counts.frames, t.counts.incomplete), (2, 0));
    }

    #[test]
    fn a_hole_makes_the_frame_incomplete_until_repaired() {
        let mut t = FrameTracker::default();
        // 11 lost; frame 0 closes with a hole; frame 3000 is whole.
        let ends = run(&mut t, &[(10, 0, false), (12, 0, true), (13, 3000, true)]);
        assert_eq!(
            ends.iter().map(|f| f.complete).collect::<Vec<_>>(),
            [false, true]
        );
        assert_eq!(
            (t.counts.lost, t.counts.incomplete, t.counts.frames_lost()),
            (1, 1, 1)
        );
        // The retransmission arrives.
        assert!(run(&mut t, &[(11, 0, false)]).is_empty());
        assert_eq!((t.counts.recovered, t.counts.repaired), (1, 1));
        assert_eq!(t.counts.frames_lost(), 0);
        // A duplicate changes nothing.
        run(&mut t, &[(11, 0, false), (13, 3000, true)]);
        assert_eq!(t.counts.packets, 4);
    }

    #[test]
    fn a_late_packet_inside_the_open_frame_keeps_it_complete() {
        let mut t = FrameTracker::default();
        let ends = run(
            &mut t,
            &[
                (10, 0, false),
                (12, 0, false),
                (11, 0, false),
                (13, 0, true),
            ],
        );
        assert_eq!(ends.len(), 1);
        assert!(ends[0].complete);
        assert_eq!(ends[0].bytes, 8);
        assert_eq!(
            (t.counts.lost, t.counts.recovered, t.counts.incomplete),
            (1, 1, 0)
        );
    }

    #[test]
    fn a_lost_marker_closes_the_frame_at_the_next_timestamp() {
        let mut t = FrameTracker::default();
        // 12 (marker of frame 0) lost; 13 starts frame 3000.
        let ends = run(
            &mut t,
            &[
                (10, 0, false),
                (11, 0, false),
                (13, 3000, false),
                (14, 3000, true),
            ],
        );
        assert_eq!(ends.len(), 2);
        // Whether 12 was frame 0's end or frame 3000's start is unknown: both count it.
        assert_eq!((ends[0].time, ends[0].complete), (0, false));
        assert_eq!((ends[1].time, ends[1].complete), (3000, false));
        // It comes back: both are repaired.
        run(&mut t, &[(12, 0, true)]);
        assert_eq!((t.counts.repaired, t.counts.frames_lost()), (2, 0));
    }

    #[test]
    fn the_first_frame_of_a_gap_spanning_two_frames_is_incomplete_too() {
        let mut t = FrameTracker::default();
        // Frame 0 = 10..=12, frame 3000 = 13..=15; 12 and 13 lost.
        let ends = run(
            &mut t,
            &[
                (10, 0, false),
                (11, 0, false),
                (14, 3000, false),
                (15, 3000, true),
            ],
        );
        assert_eq!(
            ends.iter().map(|f| f.complete).collect::<Vec<_>>(),
            [false, false]
        );
    }

    #[test]
    fn idr_detection() {
        // Single NAL units.
        assert!(has_idr(&[0x65, 0x88]));
        assert!(!has_idr(&[0x41, 0x9a]));
        assert!(!has_idr(&[0x67, 0x42]));
        // STAP-A with SPS, PPS, IDR.
        assert!(has_idr(&[
            24, 0, 2, 0x67, 0x42, 0, 2, 0x68, 0xce, 0, 2, 0x65, 0x88
        ]));
        assert!(!has_idr(&[24, 0, 2, 0x67, 0x42, 0, 2, 0x68, 0xce]));
        // A truncated STAP-A.
        assert!(!has_idr(&[24, 0, 9, 0x65]));
        // FU-A of an IDR (start and middle fragments) and of a P slice.
        assert!(has_idr(&[0x7c, 0x85, 0]));
        assert!(has_idr(&[0x7c, 0x05, 0]));
        assert!(!has_idr(&[0x7c, 0x81, 0]));
        assert!(!has_idr(&[]));
    }

    #[test]
    fn responses() {
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/sdp\r\n\
              location: /whep/live/k/7\r\ncontent-length: 5\r\n\r\nv=0\r\nXX",
        )
        .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.location.as_deref(), Some("/whep/live/k/7"));
        assert_eq!(r.body, "v=0\r\n");
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\nLocation: http://h:8080/whep/a/b/1\r\n\r\nv=0",
        )
        .unwrap();
        assert_eq!(r.location.as_deref(), Some("/whep/a/b/1"));
        assert_eq!(r.body, "v=0");
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nbroadcast live/x is not live\n")
            .unwrap();
        assert_eq!((r.status, r.location), (404, None));
        assert!(parse_response(b"HTTP/1.1 201 Created\r\n").is_err());
        assert!(parse_response(b"SIP/2.0 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
    }

    #[test]
    fn target() {
        let (t, host) = WhepTarget::parse("http://127.0.0.1:8080/whep/live/k").unwrap();
        assert_eq!(host, "127.0.0.1");
        assert_eq!(t.path, "/whep/live/k");
        let req = t.request("POST", &t.path, Some("v=0\r\n"));
        assert!(req.starts_with("POST /whep/live/k HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(req.contains("Content-Type: application/sdp\r\nContent-Length: 5\r\n"));
        assert!(req.ends_with("\r\n\r\nv=0\r\n"));
    }
}
