//! The tokio driver of RTMP: accepts connections, feeds bytes to [`ServerConn`], connects
//! publishers and players to the hub, and writes players' batches with vectored writes.
//!
//! Guarantees: one task per connection; an error closes only that connection, with one log line
//! naming the peer and the reason; a player that blocks a write longer than the stall timeout is
//! disconnected; a player that falls behind skips ahead (logged); the publisher is never slowed
//! by a player.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::RtmpError;
use super::conn::{ConnConfig, Event, ServerConn};
use super::flv::{self, Tag};
use super::message::kind;
use super::mux::RtmpMuxer;
use crate::media::feed::{Feed, rendition_param};
use crate::media::{BroadcastProducer, Codec, PublishError, TrackId, TrackInfo, TrackKind};
use crate::node::NodeContext;
use crate::player::{self, PlayerError, PlayerProtocol};

/// Accepts RTMP connections until the listener fails.
pub(crate) async fn serve(listener: TcpListener, ctx: Arc<NodeContext>) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "RTMP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if ctx.stats.rtmp_connections.load(Relaxed) >= ctx.cfg.max_connections as u64 {
            ctx.stats.rtmp_refused.fetch_add(1, Relaxed);
            warn!(%peer, limit = ctx.cfg.max_connections, "RTMP connection refused: connection limit reached");
            continue;
        }
        let _ = sock.set_nodelay(true);
        ctx.stats.rtmp_connections.fetch_add(1, Relaxed);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match session(sock, peer, &ctx).await {
                Ok(()) => debug!(%peer, "RTMP connection closed"),
                Err(SessionError::Io(e)) if player::is_disconnect(&e) => {
                    debug!(%peer, error = %e, "RTMP connection closed by the peer");
                }
                Err(e) => {
                    ctx.stats.rtmp_errors.fetch_add(1, Relaxed);
                    warn!(%peer, error = %e, "RTMP connection closed on error");
                }
            }
            ctx.stats.rtmp_connections.fetch_sub(1, Relaxed);
        });
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The client broke the RTMP protocol.
    #[error(transparent)]
    Rtmp(#[from] RtmpError),
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The session's player ended in error.
    #[error(transparent)]
    Player(#[from] PlayerError),
}

async fn flush(sock: &mut TcpStream, conn: &mut ServerConn) -> std::io::Result<()> {
    while let Some(b) = conn.poll_transmit() {
        sock.write_all(&b).await?;
    }
    Ok(())
}

async fn session(
    mut sock: TcpStream,
    peer: SocketAddr,
    ctx: &Arc<NodeContext>,
) -> Result<(), SessionError> {
    let cfg = ConnConfig {
        max_message: ctx.cfg.max_message_bytes,
    };
    let deadline = std::time::Instant::now() + ctx.cfg.handshake_timeout;
    let mut conn = ServerConn::new(&cfg, deadline, rand::random());
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut ingest: Option<Ingest> = None;
    loop {
        let n = match conn.poll_timeout() {
            Some(d) => match tokio::time::timeout_at(d.into(), sock.read_buf(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    conn.handle_timeout(std::time::Instant::now())?;
                    continue;
                }
            },
            None => sock.read_buf(&mut buf).await?,
        };
        if n == 0 {
            if let Some(i) = &ingest {
                info!(%peer, broadcast = %i.producer.broadcast().name(), "publisher disconnected");
            }
            return Ok(());
        }
        let r = conn.handle_input(&buf);
        buf.clear();
        // Send what the session queued (an error status, say) before closing on an error.
        flush(&mut sock, &mut conn).await?;
        r?;
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Connected { app } => debug!(%peer, app, "RTMP connect"),
                Event::PublishRequested {
                    stream_id,
                    app,
                    key,
                    query: _,
                } => {
                    let name = format!("{app}/{key}");
                    if ingest.is_some() {
                        conn.reject_publish(stream_id, "Already publishing on this connection.");
                        continue;
                    }
                    match ctx.hub.publish(&name, std::time::Instant::now()) {
                        Ok(producer) => {
                            conn.accept_publish(stream_id);
                            ctx.stats.publishers.fetch_add(1, Relaxed);
                            info!(%peer, broadcast = %name, "publisher started");
                            ingest = Some(Ingest::new(producer, ctx.clone()));
                        }
                        Err(e) => {
                            warn!(%peer, broadcast = %name, "publish refused: {e}");
                            conn.reject_publish(
                                stream_id,
                                match e {
                                    PublishError::AlreadyLive(_) => "Stream already publishing.",
                                    PublishError::BadName(_) => "Invalid stream name.",
                                },
                            );
                        }
                    }
                }
                Event::PlayRequested {
                    stream_id,
                    app,
                    key,
                    query,
                } => {
                    let name = format!("{app}/{key}");
                    let Some(guard) = ctx.admit_player(false) else {
                        warn!(%peer, broadcast = %name, "play refused: player limit reached");
                        conn.reject_play(stream_id, "Server full.");
                        continue;
                    };
                    let Some(consumer) = ctx.subscribe(&name).await else {
                        debug!(%peer, broadcast = %name, "play refused: not live");
                        conn.reject_play(stream_id, "No such stream.");
                        continue;
                    };
                    let rendition = rendition_param(&query);
                    if let Some(r) = rendition
                        && !ctx.rendition_ready(consumer.broadcast(), r).await
                    {
                        debug!(%peer, broadcast = %name, rendition = r, "play refused: no such rendition");
                        conn.reject_play(stream_id, "No such rendition.");
                        continue;
                    }
                    conn.accept_play(stream_id);
                    // A player sends little: give back the publisher-sized read buffer.
                    drop(std::mem::take(&mut buf));
                    flush(&mut sock, &mut conn).await?;
                    conn.shrink();
                    debug!(%peer, broadcast = %name, "RTMP player started");
                    let feed = Feed::new(consumer, RtmpMuxer).with_rendition(rendition);
                    let r =
                        player::play(sock, feed, RtmpPlayer { conn, stream_id }, peer, ctx).await;
                    drop(guard);
                    return r.map_err(SessionError::Player);
                }
                Event::Metadata(v) => {
                    if let Some(i) = &mut ingest {
                        i.producer.set_metadata(flv::metadata_from_amf(&v));
                    }
                }
                Event::Media {
                    type_id,
                    timestamp,
                    body,
                } => {
                    if let Some(i) = &mut ingest {
                        i.handle(type_id, timestamp, &body)?;
                    }
                }
                Event::StreamClosed => {
                    if let Some(i) = ingest.take() {
                        info!(%peer, broadcast = %i.producer.broadcast().name(), "publisher stopped");
                    }
                }
            }
        }
        flush(&mut sock, &mut conn).await?;
    }
}

