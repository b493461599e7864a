//! `castnode standalone`: RTMP ingest, RTMP and HTTP-FLV playback, API and metrics in one
//! process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::node::NodeContext;
use crate::webrtc::driver::Webrtc;

/// Binds the listeners, prints where to publish and play, and serves until SIGINT/SIGTERM.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let rtmp = TcpListener::bind(cfg.rtmp)
        .await
        .with_context(|| format!("binding RTMP to {}", cfg.rtmp))?;
    let http = TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding HTTP to {}", cfg.http))?;
    let (rtmp_port, http_port) = (rtmp.local_addr()?.port(), http.local_addr()?.port());
    let host = cfg.public_host.clone();
    let (udp, public_ips) = (cfg.webrtc_udp, cfg.webrtc_public_ip.clone());
    let ctx = NodeContext::new(cfg);
    let webrtc = Webrtc::start(udp, &public_ips, ctx.clone())
        .await
        .with_context(|| format!("binding WebRTC UDP to {udp}"))?;
    println!("castnode standalone is running.");
    println!("  OBS: Settings > Stream > Service: Custom");
    println!("       Server:     rtmp://{host}:{rtmp_port}/live");
    println!("       Stream key: mystream   (any key; the broadcast is live/<key>)");
    println!(
        "  ffmpeg: ffmpeg -re -i clip.flv -c copy -f flv rtmp://{host}:{rtmp_port}/live/mystream"
    );
    println!(
        "  Publish from a browser (camera + microphone, WHIP): http://{host}:{http_port}/publish/live/mystream"
    );
    println!(
        "       (browsers open cameras only on https:// or http://localhost; tunnel the port if remote)"
    );
    println!("  WHIP (OBS 30+, GStreamer): http://{host}:{http_port}/whip/live/mystream");
    println!("  Watch in a browser: http://{host}:{http_port}/play/live/mystream");
    println!(
        "  Watch (HTTP-FLV): http://{host}:{http_port}/live/mystream.flv   e.g. ffplay <that URL>"
    );
    println!("  Watch (RTMP):     rtmp://{host}:{rtmp_port}/live/mystream");
    println!(
        "  Watch (WebRTC, WHEP): http://{host}:{http_port}/whep/live/mystream   (UDP {})",
        webrtc.local_addr()
    );
    println!("  Broadcasts: http://{host}:{http_port}/api/v1/broadcasts");
    println!("  Metrics:    http://{host}:{http_port}/metrics");
    tracing::info!(rtmp = %ctx.cfg.rtmp, http = %ctx.cfg.http, webrtc_udp = %webrtc.local_addr(), "standalone node started");

    tokio::spawn(crate::rtmp::driver::serve(rtmp, ctx.clone()));
    let reaper = Arc::clone(&ctx);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            reaper.hub.reap(std::time::Instant::now());
        }
    });
    let http = crate::http::flv::HttpListener::new(http, ctx.clone())?;
    let routes = crate::http::router(ctx.clone()).merge(crate::webrtc::signal::router(ctx, webrtc));
    axum::serve(http, routes)
        .with_graceful_shutdown(crate::shutdown::signal())
        .await
        .context("HTTP server")?;
    tracing::info!("shutting down");
    Ok(())
}
