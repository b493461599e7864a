//! The cluster link's wire format (`docs/cluster-protocol.md`), sans-IO: control messages and
//! group streams to and from bytes.
//!
//! Guarantees:
//! - The decoders never panic, whatever the input or however it is split into chunks. They
//!   consume whole messages or items only, so the caller can feed bytes as they arrive.
//! - Every length is checked against its limit when its length field is read, before the bytes
//!   it announces are waited for: a control message over [`MAX_CONTROL_MESSAGE`] or a frame over
//!   [`MAX_FRAME`] is an error as soon as its header is buffered.
//! - A frame's payload is split from the caller's buffer (`BytesMut::split_to().freeze()`), never
//!   copied. [`encode_frame_header`] writes only the header, so a sender writes the header and the
//!   shared payload `Bytes` as two buffers, without copying the payload either.
//! - The encoders refuse what the decoders would refuse (an over-long string, a value of 2^62 or
//!   more, …) and then leave the output buffer as it was: a peer never receives a message it must
//!   reject.
//! - Unknown message types, stream types, codecs, error codes and flag bits are errors: both ends
//!   are castnode, and a change of format is a new [`ALPN`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::media::{Codec, Frame, MetaValue, Metadata, TrackId, TrackInfo};

/// The ALPN protocol id both ends offer; it names the wire format's version.
pub const ALPN: &[u8] = b"castnode-cluster/2";
/// The version a client states in [`ControlMessage::Hello`].
pub const VERSION: u8 = 2;
/// Label for the TLS exporter (RFC 5705/8446 §7.5) whose output is the context of the token
/// proofs: `export_keying_material(&mut [0; EXPORTER_LEN], EXPORTER_LABEL, b"")` on both ends.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-castnode-cluster/2";
/// Bytes to export with [`EXPORTER_LABEL`].
pub const EXPORTER_LEN: usize = 32;

/// Largest control message body in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// Longest string (node id, role, broadcast name, reason, metadata key or text) in bytes.
pub const MAX_STRING: usize = 1024;
/// Most tracks one SUBSCRIBE_OK or PUBLISH describes.
pub const MAX_TRACKS: usize = 16;
/// Largest codec config in bytes.
pub const MAX_CONFIG: usize = 16 * 1024;
/// Most metadata entries one message carries.
pub const MAX_METADATA: usize = 64;
/// Largest frame payload in bytes.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Largest value a varint holds (RFC 9000 §16): 2^62 - 1.
pub const MAX_VARINT: u64 = (1 << 62) - 1;
/// First byte of a group stream.
pub const STREAM_TYPE_GROUP: u8 = 0x01;

/// Frame flag: the frame is a random-access point.
const FLAG_KEYFRAME: u64 = 0x1;
/// Item flag: the item is a track config, not a frame.
const FLAG_CONFIG: u64 = 0x2;
/// A config item is a TrackInfo: codec, flag, config length, config.
const MAX_CONFIG_ITEM: usize = 2 + 8 + MAX_CONFIG;

/// The id a client gives a SUBSCRIBE or a PUBLISH; the group streams of that flow carry it.
/// Below 2^62, unique among the client's live subscriptions and publications on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionId(pub u64);

/// A group's number within its subscription: it grows with every group the sender starts, so
/// the receiver can order group streams and drop old ones. Below 2^62.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupSeq(pub u64);

/// Why a request or the connection was refused. The same numbers close the QUIC connection
/// (CONNECTION_CLOSE application error code) after an [`ControlMessage::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No such broadcast (SUBSCRIBE).
    NotFound,
    /// The token proof is wrong, or the peer may not do this.
    Unauthorized,
    /// The node failed; trying again or elsewhere may work.
    Internal,
    /// The broadcast already has a live publisher (PUBLISH).
    AlreadyLive,
    /// The peer broke the protocol (bad message, message out of place).
    ProtocolViolation,
    /// HELLO named a version this node does not speak.
    UnsupportedVersion,
    /// The node is at its limit (viewers, bandwidth); try another.
    Overloaded,
}

impl ErrorCode {
    /// The code on the wire.
    pub fn code(self) -> u64 {
        match self {
            ErrorCode::NotFound => 0x1,
            ErrorCode::Unauthorized => 0x2,
            ErrorCode::Internal => 0x3,
            ErrorCode::AlreadyLive => 0x4,
            ErrorCode::ProtocolViolation => 0x5,
            ErrorCode::UnsupportedVersion => 0x6,
            ErrorCode::Overloaded => 0x7,
        }
    }

