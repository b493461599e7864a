//! The manager's HTTP API (axum): node registration and heartbeats, placement lookups, WHIP/WHEP
//! redirects, nodes list, metrics. Documented in `docs/manager-api.md` and served as OpenAPI at
//! `/api/v1/openapi.json`.
//!
//! Guarantees: every error is JSON `{"error": reason}` with a status that says what went wrong
//! (400 malformed body, 401 missing/wrong token, 404 not live or unknown node, 503 no node with
//! room); a malformed request never reaches the registry.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;

use super::embedded::Embedded;
use super::registry::NodeStatus;
use super::{Hint, LoadReport, ManagerError, NodeInfo, StreamManager};

/// The manager service's routes: [`api_routes`] plus health, metrics and the WHIP/WHEP
/// redirects.
pub fn router(manager: Arc<Embedded>) -> Router {
    api_routes(manager.clone()).merge(
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics))
            .route("/whip/{app}/{key}", post(whip).options(preflight))
            .route("/whep/{app}/{key}", post(whep).options(preflight))
            .with_state(manager),
    )
}

/// The REST API alone (nodes and placement lookups under `/api/v1`): what a standalone node
/// serves for its embedded manager next to its own routes.
pub fn api_routes(manager: Arc<Embedded>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/nodes", post(register).get(nodes))
        .route("/api/v1/nodes/{id}/load", put(report))
        .route("/api/v1/broadcasts/{app}/{key}/publish", get(publish))
        .route("/api/v1/broadcasts/{app}/{key}/subscribe", get(subscribe))
        .route("/api/v1/broadcasts/{app}/{key}/upstream", get(upstream))
        .with_state(manager)
}

fn error(e: &ManagerError) -> Response {
    let status = match e {
        ManagerError::NotLive(_) | ManagerError::UnknownNode(_) => StatusCode::NOT_FOUND,
        ManagerError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::Unauthorized => StatusCode::UNAUTHORIZED,
        ManagerError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ManagerError::Unreachable(_) => StatusCode::BAD_GATEWAY,
    };
    let mut r = (
        status,
        axum::Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response();
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

fn json_body<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ManagerError> {
    serde_json::from_slice(body).map_err(|e| ManagerError::BadRequest(e.to_string()))
}

async fn register(State(m): State<Arc<Embedded>>, headers: HeaderMap, body: Bytes) -> Response {
    if !m.token_ok(bearer(&headers)) {
        return error(&ManagerError::Unauthorized);
    }
    let node: NodeInfo = match json_body(&body) {
        Ok(n) => n,
        Err(e) => return error(&e),
    };
    match m.register(&node, bearer(&headers)).await {
        Ok(()) => {
            tracing::info!(node = %node.id, role = ?node.role, region = %node.region, "node registered");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(&e),
    }
}

async fn report(
    State(m): State<Arc<Embedded>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !m.token_ok(bearer(&headers)) {
        return error(&ManagerError::Unauthorized);
    }
    let load: LoadReport = match json_body(&body) {
        Ok(l) => l,
        Err(e) => return error(&e),
    };
    match m.report(&id, &load).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(&e),
    }
}

async fn nodes(State(m): State<Arc<Embedded>>) -> Response {
    axum::Json(serde_json::json!({ "nodes": m.nodes() })).into_response()
}

#[derive(Deserialize)]
struct RegionQuery {
    region: Option<String>,
}

fn hint(q: RegionQuery) -> Hint {
    Hint {
        region: q.region.filter(|r| !r.is_empty()),
        client: None,
    }
}

async fn publish(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
) -> Response {
    let name = format!("{app}/{key}");
    match m.publish(&name, &hint(q)).await {
        Ok(p) => axum::Json(p).into_response(),
        Err(e) => error(&e),
    }
}

async fn subscribe(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
) -> Response {
    let name = format!("{app}/{key}");
    match m.subscribe(&name, &hint(q)).await {
        Ok(p) => axum::Json(p).into_response(),
        Err(e) => error(&e),
    }
}

#[derive(Deserialize)]
struct NodeQuery {
    node: Option<String>,
}

async fn upstream(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<NodeQuery>,
) -> Response {
    let name = format!("{app}/{key}");
    match m
        .upstream(&name, q.node.as_deref().unwrap_or_default())
        .await
    {
        Ok(list) => axum::Json(serde_json::json!({ "upstreams": list })).into_response(),
        Err(e) => error(&e),
    }
}

/// `307 Temporary Redirect` to `url`: the client repeats its POST (with the offer) there.
fn redirect(url: &str) -> Response {
    let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    crate::http::cors(r)
}

async fn whip(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
) -> Response {
    match m.publish(&format!("{app}/{key}"), &hint(q)).await {
        Ok(p) => redirect(p.urls["whip"].as_str().unwrap_or_default()),
        Err(e) => error(&e),
    }
}

async fn whep(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
) -> Response {
    match m.subscribe(&format!("{app}/{key}"), &hint(q)).await {
        Ok(p) => redirect(p.urls["whep"].as_str().unwrap_or_default()),
        Err(e) => error(&e),
    }
}

async fn preflight() -> Response {
    crate::http::preflight("POST, OPTIONS")
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn metrics(State(m): State<Arc<Embedded>>) -> Response {
    let nodes = m.nodes();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP castnode_manager_nodes Registered nodes by state.\n# TYPE castnode_manager_nodes gauge"
    );
    for (state, label) in [(NodeStatus::Live, "live"), (NodeStatus::Failed, "failed")] {
        let n = nodes.iter().filter(|v| v.status == state).count();
        let _ = writeln!(s, "castnode_manager_nodes{{state=\"{label}\"}} {n}");
    }
    let _ = writeln!(
        s,
        "# HELP castnode_manager_placements_total Placement lookups by kind, region asked and result.\n# TYPE castnode_manager_placements_total counter"
    );
    for ((kind, region, result), n) in m.placement_counts() {
        let region = region.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            s,
            "castnode_manager_placements_total{{kind=\"{kind}\",region=\"{region}\",result=\"{result}\"}} {n}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}
