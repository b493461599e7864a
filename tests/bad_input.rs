//! Bad input on the RTMP port: each case closes only its own connection with a logged reason,
//! a live broadcast beside it is untouched, and nothing panics. A stalled handshake is dropped
//! within 10 s. A second publisher on a live name is refused.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use castnode::rtmp::chunk::encode_message;
use common::*;

/// Opens a connection and completes the plain handshake by hand.
fn handshaken(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c0c1 = vec![3u8];
    c0c1.extend(std::iter::repeat_n(7u8, 1536));
    s.write_all(&c0c1).unwrap();
    let mut s0s1s2 = vec![0u8; 1 + 2 * 1536];
    s.read_exact(&mut s0s1s2).unwrap();
    s.write_all(&s0s1s2[1..1537]).unwrap();
    s
}

/// Sends `bytes` and expects the server to close the connection within `limit`.
fn expect_closed(mut s: TcpStream, bytes: &[u8], limit: Duration) -> Duration {
    let start = Instant::now();
    let _ = s.write_all(bytes);
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) if start.elapsed() <= limit => return start.elapsed(),
            Ok(_) if start.elapsed() <= limit => continue,
            _ => panic!("connection still open after {limit:?}"),
        }
    }
}

fn chunk(csid: u32, type_id: u8, sid: u32, body: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    encode_message(&mut out, csid, 0, type_id, sid, &[body], 128);
    out.to_vec()
}

#[test]
fn bad_input_closes_only_its_own_connection() {
    let mut server = Server::start(&["--max-message-bytes", "65536"]);
    let port = server.rtmp_port;
    let src = fixture("obs-like.flv");
    let _publisher = ffmpeg_publish(&server.rtmp_url("live1"), &src, 1);
    server.wait_live("live/live1", Duration::from_secs(10));
    let dir = temp_dir("bad-input");
    let watched = dir.join("player.md5");
    let mut player = ffmpeg_framemd5(&server.flv_url("live1"), Some(8.0), &watched);

    let second = Duration::from_secs(2);
    // Not RTMP at all.
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    expect_closed(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", second);
    // A compressed chunk header on a chunk stream with no history.
    expect_closed(
        handshaken(port),
        &[0x44, 0, 0, 0, 0, 0, 3, 20, 1, 2, 3],
        second,
    );
    // A message longer than --max-message-bytes, refused from its header.
    expect_closed(
        handshaken(port),
        &[0x03, 0, 0, 0, 0x01, 0x86, 0xA0, 20, 0, 0, 0, 0],
        second,
    );
    // A command whose AMF0 string is cut short.
    expect_closed(
        handshaken(port),
        &chunk(3, 20, 0, &[0x02, 0x00, 0x20, b'c', b'o']),
        second,
    );
    // Random bytes after the handshake.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect_closed(handshaken(port), &noise, second);
    // A publisher whose video tag is too short to be an AVC packet.
    let mut bad = RtmpClient::connect(port, "bad", true);
    bad.conn.send_media(9, 0, &[&[0x17, 0x01]]);
    bad.flush();
    expect_closed(bad.sock, &[], second);
    // A second publisher on a live name is refused with NetStream.Publish.BadName.
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let refused = RtmpClient::try_open(sock, "live1", true).err();
    assert_eq!(
        refused.as_deref(),
        Some("NetStream.Publish.BadName"),
        "second publisher not refused"
    );
    // A valid key in an application that makes a bad broadcast name ("li ve/x") is refused by
    // the hub with NetStream.Publish.BadName.
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let refused = RtmpClient::try_open_app(sock, "li ve", "x", true).err();
    assert_eq!(
        refused.as_deref(),
        Some("NetStream.Publish.BadName"),
        "publisher of a bad name not refused"
    );
    // A handshake that stalls is dropped within 10 s.
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let took = expect_closed(s, &[3, 1, 2, 3], Duration::from_secs(12));
    println!("stalled handshake dropped after {took:?}");
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "stalled handshake dropped after {took:?}"
    );

    // The live broadcast beside all this is untouched.
    assert!(
        player
            .wait_for(Duration::from_secs(20))
            .is_some_and(|s| s.success()),
        "player failed"
    );
    let got = parse_framemd5(&std::fs::read_to_string(&watched).unwrap());
    let source = source_packets(&src);
    let counts = assert_contiguous("player beside the bad input", &source, &got);
    assert!(
        counts.iter().all(|&n| n > 200),
        "player got {counts:?} packets"
    );
    let log = server.log();
    for reason in [
        "unsupported handshake version 71",
        "has no previous header",
        "exceeds the limit of 65536",
        "bad AMF0: truncated",
        "bad FLV tag: FLV video tag too short",
        "publish refused",
        "handshake not finished in time",
    ] {
        assert!(log.contains(reason), "no log line with {reason:?}:\n{log}");
    }
    assert!(!log.contains("panicked"), "castnode panicked:\n{log}");
    assert!(server.alive());
    assert_eq!(server.metric("castnode_rtmp_errors_total"), 7.0);
}