    /// The code for a number from the wire; `None` for numbers this version does not define.
    pub fn from_code(code: u64) -> Option<ErrorCode> {
        Some(match code {
            0x1 => ErrorCode::NotFound,
            0x2 => ErrorCode::Unauthorized,
            0x3 => ErrorCode::Internal,
            0x4 => ErrorCode::AlreadyLive,
            0x5 => ErrorCode::ProtocolViolation,
            0x6 => ErrorCode::UnsupportedVersion,
            0x7 => ErrorCode::Overloaded,
            _ => return None,
        })
    }
}

/// CONNECTION_CLOSE application error code of a clean close (after GOAWAY, or when done).
pub const CLOSE_NO_ERROR: u64 = 0x0;

/// Why a group stream is reset (RESET_STREAM by its sender, STOP_SENDING by its receiver).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetCode {
    /// The group fell too far behind the newest one and was dropped; later groups follow.
    GroupDropped,
    /// The subscription ended (UNSUBSCRIBE, ENDED, or the flow failed).
    Cancelled,
}

impl ResetCode {
    /// The QUIC application error code.
    pub fn code(self) -> u64 {
        match self {
            ResetCode::GroupDropped => 0x1,
            ResetCode::Cancelled => 0x2,
        }
    }

    /// The reset code for a number from the peer; `None` for numbers this version does not
    /// define.
    pub fn from_code(code: u64) -> Option<ResetCode> {
        match code {
            0x1 => Some(ResetCode::GroupDropped),
            0x2 => Some(ResetCode::Cancelled),
            _ => None,
        }
    }
}

/// One message of the control stream. Who sends which is in `docs/cluster-protocol.md`; the
/// codec does not check direction or order.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlMessage {
    /// Client → server, first: who the client is and the proof that it holds the cluster token.
    Hello {
        /// The wire version the client speaks ([`VERSION`]).
        version: u8,
        /// [`token_proof`] with [`Side::Client`] over the TLS exporter output.
        token_proof: [u8; 32],
        /// The client's node id.
        node_id: String,
        /// The client's role ("edge", "relay", …), for logs and placement.
        role: String,
    },
    /// Server → client: the HELLO was accepted.
    HelloOk {
        /// The server's node id.
        node_id: String,
        /// [`token_proof`] with [`Side::Server`]: the server holds the token too.
        token_proof: [u8; 32],
    },
    /// Either way: the connection is refused or failed; the sender then closes it with `code`.
    Error {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail, for logs.
        reason: String,
    },
    /// Either way: the sender takes no new SUBSCRIBE or PUBLISH; flows in progress continue
    /// until they end. The peer should connect elsewhere for new work.
    GoAway,
    /// Subscriber → sender: send me this broadcast.
    Subscribe {
        /// Chosen by the subscriber.
        id: SubscriptionId,
        /// The broadcast's name (`app/key`).
        broadcast: String,
    },
    /// Answer to SUBSCRIBE: the broadcast as it is now; group streams follow.
    SubscribeOk {
        /// The SUBSCRIBE's id.
        id: SubscriptionId,
        /// The tracks and their configs.
        tracks: Vec<(TrackId, TrackInfo)>,
        /// The publisher's metadata.
        metadata: Metadata,
    },
    /// Answer to SUBSCRIBE: refused.
    SubscribeError {
        /// The SUBSCRIBE's id.
        id: SubscriptionId,
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// Receiver of a flow → its sender: stop sending it (the id is then free).
    Unsubscribe {
        /// The flow.
        id: SubscriptionId,
    },
    /// Sender of a flow → its receiver: the broadcast ended; no group follows.
    Ended {
        /// The flow.
        id: SubscriptionId,
    },
    /// Client → server: I push this broadcast to you; group streams follow PUBLISH_OK.
    Publish {
        /// Chosen by the publisher.
        id: SubscriptionId,
        /// The broadcast's name.
        broadcast: String,
        /// The tracks and their configs.
        tracks: Vec<(TrackId, TrackInfo)>,
        /// The publisher's metadata.
        metadata: Metadata,
    },
    /// Answer to PUBLISH: go ahead.
    PublishOk {
        /// The PUBLISH's id.
        id: SubscriptionId,
    },
    /// Answer to PUBLISH: refused.
    PublishError {
        /// The PUBLISH's id.
        id: SubscriptionId,
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
    /// Either way: this broadcast is now live on the sender.
    Announce {
        /// The broadcast's name.
        broadcast: String,
    },
    /// Either way: this broadcast is no longer live on the sender.
    Unannounce {
        /// The broadcast's name.
        broadcast: String,
    },
}

mod msg {
    pub const HELLO: u8 = 0x01;
    pub const HELLO_OK: u8 = 0x02;
    pub const ERROR: u8 = 0x03;
    pub const GOAWAY: u8 = 0x04;
    pub const SUBSCRIBE: u8 = 0x10;
    pub const SUBSCRIBE_OK: u8 = 0x11;
    pub const SUBSCRIBE_ERROR: u8 = 0x12;
    pub const UNSUBSCRIBE: u8 = 0x13;
    pub const ENDED: u8 = 0x14;
    pub const PUBLISH: u8 = 0x20;
    pub const PUBLISH_OK: u8 = 0x21;
    pub const PUBLISH_ERROR: u8 = 0x22;
    pub const ANNOUNCE: u8 = 0x30;
    pub const UNANNOUNCE: u8 = 0x31;
}

impl ControlMessage {
    /// The message's name as the protocol document spells it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello { .. } => "HELLO",
            ControlMessage::HelloOk { .. } => "HELLO_OK",
            ControlMessage::Error { .. } => "ERROR",
            ControlMessage::GoAway => "GOAWAY",
            ControlMessage::Subscribe { .. } => "SUBSCRIBE",
            ControlMessage::SubscribeOk { .. } => "SUBSCRIBE_OK",
            ControlMessage::SubscribeError { .. } => "SUBSCRIBE_ERROR",
            ControlMessage::Unsubscribe { .. } => "UNSUBSCRIBE",
            ControlMessage::Ended { .. } => "ENDED",
            ControlMessage::Publish { .. } => "PUBLISH",
            ControlMessage::PublishOk { .. } => "PUBLISH_OK",
            ControlMessage::PublishError { .. } => "PUBLISH_ERROR",
            ControlMessage::Announce { .. } => "ANNOUNCE",
            ControlMessage::Unannounce { .. } => "UNANNOUNCE",
        }
    }

    fn type_code(&self) -> u8 {
        match self {
            ControlMessage::Hello { .. } => msg::HELLO,
            ControlMessage::HelloOk { .. } => msg::HELLO_OK,
            ControlMessage::Error { .. } => msg::ERROR,
            ControlMessage::GoAway => msg::GOAWAY,
            ControlMessage::Subscribe { .. } => msg::SUBSCRIBE,
            ControlMessage::SubscribeOk { .. } => msg::SUBSCRIBE_OK,
            ControlMessage::SubscribeError { .. } => msg::SUBSCRIBE_ERROR,
            ControlMessage::Unsubscribe { .. } => msg::UNSUBSCRIBE,
            ControlMessage::Ended { .. } => msg::ENDED,
            ControlMessage::Publish { .. } => msg::PUBLISH,
            ControlMessage::PublishOk { .. } => msg::PUBLISH_OK,
            ControlMessage::PublishError { .. } => msg::PUBLISH_ERROR,
            ControlMessage::Announce { .. } => msg::ANNOUNCE,
            ControlMessage::Unannounce { .. } => msg::UNANNOUNCE,
        }
    }
}

