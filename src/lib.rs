//! castnode: a self-hostable live-streaming cluster in one binary.
//!
//! # Data flow (what is built today)
//!
//! ```text
//!  OBS / ffmpeg ──RTMP──> rtmp::driver ──> rtmp::conn (sans-IO) ──> rtmp::flv (tag → Item)
//!  browser ─────WHIP────> webrtc::driver (str0m) ──> webrtc::ingest (access unit → Item)
//!  upstream node ─QUIC──> cluster::link (quinn; cluster::wire frames → Item, fetched on demand)
//!                                              │ BroadcastProducer::push
//!                                              ▼
//!                         media::hub  (per broadcast: log of groups, shared Arc<Entry>)
//!                            ▲   │ BroadcastConsumer::read (per player cursor)
//!   transcode (renditions:   │   ├───────────────────────────────────────────┐
//!   AAC⇄Opus, no-B-frames) ──┘   ▼                                           ▼
//!                         media::feed (batches; Muxer encodes each   webrtc::packetize: RTP
//!                                      entry once, memoized in the   payloads once per frame
//!                                      entry, shared by every player) (memo); webrtc::sender:
//!                                                                     header + SRTP per viewer
//!                           │ rtmp::mux::RtmpMuxer  │ FlvMuxer               │
//!                           ▼                       ▼                        ▼
//!                   player (a turn per interval on media::pace:      WHEP viewers (UDP)
//!                           8 phase tasks; one vectored write per turn)
//!                           │                       │
//!                     RTMP players           HTTP-FLV players
//! ```
//!
//! The hub also feeds the cluster link: nodes pass broadcasts to each other over QUIC
//! (`docs/cluster-protocol.md`), origin → relays → edges, fetched only where someone watches.
//!
//! ```text
//!  origin:  RTMP / WHIP ingest ──> media::hub ──> cluster::serve (quinn-proto, own threads)
//!                                                        │ QUIC (cluster::wire: a control
//!                                                        ▼  stream, a QUIC stream per group)
//!  relay:   cluster::link (quinn) ──> media::hub ──> cluster::serve
//!                                                        │ QUIC
//!                                                        ▼
//!  edge:    cluster::link ──> media::hub ──> RTMP / HTTP-FLV / WHEP players (as above)
//!
//!  An edge subscribes upstream on its first viewer and drops the subscription --linger seconds
//!  after its last; on a dead upstream it fails over to the next --upstream. A broadcast
//!  published to a relay or an edge is published up the same link to the origin
//!  (cluster::link → the upstream's cluster::serve).
//! ```
//!
//! # Module map
//!
//! - [`config`]: flags + `CASTNODE_*` env + TOML, validated before binding; [`names`]: the
//!   name rule of nodes, regions and the manager's records (shared with the manager). Both sit
//!   below every protocol and the manager.
//! - [`media`]: the protocol-agnostic model ([`media::frame`]), the [`media::hub`] (which holds
//!   every protocol's broadcasts to one name rule, [`media::valid_name`]) and the
//!   per-player [`media::feed`]; [`media::pace`], the write clock whose few tasks take the
//!   players' turns.
//! - [`codec`]: bitstream parsers (H.264 SPS, AAC AudioSpecificConfig).
//! - [`rtmp`]: handshake, chunk stream, AMF0, server and client sessions (sans-IO), FLV tag
//!   conversions, muxers, and the tokio driver.
//! - [`http`]: `/healthz`, `/metrics`, `/api/v1/broadcasts` (axum), the client address handlers
//!   see ([`http::ClientAddr`]) and HTTP-FLV ([`http::flv`]).
//! - [`player`]: the player shared by RTMP and HTTP-FLV (one turn: read input, read the feed,
//!   write).
//! - [`metrics`], [`node`], [`shutdown`]: counters (the cluster link's too), shared node state,
//!   signals.
//! - [`webrtc`]: WHEP playback and WHIP ingest, every peer on one UDP socket; the sans-IO
//!   session table [`webrtc::table`] (routing, handover, reaping) under a thin
//!   [`webrtc::driver`]; str0m does SDP, ICE and DTLS; viewers' RTP/SRTP/RTCP are castnode's own (sans-IO [`webrtc::packetize`],
//!   [`webrtc::sender`], [`webrtc::srtp`], [`webrtc::rtcp`]); a WHIP publisher's frames enter
//!   the hub through the sans-IO [`webrtc::ingest`].
//! - [`ffmpeg`], [`transcode`]: in-process FFmpeg and the on-demand renditions built with it
//!   (AAC → Opus for WebRTC viewers, Opus → AAC for RTMP/FLV players of WHIP sources, B-frame-free
//!   H.264), written back into the hub as extra tracks.
//! - [`cluster`]: the node-to-node link over QUIC: the sans-IO [`cluster::wire`] codec, the
//!   serving driver [`cluster::serve`] (castnode's own loop around quinn-proto, on its own
//!   threads: subscriptions served from the hub, publications taken in) and [`cluster::link`]
//!   on quinn (fetch on demand, fail over, publish upstream; on the first serving thread when
//!   the node serves).
//! - [`manager`]: the stream manager seam ([`manager::StreamManager`]): registry, placement,
//!   its HTTP API and web console, the reporter every node runs and its UDP heartbeats; the
//!   SQLite store (tokens, regions, node groups), the autoscaler and the provisioners.
//! - [`role`]: the roles: media nodes (`standalone`, `origin`, `relay`, `edge`) in
//!   [`role::standalone`], the stream manager in [`role::manager`]; transcoder and mixer are not
//!   built yet.
//!
//! # The sans-IO contract
//!
//! Protocol cores take bytes (and the time, where they have deadlines) through `handle_*`
//! methods and hand back bytes to send, events and deadlines through `poll_*` methods. They
//! never touch sockets or clocks. Each has one thin tokio driver.

pub mod cluster;
pub mod codec;
pub mod config;
pub mod ffmpeg;
pub mod http;
pub mod manager;
pub mod media;
pub mod metrics;
pub mod names;
pub mod node;
pub mod player;
pub mod role;
pub mod rtmp;
pub mod shutdown;
pub mod transcode;
pub mod webrtc;
