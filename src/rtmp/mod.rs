//! RTMP: ingest from OBS/ffmpeg and playback to legacy players.
//!
//! Left of the driver everything is sans-IO: [`handshake`], [`chunk`], [`amf0`], [`message`],
//! [`flv`] (tag bodies ↔ media items), [`conn`] (server session), [`client`] (client session),
//! [`mux`] (media items → shared RTMP chunks and FLV tags). [`driver`] owns the sockets.
//! The wire formats are summarised in `docs/rtmp.md`.

pub mod amf0;
pub mod chunk;
pub mod client;
pub(crate) mod conn;
pub(crate) mod driver;
pub mod flv;
pub(crate) mod handshake;
pub(crate) mod message;
pub mod mux;

/// Why an RTMP connection is closed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RtmpError {
    /// C0 named a version other than 3.
    #[error("unsupported handshake version {0}")]
    BadHandshake(u8),
    /// The handshake did not finish in time.
    #[error("handshake not finished in time")]
    HandshakeTimeout,
    /// The chunk stream is malformed or over a limit.
    #[error(transparent)]
    Chunk(chunk::ChunkError),
    /// A command or data message is not valid AMF0.
    #[error("bad AMF0: {0}")]
    Amf(#[from] amf0::Amf0Error),
    /// A message that breaks the protocol.
    #[error("{0}")]
    BadMessage(&'static str),
    /// An audio or video tag that cannot be parsed.
    #[error("bad FLV tag: {0}")]
    Flv(#[from] flv::FlvError),
}
