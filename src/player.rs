//! The player shared by every TCP playback protocol (RTMP, HTTP-FLV): on each of its turns on
//! the node's write clock ([`crate::media::pace`]) it reads the client's input, reads its
//! [`Feed`] and writes what is new with one vectored non-blocking write.
//!
//! Guarantees:
//! - One write system call per turn in the common case; no task is woken and no timer is armed
//!   per player: the clock's phase tasks take the turns of many players per wake.
//! - The interval between turns adapts to the node's load: with few players frames go out
//!   within [`crate::media::pace::MIN_INTERVAL`]; with many, frames are merged so that the
//!   node's write rate stays within its budget.
//! - A write the socket cannot take is finished on later turns (nothing new is read meanwhile);
//!   a player that keeps its socket full for the stall timeout is disconnected (logged,
//!   counted).
//! - A player that falls behind skips to the newest keyframe (logged, counted).
//! - A broadcast whose audio is Opus (published over WHIP) gets its AAC rendition started for
//!   as long as the player plays.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::media::feed::{Feed, FeedStatus, Muxer};
use crate::media::hub::Broadcast;
use crate::media::pace::Turn;
use crate::node::NodeContext;

/// Why a player ended in error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlayerError {
    /// The client broke its playback protocol (the protocol's own error).
    #[error(transparent)]
    Protocol(Box<dyn std::error::Error + Send + Sync>),
}

impl PlayerError {
    /// A protocol violation by the client.
    pub(crate) fn protocol(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Protocol(Box::new(e))
    }
}

/// What differs between playback protocols once the media flows.
pub(crate) trait PlayerProtocol: Send + 'static {
    /// Protocol name for logs ("RTMP", "HTTP-FLV").
    const NAME: &'static str;
    /// Bytes the client sent; `Ok(false)` when the client asked to stop.
    fn handle_input(&mut self, data: &[u8]) -> Result<bool, PlayerError>;
    /// Control bytes to send before the next batch.
    fn poll_transmit(&mut self) -> Option<Bytes>;
    /// Wraps a batch of media buffers for the wire (e.g. HTTP chunked framing).
    fn frame(&mut self, batch: &mut Vec<Bytes>);
    /// Bytes that tell the client its stream ended.
    fn end(&mut self, out: &mut Vec<Bytes>);
}

/// Whether an I/O error is just the client leaving.
pub(crate) fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
    )
}

/// Plays `feed` to the client on `sock` until the broadcast ends, the client leaves or stalls.
/// Returns an error only for a protocol violation by the client.
pub(crate) async fn play<M, P>(
    sock: TcpStream,
    feed: Feed<M>,
    proto: P,
    peer: SocketAddr,
    ctx: &Arc<NodeContext>,
) -> Result<(), PlayerError>
where
    M: Muxer + Send + 'static,
    P: PlayerProtocol,
{
    let broadcast = feed.consumer().broadcast().clone();
    // A WHIP source's Opus cannot go into FLV: its AAC rendition runs while this player plays.
    let aac = crate::transcode::aac_for(&ctx.transcoders, &ctx.hub, &broadcast);
    let (done, result) = oneshot::channel();
    ctx.pacer.adopt(Box::new(Player {
        sock,
        feed,
        proto,
        peer,
        ctx: ctx.clone(),
        broadcast,
        _aac: aac,
        out: Vec::with_capacity(16),
        input: BytesMut::new(),
        pending_since: None,
        ended: false,
        done: Some(done),
    }));
    // Dropped unanswered only when the clock's task went away with its runtime.
    result.await.unwrap_or(Ok(()))
}

/// One player, as the clock's phase task holds it.
struct Player<M, P> {
    sock: TcpStream,
    feed: Feed<M>,
    proto: P,
    peer: SocketAddr,
    ctx: Arc<NodeContext>,
    broadcast: Arc<Broadcast>,
    _aac: Option<Arc<crate::transcode::Rendition>>,
    /// Buffers not written yet, in order.
    out: Vec<Bytes>,
    input: BytesMut,
    /// Since when the socket has not taken all of `out`.
    pending_since: Option<Instant>,
    /// The end of the stream is in `out`: finished once it is written.
    ended: bool,
    done: Option<oneshot::Sender<Result<(), PlayerError>>>,
}

