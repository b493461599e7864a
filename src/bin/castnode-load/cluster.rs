//! Simulated edges (`--protocol cluster`): load on a relay's cluster link, and the latency each
//! hop adds.
//!
//! # What runs
//!
//! - **Publishers.** `--broadcasts M` broadcasts are published over RTMP to the origin
//!   (`--rtmp-url rtmp://host:port/app/key`): the key itself when M is 1, else `key-0` …
//!   `key-{M-1}`. All publishers share one thread (a current-thread runtime of their own, as in
//!   the other modes); each is the same real-time loop of `--fixture`. Their starts are spread
//!   evenly over [`START_SPREAD`] so the broadcasts' keyframes do not all fall at once.
//! - **Simulated edges.** `--edges N` (also `--players N`) edges, each a real
//!   [`castnode::cluster::link::Link`] of role `edge` with a node context and hub of its own, its
//!   own UDP socket and QUIC connection to `--relay`, and the cluster token `--cluster-token`.
//!   Each edge calls [`Link::subscribe`] for its broadcasts and reads the returned hub consumer
//!   as a player would: that is an edge with one player per broadcast, so it keeps its upstream
//!   subscription. Subscriptions are laid out as `edge k mod N` takes `broadcast k mod M` for
//!   `k` in `0..max(N, M)`: 100 edges and one broadcast is 100 edges of that broadcast; 200 and
//!   200 is one broadcast per edge; 20 edges and 200 broadcasts is 10 broadcasts per edge (over
//!   that edge's one connection).
//! - **Reference** (`--reference HOST:PORT`, the origin's cluster address): one more `Link` that
//!   subscribes every broadcast straight from the origin, one hop. A frame's arrival at an edge
//!   (two hops: origin → relay → edge) minus its arrival at the reference (one hop) is the
//!   latency the relay's hop added to that frame, both times read from the same clock.
//!
//! # What is measured
//!
//! - **Frame age** at each simulated edge, exactly: the wall clock when the consumer read the
//!   frame from the edge's hub minus the frame's origin ingest time (`Entry::ingest_us`, carried
//!   over the link unchanged). Every frame counts, audio and video.
//! - **Added latency of the relay hop, exactly**, with `--reference`: per frame, arrival at the
//!   edge minus arrival at the reference (frames matched by track and dts).
//! - **From histograms**, for comparison: the relay's `castnode_cluster_latency_seconds` (from
//!   `--relay-metrics`) and the edges' own `ClusterStats::latency`, both over the window only
//!   (bucket counts at the window's end minus those at its start), with quantiles interpolated
//!   linearly inside a bucket as Prometheus' `histogram_quantile` does. The buckets are coarse
//!   (1, 2, 5, 10 ms …), so these are approximations; the difference of the two is the hop.
//! - **Relay cost**: its CPU over the window (`--server-pid`, the relay's process id) and its
//!   `castnode_cluster_bytes_out_total` / `_bytes_in_total` deltas (group stream bytes: frame
//!   headers and payloads, without QUIC's own overhead): forwarded Gbit/s per core; and its CPU
//!   per frame copy (CPU time over the window ÷ frames the edges read in it), since the relay's
//!   cost follows frames rather than bytes.
//! - A subscription **keeps up** when it stayed subscribed, received at least 90 % of the
//!   fixture's media bitrate, its consumer never had to skip, and its frames' p99 age is at most
//!   `--lag-limit-ms`. An edge keeps up when all its subscriptions do.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use castnode::cluster::link::{Link, StaticUpstreams};
use castnode::config::NodeArgs;
use castnode::media::hub::wall_clock_us;
use castnode::media::{Item, ReadOutcome};
use castnode::node::NodeContext;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    Args, CONNECTING, DONE, Fixture, MEASURING, PublisherStats, RtmpTarget, clock_ticks_per_second,
    cpu_ticks, log, machine_busy_ticks, machine_cpus, open_files_limit, percentile, publish,
    resolve, sample_server, split_host_port, until_done,
};

/// Publishers' starts are spread over this long (about one GOP of the fixtures).
pub const START_SPREAD: Duration = Duration::from_secs(2);

/// One frame as a consumer read it.
#[derive(Clone, Copy, Debug)]
struct Sample {
    track: u8,
    dts: i64,
    ingest_us: i64,
    /// Wall clock when the consumer read it, microseconds since the UNIX epoch.
    arrival_us: i64,
}

/// What every reader needs to know.
struct Shared {
    phase: AtomicU8,
    /// Subscriptions answered, and those that failed.
    subscribed: AtomicUsize,
    failed: AtomicUsize,
    connect_timeout: Duration,
}

/// What a reader (one subscription of one edge) hands back.
#[derive(Default)]
struct SubResult {
    edge: usize,
    broadcast: usize,
    subscribed: bool,
    /// The broadcast ended (or the consumer stopped) before the run did.
    ended: bool,
    error: Option<String>,
    /// Frames the consumer had to skip, in the window and before it.
    skipped_window: u64,
    skipped_before: u64,
    media_bytes: u64,
    frames: u64,
    /// Every frame read (filtered to the window later).
    samples: Vec<Sample>,
}

/// A simulated edge: its link, for its counters.
struct Edge {
    link: Arc<Link>,
}

/// The broadcasts each edge subscribes: edge `k mod n` takes broadcast `k mod m`.
fn layout(edges: usize, broadcasts: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); edges];
    for k in 0..edges.max(broadcasts) {
        out[k % edges].push(k % broadcasts);
    }
    out
}

