//! Bad input on the WHEP surface: every refusal is a 4xx with a reason; garbage, spoofed STUN and
//! stray DTLS datagrams on the WebRTC port disturb no session; an offer whose peer never
//! connects is reaped within 10 s. Uses a real SDP offer recorded from Chromium.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;

/// A recvonly video + audio offer as Chromium makes it (payload types vary between versions).
const OFFER: &str = include_str!("../fixtures/sdp/chromium-whep-offer.sdp");

fn request(port: u16, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String, String) {
    http_request(port, method, path, Some(ctype), body)
}

/// POSTs the recorded Chromium offer to `live/b`.
fn post_offer(port: u16) -> (u16, String, String) {
    request(
        port,
        "POST",
        "/whep/live/b",
        "application/sdp",
        OFFER.as_bytes(),
    )
}

fn udp_port(server: &Server) -> u16 {
    let (_, _, body) = server.get("/metrics");
    assert!(body.contains("castnode_webrtc_viewers"));
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("webrtc_udp="))
        .expect("log names the WebRTC port");
    line.rsplit("webrtc_udp=127.0.0.1:")
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn whep_refusals_and_udp_noise() {
    let server = Server::start(&["--max-viewers", "2"]);
    let port = server.http_port;
    let _publisher = ffmpeg_publish(&server.rtmp_url("b"), &fixture("baseline.flv"), 1);
    server.wait_live("live/b", Duration::from_secs(10));

    let no_h264 = OFFER.replace("H264", "VP8").replace("h264", "vp8");
    let no_opus = OFFER.replace("opus", "xpus");
    let cases: [(&str, &str, &[u8], u16, &str); 6] = [
        (
            "/whep/live/b",
            "text/plain",
            OFFER.as_bytes(),
            415,
            "application/sdp",
        ),
        (
            "/whep/live/b",
            "application/sdp",
            b"v=0\r\nthis is not sdp",
            400,
            "malformed SDP",
        ),
        (
            "/whep/live/nobody",
            "application/sdp",
            OFFER.as_bytes(),
            404,
            "not live",
        ),
        ("/whep/live/b", "application/sdp", &[b'a'; 70_000], 413, ""),
        (
            "/whep/live/b",
            "application/sdp",
            no_h264.as_bytes(),
            400,
            "H.264",
        ),
        (
            "/whep/live/b",
            "application/sdp",
            no_opus.as_bytes(),
            400,
            "Opus",
        ),
    ];
    for (path, ctype, body, status, reason) in cases {
        let (got, _, text) = request(port, "POST", path, ctype, body);
        println!(
            "POST {path} ({ctype}, {} bytes) -> {got} {}",
            body.len(),
            text.trim()
        );
        assert_eq!(got, status, "{path} {ctype}: {text}");
        assert!(
            text.contains(reason),
            "{path}: reason {text:?} lacks {reason:?}"
        );
    }
    let (status, head, _) = request(port, "OPTIONS", "/whep/live/b", "application/sdp", b"");
    assert_eq!(status, 204);
    assert!(
        head.to_lowercase()
            .contains("access-control-expose-headers: location"),
        "{head}"
    );

    // Two offers whose peers never connect: accepted, then reaped after 10 s.
    for _ in 0..2 {
        let (status, head, answer) = post_offer(port);
        assert_eq!(status, 201, "{answer}");
        assert!(
            head.to_lowercase().contains("location: /whep/live/b/"),
            "{head}"
        );
        assert!(answer.contains("a=ice-lite"), "{answer}");
    }
    // At --max-viewers.
    assert_eq!(post_offer(port).0, 503);

    // Noise on the UDP port: garbage, a STUN binding request with an unknown username, a DTLS
    // record from nowhere. Nothing accepts them; nothing breaks.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = ("127.0.0.1", udp_port(&server));
    let mut stun = vec![0x00, 0x01, 0x00, 0x0c, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7u8; 12]);
    stun.extend_from_slice(&[0x00, 0x06, 0x00, 0x08]);
    stun.extend_from_slice(b"evil:you");
    let dtls = [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4];
    for _ in 0..50 {
        udp.send_to(b"garbage garbage garbage", target).unwrap();
        udp.send_to(&stun, target).unwrap();
        udp.send_to(&dtls, target).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(5), || server
            .metric("castnode_webrtc_datagrams_dropped_total")
            >= 150.0),
        "noise datagrams not counted as dropped"
    );
    assert!(
        server.wait_log(
            "did not connect within 10s; reaped",
            Duration::from_secs(15)
        ),
        "unconnected sessions not reaped:\n{}",
        server.log()
    );
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("castnode_webrtc_viewers")
        == 0.0));
    // Room again after the reaping.
    assert_eq!(post_offer(port).0, 201);
    let (_, _, log) = (0, 0, server.log());
    assert!(!log.contains("panicked"), "{log}");
}

