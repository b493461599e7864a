//! ABR ladders made in process (`castnode standalone --ladder default`): an OBS-like 720p
//! publish (x264 high with B-frames + AAC, pushed by the ffmpeg CLI) gets the default ladder's
//! rungs that fit it; ffprobe reads each rung over HTTP-FLV and RTMP (`?rendition=NAME`) and
//! finds its height, 30 fps, no B-frames, and keyframes on the source's keyframe timestamps;
//! an unknown rung is refused (404, `NetStream.Play.StreamNotFound`). In Chromium, a WHEP
//! viewer plays a rung, and the player page's quality menu switches between rungs.

mod common;

use std::time::Duration;

use common::probe::*;
use common::*;

#[test]
fn standalone_ladder_renditions_on_flv_and_rtmp_with_the_sources_keyframes() {
    let server = Server::start(&["--ladder", "default"]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("abr"), &fixture("bench-720p.flv"), 100);
    server.wait_live("live/abr", Duration::from_secs(15));
    // The default ladder fitted to a 720p source: 720p and below, never 1080p.
    let mut renditions = Vec::new();
    let listed = wait_until(Duration::from_secs(10), || {
        let (_, _, body) = server.get("/api/v1/broadcasts");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        renditions = v["broadcasts"][0]["renditions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        renditions.len() == 4
    });
    assert!(
        listed,
        "renditions listed: {renditions:?}\n{}",
        server.log()
    );
    assert_eq!(renditions, ["720p", "480p", "360p", "240p"]);

    // The source and three rungs read at once over HTTP-FLV, one over RTMP.
    let urls = [
        server.flv_url("abr"),
        format!("{}?rendition=720p", server.flv_url("abr")),
        format!("{}?rendition=480p", server.flv_url("abr")),
        format!("{}?rendition=360p", server.flv_url("abr")),
        format!("{}?rendition=240p", server.rtmp_url("abr")),
    ];
    assert_rungs(&urls, &[720, 480, 360, 240]);

    // An unknown rung: 404 over HTTP-FLV, StreamNotFound over RTMP.
    let (status, _, _) = server.get("/live/abr.flv?rendition=999p");
    assert_eq!(status, 404);
    let out = probe_cmd(&format!("{}?rendition=999p", server.rtmp_url("abr")), 2)
        .output()
        .expect("ffprobe");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such rendition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(server.log().contains("ABR ladder started"));
}

/// A WHEP viewer in Chromium asks for a rung: it decodes the rung's size at full rate without
/// a freeze, and no B-frame re-encode runs for it (rungs have no B-frames). An unknown rung is
/// refused before any session starts.
#[test]
fn whep_viewer_plays_a_rung_in_chromium() {
    if !has_chromium() {
        return;
    }
    let server = Server::start(&["--ladder", "default"]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("w"), &fixture("obs-like.flv"), 100);
    server.wait_live("live/w", Duration::from_secs(15));
    let base = format!("http://127.0.0.1:{}/whep/live/w", server.http_port);
    let (status, _, body) = http_request(
        server.http_port,
        "POST",
        "/whep/live/w?rendition=999p",
        Some("application/sdp"),
        b"v=0\r\n",
    );
    assert_eq!(status, 404, "{body}");
    let (port, reports) = serve_page(whep_viewers_page(&format!("{base}?rendition=240p"), 1));
    let profile = temp_dir("chromium-profile-ladder");
    let _browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .expect("the page reported within 60 s");
    println!("ladder: viewer: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let viewer = &v
        .as_array()
        .unwrap_or_else(|| panic!("page failed: {report}\nserver log:\n{}", server.log()))[0];
    assert_eq!(
        (viewer["width"].as_u64(), viewer["height"].as_u64()),
        (Some(426), Some(240)),
        "{viewer}"
    );
    let fps = viewer["fps"].as_f64().unwrap_or(0.0);
    assert!(fps >= 25.0, "viewer decoded {fps} fps: {viewer}");
    assert_eq!(viewer["freezeCount"].as_u64(), Some(0), "{viewer}");
    // (The clip's frame counter is drawn for 640x360: the page cannot read it at 240p.)
    assert_eq!(
        server.metric("castnode_transcoders{kind=\"bframe_reencode\"}"),
        0.0,
        "a rung is played as it is"
    );
}

/// The test's page around the player page (same origin, [`serve_page_before`]): it opens
/// `/play/live/m?rendition=240p` in an iframe, waits for decoded 240p video, reads the quality
/// menu, chooses 360p in it as a user would, waits for decoded 360p video, and reports.
const MENU_PAGE: &str = r#"<!doctype html><html><head><meta charset="utf-8"></head><body><script>
"use strict";
const frame = document.createElement("iframe");
frame.src = "/play/live/m?rendition=240p";
frame.width = 800; frame.height = 450; frame.allow = "autoplay";
document.body.appendChild(frame);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, f, ms) {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    try { const v = f(); if (v) return v; } catch (e) { /* the page is still loading */ }
    await sleep(100);
  }
  throw new Error("waited " + ms + " ms for " + what);
}
const $ = (id) => frame.contentDocument.getElementById(id);
// The page's video once it is w×h: its size and the frames decoded over the next 3 s.
async function decoded(w, h) {
  const video = $("video");
  await until(w + "x" + h + " video", () => video.videoWidth === w && video.videoHeight === h, 30000);
  const before = video.getVideoPlaybackQuality().totalVideoFrames;
  await sleep(3000);
  return { width: video.videoWidth, height: video.videoHeight, frames: video.getVideoPlaybackQuality().totalVideoFrames - before };
}
(async () => {
  await until("the player page", () => frame.contentDocument.readyState === "complete" && $("quality"), 10000);
  const first = await decoded(426, 240);
  const select = $("quality");
  const label = frame.contentDocument.querySelector("label[for=quality]").textContent;
  await until("the rungs in the menu", () => [...select.options].some((o) => o.textContent.includes("×")), 20000);
  const options = [...select.options].map((o) => ({ value: o.value, label: o.textContent, selected: o.selected }));
  // The page's WHEP resource (a script-level binding of the page: read in its global scope).
  const firstResource = frame.contentWindow.eval("resource");
  select.value = "360p";
  select.dispatchEvent(new Event("change"));
  const second = await decoded(640, 360);
  return { first, label, options, firstResource, second, resource: frame.contentWindow.eval("resource"),
           search: frame.contentWindow.location.search };
})().then((r) => fetch("/report", { method: "POST", body: JSON.stringify(r) }))
  .catch((e) => fetch("/report", { method: "POST", body: JSON.stringify({ error: String(e) }) }));