/// The first bytes of a group stream: which flow and which group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupHeader {
    /// The SUBSCRIBE or PUBLISH this group belongs to.
    pub subscription: SubscriptionId,
    /// The group's number.
    pub sequence: GroupSeq,
}

/// A frame read from a group stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireFrame {
    /// The track it belongs to.
    pub track: TrackId,
    /// The frame; its payload is split from the decoder's input buffer.
    pub frame: Frame,
    /// When the origin ingested it, microseconds since the UNIX epoch (passed on unchanged by
    /// every hop, so each hop can measure its latency from ingest).
    pub ingest_us: u64,
}

/// What a [`GroupDecoder`] yields, in stream order.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupEvent {
    /// The stream's header; always first, exactly once.
    Header(GroupHeader),
    /// A track's (new) config; it applies to the track's frames that follow.
    Config {
        /// The track.
        track: TrackId,
        /// Its description from here on (boxed: configs are rare, and every frame's event is as
        /// large as the largest variant).
        info: Box<TrackInfo>,
    },
    /// A frame.
    Frame(WireFrame),
}

/// Why bytes cannot be encoded or decoded. On a decode error the stream (and, for the control
/// stream, the connection) must be closed: the decoder's position is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A control message type this version does not define.
    #[error("unknown control message type {0:#04x}")]
    UnknownMessage(u8),
    /// A unidirectional stream type this version does not define.
    #[error("unknown stream type {0:#04x}")]
    UnknownStreamType(u8),
    /// A codec number this version does not define.
    #[error("unknown codec {0:#04x}")]
    UnknownCodec(u8),
    /// An error code this version does not define.
    #[error("unknown error code {0:#x}")]
    UnknownErrorCode(u64),
    /// Item flags with an undefined bit, or keyframe and config together.
    #[error("invalid item flags {0:#x}")]
    BadFlags(u64),
    /// A length or count over its limit.
    #[error("{what} of {size} exceeds the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its announced size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An integer that does not fit a varint (2^62 or more); only the encoders say this.
    #[error("{0} does not fit a varint (2^62 or more)")]
    ValueTooLarge(&'static str),
    /// A message body or config item ends before its last field.
    #[error("message ends before its last field")]
    UnexpectedEnd,
    /// A message body or config item has bytes after its last field.
    #[error("{0} bytes after the last field of a message")]
    TrailingBytes(usize),
    /// A string that is not UTF-8.
    #[error("string is not UTF-8")]
    InvalidUtf8,
    /// A byte that must be 0 or 1 (a flag, a boolean) is neither.
    #[error("invalid boolean byte {0:#04x}")]
    InvalidBool(u8),
    /// A metadata value kind this version does not define.
    #[error("unknown metadata value kind {0:#04x}")]
    UnknownMetaKind(u8),
    /// The same track twice in one track list.
    #[error("track {0} listed twice")]
    DuplicateTrack(u8),
    /// The stream ended inside a message, an item or a group header.
    #[error("stream ended inside a message")]
    Truncated,
}

