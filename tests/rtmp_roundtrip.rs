//! ffmpeg publishes the OBS-like fixture; ffmpeg reads it back over RTMP and HTTP-FLV; every
//! packet read back is byte-identical to a published one.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

fn check_roundtrip(fixture_name: &str) {
    let server = Server::start(&[]);
    let src = fixture(fixture_name);
    let source = source_packets(&src);
    let source_md5: HashSet<&str> = source.iter().map(|p| p.md5.as_str()).collect();
    let _publisher = ffmpeg_publish(&server.rtmp_url("t"), &src, 0);
    server.wait_live("live/t", Duration::from_secs(10));

    let dir = temp_dir(&format!("roundtrip-{fixture_name}"));
    let rtmp_out = dir.join("rtmp.md5");
    let flv_out = dir.join("flv.md5");
    let mut rtmp = ffmpeg_framemd5(&server.rtmp_url("t"), Some(4.0), &rtmp_out);
    let mut flv = ffmpeg_framemd5(&server.flv_url("t"), Some(4.0), &flv_out);
    assert!(
        rtmp.wait_for(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "RTMP reader failed"
    );
    assert!(
        flv.wait_for(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "FLV reader failed"
    );

    for (what, path) in [("RTMP", &rtmp_out), ("HTTP-FLV", &flv_out)] {
        let got = parse_framemd5(&std::fs::read_to_string(path).unwrap());
        let video = got.iter().filter(|p| p.stream == 0).count();
        let audio = got.iter().filter(|p| p.stream == 1).count();
        println!("{what}: {video} video and {audio} audio packets read back");
        assert!(
            video >= 90 && audio >= 120,
            "{what}: too few packets ({video} video, {audio} audio)"
        );
        let foreign: Vec<_> = got
            .iter()
            .filter(|p| !source_md5.contains(p.md5.as_str()))
            .collect();
        assert!(
            foreign.is_empty(),
            "{what}: {} packets differ from every published one: {:?}",
            foreign.len(),
            &foreign[..foreign.len().min(3)]
        );
    }
}

#[test]
fn obs_like_clip_round_trips_byte_identical() {
    check_roundtrip("obs-like.flv");
}

#[test]
fn baseline_clip_round_trips_byte_identical() {
    check_roundtrip("baseline.flv");
}
