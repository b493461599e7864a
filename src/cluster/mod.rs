//! The cluster link: how castnode nodes (origin, relay, edge, …) pass broadcasts to each other
//! over QUIC, in the spirit of Media over QUIC.
//!
//! One QUIC connection joins two nodes (ALPN [`wire::ALPN`]). The client opens one bidirectional
//! *control stream* for requests and answers (HELLO, SUBSCRIBE, PUBLISH, ANNOUNCE, …); each group
//! of a broadcast (one GOP of video with the audio interleaved, as the hub's log has it) travels
//! on its own unidirectional *group stream*, newest group at the highest priority, so a group
//! that falls behind is reset rather than delaying the next one. Both ends prove they hold the
//! cluster token over the TLS session. The format is written down in `docs/cluster-protocol.md`.
//!
//! # Module map
//!
//! - [`wire`]: the sans-IO codec: control messages, group stream headers and items, token
//!   proofs, error and reset codes.
//! - [`tls`]: rustls/quinn configurations (self-signed + token, or the operator's CA).
//! - `encoding`: a hub entry's bytes on a group stream (memoized per entry), and the sink that
//!   writes received groups into the hub.
//! - `groups`: the group policy both ways: where groups start and which are reset (sending),
//!   the order they are read in and when a stalled one is dropped (receiving).
//! - `session`: one connection's protocol without I/O, for either end, over quinn-proto's
//!   connection: HELLO, SUBSCRIBE / PUBLISH and their answers, ENDED, group streams.
//! - [`driver`]: the sockets: castnode's own loop around quinn-proto's endpoint and the
//!   sessions, serving other nodes on its own threads and connecting upstream.
//! - [`link`]: the node's end of the link: fetching broadcasts from upstream on demand,
//!   failover between upstreams, publishing upstream.

pub mod driver;
pub(crate) mod encoding;
pub(crate) mod groups;
pub mod link;
pub(crate) mod session;
pub mod tls;
pub mod wire;
