//! 2 publishers × 20 players (10 RTMP + 10 HTTP-FLV each, all ffmpeg) for 30 s: every player
//! receives every frame of its broadcast from the moment it joined to the end, in order.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn two_publishers_twenty_players_each_get_every_frame() {
    let server = Server::start(&["--publish-grace", "1"]);
    let dir = temp_dir("fanout");
    let clips = [
        ("a", fixture("obs-like.flv")),
        ("b", fixture("baseline.flv")),
    ];
    // 3 plays of a 10 s clip: 30 s of publishing each.
    let publishers: Vec<Proc> = clips
        .iter()
        .map(|(k, f)| ffmpeg_publish(&server.rtmp_url(k), f, 2))
        .collect();
    for (k, _) in &clips {
        server.wait_live(&format!("live/{k}"), Duration::from_secs(10));
    }
    let mut players = Vec::new();
    for (k, _) in &clips {
        for i in 0..20 {
            let url = if i % 2 == 0 {
                server.rtmp_url(k)
            } else {
                server.flv_url(k)
            };
            let out = dir.join(format!("{k}-{i}.md5"));
            players.push((
                k.to_string(),
                url.clone(),
                out.clone(),
                ffmpeg_framemd5(&url, None, &out),
            ));
        }
    }
    // Publishers finish after ~30 s; players end at end-of-stream, one grace second later.
    for mut p in publishers {
        assert!(
            p.wait_for(Duration::from_secs(60))
                .is_some_and(|s| s.success()),
            "publisher failed"
        );
    }
    let sources: Vec<_> = clips
        .iter()
        .map(|(k, f)| (k.to_string(), source_packets(f)))
        .collect();
    for (k, url, out, mut proc) in players {
        let status = proc.wait_for(Duration::from_secs(20));
        assert!(
            status.is_some(),
            "{url}: player did not stop at end of stream"
        );
        let got = parse_framemd5(&std::fs::read_to_string(&out).unwrap());
        let source = &sources.iter().find(|(sk, _)| *sk == k).unwrap().1;
        let counts = assert_contiguous(&url, source, &got);
        for stream in [0u32, 1] {
            let last_src = source.iter().rfind(|p| p.stream == stream).map(|p| &p.md5);
            let last_got = got.iter().rfind(|p| p.stream == stream).map(|p| &p.md5);
            let in_source = source.iter().filter(|p| p.stream == stream).count();
            assert!(
                counts[stream as usize] > in_source * 2,
                "{url}: stream {stream}: only {counts:?} packets"
            );
            assert_eq!(
                last_got, last_src,
                "{url}: stream {stream} does not end with the last frame"
            );
        }
        println!(
            "{url}: {} packets, contiguous, through the last frame",
            got.len()
        );
    }
    let skipped = server.metric("castnode_frames_skipped_total");
    assert_eq!(skipped, 0.0, "players skipped frames");
}
