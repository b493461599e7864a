//! The cluster link with real `castnode` processes on 127.0.0.1: origin → relays → edges over
//! QUIC, fetched on demand; packets read on edges are byte-identical to the published ones; one
//! upstream subscription per relay whatever the number of edges; losing the relay in use costs an
//! edge's reader less than a second; nodes without the token get nothing.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

const TOKEN: &str = "cluster-test-token-0123456789";

fn origin() -> Server {
    Server::start_role("origin", &["--cluster-token", TOKEN])
}

fn downstream(role: &str, upstreams: &[&Server]) -> Server {
    let list: Vec<String> = upstreams
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.cluster_port))
        .collect();
    let list = list.join(",");
    Server::start_role(
        role,
        &[
            "--upstream",
            &list,
            "--cluster-token",
            TOKEN,
            "--linger",
            "2",
        ],
    )
}

/// Reads `seconds` of `server`'s `live/{key}` over HTTP-FLV (ffmpeg framemd5).
fn read_flv(server: &Server, key: &str, seconds: f64, name: &str) -> Proc {
    let out = temp_dir(name).join("flv.md5");
    ffmpeg_framemd5(&server.flv_url(key), Some(seconds), &out)
}

fn packets(name: &str) -> Vec<Packet> {
    let path = std::env::temp_dir()
        .join(format!("castnode-test-{name}-{}", std::process::id()))
        .join("flv.md5");
    parse_framemd5(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The p-quantile (0..1) of a Prometheus histogram's buckets, as the upper bound of the bucket
/// it falls in, in milliseconds.
fn histogram_quantile(server: &Server, name: &str, q: f64) -> f64 {
    let (_, _, body) = server.get("/metrics");
    let buckets: Vec<(f64, f64)> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket{{")))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

#[test]
fn origin_two_relays_two_edges_byte_identical() {
    let origin = origin();
    let relays = [
        downstream("relay", &[&origin]),
        downstream("relay", &[&origin]),
    ];
    let edges = [
        downstream("edge", &[&relays[0]]),
        downstream("edge", &[&relays[1]]),
    ];
    let src = fixture("obs-like.flv");
    let source_md5: HashSet<String> = source_packets(&src).into_iter().map(|p| p.md5).collect();
    let _publisher = ffmpeg_publish(&origin.rtmp_url("c"), &src, 0);
    origin.wait_live("live/c", Duration::from_secs(10));

    let mut readers: Vec<Proc> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| read_flv(e, "c", 4.0, &format!("edge{i}")))
        .collect();
    for (i, r) in readers.iter_mut().enumerate() {
        let done = r.wait_for(Duration::from_secs(30));
        assert!(
            done.is_some_and(|s| s.success()),
            "edge {i} reader failed:\n{}",
            edges[i].log()
        );
    }
    for i in 0..2 {
        let got = packets(&format!("edge{i}"));
        let video = got.iter().filter(|p| p.stream == 0).count();
        let audio = got.iter().filter(|p| p.stream == 1).count();
        println!("edge {i}: {video} video and {audio} audio packets");
        assert!(video >= 90 && audio >= 120, "edge {i}: too few packets");
        let foreign = got.iter().filter(|p| !source_md5.contains(&p.md5)).count();
        assert_eq!(
            foreign, 0,
            "edge {i}: packets that differ from the published ones"
        );
    }
    // One subscription per relay at the origin; each relay holds one upstream.
    assert_eq!(origin.metric("castnode_cluster_subscriptions_down"), 2.0);
    for r in &relays {
        assert_eq!(r.metric("castnode_cluster_subscriptions_up"), 1.0);
    }
    let (relay_p50, relay_p95) = (
        histogram_quantile(&relays[0], "castnode_cluster_latency_seconds", 0.5),
        histogram_quantile(&relays[0], "castnode_cluster_latency_seconds", 0.95),
    );
    let (edge_p50, edge_p95) = (
        histogram_quantile(&edges[0], "castnode_cluster_latency_seconds", 0.5),
        histogram_quantile(&edges[0], "castnode_cluster_latency_seconds", 0.95),
    );
    println!(
        "latency since origin ingest (bucket upper bounds): relay p50 ≤ {relay_p50} ms, p95 ≤ {relay_p95} ms; \
         edge p50 ≤ {edge_p50} ms, p95 ≤ {edge_p95} ms"
    );
    // A sanity bound for a debug build on a shared machine; the target (≤ 5 ms per hop) is
    // measured in BENCHMARKS.md with a release build.
    assert!(edge_p95 <= 200.0, "edge p95 {edge_p95} ms since ingest");
}

#[test]
fn three_edges_one_relay_one_origin_subscription_and_linger() {
    let origin = origin();
    let relay = downstream("relay", &[&origin]);
    let edges: Vec<Server> = (0..3).map(|_| downstream("edge", &[&relay])).collect();
    let _publisher = ffmpeg_publish(&origin.rtmp_url("m"), &fixture("baseline.flv"), 0);
    origin.wait_live("live/m", Duration::from_secs(10));
    let mut readers: Vec<Proc> = edges
        .iter()
        .enumerate()
        .map(|(i, e)| read_flv(e, "m", 3.0, &format!("m-edge{i}")))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(origin.metric("castnode_cluster_subscriptions_down"), 1.0);
    assert_eq!(relay.metric("castnode_cluster_subscriptions_down"), 3.0);
    for r in readers.iter_mut() {
        assert!(
            r.wait_for(Duration::from_secs(20))
                .is_some_and(|s| s.success())
        );
    }
    for i in 0..3 {
        let video = packets(&format!("m-edge{i}"))
            .iter()
            .filter(|p| p.stream == 0)
            .count();
        assert!(video >= 60, "edge {i}: {video} video packets");
    }
    // Readers gone: after the linger (2 s here) edges drop their subscriptions, then the relay.
    let dropped = wait_until(Duration::from_secs(10), || {
        origin.metric("castnode_cluster_subscriptions_down") == 0.0
    });
    assert!(dropped, "subscriptions not dropped:\n{}", relay.log());
    for e in &edges {
        assert_eq!(e.metric("castnode_cluster_subscriptions_up"), 0.0);
    }
}

#[test]
fn edge_survives_losing_its_relay() {
    let origin = origin();
    let mut relay_a = downstream("relay", &[&origin]);
    let relay_b = downstream("relay", &[&origin]);
    let edge = downstream("edge", &[&relay_a, &relay_b]);
    let _publisher = ffmpeg_publish(&origin.rtmp_url("f"), &fixture("obs-like.flv"), 0);
    origin.wait_live("live/f", Duration::from_secs(10));
    let mut reader = read_flv(&edge, "f", 8.0, "failover");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(relay_a.metric("castnode_cluster_subscriptions_down"), 1.0);
    relay_a.kill();
    assert!(
        reader
            .wait_for(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "reader failed:\n{}",
        edge.log()
    );
    let video: Vec<i64> = packets("failover")
        .iter()
        .filter(|p| p.stream == 0)
        .map(|p| p.dts)
        .collect();
    let gap = video
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(i64::MAX);
    println!(
        "edge reader: {} video packets, largest gap in video timestamps {gap} ms across the relay's kill -9",
        video.len()
    );
    assert!(video.len() >= 150, "{} video packets", video.len());
    assert!(gap <= 1000, "gap of {gap} ms:\n{}", edge.log());
    assert!(
        video.windows(2).all(|w| w[1] > w[0]),
        "video timestamps went back"
    );
    assert!(edge.metric("castnode_cluster_failovers_total") >= 1.0);
    assert_eq!(relay_b.metric("castnode_cluster_subscriptions_down"), 1.0);
}

#[test]
fn wrong_token_and_unknown_broadcasts() {
    let origin = origin();
    let intruder = Server::start_role(
        "edge",
        &[
            "--upstream",
            &format!("127.0.0.1:{}", origin.cluster_port),
            "--cluster-token",
            "not-the-cluster-token-at-all",
        ],
    );
    let _publisher = ffmpeg_publish(&origin.rtmp_url("s"), &fixture("baseline.flv"), 0);
    origin.wait_live("live/s", Duration::from_secs(10));
    let (status, _, _) = intruder.get("/live/s.flv");
    assert_eq!(status, 404);
    assert!(origin.metric("castnode_cluster_refused_total") >= 1.0);
    assert!(origin.log().contains("wrong cluster token"));
    // A member asking for a broadcast nobody has gets a quick 404.
    let edge = downstream("edge", &[&origin]);
    let t = std::time::Instant::now();
    let (status, _, _) = edge.get("/live/nobody.flv");
    assert_eq!(status, 404);
    println!("unknown broadcast answered in {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!origin.log().contains("panicked"));
}