/// Starts one `edge` link that pulls from `upstream`.
fn start_link(node_id: &str, upstream: &str, token: &str) -> anyhow::Result<Arc<Link>> {
    let cfg = NodeArgs {
        node_id: Some(node_id.to_owned()),
        upstream: vec![upstream.to_owned()],
        cluster_token: Some(token.to_owned()),
        ..NodeArgs::default()
    }
    .resolve_for("edge")
    .context("simulated edge configuration")?;
    let cluster = cfg.cluster.clone();
    let ctx = NodeContext::new(cfg);
    let link = Link::start(
        ctx.hub.clone(),
        &cluster,
        "edge",
        Box::new(StaticUpstreams(vec![upstream.to_owned()])),
    )
    .context("starting a simulated edge's cluster link")?;
    let _ = ctx.link.set(link.clone());
    Ok(link)
}

/// Subscribes `name` through `link` and reads it like a player until the run ends.
async fn reader(
    link: Arc<Link>,
    name: String,
    shared: Arc<Shared>,
    done: watch::Receiver<bool>,
    (edge, broadcast): (usize, usize),
    capacity: usize,
) -> SubResult {
    let mut res = SubResult {
        edge,
        broadcast,
        ..SubResult::default()
    };
    let mut consumer =
        match tokio::time::timeout(shared.connect_timeout, link.subscribe(&name)).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                shared.failed.fetch_add(1, Relaxed);
                res.error = Some(format!("{name}: not found upstream (or no answer in 6 s)"));
                return res;
            }
            Err(_) => {
                shared.failed.fetch_add(1, Relaxed);
                res.error = Some(format!("{name}: no answer in time"));
                return res;
            }
        };
    res.subscribed = true;
    shared.subscribed.fetch_add(1, Relaxed);
    res.samples.reserve(capacity);
    let done = until_done(done);
    tokio::pin!(done);
    let mut entries = Vec::with_capacity(256);
    loop {
        let outcome = consumer.read(&mut entries, 256);
        let now = wall_clock_us();
        let phase = shared.phase.load(Relaxed);
        if phase == DONE {
            return res;
        }
        let measuring = phase == MEASURING;
        match outcome {
            ReadOutcome::Ended => {
                res.ended = true;
                res.error = Some(format!("{name}: the broadcast ended"));
                return res;
            }
            ReadOutcome::Read(0) => {
                tokio::select! {
                    biased;
                    () = &mut done => return res,
                    () = consumer.changed() => {}
                }
                continue;
            }
            ReadOutcome::Skipped { skipped, .. } if measuring => res.skipped_window += skipped,
            ReadOutcome::Skipped { skipped, .. } => res.skipped_before += skipped,
            ReadOutcome::Read(_) => {}
        }
        for e in entries.drain(..) {
            if let Item::Frame { track, frame } = &e.item {
                res.samples.push(Sample {
                    track: track.0,
                    dts: frame.dts,
                    ingest_us: e.ingest_us,
                    arrival_us: now,
                });
                if measuring {
                    res.media_bytes += frame.payload.len() as u64;
                    res.frames += 1;
                }
            }
        }
    }
}

/// Starts the publishers on one thread and waits until the origin accepted each of them.
fn start_publishers(
    targets: Vec<Arc<RtmpTarget>>,
    fixture: Arc<Fixture>,
    base_ms: u32,
    stats: Arc<PublisherStats>,
) -> anyhow::Result<()> {
    let n = targets.len();
    let (tx, rx) = std::sync::mpsc::channel::<Result<Instant, String>>();
    std::thread::Builder::new()
        .name("publishers".into())
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
            rt.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for (i, target) in targets.into_iter().enumerate() {
                    let (fixture, stats, tx) = (fixture.clone(), stats.clone(), tx.clone());
                    let delay = START_SPREAD.mul_f64(i as f64 / n as f64);
                    set.spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Err(e) = publish(&target, &fixture, base_ms, &stats, &tx).await {
                            let msg = format!("{}: {e:#}", target.key);
                            if tx.send(Err(msg.clone())).is_err() {
                                log(format_args!("publisher stopped: {msg}"));
                            }
                            stats
                                .error
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(msg);
                        }
                    });
                }
                drop(tx);
                while set.join_next().await.is_some() {}
            });
        })
        .context("starting the publisher thread")?;
    let deadline = Instant::now() + START_SPREAD + Duration::from_secs(15);
    for _ in 0..n {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("publisher: {e}"),
            Err(_) => bail!("publisher: no NetStream.Publish.Start within 15 s"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The relay's /metrics
// ---------------------------------------------------------------------------------------------

/// Cumulative histogram: (upper bound in seconds, count at or below), then the total count.
#[derive(Clone, Debug, Default, PartialEq)]
struct Hist {
    buckets: Vec<(f64, u64)>,
    count: u64,
}

impl Hist {
    fn from_link(link: &Link) -> Self {
        let (buckets, count, _) = link.stats.latency.snapshot();
        Self { buckets, count }
    }

    /// `self - before`, bucket by bucket (same bounds).
    fn since(&self, before: &Hist) -> Hist {
        Hist {
            buckets: self
                .buckets
                .iter()
                .zip(before.buckets.iter().chain(std::iter::repeat(&(0.0, 0))))
                .map(|(&(le, n), &(_, b))| (le, n.saturating_sub(b)))
                .collect(),
            count: self.count.saturating_sub(before.count),
        }
    }

    /// Adds `other` (same bounds).
    fn add(&mut self, other: &Hist) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.iter().map(|&(le, _)| (le, 0)).collect();
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            a.1 += b.1;
        }
        self.count += other.count;
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket (the first bucket
    /// starts at 0); `None` when empty or beyond the last finite bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for &(le, n) in &self.buckets {
            if n as f64 >= rank && n > below {
                return Some(lower + (le - lower) * (rank - below as f64) / (n - below) as f64);
            }
            (lower, below) = (le, n);
        }
        None
    }
}

