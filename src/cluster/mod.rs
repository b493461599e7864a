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
//! - [`link`]: the node's end of the link: fetching broadcasts from upstream on demand (quinn),
//!   failover between upstreams, publishing upstream.
//! - [`serve`]: serving other nodes: castnode's own driver around quinn-proto, on its own
//!   thread, writing subscriptions' groups from the hub.

pub mod link;
pub mod serve;
pub mod tls;
pub mod wire;
