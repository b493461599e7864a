//! Viewers arriving on an edge while the cluster lets go of a broadcast (real `castnode`
//! processes on 127.0.0.1): whenever a viewer arrives — before the edge's `--linger` ran out,
//! while the edge (or its relay) is dropping its upstream subscription, during the publish grace
//! that follows, or after it — it gets a live stream; and one arriving while the edge fails over
//! from a killed relay to the next upstream too.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "cluster-linger-test-token-0123456789";

/// How long each viewer reads, and the video frames it must get in that time (the fixtures are
/// 30 fps: 180 frames, less the start).
const READ: Duration = Duration::from_secs(6);
const MIN_FRAMES: usize = 150;

fn node(role: &str, upstreams: &[&Server], extra: &[&str]) -> Server {
    let list: Vec<String> = upstreams
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.cluster_port))
        .collect();
    let list = list.join(",");
    let mut args = vec!["--cluster-token", TOKEN];
    if !list.is_empty() {
        args.extend_from_slice(&["--upstream", &list]);
    }
    args.extend_from_slice(extra);
    Server::start_role(role, &args)
}

/// How a viewer plays.
#[derive(Clone, Copy, Debug)]
enum Player {
    Flv,
    Rtmp,
}

/// Plays `live/{key}` from `server` for `READ` of wall-clock time; the video frames (not
/// sequence headers) it got. 0 when it was refused.
fn watch(server_http: u16, server_rtmp: u16, key: &str, player: Player) -> usize {
    match player {
        Player::Flv => watch_flv(server_http, key),
        Player::Rtmp => watch_rtmp(server_rtmp, key),
    }
}

fn watch_flv(port: u16, key: &str) -> usize {
    read_flv_video(port, &format!("/live/{key}.flv"), READ).map_or(0, |f| f.len())
}

fn watch_rtmp(port: u16, key: &str) -> usize {
    use castnode::rtmp::client::ClientEvent;
    let end = Instant::now() + READ;
    let Ok(sock) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let Ok(mut c) = RtmpClient::try_open(sock, key, false) else {
        return 0;
    };
    let mut frames = 0;
    let mut buf = vec![0u8; 64 << 10];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let _ = c
            .sock
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let n = match c.sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        c.conn.handle_input(&buf[..n]).expect("valid RTMP");
        c.flush();
        while let Some(e) = c.conn.poll_event() {
            match e {
                ClientEvent::Media {
                    type_id: 9, body, ..
                } if body.len() >= 2 && body[1] == 1 => frames += 1,
                ClientEvent::Ended => return frames,
                _ => {}
            }
        }
    }
    frames
}

/// Publishers of `live/{prefix}{i}`, i < n, on `origin`, looping `obs-like.flv` long enough for
/// the test; waits until they are live.
fn publish_all(origin: &Server, prefix: &str, n: usize) -> Vec<Proc> {
    let src = fixture("obs-like.flv");
    let publishers: Vec<Proc> = (0..n)
        .map(|i| ffmpeg_publish(&origin.rtmp_url(&format!("{prefix}{i}")), &src, 6))
        .collect();
    for i in 0..n {
        origin.wait_live(&format!("live/{prefix}{i}"), Duration::from_secs(20));
    }
    publishers
}

