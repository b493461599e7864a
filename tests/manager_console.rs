//! The manager's console in headless Chromium: with an API token it lists the nodes (with
//! their state), the broadcasts with the nodes carrying them, node groups and regions, all from
//! the REST API; with a wrong token it says so and lists nothing.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

const TOKEN: &str = "manager-console-token-0123456";

/// The console's DOM after its scripts ran (`--dump-dom`), opened with `#token=…`.
fn console_dom(manager: &Server, token: &str, name: &str) -> String {
    let profile = temp_dir(name);
    let url = format!(
        "http://127.0.0.1:{}/console#token={token}",
        manager.http_port
    );
    let out = chromium_command(&profile)
        .args(["--dump-dom", "--virtual-time-budget=5000"])
        .arg(url)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with `id` in a dumped DOM (up to its closing tag).
fn element<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in:\n{dom}"));
    let rest = &dom[at..];
    let end = rest
        .find("</table>")
        .or_else(|| rest.find("</div>"))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn the_console_shows_the_cluster() {
    let manager = Server::start_role(
        "manager",
        &["--cluster-token", TOKEN, "--provisioner", "none"],
    );
    let (status, head, page) = manager.get("/console");
    assert_eq!(status, 200);
    assert!(head.to_lowercase().contains("text/html"), "{head}");
    assert!(page.contains("castnode console"));
    let (status, head, _) = manager.get("/");
    assert_eq!(status, 307, "{head}");
    if !has_chromium() {
        eprintln!(
            "SKIPPED (browser part): chromium is not installed (./setup.sh test installs it)"
        );
        return;
    }
    let url = format!("http://127.0.0.1:{}", manager.http_port);
    let node = |role: &str, id: &str| {
        Server::start_role(
            role,
            &[
                "--manager",
                &url,
                "--cluster-token",
                TOKEN,
                "--node-id",
                id,
                "--region",
                "eu",
            ],
        )
    };
    let origin = node("origin", "origin-eu-1");
    let _edge = node("edge", "edge-eu-1");
    let _publisher = ffmpeg_publish(&origin.rtmp_url("console"), &fixture("baseline.flv"), 3);
    origin.wait_live("live/console", Duration::from_secs(10));
    let admin = |method: &str, path: &str, body: &str| {
        http_request_with(
            manager.http_port,
            method,
            path,
            Some("application/json"),
            Some(ADMIN_TOKEN),
            body.as_bytes(),
        )
        .0
    };
    let group = r#"{"region":"eu","role":"edge","min":0,"max":2,"metric":"viewers","scale_out_above":100,"scale_in_below":10}"#;
    assert_eq!(admin("PUT", "/api/v1/nodegroups/edges-eu", group), 201);
    assert_eq!(
        admin("PUT", "/api/v1/regions/eu", r#"{"cidrs":["192.0.2.0/24"]}"#),
        200
    );
    // The broadcast shows up in the manager once the origin reported it.
    assert!(wait_until(Duration::from_secs(5), || {
        manager.get("/api/v1/broadcasts/live/console/subscribe").0 == 200
    }));

    let dom = console_dom(&manager, ADMIN_TOKEN, "console-admin");
    let nodes = element(&dom, "nodes");
    assert!(
        nodes.contains("origin-eu-1") && nodes.contains("edge-eu-1"),
        "{nodes}"
    );
    assert!(nodes.contains("class=\"live\""), "{nodes}");
    let broadcasts = element(&dom, "broadcasts");
    assert!(broadcasts.contains("live/console"), "{broadcasts}");
    assert!(broadcasts.contains("origin-eu-1"), "{broadcasts}");
    assert!(element(&dom, "groups").contains("edges-eu"), "{dom}");
    assert!(element(&dom, "regions").contains("192.0.2.0/24"), "{dom}");
    assert!(element(&dom, "summary").contains("2 live nodes"), "{dom}");
    assert!(
        element(&dom, "msg").contains("></div>"),
        "an error shows: {}",
        element(&dom, "msg")
    );

    // A wrong token: the console says so and lists nothing.
    let dom = console_dom(&manager, "not-a-token-of-this-manager", "console-wrong");
    assert!(
        element(&dom, "msg").contains("token"),
        "{}",
        element(&dom, "msg")
    );
    assert!(!element(&dom, "nodes").contains("origin-eu-1"));
}

/// `castnode standalone` serves the same console at `/console`, working against its embedded
/// manager with the admin token it printed at start.
#[test]
fn standalone_serves_the_console() {
    let server = Server::start(&["--node-id", "solo-1"]);
    let (status, head, page) = server.get("/console");
    assert_eq!(status, 200, "{head}");
    assert!(head.to_lowercase().contains("text/html"), "{head}");
    assert!(page.contains("castnode console"));
    const PREFIX: &str = "admin token (generated; shown only now): ";
    assert!(
        wait_until(Duration::from_secs(5), || server.printed().contains(PREFIX)),
        "no admin token printed:\n{}",
        server.printed()
    );
    let printed = server.printed();
    let token = printed[printed.find(PREFIX).unwrap() + PREFIX.len()..]
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let _publisher = ffmpeg_publish(&server.rtmp_url("solo"), &fixture("baseline.flv"), 3);
    server.wait_live("live/solo", Duration::from_secs(10));
    let get = |path: &str, token: &str| {
        let (status, _, body) =
            http_request_with(server.http_port, "GET", path, None, Some(token), b"");
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
        )
    };
    // What the console reads, as it reads it.
    let (status, v) = get("/api/v1/nodes", &token);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["nodes"][0]["id"], "solo-1", "{v}");
    let (status, v) = get("/api/v1/regions", &token);
    assert_eq!(status, 200, "{v}");
    assert!(v["regions"].is_array(), "{v}");
    let shown = wait_until(Duration::from_secs(5), || {
        let (status, v) = get("/api/v1/broadcasts", &token);
        status == 200
            && v["broadcasts"].as_array().is_some_and(|a| {
                a.iter().any(|b| {
                    b["name"] == "live/solo"
                        && b["viewers"] == 0
                        && b["publishers"][0] == "solo-1"
                        && b["nodes"][0]["id"] == "solo-1"
                })
            })
    });
    assert!(shown, "{}", get("/api/v1/broadcasts", &token).1);
    assert_eq!(get("/api/v1/nodes", "not-a-token-of-this-node").0, 401);
    if !has_chromium() {
        eprintln!(
            "SKIPPED (browser part): chromium is not installed (./setup.sh test installs it)"
        );
        return;
    }
    let dom = console_dom(&server, &token, "console-standalone");
    assert!(element(&dom, "nodes").contains("solo-1"), "{dom}");
    assert!(element(&dom, "broadcasts").contains("live/solo"), "{dom}");
    assert!(element(&dom, "summary").contains("1 live nodes"), "{dom}");
    assert!(
        element(&dom, "msg").contains("></div>"),
        "an error shows: {}",
        element(&dom, "msg")
    );
}
