//! Node counters (the node's own and the cluster link's, [`ClusterStats`]) and their Prometheus text
//! rendering.
//!
//! Counters are plain atomics owned by the node (drivers add to them); per-broadcast figures are
//! read from the hub when `/metrics` is scraped, so an ended broadcast leaves no stale series.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::webrtc::stats::BroadcastRtcStats;
use std::time::Duration;

/// Counters of one node.
#[derive(Debug, Default)]
pub(crate) struct NodeStats {
    /// Open RTMP connections.
    pub(crate) rtmp_connections: AtomicU64,
    /// RTMP connections refused at the connection limit.
    pub(crate) rtmp_refused: AtomicU64,
    /// RTMP connections closed for a protocol error or timeout.
    pub(crate) rtmp_errors: AtomicU64,
    /// Publishers connected now.
    pub(crate) publishers: AtomicU64,
    /// RTMP players connected now.
    pub(crate) rtmp_players: AtomicU64,
    /// HTTP-FLV players connected now.
    pub(crate) flv_players: AtomicU64,
    /// Players disconnected because they stopped reading.
    pub(crate) players_stalled: AtomicU64,
    /// WebRTC (WHEP) sessions now, connected or connecting.
    pub(crate) webrtc_viewers: AtomicU64,
    /// WebRTC sessions that connected (ICE + DTLS), ever.
    pub(crate) webrtc_connected: AtomicU64,
    /// Keyframe requests (PLI/FIR) from WebRTC viewers.
    pub(crate) webrtc_keyframe_requests: AtomicU64,
    /// Datagrams on the WebRTC port that no session accepted.
    pub(crate) webrtc_datagrams_dropped: AtomicU64,
    /// WHIP publishers.
    pub(crate) webrtc_publishers: AtomicU64,
    /// Losses in WHIP publishers' video that made the node wait for a keyframe.
    pub(crate) webrtc_ingest_gaps: AtomicU64,
    /// Keyframe requests (PLI) sent to WHIP publishers.
    pub(crate) webrtc_keyframe_requests_sent: AtomicU64,
}

/// Latency buckets (µs) of `castnode_cluster_latency_seconds`.
pub(crate) const LATENCY_BOUNDS_US: [u64; 12] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
];

/// The cluster link's counters.
#[derive(Debug)]
pub struct ClusterStats {
    /// Connections from other nodes now.
    pub(crate) peers_in: AtomicU64,
    /// Connections refused (bad token, bad HELLO).
    pub(crate) refused: AtomicU64,
    /// Subscriptions other nodes hold on this one now.
    pub(crate) subscriptions_down: AtomicU64,
    /// Subscriptions this node holds upstream now.
    pub(crate) subscriptions_up: AtomicU64,
    /// Broadcasts other nodes publish to this one now.
    pub(crate) publications_in: AtomicU64,
    /// Local broadcasts this node publishes upstream now.
    pub(crate) publications_out: AtomicU64,
    /// Upstream failovers (a subscription moved to another upstream).
    pub failovers: AtomicU64,
    /// Bytes sent on group streams.
    pub(crate) bytes_out: AtomicU64,
    /// Bytes received on group streams.
    pub(crate) bytes_in: AtomicU64,
    /// Groups started for downstream nodes.
    pub(crate) groups_out: AtomicU64,
    /// Groups reset (sender) or dropped (receiver) because they fell behind.
    pub groups_reset: AtomicU64,
    /// Frames received; their age since origin ingest goes into `latency`.
    pub latency: Histogram,
}

impl Default for ClusterStats {
    fn default() -> Self {
        Self {
            peers_in: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            subscriptions_down: AtomicU64::new(0),
            subscriptions_up: AtomicU64::new(0),
            publications_in: AtomicU64::new(0),
            publications_out: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            groups_out: AtomicU64::new(0),
            groups_reset: AtomicU64::new(0),
            latency: Histogram::new(&LATENCY_BOUNDS_US),
        }
    }
}

