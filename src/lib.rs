//! castnode: a self-hostable live-streaming cluster in one binary.
//!
//! # Data flow (what is built today)
//!
//! ```text
//!  OBS / ffmpeg ──RTMP──> rtmp::driver ──> rtmp::conn (sans-IO) ──> rtmp::flv (tag → Item)
//!  browser ─────WHIP────> webrtc::driver (str0m) ──> webrtc::ingest (access unit → Item)
//!  upstream node ─QUIC──> cluster::driver + session (cluster::wire frames → Item, on demand)
//!                                              │ BroadcastProducer::push
//!                                              ▼
//!                         media::hub  (per broadcast: log of groups, shared Arc<Entry>)
//!                            ▲   │ BroadcastConsumer::read (per player cursor)
//!   transcode (renditions:   │   ├───────────────────────────────────────────┐
//!   AAC⇄Opus, no-B-frames,   │   │  (a player picks a ladder rung:           │
//!   ABR ladder rungs) ───────┘   ▼   ?rendition=NAME)                        ▼
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
//!  origin:  RTMP / WHIP ingest ──> media::hub ──> cluster::driver (serving; quinn-proto)
//!                                                        │ QUIC (cluster::wire: a control
//!                                                        ▼  stream, a QUIC stream per group)
//!  relay:   cluster::driver (connecting) ──> media::hub ──> cluster::driver (serving)
//!                                                        │ QUIC
//!                                                        ▼
//!  edge:    cluster::driver (connecting) ──> media::hub ──> RTMP / HTTP-FLV / WHEP players
//!
//!  An edge subscribes upstream on its first viewer and drops the subscription --linger seconds
//!  after its last; on a dead upstream it fails over to the next --upstream. A broadcast
//!  published to a relay or an edge is published up the same link to the origin
//!  (cluster::link's task → the connecting driver → the upstream's serving driver).
//!  Every connection, either end, is one sans-IO cluster::session over quinn-proto.
//! ```
//!
//! # A frame's way, end to end
//!
//! OBS publishes to an origin; a browser watches over WHEP on an edge behind a relay. One H.264
//! access unit, step by step (each step names where its rule lives):
//!
//! 1. **Origin, RTMP in.** [`rtmp::driver`] reads the socket and hands the bytes to the sans-IO
//!    [`rtmp::conn::ServerConn::handle_input`] (handshake, chunk stream, AMF0 commands); its events
//!    carry FLV tag bodies, which [`rtmp::flv::parse_video`] turns into a [`media::Frame`]
//!    (length-prefixed NAL units, pts/dts, keyframe flag; the payload is sliced, not copied).
//! 2. **Origin, hub.** [`media::BroadcastProducer::push_at`] stamps the ingest time and appends an
//!    `Arc<Entry>` to the broadcast's log; the entry is marked as a group start when it is a
//!    keyframe of the source's video (`State::starts_group` in [`media::hub`]: the one group
//!    rule). Consumers are woken; nothing waits for them.
//! 3. **Origin, serving the relay.** A serving [`cluster::driver`] is woken by the hub and has
//!    the relay's `cluster::session` (the sans-IO protocol of one connection) read the hub with
//!    a consumer per subscription; the group policy (`cluster::groups::GroupCursor`) opens a
//!    QUIC stream at each marked entry (newest group first, an old group reset), and the frame's
//!    header is encoded once per entry (`cluster::encoding::encoded`, memoized in
//!    [`media::MemoSlot::Cluster`]) for every subscription; quinn-proto encrypts each copy.
//! 4. **Relay, fetching.** The relay's connecting [`cluster::driver`] feeds the datagrams to its
//!    session, which reads the groups in order (`cluster::groups::GroupOrder`, a stalled group
//!    dropped), [`cluster::wire::GroupDecoder`] gives the frame back, and the flow's
//!    `cluster::encoding::Sink` pushes it into the relay's own hub with the origin's ingest time
//!    (`push_at`); from there step 3 repeats towards the edge. [`cluster::link`]'s fetch task
//!    only chose the upstream and waits to fail over or let go.
//! 5. **Edge, fetching.** The same as step 4: the edge subscribed upstream when its first viewer
//!    came ([`cluster::link::Link::subscribe`]) and keeps the subscription until `--linger` after
//!    its last.
//! 6. **Edge, WebRTC.** Each media tick [`webrtc::table`] has every viewer read the hub
//!    (`Viewer::pump`): the frame is packetized once for all viewers
//!    ([`webrtc::packetize::RtpFrame::h264`], memoized in [`media::MemoSlot::Rtp`]); for B-frame
//!    sources the viewer reads the rendition [`transcode`] re-encodes once per broadcast instead.
//! 7. **Edge, the viewer's datagram.** The viewer's [`webrtc::sender::MediaSender::send`] writes
//!    the RTP header and seals the packet with that viewer's SRTP keys
//!    ([`webrtc::srtp`]) straight into the [`webrtc::egress::Egress`] buffer; packets of one frame
//!    to one viewer form a GSO batch, batches to all viewers leave in one `sendmmsg`, each from
//!    the local address the viewer reached.
//!
//! An RTMP or HTTP-FLV player takes step 6 differently: [`media::feed`] muxes each entry once
//! ([`media::MemoSlot::Rtmp`], [`media::MemoSlot::Flv`]) and [`player`] writes a batch per turn
//! of [`media::pace`].
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
//! - [`codec`]: bitstream parsers (H.264 SPS, AAC AudioSpecificConfig) and the facts they find
//!   ([`codec::VideoInfo`], [`codec::AudioInfo`]); it depends on nothing else of castnode's.
//! - [`rtmp`]: handshake, chunk stream, AMF0, server and client sessions (sans-IO), FLV tag
//!   conversions, muxers, and the tokio driver.
//! - [`http`]: `/healthz`, `/metrics` (rendered in `http::metrics`), `/api/v1/broadcasts`
//!   (axum), the pages, and HTTP-FLV ([`http::flv`]); `web`: what every HTTP surface shares (the
//!   client address handlers see, CORS), below the node's pages, WHIP/WHEP and the manager's API.
//! - [`player`]: the player shared by RTMP and HTTP-FLV (one turn: read input, read the feed,
//!   write).
//! - `metrics`, [`node`], [`shutdown`]: counters (the node's, the cluster link's, the
//!   per-broadcast WebRTC figures; no protocol and no node in it), shared node state, signals.
//!
//! The top-level modules form no circle (`tests/module_graph.rs` checks it). From the bottom:
//! `codec`, `names`, `shutdown`, `web`; `media`, `ladder`; `config`, `metrics`, `ffmpeg`;
//! `transcode`, `cluster`; `mix`, `node`; `player`, `rtmp`, `webrtc`, `manager`; `http`; `role`.
//! - [`webrtc`]: WHEP playback and WHIP ingest, every peer on one UDP socket; the sans-IO
//!   session table [`webrtc::table`] (routing, handover, reaping) under a thin
//!   [`webrtc::driver`]; str0m does SDP, ICE and DTLS; viewers' RTP/SRTP/RTCP are castnode's own (sans-IO [`webrtc::packetize`],
//!   [`webrtc::sender`], [`webrtc::srtp`], [`webrtc::rtcp`]); `auto` viewers' ABR (bandwidth
//!   estimate, rung choice, keyframe-aligned switching) is the sans-IO [`webrtc::abr`]; a WHIP
//!   publisher's frames enter the hub through the sans-IO [`webrtc::ingest`].
//! - [`ffmpeg`], [`transcode`]: in-process FFmpeg and the on-demand renditions built with it
//!   (AAC → Opus for WebRTC viewers, Opus → AAC for RTMP/FLV players of WHIP sources, B-frame-free
//!   H.264), written back into the hub as extra tracks; the ABR ladders a node makes
//!   (`transcode::Ladders`: standalone's, one per broadcast published there) and a transcoder's
//!   jobs (`transcode::Jobs`: a broadcast fetched over the cluster link, its ladder made, the
//!   rungs published back to the origin, where the hub's `LadderWriter` adds them to the
//!   broadcast). [`ffmpeg::mix`] is the mixer's core (issue 18):
//!   layouts (grid, picture-in-picture, rectangles with z-order, PNG overlays), the compositor
//!   ticked by the output's clock (repeat, then slate) with one H.264 encode, and the audio mix
//!   (gain, mute) to AAC and Opus, built from the ladder's decoder/encoder and the audio
//!   transcoder's pieces. [`mix`] drives it for the `mixer` role: the inputs fetched over the
//!   cluster link, the output clock on a thread of its own, the mix written into the hub as a
//!   broadcast that the link publishes upstream.
//! - [`ladder`], [`ffmpeg::ladder`]: ABR ladders (the built-in default and the configuration's
//!   named ones, checked before the node binds; how a ladder fits a source, never upscaling) and
//!   the ladder encoder (decode once, scale and encode once per rung, IDRs at the same source
//!   timestamps in every rung; a ladder that starts on a running broadcast joins at its live
//!   edge).
//! - [`cluster`]: the node-to-node link over QUIC: the sans-IO [`cluster::wire`] codec; the
//!   sans-IO `cluster::session` (one connection's protocol, either end, over quinn-proto's
//!   connection; tested with two endpoints in memory) with its group policy
//!   (`cluster::groups`) and entry encoding (`cluster::encoding`); [`cluster::driver`], the
//!   one I/O loop around quinn-proto (serving drivers on their own threads, one connecting
//!   driver); and [`cluster::link`], the tasks that fetch on demand, fail over and publish
//!   upstream.
//! - [`manager`]: the stream manager seam ([`manager::StreamManager`]): registry, placement,
//!   its HTTP API and web console, the reporter every node runs and its UDP heartbeats; the
//!   SQLite store (tokens, regions, node groups), the autoscaler and the provisioners.
//! - [`role`]: the roles: media nodes (`standalone`, `origin`, `relay`, `edge`, `transcoder`,
//!   `mixer`) in [`role::standalone`], the stream manager in [`role::manager`].
//!
//! # The sans-IO contract
//!
//! Protocol cores take bytes (and the time, where they have deadlines) through `handle_*`
//! methods and hand back bytes to send, events and deadlines through `poll_*` methods. They
//! never touch sockets or clocks. Each has one thin tokio driver.
//!
//! # The public surface
//!
//! The library's items are `pub(crate)` unless code outside it uses them, so that rustc's
//! dead-code lint sees every internal item (an unused one fails clippy's `-D warnings`). What
//! stays `pub` is what these use, and no more:
//! - the `castnode` binary (`src/main.rs`): [`config`]'s command line and [`role`]'s entry
//!   points;
//! - the load tool (`src/bin/castnode-load`): castnode's RTMP client, AMF0 and FLV reader
//!   ([`rtmp::client`], [`rtmp::amf0`], [`rtmp::flv`]), in-process edges built from
//!   [`config::NodeArgs`], [`node::NodeContext`] and [`cluster::link`] read through the hub's
//!   consumer ([`media`]), and castnode's DTLS set-up for its WHEP clients' str0m sessions
//!   ([`webrtc::keys`]);
//! - the benches (`benches/`): the RTMP chunk stream, FLV and muxers, the hub's fan-out
//!   ([`media::Hub`], [`media::feed`]), placement ([`manager::registry`]), the cluster's wire
//!   and QUIC, WebRTC packetizing, sending and SRTP, the ladder encoder ([`ffmpeg::ladder`],
//!   [`ladder`]) with its in-process test source ([`ffmpeg::testsrc`]), the mixer's core
//!   ([`ffmpeg::mix`], public whole: the benches drive it without the role);
//! - the integration tests (`tests/`): the RTMP client, AMF0, FLV, chunk stream and H.264
//!   helpers they drive castnode with.
//!
//! [`cluster`] keeps its own visibilities for now, and what its public items name (the hub's
//! types, [`config`]'s cluster settings, the cluster counters) stays `pub` with it. There are no
//! fuzz targets.
//!
//! These docs are about the internals: read them with `cargo doc --document-private-items`
//! (their links to `pub(crate)` items are allowed below).

#![allow(rustdoc::private_intra_doc_links)]

pub mod cluster;
pub mod codec;
pub mod config;
pub mod ffmpeg;
pub(crate) mod http;
pub mod ladder;
pub mod manager;
pub mod media;
pub(crate) mod metrics;
pub(crate) mod mix;
pub(crate) mod names;
pub mod node;
pub(crate) mod player;
pub mod role;
pub mod rtmp;
pub(crate) mod shutdown;
pub(crate) mod transcode;
pub(crate) mod web;
pub mod webrtc;
