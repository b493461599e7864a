//! The RTMP chunk stream (RTMP spec §5.3): messages cut into chunks, interleaved per chunk stream.
//!
//! Guarantees: the decoder never panics on any input; a message longer than the configured
//! maximum is refused from its header, before any of it is buffered; the bytes buffered for
//! unfinished messages are bounded; the number of chunk streams is bounded.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Chunk size every RTMP peer starts with.
pub(crate) const DEFAULT_CHUNK_SIZE: usize = 128;
/// Largest chunk size accepted from a peer (the 24-bit message length bounds useful sizes).
pub(crate) const MAX_CHUNK_SIZE: usize = 0xFF_FFFF;
/// Chunk streams one connection may use at once.
pub(crate) const MAX_CHUNK_STREAMS: usize = 64;

/// A whole RTMP message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Chunk stream it came on.
    pub(crate) csid: u32,
    /// Timestamp in milliseconds.
    pub(crate) timestamp: u32,
    /// Message type id (8 audio, 9 video, 18 data, 20 command, …).
    pub(crate) type_id: u8,
    /// Message stream id.
    pub(crate) stream_id: u32,
    /// The body. Empty for audio/video when the decoder skims media.
    pub payload: Bytes,
    /// The body's length as announced (equals `payload.len()` unless skimmed).
    pub(crate) length: u32,
}

/// Why the chunk stream cannot be decoded; the connection must close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A compressed chunk header on a chunk stream with no earlier full header.
    #[error("chunk header type {fmt} on chunk stream {csid} that has no previous header")]
    NoPreviousHeader {
        /// The header type.
        fmt: u8,
        /// The chunk stream.
        csid: u32,
    },
    /// A message longer than the limit.
    #[error("message of {length} bytes exceeds the limit of {limit}")]
    Oversized {
        /// Announced length.
        length: u32,
        /// The limit.
        limit: usize,
    },
    /// Too many chunk streams in use.
    #[error("more than {MAX_CHUNK_STREAMS} chunk streams")]
    TooManyChunkStreams,
    /// Unfinished messages hold too many bytes.
    #[error("too many bytes buffered in unfinished messages")]
    TooMuchBuffered,
    /// A Set Chunk Size outside 1..=16 MiB.
    #[error("invalid chunk size {0}")]
    BadChunkSize(u32),
}

#[derive(Default)]
struct ChunkState {
    timestamp: u32,
    delta: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
    extended: bool,
    partial: Option<BytesMut>,
    received: u32,
}

/// Reassembles messages from a chunk stream.
pub struct ChunkDecoder {
    chunk_size: usize,
    max_message: usize,
    streams: HashMap<u32, ChunkState>,
    buffered: usize,
    skim_media: bool,
}

