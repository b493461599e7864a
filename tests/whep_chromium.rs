//! RTMP (ffmpeg: the OBS-like clip with B-frames, and a clip without) → WHEP in headless
//! Chromium: several viewers in one page each decode video at the source's frame rate with no
//! freezes, see the clip's frame counter only go up (order kept) and receive audio (AAC transcoded to Opus once for all of them), through castnode's
//! one UDP port; B-frames are removed by one re-encode shared by all viewers, a clip without them
//! is passed through. The tests report time to first frame. Skips (with a message) where Chromium is not
//! installed; `./setup.sh test` installs it.

mod common;

use std::time::Duration;

use common::*;

const VIEWERS: usize = 3;

/// Publishes `clip` over RTMP, opens VIEWERS WHEP viewers in one headless Chromium page and
/// checks each decodes ≥ 25 fps for 10 s without freezes and receives audio. Returns the server
/// (still running) for further checks, or `None` where Chromium is missing.
fn watch_in_chromium(clip: &str) -> Option<Server> {
    if !has_chromium() {
        return None;
    }
    let server = Server::start(&[]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("w"), &fixture(clip), 2);
    server.wait_live("live/w", Duration::from_secs(10));
    let whep = format!("http://127.0.0.1:{}/whep/live/w", server.http_port);
    let (port, reports) = serve_page(whep_viewers_page(&whep, VIEWERS));
    let profile = temp_dir(&format!("chromium-profile-{clip}"));
    let _browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the page reported within 60 s");
    println!("{clip}: viewers: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let viewers = v
        .as_array()
        .unwrap_or_else(|| panic!("page failed: {report}\nserver log:\n{}", server.log()));
    assert_eq!(viewers.len(), VIEWERS);
    for viewer in viewers {
        let fps = viewer["fps"].as_f64().unwrap_or(0.0);
        assert!(fps >= 25.0, "viewer decoded {fps} fps: {viewer}");
        assert_eq!(viewer["freezeCount"].as_u64(), Some(0), "{viewer}");
        assert_eq!(
            (viewer["width"].as_u64(), viewer["height"].as_u64()),
            (Some(640), Some(360))
        );
        // The clip's frame counter, read from every presented frame, never goes back.
        let counted = viewer["counterFrames"].as_u64().unwrap_or(0);
        assert!(counted >= 250, "only {counted} frames presented: {viewer}");
        assert_eq!(
            viewer["counterBackward"].as_u64(),
            Some(0),
            "frames out of order: {viewer}"
        );
        // AAC from RTMP reaches WebRTC as Opus (transcoded once per broadcast): 10 s at 48 kHz.
        let samples = viewer["audioSamples"].as_u64().unwrap_or(0);
        assert!(
            samples > 400_000,
            "viewer received {samples} audio samples: {viewer}"
        );
        // The browser's consent checks (every ~5 s) are answered all along, also after the
        // server let go of the session's str0m state (3 s after connecting).
        let consent = viewer["consentResponses"].as_u64().unwrap_or(0);
        assert!(
            consent >= 1,
            "{consent} consent checks answered in 10 s: {viewer}"
        );
        // The DTLS-SRTP profile castnode's DTLS server picks from Chromium's offer (which lists
        // AEAD_AES_256_GCM first): AEAD_AES_128_GCM (vendor/README.md).
        // Chromium names it "SRTP_AEAD_AES_128_GCM".
        let cipher = viewer["srtpCipher"].as_str().unwrap_or("");
        assert!(
            cipher.ends_with("AEAD_AES_128_GCM"),
            "SRTP {cipher}: {viewer}"
        );
        // castnode's RTCP sender reports (one a second per stream) reach the browser.
        for kind in ["videoReports", "audioReports"] {
            let n = viewer[kind].as_u64().unwrap_or(0);
            assert!(n >= 5, "{n} {kind} read by the browser: {viewer}");
        }
        let ms = |k: &str| viewer[k].as_f64().unwrap_or(-1.0);
        println!(
            "{clip}: viewer {}: time to first frame {:.0} ms (answer {:.0}, connected {:.0}, \
             first video packet {:.0}, first frame presented {:.0}), {fps} fps",
            viewer["i"],
            ms("ttff"),
            ms("answerMs"),
            ms("connectedMs"),
            ms("firstPacketMs"),
            ms("ttff"),
        );
    }
    assert!(server.metric("castnode_webrtc_connected_total") >= VIEWERS as f64);
    // Per-broadcast WebRTC figures.
    let b = "{broadcast=\"live/w\"}";
    let ttffs = server.metric(&format!(
        "castnode_broadcast_webrtc_time_to_first_frame_seconds_count{b}"
    ));
    assert!(ttffs >= VIEWERS as f64, "{ttffs} first frames counted");
    let sent = server.metric(&format!("castnode_broadcast_webrtc_bytes_sent_total{b}"));
    // Each viewer got at least 10 s of ≥ 100 kbit/s (the re-encode of the mostly static
    // clip needs little more).
    assert!(sent > VIEWERS as f64 * 125_000.0, "{sent} bytes sent");
    println!(
        "{clip}: WebRTC bytes sent {sent}, NACKs {}, PLIs {}",
        server.metric(&format!("castnode_broadcast_webrtc_nacks_total{b}")),
        server.metric(&format!("castnode_broadcast_webrtc_plis_total{b}"))
    );
    assert_eq!(
        server.metric("castnode_transcoders{kind=\"aac_to_opus\"}"),
        1.0,
        "one AAC → Opus for all viewers"
    );
    Some(server)
}

/// Without B-frames, video is passed through: no re-encode runs.
#[test]
fn rtmp_without_b_frames_to_whep_is_passed_through() {
    if let Some(server) = watch_in_chromium("baseline.flv") {
        assert_eq!(
            server.metric("castnode_transcoders{kind=\"bframe_reencode\"}"),
            0.0
        );
    }
}

/// OBS's default (x264 High with B-frames) is re-encoded once for all WebRTC viewers.
#[test]
fn rtmp_with_b_frames_to_whep_is_reencoded_once() {
    if let Some(server) = watch_in_chromium("obs-like.flv") {
        assert_eq!(
            server.metric("castnode_transcoders{kind=\"bframe_reencode\"}"),
            1.0
        );
    }
}

/// The built-in player page (`/play/{app}/{key}`) connects over WHEP from a browser.
#[test]
fn player_page_plays_in_chromium() {
    if !has_chromium() {
        return;
    }
    let server = Server::start(&[]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("p"), &fixture("baseline.flv"), 1);
    server.wait_live("live/p", Duration::from_secs(10));
    let (status, head, page) = server.get("/play/live/p");
    assert_eq!(status, 200);
    assert!(
        head.to_lowercase().contains("text/html") && page.contains("/whep/"),
        "{head}"
    );
    let profile = temp_dir("chromium-profile-play");
    let _browser = chromium(
        &format!("http://127.0.0.1:{}/play/live/p", server.http_port),
        &profile,
    );
    let connected = wait_until(Duration::from_secs(20), || {
        server.metric("castnode_webrtc_connected_total") >= 1.0
    });
    assert!(
        connected,
        "the player page did not connect:\n{}",
        server.log()
    );
}
