//! `castnode transcoder`: ABR ladders made on a node of their own. ffmpeg publishes an OBS-like
//! 720p stream to an origin; a transcoder fetches it over the cluster link, makes the default
//! ladder and publishes the rungs back to the origin, where they join the broadcast; an edge
//! fetching the broadcast from the origin serves each rung over HTTP-FLV (`?rendition=NAME`),
//! with its height, 30 fps, no B-frames and keyframes on the source's keyframe timestamps.

mod common;

use std::time::Duration;

use common::probe::*;
use common::*;

const TOKEN: &str = "transcoder-test-token-0123456789";

fn upstream_of(s: &Server) -> String {
    format!("127.0.0.1:{}", s.cluster_port)
}

/// The rungs `server` lists for its broadcast `name` (API), once there are `n` of them.
fn wait_rungs(server: &Server, name: &str, n: usize, limit: Duration) -> Vec<String> {
    let mut rungs = Vec::new();
    wait_until(limit, || {
        let (_, _, body) = server.get("/api/v1/broadcasts");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        rungs = v["broadcasts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["name"] == name)
            .and_then(|b| b["renditions"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        rungs.len() == n
    });
    rungs
}

#[test]
fn transcoder_ladder_reaches_an_edge_with_the_sources_keyframes() {
    let origin = Server::start_role("origin", &["--cluster-token", TOKEN]);
    let up = upstream_of(&origin);
    let transcoder = Server::start_role(
        "transcoder",
        &[
            "--upstream",
            &up,
            "--cluster-token",
            TOKEN,
            "--jobs",
            "live/tc",
        ],
    );
    let edge = Server::start_role(
        "edge",
        &["--upstream", &up, "--cluster-token", TOKEN, "--linger", "2"],
    );
    let _publisher = ffmpeg_publish(&origin.rtmp_url("tc"), &fixture("bench-720p.flv"), 100);
    origin.wait_live("live/tc", Duration::from_secs(15));

    let rungs = wait_rungs(&origin, "live/tc", 4, Duration::from_secs(20));
    assert_eq!(
        rungs,
        ["720p", "480p", "360p", "240p"],
        "origin's rungs\norigin:\n{}\ntranscoder:\n{}",
        origin.log(),
        transcoder.log()
    );
    assert!(transcoder.log().contains("ABR ladder published upstream"));

    let flv = edge.flv_url("tc");
    let urls = [
        flv.clone(),
        format!("{flv}?rendition=720p"),
        format!("{flv}?rendition=480p"),
        format!("{flv}?rendition=360p"),
    ];
    assert_rungs(&urls, &[720, 480, 360]);
    // The edge lists them too (they travel with the broadcast).
    assert_eq!(
        wait_rungs(&edge, "live/tc", 4, Duration::from_secs(5)).len(),
        4
    );
    // An unknown rung at the edge: 404.
    let (status, _, _) = edge.get("/live/tc.flv?rendition=999p");
    assert_eq!(status, 404);
}

/// A node reporting to `manager`.
fn managed(manager: &Server, role: &str, extra: &[&str]) -> Server {
    let url = format!("http://127.0.0.1:{}", manager.http_port);
    let mut args = vec!["--manager", &url, "--cluster-token", TOKEN];
    args.extend_from_slice(extra);
    Server::start_role(role, &args)
}

/// The node whose ladder `server`'s broadcast `name` carries (its API's `ladder_from`).
fn ladder_from(server: &Server, name: &str) -> Option<String> {
    let (_, _, body) = server.get("/api/v1/broadcasts");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["broadcasts"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)?["ladder_from"]
        .as_str()
        .map(str::to_owned)
}

/// The stream manager gives the job to one of two transcoders (`--transcode all`); when that
/// one is killed (-9), the job moves to the other, and a reader of a rung at an edge sees a gap
/// of at most 3 s in the rung's frames, then frames again.
#[test]
fn a_killed_transcoders_job_moves_and_a_rungs_reader_goes_on() {
    let manager = Server::start_role("manager", &["--cluster-token", TOKEN, "--transcode", "all"]);
    let origin = managed(&manager, "origin", &["--node-id", "origin-1"]);
    let up = upstream_of(&origin);
    let transcoders: Vec<Server> = ["tc-1", "tc-2"]
        .iter()
        .map(|id| {
            managed(
                &manager,
                "transcoder",
                &["--node-id", id, "--upstream", &up],
            )
        })
        .collect();
    let edge = managed(&manager, "edge", &["--upstream", &up, "--linger", "2"]);
    kill_the_ladders_transcoder(Some(&manager), &origin, transcoders, &edge);
}

/// Without a manager: two transcoders given the same broadcast (`--jobs`); the origin takes one
/// ladder, the other stands by and takes over when the first is killed.
#[test]
fn a_standby_transcoder_takes_over_without_a_manager() {
    let origin = Server::start_role(
        "origin",
        &["--cluster-token", TOKEN, "--node-id", "origin-1"],
    );
    let up = upstream_of(&origin);
    let transcoders: Vec<Server> = ["tc-1", "tc-2"]
        .iter()
        .map(|id| {
            Server::start_role(
                "transcoder",
                &[
                    "--node-id",
                    id,
                    "--upstream",
                    &up,
                    "--cluster-token",
                    TOKEN,
                    "--jobs",
                    "live/job",
                ],
            )
        })
        .collect();
    let edge = Server::start_role(
        "edge",
        &["--upstream", &up, "--cluster-token", TOKEN, "--linger", "2"],
    );
    kill_the_ladders_transcoder(None, &origin, transcoders, &edge);
}

/// Publishes `live/job` to `origin`, waits for one of `transcoders` (ids tc-1, tc-2) to attach
/// its ladder, reads the 360p rung at `edge` for 16 s and kills the ladder's transcoder 5 s in:
/// the other one takes over, and the reader waits at most 3 s and goes on.
fn kill_the_ladders_transcoder(
    manager: Option<&Server>,
    origin: &Server,
    mut transcoders: Vec<Server>,
    edge: &Server,
) {
    let manager_log = || manager.map(Server::log).unwrap_or_default();
    let _publisher = ffmpeg_publish(&origin.rtmp_url("job"), &fixture("obs-like.flv"), 100);
    origin.wait_live("live/job", Duration::from_secs(15));
    let mut holder = None;
    let placed = wait_until(Duration::from_secs(20), || {
        holder = ladder_from(origin, "live/job");
        holder.is_some()
    });
    let logs = |t: &[Server]| {
        t.iter()
            .map(|s| s.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert!(
        placed,
        "no transcoder's ladder on the origin\nmanager:\n{}\norigin:\n{}\ntranscoders:\n{}",
        manager_log(),
        origin.log(),
        logs(&transcoders)
    );
    let holder = holder.unwrap();
    // The 640×360 source gets the default ladder's rungs no taller than itself.
    assert_eq!(
        wait_rungs(origin, "live/job", 2, Duration::from_secs(10)),
        ["360p", "240p"]
    );

    // A reader of the 360p rung at the edge for 16 s; the holder is killed 5 s in.
    let path = "/live/job.flv?rendition=360p";
    let port = edge.http_port;
    let reader = std::thread::spawn(move || read_flv_video(port, path, Duration::from_secs(16)));
    std::thread::sleep(Duration::from_secs(5));
    let killed = if holder == "tc-1" { 0 } else { 1 };
    transcoders[killed].kill();
    let killed_at = std::time::Instant::now();
    let other = if killed == 0 { "tc-2" } else { "tc-1" };
    let moved = wait_until(Duration::from_secs(10), || {
        ladder_from(origin, "live/job").as_deref() == Some(other)
    });
    assert!(
        moved,
        "the job did not move to {other}\nmanager:\n{}\norigin:\n{}",
        manager_log(),
        origin.log()
    );
    let frames = reader.join().unwrap().expect("the edge plays the rung");
    assert!(frames.len() > 100, "{} frames", frames.len());
    // Arrival gaps (what a viewer waits), and the rung's timeline never going back.
    let gap = frames
        .windows(2)
        .map(|w| w[1].arrived - w[0].arrived)
        .max()
        .unwrap();
    let (first, last) = (frames[0].pts_ms, frames.last().unwrap().pts_ms);
    let after_kill = frames
        .iter()
        .filter(|f| f.arrived > killed_at + Duration::from_secs(4))
        .count();
    println!(
        "360p reader: {} frames, {first}..{last} ms, longest wait {gap:?}, {after_kill} frames \
         from 4 s after the kill",
        frames.len()
    );
    assert!(
        gap <= Duration::from_secs(3),
        "a gap of {gap:?} in the rung"
    );
    assert!(
        frames.windows(2).all(|w| w[1].pts_ms > w[0].pts_ms),
        "the rung's timestamps went back"
    );
    assert!(
        after_kill > 90,
        "the rung did not go on: {after_kill} frames\nedge:\n{}\norigin:\n{}\ntranscoders:\n{}",
        edge.log(),
        origin.log(),
        logs(&transcoders)
    );
}
