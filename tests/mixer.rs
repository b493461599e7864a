//! `castnode mixer`, end to end: two ffmpeg publishers (a solid red picture with a 440 Hz tone,
//! a solid blue one with a 1000 Hz tone) publish to an origin; a mixer fetches both over the
//! cluster link, lays them side by side into `live/mix` and publishes it back to the origin;
//! a player of `live/mix` at the origin (the ffmpeg CLI over HTTP-FLV) sees red on the left,
//! blue on the right, and hears both tones.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "mixer-test-token-0123456789";
/// The canvas: two 320x180 halves.
const W: usize = 640;
const H: usize = 180;

/// ffmpeg publishing a solid `colour` picture (640x360, 30 fps, H.264 without B-frames) and a
/// sine at `hz` (AAC) to `url`, for at most two minutes.
fn publish_lavfi(url: &str, colour: &str, hz: u32) -> Proc {
    let child = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("color=c={colour}:s=640x360:r=30"),
        ])
        .args([
            "-f",
            "lavfi",
            "-i",
            &format!("sine=frequency={hz}:sample_rate=48000"),
        ])
        .args(["-t", "120", "-c:v", "libx264", "-preset", "ultrafast"])
        .args(["-pix_fmt", "yuv420p", "-bf", "0", "-g", "30"])
        .args(["-c:a", "aac", "-b:a", "96k", "-f", "flv", url])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ffmpeg");
    Proc(child)
}

/// `ffmpeg -i URL ARGS -` under `timeout` (30 s): what it wrote on stdout.
fn ffmpeg_read(url: &str, args: &[&str]) -> Vec<u8> {
    Command::new("timeout")
        .args([
            "30",
            "ffmpeg",
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
        ])
        .args(["-rw_timeout", "15000000", "-i", url])
        .args(args)
        .arg("-")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run ffmpeg")
        .stdout
}

/// The average RGB of columns `x0..x1` of an RGB24 picture `W` wide.
fn average(rgb: &[u8], x0: usize, x1: usize) -> [f64; 3] {
    let mut sum = [0.0; 3];
    for y in 0..H {
        for x in x0..x1 {
            for (c, s) in sum.iter_mut().enumerate() {
                *s += f64::from(rgb[(y * W + x) * 3 + c]);
            }
        }
    }
    sum.map(|s| s / (H * (x1 - x0)) as f64)
}

/// |DFT| of mono s16 `pcm` (48 kHz) at `hz`, per sample.
fn magnitude(pcm: &[i16], hz: f64) -> f64 {
    let (mut re, mut im) = (0.0, 0.0);
    for (n, &s) in pcm.iter().enumerate() {
        let phase = 2.0 * std::f64::consts::PI * hz * n as f64 / 48_000.0;
        re += f64::from(s) * phase.cos();
        im -= f64::from(s) * phase.sin();
    }
    (re * re + im * im).sqrt() / pcm.len() as f64
}

#[test]
fn a_mixer_lays_two_broadcasts_side_by_side_with_both_tones() {
    let deadline = Instant::now() + Duration::from_secs(100);
    let origin = Server::start_role("origin", &["--cluster-token", TOKEN]);
    let up = format!("127.0.0.1:{}", origin.cluster_port);
    let _red = publish_lavfi(&origin.rtmp_url("red"), "red", 440);
    let _blue = publish_lavfi(&origin.rtmp_url("blue"), "blue", 1000);
    let dir = temp_dir("mixer");
    let mix = dir.join("mix.json");
    std::fs::write(
        &mix,
        r#"{ "name": "side-by-side", "output": "live/mix", "width": 640, "height": 180,
             "fps": 15, "bitrate_kbps": 800,
             "inputs": [
               { "broadcast": "live/red",  "x": 0,   "y": 0, "w": 320, "h": 180 },
               { "broadcast": "live/blue", "x": 320, "y": 0, "w": 320, "h": 180 } ] }"#,
    )
    .unwrap();
    let mixer = Server::start_role(
        "mixer",
        &[
            "--upstream",
            &up,
            "--cluster-token",
            TOKEN,
            "--mix",
            mix.to_str().unwrap(),
        ],
    );
    assert!(
        mixer.wait_log("mix started", Duration::from_secs(10)),
        "mixer:\n{}",
        mixer.log()
    );
    origin.wait_live("live/mix", Duration::from_secs(30));
    assert!(mixer.log().contains("mix published"), "{}", mixer.log());

    // A picture: red left, blue right (once both inputs show; until then a slate may).
    let url = origin.flv_url("mix");
    let mut colours = ([0.0; 3], [0.0; 3]);
    let mut got = 0;
    let shows = wait_until(deadline.saturating_duration_since(Instant::now()), || {
        let rgb = ffmpeg_read(
            &url,
            &["-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24"],
        );
        got = rgb.len();
        if rgb.len() != W * H * 3 {
            return false;
        }
        // Away from the seam.
        colours = (average(&rgb, 16, 304), average(&rgb, 336, 624));
        let ([lr, lg, lb], [rr, rg, rb]) = colours;
        lr > 180.0 && lg < 60.0 && lb < 60.0 && rb > 180.0 && rr < 60.0 && rg < 60.0
    });
    assert!(
        shows,
        "left {:?}, right {:?} ({got} bytes)\nmixer:\n{}\norigin:\n{}",
        colours.0,
        colours.1,
        mixer.log(),
        origin.log()
    );

    // The last second of 2.5 s of the mix's sound (past the encoders' start): both tones, far
    // above a frequency neither has.
    let pcm = ffmpeg_read(
        &url,
        &[
            "-vn", "-t", "2.5", "-ac", "1", "-ar", "48000", "-f", "s16le",
        ],
    );
    let pcm: Vec<i16> = pcm
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert!(pcm.len() >= 96_000, "{} samples", pcm.len());
    let second = &pcm[pcm.len() - 48_000..];
    let (a, b, none) = (
        magnitude(second, 440.0),
        magnitude(second, 1000.0),
        magnitude(second, 700.0),
    );
    assert!(
        a > 500.0 && b > 500.0 && a > 20.0 * none && b > 20.0 * none,
        "440 Hz {a:.0}, 1000 Hz {b:.0}, 700 Hz {none:.0}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
