//! WHEP with the default bind shape: RTMP, HTTP and WebRTC bound to the wildcard address
//! (`0.0.0.0`, `[::]`), as `./setup.sh standalone` runs the node, watched in headless Chromium.
//! And a host with two addresses (a network namespace the test makes): a viewer that reaches
//! the second one gets every answer from that address, not from the one the server's route to
//! the viewer prefers (ICE drops answers from any other address).
//!
//! Before the fix (issue 15) none of these connected: the node told str0m every datagram arrived
//! at `0.0.0.0`, which matches no candidate, and its answers left from whatever address the
//! kernel picked.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Publishes the OBS-like clip to `server` (reached at `host`), opens one WHEP viewer of it in
/// headless Chromium (page and browser on this host) and checks it decodes video.
fn plays_in_chromium(server: &Server, name: &str) {
    let _publisher = ffmpeg_publish(&server.rtmp_url(name), &fixture("obs-like.flv"), 2);
    server.wait_live(&format!("live/{name}"), Duration::from_secs(15));
    let whep = format!(
        "http://{}:{}/whep/live/{name}",
        server.host, server.http_port
    );
    let (port, reports) = serve_page(whep_viewers_page(&whep, 1));
    let profile = temp_dir(&format!("chromium-wildcard-{name}"));
    let _browser = chromium(&format!("http://127.0.0.1:{port}/"), &profile);
    let report = reports
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no report within 60 s; server log:\n{}", server.log()));
    println!("{name}: {report}");
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let viewers = v
        .as_array()
        .unwrap_or_else(|| panic!("page failed: {report}\nserver log:\n{}", server.log()));
    let viewer = &viewers[0];
    let fps = viewer["fps"].as_f64().unwrap_or(0.0);
    assert!(fps >= 25.0, "viewer decoded {fps} fps: {viewer}");
    assert_eq!(
        (viewer["width"].as_u64(), viewer["height"].as_u64()),
        (Some(640), Some(360)),
        "{viewer}"
    );
    let _ = std::fs::remove_dir_all(&profile);
}

#[test]
fn wildcard_ipv4_binds_play_in_chromium() {
    if !has_chromium() {
        return;
    }
    let server = Server::start(&WILDCARD_V4);
    plays_in_chromium(&server, "wild4");
}

#[test]
fn wildcard_dual_stack_binds_play_in_chromium() {
    if !has_chromium() {
        return;
    }
    if std::net::UdpSocket::bind("[::]:0").is_err() {
        eprintln!("SKIPPED: no IPv6 on this host");
        return;
    }
    let server = Server::start(&[
        "--rtmp",
        "[::]:0",
        "--http",
        "[::]:0",
        "--webrtc-udp",
        "[::]:0",
    ]);
    plays_in_chromium(&server, "wild6");
}

/// A network namespace and the veth pair that joins it to this host; removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        Self::ip(&["netns", "delete", &self.name]);
    }
}

/// The server's host has two addresses, 10.N.0.1 (on the link to the viewer: its route to the
/// viewer prefers it) and 10.N.1.1; the viewer's host (this one, 10.N.0.2/32) has a route to
/// the second only, so ICE can only succeed through 10.N.1.1, with answers leaving from it.
#[test]
fn viewer_reaching_the_second_address_plays() {
    if !has_chromium() {
        return;
    }
    let n = 100 + std::process::id() % 100;
    let name = format!("castnode-two-{}", std::process::id());
    let (outer, inner) = (format!("cn2o{n}"), format!("cn2i{n}"));
    if !Netns::ip(&["netns", "add", &name]) {
        eprintln!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
        return;
    }
    let ns = Netns { name };
    let (primary, second, viewer) = (
        format!("10.{n}.0.1"),
        format!("10.{n}.1.1"),
        format!("10.{n}.0.2"),
    );
    let nsx = |args: &[&str]| {
        let mut a = vec!["netns", "exec", ns.name.as_str(), "ip"];
        a.extend_from_slice(args);
        assert!(Netns::ip(&a), "ip {args:?} in the namespace failed");
    };
    assert!(Netns::ip(&[
        "link", "add", &outer, "type", "veth", "peer", "name", &inner
    ]));
    assert!(Netns::ip(&["link", "set", &inner, "netns", &ns.name]));
    assert!(Netns::ip(&[
        "addr",
        "add",
        &format!("{viewer}/32"),
        "dev",
        &outer
    ]));
    assert!(Netns::ip(&["link", "set", &outer, "up"]));
    assert!(Netns::ip(&[
        "route",
        "add",
        &format!("{second}/32"),
        "dev",
        &outer,
        "src",
        &viewer
    ]));
    nsx(&["link", "set", "lo", "up"]);
    nsx(&["addr", "add", &format!("{primary}/24"), "dev", &inner]);
    nsx(&["addr", "add", &format!("{second}/32"), "dev", &inner]);
    nsx(&["link", "set", &inner, "up"]);
    // The server's way back to the viewer: the link's subnet, from the primary address.
    let server = Server::start_at(
        &["ip", "netns", "exec", &ns.name],
        &second,
        "standalone",
        &WILDCARD_V4,
        |_| {},
    );
    plays_in_chromium(&server, "second");
    drop(server);
}
