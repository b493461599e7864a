//! `/metrics`: the node's counters ([`crate::metrics`]), the hub's per-broadcast figures and the
//! cluster link's, in the Prometheus text format (version 0.0.4).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::metrics::ClusterStats;
use crate::metrics::webrtc::BroadcastRtcStats;

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
        "castnode_abr_ladders",
        "gauge",
        "ABR ladders this node makes (--ladder on standalone; a transcoder's, one per job).",
        &[(
            String::new(),
            ctx.ladders.as_ref().map_or(0, |l| l.running()) as f64,
        )],
    );
    metric(
        "castnode_transcode_jobs",
        "gauge",
        "Transcode jobs this transcoder holds (running or waiting for their broadcast).",
        &[(String::new(), ctx.jobs.names().len() as f64)],
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
        for (direction, v) in [("up", &r.abr_switches_up), ("down", &r.abr_switches_down)] {
            samples.push((
                format!("{{{},direction=\"{direction}\"}}", label(n)),
                v.load(Relaxed) as f64,
            ));
        }
    }
    metric(
        "castnode_broadcast_webrtc_abr_switches_total",
        "counter",
        "Rendition switches of a broadcast's auto (ABR) WebRTC viewers, by direction.",
        &samples,
    );
    let mut samples = Vec::new();
    for (n, r) in &rtc {
        for (rendition, secs) in r.rendition_seconds() {
            samples.push((
                format!("{{{},rendition=\"{}\"}}", label(n), escape(&rendition)),
                secs,
            ));
        }
    }
    metric(
        "castnode_broadcast_webrtc_abr_rendition_seconds_total",
        "counter",
        "Seconds a broadcast's auto (ABR) WebRTC viewers played each rendition (source: the source).",
        &samples,
    );
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
