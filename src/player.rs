//! The player loop shared by every TCP playback protocol (RTMP, HTTP-FLV): read a [`Feed`],
//! write its batches with vectored non-blocking writes, watch the socket for the client's input
//! and for its leaving.
//!
//! Guarantees:
//! - One write system call per batch in the common case; a timer is armed only when the socket
//!   is full, and a player that keeps it full for the stall timeout is disconnected (logged).
//! - The batch interval adapts to the node's load ([`NodeContext::player_batch`]): with few
//!   players every frame goes out at once; with many, frames are merged so that the node's
//!   write rate stays within its budget.
//! - A player that falls behind skips to the newest keyframe (logged, counted).
//! - A broadcast whose audio is Opus (published over WHIP) gets its AAC rendition started for
//!   as long as the player plays.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::media::feed::{Feed, FeedStatus, Muxer};
use crate::node::NodeContext;

/// What differs between playback protocols once the media flows.
pub trait PlayerProtocol {
    /// Protocol name for logs ("RTMP", "HTTP-FLV").
    const NAME: &'static str;
    /// Bytes the client sent; `Ok(false)` when the client asked to stop.
    fn handle_input(&mut self, data: &[u8]) -> Result<bool, String>;
    /// Control bytes to send before the next batch.
    fn poll_transmit(&mut self) -> Option<Bytes>;
    /// Wraps a batch of media buffers for the wire (e.g. HTTP chunked framing).
    fn frame(&mut self, batch: &mut Vec<Bytes>);
    /// Bytes that tell the client its stream ended.
    fn end(&mut self, out: &mut Vec<Bytes>);
}

/// Why a write did not finish.
enum WriteError {
    Stalled,
    Io(std::io::Error),
}

/// Writes every buffer, in order: non-blocking attempts, waiting for writability (bounded by
/// `stall`) only when the socket is full.
async fn write_all(
    sock: &TcpStream,
    bufs: &mut Vec<Bytes>,
    stall: std::time::Duration,
) -> Result<(), WriteError> {
    let mut i = 0;
    while i < bufs.len() {
        let mut slices = [IoSlice::new(&[]); 32];
        let k = slices.len().min(bufs.len() - i);
        for (s, b) in slices.iter_mut().zip(&bufs[i..i + k]) {
            *s = IoSlice::new(b);
        }
        let mut n = match sock.try_write_vectored(&slices[..k]) {
            Ok(0) => return Err(WriteError::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, sock.writable()).await {
                    Ok(r) => r.map_err(WriteError::Io)?,
                    Err(_) => return Err(WriteError::Stalled),
                }
                continue;
            }
            Err(e) => return Err(WriteError::Io(e)),
        };
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

/// Whether an I/O error is just the client leaving.
pub fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
    )
}

/// Plays `feed` to the client on `sock` until the broadcast ends, the client leaves or stalls.
/// Returns an error only for a protocol violation by the client.
pub async fn play<M: Muxer, P: PlayerProtocol>(
    sock: &TcpStream,
    mut feed: Feed<M>,
    mut proto: P,
    peer: SocketAddr,
    ctx: &Arc<NodeContext>,
) -> Result<(), String> {
    let broadcast = feed.consumer().broadcast().clone();
    // A WHIP source's Opus cannot go into FLV: its AAC rendition runs while this player plays.
    let _aac = crate::transcode::aac_for(&ctx.transcoders, &ctx.hub, &broadcast);
    let mut out: Vec<Bytes> = Vec::with_capacity(16);
    let mut input = BytesMut::new();
    loop {
        feed.set_batch(ctx.player_batch());
        let mut ended = false;
        tokio::select! {
            r = sock.readable() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "{} player socket failed", P::NAME);
                    return Ok(());
                }
                input.reserve(512);
                match sock.try_read_buf(&mut input) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        let go_on = proto.handle_input(&input)?;
                        input.clear();
                        if !go_on {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if is_disconnect(&e) => return Ok(()),
                    Err(e) => {
                        debug!(%peer, error = %e, "{} player read failed", P::NAME);
                        return Ok(());
                    }
                }
            }
            st = feed.next(&mut out) => match st {
                FeedStatus::Ended => ended = true,
                FeedStatus::Data { skipped } => {
                    if skipped > 0 {
                        info!(%peer, broadcast = %broadcast.name(), skipped, "{} player fell behind; skipped to the newest keyframe", P::NAME);
                    }
                    proto.frame(&mut out);
                }
            },
        }
        if let Some(b) = proto.poll_transmit() {
            out.insert(0, b);
        }
        if ended {
            proto.end(&mut out);
        }
        if out.is_empty() {
            continue;
        }
        let len: u64 = out.iter().map(|b| b.len() as u64).sum();
        match write_all(sock, &mut out, ctx.cfg.stall_timeout).await {
            Ok(()) => {}
            Err(WriteError::Stalled) => {
                ctx.stats.players_stalled.fetch_add(1, Relaxed);
                warn!(%peer, broadcast = %broadcast.name(), "{} player stopped reading; disconnected", P::NAME);
                return Ok(());
            }
            Err(WriteError::Io(e)) => {
                debug!(%peer, error = %e, "{} player left", P::NAME);
                return Ok(());
            }
        }
        broadcast.stats.bytes_out.fetch_add(len, Relaxed);
        ctx.hub.stats().bytes_out.fetch_add(len, Relaxed);
        if ended {
            debug!(%peer, broadcast = %broadcast.name(), "broadcast ended; {} player closed", P::NAME);
            return Ok(());
        }
    }
}
