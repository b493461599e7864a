//! The manager's HTTP API (axum): node registration and heartbeats, placement lookups, WHIP/WHEP
//! redirects, nodes list, metrics. Documented in `docs/manager-api.md` and served as OpenAPI at
//! `/api/v1/openapi.json`.
//!
//! Guarantees: every error is JSON `{"error": reason}` with a status that says what went wrong
//! (400 malformed body, 422 contradicting values, 401 missing or unknown token, 403 a read-only token asking for a change,
//! 404 not live or no such record, 409 deleting the last admin token, 503 no node with room); a
//! malformed request never reaches the registry or the store. Node calls (register, report,
//! upstream, job list) prove the cluster token (or an admin token); reads need an API token (admin or read-only); changes an
//! admin token; placement lookups and redirects nothing unless `--require-token`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, RawQuery, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;

use super::embedded::{Embedded, NodeView};
use super::registry::NodeStatus;
use super::store::{Access, NodeGroup, RegionRecord};
use super::{Hint, ManagerError, NodeInfo, Placement, StreamManager};

/// The manager service's routes: [`api_routes`] plus the broadcasts and node-group APIs,
/// health, metrics and the WHIP/WHEP redirects.
pub(crate) fn router(manager: Arc<Embedded>) -> Router {
    api_routes(manager.clone()).merge(
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/",
                get(|| async { axum::response::Redirect::temporary("/console") }),
            )
            .route("/console", get(console))
            .route("/metrics", get(metrics))
            .route("/api/v1/broadcasts", get(broadcasts))
            .route("/api/v1/transcodes", get(transcodes))
            .route("/api/v1/nodegroups", get(node_groups))
            .route(
                "/api/v1/nodegroups/{name}",
                get(node_group)
                    .put(put_node_group)
                    .delete(delete_node_group),
            )
            .route("/whip/{app}/{key}", post(whip).options(preflight))
            .route("/whep/{app}/{key}", post(whep).options(preflight))
            .with_state(manager),
    )
}

/// The REST API a standalone node serves for its embedded manager next to its own routes:
/// nodes, placement lookups, regions and tokens under `/api/v1`.
pub(crate) fn api_routes(manager: Arc<Embedded>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/nodes", post(register).get(nodes))
        .route("/api/v1/nodes/{id}/load", put(report))
        .route("/api/v1/nodes/{id}/drain", post(drain))
        .route("/api/v1/nodes/{id}/jobs", get(jobs))
        .route("/api/v1/broadcasts/{app}/{key}/publish", get(publish))
        .route("/api/v1/broadcasts/{app}/{key}/subscribe", get(subscribe))
        .route("/api/v1/broadcasts/{app}/{key}/upstream", get(upstream))
        .route("/api/v1/regions", get(regions))
        .route(
            "/api/v1/regions/{name}",
            put(put_region).delete(delete_region),
        )
        .route("/api/v1/tokens", get(tokens).post(add_token))
        .route("/api/v1/tokens/{id}", delete(delete_token))
        .with_state(manager)
}

