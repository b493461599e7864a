//! WHIP and WHEP over HTTP (RFC 9725, draft-ietf-wish-whep): `POST /whip/{app}/{key}` (publish)
//! and `POST /whep/{app}/{key}` (play) with an SDP offer → `201 Created`, the answer and a
//! `Location`; `DELETE` on that location ends the session; `PATCH` (trickle ICE) is accepted and
//! ignored, since an ICE-lite server learns the peer's address from its checks; `OPTIONS`
//! answers CORS preflights.
//!
//! What a WHEP viewer plays comes from the offer's query: `?rendition=NAME` one rung of the
//! broadcast's ABR ladder, `?rendition=source` the source, `?rendition=auto` or nothing the
//! ladder with ABR ([`super::abr`]) when the broadcast has one (waiting up to 3 s for a ladder
//! this node makes to declare its rungs), else the source.
//!
//! Guarantees: every refusal says why in a plain-text body: 415 (not `application/sdp`), 413 (a
//! body over 64 KiB), 400 (malformed SDP, or no codec castnode can use), 404 (WHEP: not live, or
//! no such rung), 409 (WHIP: the broadcast already has a publisher), 503 (`--max-viewers`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use tracing::{debug, info};

use super::WebrtcError;
use super::driver::Webrtc;
use super::table::Play;
use crate::media::{Codec, PublishError, valid_name};
use crate::node::NodeContext;
use crate::web::cors;

/// Largest offer accepted.
pub(crate) const MAX_OFFER: usize = 64 << 10;

#[derive(Clone)]
struct SignalState {
    ctx: Arc<NodeContext>,
    webrtc: Arc<Webrtc>,
}

/// The WHIP and WHEP routes.
pub(crate) fn router(ctx: Arc<NodeContext>, webrtc: Arc<Webrtc>) -> Router {
    Router::new()
        .route("/whep/{app}/{key}", post(whep).options(preflight))
        .route(
            "/whep/{app}/{key}/{id}",
            delete(end_whep).patch(trickle).options(preflight),
        )
        .route("/whip/{app}/{key}", post(whip).options(preflight))
        .route(
            "/whip/{app}/{key}/{id}",
            delete(end_whip).patch(trickle).options(preflight),
        )
        .layer(DefaultBodyLimit::max(MAX_OFFER))
        .with_state(SignalState { ctx, webrtc })
}

fn refuse(status: StatusCode, reason: String) -> Response {
    cors(
        (
            status,
            [(header::CONTENT_TYPE, "text/plain")],
            reason + "\n",
        )
            .into_response(),
    )
}

async fn preflight() -> Response {
    crate::web::preflight("POST, PATCH, DELETE, OPTIONS")
}

/// The offer in a request, or the refusal to answer with.
fn sdp_body<'a>(headers: &HeaderMap, body: &'a Bytes) -> Result<&'a str, (StatusCode, String)> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !ctype
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/sdp"))
    {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected Content-Type application/sdp, got {ctype:?}"),
        ));
    }
    std::str::from_utf8(body).map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "malformed SDP offer: not UTF-8".into(),
        )
    })
}

/// The response to a session set up (or not) for `name`.
fn answered(
    what: &str,
    name: &str,
    location: impl FnOnce(u64) -> String,
    r: Result<(u64, String), WebrtcError>,
) -> Response {
    match r {
        Ok((id, answer)) => {
            debug!(broadcast = %name, session = id, "{what} session created");
            cors(
                (
                    StatusCode::CREATED,
                    [
                        (header::CONTENT_TYPE, "application/sdp".to_owned()),
                        (header::LOCATION, location(id)),
                    ],
                    answer,
                )
                    .into_response(),
            )
        }
        Err(e) => {
            info!(broadcast = %name, error = %e, "{what} offer refused");
            let status = match e {
                WebrtcError::BadOffer(_) | WebrtcError::NoCodec(_) | WebrtcError::Rejected(_) => {
                    StatusCode::BAD_REQUEST
                }
                WebrtcError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            };
            refuse(status, e.to_string())
        }
    }
}

/// How long a WHEP offer waits at most for a broadcast's first frames ([`settle_reordering`]).
const REORDER_WAIT: Duration = Duration::from_millis(500);