impl ChunkDecoder {
    /// A decoder refusing messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_message,
            streams: HashMap::new(),
            buffered: 0,
            skim_media: false,
        }
    }

    /// A decoder that keeps the bodies of control messages but only counts audio/video bytes:
    /// what a load client needs.
    pub(crate) fn skimming(max_message: usize) -> Self {
        Self {
            skim_media: true,
            ..Self::new(max_message)
        }
    }

    /// Applies a peer's Set Chunk Size.
    pub fn set_chunk_size(&mut self, size: u32) -> Result<(), ChunkError> {
        let size = size & 0x7FFF_FFFF;
        if size == 0 || size as usize > MAX_CHUNK_SIZE {
            return Err(ChunkError::BadChunkSize(size));
        }
        self.chunk_size = size as usize;
        Ok(())
    }

    /// Decodes from the front of `buf`, consuming whole chunks only. Returns the next complete
    /// message, or `None` when more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ChunkError> {
        loop {
            let Some((header_len, csid, fmt)) = basic_header(buf) else {
                return Ok(None);
            };
            let mh_len = [11, 7, 3, 0][usize::from(fmt)];
            if buf.len() < header_len + mh_len {
                return Ok(None);
            }
            if fmt != 0 && !self.streams.contains_key(&csid) {
                return Err(ChunkError::NoPreviousHeader { fmt, csid });
            }
            if !self.streams.contains_key(&csid) && self.streams.len() >= MAX_CHUNK_STREAMS {
                return Err(ChunkError::TooManyChunkStreams);
            }
            let h = &buf[header_len..header_len + mh_len];
            let ts_field = (fmt < 3).then(|| u32::from_be_bytes([0, h[0], h[1], h[2]]));
            let st = self.streams.entry(csid).or_default();
            let extended = match ts_field {
                Some(t) => t == 0xFF_FFFF,
                None => st.extended,
            };
            let full_header = header_len + mh_len + if extended { 4 } else { 0 };
            if buf.len() < full_header {
                return Ok(None);
            }
            let length = if fmt <= 1 {
                u32::from_be_bytes([0, h[3], h[4], h[5]])
            } else {
                st.length
            };
            let starting = st.received == 0 || fmt < 3;
            let remaining = if starting {
                length
            } else {
                st.length - st.received
            };
            let body = (remaining as usize).min(self.chunk_size);
            let skim = self.skim_media && {
                let type_id = if fmt <= 1 { h[6] } else { st.type_id };
                type_id == 8 || type_id == 9
            };
            if starting && length as usize > self.max_message {
                return Err(ChunkError::Oversized {
                    length,
                    limit: self.max_message,
                });
            }
            if buf.len() < full_header + body {
                return Ok(None);
            }
            // The whole chunk header is here: commit it.
            let ext = extended.then(|| {
                u32::from_be_bytes([
                    buf[full_header - 4],
                    buf[full_header - 3],
                    buf[full_header - 2],
                    buf[full_header - 1],
                ])
            });
            if starting {
                if let Some(p) = st.partial.take() {
                    self.buffered -= p.len();
                }
                let field = ext.or(ts_field);
                match fmt {
                    0 => {
                        st.timestamp = field.unwrap_or(0);
                        st.delta = st.timestamp;
                    }
                    1 | 2 => {
                        st.delta = field.unwrap_or(0);
                        st.timestamp = st.timestamp.wrapping_add(st.delta);
                    }
                    _ => st.timestamp = st.timestamp.wrapping_add(st.delta),
                }
                if fmt <= 1 {
                    st.length = length;
                    st.type_id = h[6];
                }
                if fmt == 0 {
                    st.stream_id = u32::from_le_bytes([h[7], h[8], h[9], h[10]]);
                }
                st.extended = extended;
                st.received = 0;
            }
            buf.advance(full_header);
            if skim {
                buf.advance(body);
            } else {
                let p = st.partial.get_or_insert_with(|| {
                    BytesMut::with_capacity((st.length as usize).min(64 << 10))
                });
                p.extend_from_slice(&buf[..body]);
                buf.advance(body);
                self.buffered += body;
            }
            st.received += body as u32;
            if st.received == st.length {
                let payload = st.partial.take().map(BytesMut::freeze).unwrap_or_default();
                self.buffered -= payload.len();
                st.received = 0;
                return Ok(Some(Message {
                    csid,
                    timestamp: st.timestamp,
                    type_id: st.type_id,
                    stream_id: st.stream_id,
                    length: st.length,
                    payload,
                }));
            }
            if self.buffered > 2 * self.max_message.max(MAX_CHUNK_SIZE) {
                return Err(ChunkError::TooMuchBuffered);
            }
        }
    }
}

/// Parses the basic header: (its length, chunk stream id, header type).
fn basic_header(buf: &[u8]) -> Option<(usize, u32, u8)> {
    let b0 = *buf.first()?;
    let fmt = b0 >> 6;
    match b0 & 0x3f {
        0 => Some((2, 64 + u32::from(*buf.get(1)?), fmt)),
        1 => Some((
            3,
            64 + u32::from(*buf.get(1)?) + 256 * u32::from(*buf.get(2)?),
            fmt,
        )),
        c => Some((1, u32::from(c), fmt)),
    }
}

fn put_basic_header(out: &mut BytesMut, fmt: u8, csid: u32) {
    match csid {
        2..=63 => out.put_u8((fmt << 6) | csid as u8),
        64..=319 => {
            out.put_u8(fmt << 6);
            out.put_u8((csid - 64) as u8);
        }
        _ => {
            let c = csid.clamp(320, 65599) - 64;
            out.put_u8((fmt << 6) | 1);
            out.put_u16_le(c as u16);
        }
    }
}

