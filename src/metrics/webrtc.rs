//! Per-broadcast WebRTC figures for `/metrics`: viewers, time to first frame (a histogram),
//! bytes sent, NACKs, PLIs and FIRs received, and for `auto` (ABR) viewers their switches by
//! direction and the time they spent in each rendition.
//!
//! Guarantees: sessions hold their broadcast's counters (an `Arc`), so nothing on the media path
//! looks anything up; counters are atomics, read without locks; a broadcast's figures are
//! dropped once it has no viewers and is no longer live.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

pub(crate) use crate::metrics::Histogram;

/// One broadcast's WebRTC figures.
#[derive(Debug, Default)]
pub(crate) struct BroadcastRtcStats {
    /// WHEP sessions now (connected or connecting).
    pub(crate) viewers: AtomicU64,
    /// From the offer to the first video frame handed to the viewer's connection.
    pub(crate) ttff: Histogram,
    /// RTP bytes sent to viewers, retransmissions included.
    pub(crate) bytes_sent: AtomicU64,
    /// Of those, retransmitted (answers to NACKs).
    pub(crate) retransmitted_bytes: AtomicU64,
    /// NACKs received from viewers.
    pub(crate) nacks: AtomicU64,
    /// PLIs received from viewers.
    pub(crate) plis: AtomicU64,
    /// FIRs received from viewers.
    pub(crate) firs: AtomicU64,
    /// `auto` viewers' switches to a higher rendition.
    pub(crate) abr_switches_up: AtomicU64,
    /// `auto` viewers' switches to a lower rendition.
    pub(crate) abr_switches_down: AtomicU64,
    /// Milliseconds `auto` viewers played each rendition (`source` for the source), by name;
    /// a few entries, updated about once a second per viewer.
    abr_time: Mutex<Vec<(Arc<str>, u64)>>,
}

impl BroadcastRtcStats {
    /// `ms` more milliseconds played of rendition `name`.
    pub(crate) fn add_rendition_time(&self, name: &Arc<str>, ms: u64) {
        let mut t = self.abr_time.lock().unwrap_or_else(|p| p.into_inner());
        match t.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total += ms,
            None => t.push((name.clone(), ms)),
        }
    }

    /// Seconds played of each rendition, by name.
    pub(crate) fn rendition_seconds(&self) -> Vec<(Arc<str>, f64)> {
        let t = self.abr_time.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = t
            .iter()
            .map(|(n, ms)| (n.clone(), *ms as f64 / 1000.0))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The node's per-broadcast WebRTC figures.
#[derive(Debug, Default)]
pub(crate) struct WebrtcStats {
    broadcasts: Mutex<HashMap<Arc<str>, Arc<BroadcastRtcStats>>>,
}

impl WebrtcStats {
    /// The figures of `broadcast` (created on first use).
    pub(crate) fn broadcast(&self, broadcast: &Arc<str>) -> Arc<BroadcastRtcStats> {
        let mut map = self.broadcasts.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(broadcast.clone()).or_default().clone()
    }

    /// Every broadcast's figures, by name; forgets those with no viewers for which `live`
    /// says no.
    pub(crate) fn snapshot(
        &self,
        live: impl Fn(&str) -> bool,
    ) -> Vec<(Arc<str>, Arc<BroadcastRtcStats>)> {
        let mut map = self.broadcasts.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|name, s| s.viewers.load(Relaxed) > 0 || live(name));
        let mut all: Vec<_> = map.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_figures_and_forgetting() {
        let stats = WebrtcStats::default();
        let name: Arc<str> = "live/a".into();
        let b = stats.broadcast(&name);
        b.bytes_sent.fetch_add(1500, Relaxed);
        assert_eq!(stats.broadcast(&name).bytes_sent.load(Relaxed), 1500);
        assert_eq!(stats.snapshot(|_| true).len(), 1);
        assert_eq!(stats.snapshot(|_| false).len(), 0, "no viewers, not live");
        let b = stats.broadcast(&name);
        b.add_rendition_time(&"360p".into(), 1500);
        b.add_rendition_time(&"240p".into(), 250);
        b.add_rendition_time(&"360p".into(), 500);
        assert_eq!(
            b.rendition_seconds(),
            vec![("240p".into(), 0.25), ("360p".into(), 2.0)]
        );
    }
}
