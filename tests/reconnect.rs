//! A publisher that disconnects and comes back within the grace continues its broadcast:
//! connected players (ffmpeg over HTTP-FLV and RTMP) keep playing, without reconnecting, and
//! receive the frames of both sessions.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

#[test]
fn players_keep_playing_across_a_publisher_reconnect() {
    let server = Server::start(&["--publish-grace", "5"]);
    let dir = temp_dir("reconnect");
    let first = fixture("obs-like.flv");
    let second = fixture("baseline.flv");
    let mut publisher = ffmpeg_publish(&server.rtmp_url("r"), &first, 0);
    server.wait_live("live/r", Duration::from_secs(10));
    let players: Vec<_> = [server.flv_url("r"), server.rtmp_url("r")]
        .into_iter()
        .enumerate()
        .map(|(i, url)| {
            let out = dir.join(format!("{i}.md5"));
            (url.clone(), out.clone(), ffmpeg_framemd5(&url, None, &out))
        })
        .collect();
    // The first session publishes the whole 10 s clip; then a gap of about a second.
    assert!(
        publisher.wait_for(Duration::from_secs(30)).is_some(),
        "first publisher did not finish"
    );
    assert!(
        server.wait_log("publisher stopped", Duration::from_secs(5))
            || server.log().contains("publisher disconnected")
    );
    // Inherent: the gap is what the rebase must bridge (its arithmetic is unit-tested in
    // media::hub on a virtual clock).
    std::thread::sleep(Duration::from_millis(1000));
    let mut publisher = ffmpeg_publish(&server.rtmp_url("r"), &second, 0);
    assert!(
        publisher.wait_for(Duration::from_secs(30)).is_some(),
        "second publisher did not finish"
    );
    let video = |p: &std::path::Path| -> HashSet<String> {
        source_packets(p)
            .into_iter()
            .filter(|p| p.stream == 0)
            .map(|p| p.md5)
            .collect()
    };
    let (first_md5, second_md5) = (video(&first), video(&second));
    for (url, out, mut proc) in players {
        // End of stream comes one grace period after the second publisher leaves.
        assert!(
            proc.wait_for(Duration::from_secs(15)).is_some(),
            "{url}: player did not end"
        );
        let got = parse_framemd5(&std::fs::read_to_string(&out).unwrap());
        let v: Vec<_> = got.iter().filter(|p| p.stream == 0).collect();
        let from_first = v.iter().filter(|p| first_md5.contains(&p.md5)).count();
        let from_second = v.iter().filter(|p| second_md5.contains(&p.md5)).count();
        println!(
            "{url}: {from_first} video frames from the first session, {from_second} from the second"
        );
        assert!(
            from_first > 150 && from_second > 250,
            "{url}: a session is missing"
        );
        // Timestamps keep increasing across the reconnect (the broadcast's timeline is rebased).
        let dts: Vec<i64> = v.iter().map(|p| p.dts).collect();
        assert!(
            dts.windows(2).all(|w| w[1] > w[0]),
            "{url}: video timestamps go backwards"
        );
    }
}
