//! castnode: a self-hostable live-streaming cluster in one binary.
//!
//! # Data flow (what is built today)
//!
//! ```text
//!  OBS / ffmpeg ──RTMP──> rtmp::driver ──> rtmp::conn (sans-IO session)
//!                                              │ audio/video messages
//!                                              ▼
//!                                         rtmp::flv (FLV tag body → media::Item)
//!                                              │ BroadcastProducer::push
//!                                              ▼
//!                         media::hub  (per broadcast: log of groups, shared Arc<Entry>)
//!                                              │ BroadcastConsumer::read (per player cursor)
//!                                              ▼
//!                         media::feed (batches entries; Muxer encodes each entry once,
//!                                      memoized in the entry, shared by every player)
//!                           │ rtmp::mux::RtmpMuxer          │ rtmp::mux::FlvMuxer
//!                           ▼                               ▼
//!                   player::play (one vectored write per batch, batch interval from the
//!                                 node's write budget) ── via rtmp::driver / http::flv
//!                           │                               │
//!                     RTMP players                   HTTP-FLV players
//! ```
//!
//! # Module map
//!
//! - [`config`]: flags + `CASTNODE_*` env + TOML, validated before binding.
//! - [`media`]: the protocol-agnostic model ([`media::frame`]), the [`media::hub`] and the
//!   per-player [`media::feed`].
//! - [`codec`]: bitstream parsers (H.264 SPS, AAC AudioSpecificConfig).
//! - [`rtmp`]: handshake, chunk stream, AMF0, server and client sessions (sans-IO), FLV tag
//!   conversions, muxers, and the tokio driver.
//! - [`http`]: `/healthz`, `/metrics`, `/api/v1/broadcasts` (axum) and HTTP-FLV ([`http::flv`]).
//! - [`player`]: the player loop shared by RTMP and HTTP-FLV.
//! - [`metrics`], [`node`], [`shutdown`]: counters, shared node state, signals.
//! - [`webrtc`]: WHEP playback over str0m, every peer on one UDP socket.
//! - [`ffmpeg`], [`transcode`]: in-process FFmpeg and the on-demand renditions built with it
//!   (AAC → Opus for WebRTC viewers), written back into the hub as extra tracks.
//! - [`cluster`]: the node-to-node link over QUIC; so far its wire codec ([`cluster::wire`]).
//! - [`role`]: one file per role; only `standalone` is built so far.
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
pub mod media;
pub mod metrics;
pub mod node;
pub mod player;
pub mod role;
pub mod rtmp;
pub mod shutdown;
pub mod transcode;
pub mod webrtc;
