//! `--cycles N` (with `--protocol whep`): N WHEP sessions one after the other, to find what a
//! session leaves behind on the server. Each cycle is one [`whep_player`] that POSTs its offer,
//! connects (ICE + DTLS), waits for its first complete video frame (within
//! `--connect-timeout`) and DELETEs its session; the next cycle starts when the DELETE is
//! answered. A cycle succeeds when the frame came and the DELETE was answered 200.
//!
//! With `--server-pid` the server's RSS is read before the first cycle, after
//! `--cycles-warmup` cycles (the baseline: the first sessions grow allocator arenas and caches
//! that later ones reuse), after every tenth of the run, and at the end.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::watch;

use super::whep::{Millis, Stay, whep_player};
use super::{
    Args, CONNECTING, Protocol, PublisherStats, Setup, Shared, log, runtime, sample_server,
    start_publishing, viewer_cert,
};

/// Runs the cycles and reports them.
pub fn run(args: &Args, cycles: usize) -> anyhow::Result<CycleReport> {
    if args.protocol != Protocol::Whep {
        bail!("--cycles needs --protocol whep");
    }
    if cycles == 0 || !(args.connect_timeout.is_finite() && args.connect_timeout > 0.0) {
        bail!("--cycles and --connect-timeout must be positive");
    }
    let setup = Setup::new(args)?;
    runtime(args.threads)?.block_on(run_cycles(args, cycles, setup))
}