/// The arrival sweep, at the default timings (`--linger 10` on the edge, `--publish-grace 5`
/// everywhere): a viewer watches an edge for 6 s and leaves; another arrives 8 s, 8.5 s, … 17 s
/// later. The edge drops its upstream subscription at 10 s and, before the fix, kept the
/// broadcast attachable in its publish grace until 15 s; the relay's `--linger 1` makes it let
/// go at about 11 s, so its own grace (to about 16 s) is swept too once the edge subscribes
/// again. So the sweep covers: before the edge's linger ran out (8–10 s), the edge and relay
/// letting go and their graces (10–16 s), after them (16–17 s). Each point is a broadcast of
/// its own with its own publisher, all at once; points alternate HTTP-FLV and RTMP viewers.
#[test]
fn a_viewer_arriving_while_the_edge_lets_go_gets_a_live_stream() {
    let origin = node("origin", &[], &[]);
    let relay = node("relay", &[&origin], &["--linger", "1"]);
    let edge = node(
        "edge",
        &[&relay],
        &["--linger", "10", "--publish-grace", "5"],
    );
    let offsets: Vec<f64> = (0..19).map(|i| 8.0 + 0.5 * f64::from(i)).collect();
    let _publishers = publish_all(&origin, "s", offsets.len());
    let (http, rtmp) = (edge.http_port, edge.rtmp_port);
    let threads: Vec<_> = offsets
        .iter()
        .enumerate()
        .map(|(i, &offset)| {
            let key = format!("s{i}");
            let player = if i % 2 == 0 {
                Player::Flv
            } else {
                Player::Rtmp
            };
            std::thread::spawn(move || {
                let first = watch(http, rtmp, &key, player);
                // Inherent: the arrival's offset after the last viewer left is what is swept.
                std::thread::sleep(Duration::from_secs_f64(offset));
                let second = watch(http, rtmp, &key, player);
                (offset, player, first, second)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (offset, player, first, second) in &results {
        println!(
            "arrival {offset:>4} s after the last viewer left ({player:?}): first viewer {first} \
             video frames, second {second}"
        );
    }
    let bad: Vec<_> = results
        .iter()
        .filter(|r| r.2 < MIN_FRAMES || r.3 < MIN_FRAMES)
        .collect();
    assert!(
        bad.is_empty(),
        "viewers with fewer than {MIN_FRAMES} video frames in {READ:?}: {bad:?}\nedge log:\n{}\n\
         relay log:\n{}",
        edge.log(),
        relay.log()
    );
    assert!(!edge.log().contains("panicked") && !relay.log().contains("panicked"));
}

/// The edge reads through relay A (then B); viewers of its broadcasts leave, the edge lingers,
/// relay A is killed, and new viewers arrive while the edge notices and fails over: each gets a
/// live stream.
#[test]
fn a_viewer_arriving_during_a_failover_gets_a_live_stream() {
    let origin = node("origin", &[], &[]);
    let mut relay_a = node("relay", &[&origin], &[]);
    let relay_b = node("relay", &[&origin], &[]);
    let edge = node("edge", &[&relay_a, &relay_b], &["--linger", "2"]);
    // Arrivals after the kill: the edge notices a dead upstream after 750 ms without packets.
    let arrivals = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5];
    let _publishers = publish_all(&origin, "f", arrivals.len());
    let (http, rtmp) = (edge.http_port, edge.rtmp_port);
    // First viewers: the edge subscribes through relay A; they leave, the edge lingers.
    let firsts: Vec<_> = (0..arrivals.len())
        .map(|i| std::thread::spawn(move || watch(http, rtmp, &format!("f{i}"), Player::Flv)))
        .collect();
    let firsts: Vec<usize> = firsts.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        relay_a.metric("castnode_cluster_subscriptions_down"),
        arrivals.len() as f64
    );
    // 1.5 s into the edge's 2 s linger: the linger would run out during the failover (inherent:
    // the kill's place in the linger is what is tested).
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    relay_a.kill();
    let seconds: Vec<_> = arrivals
        .iter()
        .enumerate()
        .map(|(i, &after)| {
            let player = if i % 2 == 0 {
                Player::Rtmp
            } else {
                Player::Flv
            };
            std::thread::spawn(move || {
                let at = killed + Duration::from_secs_f64(after);
                // Inherent: the arrival's time after the kill is what is swept.
                if let Some(wait) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                watch(http, rtmp, &format!("f{i}"), player)
            })
        })
        .collect();
    let seconds: Vec<usize> = seconds.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, after) in arrivals.iter().enumerate() {
        println!(
            "broadcast f{i}: first viewer {} video frames; one arriving {after} s after relay A's \
             kill: {}",
            firsts[i], seconds[i]
        );
    }
    assert!(
        firsts.iter().chain(&seconds).all(|&n| n >= MIN_FRAMES),
        "viewers with fewer than {MIN_FRAMES} video frames: {firsts:?} {seconds:?}\nedge log:\n{}",
        edge.log()
    );
    assert!(edge.metric("castnode_cluster_failovers_total") >= 1.0);
    assert!(!edge.log().contains("panicked"));
}

/// A WHEP viewer (headless Chromium) arriving on an edge after its linger ran out but within
/// what was the publish grace of the broadcast let go of (scaled: `--linger 2`,
/// `--publish-grace 8`; the browser starts once the edge logged that it let go, about 2 s after
/// the last viewer left, and its offer comes a second or two later, where the defaults' window
/// is 10–15 s) decodes the live stream.
#[test]
fn a_whep_viewer_arriving_while_the_edge_lets_go_gets_a_live_stream() {
    if !has_chromium() {
        return;
    }
    let origin = node("origin", &[], &[]);
    let relay = node("relay", &[&origin], &[]);
    let edge = node(
        "edge",
        &[&relay],
        &["--linger", "2", "--publish-grace", "8"],
    );
    let _publishers = publish_all(&origin, "w", 1);
    let first = watch(edge.http_port, edge.rtmp_port, "w0", Player::Flv);
    assert!(first >= MIN_FRAMES, "first viewer: {first} video frames");
    assert!(
        edge.wait_log(
            "no local viewers: upstream subscription dropped",
            Duration::from_secs(10)
        ),
        "the edge never let go:\n{}",
        edge.log()
    );
    let whep = format!("http://127.0.0.1:{}/whep/live/w0", edge.http_port);
    let (port, reports) = serve_page(whep_viewers_page(&whep, 1));
    let profile = temp_dir("chromium-profile-linger");
    let _browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the page reported within 60 s");
    println!("WHEP viewer arriving while the edge let go: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let viewer = &v
        .as_array()
        .unwrap_or_else(|| panic!("{report}\n{}", edge.log()))[0];
    let fps = viewer["fps"].as_f64().unwrap_or(0.0);
    assert!(fps >= 25.0, "{viewer}\nedge log:\n{}", edge.log());
}
