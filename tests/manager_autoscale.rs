//! Autoscaling with the process provisioner, as real processes: a manager with a node group of
//! edges (min 1, max 3, one more above 2 viewers per edge), an origin fed by ffmpeg, and the load
//! tool (`castnode-load --subscribe-url`) asking the manager where to play before each HTTP-FLV
//! player connects. Ramping viewers up starts new edges within 15 s, and placement lookups name
//! them; when the ramp's players leave, the group drains back to one edge, and the viewer that
//! stayed is never dropped.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "manager-autoscale-token-0123";

/// The manager, stopped with SIGTERM however the test ends: it then stops the edges it started
/// (a failed assertion must not leave them running).
struct Manager(Server);

impl std::ops::Deref for Manager {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.0.stop(Duration::from_secs(10));
    }
}

fn get(m: &Server, path: &str) -> serde_json::Value {
    let (_, _, text) = http_request_with(m.http_port, "GET", path, None, Some(ADMIN_TOKEN), b"");
    serde_json::from_str(&text).unwrap_or_default()
}

/// The group's nodes: (id, status, viewers).
fn group_nodes(m: &Server) -> Vec<(String, String, u64)> {
    let g = get(m, "/api/v1/nodegroups/edges-a");
    g["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["id"].as_str().unwrap_or_default().to_owned(),
                        n["status"].as_str().unwrap_or_default().to_owned(),
                        n["viewers"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn live_count(m: &Server) -> usize {
    group_nodes(m).iter().filter(|n| n.1 == "live").count()
}

/// `castnode-load` with `players` HTTP-FLV players placed by the manager, connecting one every
/// `every` seconds, measuring for `duration` seconds; stdout is its JSON report.
fn load(m: &Server, origin: &Server, players: usize, every: f64, duration: f64) -> Proc {
    let lookup = format!(
        "http://127.0.0.1:{}/api/v1/broadcasts/live/auto/subscribe?region=a",
        m.http_port
    );
    Proc(
        Command::new(env!("CARGO_BIN_EXE_castnode-load"))
            .args(["--protocol", "flv", "--no-publish", "--json"])
            .args(["--players", &players.to_string()])
            .args(["--connect-rate", &(1.0 / every).to_string()])
            .args(["--warmup", "0", "--duration", &duration.to_string()])
            .args(["--rtmp-url", &origin.rtmp_url("auto")])
            .args(["--subscribe-url", &lookup])
            .arg("--fixture")
            .arg(fixture("obs-like.flv"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start castnode-load"),
    )
}

/// Waits for a load run to end; its report's `players` object.
fn players_of(mut p: Proc, limit: Duration) -> serde_json::Value {
    let mut out = String::new();
    let mut stdout = p.0.stdout.take().unwrap();
    let status = p.wait_for(limit);
    let _ = stdout.read_to_string(&mut out);
    assert!(
        status.is_some_and(|s| s.success()),
        "castnode-load: {status:?} {out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("castnode-load JSON");
    v["players"].clone()
}

#[test]
fn edges_scale_out_with_viewers_and_drain_back_without_dropping_one() {
    let dir = temp_dir("autoscale");
    let mut manager = Manager(Server::start_role(
        "manager",
        &[
            "--cluster-token",
            TOKEN,
            "--region",
            "a",
            "--provision-dir",
            dir.to_str().unwrap(),
        ],
    ));
    let url = format!("http://127.0.0.1:{}", manager.http_port);
    let origin = Server::start_role(
        "origin",
        &["--manager", &url, "--cluster-token", TOKEN, "--region", "a"],
    );
    let _ffmpeg = ffmpeg_publish(&origin.rtmp_url("auto"), &fixture("obs-like.flv"), 1000);
    origin.wait_live("live/auto", Duration::from_secs(10));
    let group = r#"{"region":"a","role":"edge","min":1,"max":3,"metric":"viewers",
        "scale_out_above":2,"scale_in_below":1,"cooldown_s":2,"drain_deadline_s":120,
        "node_capacity":10}"#;
    let (status, _, body) = http_request_with(
        manager.http_port,
        "PUT",
        "/api/v1/nodegroups/edges-a",
        Some("application/json"),
        Some(ADMIN_TOKEN),
        group.as_bytes(),
    );
    assert_eq!(status, 201, "{body}");
    // min 1: the first edge starts by itself.
    assert!(
        wait_until(Duration::from_secs(15), || live_count(&manager) == 1),
        "no edge started: {:?}\n{}",
        group_nodes(&manager),
        manager.log()
    );
    let first = group_nodes(&manager)[0].0.clone();
    // The viewer that stays: placed on the only edge, playing through the whole test.
    let stayer = load(&manager, &origin, 1, 1.0, 55.0);
    assert!(wait_until(Duration::from_secs(10), || {
        group_nodes(&manager).iter().any(|n| n.2 == 1)
    }));
    // The ramp: 7 more viewers, one every 1.5 s.
    let ramp_started = Instant::now();
    let ramp = load(&manager, &origin, 7, 1.5, 14.0);
    let mut scaled: Option<Duration> = None;
    let mut peak = 0;
    wait_until(Duration::from_secs(30), || {
        let live = live_count(&manager);
        if live >= 2 && scaled.is_none() {
            scaled = Some(ramp_started.elapsed());
        }
        peak = peak.max(live);
        peak == 3
    });
    let scaled = scaled.expect("no edge was added while viewers ramped up");
    println!("second edge live {scaled:?} after the ramp began; peak {peak} edges");
    assert!(scaled <= Duration::from_secs(15), "{scaled:?}");
    assert_eq!(peak, 3, "{:?}", group_nodes(&manager));
    // The new edges get placements. Each lookup picks at random among the best few nodes, and
    // the first edge carries the broadcast (a bonus), so which edge the ramp's last few players
    // got is chance: asked again (what a player asks), the manager must name a new edge.
    let lookup = "/api/v1/broadcasts/live/auto/subscribe?region=a";
    let mut answers = Vec::new();
    let elsewhere = (0..20).any(|_| {
        let id = get(&manager, lookup)["node"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // Twenty lookups over two seconds: a bounded poll (each lookup's pick is random).
        std::thread::sleep(Duration::from_millis(100));
        answers.push(id.clone());
        !id.is_empty() && id != first
    });
    println!(
        "viewers per edge during the ramp: {:?}; lookups answered {answers:?}",
        group_nodes(&manager)
    );
    assert!(
        elsewhere,
        "placements stayed on the first edge {first}: {answers:?} {:?}",
        group_nodes(&manager)
    );
    let ramp = players_of(ramp, Duration::from_secs(60));
    println!("ramp players: {ramp}");
    assert_eq!(ramp["failed"], 0, "{ramp}");
    assert_eq!(ramp["disconnected"], 0, "{ramp}");
    let placements = manager
        .metric("castnode_manager_placements_total{kind=\"subscribe\",region=\"a\",result=\"ok\"}");
    assert!(placements >= 8.0, "{placements}");
    // The ramp's players left: the group drains back to one edge, the stayer's.
    let drained_from = Instant::now();
    assert!(
        wait_until(Duration::from_secs(40), || {
            let nodes = group_nodes(&manager);
            nodes.len() == 1 && nodes[0].1 == "live"
        }),
        "the group did not scale in: {:?}\n{}",
        group_nodes(&manager),
        manager.log()
    );
    println!(
        "scaled in to one edge {:?} after the load dropped",
        drained_from.elapsed()
    );
    assert_eq!(
        group_nodes(&manager)[0].0,
        first,
        "the edge with a viewer must stay"
    );
    let log = manager.log();
    assert!(log.contains("scale in: draining a node"), "{log}");
    assert!(
        log.contains("why=\"drained\"") || log.contains("why=drained"),
        "{log}"
    );
    let stayer = players_of(stayer, Duration::from_secs(90));
    println!("staying viewer: {stayer}");
    assert_eq!(stayer["connected"], 1, "{stayer}");
    assert_eq!(
        stayer["disconnected"], 0,
        "the staying viewer was dropped: {stayer}"
    );
    // Drained edges stopped by themselves (their logs say so), not by force.
    let stopped = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|log| log.contains("drained; stopping"))
        .count();
    assert!(stopped >= 2, "{stopped} edges stopped by themselves");
    let m = manager.metric("castnode_manager_scale_actions_total{group=\"edges-a\",action=\"in\"}");
    assert!(m >= 2.0, "{m}");
    // A stopped manager stops the nodes it started: nothing is left listening.
    let nodes = get(&manager, "/api/v1/nodes");
    let ports: Vec<u16> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["group"] == "edges-a")
        .filter_map(|n| {
            n["addresses"]["http"]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(ports.len(), 1, "{nodes}");
    assert!(
        manager.0.stop(Duration::from_secs(15)),
        "the manager did not stop"
    );
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the edge on port {port} outlived its manager"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
