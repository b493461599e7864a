//! The node's HTTP surface with real clients: health, metrics, the broadcasts API (codec,
//! resolution, fps, bitrate, B-frames, keyframe interval, players), HTTP-FLV headers and limits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

#[test]
fn api_metrics_and_flv_headers() {
    let server = Server::start(&["--max-players", "2"]);
    let (status, _, body) = server.get("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert_eq!(server.get("/live/nothing.flv").0, 404);
    assert_eq!(server.get("/not-a-stream").0, 404);

    let _a = ffmpeg_publish(&server.rtmp_url("m"), &fixture("obs-like.flv"), 1);
    let _b = ffmpeg_publish(&server.rtmp_url("base"), &fixture("baseline.flv"), 1);
    server.wait_live("live/m", Duration::from_secs(10));
    server.wait_live("live/base", Duration::from_secs(10));
    // Hold one HTTP-FLV player open and check its response headers.
    let mut flv = TcpStream::connect(("127.0.0.1", server.http_port)).unwrap();
    write!(flv, "GET /live/m.flv HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    flv.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = vec![0u8; 4096];
    let n = flv.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    for h in [
        "200 ok",
        "content-type: video/x-flv",
        "access-control-allow-origin: *",
        "transfer-encoding: chunked",
    ] {
        assert!(head.contains(h), "missing {h:?} in {head}");
    }
    // Wait for the ingest figures (a keyframe interval: two keyframes seen; a measured second of
    // fps and bitrate; the B-frames) and for the byte counters checked below to pass their marks.
    let mut v = serde_json::Value::Null;
    let measured = wait_until(Duration::from_secs(10), || {
        if server.metric("castnode_bytes_in_total") <= 500_000.0
            || server.metric("castnode_bytes_out_total") <= 100_000.0
        {
            return false;
        }
        let (status, _, body) = server.get("/api/v1/broadcasts");
        assert_eq!(status, 200);
        v = serde_json::from_str(&body).unwrap();
        v["broadcasts"].as_array().is_some_and(|a| {
            a.iter().any(|b| {
                let video = &b["tracks"][0];
                b["name"] == "live/m"
                    && video["keyframe_interval_s"].is_number()
                    && video["fps"].as_f64() > Some(0.0)
                    && video["bitrate_kbps"].as_f64() > Some(0.0)
                    && video["b_frames"] == true
            })
        })
    });
    assert!(
        measured,
        "no ingest figures for live/m: {v}\n{}",
        server.log()
    );
    println!("{}", serde_json::to_string_pretty(&v).unwrap());
    let list = v["broadcasts"].as_array().unwrap();
    let m = list.iter().find(|b| b["name"] == "live/m").unwrap();
    assert_eq!(m["players"], 1);
    let video = &m["tracks"][0];
    assert_eq!(
        (
            video["codec"].as_str(),
            video["width"].as_u64(),
            video["height"].as_u64()
        ),
        (Some("h264"), Some(640), Some(360))
    );
    assert_eq!(
        (video["profile"].as_str(), video["b_frames"].as_bool()),
        (Some("high"), Some(true))
    );
    assert_eq!(video["keyframe_interval_s"].as_f64(), Some(2.0));
    assert!(
        (video["fps"].as_f64().unwrap() - 30.0).abs() < 1.5,
        "{video}"
    );
    assert!(video["bitrate_kbps"].as_f64().unwrap() > 800.0, "{video}");
    let audio = &m["tracks"][1];
    assert_eq!(
        (
            audio["codec"].as_str(),
            audio["sample_rate"].as_u64(),
            audio["channels"].as_u64()
        ),
        (Some("aac"), Some(48000), Some(2))
    );
    let base = list.iter().find(|b| b["name"] == "live/base").unwrap();
    assert_eq!(base["tracks"][0]["b_frames"].as_bool(), Some(false));
    assert_eq!(base["tracks"][0]["profile"].as_str(), Some("baseline"));

    let (_, head, metrics) = server.get("/metrics");
    assert!(head.contains("text/plain"));
    for line in [
        "castnode_broadcasts 2",
        "castnode_publishers 2",
        "castnode_players{protocol=\"flv\"} 1",
        "castnode_broadcast_players{broadcast=\"live/m\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        server.metric("castnode_broadcast_ingest_bitrate_bps{broadcast=\"live/m\"}") > 1_000_000.0
    );
    assert!(server.metric("castnode_bytes_in_total") > 500_000.0);
    assert!(server.metric("castnode_bytes_out_total") > 100_000.0);

    // --max-players 2: a second player fits, a third gets 503 (HTTP-FLV) or StreamNotFound (RTMP).
    let _second = RtmpClient::connect(server.rtmp_port, "m", false);
    assert_eq!(server.get("/live/m.flv").0, 503);
    let refused = RtmpClient::try_open(
        TcpStream::connect(("127.0.0.1", server.rtmp_port)).unwrap(),
        "m",
        false,
    );
    assert_eq!(
        refused.err().as_deref(),
        Some("NetStream.Play.StreamNotFound")
    );
    assert!(server.log().contains("player limit reached"));
}

/// `GET /` with a `Host` header of the caller's choice: (status, head, body).
fn first_page(port: u16, host: &str) -> (u16, String, String) {
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    http_exchange("127.0.0.1", port, &head, b"")
}

/// The first page a person opens: `/` shows the OBS settings (even when nothing is live, which
/// it says), then every live broadcast with its browser, HTTP-FLV and RTMP links; HTTP links
/// name the host the page was asked from, RTMP links the node's public host and RTMP port.
#[test]
fn the_first_page_lists_broadcasts_and_obs_settings() {
    let server = Server::start(&[]);
    let host = format!("127.0.0.1:{}", server.http_port);
    let obs_server = format!("rtmp://127.0.0.1:{}/live", server.rtmp_port);
    let (status, head, page) = first_page(server.http_port, &host);
    assert_eq!(status, 200, "{head}");
    assert!(head.to_lowercase().contains("text/html"), "{head}");
    assert!(page.contains("Nothing is live"), "{page}");
    assert!(page.contains(&obs_server), "{page}");
    for link in [
        "/console",
        "/api/v1/broadcasts",
        "/metrics",
        "/publish/live/",
    ] {
        assert!(
            page.contains(&format!("http://{host}{link}")),
            "no {link} in {page}"
        );
    }

    let _publisher = ffmpeg_publish(&server.rtmp_url("first"), &fixture("baseline.flv"), 2);
    server.wait_live("live/first", Duration::from_secs(10));
    let (status, _, page) = first_page(server.http_port, &host);
    assert_eq!(status, 200);
    assert!(!page.contains("Nothing is live"), "{page}");
    for link in [
        format!("http://{host}/play/live/first"),
        format!("http://{host}/live/first.flv"),
        server.rtmp_url("first"),
        obs_server.clone(),
        "<code>first</code>".to_owned(),
    ] {
        assert!(page.contains(&link), "no {link} in {page}");
    }
    // Another Host header (a proxy, a DNS name): the HTTP links follow it.
    let (_, _, page) = first_page(server.http_port, "media.example.test:8443");
    assert!(
        page.contains("http://media.example.test:8443/play/live/first"),
        "{page}"
    );
}
