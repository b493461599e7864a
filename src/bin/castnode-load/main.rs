//! `castnode-load`: opens many players of one live stream in one process and reports how many
//! keep up, how late their frames arrive, and what the server under test spent (CPU, memory) to
//! serve them. It runs against castnode or any other RTMP / HTTP-FLV / WHEP server (nginx-rtmp,
//! say). WHEP viewers are WebRTC peers without decoders; see [`whep`] for how they work and what
//! they add to the report (time to first frame, frame completeness). With `--cycles N` it opens
//! N WHEP sessions one after the other instead, to see what sessions leave behind on the server;
//! see [`cycles`].
//! `--protocol cluster` measures a castnode relay instead: simulated edges, each a real cluster
//! link of its own, pull broadcasts from it over QUIC; see [`cluster`].
//!
//! # How a run goes
//!
//! 1. Unless `--no-publish`, a publisher thread (with its own single-threaded runtime, so busy
//!    players cannot delay it) publishes `--fixture` over RTMP in real time: the tag with
//!    timestamp `ts` is written at `t0 + ts`. The file loops forever with continuous timestamps
//!    (each loop adds the file's duration plus one frame); sequence headers are sent once and
//!    end-of-sequence tags are dropped, as from an encoder that never stops. Wire timestamps start
//!    at `--ts-base-ms` (60 s) rather than 0, so a server that rebases timestamps is recognised.
//! 2. `--players` players connect at `--connect-rate` per second: RTMP `play`, an HTTP-FLV
//!    `GET`, or a WHEP offer (POST, then ICE + DTLS over a UDP socket per viewer). The server's
//!    RSS is read just before (`--server-pid`).
//! 3. After `--warmup` seconds the measuring window of `--duration` seconds opens. Only what
//!    arrives inside it counts: media bytes, video frames, lag samples, server and own CPU.
//!
//! # What is measured
//!
//! - **Received bitrate** of each player: audio + video body bytes in the window (the same
//!   quantity as the published bitrate, which is computed from the fixture's frame bodies).
//! - **Lag** of every video message: the publisher writes timestamp `ts` at `t0 + ts`, so a
//!   message arriving at `now` is `now - (t0 + ts)` late: the server's queueing and batching plus
//!   the kernel and this tool's scheduling. A frame counts when its last byte was read. If the
//!   first video timestamp a player sees is absurd (more than 1 s early or 10 s late) the server
//!   rebased timestamps; that player's lag is then measured against the smallest `now - ts` of
//!   its first second (calibrated), which hides any constant delay. The report says which method
//!   each player got.
//! - A player **keeps up** when it stayed connected, its received bitrate is at least 90% of the
//!   published one, and its p99 lag is at most `--lag-limit-ms` (bitrate only with
//!   `--no-publish`); a WHEP viewer must also have lost no video frame in the window. For WHEP the
//!   bitrate is RTP payload bytes (castnode sends Opus at 96 kbit/s for the fixture's AAC) and
//!   the lag is measured at each frame's last packet, from its RTP time (RTP time = publisher
//!   timestamp × 90 on castnode; calibrated otherwise).
//! - **Server cost** (`--server-pid`, summed with the process's children such as nginx workers):
//!   CPU (utime + stime) over the window in cores and in microseconds per player per second; RSS
//!   before the players connect and at the window's end, per player.
//! - **This tool's CPU** over the window, since it shares the machine with the server, and how
//!   busy the whole machine was (/proc/stat): a busy machine, not the server, may be the limit.
//!
//! # Keeping the tool cheap
//!
//! Payload bytes are copied once, by the kernel into a read buffer, and never again. RTMP
//! players use the skimming [`ClientConn`], whose chunk decoder counts audio/video bodies without
//! keeping them. HTTP-FLV players read into one buffer per worker thread (a readiness wait, then
//! a non-blocking read) and walk it with [`FlvSkimmer`], a sans-IO decoder of chunked transfer
//! coding and FLV framing that skips payloads. Nothing is allocated per frame: lag samples go into
//! a vector reserved for the whole window.

use std::cell::RefCell;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use castnode::rtmp::amf0::{self, Amf0};
use castnode::rtmp::client::{ClientConn, ClientEvent, Mode};
use castnode::rtmp::flv::{FlvReader, RawTag, TAG_AUDIO, TAG_SCRIPT, TAG_VIDEO};
use clap::{Parser, ValueEnum};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

mod cluster;
mod cycles;
mod whep;

/// Opens N players of one live stream and reports how many keep up.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Where to publish, and where RTMP players play: rtmp://host:port/app/key.
    #[arg(long)]
    rtmp_url: String,
    /// Where HTTP-FLV players read (--protocol flv): http://host:port/app/key.flv.
    #[arg(long)]
    flv_url: Option<String>,
    /// Where WHEP viewers POST their offers (--protocol whep): http://host:port/whep/app/key.
    #[arg(long)]
    whep_url: Option<String>,
    /// `--protocol flv` through a stream manager: each player first asks this placement URL
    /// (`http://manager/api/v1/broadcasts/app/key/subscribe?region=R`) and reads the FLV URL it
    /// answers (instead of --flv-url).
    #[arg(long)]
    subscribe_url: Option<String>,
    /// How players read.
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// Number of players (`--protocol cluster`: simulated edges).
    #[arg(long, visible_alias = "edges", required_unless_present = "cycles")]
    players: Option<usize>,
    /// Instead of concurrent players, N sequential WHEP sessions (--protocol whep): each POSTs,
    /// connects, waits for its first complete video frame (within --connect-timeout) and
    /// DELETEs its session before the next one starts.
    #[arg(long, conflicts_with = "players")]
    cycles: Option<usize>,
    /// With --cycles: the cycles after which the server's RSS is read as the baseline.
    #[arg(long, default_value_t = 20)]
    cycles_warmup: usize,
    /// With --cycles: stop after this many failed cycles.
    #[arg(long, default_value_t = 10)]
    cycles_max_failures: usize,
    /// `--protocol cluster`: broadcasts to publish (`app/key-0` … when more than one); edge `k
    /// mod N` subscribes broadcast `k mod M` for `k` below the larger of N and M.
    #[arg(long, default_value_t = 1)]
    broadcasts: usize,
    /// `--protocol cluster`: the relay's cluster address (HOST:PORT, QUIC) the simulated edges
    /// pull from.
    #[arg(long)]
    relay: Option<String>,
    /// `--protocol cluster`: the relay's metrics (http://host:port/metrics), for its forwarded
    /// bytes and latency histogram.
    #[arg(long)]
    relay_metrics: Option<String>,
    /// `--protocol cluster`: the cluster's shared token.
    #[arg(long)]
    cluster_token: Option<String>,
    /// `--protocol cluster`: the origin's cluster address; one more link subscribes every
    /// broadcast there directly, to time the relay's hop frame by frame.
    #[arg(long)]
    reference: Option<String>,
    /// `--protocol cluster`: the origin's process id, for its CPU (`--server-pid` is the relay).
    #[arg(long)]
    origin_pid: Option<u32>,
    /// Seconds of the measuring window.
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// FLV file to publish in a loop (and the reference for the published bitrate).
    #[arg(long)]
    fixture: PathBuf,
    /// Do not publish: someone else does (only bitrate is reported then).
    #[arg(long)]
    no_publish: bool,
    /// Seconds between the last player connecting and the window opening.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Players started per second.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// WHEP viewers' sockets take coalesced datagrams (UDP GRO). On loopback the kernel's work
    /// of delivering a datagram is charged to the sender; with GRO a GSO batch is delivered
    /// whole, as a NIC's segmentation offload would send it.
    #[arg(long)]
    gro: bool,
    /// Worker threads of the players (the publisher has its own thread).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Process id of the server under test (its children, e.g. nginx workers, are included).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Highest p99 lag, in milliseconds, of a player that keeps up.
    #[arg(long, default_value_t = 150)]
    lag_limit_ms: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// First timestamp the publisher writes, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    ts_base_ms: u32,
    /// Seconds a player has to connect and start playing.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Protocol {
    /// RTMP play.
    Rtmp,
    /// HTTP-FLV.
    Flv,
    /// WHEP (WebRTC: ICE, DTLS-SRTP, RTP; no decoding).
    Whep,
    /// Simulated edges pulling over the cluster link (QUIC) from a relay.
    Cluster,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Rtmp => "RTMP",
            Protocol::Flv => "HTTP-FLV",
            Protocol::Whep => "WHEP",
            Protocol::Cluster => "cluster",
        }
    }
}