/// Appends one message to `out` as chunks of `chunk_size`: a full (type 0) header, then type 3
/// continuation headers. The body is given in parts so callers need not concatenate it.
pub fn encode_message(
    out: &mut BytesMut,
    csid: u32,
    timestamp: u32,
    type_id: u8,
    stream_id: u32,
    body: &[&[u8]],
    chunk_size: usize,
) {
    let length: usize = body.iter().map(|b| b.len()).sum();
    let extended = timestamp >= 0xFF_FFFF;
    out.reserve(length + 16 + length / chunk_size.max(1) * 5);
    put_basic_header(out, 0, csid);
    let ts24 = if extended { 0xFF_FFFF } else { timestamp };
    out.put_slice(&ts24.to_be_bytes()[1..]);
    out.put_slice(&(length as u32).to_be_bytes()[1..]);
    out.put_u8(type_id);
    out.put_u32_le(stream_id);
    if extended {
        out.put_u32(timestamp);
    }
    let mut in_chunk = 0;
    for part in body {
        let mut part = *part;
        while !part.is_empty() {
            if in_chunk == chunk_size {
                put_basic_header(out, 3, csid);
                if extended {
                    out.put_u32(timestamp);
                }
                in_chunk = 0;
            }
            let n = part.len().min(chunk_size - in_chunk);
            out.put_slice(&part[..n]);
            part = &part[n..];
            in_chunk += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(csid: u32, ts: u32, type_id: u8, sid: u32, body: Vec<u8>) -> Message {
        Message {
            csid,
            timestamp: ts,
            type_id,
            stream_id: sid,
            length: body.len() as u32,
            payload: body.into(),
        }
    }

    fn decode_all(d: &mut ChunkDecoder, mut buf: BytesMut) -> Vec<Message> {
        let mut out = vec![];
        while let Some(m) = d.decode(&mut buf).unwrap() {
            out.push(m);
        }
        assert!(buf.is_empty());
        out
    }

    proptest! {
        #[test]
        fn round_trip_random_chunk_sizes(
            chunk_size in 1usize..5000,
            msgs in prop::collection::vec(
                (2u32..400, any::<u32>(), 1u8..30, 0u32..5, prop::collection::vec(any::<u8>(), 0..9000)),
                1..8),
            split in 1usize..7000,
        ) {
            let msgs: Vec<Message> = msgs.into_iter().map(|(c, t, ty, s, b)| msg(c, t, ty, s, b)).collect();
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode_message(&mut wire, m.csid, m.timestamp, m.type_id, m.stream_id, &[&m.payload], chunk_size);
            }
            let mut d = ChunkDecoder::new(16 << 20);
            d.set_chunk_size(chunk_size as u32).unwrap();
            // Feed in arbitrary pieces.
            let mut buf = BytesMut::new();
            let mut out = vec![];
            for piece in wire.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(m) = d.decode(&mut buf).unwrap() {
                    out.push(m);
                }
            }
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn never_panics(chunk in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = ChunkDecoder::new(1 << 20);
            let mut buf = BytesMut::from(&chunk[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }

    #[test]
    fn compressed_headers_follow_spec() {
        // fmt0 ts=1000 len=3; fmt2 delta=33; fmt3 (new message, same delta).
        let mut wire = BytesMut::new();
        wire.extend_from_slice(&[0x04, 0, 0x03, 0xE8, 0, 0, 3, 9, 1, 0, 0, 0, 1, 2, 3]);
        wire.extend_from_slice(&[0x84, 0, 0, 33, 4, 5, 6]);
        wire.extend_from_slice(&[0xC4, 7, 8, 9]);
        let mut d = ChunkDecoder::new(1 << 20);
        let ts: Vec<u32> = decode_all(&mut d, wire)
            .iter()
            .map(|m| m.timestamp)
            .collect();
        assert_eq!(ts, vec![1000, 1033, 1066]);
    }

    #[test]
    fn oversized_is_refused_from_the_header() {
        let mut wire = BytesMut::from(&[0x04, 0, 0, 0, 0x10, 0, 1, 9, 1, 0, 0, 0][..]);
        let mut d = ChunkDecoder::new(1 << 20);
        assert_eq!(
            d.decode(&mut wire),
            Err(ChunkError::Oversized {
                length: 0x100001,
                limit: 1 << 20
            })
        );
    }

    #[test]
    fn compressed_header_without_history_is_refused() {
        let mut wire = BytesMut::from(&[0x44, 0, 0, 0, 0, 0, 3, 9][..]);
        assert_eq!(
            ChunkDecoder::new(1024).decode(&mut wire),
            Err(ChunkError::NoPreviousHeader { fmt: 1, csid: 4 })
        );
    }

    #[test]
    fn extended_timestamps() {
        let mut wire = BytesMut::new();
        encode_message(&mut wire, 6, 0x0100_0000, 9, 1, &[&[7u8; 300]], 128);
        let mut d = ChunkDecoder::new(1024);
        let m = decode_all(&mut d, wire);
        assert_eq!(m[0].timestamp, 0x0100_0000);
        assert_eq!(m[0].payload.len(), 300);
    }

    #[test]
    fn skimming_counts_media_without_keeping_it() {
        let mut wire = BytesMut::new();
        encode_message(&mut wire, 6, 5, 9, 1, &[&[7u8; 300]], 128);
        encode_message(&mut wire, 3, 6, 20, 0, &[b"abc"], 128);
        let mut d = ChunkDecoder::skimming(1024);
        let m = decode_all(&mut d, wire);
        assert_eq!((m[0].length, m[0].payload.len()), (300, 0));
        assert_eq!(&m[1].payload[..], b"abc");
    }
}
