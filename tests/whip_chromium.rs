//! WHIP from headless Chromium (the built-in `/publish` page with Chromium's fake camera and
//! microphone) → a broadcast like any other: HTTP-FLV read by ffprobe/ffmpeg (H.264 + AAC, the
//! Opus turned into AAC once for FLV players) and WHEP viewers in a second Chromium. Skips (with
//! a message) where Chromium is not installed; `./setup.sh test` installs it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn whip_from_chromium_plays_over_flv_and_whep() {
    if !has_chromium() {
        return;
    }
    let server = Server::start(&[]);
    let http = server.http_port;
    let (status, head, page) = server.get("/publish/live/cam");
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("text/html") && page.contains("/whip/"),
        "{head}"
    );
    let profile = temp_dir("chromium-profile-whip");
    let _publisher = chromium(
        &format!("http://127.0.0.1:{http}/publish/live/cam?video=640x360"),
        &profile,
    );
    server.wait_live("live/cam", Duration::from_secs(30));
    assert_eq!(server.metric("castnode_webrtc_publishers"), 1.0);

    // HTTP-FLV: ffprobe sees H.264 and AAC.
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-rw_timeout", "10000000", "-show_entries"])
        .args(["stream=codec_name,width,height,sample_rate", "-of", "json"])
        .arg(server.flv_url("cam"))
        .output()
        .expect("run ffprobe");
    let streams: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap_or_default();
    println!("ffprobe: {streams}");
    let codecs: Vec<&str> = streams["streams"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["codec_name"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        codecs.contains(&"h264") && codecs.contains(&"aac"),
        "ffprobe found {codecs:?}: {}\nserver log:\n{}",
        String::from_utf8_lossy(&probe.stderr),
        server.log()
    );

    // ffmpeg reads 4 s of it: both streams flow, each in order.
    let dir = temp_dir("whip-flv");
    let out = dir.join("whip.framemd5");
    let mut reader = ffmpeg_framemd5(&server.flv_url("cam"), Some(4.0), &out);
    let done = reader.wait_for(Duration::from_secs(20));
    assert!(done.is_some_and(|s| s.success()), "ffmpeg did not finish");
    let packets = parse_framemd5(&std::fs::read_to_string(&out).unwrap());
    for stream in [0, 1] {
        let dts: Vec<i64> = packets
            .iter()
            .filter(|p| p.stream == stream)
            .map(|p| p.dts)
            .collect();
        println!("FLV stream {stream}: {} packets in 4 s", dts.len());
        assert!(dts.len() >= 40, "stream {stream}: {} packets", dts.len());
        assert!(
            dts.windows(2).all(|w| w[0] < w[1]),
            "stream {stream} out of order"
        );
    }

    // WHEP viewers in a second Chromium.
    let whep = format!("http://127.0.0.1:{http}/whep/live/cam");
    let (port, reports) = serve_page(whep_viewers_page(&whep, 2));
    let profile = temp_dir("chromium-profile-whip-viewers");
    let _viewers = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the page reported within 60 s");
    println!("WHIP → WHEP viewers: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let viewers = v
        .as_array()
        .unwrap_or_else(|| panic!("page failed: {report}\nserver log:\n{}", server.log()));
    for viewer in viewers {
        let fps = viewer["fps"].as_f64().unwrap_or(0.0);
        // Chromium's fake camera runs at 20 fps.
        assert!(fps >= 15.0, "viewer decoded {fps} fps: {viewer}");
        // The publisher is a browser encoding on the same loaded machine: a short stall of its
        // encoder is possible, a lasting one is not.
        let frozen = viewer["totalFreezesMs"].as_u64().unwrap_or(u64::MAX);
        assert!(frozen < 1000, "video froze for {frozen} ms: {viewer}");
        assert_eq!(
            (viewer["width"].as_u64(), viewer["height"].as_u64()),
            (Some(640), Some(360))
        );
        let samples = viewer["audioSamples"].as_u64().unwrap_or(0);
        assert!(samples > 400_000, "viewer received {samples} audio samples");
        println!(
            "viewer {}: time to first frame {:.0} ms, {fps} fps",
            viewer["i"],
            viewer["ttff"].as_f64().unwrap_or(-1.0)
        );
    }
    println!(
        "keyframe requests sent to the publisher: {}; ingest gaps: {}",
        server.metric("castnode_webrtc_keyframe_requests_sent_total"),
        server.metric("castnode_webrtc_ingest_gaps_total")
    );
}
