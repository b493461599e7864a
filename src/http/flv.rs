//! HTTP-FLV playback on the node's HTTP port, served next to axum rather than through it.
//!
//! Each accepted connection's request line is peeked (not consumed): `GET /{app}/{key}.flv` is
//! served here by the shared player loop, so an FLV player costs what an RTMP player costs (one
//! vectored write per batch, a chunked-encoding frame around the whole batch); every other
//! request goes to axum untouched through [`HttpListener`].
//!
//! Guarantees: a connection that sends no request line within 10 s is closed; a request head
//! over 8 KiB is refused (431); answers are `200` (chunked, `video/x-flv`, CORS open), `404` when
//! the broadcast is not live, `503` at the player limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::media::feed::{Feed, rendition_param};
use crate::media::valid_name;
use crate::node::NodeContext;
use crate::player::{self, PlayerProtocol};
use crate::rtmp::mux::FlvMuxer;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HEAD: usize = 8 << 10;

/// The node's HTTP listener as axum sees it: connections that are not HTTP-FLV requests.
pub(crate) struct HttpListener {
    rx: mpsc::Receiver<(TcpStream, SocketAddr)>,
    local: SocketAddr,
}

impl HttpListener {
    /// Accepts on `listener`, serving HTTP-FLV requests itself.
    pub(crate) fn new(listener: TcpListener, ctx: Arc<NodeContext>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((sock, peer)) => {
                        let _ = sock.set_nodelay(true);
                        tokio::spawn(classify(sock, peer, ctx.clone(), tx.clone()));
                    }
                    Err(e) => {
                        warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task never ends while the listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The path and query of a `GET …​.flv` request line, if that is what `head` starts with.
fn flv_path(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\r' || b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (method == "GET" && path.ends_with(".flv")).then_some((path, query))
}

async fn classify(
    sock: TcpStream,
    peer: SocketAddr,
    ctx: Arc<NodeContext>,
    tx: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
    let mut buf = [0u8; 1024];
    let peeked = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = sock.peek(&mut buf).await?;
            if n == 0 || n == buf.len() || buf[..n].contains(&b'\n') {
                return Ok::<_, std::io::Error>(n);
            }
            // Part of a request line: wait for the rest.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let n = match peeked {
        Ok(Ok(n)) if n > 0 => n,
        _ => return,
    };
    match flv_path(&buf[..n]).map(|(p, q)| (p.to_owned(), q.to_owned())) {
        Some((path, query)) => serve(sock, peer, &path, &query, &ctx).await,
        None => {
            let _ = tx.send((sock, peer)).await;
        }
    }
}

async fn respond(sock: &mut TcpStream, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
}

/// Reads (consumes) the request head.
async fn read_head(sock: &mut TcpStream) -> Option<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    })
    .await
    .ok()
    .flatten()
}

async fn serve(
    mut sock: TcpStream,
    peer: SocketAddr,
    path: &str,
    query: &str,
    ctx: &Arc<NodeContext>,
) {
    if read_head(&mut sock).await.is_none() {
        respond(
            &mut sock,
            "431 Request Header Fields Too Large",
            "bad request head\n",
        )
        .await;
        return;
    }
    let name = path.trim_start_matches('/').trim_end_matches(".flv");
    if !name.contains('/') || !valid_name(name) {
        respond(&mut sock, "404 Not Found", "not found\n").await;
        return;
    }
    let Some(guard) = ctx.admit_player(true) else {
        info!(%peer, broadcast = name, "HTTP-FLV player refused: player limit reached");
        respond(
            &mut sock,
            "503 Service Unavailable",
            "player limit reached\n",
        )
        .await;
        return;
    };
    let Some(consumer) = ctx.subscribe(name).await else {
        respond(&mut sock, "404 Not Found", "broadcast not live\n").await;
        return;
    };
    let rendition = rendition_param(query);
    if let Some(r) = rendition
        && !ctx.rendition_ready(consumer.broadcast(), r).await
    {
        respond(&mut sock, "404 Not Found", "no such rendition\n").await;
        return;
    }
    let head = "HTTP/1.1 200 OK\r\nContent-Type: video/x-flv\r\nTransfer-Encoding: chunked\r\n\
                Cache-Control: no-cache\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    debug!(%peer, broadcast = name, "HTTP-FLV player started");
    let feed = Feed::new(consumer, FlvMuxer).with_rendition(rendition);
    // An HTTP-FLV client has nothing to say once it asked: any error is its leaving.
    let _ = player::play(
        sock,
        feed,
        FlvPlayer {
            scratch: BytesMut::new(),
        },
        peer,
        ctx,
    )
    .await;
    drop(guard);
}

/// HTTP-FLV specifics: one chunk of the chunked encoding per batch.
struct FlvPlayer {
    scratch: BytesMut,
}

impl PlayerProtocol for FlvPlayer {
    const NAME: &'static str = "HTTP-FLV";

    fn handle_input(&mut self, _data: &[u8]) -> Result<bool, player::PlayerError> {
        Ok(true)
    }

    fn poll_transmit(&mut self) -> Option<Bytes> {
        None
    }

    fn frame(&mut self, batch: &mut Vec<Bytes>) {
        let len: usize = batch.iter().map(Bytes::len).sum();
        if len == 0 {
            return;
        }
        self.scratch.reserve(18);
        // Formatting into the buffer itself: no String per batch.
        let _ = std::fmt::Write::write_fmt(&mut self.scratch, format_args!("{len:x}\r\n"));
        batch.insert(0, self.scratch.split().freeze());
        batch.push(Bytes::from_static(b"\r\n"));
    }

    fn end(&mut self, out: &mut Vec<Bytes>) {
        out.push(Bytes::from_static(b"0\r\n\r\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            flv_path(b"GET /live/a.flv HTTP/1.1\r\nHost: x"),
            Some(("/live/a.flv", ""))
        );
        assert_eq!(
            flv_path(b"GET /live/a.flv?token=1&rendition=360p HTTP/1.1\r\n"),
            Some(("/live/a.flv", "token=1&rendition=360p"))
        );
        assert_eq!(flv_path(b"GET /metrics HTTP/1.1\r\n"), None);
        assert_eq!(flv_path(b"POST /live/a.flv HTTP/1.1\r\n"), None);
        assert_eq!(flv_path(b"\xff\xfe"), None);
    }
}
