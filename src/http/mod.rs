//! The node's HTTP surface: health, metrics and the broadcasts API (axum), and HTTP-FLV playback
//! ([`flv`], beside axum on the same port).
//!
//! Guarantees: a request never blocks another.

pub mod flv;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::node::NodeContext;

/// The node's routes.
pub fn router(ctx: Arc<NodeContext>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/broadcasts", get(broadcasts))
        .route("/play/{app}/{key}", get(play_page))
        .route("/publish/{app}/{key}", get(publish_page))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&ctx),
    )
}

/// The WHEP player page (plain HTML/JS embedded in the binary): plays the broadcast named in its
/// path, with a small stats overlay (resolution, fps, bitrate, RTT).
async fn play_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/play.html"),
    )
}

/// The WHIP publisher page (plain HTML/JS embedded in the binary): sends the browser's camera
/// and microphone to the broadcast named in its path.
async fn publish_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/publish.html"),
    )
}

async fn broadcasts(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let list: Vec<_> = ctx.hub.broadcasts().iter().map(|b| b.describe()).collect();
    axum::Json(serde_json::json!({ "broadcasts": list }))
}