fn error(e: &ManagerError) -> Response {
    let status = match e {
        ManagerError::NotLive(_) | ManagerError::UnknownNode(_) | ManagerError::NotFound(_) => {
            StatusCode::NOT_FOUND
        }
        ManagerError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
        ManagerError::Unauthorized => StatusCode::UNAUTHORIZED,
        ManagerError::Forbidden(_) => StatusCode::FORBIDDEN,
        ManagerError::Conflict(_) => StatusCode::CONFLICT,
        ManagerError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ManagerError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ManagerError::Unreachable(_) => StatusCode::BAD_GATEWAY,
        ManagerError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut r = (
        status,
        axum::Json(serde_json::json!({ "error": e.to_string() })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// What an API call needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Any API token (admin or read-only).
    Read,
    /// An admin token.
    Admin,
}

/// Checks the bearer token of an API call: 401 without a known token, 403 for a read-only
/// token asking for a change.
fn authorize(m: &Embedded, headers: &HeaderMap, need: Need) -> Result<(), ManagerError> {
    match m.access(bearer(headers)) {
        None => Err(ManagerError::Unauthorized),
        Some(Access::ReadOnly) if need == Need::Admin => Err(ManagerError::Forbidden(
            "a read-only token cannot change anything",
        )),
        Some(_) => Ok(()),
    }
}

/// Placement lookups are open unless `--require-token`.
fn authorize_lookup(m: &Embedded, headers: &HeaderMap) -> Result<(), ManagerError> {
    if m.require_token() {
        authorize(m, headers, Need::Read)
    } else {
        Ok(())
    }
}

/// The client's address, when the server passes it (`ConnectInfo`).
fn client_ip(ext: &Extensions) -> Option<IpAddr> {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| {
            ext.get::<ConnectInfo<crate::web::ClientAddr>>()
                .map(|c| c.0.0.ip())
        })
}

impl IntoResponse for ManagerError {
    fn into_response(self) -> Response {
        error(&self)
    }
}

/// What a handler answers: a response, or the error as JSON with its status.
type ApiResult = Result<Response, ManagerError>;

/// `v` as a JSON answer.
fn json<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

/// `204 No Content`.
fn no_content() -> ApiResult {
    Ok(StatusCode::NO_CONTENT.into_response())
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

/// Node calls prove the cluster token (or an admin token).
fn authorize_node(m: &Embedded, headers: &HeaderMap) -> Result<(), ManagerError> {
    if m.node_caller(bearer(headers)) {
        Ok(())
    } else {
        Err(ManagerError::Unauthorized)
    }
}

async fn register(State(m): State<Arc<Embedded>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize_node(&m, &headers)?;
    let node: NodeInfo = json_body(&body)?;
    m.register_node(&node)?;
    tracing::info!(node = %node.id, role = ?node.role, region = %node.region, "node registered");
    no_content()
}

/// The largest load report accepted.
const REPORT_LIMIT: usize = 1 << 20;

/// A node's load report over HTTP (nodes send UDP heartbeats and fall back to this): it reads
/// its header and body without copying the header map, and answers `204` unless the node is
/// draining.
async fn report(
    State(m): State<Arc<Embedded>>,
    Path(id): Path<String>,
    req: axum::extract::Request,
) -> ApiResult {
    authorize_node(&m, req.headers())?;
    let body = axum::body::to_bytes(req.into_body(), REPORT_LIMIT)
        .await
        .map_err(|e| ManagerError::BadRequest(format!("body: {e}")))?;
    let r = m.report_owned(&id, json_body(&body)?)?;
    if r.draining { json(r) } else { no_content() }
}

/// A transcoder's job list, as a long poll: `?after=VERSION` (default 0) waits while the list's
/// version is `VERSION`, at most [`super::jobs::LONG_POLL`].
async fn jobs(
    State(m): State<Arc<Embedded>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult {
    authorize_node(&m, &headers)?;
    let mut after = 0;
    for pair in query.as_deref().unwrap_or_default().split('&') {
        if let Some(v) = pair.strip_prefix("after=") {
            after = v.parse().map_err(|_| {
                ManagerError::BadRequest(format!("after: {v:?} is not a version (0 to 2^64 − 1)"))
            })?;
        }
    }
    json(m.jobs(&id, after).await?)
}

async fn transcodes(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    json(serde_json::json!({ "transcodes": m.transcodes() }))
}

async fn nodes(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    json(serde_json::json!({ "nodes": m.nodes() }))
}

#[derive(Deserialize, Default)]
struct DrainBody {
    deadline_s: Option<u64>,
}

async fn drain(
    State(m): State<Arc<Embedded>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    let b: DrainBody = if body.is_empty() {
        DrainBody::default()
    } else {
        json_body(&body)?
    };
    let deadline_s = b.deadline_s.unwrap_or(300);
    if deadline_s > 86_400 {
        return Err(ManagerError::Invalid(
            "deadline_s: at most 86400 seconds".into(),
        ));
    }
    m.drain(&id, Duration::from_secs(deadline_s))?;
    tracing::info!(node = %id, deadline_s, "node drained by the API");
    no_content()
}

async fn broadcasts(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    json(serde_json::json!({ "broadcasts": m.broadcasts() }))
}

#[derive(Deserialize)]
struct RegionQuery {
    region: Option<String>,
}

/// Where to publish (`publish`) or watch `app/key`, for this caller.
async fn lookup(
    m: &Embedded,
    publish: bool,
    (app, key): (String, String),
    q: RegionQuery,
    headers: &HeaderMap,
    ext: &Extensions,
) -> Result<Placement, ManagerError> {
    authorize_lookup(m, headers)?;
    let name = format!("{app}/{key}");
    let hint = Hint {
        region: q.region.filter(|r| !r.is_empty()),
        client: client_ip(ext),
    };
    if publish {
        m.publish(&name, &hint).await
    } else {
        m.subscribe(&name, &hint).await
    }
}

/// A publish lookup; `?transcode=true` also marks the broadcast for a transcoder's ladder. Its
/// query is read as pairs, so that a repeated or malformed parameter is refused with a reason.
async fn publish(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    ext: Extensions,
) -> ApiResult {
    let (mut region, mut transcode) = (None, None);
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "region" => &mut region,
            "transcode" => &mut transcode,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ManagerError::BadRequest(format!("{k}: given twice")));
        }
        *slot = Some(v);
    }
    let transcode = match transcode.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ManagerError::BadRequest(format!(
                "transcode: {v:?} is not true or false"
            )));
        }
    };
    let q = RegionQuery { region };
    let broadcast = format!("{}/{}", name.0, name.1);
    let placed = lookup(&m, true, name, q, &headers, &ext).await?;
    if transcode {
        m.mark_transcode(&broadcast)?;
    }
    json(placed)
}