async fn run_cycles(args: &Args, n: usize, setup: Setup) -> anyhow::Result<CycleReport> {
    let target = setup.whep.context("--protocol whep needs --whep-url")?;
    let cert = viewer_cert()?;
    let pub_stats = Arc::new(PublisherStats::default());
    let t0 = start_publishing(args, &setup.rtmp, &setup.fixture, &pub_stats).await?;
    let rss = || args.server_pid.and_then(sample_server).map(|s| s.rss_kib);
    let rss_start = rss();
    if let (Some(pid), None) = (args.server_pid, rss_start) {
        bail!("cannot read /proc/{pid}/status");
    }
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(CONNECTING),
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        t0,
        base_ms: args.ts_base_ms,
        // The phase stays CONNECTING: nothing is measured in a window.
        lag_capacity: 0,
        connect_timeout: Duration::from_secs_f64(args.connect_timeout),
    });
    // Never set: a viewer ends at its first frame. Dropping the sender would end them at once.
    let (done_tx, done) = watch::channel(false);
    let mut c = Cycles::default();
    c.rss_samples.extend(rss_start.map(|kib| (0, kib)));
    let every = (n / 10).max(1);
    let start = Instant::now();
    let mut last_log = start;
    for i in 0..n {
        if i == args.cycles_warmup {
            c.rss_warm_kib = rss();
        }
        let began = Instant::now();
        let r = whep_player(
            target.clone(),
            cert.clone(),
            shared.clone(),
            done.clone(),
            Stay::FirstFrame,
        )
        .await;
        c.cycle_us.push(began.elapsed().as_micros() as u64);
        let w = r.whep.unwrap_or_default();
        c.answer_us.extend(w.answer_us);
        c.connected_us.extend(w.connected_us);
        c.first_frame_us.extend(w.first_frame_us);
        match w.first_frame_idr {
            Some(true) => c.first_idr.0 += 1,
            Some(false) => c.first_idr.1 += 1,
            None => {}
        }
        c.with_audio += usize::from(w.audio.packets > 0);
        let error = match (r.error, w.deleted) {
            (Some(e), _) => Some(e),
            (None, false) => Some("DELETE not answered 200".to_owned()),
            (None, true) => None,
        };
        match error {
            None => c.ok += 1,
            Some(e) => {
                c.failed += 1;
                match c.errors.iter_mut().find(|(m, _)| *m == e) {
                    Some((_, k)) => *k += 1,
                    None => c.errors.push((e, 1)),
                }
            }
        }
        if (i + 1) % every == 0 {
            c.rss_samples.extend(rss().map(|kib| (i + 1, kib)));
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            log(format_args!(
                "cycle {}/{n}: {} done, {} failed",
                i + 1,
                c.ok,
                c.failed
            ));
        }
        if c.failed >= args.cycles_max_failures.max(1) {
            c.stopped_early = true;
            log(format_args!(
                "stopping after {} failed cycles (--cycles-max-failures)",
                c.failed
            ));
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(done_tx);
    let rss_end = rss();
    c.errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    c.errors.truncate(8);
    Ok(CycleReport {
        url: args.whep_url.clone().unwrap_or_default(),
        requested: n,
        done: c.ok,
        failed: c.failed,
        stopped_early: c.stopped_early,
        elapsed_s: elapsed,
        cycle: Millis::of(c.cycle_us),
        answer: Millis::of(c.answer_us),
        connected: Millis::of(c.connected_us),
        first_frame: Millis::of(c.first_frame_us),
        first_idr: c.first_idr,
        with_audio: c.with_audio,
        warmup_cycles: args.cycles_warmup,
        rss_start_kib: rss_start,
        rss_warm_kib: c.rss_warm_kib,
        rss_end_kib: rss_end,
        rss_samples: c.rss_samples,
        publisher_error: pub_stats
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        errors: c.errors,
    })
}

/// What the cycles collect as they go.
#[derive(Default)]
struct Cycles {
    ok: usize,
    failed: usize,
    stopped_early: bool,
    cycle_us: Vec<u64>,
    answer_us: Vec<u64>,
    connected_us: Vec<u64>,
    first_frame_us: Vec<u64>,
    first_idr: (usize, usize),
    with_audio: usize,
    rss_warm_kib: Option<u64>,
    rss_samples: Vec<(usize, u64)>,
    errors: Vec<(String, usize)>,
}

/// The report of a `--cycles` run.
pub struct CycleReport {
    url: String,
    requested: usize,
    /// Cycles whose first frame came and whose DELETE was answered 200.
    done: usize,
    failed: usize,
    /// The run stopped at `--cycles-max-failures`.
    stopped_early: bool,
    elapsed_s: f64,
    /// Start of the POST to the DELETE's answer.
    cycle: Option<Millis>,
    /// POST → 201.
    answer: Option<Millis>,
    /// POST → ICE + DTLS connected.
    connected: Option<Millis>,
    /// POST → first complete video frame.
    first_frame: Option<Millis>,
    /// Cycles whose first video frame carried an IDR, and those whose did not.
    first_idr: (usize, usize),
    /// Cycles that received an audio packet before they ended.
    with_audio: usize,
    warmup_cycles: usize,
    rss_start_kib: Option<u64>,
    /// After `warmup_cycles` cycles (`None` when the run was not that long).
    rss_warm_kib: Option<u64>,
    rss_end_kib: Option<u64>,
    /// (cycles done, RSS) every tenth of the run.
    rss_samples: Vec<(usize, u64)>,
    publisher_error: Option<String>,
    errors: Vec<(String, usize)>,
}

impl CycleReport {
    fn cycles_per_s(&self) -> f64 {
        (self.done + self.failed) as f64 / self.elapsed_s.max(1e-9)
    }

    /// End RSS relative to the warm-up baseline, in percent.
    fn rss_growth_pct(&self) -> Option<f64> {
        let (w, e) = (self.rss_warm_kib?, self.rss_end_kib?);
        Some((e as f64 - w as f64) * 100.0 / w.max(1) as f64)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        json!({
            "protocol": "whep",
            "mode": "cycles",
            "url": self.url,
            "cycles": {
                "requested": self.requested,
                "done": self.done,
                "failed": self.failed,
                "stopped_early": self.stopped_early,
                "elapsed_s": r1(self.elapsed_s),
                "per_s": r1(self.cycles_per_s()),
            },
            "cycle_ms": self.cycle.map(Millis::to_json),
            "answer_ms": self.answer.map(Millis::to_json),
            "connected_ms": self.connected.map(Millis::to_json),
            "first_frame_ms": self.first_frame.map(Millis::to_json),
            "first_frame_idr": { "yes": self.first_idr.0, "no": self.first_idr.1 },
            "cycles_with_audio": self.with_audio,
            "server": {
                "warmup_cycles": self.warmup_cycles,
                "rss_start_kib": self.rss_start_kib,
                "rss_warm_kib": self.rss_warm_kib,
                "rss_end_kib": self.rss_end_kib,
                "rss_growth_pct": self.rss_growth_pct().map(r1),
                "rss_samples": self.rss_samples.iter()
                    .map(|(c, kib)| json!({ "cycles": c, "rss_kib": kib }))
                    .collect::<Vec<_>>(),
            },
            "publisher_error": self.publisher_error,
            "errors": self.errors.iter()
                .map(|(e, n)| json!({ "error": e, "cycles": n }))
                .collect::<Vec<_>>(),
        })
    }
}

impl fmt::Display for CycleReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "castnode-load: WHEP cycles of {}", self.url)?;
        writeln!(
            f,
            "  cycles             {} requested, {} done, {} failed{} in {:.1} s ({:.1}/s)",
            self.requested,
            self.done,
            self.failed,
            if self.stopped_early {
                " (stopped early)"
            } else {
                ""
            },
            self.elapsed_s,
            self.cycles_per_s()
        )?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, m: &Option<Millis>| match m {
            Some(m) => writeln!(f, "  {name:<19}{m} ({} cycles)", m.n),
            None => writeln!(f, "  {name:<19}none"),
        };
        line(f, "cycle (to DELETE)", &self.cycle)?;
        line(f, "first frame", &self.first_frame)?;
        line(f, "ICE+DTLS connected", &self.connected)?;
        line(f, "WHEP answer", &self.answer)?;
        writeln!(
            f,
            "  first frame IDR    {} cycles; not an IDR: {}",
            self.first_idr.0, self.first_idr.1
        )?;
        writeln!(
            f,
            "  audio              {} cycles got an audio packet before their DELETE",
            self.with_audio
        )?;
        if let Some(start) = self.rss_start_kib {
            let kib = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            write!(
                f,
                "  server RSS         {start} KiB before, {} after {} cycles, {} at the end",
                kib(self.rss_warm_kib),
                self.warmup_cycles,
                kib(self.rss_end_kib)
            )?;
            if let Some(p) = self.rss_growth_pct() {
                write!(f, " ({p:+.1}% over the warm-up)")?;
            }
            writeln!(f)?;
            let samples: Vec<String> = self
                .rss_samples
                .iter()
                .map(|(c, kib)| format!("{c}: {kib}"))
                .collect();
            writeln!(f, "  RSS by cycle (KiB) {}", samples.join(", "))?;
        }
        if let Some(e) = &self.publisher_error {
            writeln!(f, "  publisher error    {e}")?;
        }
        for (e, n) in &self.errors {
            writeln!(f, "  error              {n} cycles: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report() {
        let r = CycleReport {
            url: "http://h:1/whep/live/k".into(),
            requested: 4,
            done: 3,
            failed: 1,
            stopped_early: false,
            elapsed_s: 2.0,
            cycle: Millis::of(vec![100_000, 200_000, 300_000, 5_000_000]),
            answer: None,
            connected: None,
            first_frame: Millis::of(vec![50_000, 60_000, 70_000]),
            first_idr: (3, 0),
            with_audio: 2,
            warmup_cycles: 2,
            rss_start_kib: Some(1000),
            rss_warm_kib: Some(2000),
            rss_end_kib: Some(2100),
            rss_samples: vec![(0, 1000), (2, 2000), (4, 2100)],
            publisher_error: None,
            errors: vec![("no complete video frame in time".into(), 1)],
        };
        let j = r.to_json();
        assert_eq!(j["cycles"]["done"], 3);
        assert_eq!(j["cycles"]["per_s"], 2.0);
        assert_eq!(j["cycle_ms"]["p50"], 200.0);
        assert_eq!(j["cycle_ms"]["max"], 5000.0);
        assert_eq!(j["first_frame_ms"]["p95"], 70.0);
        assert_eq!(j["server"]["rss_warm_kib"], 2000);
        assert_eq!(j["server"]["rss_growth_pct"], 5.0);
        assert_eq!(j["server"]["rss_samples"][2]["rss_kib"], 2100);
        assert_eq!(j["errors"][0]["cycles"], 1);
        let text = r.to_string();
        assert!(text.contains("3 done, 1 failed in 2.0 s (2.0/s)"), "{text}");
        assert!(text.contains("(+5.0% over the warm-up)"), "{text}");
    }
}
