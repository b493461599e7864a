//! schemathesis (from PyPI; `./setup.sh test` installs it into `target/pyenv`) fuzzes the stream
//! manager's API from its OpenAPI document: no 5xx, responses as documented, schema-valid
//! requests accepted, schema-violating ones refused. One origin is registered first (with room
//! for every lookup), so placement answers are real. The stateful phase is left out: it
//! re-registers the origin under other roles, after which 503 ("no node with room") is the
//! right answer. Skips, saying so, where schemathesis is missing.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const TOKEN: &str = "schemathesis-token-0123456789";

fn schemathesis() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/schemathesis");
    if venv.exists() {
        return Some(venv);
    }
    Command::new("schemathesis")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("schemathesis"))
}

#[test]
fn schemathesis_finds_nothing() {
    let Some(st) = schemathesis() else {
        eprintln!("SKIPPED: schemathesis is not installed (./setup.sh test installs it)");
        return;
    };
    let manager = Server::start_role(
        "manager",
        &[
            "--cluster-token",
            TOKEN,
            "--heartbeat-ttl",
            "600",
            // Node groups it makes must start no process.
            "--provisioner",
            "none",
        ],
    );
    let base = format!("http://127.0.0.1:{}", manager.http_port);
    let node = br#"{"id":"origin-1","role":"origin","region":"default","addresses":{"rtmp":"rtmp://127.0.0.1:1935","http":"http://127.0.0.1:8080"},"capacity":1000000000}"#;
    let (status, _, body) = http_request_with(
        manager.http_port,
        "POST",
        "/api/v1/nodes",
        Some("application/json"),
        Some(TOKEN),
        node,
    );
    assert_eq!(status, 204, "{body}");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let out = Command::new(&st)
        .args(["--config-file", config])
        .args([
            "run",
            &format!("{base}/api/v1/openapi.json"),
            "--url",
            &base,
        ])
        .args(["--checks", "all", "--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "30", "--seed", "20261125"])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        // Its cache (`.schemathesis/`) goes to a temporary directory, not into the checkout.
        .current_dir(temp_dir("schemathesis"))
        .output()
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("generated") || l.contains("❌"))
        .collect();
    println!("schemathesis: {}", summary.join(" | "));
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!manager.log().contains("panicked"));
}