async fn subscribe(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
    headers: HeaderMap,
    ext: Extensions,
) -> ApiResult {
    json(lookup(&m, false, name, q, &headers, &ext).await?)
}

async fn regions(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    json(serde_json::json!({ "regions": m.regions()? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionBody {
    #[serde(default)]
    cidrs: Vec<ipnet::IpNet>,
}

async fn put_region(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    let b: RegionBody = json_body(&body)?;
    let rec = RegionRecord {
        name,
        cidrs: b.cidrs,
    };
    m.put_region(&rec)?;
    json(rec)
}

async fn delete_region(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    m.delete_region(&name)?;
    no_content()
}

async fn tokens(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    json(serde_json::json!({ "tokens": m.tokens()? }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    access: Access,
}

async fn add_token(State(m): State<Arc<Embedded>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    let b: TokenBody = json_body(&body)?;
    let (rec, secret) = m.add_token(&b.name, b.access)?;
    let mut v = serde_json::to_value(&rec).unwrap_or_default();
    v["token"] = secret.into();
    Ok((StatusCode::CREATED, axum::Json(v)).into_response())
}

async fn delete_token(
    State(m): State<Arc<Embedded>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    m.delete_token(&id)?;
    no_content()
}

/// A node group as listed: its settings and its nodes now.
fn group_view(g: &NodeGroup, nodes: &[NodeView]) -> serde_json::Value {
    let mut v = serde_json::to_value(g).unwrap_or_default();
    v["nodes"] = nodes
        .iter()
        .filter(|n| n.info.group.as_deref() == Some(g.name.as_str()))
        .map(|n| serde_json::json!({ "id": n.info.id, "status": n.status, "viewers": n.load.viewers }))
        .collect();
    v
}

async fn node_groups(State(m): State<Arc<Embedded>>, headers: HeaderMap) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    let nodes = m.nodes();
    let list: Vec<_> = m
        .node_groups()?
        .iter()
        .map(|g| group_view(g, &nodes))
        .collect();
    json(serde_json::json!({ "node_groups": list }))
}

async fn node_group(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&m, &headers, Need::Read)?;
    let groups = m.node_groups()?;
    let g = groups
        .iter()
        .find(|g| g.name == name)
        .ok_or_else(|| ManagerError::NotFound(format!("node group {name}")))?;
    json(group_view(g, &m.nodes()))
}

async fn put_node_group(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    let mut v: serde_json::Value = json_body(&body)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ManagerError::BadRequest("a JSON object is needed".into()))?;
    if obj.contains_key("name") {
        return Err(ManagerError::BadRequest(
            "name: comes from the path, not the body".into(),
        ));
    }
    obj.insert("name".into(), name.into());
    let g: NodeGroup =
        serde_json::from_value(v).map_err(|e| ManagerError::BadRequest(e.to_string()))?;
    let new = m.put_node_group(&g)?;
    tracing::info!(group = %g.name, min = g.min, max = g.max, "node group saved");
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(group_view(&g, &m.nodes()))).into_response())
}

async fn delete_node_group(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&m, &headers, Need::Admin)?;
    m.delete_node_group(&name)?;
    no_content()
}