/// Whether a broadcast's video has B-frames (which decides whether its WebRTC viewers get the
/// B-frame-free re-encode) shows only in its first frames: the first reordered frame comes third
/// in decode order. A viewer arriving before them (a broadcast just published, or just fetched
/// from upstream by an edge) waits for them, at most [`REORDER_WAIT`]; it would otherwise get
/// the B-frames passed through, which browsers cannot play.
async fn settle_reordering(bc: &crate::media::hub::Broadcast) {
    let end = tokio::time::Instant::now() + REORDER_WAIT;
    loop {
        let tracks = bc.tracks();
        let video = tracks
            .iter()
            .find(|(id, t)| id.is_source() && t.codec == crate::media::Codec::H264);
        let settled = match video {
            Some((id, _)) => bc.frames_seen(*id) >= 3,
            // No video (yet): settled once the broadcast has shown it has frames without it.
            None => tracks
                .iter()
                .filter(|(id, _)| id.is_source())
                .any(|(id, _)| bc.frames_seen(*id) >= 10),
        };
        if settled || tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn whep(
    State(st): State<SignalState>,
    Path((app, key)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = format!("{app}/{key}");
    let sdp = match sdp_body(&headers, &body) {
        Ok(sdp) => sdp,
        Err((status, reason)) => return refuse(status, reason),
    };
    if !valid_name(&name) {
        return refuse(StatusCode::NOT_FOUND, format!("no broadcast {name}"));
    }
    if st.ctx.stats.webrtc_viewers.load(Relaxed) >= st.ctx.cfg.max_viewers as u64 {
        info!(broadcast = %name, "WHEP viewer refused: viewer limit reached");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "viewer limit reached".into(),
        );
    }
    let Some(consumer) = st.ctx.subscribe(&name).await else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("broadcast {name} is not live"),
        );
    };
    let asked = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("rendition="))
        .filter(|r| !r.is_empty());
    let bc = consumer.broadcast().clone();
    let play = match asked {
        Some("source") => Play::Source,
        Some(r) if r != "auto" => {
            if !st.ctx.rendition_ready(&bc, r).await {
                return refuse(
                    StatusCode::NOT_FOUND,
                    format!("broadcast {name} has no rendition {r}"),
                );
            }
            Play::Rung(r.into())
        }
        _ => Play::Auto { source: false },
    };
    settle_reordering(&bc).await;
    let play = match play {
        Play::Auto { .. } if has_ladder(&st.ctx, &bc).await => {
            // The source is the top rung where it plays as it is; with B-frames it would need a
            // re-encode of its own, and the ladder's tallest rung is that already.
            let source = bc
                .tracks()
                .iter()
                .find(|(id, t)| id.is_source() && t.codec == Codec::H264)
                .is_some_and(|(id, _)| !bc.has_b_frames(*id));
            Play::Auto { source }
        }
        Play::Auto { .. } => Play::Source,
        play => play,
    };
    debug!(broadcast = %name, ?play, "WHEP viewer");
    let r = st.webrtc.whep(consumer, sdp, play).await;
    answered("WHEP", &name, |id| format!("/whep/{app}/{key}/{id}"), r)
}

/// Whether `bc` has an ABR ladder, waiting (at most 3 s) for the ladder this node makes to
/// declare its rungs (a broadcast that just went live).
async fn has_ladder(ctx: &NodeContext, bc: &Arc<crate::media::hub::Broadcast>) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut changes = bc.watch();
    loop {
        if !bc.renditions().is_empty() {
            return true;
        }
        if ctx.ladders.is_none() || !bc.is_live() {
            return false;
        }
        if !matches!(
            tokio::time::timeout_at(deadline, changes.changed()).await,
            Ok(Ok(()))
        ) {
            return !bc.renditions().is_empty();
        }
    }
}

async fn whip(
    State(st): State<SignalState>,
    Path((app, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = format!("{app}/{key}");
    let sdp = match sdp_body(&headers, &body) {
        Ok(sdp) => sdp,
        Err((status, reason)) => return refuse(status, reason),
    };
    let producer = match st.ctx.hub.publish(&name, std::time::Instant::now()) {
        Ok(p) => p,
        Err(e @ PublishError::BadName(_)) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
        Err(e) => {
            info!(broadcast = %name, error = %e, "WHIP publisher refused");
            return refuse(StatusCode::CONFLICT, e.to_string());
        }
    };
    let r = st.webrtc.whip(producer, sdp).await;
    answered("WHIP", &name, |id| format!("/whip/{app}/{key}/{id}"), r)
}

async fn end_whep(
    State(st): State<SignalState>,
    Path((_app, _key, id)): Path<(String, String, u64)>,
) -> Response {
    end(&st, id, false).await
}

async fn end_whip(
    State(st): State<SignalState>,
    Path((_app, _key, id)): Path<(String, String, u64)>,
) -> Response {
    end(&st, id, true).await
}

async fn end(st: &SignalState, id: u64, publisher: bool) -> Response {
    if st.webrtc.close(id, publisher).await {
        cors(StatusCode::OK.into_response())
    } else {
        refuse(StatusCode::NOT_FOUND, format!("no session {id}"))
    }
}

async fn trickle() -> Response {
    cors(StatusCode::NO_CONTENT.into_response())
}
