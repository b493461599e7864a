//! RTMP (ffmpeg: the OBS-like clip with B-frames, and a clip without) → WHEP in headless
//! Chromium: several viewers in one page each decode video at the source's frame rate with no
//! freezes and receive audio (AAC transcoded to Opus once for all of them), through castnode's
//! one UDP port; B-frames are removed by one re-encode shared by all viewers, a clip without them
//! is passed through. The tests report time to first frame. Skips (with a message) where Chromium is not
//! installed; `./setup.sh test` installs it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const VIEWERS: usize = 3;

fn page(whep: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const WHEP = "{whep}";
async function viewer(i) {{
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {{ direction: "recvonly" }});
  pc.addTransceiver("audio", {{ direction: "recvonly" }});
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  const stream = new MediaStream();
  video.srcObject = stream;
  pc.ontrack = (e) => stream.addTrack(e.track);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((r) => {{
    if (pc.iceGatheringState === "complete") return r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r();
    setTimeout(r, 2000);
  }});
  const t0 = performance.now();
  const res = await fetch(WHEP, {{ method: "POST", headers: {{ "Content-Type": "application/sdp" }}, body: pc.localDescription.sdp }});
  if (res.status !== 201) throw new Error("WHEP answered " + res.status + ": " + await res.text());
  const location = res.headers.get("Location");
  await pc.setRemoteDescription({{ type: "answer", sdp: await res.text() }});
  const ttff = await new Promise((r) => video.requestVideoFrameCallback(() => r(performance.now() - t0)));
  const stats = async (kind) => {{
    let v = null;
    (await pc.getStats()).forEach((s) => {{ if (s.type === "inbound-rtp" && s.kind === kind) v = s; }});
    return v || {{}};
  }};
  // Measure the 10 s after the start-up second (the first group arrives as a burst).
  await new Promise((r) => setTimeout(r, 1000));
  const a = await stats("video");
  await new Promise((r) => setTimeout(r, 10000));
  const b = await stats("video");
  const audio = await stats("audio");
  return {{ i, location, ttff, fps: (b.framesDecoded - a.framesDecoded) / 10, framesDecoded: b.framesDecoded,
           freezeCount: b.freezeCount - (a.freezeCount || 0), freezesAtStart: a.freezeCount || 0, packetsLost: b.packetsLost, width: b.frameWidth, height: b.frameHeight,
           audioSamples: audio.totalSamplesReceived || 0, audioPackets: audio.packetsReceived || 0,
           state: pc.connectionState }};
}}
Promise.all([...Array({VIEWERS}).keys()].map(viewer))
  .then((r) => fetch("/report", {{ method: "POST", body: JSON.stringify(r) }}))
  .catch((e) => fetch("/report", {{ method: "POST", body: JSON.stringify({{ error: String(e) }}) }}));
</script></body></html>"#
    )
}

/// Serves `html` at `/` and returns the body POSTed to `/report`.
fn serve_page(html: String) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let mut len = 0;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let (ctype, out) = if line.starts_with("POST /report") {
                let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
                ("text/plain", String::new())
            } else {
                ("text/html", html.clone())
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                out.len()
            );
        }
    });
    (port, rx)
}

/// Headless Chromium on `url` with the flags WebRTC on loopback needs (see TESTING.md).
fn chromium(url: &str, profile: &std::path::Path) -> Proc {
    Proc(
        Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--autoplay-policy=no-user-gesture-required",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    )
}

/// Publishes `clip` over RTMP, opens VIEWERS WHEP viewers in one headless Chromium page and
/// checks each decodes ≥ 25 fps for 10 s without freezes and receives audio. Returns the server
/// (still running) for further checks, or `None` where Chromium is missing.
fn watch_in_chromium(clip: &str) -> Option<Server> {
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("SKIPPED: chromium is not installed (./setup.sh test installs it)");
        return None;
    }
    let server = Server::start(&[]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("w"), &fixture(clip), 2);
    server.wait_live("live/w", Duration::from_secs(10));
    let whep = format!("http://127.0.0.1:{}/whep/live/w", server.http_port);
    let (port, reports) = serve_page(page(&whep));
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
        // AAC from RTMP reaches WebRTC as Opus (transcoded once per broadcast): 10 s at 48 kHz.
        let samples = viewer["audioSamples"].as_u64().unwrap_or(0);
        assert!(
            samples > 400_000,
            "viewer received {samples} audio samples: {viewer}"
        );
        println!(
            "{clip}: viewer {}: time to first frame {:.0} ms, {fps} fps",
            viewer["i"],
            viewer["ttff"].as_f64().unwrap_or(-1.0)
        );
    }
    assert!(server.metric("castnode_webrtc_connected_total") >= VIEWERS as f64);
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
    if Command::new("chromium").arg("--version").output().is_err() {
        eprintln!("SKIPPED: chromium is not installed (./setup.sh test installs it)");
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