#[derive(Deserialize)]
struct NodeQuery {
    node: Option<String>,
}

async fn upstream(
    State(m): State<Arc<Embedded>>,
    Path((app, key)): Path<(String, String)>,
    Query(q): Query<NodeQuery>,
    headers: HeaderMap,
) -> ApiResult {
    // Nodes ask with the cluster token; operators with an API token.
    if !m.node_caller(bearer(&headers)) {
        authorize(&m, &headers, Need::Read)?;
    }
    let name = format!("{app}/{key}");
    let list = m
        .upstream(&name, q.node.as_deref().unwrap_or_default())
        .await?;
    json(serde_json::json!({ "upstreams": list }))
}

/// `307 Temporary Redirect` to `url`: the client repeats its POST (with the offer) there.
fn redirect(url: &str) -> Response {
    let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    crate::web::cors(r)
}

async fn whip(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
    headers: HeaderMap,
    ext: Extensions,
) -> ApiResult {
    let p = lookup(&m, true, name, q, &headers, &ext).await?;
    Ok(redirect(p.urls["whip"].as_str().unwrap_or_default()))
}

async fn whep(
    State(m): State<Arc<Embedded>>,
    Path(name): Path<(String, String)>,
    Query(q): Query<RegionQuery>,
    headers: HeaderMap,
    ext: Extensions,
) -> ApiResult {
    let p = lookup(&m, false, name, q, &headers, &ext).await?;
    Ok(redirect(p.urls["whep"].as_str().unwrap_or_default()))
}

async fn preflight() -> Response {
    crate::web::preflight("POST, OPTIONS")
}

/// The management console: one page of plain HTML/JS on the REST API (nodes with live load,
/// broadcasts with a preview and the broadcaster's URLs, node groups, regions, load charts).
pub(crate) async fn console() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("console.html"),
    )
        .into_response()
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
    for (state, label) in [
        (NodeStatus::Live, "live"),
        (NodeStatus::Draining, "draining"),
        (NodeStatus::Failed, "failed"),
    ] {
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
    let (udp, http) = m.report_counts();
    let _ = writeln!(
        s,
        "# HELP castnode_manager_reports_total Load reports taken, by transport.\n# TYPE castnode_manager_reports_total counter\ncastnode_manager_reports_total{{transport=\"udp\"}} {udp}\ncastnode_manager_reports_total{{transport=\"http\"}} {http}"
    );
    let _ = writeln!(
        s,
        "# HELP castnode_manager_scale_actions_total Autoscaler actions by node group and action (out: node started, in: node drained, remove: node ended).\n# TYPE castnode_manager_scale_actions_total counter"
    );
    for ((group, action), n) in m.scale_action_counts() {
        let group = group.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            s,
            "castnode_manager_scale_actions_total{{group=\"{group}\",action=\"{action}\"}} {n}"
        );
    }
    let (states, taken) = m.job_counts();
    let _ = writeln!(
        s,
        "# HELP castnode_manager_transcode_jobs Transcode jobs by state (unassigned: no transcoder can take it; assigned: given, not yet running; running: the origin reports its ladder).\n# TYPE castnode_manager_transcode_jobs gauge"
    );
    for (state, n) in states {
        let _ = writeln!(
            s,
            "castnode_manager_transcode_jobs{{state=\"{state}\"}} {n}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP castnode_manager_transcode_reassignments_total Transcode jobs taken from their transcoder, by why (failed, draining, gone, lost: the origin no longer shows its ladder, no_start: it never showed it).\n# TYPE castnode_manager_transcode_reassignments_total counter"
    );
    for (why, n) in taken {
        let _ = writeln!(
            s,
            "castnode_manager_transcode_reassignments_total{{reason=\"{why}\"}} {n}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}
