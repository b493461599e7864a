//! Transcode jobs through a real `castnode manager --transcode live`, with an origin and a
//! transcoder played by this test over the HTTP API (registration and load reports): the job
//! list long poll answers when the list changes, not at its 10 s end; `/api/v1/transcodes` shows
//! a job assigned, then running once the origin reports the transcoder's ladder; a publish
//! lookup with `?transcode=true` adds a broadcast the rule leaves out; metrics count the jobs;
//! bad calls are refused with reasons.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "manager-jobs-token-0123456789";

/// What the fake origin publishes: (broadcast, the node publishing its ladder).
type Published = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn call(port: u16, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    let ctype = (!body.is_empty()).then_some("application/json");
    let (status, _, body) =
        http_request_with(port, method, path, ctype, Some(token), body.as_bytes());
    (status, body)
}

fn register(port: u16, id: &str, role: &str) {
    let node = serde_json::json!({
        "id": id, "role": role, "region": "default",
        "addresses": {"rtmp": format!("rtmp://127.0.0.1:1935"), "http": "http://127.0.0.1:8080"},
        "capacity": 1000,
    });
    let (status, body) = call(port, "POST", "/api/v1/nodes", TOKEN, &node.to_string());
    assert_eq!(status, 204, "{body}");
}

/// Reports for the origin and the transcoder every 300 ms until `stop`.
fn reporter(port: u16, published: Published, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let broadcasts: Vec<serde_json::Value> = published
                .lock()
                .unwrap()
                .iter()
                .map(|(name, from)| {
                    serde_json::json!({"name": name, "viewers": 0, "publishing": true,
                                       "ladder_from": from})
                })
                .collect();
            for (id, load) in [
                (
                    "origin-1",
                    serde_json::json!({"cpu": 0.1, "cores": 4, "memory": 0,
                    "bandwidth_in": 0, "bandwidth_out": 0, "connections": 1, "viewers": 0,
                    "broadcasts": broadcasts}),
                ),
                (
                    "t-1",
                    serde_json::json!({"cpu": 0.5, "cores": 8, "memory": 0,
                    "bandwidth_in": 0, "bandwidth_out": 0, "connections": 0, "viewers": 0,
                    "broadcasts": []}),
                ),
            ] {
                let path = format!("/api/v1/nodes/{id}/load");
                let (status, body) = call(port, "PUT", &path, TOKEN, &load.to_string());
                assert_eq!(status, 204, "{body}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// t-1's job list after `after`: (version, broadcasts, seconds it took). Read with a longer
/// timeout than `http_exchange`'s 10 s: the poll may take that long.
fn poll(port: u16, after: u64) -> (u64, Vec<String>, f64) {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    write!(
        s,
        "GET /api/v1/nodes/t-1/jobs?after={after} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let jobs = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["broadcast"].as_str().unwrap().to_owned())
        .collect();
    (
        v["version"].as_u64().unwrap(),
        jobs,
        start.elapsed().as_secs_f64(),
    )
}

fn transcodes(port: u16) -> Vec<serde_json::Value> {
    let (status, body) = call(port, "GET", "/api/v1/transcodes", ADMIN_TOKEN, "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["transcodes"].as_array().unwrap().clone()
}

#[test]
fn transcode_jobs_are_long_polled_and_listed() {
    let manager = Server::start_role(
        "manager",
        &[
            "--cluster-token",
            TOKEN,
            "--heartbeat-ttl",
            "2",
            "--transcode",
            "live",
            "--provisioner",
            "none",
        ],
    );
    assert!(
        manager.printed().contains("Transcode jobs"),
        "{}",
        manager.printed()
    );
    let port = manager.http_port;
    register(port, "origin-1", "origin");
    register(port, "t-1", "transcoder");
    let published: Published = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reports = reporter(port, published.clone(), stop.clone());

    // Refused: no token, a bad version, an unknown node, a bad transcode flag.
    let (status, _, _) = http_get(port, "/api/v1/nodes/t-1/jobs");
    assert_eq!(status, 401);
    let (status, body) = call(port, "GET", "/api/v1/nodes/t-1/jobs?after=x", TOKEN, "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("after"), "{body}");
    let (status, _) = call(port, "GET", "/api/v1/nodes/nobody/jobs", TOKEN, "");
    assert_eq!(status, 404);
    let (status, body) = call(
        port,
        "GET",
        "/api/v1/broadcasts/other/x/publish?transcode=maybe",
        TOKEN,
        "",
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = call(port, "GET", "/api/v1/transcodes", "not-a-token", "");
    assert_eq!(status, 401);

    // No jobs yet; the first poll answers at once.
    let (v0, jobs, took) = poll(port, 0);
    assert!(jobs.is_empty() && took < 2.0, "{jobs:?} in {took} s");
    // The origin publishes live/a (the rule's app) and events/b (not): a poll waiting on v0
    // wakes with live/a only (after the manager's first TTL, 2 s, at the latest).
    let waiting = std::thread::spawn(move || poll(port, v0));
    std::thread::sleep(Duration::from_millis(500));
    published
        .lock()
        .unwrap()
        .extend([("live/a".to_owned(), None), ("events/b".to_owned(), None)]);
    let (v1, jobs, took) = waiting.join().unwrap();
    assert_eq!(jobs, ["live/a"]);
    assert!(v1 > v0);
    assert!(took < 5.0, "the poll took {took} s");
    let list = transcodes(port);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["broadcast"], "live/a");
    assert_eq!(list[0]["origin"], "origin-1");
    assert_eq!(list[0]["transcoder"], "t-1");
    assert_eq!(list[0]["state"], "assigned");

    // The origin reports t-1's ladder: running.
    published.lock().unwrap()[0].1 = Some("t-1".into());
    assert!(
        wait_until(Duration::from_secs(3), || transcodes(port)[0]["state"]
            == "running"),
        "{:?}",
        transcodes(port)
    );
    // A publish lookup asks for events/b's ladder: a second job.
    let (status, body) = call(
        port,
        "GET",
        "/api/v1/broadcasts/events/b/publish?transcode=true",
        TOKEN,
        "",
    );
    assert_eq!(status, 200, "{body}");
    let (v2, jobs, _) = poll(port, v1);
    assert_eq!(jobs, ["events/b", "live/a"]);
    // (Its ladder runs too, so that nothing changes below while nothing is changed.)
    published.lock().unwrap()[1].1 = Some("t-1".into());
    let metrics = manager.get("/metrics").2;
    assert!(
        metrics.contains("castnode_manager_transcode_jobs{state=\"running\"} 1"),
        "{metrics}"
    );

    // live/a ends: a waiting poll answers within a report or so, not at its 10 s end.
    let waiting = std::thread::spawn(move || poll(port, v2));
    std::thread::sleep(Duration::from_millis(1000));
    published.lock().unwrap().retain(|(n, _)| n != "live/a");
    let (v3, jobs, took) = waiting.join().unwrap();
    assert_eq!(jobs, ["events/b"]);
    assert!(v3 > v2);
    assert!(took < 3.0, "the poll took {took} s");

    // Nothing changes: the poll ends after 10 s with the same list.
    let (v4, jobs, took) = poll(port, v3);
    assert_eq!((v4, jobs), (v3, vec!["events/b".to_owned()]));
    assert!((9.5..=10.5).contains(&took), "the poll took {took} s");

    stop.store(true, Ordering::Relaxed);
    reports.join().unwrap();
    assert!(!manager.log().contains("panicked"));
}