impl Args {
    /// `--players` (absent with `--cycles`).
    fn players(&self) -> usize {
        self.players.unwrap_or_default()
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let printed = match (args.protocol, args.cycles) {
        (Protocol::Cluster, _) => cluster::run(&args).map(|r| match args.json {
            true => format!("{}\n", r.to_json()),
            false => r.to_string(),
        }),
        (_, Some(n)) => cycles::run(&args, n).map(|r| match args.json {
            true => format!("{}\n", r.to_json()),
            false => r.to_string(),
        }),
        _ => run(&args).map(|r| match args.json {
            true => format!("{}\n", r.to_json()),
            false => r.to_string(),
        }),
    };
    match printed {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("castnode-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log(msg: fmt::Arguments<'_>) {
    eprintln!("[castnode-load] {msg}");
}

// ---------------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------------

/// An RTMP URL split the way a client needs it.
#[derive(Debug, PartialEq)]
struct RtmpTarget {
    addr: SocketAddr,
    app: String,
    tc_url: String,
    key: String,
}

fn split_host_port(
    url: &str,
    scheme: &str,
    default_port: u16,
) -> anyhow::Result<(String, u16, String)> {
    let rest = url
        .strip_prefix(scheme)
        .with_context(|| format!("{url}: does not start with {scheme}"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().with_context(|| format!("{url}: bad port"))?),
        None => (authority, default_port),
    };
    if host.is_empty() {
        bail!("{url}: no host");
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

impl RtmpTarget {
    fn parse(url: &str) -> anyhow::Result<(Self, String)> {
        let (host, port, path) = split_host_port(url, "rtmp://", 1935)?;
        let Some((app, key)) = path
            .split_once('/')
            .filter(|(a, k)| !a.is_empty() && !k.is_empty())
        else {
            bail!("{url}: expected rtmp://host:port/app/key");
        };
        let target = Self {
            addr: SocketAddr::from(([0, 0, 0, 0], port)),
            app: app.to_owned(),
            tc_url: format!("rtmp://{host}:{port}/{app}"),
            key: key.to_owned(),
        };
        Ok((target, host))
    }
}

/// An HTTP-FLV URL: where to connect and the request to send.
#[derive(Debug, PartialEq)]
struct HttpTarget {
    addr: SocketAddr,
    request: String,
}

impl HttpTarget {
    fn parse(url: &str) -> anyhow::Result<(Self, String)> {
        let (host, port, path) = split_host_port(url, "http://", 80)?;
        let request =
            format!("GET /{path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
        Ok((
            Self {
                addr: SocketAddr::from(([0, 0, 0, 0], port)),
                request,
            },
            host,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// One tag of the fixture; `config` tags (sequence headers) are only sent on the first loop.
struct FixtureTag {
    tag: RawTag,
    config: bool,
}

/// The file to publish, prepared for looping.
struct Fixture {
    metadata: Option<Amf0>,
    tags: Vec<FixtureTag>,
    /// Milliseconds added to the timestamps on each loop.
    period_ms: u64,
    /// Audio + video frame body bits per second (sequence headers excluded).
    media_bps: f64,
    /// Video frames per second.
    video_fps: f64,
}

/// Whether an audio/video tag body is a sequence header (`Some(true)`), a frame (`Some(false)`)
/// or to be dropped (`None`: empty, or an end-of-sequence tag).
fn classify(tag_type: u8, body: &[u8]) -> Option<bool> {
    let b0 = *body.first()?;
    if tag_type == TAG_AUDIO {
        return Some(b0 >> 4 == 10 && body.get(1) == Some(&0));
    }
    let packet_type = if b0 & 0x80 != 0 {
        b0 & 0x0f
    } else if matches!(b0 & 0x0f, 7 | 12) {
        *body.get(1)?
    } else {
        return Some(false);
    };
    match packet_type {
        0 => Some(true),
        2 => None,
        _ => Some(false),
    }
}

impl Fixture {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let reader = FlvReader::new(Bytes::from(data))
            .with_context(|| format!("{}: not FLV", path.display()))?;
        Self::from_tags(reader)
    }

    fn from_tags(tags_in: impl Iterator<Item = RawTag>) -> anyhow::Result<Self> {
        let mut metadata = None;
        let mut tags = Vec::new();
        // Per track (0 audio, 1 video): first and last timestamp, frames, frame bytes.
        let mut track = [(u32::MAX, 0u32, 0u64, 0u64); 2];
        for tag in tags_in {
            match tag.tag_type {
                TAG_SCRIPT if metadata.is_none() => {
                    let values = amf0::decode_all(&tag.body).context("fixture's script tag")?;
                    if values.first().and_then(Amf0::as_str) == Some("onMetaData") {
                        metadata = values.into_iter().nth(1);
                    }
                }
                TAG_AUDIO | TAG_VIDEO => {
                    let Some(config) = classify(tag.tag_type, &tag.body) else {
                        continue;
                    };
                    if !config {
                        let t = &mut track[usize::from(tag.tag_type == TAG_VIDEO)];
                        t.0 = t.0.min(tag.ts_ms);
                        t.1 = t.1.max(tag.ts_ms);
                        t.2 += 1;
                        t.3 += tag.body.len() as u64;
                    }
                    tags.push(FixtureTag { tag, config });
                }
                _ => {}
            }
        }
        if track[0].2 + track[1].2 == 0 {
            bail!("the fixture has no audio or video frames");
        }
        // Each track ends one (average) frame after its last frame; the loop is the longest.
        let period_ms = track
            .iter()
            .filter(|t| t.2 > 0)
            .map(|t| {
                let step = if t.2 > 1 {
                    (t.1 - t.0) / (t.2 as u32 - 1)
                } else {
                    33
                };
                u64::from(t.1 + step.max(1))
            })
            .max()
            .unwrap_or(1);
        let secs = period_ms as f64 / 1000.0;
        Ok(Self {
            metadata,
            tags,
            period_ms,
            media_bps: (track[0].3 + track[1].3) as f64 * 8.0 / secs,
            video_fps: track[1].2 as f64 / secs,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

/// What the publisher thread tells the coordinator.
#[derive(Default)]
struct PublisherStats {
    /// Frame body bytes written so far.
    media_bytes: AtomicU64,
    /// Largest delay, in microseconds, between a tag's due time and the end of its write
    /// (reset at the window's start).
    late_max_us: AtomicU64,
    /// Why publishing stopped.
    error: Mutex<Option<String>>,
}

async fn flush_conn(sock: &mut TcpStream, conn: &mut ClientConn) -> std::io::Result<()> {
    while let Some(b) = conn.poll_transmit() {
        sock.write_all(&b).await?;
    }
    Ok(())
}

/// Reads what the server sent and handles it; fails when the server closes or stops the stream.
async fn publisher_read(
    sock: &mut TcpStream,
    conn: &mut ClientConn,
    n: std::io::Result<usize>,
) -> anyhow::Result<bool> {
    let n = n.context("reading from the server")?;
    if n == 0 {
        bail!("the server closed the publishing connection");
    }
    conn.handle_buffered(n).context("RTMP from the server")?;
    let mut ready = false;
    while let Some(ev) = conn.poll_event() {
        match ev {
            ClientEvent::Ready => ready = true,
            ClientEvent::Refused(code) => bail!("publish refused: {code}"),
            ClientEvent::Ended => bail!("the server ended the stream"),
            ClientEvent::Media { .. } => {}
        }
    }
    flush_conn(sock, conn).await?;
    Ok(ready)
}

/// Starts the publisher thread and waits for the server to accept the stream; returns `t0`, the
/// instant that timestamp `ts_base_ms` corresponds to.
fn start_publisher(
    target: Arc<RtmpTarget>,
    fixture: Arc<Fixture>,
    base_ms: u32,
    stats: Arc<PublisherStats>,
) -> anyhow::Result<Instant> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<Instant, String>>();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            if let Err(e) = rt.block_on(publish(&target, &fixture, base_ms, &stats, &tx)) {
                let msg = format!("{e:#}");
                // The send fails once the coordinator has its `t0`: then nobody else reports it.
                if tx.send(Err(msg.clone())).is_err() {
                    log(format_args!("publisher stopped: {msg}"));
                }
                *stats.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            }
        })
        .context("starting the publisher thread")?;
    match rx.recv_timeout(Duration::from_secs(15)) {
        Ok(Ok(t0)) => Ok(t0),
        Ok(Err(e)) => bail!("publisher: {e}"),
        Err(_) => bail!("publisher: no NetStream.Publish.Start within 15 s"),
    }
}

async fn publish(
    target: &RtmpTarget,
    fixture: &Fixture,
    base_ms: u32,
    stats: &PublisherStats,
    ready_tx: &std::sync::mpsc::Sender<Result<Instant, String>>,
) -> anyhow::Result<()> {
    let mut sock = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target.addr))
        .await
        .context("connecting the publisher: timed out")?
        .with_context(|| format!("connecting the publisher to {}", target.addr))?;
    let _ = sock.set_nodelay(true);
    let mut conn = ClientConn::new(
        &target.app,
        &target.tc_url,
        Mode::Publish(target.key.clone()),
        0x5eed,
    );
    flush_conn(&mut sock, &mut conn).await?;
    loop {
        let n = sock.read_buf(conn.input_buffer()).await;
        if publisher_read(&mut sock, &mut conn, n).await? {
            break;
        }
    }
    if let Some(m) = &fixture.metadata {
        conn.send_metadata(m.clone());
    }
    let t0 = Instant::now();
    let _ = ready_tx.send(Ok(t0));
    let mut loop_ms = 0u64;
    // The earliest due time among tags queued but not yet written.
    let mut pending: Option<Instant> = None;
    loop {
        for t in &fixture.tags {
            if t.config && loop_ms > 0 {
                continue;
            }
            let sched = loop_ms + u64::from(t.tag.ts_ms);
            let due = t0 + Duration::from_millis(sched);
            if Instant::now() < due {
                flush_conn(&mut sock, &mut conn)
                    .await
                    .context("writing to the server")?;
                if let Some(p) = pending.take() {
                    let late = Instant::now().saturating_duration_since(p).as_micros() as u64;
                    stats.late_max_us.fetch_max(late, Relaxed);
                }
                let sleep = tokio::time::sleep_until(due.into());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut sleep => break,
                        n = sock.read_buf(conn.input_buffer()) => {
                            publisher_read(&mut sock, &mut conn, n).await?;
                        }
                    }
                }
            }
            pending.get_or_insert(due);
            let ts = u64::from(base_ms) + sched;
            conn.send_media(t.tag.tag_type, ts as u32, &[&t.tag.body]);
            if !t.config {
                stats
                    .media_bytes
                    .fetch_add(t.tag.body.len() as u64, Relaxed);
            }
        }
        loop_ms += fixture.period_ms;
    }
}

// ---------------------------------------------------------------------------------------------
// Players
// ---------------------------------------------------------------------------------------------

/// Phases of a run, as players see them.
const CONNECTING: u8 = 0;
const MEASURING: u8 = 1;
const DONE: u8 = 2;

/// What every player needs to know.
struct Shared {
    /// [`CONNECTING`], [`MEASURING`] or [`DONE`]: read on every read, cheaply.
    phase: AtomicU8,
    /// Players that started playing.
    connected: AtomicUsize,
    /// Players that never started playing.
    failed: AtomicUsize,
    /// When the publisher's timestamp `base_ms` was due (`None` without a publisher).
    t0: Option<Instant>,
    base_ms: u32,
    /// Lag samples reserved per player.
    lag_capacity: usize,
    connect_timeout: Duration,
}

/// How a player's lag is computed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LagMethod {
    /// No video yet.
    Unknown,
    /// Against the publisher's clock.
    Absolute,
    /// Timestamps were rebased: collecting the smallest `now - ts` until `until`.
    Calibrating { until: Instant, min_us: i64 },
    /// Against the smallest `now - ts` of the first second.
    Calibrated { offset_us: i64 },
}

/// One player's counters. Everything is preallocated; [`Recorder::media`] never allocates
/// unless the window holds more video frames than expected.
struct Recorder {
    t0: Option<Instant>,
    base_us: i64,
    method: LagMethod,
    /// Audio + video body bytes in the window.
    media_bytes: u64,
    /// Bytes read from the socket in the window.
    wire_bytes: u64,
    /// Video messages in the window.
    video_frames: u32,
    /// Lag of each video message in the window, microseconds.
    lags_us: Vec<u32>,
}

/// Above this, a first lag means the server rebased timestamps.
const REBASED_LATE_US: i64 = 10_000_000;
/// Below this (early), likewise.
const REBASED_EARLY_US: i64 = -1_000_000;
/// How long a calibrating player collects its offset.
const CALIBRATION: Duration = Duration::from_secs(1);

impl Recorder {
    fn new(t0: Option<Instant>, base_ms: u32, lag_capacity: usize) -> Self {
        Self {
            t0,
            base_us: i64::from(base_ms) * 1000,
            method: LagMethod::Unknown,
            media_bytes: 0,
            wire_bytes: 0,
            video_frames: 0,
            lags_us: Vec::with_capacity(lag_capacity),
        }
    }

    /// Notes a message of `length` body bytes read at `now`.
    fn media(&mut self, type_id: u8, timestamp: u32, length: u32, now: Instant, measuring: bool) {
        if type_id != TAG_AUDIO && type_id != TAG_VIDEO {
            return;
        }
        if measuring {
            self.media_bytes += u64::from(length);
        }
        if type_id != TAG_VIDEO {
            return;
        }
        if measuring {
            self.video_frames += 1;
        }
        let Some(t0) = self.t0 else { return };
        let elapsed = now.saturating_duration_since(t0).as_micros() as i64;
        let raw = elapsed - (i64::from(timestamp) * 1000 - self.base_us);
        if let Some(lag) = self.lag(raw, now)
            && measuring
        {
            self.lags_us.push(lag.clamp(0, i64::from(u32::MAX)) as u32);
        }
    }

    /// The lag of a message whose `now - (t0 + ts)` is `raw`, once the method is known.
    fn lag(&mut self, raw: i64, now: Instant) -> Option<i64> {
        match &mut self.method {
            LagMethod::Unknown if (REBASED_EARLY_US..=REBASED_LATE_US).contains(&raw) => {
                self.method = LagMethod::Absolute;
                Some(raw)
            }
            LagMethod::Unknown => {
                self.method = LagMethod::Calibrating {
                    until: now + CALIBRATION,
                    min_us: raw,
                };
                None
            }
            LagMethod::Absolute => Some(raw),
            LagMethod::Calibrating { until, min_us } => {
                *min_us = (*min_us).min(raw);
                if now >= *until {
                    let offset_us = *min_us;
                    self.method = LagMethod::Calibrated { offset_us };
                    return Some(raw - offset_us);
                }
                None
            }
            LagMethod::Calibrated { offset_us } => Some(raw - *offset_us),
        }
    }
}

/// What a player task hands back.
struct PlayerResult {
    /// It started playing.
    connected: bool,
    /// It started playing, then lost the stream before the run ended.
    disconnected: bool,
    /// Why it failed or ended early.
    error: Option<String>,
    rec: Recorder,
    /// What a WHEP viewer measured besides `rec`.
    whep: Option<Box<whep::ViewerStats>>,
}

impl PlayerResult {
    fn new(shared: &Shared) -> Self {
        Self {
            connected: false,
            disconnected: false,
            error: None,
            rec: Recorder::new(shared.t0, shared.base_ms, shared.lag_capacity),
            whep: None,
        }
    }

    fn started(&mut self, shared: &Shared) {
        if !self.connected {
            self.connected = true;
            shared.connected.fetch_add(1, Relaxed);
        }
    }

    /// Ends the player early (before the run's end) for `why`.
    fn end(mut self, shared: &Shared, why: String) -> Self {
        if self.connected {
            self.disconnected = true;
        } else {
            shared.failed.fetch_add(1, Relaxed);
        }
        self.error = Some(why);
        self
    }
}

/// Keep at least this much room in a read buffer before reading.
const READ_MIN: usize = 16 << 10;

/// Outcome of waiting in a player loop.
enum Wake<T> {
    Done,
    Timeout,
    Io(T),
}

/// Completes when the run ends. One future per player, kept across reads: cheaper than a new
/// `changed()` future per read.
async fn until_done(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

async fn connect(addr: SocketAddr, deadline: tokio::time::Instant) -> Result<TcpStream, String> {
    match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out".into()),
    }
}

async fn rtmp_player(
    target: Arc<RtmpTarget>,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
    seed: u64,
) -> PlayerResult {
    let mut res = PlayerResult::new(&shared);
    let deadline = tokio::time::Instant::now() + shared.connect_timeout;
    let mut sock = match connect(target.addr, deadline).await {
        Ok(s) => s,
        Err(e) => return res.end(&shared, e),
    };
    let mut conn = ClientConn::skimming(&target.app, &target.tc_url, &target.key, seed);
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    let done = until_done(done);
    tokio::pin!(done);
    loop {
        let p = shared.phase.load(Relaxed);
        if p == DONE {
            return res;
        }
        let measuring = p == MEASURING;
        while let Some(b) = conn.poll_transmit() {
            if let Err(e) = sock.write_all(&b).await {
                return res.end(&shared, format!("write: {e}"));
            }
        }
        let buf = conn.input_buffer();
        if buf.capacity() - buf.len() < READ_MIN {
            // Moves the unfinished chunk to the front of the same allocation.
            buf.reserve(2 * READ_MIN);
        }
        let wake = tokio::select! {
            biased;
            () = &mut done => Wake::Done,
            () = &mut timeout, if !res.connected => Wake::Timeout,
            r = sock.read_buf(conn.input_buffer()) => Wake::Io(r),
        };
        let n = match wake {
            Wake::Done => return res,
            Wake::Timeout => return res.end(&shared, "no NetStream.Play.Start in time".into()),
            Wake::Io(Ok(0)) => return res.end(&shared, "the server closed the connection".into()),
            Wake::Io(Ok(n)) => n,
            Wake::Io(Err(e)) => return res.end(&shared, format!("read: {e}")),
        };
        let now = Instant::now();
        if measuring {
            res.rec.wire_bytes += n as u64;
        }
        if let Err(e) = conn.handle_buffered(n) {
            return res.end(&shared, format!("RTMP: {e}"));
        }
        while let Some(ev) = conn.poll_event() {
            match ev {
                ClientEvent::Ready => res.started(&shared),
                ClientEvent::Media {
                    type_id,
                    timestamp,
                    length,
                    ..
                } => {
                    res.rec.media(type_id, timestamp, length, now, measuring);
                }
                ClientEvent::Refused(code) => {
                    return res.end(&shared, format!("play refused: {code}"));
                }
                ClientEvent::Ended => return res.end(&shared, "the stream ended".into()),
            }
        }
    }
}

thread_local! {
    /// The one read buffer of the HTTP-FLV players on this thread: nothing is kept in it
    /// between reads, so players can share it.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; 256 << 10].into_boxed_slice());
}

/// Asks a stream manager's subscribe lookup where to play; the FLV URL it answers, parsed.
async fn placed_flv_target(lookup: &str) -> anyhow::Result<HttpTarget> {
    let v: serde_json::Value = reqwest::Client::new()
        .get(lookup)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let url = v["urls"]["flv"]
        .as_str()
        .context("the placement has no urls.flv")?;
    let (mut t, host) = HttpTarget::parse(url)?;
    t.addr = resolve(&host, t.addr.port())?;
    Ok(t)
}

async fn flv_player(
    target: Arc<HttpTarget>,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
) -> PlayerResult {
    let mut res = PlayerResult::new(&shared);
    let deadline = tokio::time::Instant::now() + shared.connect_timeout;
    let mut sock = match connect(target.addr, deadline).await {
        Ok(s) => s,
        Err(e) => return res.end(&shared, e),
    };
    if let Err(e) = sock.write_all(target.request.as_bytes()).await {
        return res.end(&shared, format!("write: {e}"));
    }
    let mut skim = FlvSkimmer::new();
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    let done = until_done(done);
    tokio::pin!(done);
    loop {
        let p = shared.phase.load(Relaxed);
        if p == DONE {
            return res;
        }
        let measuring = p == MEASURING;
        let wake = tokio::select! {
            biased;
            () = &mut done => Wake::Done,
            () = &mut timeout, if !res.connected => Wake::Timeout,
            r = sock.readable() => Wake::Io(r),
        };
        match wake {
            Wake::Done => return res,
            Wake::Timeout => return res.end(&shared, "no HTTP response in time".into()),
            Wake::Io(Err(e)) => return res.end(&shared, format!("read: {e}")),
            Wake::Io(Ok(())) => {}
        }
        let now = Instant::now();
        let rec = &mut res.rec;
        let read = READ_BUF.with_borrow_mut(|buf| match sock.try_read(buf) {
            Ok(0) => Err("the server closed the connection".to_owned()),
            Ok(n) => {
                if measuring {
                    rec.wire_bytes += n as u64;
                }
                let mut on_tag =
                    |t: FlvTag| rec.media(t.tag_type, t.timestamp, t.size, now, measuring);
                skim.feed(&buf[..n], &mut on_tag).map_err(|e| e.to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        });
        if skim.status() == Some(200) {
            res.started(&shared);
        }
        if let Err(e) = read {
            return res.end(&shared, e);
        }
        if skim.finished() {
            return res.end(&shared, "the stream ended".into());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP-FLV skimmer (sans-IO)
// ---------------------------------------------------------------------------------------------

/// One FLV tag seen by [`FlvSkimmer`]; its body was skipped, not kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlvTag {
    /// 8 audio, 9 video, 18 script.
    pub tag_type: u8,
    /// Milliseconds (24 bits + 8 extension bits).
    pub timestamp: u32,
    /// Body length.
    pub size: u32,
}

/// Why an HTTP-FLV response cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkimError {
    /// The status line or headers are malformed or too long.
    Head(&'static str),
    /// The response's status is not 200.
    Status(u16),
    /// The chunked transfer coding is malformed.
    Chunk(&'static str),
    /// The FLV stream is malformed.
    Flv(&'static str),
}

impl fmt::Display for SkimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkimError::Head(why) => write!(f, "HTTP response head: {why}"),
            SkimError::Status(code) => write!(f, "HTTP status {code}"),
            SkimError::Chunk(why) => write!(f, "HTTP chunked body: {why}"),
            SkimError::Flv(why) => write!(f, "FLV stream: {why}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HttpPart {
    Head,
    Body,
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkPart {
    /// The chunk-size line: value so far, hex digits, in an extension, after its CR.
    Size {
        value: u64,
        digits: u8,
        ext: bool,
        cr: bool,
    },
    /// Chunk data bytes left.
    Data(u64),
    /// The CRLF after chunk data (whether the CR was seen).
    DataEnd { cr: bool },
    /// Trailer lines after the last chunk (length of the current line).
    Trailer { line: usize },
    /// The body ended.
    Finished,
}

const SIZE_LINE: ChunkPart = ChunkPart::Size {
    value: 0,
    digits: 0,
    ext: false,
    cr: false,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlvPart {
    /// Collecting the 9-byte file header.
    Header,
    /// Bytes to pass over (the rest of the file header, PreviousTagSize), then a tag header.
    Skip(u64),
    /// Collecting an 11-byte tag header.
    TagHeader,
    /// Body bytes of the current tag left to pass over.
    Payload(u32),
}

/// Longest response head accepted.
const MAX_HEAD: usize = 16 << 10;

/// Decodes an HTTP-FLV response as it arrives, in pieces of any size: the status line and
/// headers, `Transfer-Encoding: chunked` (or identity), and the FLV framing. It reports each
/// tag's type, timestamp and size once the tag's last byte has arrived, and keeps nothing of the
/// payloads: the only state is a few counters and the header bytes of the tag in progress.
pub struct FlvSkimmer {
    http: HttpPart,
    head: Vec<u8>,
    status: Option<u16>,
    chunked: bool,
    chunk: ChunkPart,
    flv: FlvPart,
    hdr: [u8; 11],
    have: usize,
    tag: FlvTag,
}

impl Default for FlvSkimmer {
    fn default() -> Self {
        Self::new()
    }
}

impl FlvSkimmer {
    /// A skimmer waiting for the response's status line.
    pub fn new() -> Self {
        Self {
            http: HttpPart::Head,
            head: Vec::with_capacity(512),
            status: None,
            chunked: false,
            chunk: SIZE_LINE,
            flv: FlvPart::Header,
            hdr: [0; 11],
            have: 0,
            tag: FlvTag::default(),
        }
    }

    /// The response's status code, once the head has arrived.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Whether a chunked body has ended (an identity body ends with the connection).
    pub fn finished(&self) -> bool {
        self.http == HttpPart::Finished
    }

    /// Consumes the next bytes of the response, calling `on_tag` for each tag completed in them.
    /// Bytes after the end of a chunked body are ignored.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        on_tag: &mut impl FnMut(FlvTag),
    ) -> Result<(), SkimError> {
        while self.http == HttpPart::Head {
            let Some((&b, rest)) = data.split_first() else {
                return Ok(());
            };
            data = rest;
            self.head.push(b);
            if self.head.ends_with(b"\r\n\r\n") || self.head.ends_with(b"\n\n") {
                self.parse_head()?;
            } else if self.head.len() > MAX_HEAD {
                return Err(SkimError::Head("longer than 16 KiB"));
            }
        }
        if self.http == HttpPart::Finished {
            return Ok(());
        }
        if !self.chunked {
            return self.skim_flv(data, on_tag);
        }
        while !data.is_empty() {
            match self.chunk {
                ChunkPart::Data(left) => {
                    let n = left.min(data.len() as u64) as usize;
                    let (now, rest) = data.split_at(n);
                    data = rest;
                    self.chunk = if left == n as u64 {
                        ChunkPart::DataEnd { cr: false }
                    } else {
                        ChunkPart::Data(left - n as u64)
                    };
                    self.skim_flv(now, on_tag)?;
                }
                ChunkPart::Finished => break,
                _ => {
                    self.chunk_byte(data[0])?;
                    data = &data[1..];
                }
            }
        }
        if self.chunk == ChunkPart::Finished {
            self.http = HttpPart::Finished;
        }
        Ok(())
    }

    fn parse_head(&mut self) -> Result<(), SkimError> {
        let text = std::str::from_utf8(&self.head).map_err(|_| SkimError::Head("not UTF-8"))?;
        let mut lines = text.lines();
        let mut status = lines.next().unwrap_or_default().split_whitespace();
        if !status.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
            return Err(SkimError::Head("no HTTP/1.x status line"));
        }
        let code = status
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or(SkimError::Head("bad status code"))?;
        self.status = Some(code);
        if code != 200 {
            return Err(SkimError::Status(code));
        }
        for line in lines {
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("transfer-encoding")
            {
                self.chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        self.http = HttpPart::Body;
        Ok(())
    }

    /// Advances the chunk framing outside chunk data by one byte.
    fn chunk_byte(&mut self, b: u8) -> Result<(), SkimError> {
        self.chunk = match self.chunk {
            ChunkPart::Size {
                value,
                digits,
                ext,
                cr,
            } => {
                if b == b'\n' {
                    if digits == 0 {
                        return Err(SkimError::Chunk("empty chunk size"));
                    }
                    if value == 0 {
                        ChunkPart::Trailer { line: 0 }
                    } else {
                        ChunkPart::Data(value)
                    }
                } else if cr {
                    return Err(SkimError::Chunk("CR without LF in chunk size line"));
                } else if b == b'\r' {
                    ChunkPart::Size {
                        value,
                        digits,
                        ext,
                        cr: true,
                    }
                } else if ext || matches!(b, b';' | b' ' | b'\t') {
                    ChunkPart::Size {
                        value,
                        digits,
                        ext: true,
                        cr,
                    }
                } else {
                    let d = (b as char)
                        .to_digit(16)
                        .ok_or(SkimError::Chunk("bad chunk size"))?;
                    if digits >= 15 {
                        return Err(SkimError::Chunk("chunk size too large"));
                    }
                    ChunkPart::Size {
                        value: value * 16 + u64::from(d),
                        digits: digits + 1,
                        ext,
                        cr,
                    }
                }
            }
            ChunkPart::DataEnd { cr } => match b {
                b'\r' if !cr => ChunkPart::DataEnd { cr: true },
                b'\n' => SIZE_LINE,
                _ => return Err(SkimError::Chunk("no CRLF after chunk data")),
            },
            ChunkPart::Trailer { line } => match b {
                b'\n' if line == 0 => ChunkPart::Finished,
                b'\n' => ChunkPart::Trailer { line: 0 },
                b'\r' => ChunkPart::Trailer { line },
                _ => ChunkPart::Trailer { line: line + 1 },
            },
            other => other,
        };
        Ok(())
    }

    /// Copies up to `want - have` bytes of `data` into the header scratch; true when full.
    fn collect(&mut self, data: &mut &[u8], want: usize) -> bool {
        let n = (want - self.have).min(data.len());
        self.hdr[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        *data = &data[n..];
        self.have == want
    }

    /// Walks FLV bytes of the body.
    fn skim_flv(
        &mut self,
        mut data: &[u8],
        on_tag: &mut impl FnMut(FlvTag),
    ) -> Result<(), SkimError> {
        while !data.is_empty() {
            match self.flv {
                FlvPart::Header => {
                    if self.collect(&mut data, 9) {
                        if &self.hdr[..3] != b"FLV" {
                            return Err(SkimError::Flv("no FLV signature"));
                        }
                        let offset = u32::from_be_bytes([
                            self.hdr[5],
                            self.hdr[6],
                            self.hdr[7],
                            self.hdr[8],
                        ]);
                        if offset < 9 {
                            return Err(SkimError::Flv("header shorter than 9 bytes"));
                        }
                        self.have = 0;
                        // The rest of the header, then PreviousTagSize0.
                        self.flv = FlvPart::Skip(u64::from(offset - 9) + 4);
                    }
                }
                FlvPart::Skip(left) => {
                    let n = left.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.flv = if n == left {
                        FlvPart::TagHeader
                    } else {
                        FlvPart::Skip(left - n)
                    };
                }
                FlvPart::TagHeader => {
                    if self.collect(&mut data, 11) {
                        let h = &self.hdr;
                        self.have = 0;
                        self.tag = FlvTag {
                            tag_type: h[0] & 0x1f,
                            size: u32::from_be_bytes([0, h[1], h[2], h[3]]),
                            timestamp: u32::from_be_bytes([h[7], h[4], h[5], h[6]]),
                        };
                        self.flv = FlvPart::Payload(self.tag.size);
                        if self.tag.size == 0 {
                            on_tag(self.tag);
                            self.flv = FlvPart::Skip(4);
                        }
                    }
                }
                FlvPart::Payload(left) => {
                    let n = left.min(data.len() as u32);
                    data = &data[n as usize..];
                    if n == left {
                        on_tag(self.tag);
                        self.flv = FlvPart::Skip(4);
                    } else {
                        self.flv = FlvPart::Payload(left - n);
                    }
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// /proc sampling
// ---------------------------------------------------------------------------------------------

/// The fields of /proc/PID/stat after the command name: `[0]` is field 3 (state).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(stat_path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    let f = stat_fields(&text)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `pid` and its children.
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if stat_fields(&text).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks and RSS of a server process and its children.
#[derive(Clone, Copy, Debug)]
struct ServerSample {
    ticks: u64,
    rss_kib: u64,
}

fn sample_server(pid: u32) -> Option<ServerSample> {
    let fam = family(pid);
    let ticks = fam
        .iter()
        .filter_map(|p| cpu_ticks(&format!("/proc/{p}/stat")))
        .sum();
    let rss_kib = fam.iter().filter_map(|p| rss_kib(*p)).sum();
    cpu_ticks(&format!("/proc/{pid}/stat"))?;
    Some(ServerSample { ticks, rss_kib })
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Busy ticks of the whole machine (all CPUs: everything but idle and iowait), from /proc/stat.
fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some(v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?)
}

/// CPUs of the machine (the `cpuN` lines of /proc/stat), which is what [`machine_busy_ticks`]
/// covers; unlike `available_parallelism` it does not shrink under `taskset`.
fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|t| {
            t.lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count()
        })
        .unwrap_or(0)
}

/// The machine's UDP `RcvbufErrors` and `SndbufErrors` (datagrams dropped because a socket's
/// receive or send buffer was full), from /proc/net/snmp.
fn udp_buffer_errors() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let get = |name: &str| {
        values
            .get(names.iter().position(|n| *n == name)?)?
            .parse()
            .ok()
    };
    Some((get("RcvbufErrors")?, get("SndbufErrors")?))
}

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn run(args: &Args) -> anyhow::Result<Report> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let valid = args.players() > 0
        && positive(args.duration)
        && positive(args.connect_rate)
        && positive(args.connect_timeout)
        && args.warmup.is_finite()
        && args.warmup >= 0.0;
    if !valid {
        bail!(
            "--players, --duration, --connect-rate and --connect-timeout must be positive, \
             --warmup not negative"
        );
    }
    let Setup {
        fixture,
        rtmp,
        flv,
        whep,
    } = Setup::new(args)?;
    if let Some(limit) = open_files_limit()
        && limit < args.players() as u64 + 64
    {
        log(format_args!(
            "warning: the open-files limit is {limit}, too low for {} players (raise `ulimit -n`; \
             a WHEP viewer holds a UDP socket, plus a TCP one while it POSTs)",
            args.players()
        ));
    }
    let rt = runtime(args.threads)?;
    rt.block_on(coordinate(args, fixture, rtmp, flv, whep))
}

/// What every run needs: the fixture and the parsed, resolved targets.
struct Setup {
    fixture: Arc<Fixture>,
    rtmp: Arc<RtmpTarget>,
    flv: Option<Arc<HttpTarget>>,
    whep: Option<Arc<whep::WhepTarget>>,
}

impl Setup {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let fixture = Arc::new(Fixture::load(&args.fixture)?);
        let (mut rtmp, rtmp_host) = RtmpTarget::parse(&args.rtmp_url)?;
        rtmp.addr = resolve(&rtmp_host, rtmp.addr.port())?;
        let rtmp = Arc::new(rtmp);
        let flv = match args.protocol {
            Protocol::Flv if args.subscribe_url.is_some() => None,
            Protocol::Flv => {
                let url = args
                    .flv_url
                    .as_deref()
                    .context("--protocol flv needs --flv-url")?;
                let (mut t, host) = HttpTarget::parse(url)?;
                t.addr = resolve(&host, t.addr.port())?;
                Some(Arc::new(t))
            }
            Protocol::Rtmp | Protocol::Whep | Protocol::Cluster => None,
        };
        let whep = match args.protocol {
            Protocol::Whep => {
                let url = args
                    .whep_url
                    .as_deref()
                    .context("--protocol whep needs --whep-url")?;
                let (mut t, host) = whep::WhepTarget::parse(url)?;
                t.resolve(resolve(&host, t.addr.port())?)?;
                t.gro = args.gro;
                Some(Arc::new(t))
            }
            _ => None,
        };
        Ok(Self {
            fixture,
            rtmp,
            flv,
            whep,
        })
    }
}

/// The players' runtime: one thread, or `threads` workers.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// One DTLS certificate for every WHEP viewer: a key generation per viewer would cost this tool
/// CPU and change nothing for the server.
fn viewer_cert() -> anyhow::Result<str0m::crypto::dtls::DtlsCert> {
    str0m::crypto::from_feature_flags()
        .dtls_provider
        .generate_certificate()
        .context("generating the viewers' DTLS certificate")
}

/// Starts the publisher unless `--no-publish` and lets the server see a keyframe; `t0` (see
/// [`start_publisher`]).
async fn start_publishing(
    args: &Args,
    rtmp: &Arc<RtmpTarget>,
    fixture: &Arc<Fixture>,
    stats: &Arc<PublisherStats>,
) -> anyhow::Result<Option<Instant>> {
    if args.no_publish {
        return Ok(None);
    }
    let t0 = start_publisher(
        rtmp.clone(),
        fixture.clone(),
        args.ts_base_ms,
        stats.clone(),
    )?;
    log(format_args!(
        "publishing {} to {} ({:.0} kbit/s, loop of {} ms)",
        args.fixture.display(),
        args.rtmp_url,
        fixture.media_bps / 1000.0,
        fixture.period_ms
    ));
    // Let the server see a keyframe and settle before measuring its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Some(t0))
}

async fn coordinate(
    args: &Args,
    fixture: Arc<Fixture>,
    rtmp: Arc<RtmpTarget>,
    flv: Option<Arc<HttpTarget>>,
    whep: Option<Arc<whep::WhepTarget>>,
) -> anyhow::Result<Report> {
    let cert = whep.as_ref().map(|_| viewer_cert()).transpose()?;
    let clk_tck = clock_ticks_per_second();
    let pub_stats = Arc::new(PublisherStats::default());
    let t0 = start_publishing(args, &rtmp, &fixture, &pub_stats).await?;
    let server_before = args.server_pid.and_then(sample_server);
    if args.server_pid.is_some() && server_before.is_none() {
        bail!(
            "cannot read /proc/{}/stat",
            args.server_pid.unwrap_or_default()
        );
    }

    let shared = Arc::new(Shared {
        phase: AtomicU8::new(CONNECTING),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        t0,
        base_ms: args.ts_base_ms,
        lag_capacity: (fixture.video_fps * args.duration * 1.25) as usize + 64,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
    });
    // Players read the phase from `shared`; `done_tx` also wakes those waiting for data.
    let (done_tx, done_rx) = watch::channel(false);
    let mut handles = Vec::with_capacity(args.players());
    let start = tokio::time::Instant::now();
    let mut last_log = Instant::now();
    for i in 0..args.players() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / args.connect_rate))
            .await;
        let (sh, done) = (shared.clone(), done_rx.clone());
        handles.push(match (&flv, &whep, &cert) {
            _ if args.subscribe_url.is_some() && args.protocol == Protocol::Flv => {
                let url = args.subscribe_url.clone().unwrap_or_default();
                tokio::spawn(async move {
                    match placed_flv_target(&url).await {
                        Ok(t) => flv_player(Arc::new(t), sh, done).await,
                        Err(e) => PlayerResult::new(&sh).end(&sh, format!("placement: {e:#}")),
                    }
                })
            }
            (Some(t), _, _) => tokio::spawn(flv_player(t.clone(), sh, done)),
            (_, Some(t), Some(cert)) => tokio::spawn(whep::whep_player(
                t.clone(),
                cert.clone(),
                sh,
                done,
                whep::Stay::UntilDone,
            )),
            _ => tokio::spawn(rtmp_player(rtmp.clone(), sh, done, i as u64)),
        });
        if last_log.elapsed() >= Duration::from_secs(2) {
            last_log = Instant::now();
            let (c, f) = shared_counts(&shared);
            log(format_args!(
                "started {}/{} players: {c} playing, {f} failed",
                i + 1,
                args.players()
            ));
        }
    }
    let give_up = Instant::now() + shared.connect_timeout + Duration::from_secs(1);
    loop {
        let (c, f) = shared_counts(&shared);
        if c + f >= args.players() || Instant::now() >= give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (c, f) = shared_counts(&shared);
    log(format_args!(
        "{c} of {} players playing, {f} failed; warming up {} s, then measuring {} s",
        args.players(),
        args.warmup,
        args.duration
    ));
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    // The window.
    let self_before = cpu_ticks("/proc/self/stat");
    let machine_before = machine_busy_ticks();
    let udp_before = udp_buffer_errors();
    let cpu_before = args.server_pid.and_then(sample_server);
    let pub_bytes_before = pub_stats.media_bytes.load(Relaxed);
    pub_stats.late_max_us.store(0, Relaxed);
    let window_start = Instant::now();
    shared.phase.store(MEASURING, Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    shared.phase.store(DONE, Relaxed);
    done_tx.send_replace(true);
    let window = window_start.elapsed().as_secs_f64();
    let self_after = cpu_ticks("/proc/self/stat");
    let machine_after = machine_busy_ticks();
    let udp_after = udp_buffer_errors();
    let server_after = args.server_pid.and_then(sample_server);
    let pub_bytes = pub_stats.media_bytes.load(Relaxed) - pub_bytes_before;
    let pub_late_ms = pub_stats.late_max_us.load(Relaxed) as f64 / 1000.0;
    let pub_error = pub_stats
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();

    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => results.push(r),
            Err(e) => log(format_args!("a player task failed: {e}")),
        }
    }
    let cpu = |before: Option<u64>, after: Option<u64>| {
        Some(after?.saturating_sub(before?) as f64 / clk_tck / window)
    };
    let server = match (server_before, cpu_before, server_after) {
        (Some(b), Some(c), Some(a)) => Some(ServerCost {
            cpu_cores: cpu(Some(c.ticks), Some(a.ticks)).unwrap_or_default(),
            rss_before_kib: b.rss_kib,
            rss_after_kib: a.rss_kib,
        }),
        _ => None,
    };
    Ok(Report::build(ReportInput {
        args,
        fixture: &fixture,
        results,
        window,
        published_actual_bps: pub_bytes as f64 * 8.0 / window,
        publisher_late_ms: (!args.no_publish).then_some(pub_late_ms),
        publisher_error: pub_error,
        server,
        tool_cpu_cores: cpu(self_before, self_after),
        machine_cpu_cores: cpu(machine_before, machine_after),
        udp_buffer_errors: udp_before
            .zip(udp_after)
            .map(|(b, a)| (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))),
    }))
}

fn shared_counts(shared: &Shared) -> (usize, usize) {
    (shared.connected.load(Relaxed), shared.failed.load(Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// The server's spending over the window.
struct ServerCost {
    cpu_cores: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

struct ReportInput<'a> {
    args: &'a Args,
    fixture: &'a Fixture,
    results: Vec<PlayerResult>,
    window: f64,
    published_actual_bps: f64,
    publisher_late_ms: Option<f64>,
    publisher_error: Option<String>,
    server: Option<ServerCost>,
    tool_cpu_cores: Option<f64>,
    machine_cpu_cores: Option<f64>,
    /// Machine-wide UDP receive / send buffer drops in the window.
    udp_buffer_errors: Option<(u64, u64)>,
}

/// Min / p50 / mean.
#[derive(Debug, Default)]
struct Spread {
    min: f64,
    p50: f64,
    mean: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Lag percentiles in milliseconds.
#[derive(Debug)]
struct LagSummary {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    samples: usize,
}

/// The measurements of one run.
struct Report {
    protocol: Protocol,
    url: String,
    window_s: f64,
    warmup_s: f64,
    requested: usize,
    connected: usize,
    keeping_up: usize,
    disconnected: usize,
    failed: usize,
    published_kbps: f64,
    published_actual_kbps: Option<f64>,
    publisher_late_ms: Option<f64>,
    publisher_error: Option<String>,
    received_kbps: Spread,
    wire_kbps_mean: f64,
    video_fps_mean: f64,
    lag: Option<LagSummary>,
    lag_absolute: usize,
    lag_calibrated: usize,
    lag_limit_ms: u32,
    server: Option<ServerCost>,
    tool_cpu_cores: Option<f64>,
    machine_cpu_cores: Option<f64>,
    errors: Vec<(String, usize)>,
    whep: Option<whep::Summary>,
}

impl Report {
    fn build(mut input: ReportInput<'_>) -> Self {
        let args = input.args;
        let window = input.window;
        let target = input.fixture.media_bps * 0.9;
        let limit_us = args.lag_limit_ms * 1000;
        let mut bitrates = Vec::new();
        let (mut wire, mut frames) = (0.0, 0.0);
        let (mut keeping_up, mut disconnected, mut failed) = (0, 0, 0);
        let (mut absolute, mut calibrated) = (0, 0);
        let mut errors: Vec<(String, usize)> = Vec::new();
        let mut all_lags: Vec<u32> = Vec::new();
        for r in &mut input.results {
            if let Some(e) = &r.error {
                match errors.iter_mut().find(|(m, _)| m == e) {
                    Some((_, n)) => *n += 1,
                    None => errors.push((e.clone(), 1)),
                }
            }
            if !r.connected {
                failed += 1;
                continue;
            }
            disconnected += usize::from(r.disconnected);
            let bps = r.rec.media_bytes as f64 * 8.0 / window;
            bitrates.push(bps);
            wire += r.rec.wire_bytes as f64 * 8.0 / window;
            frames += f64::from(r.rec.video_frames) / window;
            match r.rec.method {
                LagMethod::Absolute => absolute += 1,
                LagMethod::Calibrated { .. } | LagMethod::Calibrating { .. } => calibrated += 1,
                LagMethod::Unknown => {}
            }
            r.rec.lags_us.sort_unstable();
            let lag_ok = args.no_publish
                || percentile(&r.rec.lags_us, 99.0).is_some_and(|p99| p99 <= limit_us);
            let frames_ok = r
                .whep
                .as_ref()
                .is_none_or(|w| w.video_window.frames_lost() == 0);
            if !r.disconnected && bps >= target && lag_ok && frames_ok {
                keeping_up += 1;
            }
            all_lags.extend_from_slice(&r.rec.lags_us);
        }
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        errors.truncate(8);
        all_lags.sort_unstable();
        let ms = |p: f64| f64::from(percentile(&all_lags, p).unwrap_or_default()) / 1000.0;
        let lag = (!all_lags.is_empty()).then(|| LagSummary {
            p50: ms(50.0),
            p95: ms(95.0),
            p99: ms(99.0),
            max: ms(100.0),
            samples: all_lags.len(),
        });
        let n = bitrates.len();
        bitrates.sort_by(f64::total_cmp);
        let received_kbps = Spread {
            min: bitrates.first().copied().unwrap_or_default() / 1000.0,
            p50: percentile(&bitrates, 50.0).unwrap_or_default() / 1000.0,
            mean: bitrates.iter().fold(0.0, |a, b| a + b) / n.max(1) as f64 / 1000.0,
        };
        let whep = (args.protocol == Protocol::Whep)
            .then(|| whep::Summary::build(&input.results, window, input.udp_buffer_errors));
        Self {
            protocol: args.protocol,
            url: match args.protocol {
                Protocol::Rtmp => args.rtmp_url.clone(),
                Protocol::Flv => args.flv_url.clone().unwrap_or_default(),
                Protocol::Whep => args.whep_url.clone().unwrap_or_default(),
                Protocol::Cluster => args.relay.clone().unwrap_or_default(),
            },
            window_s: window,
            warmup_s: args.warmup,
            requested: args.players(),
            connected: n,
            keeping_up,
            disconnected,
            failed,
            published_kbps: input.fixture.media_bps / 1000.0,
            published_actual_kbps: (!args.no_publish)
                .then_some(input.published_actual_bps / 1000.0),
            publisher_late_ms: input.publisher_late_ms,
            publisher_error: input.publisher_error,
            received_kbps,
            wire_kbps_mean: wire / n.max(1) as f64 / 1000.0,
            video_fps_mean: frames / n.max(1) as f64,
            lag,
            lag_absolute: absolute,
            lag_calibrated: calibrated,
            lag_limit_ms: args.lag_limit_ms,
            server: input.server,
            tool_cpu_cores: input.tool_cpu_cores,
            machine_cpu_cores: input.machine_cpu_cores,
            errors,
            whep,
        }
    }

    /// Players served through the whole window (the denominator of per-player costs).
    fn served(&self) -> usize {
        self.connected - self.disconnected
    }

    fn server_per_player(&self) -> Option<(f64, f64)> {
        let s = self.server.as_ref()?;
        let n = self.served().max(1) as f64;
        let kib = (s.rss_after_kib as f64 - s.rss_before_kib as f64) / self.connected.max(1) as f64;
        Some((s.cpu_cores * 1e6 / n, kib))
    }

    fn to_json(&self) -> serde_json::Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        let per_player = self.server_per_player();
        json!({
            "protocol": match self.protocol {
                Protocol::Rtmp => "rtmp",
                Protocol::Flv => "flv",
                Protocol::Whep => "whep",
                Protocol::Cluster => "cluster",
            },
            "url": self.url,
            "window_s": r1(self.window_s),
            "warmup_s": self.warmup_s,
            "players": {
                "requested": self.requested,
                "connected": self.connected,
                "keeping_up": self.keeping_up,
                "disconnected": self.disconnected,
                "failed": self.failed,
            },
            "published_kbps": r1(self.published_kbps),
            "published_actual_kbps": self.published_actual_kbps.map(r1),
            "publisher_late_max_ms": self.publisher_late_ms.map(r1),
            "publisher_error": self.publisher_error,
            "received_kbps": {
                "min": r1(self.received_kbps.min),
                "p50": r1(self.received_kbps.p50),
                "mean": r1(self.received_kbps.mean),
                "wire_mean": r1(self.wire_kbps_mean),
            },
            "video_fps_mean": r1(self.video_fps_mean),
            "lag_ms": self.lag.as_ref().map(|l| json!({
                "p50": r1(l.p50), "p95": r1(l.p95), "p99": r1(l.p99), "max": r1(l.max),
                "samples": l.samples,
                "limit": self.lag_limit_ms,
                "players_absolute": self.lag_absolute,
                "players_calibrated": self.lag_calibrated,
            })),
            "server": self.server.as_ref().map(|s| json!({
                "cpu_cores": r3(s.cpu_cores),
                "cpu_us_per_player_s": per_player.map(|p| r1(p.0)),
                "rss_before_kib": s.rss_before_kib,
                "rss_after_kib": s.rss_after_kib,
                "kib_per_player": per_player.map(|p| r1(p.1)),
            })),
            "load_tool_cpu_cores": self.tool_cpu_cores.map(r3),
            "machine_cpu_cores": self.machine_cpu_cores.map(r3),
            "machine_cpus": machine_cpus(),
            "errors": self.errors.iter().map(|(e, n)| json!({"error": e, "players": n})).collect::<Vec<_>>(),
            "whep": self.whep.as_ref().map(whep::Summary::to_json),
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "castnode-load: {} players of {}",
            self.protocol.name(),
            self.url
        )?;
        writeln!(
            f,
            "  window             {:.1} s after {:.1} s of warmup",
            self.window_s, self.warmup_s
        )?;
        writeln!(
            f,
            "  players            {} requested, {} connected, {} keeping up, {} disconnected, {} failed",
            self.requested, self.connected, self.keeping_up, self.disconnected, self.failed
        )?;
        write!(
            f,
            "  published          {:.0} kbit/s (fixture)",
            self.published_kbps
        )?;
        if let (Some(a), Some(l)) = (self.published_actual_kbps, self.publisher_late_ms) {
            write!(
                f,
                "; {a:.0} kbit/s sent in the window, writes at most {l:.1} ms late"
            )?;
        }
        writeln!(f)?;
        if let Some(e) = &self.publisher_error {
            writeln!(f, "  publisher error    {e}")?;
        }
        let r = &self.received_kbps;
        writeln!(
            f,
            "  received/player    min {:.0}, p50 {:.0}, mean {:.0} kbit/s of media ({:.0} on the wire), {:.1} video fps",
            r.min, r.p50, r.mean, self.wire_kbps_mean, self.video_fps_mean
        )?;
        match &self.lag {
            Some(l) => writeln!(
                f,
                "  lag (video)        p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1} ms over {} frames (limit p99 {} ms); \
                 {} players absolute, {} calibrated",
                l.p50,
                l.p95,
                l.p99,
                l.max,
                l.samples,
                self.lag_limit_ms,
                self.lag_absolute,
                self.lag_calibrated
            )?,
            None => writeln!(f, "  lag (video)        not measured")?,
        }
        if let (Some(s), Some((us, kib))) = (&self.server, self.server_per_player()) {
            writeln!(
                f,
                "  server             {:.3} cores = {us:.1} us/player/s; RSS {} -> {} KiB = {kib:.1} KiB/player",
                s.cpu_cores, s.rss_before_kib, s.rss_after_kib
            )?;
        }
        if let Some(c) = self.tool_cpu_cores {
            write!(f, "  load tool          {c:.3} cores")?;
            if let Some(m) = self.machine_cpu_cores {
                let cpus = machine_cpus();
                write!(
                    f,
                    "; the machine was {m:.3} of {cpus} cores busy (all processes, interrupts)"
                )?;
            }
            writeln!(f)?;
        }
        if let Some(w) = &self.whep {
            write!(f, "{w}")?;
        }
        for (e, n) in &self.errors {
            writeln!(f, "  error              {n} players: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An FLV stream: file header, then `(type, timestamp, size)` tags with junk payloads that
    /// look like framing (CRLFs, "FLV", hex digits) to prove payloads are not parsed.
    fn flv_stream(tags: &[(u8, u32, usize)]) -> Vec<u8> {
        let mut out = vec![b'F', b'L', b'V', 1, 5, 0, 0, 0, 9, 0, 0, 0, 0];
        for &(t, ts, size) in tags {
            out.push(t);
            out.extend_from_slice(&(size as u32).to_be_bytes()[1..]);
            out.extend_from_slice(&(ts & 0xFF_FFFF).to_be_bytes()[1..]);
            out.push((ts >> 24) as u8);
            out.extend_from_slice(&[0, 0, 0]);
            out.extend((0..size).map(|i| b"\r\nFLV0a;\n"[i % 9]));
            out.extend_from_slice(&(size as u32 + 11).to_be_bytes());
        }
        out
    }

    /// `body` in chunks of varying sizes, with extensions, upper- and lower-case hex, a trailer.
    fn chunked(body: &[u8]) -> Vec<u8> {
        let sizes = [1usize, 7, 300, 2, 4096, 13, 11];
        let mut out = Vec::new();
        let (mut pos, mut i) = (0, 0);
        while pos < body.len() {
            let n = sizes[i % sizes.len()].min(body.len() - pos);
            match i % 3 {
                0 => out.extend_from_slice(format!("{n:x}\r\n").as_bytes()),
                1 => out.extend_from_slice(format!("{n:X};name=value\r\n").as_bytes()),
                _ => out.extend_from_slice(format!("{n:04x} \r\n").as_bytes()),
            }
            out.extend_from_slice(&body[pos..pos + n]);
            out.extend_from_slice(b"\r\n");
            pos += n;
            i += 1;
        }
        out.extend_from_slice(b"0\r\nX-Trailer: yes\r\n\r\n");
        out
    }

    const HEAD_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: video/x-flv\r\n\
        Transfer-Encoding: chunked\r\ncache-control: no-cache\r\n\r\n";
    const HEAD_IDENTITY: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: video/x-flv\r\nConnection: close\r\n\r\n";

    fn tags() -> Vec<(u8, u32, usize)> {
        vec![
            (18, 0, 40),
            (9, 0, 0),
            (8, 0, 1),
            (9, 33, 5000),
            (8, 21, 300),
            (9, 66, 11),
            (9, 0x0123_4567, 20),
        ]
    }

    fn expected() -> Vec<FlvTag> {
        tags()
            .into_iter()
            .map(|(tag_type, timestamp, size)| FlvTag {
                tag_type,
                timestamp,
                size: size as u32,
            })
            .collect()
    }

    fn feed_parts(parts: &[&[u8]]) -> (FlvSkimmer, Vec<FlvTag>) {
        let mut s = FlvSkimmer::new();
        let mut seen = Vec::new();
        for p in parts {
            s.feed(p, &mut |t| seen.push(t)).unwrap();
        }
        (s, seen)
    }

    #[test]
    fn chunked_flv_split_at_every_position() {
        let mut response = HEAD_CHUNKED.to_vec();
        response.extend(chunked(&flv_stream(&tags())));
        for i in 0..=response.len() {
            let (s, seen) = feed_parts(&[&response[..i], &response[i..]]);
            assert_eq!(seen, expected(), "split at {i}");
            assert_eq!(s.status(), Some(200));
            assert!(s.finished(), "split at {i}");
        }
    }

    #[test]
    fn chunked_flv_byte_by_byte_and_trailing_bytes_ignored() {
        let mut response = HEAD_CHUNKED.to_vec();
        response.extend(chunked(&flv_stream(&tags())));
        let bytes: Vec<&[u8]> = response.chunks(1).collect();
        let (mut s, seen) = feed_parts(&bytes);
        assert_eq!(seen, expected());
        assert!(s.finished());
        s.feed(b"garbage", &mut |_| panic!("no tags after the end"))
            .unwrap();
    }

    #[test]
    fn identity_flv_split_at_every_position() {
        let mut response = HEAD_IDENTITY.to_vec();
        response.extend(flv_stream(&tags()));
        for i in 0..=response.len() {
            let (s, seen) = feed_parts(&[&response[..i], &response[i..]]);
            assert_eq!(seen, expected(), "split at {i}");
            assert!(!s.finished());
        }
    }

    #[test]
    fn tag_reported_only_when_complete() {
        let mut response = HEAD_IDENTITY.to_vec();
        response.extend(flv_stream(&[(9, 7, 100)]));
        let cut = response.len() - 4 - 1; // one body byte and PreviousTagSize missing
        let (_, seen) = feed_parts(&[&response[..cut]]);
        assert!(seen.is_empty());
        let (_, seen) = feed_parts(&[&response[..cut], &response[cut..cut + 1]]);
        assert_eq!(
            seen,
            vec![FlvTag {
                tag_type: 9,
                timestamp: 7,
                size: 100
            }]
        );
    }

    #[test]
    fn errors() {
        let mut s = FlvSkimmer::new();
        let r = s.feed(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n",
            &mut |_| {},
        );
        assert_eq!((r, s.status()), (Err(SkimError::Status(404)), Some(404)));

        let mut s = FlvSkimmer::new();
        let mut bad = HEAD_CHUNKED.to_vec();
        bad.extend_from_slice(b"zz\r\n");
        assert_eq!(
            s.feed(&bad, &mut |_| {}),
            Err(SkimError::Chunk("bad chunk size"))
        );

        let mut s = FlvSkimmer::new();
        let mut bad = HEAD_CHUNKED.to_vec();
        bad.extend_from_slice(b"3\r\nFLVxx");
        assert_eq!(
            s.feed(&bad, &mut |_| {}),
            Err(SkimError::Chunk("no CRLF after chunk data"))
        );

        let mut s = FlvSkimmer::new();
        let mut bad = HEAD_IDENTITY.to_vec();
        bad.extend_from_slice(b"GIF89a\0\0\0\0\0\0");
        assert_eq!(
            s.feed(&bad, &mut |_| {}),
            Err(SkimError::Flv("no FLV signature"))
        );

        let mut s = FlvSkimmer::new();
        assert_eq!(
            s.feed(b"SSH-2.0-OpenSSH\r\n\r\n", &mut |_| {}),
            Err(SkimError::Head("no HTTP/1.x status line"))
        );

        let mut s = FlvSkimmer::new();
        assert_eq!(
            s.feed(&vec![b'a'; MAX_HEAD + 1], &mut |_| {}),
            Err(SkimError::Head("longer than 16 KiB"))
        );
    }

    #[test]
    fn lag_absolute_and_calibrated() {
        let t0 = Instant::now();
        let base = 60_000;
        // Absolute: timestamp base + 1000 arriving 1.025 s after t0 is 25 ms late.
        let mut r = Recorder::new(Some(t0), base, 8);
        r.media(9, base + 1000, 10, t0 + Duration::from_millis(1025), true);
        r.media(8, base + 1000, 5, t0 + Duration::from_millis(1030), true);
        assert_eq!(r.method, LagMethod::Absolute);
        assert_eq!(
            (r.lags_us.as_slice(), r.media_bytes, r.video_frames),
            (&[25_000u32][..], 15, 1)
        );
        // Outside the window: counted nowhere.
        r.media(9, base + 1033, 10, t0 + Duration::from_millis(1040), false);
        assert_eq!((r.lags_us.len(), r.media_bytes), (1, 15));

        // Rebased to 0 by the server: calibrated on the first second's smallest now - ts.
        let mut r = Recorder::new(Some(t0), base, 8);
        let at = |ms| t0 + Duration::from_millis(ms);
        r.media(9, 0, 1, at(5_040), true); // raw = 5040 + 60000 - 0: rebased
        assert!(matches!(r.method, LagMethod::Calibrating { .. }));
        r.media(9, 33, 1, at(5_063), true); // now - ts = 5030: the minimum
        r.media(9, 66, 1, at(5_100), true);
        assert!(r.lags_us.is_empty());
        r.media(9, 1000, 1, at(6_050), true); // first second over: 6050 - 1000 - 5030 = 20 ms
        assert_eq!(
            r.method,
            LagMethod::Calibrated {
                offset_us: 65_030_000
            }
        );
        r.media(9, 1033, 1, at(6_100), true);
        assert_eq!(r.lags_us, vec![20_000, 37_000]);
    }

    #[test]
    fn classify_tags() {
        assert_eq!(classify(TAG_VIDEO, &[0x17, 0, 0, 0, 0, 1]), Some(true));
        assert_eq!(classify(TAG_VIDEO, &[0x27, 1, 0, 0, 0, 1]), Some(false));
        assert_eq!(classify(TAG_VIDEO, &[0x17, 2, 0, 0, 0]), None);
        assert_eq!(
            classify(TAG_VIDEO, &[0x90, b'h', b'v', b'c', b'1']),
            Some(true)
        );
        assert_eq!(classify(TAG_VIDEO, &[0x92, b'h', b'v', b'c', b'1']), None);
        assert_eq!(
            classify(TAG_VIDEO, &[0x93, b'a', b'v', b'0', b'1']),
            Some(false)
        );
        assert_eq!(classify(TAG_AUDIO, &[0xAF, 0, 0x11, 0x90]), Some(true));
        assert_eq!(classify(TAG_AUDIO, &[0xAF, 1, 0x21]), Some(false));
        assert_eq!(classify(TAG_AUDIO, &[]), None);
    }

    #[test]
    fn fixture_loop_period_and_bitrate() {
        let tag = |tag_type, ts_ms, body: &'static [u8]| RawTag {
            tag_type,
            ts_ms,
            body: Bytes::from_static(body),
        };
        let meta = amf0::encode_all(&[Amf0::String("onMetaData".into()), Amf0::EcmaArray(vec![])])
            .freeze();
        let mut tags = vec![
            RawTag {
                tag_type: TAG_SCRIPT,
                ts_ms: 0,
                body: meta,
            },
            tag(TAG_VIDEO, 0, &[0x17, 0, 0, 0, 0, 1, 2]),
            tag(TAG_AUDIO, 0, &[0xAF, 0, 0x11, 0x90]),
        ];
        // 30 video frames of 100 bytes over 1 s, 47 audio frames of 10 bytes.
        static V: [u8; 100] = [0x27; 100];
        static A: [u8; 10] = [0xAF; 10];
        tags.extend((0..30).map(|i| tag(TAG_VIDEO, i * 1000 / 30, &V)));
        tags.extend((0..47).map(|i| tag(TAG_AUDIO, i * 1024 * 1000 / 48_000, &A)));
        tags.push(tag(TAG_VIDEO, 1000, &[0x17, 2, 0, 0, 0]));
        let f = Fixture::from_tags(tags.into_iter()).unwrap();
        assert!(f.metadata.is_some());
        assert_eq!(f.tags.iter().filter(|t| t.config).count(), 2);
        assert_eq!(f.tags.len(), 2 + 30 + 47); // the end of sequence is dropped
        // Video: 0..=966 step 33 → 999; audio: 0..=981 step 21 → 1002.
        assert_eq!(f.period_ms, 1002);
        assert!((f.media_bps - 3470.0 * 8.0 / 1.002).abs() < 1e-6);
        assert!((f.video_fps - 30.0 / 1.002).abs() < 1e-9);
    }

    #[test]
    fn urls() {
        let (t, host) = RtmpTarget::parse("rtmp://127.0.0.1:29350/live/load").unwrap();
        assert_eq!(
            (host.as_str(), t.app.as_str(), t.key.as_str()),
            ("127.0.0.1", "live", "load")
        );
        assert_eq!(
            (t.tc_url.as_str(), t.addr.port()),
            ("rtmp://127.0.0.1:29350/live", 29350)
        );
        assert_eq!(RtmpTarget::parse("rtmp://h/live/a/b").unwrap().0.key, "a/b");
        assert!(RtmpTarget::parse("rtmp://h:1935/live").is_err());
        assert!(RtmpTarget::parse("http://h/live/x").is_err());
        let (t, host) = HttpTarget::parse("http://localhost:28080/live/load.flv").unwrap();
        assert_eq!((host.as_str(), t.addr.port()), ("localhost", 28080));
        assert!(
            t.request
                .starts_with("GET /live/load.flv HTTP/1.1\r\nHost: localhost:28080\r\n")
        );
        assert!(t.request.ends_with("\r\n\r\n"));
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
    }

    #[test]
    fn proc_stat_fields() {
        let stat = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 1 0";
        let f = stat_fields(stat).unwrap();
        assert_eq!((f[0], f[1], f[11], f[12]), ("S", "1", "250", "75"));
        assert!(cpu_ticks("/proc/self/stat").is_some());
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
