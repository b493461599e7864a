//! What every HTTP surface of a node shares: its pages and API ([`crate::http`]), WHIP/WHEP
//! ([`crate::webrtc::signal`]) and the stream manager's API ([`crate::manager::api`]): the
//! client's address as handlers see it, and CORS. It sits below all of them and knows none.

use std::net::SocketAddr;

use axum::http::header;
use axum::response::IntoResponse;

/// A client's address as handlers see it (`ConnectInfo<ClientAddr>`): the peer of the TCP
/// connection the request came on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientAddr(pub(crate) SocketAddr);

/// Adds the CORS headers browsers need to read a WHIP/WHEP (or redirect) answer from another
/// origin: any origin, and the `Location` header exposed.
pub(crate) fn cors(mut r: axum::response::Response) -> axum::response::Response {
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
pub(crate) fn preflight(methods: &'static str) -> axum::response::Response {
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
