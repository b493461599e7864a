//! The tokio driver of RTMP: accepts connections, feeds bytes to [`ServerConn`], connects
//! publishers and players to the hub, and writes players' batches with vectored writes.
//!
//! Guarantees: one task per connection; an error closes only that connection, with one log line
//! naming the peer and the reason; a player that blocks a write longer than the stall timeout is
//! disconnected; a player that falls behind skips ahead (logged); the publisher is never slowed
//! by a player.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::RtmpError;
use super::conn::{ConnConfig, Event, ServerConn};
use super::flv::{self, Tag};
use super::message::kind;
use super::mux::RtmpMuxer;
use crate::media::feed::{Feed, FeedStatus};
use crate::media::{BroadcastProducer, Codec, TrackId, TrackInfo, TrackKind};
use crate::node::NodeContext;

/// Accepts RTMP connections until the listener fails.
pub async fn serve(listener: TcpListener, ctx: Arc<NodeContext>) {
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
    #[error(transparent)]
    Rtmp(#[from] RtmpError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
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
                } => {
                    let name = format!("{app}/{key}");
                    if ingest.is_some() {
                        conn.reject_publish(stream_id, "Already publishing on this connection.");
                        continue;
                    }
                    match ctx.hub.publish(&name) {
                        Ok(producer) => {
                            conn.accept_publish(stream_id);
                            ctx.stats.publishers.fetch_add(1, Relaxed);
                            info!(%peer, broadcast = %name, "publisher started");
                            ingest = Some(Ingest::new(producer, ctx.clone()));
                        }
                        Err(e) => {
                            warn!(%peer, broadcast = %name, "publish refused: {e}");
                            conn.reject_publish(stream_id, "Stream already publishing.");
                        }
                    }
                }
                Event::PlayRequested {
                    stream_id,
                    app,
                    key,
                } => {
                    let name = format!("{app}/{key}");
                    let Some(guard) = ctx.admit_player(false) else {
                        warn!(%peer, broadcast = %name, "play refused: player limit reached");
                        conn.reject_play(stream_id, "Server full.");
                        continue;
                    };
                    let Some(consumer) = ctx.hub.subscribe(&name) else {
                        debug!(%peer, broadcast = %name, "play refused: not live");
                        conn.reject_play(stream_id, "No such stream.");
                        continue;
                    };
                    conn.accept_play(stream_id);
                    // A player sends little: give back the publisher-sized read buffer.
                    drop(std::mem::take(&mut buf));
                    flush(&mut sock, &mut conn).await?;
                    debug!(%peer, broadcast = %name, "RTMP player started");
                    let feed = Feed::new(consumer, RtmpMuxer, ctx.cfg.player_batch);
                    let r = play(&mut sock, conn, stream_id, feed, peer, ctx).await;
                    drop(guard);
                    return r;
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

/// Writes every buffer, in order, with vectored writes.
pub async fn write_all_bufs<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut i = 0;
    while i < bufs.len() {
        let mut slices = [IoSlice::new(&[]); 64];
        let k = slices.len().min(bufs.len() - i);
        for (s, b) in slices.iter_mut().zip(&bufs[i..i + k]) {
            *s = IoSlice::new(b);
        }
        let mut n = w.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while i < bufs.len() && n >= bufs[i].len() {
            n -= bufs[i].len();
            i += 1;
        }
        if n > 0 {
            bufs[i].advance(n);
        }
    }
    bufs.clear();
    Ok(())
}

async fn play(
    sock: &mut TcpStream,
    mut conn: ServerConn,
    stream_id: u32,
    mut feed: Feed<RtmpMuxer>,
    peer: SocketAddr,
    ctx: &Arc<NodeContext>,
) -> Result<(), SessionError> {
    let (mut rd, mut wr) = sock.split();
    let mut buf = BytesMut::with_capacity(256);
    let mut out: Vec<Bytes> = Vec::with_capacity(64);
    let broadcast = feed.consumer().broadcast().clone();
    loop {
        tokio::select! {
            r = rd.read_buf(&mut buf) => {
                if r? == 0 {
                    return Ok(());
                }
                conn.handle_input(&buf)?;
                buf.clear();
                while let Some(ev) = conn.poll_event() {
                    if ev == Event::StreamClosed {
                        return Ok(());
                    }
                }
            }
            st = feed.next(&mut out) => match st {
                FeedStatus::Ended => {
                    conn.end_play(stream_id);
                    if let Some(b) = conn.poll_transmit() {
                        out.push(b);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), write_all_bufs(&mut wr, &mut out)).await;
                    debug!(%peer, broadcast = %broadcast.name(), "broadcast ended; player closed");
                    return Ok(());
                }
                FeedStatus::Data { skipped } => {
                    if skipped > 0 {
                        info!(%peer, broadcast = %broadcast.name(), skipped, "RTMP player fell behind; skipped to the newest keyframe");
                    }
                }
            },
        }
        if let Some(b) = conn.poll_transmit() {
            out.insert(0, b);
        }
        if out.is_empty() {
            continue;
        }
        let len: u64 = out.iter().map(|b| b.len() as u64).sum();
        match tokio::time::timeout(ctx.cfg.stall_timeout, write_all_bufs(&mut wr, &mut out)).await {
            Ok(r) => r?,
            Err(_) => {
                ctx.stats.players_stalled.fetch_add(1, Relaxed);
                warn!(%peer, broadcast = %broadcast.name(), "RTMP player stopped reading; disconnected");
                return Ok(());
            }
        }
        broadcast.stats.bytes_out.fetch_add(len, Relaxed);
        ctx.hub.stats().bytes_out.fetch_add(len, Relaxed);
    }
}