/// Which end of a connection proves it holds the token; the proofs differ so one end's proof
/// cannot be replayed as the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The end that opened the connection (sends HELLO).
    Client,
    /// The end that accepted it (sends HELLO_OK).
    Server,
}

/// HMAC-SHA256 keyed with the cluster `token` over
/// `ALPN || " " || ("client" | "server") || 0x00 || context`. The context is the connection's
/// TLS exporter output ([`EXPORTER_LABEL`], [`EXPORTER_LEN`] bytes), which both ends compute
/// alike and which differs for every TLS session, so a proof seen on one connection is worthless
/// on another (a man in the middle has two TLS sessions, hence two contexts).
pub fn token_proof(token: &[u8], side: Side, context: &[u8]) -> [u8; 32] {
    proof_mac(token, side, context)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is [`token_proof`]`(token, side, context)`, compared in constant time.
pub fn verify_token_proof(token: &[u8], side: Side, context: &[u8], proof: &[u8; 32]) -> bool {
    proof_mac(token, side, context).verify_slice(proof).is_ok()
}

fn proof_mac(token: &[u8], side: Side, context: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length (longer ones are hashed), so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(token)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(ALPN);
    mac.update(match side {
        Side::Client => b" client\0",
        Side::Server => b" server\0",
    });
    mac.update(context);
    mac
}

// ---------------------------------------------------------------------------------------------
// Primitives: varints (RFC 9000 §16), zigzag, strings.

fn put_varint(out: &mut BytesMut, v: u64, what: &'static str) -> Result<(), WireError> {
    match v {
        0..=0x3f => out.put_u8(v as u8),
        0x40..=0x3fff => out.put_u16(0x4000 | v as u16),
        0x4000..=0x3fff_ffff => out.put_u32(0x8000_0000 | v as u32),
        0x4000_0000..=MAX_VARINT => out.put_u64(0xc000_0000_0000_0000 | v),
        _ => return Err(WireError::ValueTooLarge(what)),
    }
    Ok(())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

fn check_len(what: &'static str, size: usize, limit: usize) -> Result<(), WireError> {
    if size > limit {
        return Err(WireError::TooLarge {
            what,
            size: size as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

fn put_str(out: &mut BytesMut, s: &str, what: &'static str) -> Result<(), WireError> {
    check_len(what, s.len(), MAX_STRING)?;
    put_varint(out, s.len() as u64, what)?;
    out.put_slice(s.as_bytes());
    Ok(())
}

/// A cursor over bytes that are all there is (a message body) or all there is so far (a header).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::UnexpectedEnd);
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(WireError::InvalidBool(b)),
        }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let first = *self.buf.get(self.pos).ok_or(WireError::UnexpectedEnd)?;
        let raw = self.bytes(1 << (first >> 6))?;
        Ok(raw[1..]
            .iter()
            .fold(u64::from(raw[0] & 0x3f), |v, &b| (v << 8) | u64::from(b)))
    }

    /// A varint that announces a size, checked against `limit`.
    fn len(&mut self, what: &'static str, limit: usize) -> Result<usize, WireError> {
        let n = self.varint()?;
        if n > limit as u64 {
            return Err(WireError::TooLarge {
                what,
                size: n,
                limit: limit as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.len(what, MAX_STRING)?;
        let b = self.bytes(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| WireError::InvalidUtf8)
    }

    fn finish(&self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

/// Turns "the header is not all here yet" into `None`.
fn incomplete<T>(r: Result<T, WireError>) -> Result<Option<T>, WireError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(WireError::UnexpectedEnd) => Ok(None),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------------------------
// Track descriptions and metadata.

fn codec_code(c: Codec) -> u8 {
    match c {
        Codec::H264 => 0x01,
        Codec::H265 => 0x02,
        Codec::Av1 => 0x03,
        Codec::Aac => 0x10,
        Codec::Opus => 0x11,
    }
}

fn codec_from_code(b: u8) -> Result<Codec, WireError> {
    Ok(match b {
        0x01 => Codec::H264,
        0x02 => Codec::H265,
        0x03 => Codec::Av1,
        0x10 => Codec::Aac,
        0x11 => Codec::Opus,
        _ => return Err(WireError::UnknownCodec(b)),
    })
}

fn put_track_info(out: &mut BytesMut, info: &TrackInfo) -> Result<(), WireError> {
    out.put_u8(codec_code(info.codec));
    match &info.config {
        None => out.put_u8(0),
        Some(c) => {
            check_len("codec config", c.len(), MAX_CONFIG)?;
            out.put_u8(1);
            put_varint(out, c.len() as u64, "codec config")?;
            out.put_slice(c);
        }
    }
    put_str(
        out,
        info.rendition.as_deref().unwrap_or(""),
        "rendition name",
    )
}

fn read_track_info(r: &mut Reader<'_>) -> Result<TrackInfo, WireError> {
    let codec = codec_from_code(r.u8()?)?;
    let config = if r.bool()? {
        let n = r.len("codec config", MAX_CONFIG)?;
        Some(Bytes::copy_from_slice(r.bytes(n)?))
    } else {
        None
    };
    let rendition = r.string("rendition name")?;
    let mut info = TrackInfo::from_config(codec, config);
    info.rendition = (!rendition.is_empty()).then(|| rendition.into());
    Ok(info)
}

fn put_tracks(out: &mut BytesMut, tracks: &[(TrackId, TrackInfo)]) -> Result<(), WireError> {
    check_len("track list", tracks.len(), MAX_TRACKS)?;
    for (i, (t, _)) in tracks.iter().enumerate() {
        if tracks[..i].iter().any(|(u, _)| u == t) {
            return Err(WireError::DuplicateTrack(t.0));
        }
    }
    put_varint(out, tracks.len() as u64, "track list")?;
    for (t, info) in tracks {
        out.put_u8(t.0);
        put_track_info(out, info)?;
    }
    Ok(())
}

fn read_tracks(r: &mut Reader<'_>) -> Result<Vec<(TrackId, TrackInfo)>, WireError> {
    let n = r.len("track list", MAX_TRACKS)?;
    let mut tracks: Vec<(TrackId, TrackInfo)> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = TrackId(r.u8()?);
        if tracks.iter().any(|(u, _)| *u == t) {
            return Err(WireError::DuplicateTrack(t.0));
        }
        tracks.push((t, read_track_info(r)?));
    }
    Ok(tracks)
}

const META_NUMBER: u8 = 0x00;
const META_BOOL: u8 = 0x01;
const META_TEXT: u8 = 0x02;

fn put_metadata(out: &mut BytesMut, meta: &Metadata) -> Result<(), WireError> {
    check_len("metadata", meta.len(), MAX_METADATA)?;
    put_varint(out, meta.len() as u64, "metadata")?;
    for (k, v) in meta {
        put_str(out, k, "metadata key")?;
        match v {
            MetaValue::Number(n) => {
                out.put_u8(META_NUMBER);
                out.put_f64(*n);
            }
            MetaValue::Bool(b) => {
                out.put_u8(META_BOOL);
                out.put_u8(u8::from(*b));
            }
            MetaValue::Text(s) => {
                out.put_u8(META_TEXT);
                put_str(out, s, "metadata text")?;
            }
        }
    }
    Ok(())
}

fn read_metadata(r: &mut Reader<'_>) -> Result<Metadata, WireError> {
    let n = r.len("metadata", MAX_METADATA)?;
    let mut meta = Vec::with_capacity(n);
    for _ in 0..n {
        let k = r.string("metadata key")?;
        let v = match r.u8()? {
            META_NUMBER => {
                let mut b = [0; 8];
                b.copy_from_slice(r.bytes(8)?);
                MetaValue::Number(f64::from_be_bytes(b))
            }
            META_BOOL => MetaValue::Bool(r.bool()?),
            META_TEXT => MetaValue::Text(r.string("metadata text")?),
            kind => return Err(WireError::UnknownMetaKind(kind)),
        };
        meta.push((k, v));
    }
    Ok(meta)
}

fn read_code(r: &mut Reader<'_>) -> Result<ErrorCode, WireError> {
    let c = r.varint()?;
    ErrorCode::from_code(c).ok_or(WireError::UnknownErrorCode(c))
}

fn read_id(r: &mut Reader<'_>) -> Result<SubscriptionId, WireError> {
    r.varint().map(SubscriptionId)
}

fn read_proof(r: &mut Reader<'_>) -> Result<[u8; 32], WireError> {
    let mut p = [0; 32];
    p.copy_from_slice(r.bytes(32)?);
    Ok(p)
}

// ---------------------------------------------------------------------------------------------
// The control stream.

/// Appends `msg` to `out` as `type (u8) | body length (varint) | body`. On an error (a field
/// over its limit) `out` is left as it was.
pub fn encode_control(msg: &ControlMessage, out: &mut BytesMut) -> Result<(), WireError> {
    let mut body = BytesMut::new();
    encode_body(msg, &mut body)?;
    check_len("control message", body.len(), MAX_CONTROL_MESSAGE)?;
    out.reserve(1 + 4 + body.len());
    out.put_u8(msg.type_code());
    put_varint(out, body.len() as u64, "control message length")?;
    out.put_slice(&body);
    Ok(())
}

fn encode_body(msg: &ControlMessage, b: &mut BytesMut) -> Result<(), WireError> {
    let id = |b: &mut BytesMut, id: &SubscriptionId| put_varint(b, id.0, "subscription id");
    match msg {
        ControlMessage::Hello {
            version,
            token_proof,
            node_id,
            role,
        } => {
            b.put_u8(*version);
            b.put_slice(token_proof);
            put_str(b, node_id, "node id")?;
            put_str(b, role, "role")?;
        }
        ControlMessage::HelloOk {
            node_id,
            token_proof,
        } => {
            put_str(b, node_id, "node id")?;
            b.put_slice(token_proof);
        }
        ControlMessage::Error { code, reason } => {
            put_varint(b, code.code(), "error code")?;
            put_str(b, reason, "reason")?;
        }
        ControlMessage::GoAway => {}
        ControlMessage::Subscribe { id: i, broadcast } => {
            id(b, i)?;
            put_str(b, broadcast, "broadcast name")?;
        }
        ControlMessage::SubscribeOk {
            id: i,
            tracks,
            metadata,
        } => {
            id(b, i)?;
            put_tracks(b, tracks)?;
            put_metadata(b, metadata)?;
        }
        ControlMessage::SubscribeError {
            id: i,
            code,
            reason,
        }
        | ControlMessage::PublishError {
            id: i,
            code,
            reason,
        } => {
            id(b, i)?;
            put_varint(b, code.code(), "error code")?;
            put_str(b, reason, "reason")?;
        }
        ControlMessage::Unsubscribe { id: i }
        | ControlMessage::Ended { id: i }
        | ControlMessage::PublishOk { id: i } => id(b, i)?,
        ControlMessage::Publish {
            id: i,
            broadcast,
            tracks,
            metadata,
        } => {
            id(b, i)?;
            put_str(b, broadcast, "broadcast name")?;
            put_tracks(b, tracks)?;
            put_metadata(b, metadata)?;
        }
        ControlMessage::Announce { broadcast } | ControlMessage::Unannounce { broadcast } => {
            put_str(b, broadcast, "broadcast name")?;
        }
    }
    Ok(())
}

fn decode_body(ty: u8, body: &[u8]) -> Result<ControlMessage, WireError> {
    let r = &mut Reader::new(body);
    let m = match ty {
        msg::HELLO => ControlMessage::Hello {
            version: r.u8()?,
            token_proof: read_proof(r)?,
            node_id: r.string("node id")?,
            role: r.string("role")?,
        },
        msg::HELLO_OK => ControlMessage::HelloOk {
            node_id: r.string("node id")?,
            token_proof: read_proof(r)?,
        },
        msg::ERROR => ControlMessage::Error {
            code: read_code(r)?,
            reason: r.string("reason")?,
        },
        msg::GOAWAY => ControlMessage::GoAway,
        msg::SUBSCRIBE => ControlMessage::Subscribe {
            id: read_id(r)?,
            broadcast: r.string("broadcast name")?,
        },
        msg::SUBSCRIBE_OK => ControlMessage::SubscribeOk {
            id: read_id(r)?,
            tracks: read_tracks(r)?,
            metadata: read_metadata(r)?,
        },
        msg::SUBSCRIBE_ERROR => ControlMessage::SubscribeError {
            id: read_id(r)?,
            code: read_code(r)?,
            reason: r.string("reason")?,
        },
        msg::UNSUBSCRIBE => ControlMessage::Unsubscribe { id: read_id(r)? },
        msg::ENDED => ControlMessage::Ended { id: read_id(r)? },
        msg::PUBLISH => ControlMessage::Publish {
            id: read_id(r)?,
            broadcast: r.string("broadcast name")?,
            tracks: read_tracks(r)?,
            metadata: read_metadata(r)?,
        },
        msg::PUBLISH_OK => ControlMessage::PublishOk { id: read_id(r)? },
        msg::PUBLISH_ERROR => ControlMessage::PublishError {
            id: read_id(r)?,
            code: read_code(r)?,
            reason: r.string("reason")?,
        },
        msg::ANNOUNCE => ControlMessage::Announce {
            broadcast: r.string("broadcast name")?,
        },
        msg::UNANNOUNCE => ControlMessage::Unannounce {
            broadcast: r.string("broadcast name")?,
        },
        _ => return Err(WireError::UnknownMessage(ty)),
    };
    r.finish()?;
    Ok(m)
}

fn known_message(ty: u8) -> bool {
    matches!(
        ty,
        msg::HELLO
            | msg::HELLO_OK
            | msg::ERROR
            | msg::GOAWAY
            | msg::SUBSCRIBE
            | msg::SUBSCRIBE_OK
            | msg::SUBSCRIBE_ERROR
            | msg::UNSUBSCRIBE
            | msg::ENDED
            | msg::PUBLISH
            | msg::PUBLISH_OK
            | msg::PUBLISH_ERROR
            | msg::ANNOUNCE
            | msg::UNANNOUNCE
    )
}

/// Reads control messages from the bytes of the control stream, one end's direction of it.
#[derive(Debug, Default)]
pub struct ControlDecoder {
    _private: (),
}

impl ControlDecoder {
    /// A decoder at the start of a control stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes the next message from the front of `buf`, consuming it. `Ok(None)`: `buf` holds
    /// no whole message yet; append what the stream delivers next and call again. Call until
    /// `Ok(None)` after every append: one read may complete several messages.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<ControlMessage>, WireError> {
        let Some(&ty) = buf.first() else {
            return Ok(None);
        };
        if !known_message(ty) {
            return Err(WireError::UnknownMessage(ty));
        }
        let mut r = Reader::new(buf);
        r.pos = 1;
        let Some(len) = incomplete(r.len("control message", MAX_CONTROL_MESSAGE))? else {
            return Ok(None);
        };
        let header = r.pos;
        if buf.len() - header < len {
            return Ok(None);
        }
        buf.advance(header);
        let body = buf.split_to(len);
        decode_body(ty, &body).map(Some)
    }

    /// Call when the stream ends: an error if it ended inside a message.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), WireError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Group streams.

/// Appends the header that opens a group stream. Write it once, first.
pub fn encode_group_header(header: &GroupHeader, out: &mut BytesMut) -> Result<(), WireError> {
    let start = out.len();
    let r = put_group_header(header, out);
    restore_on_err(r, out, start)
}

fn put_group_header(header: &GroupHeader, out: &mut BytesMut) -> Result<(), WireError> {
    out.put_u8(STREAM_TYPE_GROUP);
    put_varint(out, header.subscription.0, "subscription id")?;
    put_varint(out, header.sequence.0, "group sequence")
}

/// Appends the header of a frame item on a group stream: everything but the payload. The caller
/// then sends `frame.payload` as is (a second buffer of a vectored write), so the shared payload
/// is never copied. `ingest_us` is the origin's ingest time (microseconds since the UNIX epoch),
/// passed on unchanged. Fails, leaving `out` as it was, for a payload over [`MAX_FRAME`], a pts or
/// dts outside -2^61..2^61 µs (zigzag-encoded, they must fit a varint) or an ingest time of 2^62
/// or more.
pub fn encode_frame_header(
    track: TrackId,
    frame: &Frame,
    ingest_us: u64,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    check_len("frame", frame.payload.len(), MAX_FRAME)?;
    let start = out.len();
    let r = put_frame_header(track, frame, ingest_us, out);
    restore_on_err(r, out, start)
}

fn put_frame_header(
    track: TrackId,
    frame: &Frame,
    ingest_us: u64,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    out.put_u8(track.0);
    out.put_u8(if frame.keyframe {
        FLAG_KEYFRAME as u8
    } else {
        0
    });
    put_varint(out, zigzag(frame.pts), "pts")?;
    put_varint(out, zigzag(frame.dts), "dts")?;
    put_varint(out, ingest_us, "ingest time")?;
    put_varint(out, frame.payload.len() as u64, "frame length")
}

/// Appends a config item to a group stream: from here on, `track`'s frames use `info`. Send it
/// where the hub's log has the `Item::Config`, so it stays ordered with the frames.
pub fn encode_config_item(
    track: TrackId,
    info: &TrackInfo,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    let mut body = BytesMut::new();
    put_track_info(&mut body, info)?;
    out.put_u8(track.0);
    out.put_u8(FLAG_CONFIG as u8);
    // The body is at most MAX_CONFIG_ITEM bytes, far below 2^62.
    put_varint(out, body.len() as u64, "config item length")?;
    out.put_slice(&body);
    Ok(())
}

fn restore_on_err(
    r: Result<(), WireError>,
    out: &mut BytesMut,
    start: usize,
) -> Result<(), WireError> {
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Reads one group stream: [`GroupEvent::Header`] first, then its items until the stream ends.
#[derive(Debug, Default)]
pub struct GroupDecoder {
    header: Option<GroupHeader>,
}

impl GroupDecoder {
    /// A decoder at the start of a group stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream's header, once decoded.
    pub fn header(&self) -> Option<GroupHeader> {
        self.header
    }

    /// Decodes the next event from the front of `buf`, consuming it; a frame's payload is split
    /// off `buf` without copying. `Ok(None)`: `buf` holds no whole item yet; append what the
    /// stream delivers next and call again. Call until `Ok(None)` after every append.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<GroupEvent>, WireError> {
        if self.header.is_none() {
            let Some(ty) = buf.first().copied() else {
                return Ok(None);
            };
            if ty != STREAM_TYPE_GROUP {
                return Err(WireError::UnknownStreamType(ty));
            }
            let mut r = Reader::new(buf);
            r.pos = 1;
            let Some(h) = incomplete(group_header(&mut r))? else {
                return Ok(None);
            };
            buf.advance(r.pos);
            self.header = Some(h);
            return Ok(Some(GroupEvent::Header(h)));
        }
        let mut r = Reader::new(buf);
        let Some(item) = incomplete(item_header(&mut r))? else {
            return Ok(None);
        };
        let header_len = r.pos;
        let len = match item {
            ItemHeader::Frame { len, .. } | ItemHeader::Config { len, .. } => len,
        };
        if buf.len() - header_len < len {
            return Ok(None);
        }
        buf.advance(header_len);
        let payload = buf.split_to(len);
        Ok(Some(match item {
            ItemHeader::Config { track, .. } => {
                let r = &mut Reader::new(&payload);
                let info = read_track_info(r)?;
                r.finish()?;
                GroupEvent::Config {
                    track,
                    info: Box::new(info),
                }
            }
            ItemHeader::Frame {
                track,
                keyframe,
                pts,
                dts,
                ingest_us,
                ..
            } => GroupEvent::Frame(WireFrame {
                track,
                frame: Frame {
                    pts,
                    dts,
                    keyframe,
                    payload: payload.freeze(),
                },
                ingest_us,
            }),
        }))
    }

    /// Call when the stream ends (FIN, not a reset): an error if it ended before its header or
    /// inside an item.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), WireError> {
        if self.header.is_some() && buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Truncated)
        }
    }
}

enum ItemHeader {
    Frame {
        track: TrackId,
        keyframe: bool,
        pts: i64,
        dts: i64,
        ingest_us: u64,
        len: usize,
    },
    Config {
        track: TrackId,
        len: usize,
    },
}

fn group_header(r: &mut Reader<'_>) -> Result<GroupHeader, WireError> {
    Ok(GroupHeader {
        subscription: SubscriptionId(r.varint()?),
        sequence: GroupSeq(r.varint()?),
    })
}

fn item_header(r: &mut Reader<'_>) -> Result<ItemHeader, WireError> {
    let track = TrackId(r.u8()?);
    let flags = r.varint()?;
    if flags == FLAG_CONFIG {
        let len = r.len("config item", MAX_CONFIG_ITEM)?;
        return Ok(ItemHeader::Config { track, len });
    }
    if flags & !FLAG_KEYFRAME != 0 {
        return Err(WireError::BadFlags(flags));
    }
    Ok(ItemHeader::Frame {
        track,
        keyframe: flags & FLAG_KEYFRAME != 0,
        pts: unzigzag(r.varint()?),
        dts: unzigzag(r.varint()?),
        ingest_us: r.varint()?,
        len: r.len("frame", MAX_FRAME)?,
    })
}

#[cfg(test)]
mod tests;