/// What the relay's `/metrics` says about its cluster link.
#[derive(Clone, Debug, Default)]
struct RelayMetrics {
    bytes_out: u64,
    bytes_in: u64,
    groups_reset: u64,
    subscriptions_down: u64,
    subscriptions_up: u64,
    peers: u64,
    latency: Hist,
}

impl RelayMetrics {
    fn parse(text: &str) -> Self {
        let mut m = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let n = v as u64;
            match name {
                "castnode_cluster_bytes_out_total" => m.bytes_out = n,
                "castnode_cluster_bytes_in_total" => m.bytes_in = n,
                "castnode_cluster_groups_reset_total" => m.groups_reset = n,
                "castnode_cluster_subscriptions_down" => m.subscriptions_down = n,
                "castnode_cluster_subscriptions_up" => m.subscriptions_up = n,
                "castnode_cluster_peers" => m.peers = n,
                "castnode_cluster_latency_seconds_count" => m.latency.count = n,
                _ => {
                    let le = name
                        .strip_prefix("castnode_cluster_latency_seconds_bucket{le=\"")
                        .and_then(|r| r.strip_suffix("\"}"))
                        .and_then(|le| le.parse::<f64>().ok())
                        .filter(|le| le.is_finite());
                    if let Some(le) = le {
                        m.latency.buckets.push((le, n));
                    }
                }
            }
        }
        m
    }
}

