//! The stream manager's administration with real processes: API tokens (admin and read-only;
//! 401 without or with a wrong token, 403 for a read-only token asking for a change, secrets
//! never listed), malformed and contradicting bodies refused with reasons, regions chosen by the
//! client's address (CIDR table), and a manager killed with SIGKILL and restarted on the same
//! database keeps its tokens, regions and node groups while its nodes re-register within a
//! heartbeat.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "manager-admin-test-token-0123";

/// A call with an optional bearer token and JSON body: (status, JSON answer).
fn call(
    m: &Server,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, _, text) = http_request_with(
        m.http_port,
        method,
        path,
        body.map(|_| "application/json"),
        bearer,
        body.unwrap_or_default().as_bytes(),
    );
    (status, serde_json::from_str(&text).unwrap_or_default())
}

fn manager(extra: &[&str]) -> Server {
    let mut args = vec!["--cluster-token", TOKEN, "--provisioner", "none"];
    args.extend_from_slice(extra);
    Server::start_role("manager", &args)
}

fn origin(m: &Server, id: &str, region: &str) -> Server {
    let url = format!("http://127.0.0.1:{}", m.http_port);
    Server::start_role(
        "origin",
        &[
            "--manager",
            &url,
            "--cluster-token",
            TOKEN,
            "--node-id",
            id,
            "--region",
            region,
        ],
    )
}

fn live(m: &Server, id: &str) -> bool {
    let (_, v) = call(m, "GET", "/api/v1/nodes", Some(ADMIN_TOKEN), None);
    v["nodes"]
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["id"] == id && n["status"] == "live"))
}