impl<M: Muxer + Send + 'static, P: PlayerProtocol> Turn for Player<M, P> {
    fn turn(&mut self, now: Instant) -> bool {
        match self.step(now) {
            Ok(true) => true,
            r => {
                if let Some(done) = self.done.take() {
                    let _ = done.send(r.map(|_| ()));
                }
                false
            }
        }
    }
}

impl<M: Muxer, P: PlayerProtocol> Player<M, P> {
    /// One turn; `Ok(false)` when the player is finished.
    fn step(&mut self, now: Instant) -> Result<bool, PlayerError> {
        if !self.read_input()? {
            return Ok(false);
        }
        if self.out.is_empty() {
            match self.feed.poll_batch(&mut self.out) {
                None => {}
                Some(FeedStatus::Ended) => {
                    self.ended = true;
                    self.proto.end(&mut self.out);
                }
                Some(FeedStatus::Data { skipped }) => {
                    if skipped > 0 {
                        info!(peer = %self.peer, broadcast = %self.broadcast.name(), skipped, "{} player fell behind; skipped to the newest keyframe", P::NAME);
                    }
                    self.proto.frame(&mut self.out);
                }
            }
            if let Some(b) = self.proto.poll_transmit() {
                self.out.insert(0, b);
            }
        }
        if self.out.is_empty() {
            return Ok(true);
        }
        match self.write() {
            Ok(true) => self.pending_since = None,
            Ok(false) => {
                let since = *self.pending_since.get_or_insert(now);
                if now.duration_since(since) >= self.ctx.cfg.stall_timeout {
                    self.ctx.stats.players_stalled.fetch_add(1, Relaxed);
                    warn!(peer = %self.peer, broadcast = %self.broadcast.name(), "{} player stopped reading; disconnected", P::NAME);
                    return Ok(false);
                }
                return Ok(true);
            }
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "{} player left", P::NAME);
                return Ok(false);
            }
        }
        if self.ended {
            debug!(peer = %self.peer, broadcast = %self.broadcast.name(), "broadcast ended; {} player closed", P::NAME);
            return Ok(false);
        }
        Ok(true)
    }

    /// Reads and handles what the client sent; `Ok(false)` when it left or asked to stop.
    fn read_input(&mut self) -> Result<bool, PlayerError> {
        loop {
            self.input.reserve(512);
            match self.sock.try_read_buf(&mut self.input) {
                Ok(0) => return Ok(false),
                Ok(_) => {
                    let go_on = self.proto.handle_input(&self.input)?;
                    self.input.clear();
                    if !go_on {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => {
                    if !is_disconnect(&e) {
                        debug!(peer = %self.peer, error = %e, "{} player read failed", P::NAME);
                    }
                    return Ok(false);
                }
            }
        }
    }

    /// Writes as much of `out` as the socket takes; `Ok(true)` when all of it went.
    fn write(&mut self) -> std::io::Result<bool> {
        let mut i = 0;
        let mut written = 0u64;
        let r = loop {
            if i == self.out.len() {
                break Ok(true);
            }
            let mut slices = [IoSlice::new(&[]); 32];
            let k = slices.len().min(self.out.len() - i);
            for (s, b) in slices.iter_mut().zip(&self.out[i..i + k]) {
                *s = IoSlice::new(b);
            }
            let mut n = match self.sock.try_write_vectored(&slices[..k]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            };
            written += n as u64;
            while i < self.out.len() && n >= self.out[i].len() {
                n -= self.out[i].len();
                i += 1;
            }
            if n > 0 {
                self.out[i].advance(n);
            }
        };
        self.out.drain(..i);
        if written > 0 {
            self.broadcast.stats.bytes_out.fetch_add(written, Relaxed);
            self.ctx.hub.stats().bytes_out.fetch_add(written, Relaxed);
        }
        r
    }
}