/// GET `url` (http://host:port/path) and return the body.
async fn http_get(url: &str) -> anyhow::Result<String> {
    let (host, port, path) = split_host_port(url, "http://", 80)?;
    let addr = resolve(&host, port)?;
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        // HTTP/1.0: the body ends with the connection, never chunked.
        let req = format!("GET /{path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("GET {url}: timed out"))?
        .with_context(|| format!("GET {url}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {url}: no HTTP response"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        bail!(
            "GET {url}: {}",
            head.lines().next().unwrap_or_default().trim()
        );
    }
    Ok(body.to_owned())
}

async fn relay_metrics(url: Option<&str>) -> anyhow::Result<Option<RelayMetrics>> {
    match url {
        Some(u) => Ok(Some(RelayMetrics::parse(&http_get(u).await?))),
        None => Ok(None),
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

pub fn run(args: &Args) -> anyhow::Result<Report> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    let valid = args.players() > 0
        && args.broadcasts > 0
        && positive(args.duration)
        && positive(args.connect_rate)
        && positive(args.connect_timeout)
        && args.warmup.is_finite()
        && args.warmup >= 0.0;
    if !valid {
        bail!(
            "--edges, --broadcasts, --duration, --connect-rate and --connect-timeout must be \
             positive, --warmup not negative"
        );
    }
    if args.no_publish {
        bail!("--protocol cluster publishes its broadcasts itself: --no-publish is not supported");
    }
    let relay = args
        .relay
        .clone()
        .context("--protocol cluster needs --relay HOST:PORT (the relay's cluster address)")?;
    let token = args
        .cluster_token
        .clone()
        .context("--protocol cluster needs --cluster-token")?;
    let fixture = Arc::new(Fixture::load(&args.fixture)?);
    let (rtmp, rtmp_host) = RtmpTarget::parse(&args.rtmp_url)?;
    let addr = resolve(&rtmp_host, rtmp.addr.port())?;
    let targets: Vec<Arc<RtmpTarget>> = (0..args.broadcasts)
        .map(|i| {
            let key = match args.broadcasts {
                1 => rtmp.key.clone(),
                _ => format!("{}-{i}", rtmp.key),
            };
            Arc::new(RtmpTarget {
                addr,
                app: rtmp.app.clone(),
                tc_url: rtmp.tc_url.clone(),
                key,
            })
        })
        .collect();
    let sockets = args.players() as u64 + 2 * args.broadcasts as u64 + 64;
    if let Some(limit) = open_files_limit()
        && limit < sockets
    {
        log(format_args!(
            "warning: the open-files limit is {limit}, too low for {} edges and {} publishers \
             (raise `ulimit -n`)",
            args.players(),
            args.broadcasts
        ));
    }
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(coordinate(args, fixture, targets, relay, token))
}

async fn coordinate(
    args: &Args,
    fixture: Arc<Fixture>,
    targets: Vec<Arc<RtmpTarget>>,
    relay: String,
    token: String,
) -> anyhow::Result<Report> {
    let clk_tck = clock_ticks_per_second();
    let names: Vec<String> = targets
        .iter()
        .map(|t| format!("{}/{}", t.app, t.key))
        .collect();
    let pub_stats = Arc::new(PublisherStats::default());
    start_publishers(targets, fixture.clone(), args.ts_base_ms, pub_stats.clone())?;
    log(format_args!(
        "publishing {} broadcast(s) of {} to {} ({:.0} kbit/s each, loop of {} ms)",
        names.len(),
        args.fixture.display(),
        args.rtmp_url,
        fixture.media_bps / 1000.0,
        fixture.period_ms
    ));
    // Let every broadcast reach a keyframe at the origin.
    tokio::time::sleep(Duration::from_secs(1)).await;
    if args.server_pid.is_some_and(|p| sample_server(p).is_none()) {
        bail!(
            "cannot read /proc/{}/stat",
            args.server_pid.unwrap_or_default()
        );
    }

    let layout = layout(args.players(), names.len());
    let subs_total = layout.iter().map(Vec::len).sum::<usize>();
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(CONNECTING),
        subscribed: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
    });
    // Frames read per subscription: the run's length at the fixture's frame rate, with room.
    let fps = fixture.tags.len() as f64 * 1000.0 / fixture.period_ms as f64;
    let run_s = args.warmup + args.duration + args.players() as f64 / args.connect_rate + 5.0;
    let capacity = (fps * run_s * 1.25) as usize + 64;
    let (done_tx, done_rx) = watch::channel(false);
    let token = token.as_str();

    let mut reference = Vec::new();
    if let Some(origin) = &args.reference {
        let link = start_link("load-reference", origin, token)?;
        for (b, name) in names.iter().enumerate() {
            let task = reader(
                link.clone(),
                name.clone(),
                shared.clone(),
                done_rx.clone(),
                (usize::MAX, b),
                capacity,
            );
            reference.push(tokio::spawn(task));
        }
    }

    let mut edges = Vec::with_capacity(args.players());
    let mut handles = Vec::with_capacity(subs_total);
    let mut start_errors = Vec::new();
    let start = tokio::time::Instant::now();
    let mut last_log = Instant::now();
    for (i, bcs) in layout.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / args.connect_rate))
            .await;
        let link = match start_link(&format!("load-edge-{i}"), &relay, token) {
            Ok(l) => l,
            Err(e) => {
                shared.failed.fetch_add(bcs.len(), Relaxed);
                start_errors.push(format!("{e:#}"));
                continue;
            }
        };
        for &b in bcs {
            let task = reader(
                link.clone(),
                names[b].clone(),
                shared.clone(),
                done_rx.clone(),
                (i, b),
                capacity,
            );
            handles.push(tokio::spawn(task));
        }
        edges.push(Edge { link });
        if last_log.elapsed() >= Duration::from_secs(2) {
            last_log = Instant::now();
            log(format_args!(
                "started {}/{} edges: {} subscriptions answered, {} failed",
                i + 1,
                args.players(),
                shared.subscribed.load(Relaxed),
                shared.failed.load(Relaxed)
            ));
        }
    }
    let expected = subs_total + reference.len();
    let give_up = Instant::now() + shared.connect_timeout + Duration::from_secs(1);
    while shared.subscribed.load(Relaxed) + shared.failed.load(Relaxed) < expected
        && Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log(format_args!(
        "{} of {expected} subscriptions answered ({} through the relay, {} reference), {} failed; \
         warming up {} s, then measuring {} s",
        shared.subscribed.load(Relaxed),
        subs_total,
        reference.len(),
        shared.failed.load(Relaxed),
        args.warmup,
        args.duration
    ));
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    // The window.
    let relay_before = relay_metrics(args.relay_metrics.as_deref()).await?;
    let edge_hist_before: Vec<Hist> = edges.iter().map(|e| Hist::from_link(&e.link)).collect();
    let edge_reset_before: u64 = edges
        .iter()
        .map(|e| e.link.stats.groups_reset.load(Relaxed))
        .sum();
    let edge_failovers_before: u64 = edges
        .iter()
        .map(|e| e.link.stats.failovers.load(Relaxed))
        .sum();
    let self_before = cpu_ticks("/proc/self/stat");
    let machine_before = machine_busy_ticks();
    let relay_cpu_before = args.server_pid.and_then(sample_server);
    let origin_cpu_before = args.origin_pid.and_then(sample_server);
    let pub_bytes_before = pub_stats.media_bytes.load(Relaxed);
    pub_stats.late_max_us.store(0, Relaxed);
    let window_start = Instant::now();
    let window_start_us = wall_clock_us();
    shared.phase.store(MEASURING, Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    shared.phase.store(DONE, Relaxed);
    done_tx.send_replace(true);
    let window = window_start.elapsed().as_secs_f64();
    let window_end_us = wall_clock_us();
    let self_after = cpu_ticks("/proc/self/stat");
    let machine_after = machine_busy_ticks();
    let relay_cpu_after = args.server_pid.and_then(sample_server);
    let origin_cpu_after = args.origin_pid.and_then(sample_server);
    let pub_bytes = pub_stats.media_bytes.load(Relaxed) - pub_bytes_before;
    let pub_late_ms = pub_stats.late_max_us.load(Relaxed) as f64 / 1000.0;
    let relay_after = relay_metrics(args.relay_metrics.as_deref()).await?;
    let mut edge_hist = Hist::default();
    for (e, before) in edges.iter().zip(&edge_hist_before) {
        edge_hist.add(&Hist::from_link(&e.link).since(before));
    }
    let edge_resets = edges
        .iter()
        .map(|e| e.link.stats.groups_reset.load(Relaxed))
        .sum::<u64>()
        - edge_reset_before;
    let edge_failovers = edges
        .iter()
        .map(|e| e.link.stats.failovers.load(Relaxed))
        .sum::<u64>()
        - edge_failovers_before;

    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(r) => results.push(r),
            Err(e) => log(format_args!("a reader task failed: {e}")),
        }
    }
    let mut refs = Vec::with_capacity(reference.len());
    for h in reference {
        match h.await {
            Ok(r) => refs.push(r),
            Err(e) => log(format_args!("a reference task failed: {e}")),
        }
    }
    let cpu = |before: Option<u64>, after: Option<u64>| {
        Some(after?.saturating_sub(before?) as f64 / clk_tck / window)
    };
    let pub_error = pub_stats
        .error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(Report::build(Input {
        args,
        fixture: &fixture,
        broadcasts: names.len(),
        results,
        refs,
        window,
        window_us: (window_start_us, window_end_us),
        published_actual_bps: pub_bytes as f64 * 8.0 / window,
        publisher_late_ms: pub_late_ms,
        publisher_error: pub_error,
        start_errors,
        relay_cpu: cpu(
            relay_cpu_before.map(|s| s.ticks),
            relay_cpu_after.map(|s| s.ticks),
        ),
        relay_rss_kib: relay_cpu_after.map(|s| s.rss_kib),
        origin_cpu: cpu(
            origin_cpu_before.map(|s| s.ticks),
            origin_cpu_after.map(|s| s.ticks),
        ),
        relay: relay_before.zip(relay_after),
        edge_hist,
        edge_resets,
        edge_failovers,
        tool_cpu: cpu(self_before, self_after),
        machine_cpu: cpu(machine_before, machine_after),
    }))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