/// The cluster link's figures (zeros on a node without one).
fn render_cluster(
    ctx: &crate::node::NodeContext,
    metric: &mut impl FnMut(&str, &str, &str, &[(String, f64)]),
) {
    let none = ClusterStats::default();
    let c = ctx.cluster_stats().unwrap_or(&none);
    let g = |a: &AtomicU64| vec![(String::new(), a.load(Relaxed) as f64)];
    let figures: [(&str, &str, &str, &AtomicU64); 11] = [
        (
            "castnode_cluster_peers",
            "gauge",
            "Nodes connected to this one over the cluster link.",
            &c.peers_in,
        ),
        (
            "castnode_cluster_refused_total",
            "counter",
            "Cluster connections refused (wrong token, bad HELLO).",
            &c.refused,
        ),
        (
            "castnode_cluster_subscriptions_down",
            "gauge",
            "Subscriptions other nodes hold on this one.",
            &c.subscriptions_down,
        ),
        (
            "castnode_cluster_subscriptions_up",
            "gauge",
            "Broadcasts this node fetches from upstream.",
            &c.subscriptions_up,
        ),
        (
            "castnode_cluster_publications_in",
            "gauge",
            "Broadcasts other nodes publish to this one.",
            &c.publications_in,
        ),
        (
            "castnode_cluster_publications_out",
            "gauge",
            "Broadcasts published here that this node pushes upstream.",
            &c.publications_out,
        ),
        (
            "castnode_cluster_failovers_total",
            "counter",
            "Upstream subscriptions moved to another upstream.",
            &c.failovers,
        ),
        (
            "castnode_cluster_bytes_out_total",
            "counter",
            "Bytes sent on group streams.",
            &c.bytes_out,
        ),
        (
            "castnode_cluster_bytes_in_total",
            "counter",
            "Bytes received on group streams.",
            &c.bytes_in,
        ),
        (
            "castnode_cluster_groups_out_total",
            "counter",
            "Groups sent to other nodes.",
            &c.groups_out,
        ),
        (
            "castnode_cluster_groups_reset_total",
            "counter",
            "Groups reset or dropped because they fell behind.",
            &c.groups_reset,
        ),
    ];
    for (name, kind, help, v) in figures {
        metric(name, kind, help, &g(v));
    }
    let (buckets, count, sum) = c.latency.snapshot();
    let mut samples: Vec<(String, f64)> = buckets
        .into_iter()
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), n as f64))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), count as f64));
    samples.push(("_sum".into(), sum));
    samples.push(("_count".into(), count as f64));
    metric(
        "castnode_cluster_latency_seconds",
        "histogram",
        "Age of received frames since their origin ingest (wall clock), per hop's arrival.",
        &samples,
    );
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the node's metrics in the Prometheus text format (version 0.0.4).
pub(crate) fn render(ctx: &crate::node::NodeContext) -> String {
    let (stats, hub) = (&ctx.stats, &ctx.hub);
    let running = ctx.transcoders.running();
    let mut s = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    let g = |a: &AtomicU64| vec![(String::new(), a.load(Relaxed) as f64)];
    let broadcasts = hub.broadcasts();
    let hs = hub.stats();
    metric(
        "castnode_broadcasts",
        "gauge",
        "Broadcasts on this node.",
        &[(String::new(), broadcasts.len() as f64)],
    );
    metric(
        "castnode_publishers",
        "gauge",
        "Publishers connected.",
        &g(&stats.publishers),
    );
    metric(
        "castnode_players",
        "gauge",
        "Players connected, by protocol.",
        &[
            (
                "{protocol=\"rtmp\"}".into(),
                stats.rtmp_players.load(Relaxed) as f64,
            ),
            (
                "{protocol=\"flv\"}".into(),
                stats.flv_players.load(Relaxed) as f64,
            ),
        ],
    );
    metric(
        "castnode_rtmp_connections",
        "gauge",
        "Open RTMP connections.",
        &g(&stats.rtmp_connections),
    );
    metric(
        "castnode_rtmp_refused_total",
        "counter",
        "RTMP connections refused at the limit.",
        &g(&stats.rtmp_refused),
    );
    metric(
        "castnode_rtmp_errors_total",
        "counter",
        "RTMP connections closed for an error.",
        &g(&stats.rtmp_errors),
    );
    metric(
        "castnode_players_stalled_total",
        "counter",
        "Players disconnected for not reading.",
        &g(&stats.players_stalled),
    );
    metric(
        "castnode_webrtc_viewers",
        "gauge",
        "WebRTC sessions, connected or connecting.",
        &g(&stats.webrtc_viewers),
    );
    metric(
        "castnode_webrtc_connected_total",
        "counter",
        "WebRTC sessions that connected.",
        &g(&stats.webrtc_connected),
    );
    metric(
        "castnode_webrtc_keyframe_requests_total",
        "counter",
        "PLI/FIR from WebRTC viewers.",
        &g(&stats.webrtc_keyframe_requests),
    );
    metric(
        "castnode_webrtc_publishers",
        "gauge",
        "WHIP publishers on this node.",
        &g(&stats.webrtc_publishers),
    );
    metric(
        "castnode_webrtc_ingest_gaps_total",
        "counter",
        "Losses in WHIP publishers' video after which the node waited for a keyframe.",
        &g(&stats.webrtc_ingest_gaps),
    );
    metric(
        "castnode_webrtc_keyframe_requests_sent_total",
        "counter",
        "Keyframe requests (PLI) sent to WHIP publishers.",
        &g(&stats.webrtc_keyframe_requests_sent),
    );
    metric(
        "castnode_webrtc_datagrams_dropped_total",
        "counter",
        "Datagrams no WebRTC session accepted.",
        &g(&stats.webrtc_datagrams_dropped),
    );
    metric(
        "castnode_transcoders",
        "gauge",
        "On-demand transcoders running, by kind.",
        &[
            ("{kind=\"aac_to_opus\"}".into(), running.aac_to_opus as f64),
            ("{kind=\"opus_to_aac\"}".into(), running.opus_to_aac as f64),
            (
                "{kind=\"bframe_reencode\"}".into(),
                running.bframe_reencode as f64,
            ),
        ],
    );
    metric(
        "castnode_bytes_in_total",
        "counter",
        "Media payload bytes received.",
        &g(&hs.bytes_in),
    );
    metric(
        "castnode_bytes_out_total",
        "counter",
        "Bytes sent to players.",
        &g(&hs.bytes_out),
    );
    metric(
        "castnode_frames_skipped_total",
        "counter",
        "Frames slow players skipped to catch up.",
        &g(&hs.frames_skipped),
    );
    let per = |f: &dyn Fn(&crate::media::hub::Broadcast) -> f64| -> Vec<(String, f64)> {
        broadcasts
            .iter()
            .map(|b| (format!("{{broadcast=\"{}\"}}", escape(b.name())), f(b)))
            .collect()
    };
    metric(
        "castnode_broadcast_ingest_bitrate_bps",
        "gauge",
        "Ingest bitrate of a broadcast over the last second of media.",
        &per(&|b| b.ingest_bitrate().round()),
    );
    metric(
        "castnode_broadcast_players",
        "gauge",
        "Players of a broadcast (people: RTMP, HTTP-FLV, WebRTC).",
        &per(&|b| b.stats.players.load(Relaxed) as f64),
    );
    metric(
        "castnode_broadcast_node_subscriptions",
        "gauge",
        "Other nodes reading a broadcast over the cluster link.",
        &per(&|b| b.stats.node_subscriptions.load(Relaxed) as f64),
    );
    metric(
        "castnode_broadcast_bytes_in_total",
        "counter",
        "Payload bytes received for a broadcast.",
        &per(&|b| b.stats.bytes_in.load(Relaxed) as f64),
    );
    metric(
        "castnode_broadcast_bytes_out_total",
        "counter",
        "Bytes sent to a broadcast's players.",
        &per(&|b| b.stats.bytes_out.load(Relaxed) as f64),
    );
    metric(
        "castnode_broadcast_frames_skipped_total",
        "counter",
        "Frames a broadcast's slow players skipped.",
        &per(&|b| b.stats.frames_skipped.load(Relaxed) as f64),
    );
    let rtc = ctx
        .webrtc
        .snapshot(|name| broadcasts.iter().any(|b| b.name() == name));
    let label = |name: &str| format!("broadcast=\"{}\"", escape(name));
    type RtcFigure = fn(&BroadcastRtcStats) -> &AtomicU64;
    let figures: [(&str, &str, &str, RtcFigure); 6] = [
        (
            "castnode_broadcast_webrtc_viewers",
            "gauge",
            "WHEP sessions of a broadcast (connected or connecting).",
            |r| &r.viewers,
        ),
        (
            "castnode_broadcast_webrtc_bytes_sent_total",
            "counter",
            "RTP bytes sent to a broadcast's WebRTC viewers, retransmissions included.",
            |r| &r.bytes_sent,
        ),
        (
            "castnode_broadcast_webrtc_retransmitted_bytes_total",
            "counter",
            "RTP bytes retransmitted to a broadcast's WebRTC viewers (answers to NACKs).",
            |r| &r.retransmitted_bytes,
        ),
        (
            "castnode_broadcast_webrtc_nacks_total",
            "counter",
            "NACKs received from a broadcast's WebRTC viewers.",
            |r| &r.nacks,
        ),
        (
            "castnode_broadcast_webrtc_plis_total",
            "counter",
            "PLIs received from a broadcast's WebRTC viewers.",
            |r| &r.plis,
        ),
        (
            "castnode_broadcast_webrtc_firs_total",
            "counter",
            "FIRs received from a broadcast's WebRTC viewers.",
            |r| &r.firs,
        ),
    ];
    for (name, kind, help, figure) in figures {
        let samples: Vec<_> = rtc
            .iter()
            .map(|(n, r)| (format!("{{{}}}", label(n)), figure(r).load(Relaxed) as f64))
            .collect();
        metric(name, kind, help, &samples);
    }
    let mut samples = Vec::new();
    for (n, r) in &rtc {
        let (buckets, count, sum) = r.ttff.snapshot();
        let l = label(n);
        for (le, c) in buckets {
            samples.push((format!("_bucket{{{l},le=\"{le}\"}}"), c as f64));
        }
        samples.push((format!("_bucket{{{l},le=\"+Inf\"}}"), count as f64));
        samples.push((format!("_sum{{{l}}}"), sum));
        samples.push((format!("_count{{{l}}}"), count as f64));
    }
    metric(
        "castnode_broadcast_webrtc_time_to_first_frame_seconds",
        "histogram",
        "From a WHEP offer to the first video frame handed to the viewer's connection.",
        &samples,
    );
    render_cluster(ctx, &mut metric);
    s
}

