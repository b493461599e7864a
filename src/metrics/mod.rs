//! Node counters: the node's own ([`NodeStats`]), the cluster link's ([`ClusterStats`]) and the
//! per-broadcast WebRTC figures ([`webrtc`]), with the histogram they share. `/metrics` renders
//! them (`crate::http::metrics`); this module knows no protocol and no node.
//!
//! Counters are plain atomics owned by the node (drivers add to them); per-broadcast figures are
//! read from the hub when `/metrics` is scraped, so an ended broadcast leaves no stale series.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::time::Duration;

pub(crate) mod webrtc;

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
