//! `castnode manager`: the stream manager service — node registry with heartbeats, placement
//! lookups, WHIP/WHEP redirects — on its HTTP port (default 5080).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::manager::api;
use crate::manager::embedded::Embedded;

/// Serves the manager until SIGINT/SIGTERM.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let http = TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding HTTP to {}", cfg.http))?;
    let addr = http.local_addr()?;
    let manager = Arc::new(Embedded::new(
        &cfg.cluster.token,
        cfg.manager.heartbeat_ttl,
        &cfg.manager.region,
    ));
    let sweeper = manager.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            for node in sweeper.sweep() {
                tracing::warn!(%node, "node missed its heartbeats; out of placement");
            }
        }
    });
    let host = &cfg.public_host;
    let port = addr.port();
    println!("castnode manager is running.");
    println!("  Nodes register with: --manager http://{host}:{port} --cluster-token <the token>");
    println!(
        "  Where to publish: http://{host}:{port}/api/v1/broadcasts/live/mystream/publish?region=R"
    );
    println!(
        "  Where to watch:   http://{host}:{port}/api/v1/broadcasts/live/mystream/subscribe?region=R"
    );
    println!(
        "  WHIP / WHEP (redirects): http://{host}:{port}/whip/live/mystream, /whep/live/mystream"
    );
    println!("  Nodes:   http://{host}:{port}/api/v1/nodes");
    println!("  OpenAPI: http://{host}:{port}/api/v1/openapi.json");
    println!("  Metrics: http://{host}:{port}/metrics");
    tracing::info!(http = %addr, region = %cfg.manager.region, "manager node started");
    axum::serve(http, api::router(manager))
        .with_graceful_shutdown(crate::shutdown::signal())
        .await
        .context("HTTP server")?;
    Ok(())
}
