//! A player that stops reading does not delay the others: their timestamps stay within 1 s of
//! the publisher's, and the stalled one is disconnected (or skipped ahead) with a log line.

mod common;

use std::time::{Duration, Instant};

use castnode::rtmp::client::ClientEvent;
use common::*;

#[test]
fn a_stalled_player_does_not_delay_the_others() {
    let server = Server::start(&["--stall-timeout", "3"]);
    let (t0, publisher) = publish_paced(server.rtmp_port, "s", &fixture("bench-720p.flv"), 2);
    server.wait_live("live/s", Duration::from_secs(10));

    // The stalled player: a small receive buffer, plays, then never reads again.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stalled = rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(([127, 0, 0, 1], server.rtmp_port).into())
            .await
            .unwrap()
            .into_std()
            .unwrap()
    });
    stalled.set_nonblocking(false).unwrap();
    let stalled = RtmpClient::open(stalled, "s", false);

    let players: Vec<_> = (0..3)
        .map(|_| {
            let port = server.rtmp_port;
            std::thread::spawn(move || {
                let mut c = RtmpClient::connect(port, "s", false);
                let end = Instant::now() + Duration::from_secs(12);
                let mut lags = Vec::new();
                while Instant::now() < end {
                    for e in c.read_events() {
                        match e {
                            ClientEvent::Media {
                                type_id: 9,
                                timestamp,
                                ..
                            } => {
                                let sent = t0 + Duration::from_millis(u64::from(timestamp));
                                lags.push(Instant::now().saturating_duration_since(sent));
                            }
                            ClientEvent::Ended => panic!("player ended early"),
                            _ => {}
                        }
                    }
                }
                lags
            })
        })
        .collect();
    for (i, p) in players.into_iter().enumerate() {
        let mut lags = p.join().unwrap();
        lags.sort();
        let (p50, max) = (lags[lags.len() / 2], *lags.last().unwrap());
        println!(
            "player {i}: {} video frames, lag p50 {p50:?}, max {max:?}",
            lags.len()
        );
        assert!(
            lags.len() > 300,
            "player {i} received only {} video frames",
            lags.len()
        );
        assert!(
            max < Duration::from_secs(1),
            "player {i} fell {max:?} behind the publisher"
        );
    }
    let log = server.log();
    assert!(
        log.contains("RTMP player stopped reading; disconnected")
            || log.contains("RTMP player fell behind"),
        "no log line about the stalled player:\n{log}"
    );
    println!(
        "{}",
        log.lines()
            .filter(|l| l.contains("stopped reading") || l.contains("fell behind"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(stalled);
    publisher.join().unwrap();
}