/// Upper bounds (milliseconds) of the time-to-first-frame histogram's buckets.
pub(crate) const TTFF_BUCKETS_MS: [u64; 10] =
    [50, 100, 200, 300, 500, 750, 1000, 2000, 5000, 10000];

/// A Prometheus-style cumulative histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, microseconds.
    bounds: &'static [u64],
    /// Observations at or below each bound (not cumulative here).
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Time-to-first-frame buckets, microseconds.
const TTFF_BOUNDS_US: [u64; TTFF_BUCKETS_MS.len()] = {
    let mut b = [0; TTFF_BUCKETS_MS.len()];
    let mut i = 0;
    while i < b.len() {
        b[i] = TTFF_BUCKETS_MS[i] * 1000;
        i += 1;
    }
    b
};

impl Default for Histogram {
    /// A histogram with the time-to-first-frame buckets.
    fn default() -> Self {
        Self::new(&TTFF_BOUNDS_US)
    }
}

impl Histogram {
    /// A histogram with buckets up to each of `bounds_us` (microseconds, ascending).
    pub(crate) fn new(bounds_us: &'static [u64]) -> Self {
        Self {
            bounds: bounds_us,
            buckets: bounds_us.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub(crate) fn observe(&self, d: Duration) {
        let us = d.as_micros() as u64;
        if let Some(i) = self.bounds.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// (upper bound in seconds, cumulative count) per bucket, then the total count and the sum in
    /// seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut acc = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(&b, n)| {
                acc += n.load(Relaxed);
                (b as f64 / 1e6, acc)
            })
            .collect();
        (
            buckets,
            self.count.load(Relaxed),
            self.sum_us.load(Relaxed) as f64 / 1e6,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        for ms in [10, 120, 120, 400, 60_000] {
            h.observe(Duration::from_millis(ms));
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 60.65).abs() < 1e-9);
        assert_eq!(buckets[0], (0.05, 1));
        assert_eq!(buckets[2], (0.2, 3));
        assert_eq!(buckets[4], (0.5, 4));
        // Over the last bound: only in +Inf (the count).
        assert_eq!(buckets.last().unwrap().1, 4);
    }
}
