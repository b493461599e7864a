//! The node's HTTP surface: health, metrics and the broadcasts API (axum), and HTTP-FLV playback
//! ([`flv`], beside axum on the same port).
//!
//! Guarantees: a request never blocks another.

pub(crate) mod flv;
mod metrics;
pub(crate) mod page;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Uri, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::manager::embedded::Embedded;
use crate::node::NodeContext;
pub(crate) use page::NodeFacts;

pub(crate) use crate::web::ClientAddr;

/// The client's address of a connection to the node's HTTP port (served through
/// [`flv::HttpListener`]).
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, flv::HttpListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, flv::HttpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// What the node's pages and broadcasts list need.
#[derive(Clone)]
struct Pages {
    ctx: Arc<NodeContext>,
    facts: Arc<NodeFacts>,
    /// Standalone's embedded manager: its view joins the broadcasts list, and `/console` is
    /// served against it.
    manager: Option<Arc<Embedded>>,
}

/// The node's routes: the first page, health, metrics, the broadcasts list, the player and
/// publisher pages, and with an embedded `manager` (standalone) its console.
pub(crate) fn router(
    ctx: Arc<NodeContext>,
    facts: NodeFacts,
    manager: Option<Arc<Embedded>>,
) -> Router {
    let console = manager.is_some();
    let pages = Pages {
        ctx: ctx.clone(),
        facts: Arc::new(facts),
        manager,
    };
    let mut r = Router::new()
        .route("/", get(first_page))
        .route("/api/v1/broadcasts", get(broadcasts))
        .with_state(pages);
    if console {
        r = r.route("/console", get(crate::manager::api::console));
    }
    r.merge(
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics))
            .route("/play/{app}/{key}", get(play_page))
            .route("/publish/{app}/{key}", get(publish_page))
            .with_state(ctx),
    )
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&ctx),
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

/// The node's broadcasts, described as the API and the first page show them.
fn described(ctx: &NodeContext) -> Vec<crate::media::hub::BroadcastInfo> {
    let now = std::time::Instant::now();
    ctx.hub
        .broadcasts()
        .iter()
        .map(|b| b.describe(now))
        .collect()
}

/// The first page ([`page`]): live broadcasts with their play links, OBS settings, links.
async fn first_page(State(p): State<Pages>, headers: HeaderMap, uri: Uri) -> impl IntoResponse {
    let host = page::request_host(&headers, &uri, &p.facts);
    let list = described(&p.ctx);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page::render(&p.facts, &host, &list),
    )
}

/// The node's broadcasts. With an embedded manager (standalone) each also carries the
/// manager's figures for it, as `castnode manager` lists them (`viewers`, `publishers`,
/// `nodes`), so that the console reads this list on both.
async fn broadcasts(State(p): State<Pages>) -> impl IntoResponse {
    let list = described(&p.ctx);
    let Some(m) = &p.manager else {
        return axum::Json(serde_json::json!({ "broadcasts": list }));
    };
    let mut seen = m.broadcasts();
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(list.len());
    for b in list {
        let mut v = serde_json::to_value(&b).unwrap_or_default();
        let (viewers, publishers, nodes) = match seen.iter().position(|s| s.name == b.name) {
            Some(i) => {
                let s = seen.swap_remove(i);
                (
                    s.viewers,
                    s.publishers,
                    serde_json::to_value(s.nodes).unwrap_or_default(),
                )
            }
            // Not reported to the manager yet (within a second of its start).
            None => (b.players, Vec::new(), serde_json::json!([])),
        };
        v["viewers"] = viewers.into();
        v["publishers"] = publishers.into();
        v["nodes"] = nodes;
        out.push(v);
    }
    // Broadcasts other nodes report to this manager.
    out.extend(
        seen.into_iter()
            .map(|s| serde_json::to_value(s).unwrap_or_default()),
    );
    axum::Json(serde_json::json!({ "broadcasts": out }))
}
