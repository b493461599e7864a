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
