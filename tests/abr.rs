//! WebRTC ABR (`auto`) through a real bandwidth limit: `castnode standalone --ladder default`
//! runs in a network namespace the test makes (joined to this host by a veth pair), ffmpeg
//! publishes a live 720p encode to it from inside the namespace, and headless Chromium on this
//! host plays `/whep/live/abr` without a `rendition` parameter (so `auto`). The server's side
//! of the link is then shaped with `tc ... tbf` (netem is not available everywhere): first
//! unlimited, then 600 kbit/s, then unlimited again. The viewer's picture size (getStats
//! inbound-rtp frameWidth/frameHeight) must go down within 5 s of the cut and back to 720p within
//! 20 s of the restore, with video decoded throughout and no freeze (Chrome's freezeCount and
//! totalFreezesDuration) longer than 500 ms; `/metrics` counts the switches both ways and the
//! time in the renditions.
//!
//! The link's buffer: `tbf ... latency 2s`, a bufferbloated home router's queue. The estimator sees the cut
//! from the delay of the first packets that queue (a few hundred milliseconds) and paces the
//! viewer's video at what gets through, so the queue does not overflow before that.
//!
//! Skips (saying so) without Chromium, or where a network namespace cannot be made (not root,
//! no iproute2) or `tc` is missing.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::*;

/// A network namespace and the veth pair that joins it to this host; removed on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        ip(&["netns", "delete", &self.name]);
    }
}

impl Netns {
    /// Runs `args` inside the namespace; whether it succeeded.
    fn exec(&self, args: &[&str]) -> bool {
        let mut a = vec!["netns", "exec", self.name.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }
}

/// The test's page: one WHEP viewer of `whep` (no `rendition`: auto), its inbound video's
/// figures POSTed to `/report` every 200 ms.
fn page(whep: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
"use strict";
{WHEP_RECVONLY_JS}
const WHEP = "{whep}";
(async () => {{
  const {{ pc, video }} = await recvonly();
  const res = await fetch(WHEP, {{ method: "POST", headers: {{ "Content-Type": "application/sdp" }}, body: pc.localDescription.sdp }});
  if (res.status !== 201) throw new Error("WHEP answered " + res.status + ": " + await res.text());
  await pc.setRemoteDescription({{ type: "answer", sdp: await res.text() }});
  setInterval(async () => {{
    let v = {{}};
    (await pc.getStats()).forEach((s) => {{ if (s.type === "inbound-rtp" && s.kind === "video") v = s; }});
    fetch("/report", {{ method: "POST", body: JSON.stringify({{
      w: v.frameWidth || 0, h: v.frameHeight || 0, decoded: v.framesDecoded || 0,
      freezes: v.freezeCount || 0, frozen: v.totalFreezesDuration || 0, lost: v.packetsLost || 0,
      state: pc.connectionState }}) }});
  }}, 200);
}})().catch((e) => fetch("/report", {{ method: "POST", body: JSON.stringify({{ error: String(e) }}) }}));
</script></body></html>"#
    )
}

/// One sample of the viewer's figures, with when it arrived.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    height: u64,
    decoded: u64,
    freezes: u64,
    frozen: f64,
}

/// Reads samples until `done` holds for one or `limit` passes; every sample goes to `all`.
/// The first sample for which `done` held, if one did.
fn until(
    reports: &Receiver<String>,
    all: &mut Vec<Sample>,
    limit: Duration,
    done: impl Fn(&Sample) -> bool,
) -> Option<Sample> {
    let end = Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        let Ok(body) = reports.recv_timeout(left) else {
            break;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(v.get("error").is_none(), "page failed: {body}");
        let s = Sample {
            at: Instant::now(),
            height: v["h"].as_u64().unwrap_or(0),
            decoded: v["decoded"].as_u64().unwrap_or(0),
            freezes: v["freezes"].as_u64().unwrap_or(0),
            frozen: v["frozen"].as_f64().unwrap_or(0.0),
        };
        all.push(s.clone());
        if done(&s) {
            return Some(s);
        }
    }
    None
}

