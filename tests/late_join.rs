//! A player joining mid-stream gets a keyframe first (checked with ffprobe over RTMP and
//! HTTP-FLV), and the time to first frame is measured with castnode's own RTMP client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use castnode::rtmp::client::{ClientConn, ClientEvent, Mode};
use common::*;

/// First video packets' flags as ffprobe reports them.
fn first_video_flags(url: &str) -> Vec<String> {
    let out = Command::new("timeout")
        .args([
            "20",
            "ffprobe",
            "-v",
            "error",
            "-rw_timeout",
            "10000000",
            "-select_streams",
            "v:0",
        ])
        .args([
            "-show_entries",
            "packet=flags,pts",
            "-of",
            "csv=p=0",
            "-read_intervals",
            "%+#5",
            url,
        ])
        .output()
        .expect("run ffprobe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Connects, plays, and returns the time until the first video message and whether it is a
/// keyframe (FLV frame type 1).
fn time_to_first_frame(port: u16, key: &str) -> (Duration, bool) {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut c = ClientConn::new(
        "live",
        &format!("rtmp://127.0.0.1:{port}/live"),
        Mode::Play(key.into()),
        3,
    );
    let mut buf = vec![0u8; 65536];
    loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).unwrap();
        }
        let n = s.read(&mut buf).expect("read from castnode");
        assert!(n > 0, "castnode closed the player");
        c.handle_input(&buf[..n]).unwrap();
        while let Some(e) = c.poll_event() {
            if let ClientEvent::Media {
                type_id: 9, body, ..
            } = e
            {
                // Skip the sequence header (AVCPacketType 0).
                if body.get(1) == Some(&1) {
                    return (start.elapsed(), body[0] >> 4 == 1);
                }
            }
        }
    }
}

#[test]
fn mid_stream_joiners_start_on_a_keyframe() {
    let server = Server::start(&[]);
    let _publisher = ffmpeg_publish(&server.rtmp_url("j"), &fixture("obs-like.flv"), 0);
    server.wait_live("live/j", Duration::from_secs(10));
    // The clip has a keyframe every 2 s; join 1 s into a GOP (inherent: only time puts the
    // stream mid-GOP).
    std::thread::sleep(Duration::from_millis(2300));
    for url in [server.rtmp_url("j"), server.flv_url("j")] {
        let flags = first_video_flags(&url);
        println!("{url}: first video packets (pts,flags): {flags:?}");
        assert!(
            flags.first().is_some_and(|f| f.contains('K')),
            "{url}: first video packet is not a keyframe: {flags:?}"
        );
    }
    let mut samples = Vec::new();
    for _ in 0..5 {
        let (ttff, key) = time_to_first_frame(server.rtmp_port, "j");
        assert!(key, "first video frame is not a keyframe");
        samples.push(ttff);
        // Inherent: spaces the joins over the GOP, so they land at different points in it.
        std::thread::sleep(Duration::from_millis(330));
    }
    samples.sort();
    println!(
        "RTMP time to first frame over 5 joins: min {:?}, median {:?}, max {:?}",
        samples[0], samples[2], samples[4]
    );
    // Starting from the newest group means no wait for the next keyframe (2 s in this clip).
    assert!(
        samples[2] < Duration::from_secs(1),
        "median time to first frame {:?}",
        samples[2]
    );
}
