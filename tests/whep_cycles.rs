//! 1,000 WHEP sessions one after the other (`castnode-load --cycles`): each POSTs an offer,
//! connects ICE + DTLS, waits for its first complete video frame and DELETEs its session. Every
//! cycle must succeed, the server's RSS must come back to within 10% of where it stood after
//! the warm-up, and the sessions, the AAC → Opus transcoder and the broadcast's viewer gauge
//! must be back to zero in `/metrics`. A second test keeps viewers past the hand-over from their
//! str0m state and checks they play on and leave on DELETE.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CYCLES: usize = 1000;
/// Cycles before the RSS baseline is read (see the test).
const WARMUP: usize = 100;
/// The load tool's own bound: a cycle that stalls fails after `--connect-timeout`, and the run
/// stops after `--cycles-max-failures` failures.
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[test]
fn thousand_sequential_whep_sessions_leave_nothing_behind() {
    let server = Server::start(&[]);
    let fixture = fixture("baseline.flv");
    let _publisher = ffmpeg_publish(&server.rtmp_url("cycles"), &fixture, 1000);
    server.wait_live("live/cycles", Duration::from_secs(10));

    let cycles = CYCLES.to_string();
    let warmup = WARMUP.to_string();
    let started = Instant::now();
    let r = castnode_load(
        &server,
        "cycles",
        &fixture,
        &[
            "--cycles",
            &cycles,
            "--cycles-warmup",
            &warmup,
            "--cycles-max-failures",
            "5",
            "--connect-timeout",
            "5",
        ],
        RUN_LIMIT,
    );
    let took = started.elapsed();

    let c = &r["cycles"];
    let (done, failed) = (c["done"].as_u64().unwrap(), c["failed"].as_u64().unwrap());
    let srv = &r["server"];
    let kib = |k: &str| srv[k].as_u64().unwrap_or_else(|| panic!("no {k} in {srv}"));
    let (start, warm, end) = (
        kib("rss_start_kib"),
        kib("rss_warm_kib"),
        kib("rss_end_kib"),
    );
    println!(
        "{done} cycles done, {failed} failed in {:.1} s ({} cycles/s); cycle {} ms; \
         first frame {} ms; server RSS {start} KiB before, {warm} after {WARMUP} cycles, \
         {end} at the end; RSS by cycle {}",
        took.as_secs_f64(),
        c["per_s"],
        r["cycle_ms"],
        r["first_frame_ms"],
        srv["rss_samples"]
    );
    assert_eq!(
        (done, failed),
        (CYCLES as u64, 0),
        "every cycle must succeed: {}\nserver log (tail):\n{}",
        r["errors"],
        tail(&server.log(), 40)
    );

    // The baseline is the RSS after the warm-up, not before the first cycle. The first session
    // starts the broadcast's AAC → Opus transcoder (it runs while WebRTC viewers watch; here one
    // viewer at a time does, so every cycle starts it again) and makes the allocator grow the
    // buffers later sessions reuse (str0m's send buffers, DTLS/SRTP contexts, FFmpeg's codec
    // contexts, the driver's maps): +19 MiB. The restarts then add 3-4 MiB until about cycle
    // 250 and nothing after (3,000 cycles measured: flat from cycle 300 on; the same with
    // MALLOC_ARENA_MAX=1; and only +0.8 MiB over 600 cycles while a second viewer keeps the
    // transcoder running). By our estimate that is the broadcast's log: each start writes the
    // current group's audio as Opus, and the log, which keeps the last two groups (4 s here),
    // holds the output of every transcoder started within that span. Read after 20 cycles, the
    // baseline would leave that climb only 1-3% below the bound; after 100, a growth of 7 KiB
    // per session over the other 900 fails the test.
    assert!(
        end as f64 <= warm as f64 * 1.10,
        "server RSS grew from {warm} KiB after {WARMUP} cycles to {end} KiB after {CYCLES} \
         (samples: {})",
        srv["rss_samples"]
    );

    // Sessions and the transcoder are gone, and every cycle connected.
    let gone = wait_until(Duration::from_secs(5), || {
        server.metric("castnode_webrtc_viewers") == 0.0
            && server.metric("castnode_transcoders{kind=\"aac_to_opus\"}") == 0.0
            && server.metric("castnode_broadcast_webrtc_viewers{broadcast=\"live/cycles\"}") == 0.0
    });
    let (_, _, metrics) = server.get("/metrics");
    let webrtc: Vec<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("webrtc") || l.contains("transcoders")))
        .collect();
    assert!(gone, "sessions or transcoders left:\n{}", webrtc.join("\n"));
    assert!(
        server.metric("castnode_webrtc_connected_total") >= CYCLES as f64,
        "{}",
        webrtc.join("\n")
    );
}