</script></body></html>"#;

/// The player page's quality menu in Chromium, driven by a page of the test around it: opened
/// with `?rendition=240p` it plays that rung; the menu (a labelled select) lists the source and
/// the rungs with their sizes, learnt from the broadcasts API; choosing 360p in it deletes the
/// 240p session's WHEP resource and plays the 360p rung. No B-frame re-encode ran, so neither
/// session played the source. The first page links each rung's player; the standalone console
/// lists the rungs with their sizes and bitrates.
#[test]
fn play_page_quality_menu_plays_the_chosen_rung_in_chromium() {
    if !has_chromium() {
        return;
    }
    let server = Server::start(&["--ladder", "default"]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("m"), &fixture("obs-like.flv"), 100);
    server.wait_live("live/m", Duration::from_secs(15));
    let (port, reports, requests) = serve_page_before(MENU_PAGE.to_owned(), server.http_port);
    let profile = temp_dir("chromium-profile-menu");
    let browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(90))
        .expect("the page reported within 90 s");
    println!("ladder: menu: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        v.get("error").is_none(),
        "page failed: {report}\nrequests: {:?}\nserver log:\n{}",
        requests.lock().unwrap(),
        server.log()
    );
    let size = |p: &serde_json::Value| (p["width"].as_u64(), p["height"].as_u64());
    assert_eq!(size(&v["first"]), (Some(426), Some(240)), "{report}");
    assert_eq!(size(&v["second"]), (Some(640), Some(360)), "{report}");
    for p in [&v["first"], &v["second"]] {
        let frames = p["frames"].as_u64().unwrap_or(0);
        assert!(frames >= 30, "{frames} frames decoded in 3 s: {report}");
    }
    assert_eq!(v["label"], "Quality", "{report}");
    let options: Vec<(&str, &str, bool)> = v["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["value"].as_str().unwrap(),
                o["label"].as_str().unwrap(),
                o["selected"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        options,
        [
            ("", "Auto", false),
            ("360p", "360p (640×360)", false),
            ("240p", "240p (426×240)", true),
            ("source", "Source", false),
        ]
    );
    assert_eq!(
        v["search"], "?rendition=360p",
        "the page's URL names the rung"
    );
    // The switch: the 240p session's resource deleted, a 360p session made.
    let first = v["firstResource"].as_str().expect("a first resource");
    assert_ne!(v["resource"].as_str(), Some(first), "{report}");
    let seen = requests.lock().unwrap().clone();
    for want in [
        "POST /whep/live/m?rendition=240p HTTP/1.1".to_owned(),
        format!("DELETE {first} HTTP/1.1"),
        "POST /whep/live/m?rendition=360p HTTP/1.1".to_owned(),
    ] {
        assert!(seen.contains(&want), "no {want:?} in {seen:#?}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("castnode_webrtc_viewers")
            == 1.0),
        "the 240p session did not end"
    );
    assert_eq!(
        server.metric("castnode_transcoders{kind=\"bframe_reencode\"}"),
        0.0,
        "the source was played"
    );
    drop(browser);

    // The first page: a player link per rung.
    let (_, _, page) = server.get("/");
    for r in ["360p", "240p"] {
        let url = format!("http://127.0.0.1/play/live/m?rendition={r}");
        assert!(
            page.contains(&format!("<a href=\"{url}\">{r}</a>")),
            "{page}"
        );
    }
    // The console (standalone's, with the admin token it printed): the rungs, sized, with
    // their bitrates.
    const PREFIX: &str = "admin token (generated; shown only now): ";
    let printed = server.printed();
    let token = printed[printed.find(PREFIX).expect("an admin token printed") + PREFIX.len()..]
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let profile = temp_dir("chromium-profile-menu-console");
    let out = chromium_command(&profile)
        .args(["--dump-dom", "--virtual-time-budget=5000"])
        .arg(format!(
            "http://127.0.0.1:{}/console#token={token}",
            server.http_port
        ))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let row = dom
        .find("<td>live/m<br>")
        .map(|at| &dom[at..at + dom[at..].find("</td>").unwrap()])
        .unwrap_or_else(|| panic!("no live/m row with renditions in:\n{dom}"));
    for s in ["360p 640×360 ", "240p 426×240 "] {
        assert!(row.contains(s), "{row}");
    }
    assert_eq!(row.matches(" kbit/s").count(), 2, "{row}");
}
