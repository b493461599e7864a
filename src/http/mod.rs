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

/// Adds the CORS headers browsers need to read a WHIP/WHEP (or redirect) answer from another
/// origin: any origin, and the `Location` header exposed.
pub fn cors(mut r: axum::response::Response) -> axum::response::Response {
    use axum::http::HeaderValue;
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location"),
    );
    r
}

/// The answer to a CORS preflight for `methods`.
pub fn preflight(methods: &'static str) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode};
    let mut r = cors(StatusCode::NO_CONTENT.into_response());
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, If-Match"),
    );
    r
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
