//! ffprobe readings of a stream's video, several at once: sizes, frame rate, B-frames and
//! keyframe times, to check an ABR ladder's rungs against their source.

use std::process::Command;

/// What ffprobe read of a stream's video for `seconds`: (width, height, frame rate, pts of
/// every packet with its keyframe flag).
pub struct Probe {
    pub width: u64,
    pub height: u64,
    pub rate: String,
    pub has_b_frames: u64,
    pub packets: Vec<(f64, bool)>,
}

pub fn probe_cmd(url: &str, seconds: u32) -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "30",
        "ffprobe",
        "-v",
        "error",
        "-rw_timeout",
        "15000000",
        "-read_intervals",
        &format!("%+{seconds}"),
        "-select_streams",
        "v:0",
        "-show_entries",
        "stream=width,height,r_frame_rate,has_b_frames:packet=pts_time,flags",
        "-of",
        "json",
        url,
    ]);
    c
}

pub fn parse(out: &std::process::Output, url: &str) -> Probe {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ffprobe {url}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let s = &v["streams"][0];
    let packets = v["packets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let t: f64 = p["pts_time"].as_str()?.parse().ok()?;
                    let key = p["flags"].as_str()?.starts_with('K');
                    Some((t, key))
                })
                .collect()
        })
        .unwrap_or_default();
    Probe {
        width: s["width"].as_u64().unwrap_or(0),
        height: s["height"].as_u64().unwrap_or(0),
        rate: s["r_frame_rate"].as_str().unwrap_or("").to_owned(),
        has_b_frames: s["has_b_frames"].as_u64().unwrap_or(99),
        packets,
    }
}

/// Keyframe times (ms) inside [from, to].
pub fn keyframes(p: &Probe, from: f64, to: f64) -> Vec<i64> {
    p.packets
        .iter()
        .filter(|(t, k)| *k && *t >= from && *t <= to)
        .map(|(t, _)| (t * 1000.0).round() as i64)
        .collect()
}

/// `Command::output` on a thread of its own, so several run at once.
pub trait OutputAsync {
    fn output_async(self) -> Pending;
}

pub struct Pending(std::thread::JoinHandle<std::process::Output>);

impl Pending {
    pub fn wait(self) -> std::process::Output {
        self.0.join().expect("ffprobe thread")
    }
}

impl OutputAsync for Command {
    fn output_async(mut self) -> Pending {
        Pending(std::thread::spawn(move || {
            self.output().expect("run ffprobe")
        }))
    }
}

/// Reads `urls` at once for 7 s: the first is the 1280×720 source, each other a rung of the
/// height in `heights` (in order): 16:9, 30 fps, no B-frames, and its keyframes on the
/// source's keyframe timestamps over the time both were read (after the rung's first packet). Panics naming the URL that fails.
pub fn assert_rungs(urls: &[String], heights: &[u64]) {
    assert_eq!(urls.len(), heights.len() + 1, "a height per rung URL");
    let children: Vec<_> = urls
        .iter()
        .map(|u| probe_cmd(u, 7).output_async())
        .collect();
    let probes: Vec<Probe> = children
        .into_iter()
        .zip(urls)
        .map(|(c, u)| parse(&c.wait(), u))
        .collect();
    let source = &probes[0];
    assert_eq!((source.width, source.height), (1280, 720));
    for (p, (url, height)) in probes[1..]
        .iter()
        .zip(urls[1..].iter().zip(heights.iter().copied()))
    {
        assert_eq!(p.height, height, "{url}");
        assert_eq!(p.width, (height * 16 / 9).div_ceil(2) * 2, "{url}");
        assert_eq!(p.rate, "30/1", "{url}");
        assert_eq!(p.has_b_frames, 0, "{url}");
        assert!(p.packets.len() > 120, "{url}: {} packets", p.packets.len());
        // Keyframes on the source's keyframe timestamps, over the time both were read, after
        // the rung's first (a ladder that just started joins at the live edge: its first IDR
        // is where it joined).
        let from = p.packets[0].0.max(source.packets[0].0) + 0.001;
        let to = p
            .packets
            .last()
            .unwrap()
            .0
            .min(source.packets.last().unwrap().0);
        let want = keyframes(source, from, to);
        assert!(
            !want.is_empty(),
            "{url}: no source keyframe in {from}..{to}"
        );
        assert_eq!(keyframes(p, from, to), want, "{url}");
    }
}