/// The WHIP side: refusals with reasons, one publisher per broadcast, DELETE ends the session and
/// the broadcast.
#[test]
fn whip_refusals_and_resource_lifecycle() {
    let server = Server::start(&[]);
    let port = server.http_port;
    let _rtmp = ffmpeg_publish(&server.rtmp_url("b"), &fixture("baseline.flv"), 1);
    server.wait_live("live/b", Duration::from_secs(10));
    // The recorded offer turned around: it sends video and audio.
    let offer = OFFER.replace("a=recvonly", "a=sendonly");
    let no_h264 = offer.replace("H264", "VP8").replace("h264", "vp8");
    let cases: [(&str, &str, &[u8], u16, &str); 6] = [
        (
            "/whip/live/c",
            "text/plain",
            offer.as_bytes(),
            415,
            "application/sdp",
        ),
        (
            "/whip/live/c",
            "application/sdp",
            b"v=0\r\nnot sdp",
            400,
            "malformed SDP",
        ),
        (
            "/whip/live/c",
            "application/sdp",
            no_h264.as_bytes(),
            400,
            "H.264",
        ),
        ("/whip/live/c", "application/sdp", &[b'a'; 70_000], 413, ""),
        (
            "/whip/live/b",
            "application/sdp",
            offer.as_bytes(),
            409,
            "already has a live publisher",
        ),
        // A name the hub refuses (live/..): 400, before any WebRTC session is made.
        (
            "/whip/live/%2E%2E",
            "application/sdp",
            offer.as_bytes(),
            400,
            "not a valid broadcast name",
        ),
    ];
    for (path, ctype, body, status, reason) in cases {
        let (got, _, text) = request(port, "POST", path, ctype, body);
        println!("POST {path} ({ctype}) -> {got} {}", text.trim());
        assert_eq!(got, status, "{path} {ctype}: {text}");
        assert!(text.contains(reason), "{path}: {text:?} lacks {reason:?}");
    }

    let (status, head, answer) = request(
        port,
        "POST",
        "/whip/live/c",
        "application/sdp",
        offer.as_bytes(),
    );
    assert_eq!(status, 201, "{answer}");
    assert!(answer.contains("a=recvonly"), "{answer}");
    let location = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("location: ")
                .or(l.strip_prefix("Location: "))
        })
        .expect("a Location")
        .trim()
        .to_owned();
    assert!(location.starts_with("/whip/live/c/"), "{location}");
    assert_eq!(server.metric("castnode_webrtc_publishers"), 1.0);
    // A second publisher for the same name waits its turn.
    let again = request(
        port,
        "POST",
        "/whip/live/c",
        "application/sdp",
        offer.as_bytes(),
    );
    assert_eq!(again.0, 409, "{}", again.2);
    // The resource is a publisher's: the WHEP path of the same id does not end it.
    let id = location.rsplit('/').next().unwrap();
    let wrong = request(
        port,
        "DELETE",
        &format!("/whep/live/c/{id}"),
        "text/plain",
        b"",
    );
    assert_eq!(wrong.0, 404);
    assert_eq!(request(port, "DELETE", &location, "text/plain", b"").0, 200);
    assert!(wait_until(Duration::from_secs(2), || server
        .metric("castnode_webrtc_publishers")
        == 0.0));
    assert_eq!(request(port, "DELETE", &location, "text/plain", b"").0, 404);
    // The RTMP broadcast next to it never noticed.
    assert!(server.metric("castnode_broadcasts") >= 1.0);
    assert!(!server.log().contains("panicked"));
}