struct Input<'a> {
    args: &'a Args,
    fixture: &'a Fixture,
    broadcasts: usize,
    results: Vec<SubResult>,
    refs: Vec<SubResult>,
    window: f64,
    window_us: (i64, i64),
    published_actual_bps: f64,
    publisher_late_ms: f64,
    publisher_error: Option<String>,
    start_errors: Vec<String>,
    relay_cpu: Option<f64>,
    relay_rss_kib: Option<u64>,
    origin_cpu: Option<f64>,
    relay: Option<(RelayMetrics, RelayMetrics)>,
    edge_hist: Hist,
    edge_resets: u64,
    edge_failovers: u64,
    tool_cpu: Option<f64>,
    machine_cpu: Option<f64>,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Ms {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    samples: usize,
}

impl Ms {
    /// From microsecond values (sorted here).
    fn of(mut us: Vec<i64>) -> Option<Self> {
        us.sort_unstable();
        let ms = |p: f64| percentile(&us, p).unwrap_or_default() as f64 / 1000.0;
        (!us.is_empty()).then(|| Self {
            p50: ms(50.0),
            p95: ms(95.0),
            p99: ms(99.0),
            max: ms(100.0),
            samples: us.len(),
        })
    }

    fn to_json(self) -> serde_json::Value {
        let r2 = |v: f64| (v * 100.0).round() / 100.0;
        json!({"p50": r2(self.p50), "p95": r2(self.p95), "p99": r2(self.p99),
               "max": r2(self.max), "samples": self.samples})
    }
}

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2}, p95 {:.2}, p99 {:.2}, max {:.2} ms over {} frames",
            self.p50, self.p95, self.p99, self.max, self.samples
        )
    }
}

/// p50 and p95 of a histogram, milliseconds.
#[derive(Debug, Clone, Copy)]
struct HistMs {
    p50: Option<f64>,
    p95: Option<f64>,
    count: u64,
}

impl HistMs {
    fn of(h: &Hist) -> Self {
        Self {
            p50: h.quantile(0.5).map(|s| s * 1000.0),
            p95: h.quantile(0.95).map(|s| s * 1000.0),
            count: h.count,
        }
    }

    fn to_json(self) -> serde_json::Value {
        let r2 = |v: f64| (v * 100.0).round() / 100.0;
        json!({"p50": self.p50.map(r2), "p95": self.p95.map(r2), "samples": self.count})
    }
}

impl fmt::Display for HistMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |x: Option<f64>| x.map_or_else(|| "> 1000".to_owned(), |x| format!("{x:.2}"));
        write!(
            f,
            "p50 {}, p95 {} ms over {} frames",
            v(self.p50),
            v(self.p95),
            self.count
        )
    }
}

/// The relay's figures over the window.
#[derive(Debug)]
struct RelaySummary {
    cpu_cores: Option<f64>,
    rss_kib: Option<u64>,
    out_bps: Option<f64>,
    in_bps: Option<f64>,
    groups_reset: Option<u64>,
    subscriptions_down: Option<u64>,
    subscriptions_up: Option<u64>,
    peers: Option<u64>,
    latency: Option<HistMs>,
}

impl RelaySummary {
    fn gbps_per_core(&self) -> Option<f64> {
        let cores = self.cpu_cores.filter(|c| *c > 0.0)?;
        Some(self.out_bps? / 1e9 / cores)
    }
}