/// Runs `castnode-load --protocol whep --no-publish --json` with `args` against `server`'s
/// broadcast `live/{key}`; its JSON report.
fn castnode_load(
    server: &Server,
    key: &str,
    fixture: &std::path::Path,
    args: &[&str],
    limit: Duration,
) -> serde_json::Value {
    let whep_url = format!("http://127.0.0.1:{}/whep/live/{key}", server.http_port);
    let mut load = Proc(
        Command::new(env!("CARGO_BIN_EXE_castnode-load"))
            .args(["--protocol", "whep", "--no-publish", "--json"])
            .args(args)
            .args(["--server-pid", &server.pid().to_string()])
            .args(["--rtmp-url", &server.rtmp_url(key)])
            .args(["--whep-url", &whep_url])
            .arg("--fixture")
            .arg(fixture)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start castnode-load"),
    );
    let mut stdout = load.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status = load.wait_for(limit);
    assert!(
        status.is_some_and(|s| s.success()),
        "castnode-load did not finish well within {limit:?} ({status:?}); server log:\n{}",
        server.log()
    );
    let out = reader.join().unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Viewers that stay past the hand-over (3 s after connecting the server drops their str0m
/// state and answers consent checks itself) keep receiving every frame, and their DELETEs end
/// them.
#[test]
fn viewers_play_on_after_the_handover_and_leave_on_delete() {
    let server = Server::start(&[]);
    let fixture = fixture("baseline.flv");
    let _publisher = ffmpeg_publish(&server.rtmp_url("stay"), &fixture, 1000);
    server.wait_live("live/stay", Duration::from_secs(10));
    let r = castnode_load(
        &server,
        "stay",
        &fixture,
        &[
            "--players",
            "3",
            "--connect-rate",
            "10",
            "--warmup",
            "1",
            "--duration",
            "6",
        ],
        Duration::from_secs(60),
    );
    let out = r.to_string();
    let w = &r["whep"];
    println!(
        "video {} audio {} fps {} deleted {}",
        w["video_window"], w["audio_window"], w["video_fps"], w["deleted"]
    );
    assert_eq!(r["players"]["connected"].as_u64(), Some(3), "{out}");
    assert_eq!(w["video_window"]["lost"].as_u64(), Some(0), "{out}");
    assert_eq!(w["video_window"]["incomplete"].as_u64(), Some(0), "{out}");
    assert!(
        w["video_fps"]["min"].as_f64().unwrap_or(0.0) >= 25.0,
        "{out}"
    );
    assert!(
        w["audio_window"]["packets_per_s_per_viewer"]
            .as_f64()
            .unwrap_or(0.0)
            >= 45.0,
        "{out}"
    );
    assert_eq!(w["deleted"].as_u64(), Some(3), "{out}");
    let log = server.log();
    assert_eq!(
        log.matches("handed over from its Rtc").count(),
        3,
        "every viewer was handed over:\n{log}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            server.metric("castnode_webrtc_viewers") == 0.0
                && server.metric("castnode_broadcast_webrtc_viewers{broadcast=\"live/stay\"}")
                    == 0.0
        }),
        "viewers left in metrics"
    );
    let log = server.log();
    assert_eq!(log.matches("WHEP viewer left").count(), 3, "{log}");
}
