//! The node's HTTP surface (axum): HTTP-FLV playback, health, metrics and the broadcasts API.
//!
//! Guarantees: a request never blocks another; errors are plain-text bodies with the status that
//! says what went wrong (404 not live, 503 at the player limit); FLV responses are chunked,
//! uncached and open to any origin (CORS).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use tracing::{debug, info};

use crate::media::feed::{Feed, FeedStatus};
use crate::node::NodeContext;
use crate::rtmp::conn::valid_key;
use crate::rtmp::mux::FlvMuxer;

/// The node's routes.
pub fn router(ctx: Arc<NodeContext>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/broadcasts", get(broadcasts))
        .fallback(get(flv))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&ctx.stats, &ctx.hub),
    )
}

async fn broadcasts(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let list: Vec<_> = ctx.hub.broadcasts().iter().map(|b| b.describe()).collect();
    axum::Json(serde_json::json!({ "broadcasts": list }))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], text).into_response()
}

/// What an HTTP-FLV response body holds between polls.
struct FlvState {
    feed: Feed<FlvMuxer>,
    /// Buffers of the current batch not yet handed to hyper.
    queue: VecDeque<Bytes>,
    /// Reused for every batch.
    batch: Vec<Bytes>,
    _guard: crate::node::PlayerGuard,
    ctx: Arc<NodeContext>,
}

/// `GET /{app}/{key}.flv`: the broadcast as an endless FLV stream.
async fn flv(State(ctx): State<Arc<NodeContext>>, uri: Uri) -> Response {
    let path = uri.path().trim_start_matches('/');
    let Some(name) = path
        .strip_suffix(".flv")
        .filter(|n| n.contains('/') && valid_key(n))
    else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    let Some(guard) = ctx.admit_player(true) else {
        info!(
            broadcast = name,
            "HTTP-FLV player refused: player limit reached"
        );
        return plain(StatusCode::SERVICE_UNAVAILABLE, "player limit reached\n");
    };
    let Some(consumer) = ctx.hub.subscribe(name) else {
        return plain(StatusCode::NOT_FOUND, "broadcast not live\n");
    };
    debug!(broadcast = name, "HTTP-FLV player started");
    let feed = Feed::new(consumer, FlvMuxer, ctx.cfg.player_batch);
    let state = FlvState {
        feed,
        queue: VecDeque::new(),
        batch: Vec::new(),
        _guard: guard,
        ctx: ctx.clone(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(b), st));
            }
            let FlvState {
                feed,
                queue,
                batch,
                ctx,
                ..
            } = &mut st;
            match feed.next(batch).await {
                FeedStatus::Ended => return None,
                FeedStatus::Data { skipped } => {
                    let bc = feed.consumer().broadcast();
                    if skipped > 0 {
                        info!(broadcast = %bc.name(), skipped, "HTTP-FLV player fell behind; skipped to the newest keyframe");
                    }
                    let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
                    bc.stats.bytes_out.fetch_add(len, Relaxed);
                    ctx.hub.stats().bytes_out.fetch_add(len, Relaxed);
                    queue.extend(batch.drain(..));
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("video/x-flv"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}