pub struct Report {
    relay_addr: String,
    window_s: f64,
    warmup_s: f64,
    broadcasts: usize,
    edges: usize,
    subscriptions: usize,
    subscribed: usize,
    subs_keeping_up: usize,
    edges_keeping_up: usize,
    ended: usize,
    failed: usize,
    skipped_window: u64,
    skipped_before: u64,
    subs_skipping: usize,
    edge_resets: u64,
    edge_failovers: u64,
    published_kbps: f64,
    published_actual_kbps: f64,
    publisher_late_ms: f64,
    publisher_error: Option<String>,
    received_kbps_min: f64,
    received_kbps_p50: f64,
    received_kbps_sum: f64,
    age: Option<Ms>,
    ref_age: Option<Ms>,
    hop: Option<Ms>,
    hop_unmatched: usize,
    edge_hist: HistMs,
    relay: RelaySummary,
    origin_cpu: Option<f64>,
    tool_cpu: Option<f64>,
    machine_cpu: Option<f64>,
    lag_limit_ms: u32,
    errors: Vec<(String, usize)>,
}

impl Report {
    fn build(input: Input<'_>) -> Self {
        let (from, to) = input.window_us;
        let in_window = |s: &&Sample| s.arrival_us >= from && s.arrival_us < to;
        let target = input.fixture.media_bps * 0.9;
        let limit_us = i64::from(input.args.lag_limit_ms) * 1000;
        // Reference arrivals per broadcast, by (track, dts).
        let mut reference: HashMap<usize, HashMap<(u8, i64), i64>> = HashMap::new();
        for r in &input.refs {
            let m = reference.entry(r.broadcast).or_default();
            for s in &r.samples {
                m.entry((s.track, s.dts)).or_insert(s.arrival_us);
            }
        }
        let ref_age = Ms::of(
            input
                .refs
                .iter()
                .flat_map(|r| r.samples.iter().filter(in_window))
                .map(|s| s.arrival_us - s.ingest_us)
                .collect(),
        );
        let mut ages = Vec::new();
        let mut hops = Vec::new();
        let mut unmatched = 0;
        let mut bitrates = Vec::new();
        let (mut keeping, mut ended, mut failed, mut skipping) = (0, 0, 0, 0);
        let (mut skipped_window, mut skipped_before) = (0, 0);
        let mut edge_ok: HashMap<usize, bool> = HashMap::new();
        let mut errors: Vec<(String, usize)> = Vec::new();
        for r in &input.results {
            if let Some(e) = &r.error {
                // Group errors by what went wrong, not by broadcast.
                let e = e.split_once(": ").map_or(e.as_str(), |(_, w)| w).to_owned();
                match errors.iter_mut().find(|(m, _)| *m == e) {
                    Some((_, n)) => *n += 1,
                    None => errors.push((e, 1)),
                }
            }
            let ok = edge_ok.entry(r.edge).or_insert(true);
            if !r.subscribed {
                failed += 1;
                *ok = false;
                continue;
            }
            ended += usize::from(r.ended);
            skipped_window += r.skipped_window;
            skipped_before += r.skipped_before;
            skipping += usize::from(r.skipped_window > 0);
            let bps = r.media_bytes as f64 * 8.0 / input.window;
            bitrates.push(bps);
            let mut sub_ages: Vec<i64> = r
                .samples
                .iter()
                .filter(in_window)
                .map(|s| s.arrival_us - s.ingest_us)
                .collect();
            sub_ages.sort_unstable();
            let ref_map = reference.get(&r.broadcast);
            for s in r.samples.iter().filter(in_window) {
                match ref_map.and_then(|m| m.get(&(s.track, s.dts))) {
                    Some(t) => hops.push(s.arrival_us - t),
                    None if ref_map.is_some() => unmatched += 1,
                    None => {}
                }
            }
            let lag_ok = percentile(&sub_ages, 99.0).is_some_and(|p| p <= limit_us);
            if !r.ended && r.skipped_window == 0 && bps >= target && lag_ok {
                keeping += 1;
            } else {
                *ok = false;
            }
            ages.extend_from_slice(&sub_ages);
        }
        for e in &input.start_errors {
            errors.push((e.clone(), 1));
        }
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        errors.truncate(8);
        bitrates.sort_by(f64::total_cmp);
        let relay = match &input.relay {
            Some((b, a)) => RelaySummary {
                cpu_cores: input.relay_cpu,
                rss_kib: input.relay_rss_kib,
                out_bps: Some(a.bytes_out.saturating_sub(b.bytes_out) as f64 * 8.0 / input.window),
                in_bps: Some(a.bytes_in.saturating_sub(b.bytes_in) as f64 * 8.0 / input.window),
                groups_reset: Some(a.groups_reset.saturating_sub(b.groups_reset)),
                subscriptions_down: Some(a.subscriptions_down),
                subscriptions_up: Some(a.subscriptions_up),
                peers: Some(a.peers),
                latency: Some(HistMs::of(&a.latency.since(&b.latency))),
            },
            None => RelaySummary {
                cpu_cores: input.relay_cpu,
                rss_kib: input.relay_rss_kib,
                out_bps: None,
                in_bps: None,
                groups_reset: None,
                subscriptions_down: None,
                subscriptions_up: None,
                peers: None,
                latency: None,
            },
        };
        let edges_started = input.args.players() - input.start_errors.len();
        Self {
            relay_addr: input.args.relay.clone().unwrap_or_default(),
            window_s: input.window,
            warmup_s: input.args.warmup,
            broadcasts: input.broadcasts,
            edges: edges_started,
            subscriptions: input.results.len(),
            subscribed: input.results.len() - failed,
            subs_keeping_up: keeping,
            edges_keeping_up: edge_ok.values().filter(|ok| **ok).count(),
            ended,
            failed,
            skipped_window,
            skipped_before,
            subs_skipping: skipping,
            edge_resets: input.edge_resets,
            edge_failovers: input.edge_failovers,
            published_kbps: input.fixture.media_bps / 1000.0,
            published_actual_kbps: input.published_actual_bps / 1000.0,
            publisher_late_ms: input.publisher_late_ms,
            publisher_error: input.publisher_error,
            received_kbps_min: bitrates.first().copied().unwrap_or_default() / 1000.0,
            received_kbps_p50: percentile(&bitrates, 50.0).unwrap_or_default() / 1000.0,
            received_kbps_sum: bitrates.iter().sum::<f64>() / 1000.0,
            age: Ms::of(ages),
            ref_age,
            hop: Ms::of(hops),
            hop_unmatched: unmatched,
            edge_hist: HistMs::of(&input.edge_hist),
            relay,
            origin_cpu: input.origin_cpu,
            tool_cpu: input.tool_cpu,
            machine_cpu: input.machine_cpu,
            lag_limit_ms: input.args.lag_limit_ms,
            errors,
        }
    }