/// A publishing connection's link to its broadcast.
struct Ingest {
    producer: BroadcastProducer,
    ctx: Arc<NodeContext>,
    codecs: [Option<Codec>; 2],
    ignored: Vec<&'static str>,
}

impl Ingest {
    fn new(producer: BroadcastProducer, ctx: Arc<NodeContext>) -> Self {
        Self {
            producer,
            ctx,
            codecs: [None, None],
            ignored: Vec::new(),
        }
    }

    fn handle(&mut self, type_id: u8, timestamp: u32, body: &Bytes) -> Result<(), RtmpError> {
        let tag = if type_id == kind::VIDEO {
            flv::parse_video(timestamp, body)?
        } else {
            flv::parse_audio(timestamp, body)?
        };
        let track = |k: TrackKind| {
            if k == TrackKind::Video {
                TrackId(0)
            } else {
                TrackId(1)
            }
        };
        match tag {
            Tag::Config(info) => {
                let t = track(info.codec.kind());
                self.codecs[usize::from(t.0)] = Some(info.codec);
                self.producer.set_track(t, info);
            }
            Tag::Frame(codec, frame) => {
                let t = track(codec.kind());
                if self.codecs[usize::from(t.0)] != Some(codec) {
                    // Frames before (or without) a sequence header: declare the track bare.
                    self.codecs[usize::from(t.0)] = Some(codec);
                    self.producer.set_track(
                        t,
                        TrackInfo {
                            codec,
                            config: None,
                            video: None,
                            audio: None,
                            rendition: None,
                        },
                    );
                }
                self.producer.push(t, frame);
            }
            Tag::Ignored(reason) => {
                if !self.ignored.contains(&reason) {
                    self.ignored.push(reason);
                    info!(broadcast = %self.producer.broadcast().name(), reason, "ignoring RTMP media message");
                }
            }
        }
        Ok(())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.ctx.stats.publishers.fetch_sub(1, Relaxed);
    }
}

/// RTMP specifics of a playing connection: the session keeps answering pings and
/// acknowledging, and `deleteStream`/`closeStream` ends playback.
struct RtmpPlayer {
    conn: ServerConn,
    stream_id: u32,
}

impl PlayerProtocol for RtmpPlayer {
    const NAME: &'static str = "RTMP";

    fn handle_input(&mut self, data: &[u8]) -> Result<bool, PlayerError> {
        self.conn
            .handle_input(data)
            .map_err(PlayerError::protocol)?;
        while let Some(ev) = self.conn.poll_event() {
            if ev == Event::StreamClosed {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn poll_transmit(&mut self) -> Option<Bytes> {
        self.conn.poll_transmit()
    }

    fn frame(&mut self, _batch: &mut Vec<Bytes>) {}

    fn end(&mut self, out: &mut Vec<Bytes>) {
        self.conn.end_play(self.stream_id);
        out.extend(self.conn.poll_transmit());
    }
}