#[test]
fn auto_follows_a_bandwidth_cut_and_its_restore_without_freezing() {
    if !has_chromium() {
        return;
    }
    if Command::new("tc").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tc (iproute2) is not installed");
        return;
    }
    let n = 100 + std::process::id() % 100;
    let name = format!("castnode-abr-{}", std::process::id());
    if !ip(&["netns", "add", &name]) {
        eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
        return;
    }
    let ns = Netns { name };
    let (outer, inner) = (format!("cnao{n}"), format!("cnai{n}"));
    let (server_ip, viewer_ip) = (format!("10.{n}.7.1"), format!("10.{n}.7.2"));
    assert!(ip(&[
        "link", "add", &outer, "type", "veth", "peer", "name", &inner
    ]));
    assert!(ip(&["link", "set", &inner, "netns", &ns.name]));
    assert!(ip(&[
        "addr",
        "add",
        &format!("{viewer_ip}/24"),
        "dev",
        &outer
    ]));
    assert!(ip(&["link", "set", &outer, "up"]));
    assert!(ns.exec(&["ip", "link", "set", "lo", "up"]));
    assert!(ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{server_ip}/24"),
        "dev",
        &inner
    ]));
    assert!(ns.exec(&["ip", "link", "set", &inner, "up"]));

    let started = Instant::now();
    let server = Server::start_at(
        &["ip", "netns", "exec", &ns.name],
        &server_ip,
        "standalone",
        &[&["--ladder", "default"][..], &WILDCARD_V4].concat(),
        |_| {},
    );
    // The publisher inside the namespace, on its loopback (the shaped link carries only what
    // goes to the viewer): a live 720p30 encode of testsrc2, whose detail and motion make every
    // rung spend its bitrate (the fixtures' static bars leave the rungs far below theirs, under
    // the 600 kbit/s of the cut). No B-frames, 2 s groups: the source is the top rung.
    let _publisher = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "ffmpeg"])
            .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
            ])
            .args([
                "-bf",
                "0",
                "-g",
                "60",
                "-keyint_min",
                "60",
                "-sc_threshold",
                "0",
            ])
            .args([
                "-b:v", "2500k", "-maxrate", "2500k", "-bufsize", "2500k", "-threads", "1",
            ])
            .args(["-c:a", "aac", "-b:a", "96k", "-f", "flv"])
            .arg(format!("rtmp://127.0.0.1:{}/live/abr", server.rtmp_port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ffmpeg"),
    );
    server.wait_live("live/abr", Duration::from_secs(15));
    let whep = format!("http://{server_ip}:{}/whep/live/abr", server.http_port);
    let (port, reports) = serve_page(page(&whep));
    let profile = temp_dir("chromium-profile-abr");
    let _browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let mut samples = Vec::new();
    let fail = |what: &str, samples: &[Sample]| -> ! {
        panic!(
            "{what}\nsamples (height, decoded, freezes, frozen s): {:?}\nserver log:\n{}",
            samples
                .iter()
                .map(|s| (s.height, s.decoded, s.freezes, s.frozen))
                .collect::<Vec<_>>(),
            server.log()
        )
    };

    // Unlimited: up to the top (720p) by probing.
    if until(&reports, &mut samples, Duration::from_secs(45), |s| {
        s.height == 720
    })
    .is_none()
    {
        fail("the viewer did not reach 720p unlimited", &samples);
    }
    let top = Instant::now();
    until(&reports, &mut samples, Duration::from_secs(3), |_| false);
    if samples.last().unwrap().height != 720 {
        fail("the viewer left 720p on an unlimited link", &samples);
    }

    // The cut.
    let shape = [
        "tc", "qdisc", "add", "dev", &inner, "root", "tbf", "rate", "600kbit", "burst", "6kb",
        "latency", "2s",
    ];
    assert!(ns.exec(&shape), "tc tbf in the namespace failed");
    let cut = Instant::now();
    let Some(down) = until(&reports, &mut samples, Duration::from_secs(5), |s| {
        s.height > 0 && s.height < 720
    }) else {
        fail("the viewer did not go down within 5 s of the cut", &samples);
    };
    let down_after = down.at.duration_since(cut);
    // Stays down, decoding, while cut.
    until(&reports, &mut samples, Duration::from_secs(10), |_| false);
    let low = samples.last().unwrap().clone();
    if low.height >= 720 {
        fail("the viewer went back up while the link was cut", &samples);
    }

    // The restore.
    // A rate no test stream reaches; `change` keeps the queued packets (deleting the qdisc
    // would drop them: a loss no real link restore causes).
    assert!(ns.exec(&[
        "tc", "qdisc", "change", "dev", &inner, "root", "tbf", "rate", "10gbit", "burst", "1mb",
        "latency", "2s",
    ]));
    let restored = Instant::now();
    let Some(up) = until(&reports, &mut samples, Duration::from_secs(20), |s| {
        s.height == 720
    }) else {
        fail(
            "the viewer did not go back to 720p within 20 s of the restore",
            &samples,
        );
    };
    let up_after = up.at.duration_since(restored);
    until(&reports, &mut samples, Duration::from_secs(2), |_| false);

    // From the top on: video decoded in every second, no freeze over 500 ms (a freeze's
    // duration is added to the total when it ends, so one sample's growth is one freeze).
    let watched: Vec<&Sample> = samples.iter().filter(|s| s.at >= top).collect();
    for w in watched.windows(2) {
        let grown = w[1].frozen - w[0].frozen;
        if w[1].freezes > w[0].freezes && grown > 0.5 {
            fail(&format!("a freeze of {grown:.3} s"), &samples);
        }
    }
    for (i, s) in watched.iter().enumerate() {
        if let Some(later) = watched[i..]
            .iter()
            .find(|l| l.at.duration_since(s.at) >= Duration::from_millis(1500))
            && later.decoded <= s.decoded
        {
            fail("no frame decoded for 1.5 s", &samples);
        }
    }
    let last = samples.last().unwrap();
    let first = watched[0];
    println!(
        "abr: top after {:?}; down {:?} after the cut (to {}p); back to 720p {:?} after the restore; freezes {} ({:.3} s in all) since the top; {:.1} s in all",
        top.duration_since(started),
        down_after,
        down.height,
        up_after,
        last.freezes - first.freezes,
        last.frozen - first.frozen,
        started.elapsed().as_secs_f64()
    );
    for l in server.log().lines().filter(|l| l.contains("ABR switch")) {
        println!("abr: {l}");
    }
    let metric = |series: &str| server.metric(series);
    let label = "broadcast=\"live/abr\"";
    assert!(
        metric(&format!(
            "castnode_broadcast_webrtc_abr_switches_total{{{label},direction=\"down\"}}"
        )) >= 1.0
    );
    assert!(
        metric(&format!(
            "castnode_broadcast_webrtc_abr_switches_total{{{label},direction=\"up\"}}"
        )) >= 1.0
    );
    let (_, _, body) = server.get("/metrics");
    let top_seconds: f64 = body
        .lines()
        .filter(|l| {
            l.starts_with("castnode_broadcast_webrtc_abr_rendition_seconds_total")
                && (l.contains("rendition=\"720p\"") || l.contains("rendition=\"source\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(top_seconds > 1.0, "{body}");
    let _ = std::fs::remove_dir_all(&profile);
}