    /// Relay hop from the histograms: edges' p50/p95 minus the relay's.
    /// The relay's CPU per frame copy it sent: its CPU time over the window divided by the
    /// frames the edges read in the window (each one copy sent by the relay). Its cost follows
    /// frames, not bytes (BENCHMARKS.md, "Cluster link").
    fn relay_us_per_copy(&self) -> Option<f64> {
        let cores = self.relay.cpu_cores.filter(|c| *c > 0.0)?;
        let copies = self.age.as_ref()?.samples;
        (copies > 0).then(|| cores * self.window_s * 1e6 / copies as f64)
    }

    fn hist_hop(&self) -> Option<(f64, f64)> {
        let r = self.relay.latency?;
        Some((self.edge_hist.p50? - r.p50?, self.edge_hist.p95? - r.p95?))
    }

    pub fn to_json(&self) -> serde_json::Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let r2 = |v: f64| (v * 100.0).round() / 100.0;
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "protocol": "cluster",
            "relay": self.relay_addr,
            "window_s": r1(self.window_s),
            "warmup_s": self.warmup_s,
            "broadcasts": self.broadcasts,
            "edges": {
                "started": self.edges,
                "keeping_up": self.edges_keeping_up,
            },
            "subscriptions": {
                "requested": self.subscriptions,
                "subscribed": self.subscribed,
                "keeping_up": self.subs_keeping_up,
                "ended": self.ended,
                "failed": self.failed,
                "skipping": self.subs_skipping,
                "frames_skipped_window": self.skipped_window,
                "frames_skipped_before": self.skipped_before,
                "edge_groups_dropped": self.edge_resets,
                "edge_resubscribed": self.edge_failovers,
            },
            "published_kbps": r1(self.published_kbps),
            "published_actual_kbps": r1(self.published_actual_kbps),
            "publisher_late_max_ms": r1(self.publisher_late_ms),
            "publisher_error": self.publisher_error,
            "received_kbps": {
                "min": r1(self.received_kbps_min),
                "p50": r1(self.received_kbps_p50),
                "sum": r1(self.received_kbps_sum),
            },
            "age_ms": self.age.map(Ms::to_json),
            "reference_age_ms": self.ref_age.map(Ms::to_json),
            "hop_ms": self.hop.map(Ms::to_json),
            "hop_unmatched_frames": self.hop_unmatched,
            "edge_histogram_ms": self.edge_hist.to_json(),
            "relay_histogram_ms": self.relay.latency.map(HistMs::to_json),
            "hop_from_histograms_ms": self.hist_hop().map(|(a, b)| json!({"p50": r2(a), "p95": r2(b)})),
            "relay_server": {
                "cpu_cores": self.relay.cpu_cores.map(r3),
                "rss_kib": self.relay.rss_kib,
                "out_mbps": self.relay.out_bps.map(|b| r1(b / 1e6)),
                "in_mbps": self.relay.in_bps.map(|b| r1(b / 1e6)),
                "gbps_per_core": self.relay.gbps_per_core().map(r3),
                "us_per_frame_copy": self.relay_us_per_copy().map(r2),
                "groups_reset": self.relay.groups_reset,
                "subscriptions_down": self.relay.subscriptions_down,
                "subscriptions_up": self.relay.subscriptions_up,
                "peers": self.relay.peers,
            },
            "origin_cpu_cores": self.origin_cpu.map(r3),
            "load_tool_cpu_cores": self.tool_cpu.map(r3),
            "machine_cpu_cores": self.machine_cpu.map(r3),
            "machine_cpus": machine_cpus(),
            "lag_limit_ms": self.lag_limit_ms,
            "errors": self.errors.iter().map(|(e, n)| json!({"error": e, "subscriptions": n})).collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "castnode-load: {} simulated edges, {} broadcasts, through the relay {}",
            self.edges, self.broadcasts, self.relay_addr
        )?;
        writeln!(
            f,
            "  window             {:.1} s after {:.1} s of warmup",
            self.window_s, self.warmup_s
        )?;
        writeln!(
            f,
            "  subscriptions      {} requested, {} subscribed, {} keeping up, {} ended, {} failed; \
             {} of {} edges keeping up",
            self.subscriptions,
            self.subscribed,
            self.subs_keeping_up,
            self.ended,
            self.failed,
            self.edges_keeping_up,
            self.edges
        )?;
        writeln!(
            f,
            "  skips              {} frames skipped in the window ({} subscriptions), {} before it; \
             {} groups dropped by the edges' receivers, {} re-subscriptions after a lost connection",
            self.skipped_window,
            self.subs_skipping,
            self.skipped_before,
            self.edge_resets,
            self.edge_failovers
        )?;
        writeln!(
            f,
            "  published          {:.0} kbit/s per broadcast (fixture); {:.0} kbit/s sent in the \
             window in all, writes at most {:.1} ms late",
            self.published_kbps, self.published_actual_kbps, self.publisher_late_ms
        )?;
        if let Some(e) = &self.publisher_error {
            writeln!(f, "  publisher error    {e}")?;
        }
        writeln!(
            f,
            "  received           per subscription min {:.0}, p50 {:.0} kbit/s of media; {:.1} Mbit/s in all",
            self.received_kbps_min,
            self.received_kbps_p50,
            self.received_kbps_sum / 1000.0
        )?;
        match &self.age {
            Some(a) => writeln!(
                f,
                "  age at edges       {a} (since origin ingest; limit p99 {} ms)",
                self.lag_limit_ms
            )?,
            None => writeln!(f, "  age at edges       not measured")?,
        }
        if let Some(a) = &self.ref_age {
            writeln!(f, "  age at reference   {a} (one hop from the origin)")?;
        }
        if let Some(h) = &self.hop {
            writeln!(
                f,
                "  relay hop (exact)  {h}: edge arrival minus reference arrival, per frame \
                 ({} frames unmatched)",
                self.hop_unmatched
            )?;
        }
        writeln!(f, "  edges' histogram   {}", self.edge_hist)?;
        if let Some(r) = &self.relay.latency {
            writeln!(f, "  relay's histogram  {r}")?;
        }
        if let Some((p50, p95)) = self.hist_hop() {
            writeln!(
                f,
                "  relay hop (hist.)  p50 {p50:.2}, p95 {p95:.2} ms (edges' minus relay's, bucket-interpolated)"
            )?;
        }
        let r = &self.relay;
        if let Some(c) = r.cpu_cores {
            write!(f, "  relay              {c:.3} cores")?;
            if let Some(kib) = r.rss_kib {
                write!(f, ", RSS {kib} KiB")?;
            }
            if let (Some(o), Some(i)) = (r.out_bps, r.in_bps) {
                write!(f, "; out {:.1} Mbit/s, in {:.1} Mbit/s", o / 1e6, i / 1e6)?;
            }
            if let Some(g) = r.gbps_per_core() {
                write!(f, " = {g:.3} Gbit/s forwarded per core")?;
            }
            if let Some(us) = self.relay_us_per_copy() {
                write!(f, "; {us:.2} us of relay CPU per frame copy")?;
            }
            writeln!(f)?;
        }
        if let (Some(g), Some(d), Some(u), Some(p)) = (
            r.groups_reset,
            r.subscriptions_down,
            r.subscriptions_up,
            r.peers,
        ) {
            writeln!(
                f,
                "  relay link         {g} groups reset in the window; {d} downstream and {u} upstream \
                 subscriptions, {p} peers at the end"
            )?;
        }
        if let Some(c) = self.origin_cpu {
            writeln!(f, "  origin             {c:.3} cores")?;
        }
        if let Some(c) = self.tool_cpu {
            write!(f, "  load tool          {c:.3} cores")?;
            if let Some(m) = self.machine_cpu {
                write!(
                    f,
                    "; the machine was {m:.3} of {} cores busy (all processes, interrupts)",
                    machine_cpus()
                )?;
            }
            writeln!(f)?;
        }
        for (e, n) in &self.errors {
            writeln!(f, "  error              {n} subscriptions: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spreads_broadcasts_over_edges() {
        assert_eq!(layout(3, 1), vec![vec![0], vec![0], vec![0]]);
        assert_eq!(layout(2, 2), vec![vec![0], vec![1]]);
        assert_eq!(layout(2, 5), vec![vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(layout(4, 2), vec![vec![0], vec![1], vec![0], vec![1]]);
    }

    #[test]
    fn metrics_parse_and_quantiles() {
        let text = "# HELP castnode_cluster_bytes_out_total x\n\
            castnode_cluster_bytes_out_total 1000\n\
            castnode_cluster_latency_seconds_bucket{le=\"0.001\"} 50\n\
            castnode_cluster_latency_seconds_bucket{le=\"0.002\"} 90\n\
            castnode_cluster_latency_seconds_bucket{le=\"0.005\"} 100\n\
            castnode_cluster_latency_seconds_bucket{le=\"+Inf\"} 100\n\
            castnode_cluster_latency_seconds_count 100\n";
        let m = RelayMetrics::parse(text);
        assert_eq!(m.bytes_out, 1000);
        assert_eq!(m.latency.buckets.len(), 3);
        assert_eq!(m.latency.count, 100);
        let q = |q: f64| m.latency.quantile(q).unwrap();
        assert!((q(0.5) - 0.001).abs() < 1e-9);
        assert!((q(0.25) - 0.0005).abs() < 1e-9);
        assert!((q(0.95) - 0.0035).abs() < 1e-9);
        let none = m.latency.since(&m.latency);
        assert_eq!(none.quantile(0.5), None);
        let mut over = m.latency.clone();
        over.count = 200;
        assert_eq!(over.quantile(0.95), None, "beyond the last finite bucket");
    }
}