#[test]
fn tokens_guard_the_api() {
    let m = manager(&[]);
    // Without a token, with a wrong one, or with the cluster token: 401.
    for bearer in [None, Some("not-a-token-of-this-manager"), Some(TOKEN)] {
        let (status, v) = call(&m, "GET", "/api/v1/nodes", bearer, None);
        assert_eq!(status, 401, "{bearer:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("token")));
    }
    // The admin makes a read-only token; its secret is answered once.
    let (status, t) = call(
        &m,
        "POST",
        "/api/v1/tokens",
        Some(ADMIN_TOKEN),
        Some(r#"{"name":"dashboard","access":"read-only"}"#),
    );
    assert_eq!(status, 201, "{t}");
    let ro = t["token"].as_str().unwrap().to_owned();
    let ro_id = t["id"].as_str().unwrap().to_owned();
    // It reads …
    for path in ["/api/v1/nodes", "/api/v1/regions", "/api/v1/nodegroups"] {
        assert_eq!(call(&m, "GET", path, Some(&ro), None).0, 200, "{path}");
    }
    // … and changes nothing: 403.
    let changes = [
        ("PUT", "/api/v1/regions/b", r#"{"cidrs":["10.0.0.0/8"]}"#),
        ("POST", "/api/v1/tokens", r#"{"name":"x","access":"admin"}"#),
        ("DELETE", "/api/v1/nodegroups/any", ""),
        ("POST", "/api/v1/nodes/any/drain", ""),
    ];
    for (method, path, body) in changes {
        let (status, v) = call(
            &m,
            method,
            path,
            Some(&ro),
            Some(body).filter(|b| !b.is_empty()),
        );
        assert_eq!(status, 403, "{method} {path}: {v}");
    }
    assert_eq!(call(&m, "GET", "/api/v1/tokens", Some(&ro), None).0, 403);
    // Listing tokens never shows a secret.
    let (status, _, listed) = http_request_with(
        m.http_port,
        "GET",
        "/api/v1/tokens",
        None,
        Some(ADMIN_TOKEN),
        b"",
    );
    assert_eq!(status, 200);
    assert!(listed.contains("dashboard") && !listed.contains(&ro) && !listed.contains(ADMIN_TOKEN));
    // Malformed JSON: 400 with the reason; contradicting values: 422 with the reason.
    let (status, v) = call(
        &m,
        "PUT",
        "/api/v1/nodegroups/g",
        Some(ADMIN_TOKEN),
        Some("{\"min\":"),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("EOF")),
        "{v}"
    );
    let group = r#"{"region":"a","role":"edge","min":3,"max":1,"metric":"viewers","scale_out_above":5,"scale_in_below":1}"#;
    let (status, v) = call(
        &m,
        "PUT",
        "/api/v1/nodegroups/g",
        Some(ADMIN_TOKEN),
        Some(group),
    );
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("min")),
        "{v}"
    );
    let (status, v) = call(
        &m,
        "PUT",
        "/api/v1/regions/b",
        Some(ADMIN_TOKEN),
        Some(r#"{"cidrs":["10.0.0.300/8"]}"#),
    );
    assert_eq!(status, 400, "{v}");
    // Heartbeats from a node that never registered: 404.
    let (status, _) = call(
        &m,
        "PUT",
        "/api/v1/nodes/ghost/load",
        Some(TOKEN),
        Some(
            r#"{"cpu":0,"memory":0,"bandwidth_in":0,"bandwidth_out":0,"connections":0,"viewers":0,"broadcasts":[]}"#,
        ),
    );
    assert_eq!(status, 404);
    // The last admin token cannot go; the read-only one can, and then it is refused.
    let (_, list) = call(&m, "GET", "/api/v1/tokens", Some(ADMIN_TOKEN), None);
    let admin_id = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["access"] == "admin")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/api/v1/tokens/{admin_id}");
    assert_eq!(call(&m, "DELETE", &path, Some(ADMIN_TOKEN), None).0, 409);
    let path = format!("/api/v1/tokens/{ro_id}");
    assert_eq!(call(&m, "DELETE", &path, Some(ADMIN_TOKEN), None).0, 204);
    assert_eq!(call(&m, "GET", "/api/v1/nodes", Some(&ro), None).0, 401);
    assert!(!m.log().contains("panicked"));
}

#[test]
fn regions_by_address_and_a_restart_keeps_the_configuration() {
    let dir = temp_dir("manager-restart");
    let db = dir.join("manager.db");
    let db = db.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    let mut m = manager(&["--db", db, "--http", &http, "--region", "a"]);
    let _a = origin(&m, "origin-a", "a");
    let _b = origin(&m, "origin-b", "b");
    assert!(wait_until(Duration::from_secs(10), || live(&m, "origin-a")
        && live(&m, "origin-b")));
    let publish = "/api/v1/broadcasts/live/r/publish";
    // No region asked, no table: the manager's default region (a).
    let (_, p) = call(&m, "GET", publish, None, None);
    assert_eq!(p["node"]["id"], "origin-a", "{p}");
    // Loopback clients belong to region b.
    let (status, v) = call(
        &m,
        "PUT",
        "/api/v1/regions/b",
        Some(ADMIN_TOKEN),
        Some(r#"{"cidrs":["127.0.0.0/8","::1/128"]}"#),
    );
    assert_eq!(status, 200, "{v}");
    let (_, p) = call(&m, "GET", publish, None, None);
    assert_eq!(
        p["node"]["id"], "origin-b",
        "placed by the client's address: {p}"
    );
    // Asking for a region still wins.
    let (_, p) = call(&m, "GET", &format!("{publish}?region=a"), None, None);
    assert_eq!(p["node"]["id"], "origin-a", "{p}");
    // A node group and a read-only token, then SIGKILL.
    let group = r#"{"region":"b","role":"edge","min":0,"max":4,"metric":"viewers","scale_out_above":50,"scale_in_below":5}"#;
    let (status, v) = call(
        &m,
        "PUT",
        "/api/v1/nodegroups/edges-b",
        Some(ADMIN_TOKEN),
        Some(group),
    );
    assert_eq!(status, 201, "{v}");
    let (_, t) = call(
        &m,
        "POST",
        "/api/v1/tokens",
        Some(ADMIN_TOKEN),
        Some(r#"{"name":"ro","access":"read-only"}"#),
    );
    let ro = t["token"].as_str().unwrap().to_owned();
    m.kill();
    // The new manager has no --admin-token: the stored admin token must be what lets us in.
    let m = Server::start_role(
        "manager",
        &[
            "--cluster-token",
            TOKEN,
            "--provisioner",
            "none",
            "--db",
            db,
            "--http",
            &http,
            "--region",
            "a",
            "--admin-token",
            "a-different-admin-token-0000",
        ],
    );
    let restarted = Instant::now();
    let (status, g) = call(
        &m,
        "GET",
        "/api/v1/nodegroups/edges-b",
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(status, 200, "{g}");
    assert_eq!((g["min"].as_u64(), g["max"].as_u64()), (Some(0), Some(4)));
    assert_eq!(call(&m, "GET", "/api/v1/regions", Some(&ro), None).0, 200);
    let (_, r) = call(&m, "GET", "/api/v1/regions", Some(&ro), None);
    assert!(r.to_string().contains("127.0.0.0/8"), "{r}");
    // Nodes come back within a heartbeat (1 s) of their next report.
    assert!(
        wait_until(Duration::from_secs(5), || live(&m, "origin-a")
            && live(&m, "origin-b")),
        "nodes did not re-register:\n{}",
        m.log()
    );
    let took = restarted.elapsed();
    println!("nodes re-registered {took:?} after the manager restarted");
    assert!(took <= Duration::from_millis(2500), "{took:?}");
    // Their load reports come as UDP heartbeats (HTTP only registers them).
    assert!(wait_until(Duration::from_secs(5), || {
        m.metric("castnode_manager_reports_total{transport=\"udp\"}") >= 4.0
    }));
    let (_, p) = call(&m, "GET", publish, None, None);
    assert_eq!(p["node"]["id"], "origin-b", "{p}");
    drop(m);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn require_token_guards_lookups_and_redirects() {
    let m = manager(&["--require-token"]);
    let _a = origin(&m, "origin-rt", "default");
    assert!(wait_until(Duration::from_secs(10), || live(
        &m,
        "origin-rt"
    )));
    let publish = "/api/v1/broadcasts/live/rt/publish";
    assert_eq!(call(&m, "GET", publish, None, None).0, 401);
    let (_, t) = call(
        &m,
        "POST",
        "/api/v1/tokens",
        Some(ADMIN_TOKEN),
        Some(r#"{"name":"players","access":"read-only"}"#),
    );
    let ro = t["token"].as_str().unwrap().to_owned();
    let (status, p) = call(&m, "GET", publish, Some(&ro), None);
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["node"]["id"], "origin-rt");
    // WHIP through the manager: refused without a token, redirected with one.
    let whip = |bearer: Option<&str>| {
        http_request_with(
            m.http_port,
            "POST",
            "/whip/live/rt",
            Some("application/sdp"),
            bearer,
            b"v=0\r\n",
        )
        .0
    };
    assert_eq!(whip(None), 401);
    assert_eq!(whip(Some(&ro)), 307);
}
