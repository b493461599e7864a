//! FLV tags ↔ media items: the bodies RTMP audio/video messages carry, and the FLV file/stream
//! framing HTTP-FLV uses.
//!
//! Covers H.264 (codec id 7), AAC (sound format 10), and enhanced RTMP video
//! (ExVideoTagHeader with FourCC `avc1`, `hvc1`, `av01`). Parsers take untrusted bytes: they
//! return an error or [`Tag::Ignored`], never panic. Payloads are sliced from the input `Bytes`,
//! never copied.

use bytes::{BufMut, Bytes, BytesMut};

use crate::media::{Codec, Frame, MetaValue, Metadata, TrackInfo};

use super::amf0::Amf0;

/// FLV tag type of audio.
pub const TAG_AUDIO: u8 = 8;
/// FLV tag type of video.
pub const TAG_VIDEO: u8 = 9;
/// FLV tag type of script data.
pub const TAG_SCRIPT: u8 = 18;

/// What an audio or video tag body held.
#[derive(Debug, PartialEq)]
pub enum Tag {
    /// A decoder configuration (sequence header).
    Config(TrackInfo),
    /// A coded frame.
    Frame(Codec, Frame),
    /// Nothing to carry (end of sequence, unsupported codec, metadata packets); the reason.
    Ignored(&'static str),
}

/// Why a tag body is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlvError {
    /// The body is shorter than its header.
    #[error("FLV {0} tag too short")]
    Truncated(&'static str),
}

fn fourcc_codec(f: &[u8]) -> Option<Codec> {
    match f {
        b"avc1" => Some(Codec::H264),
        b"hvc1" => Some(Codec::H265),
        b"av01" => Some(Codec::Av1),
        _ => None,
    }
}

fn codec_fourcc(c: Codec) -> &'static [u8; 4] {
    match c {
        Codec::H264 => b"avc1",
        Codec::H265 => b"hvc1",
        _ => b"av01",
    }
}

fn cts24(b: &[u8]) -> i64 {
    // Signed 24-bit composition time offset in milliseconds.
    let v = (i32::from(b[0]) << 16) | (i32::from(b[1]) << 8) | i32::from(b[2]);
    i64::from((v << 8) >> 8)
}

fn video_config(codec: Codec, config: Bytes) -> Tag {
    Tag::Config(TrackInfo::from_config(codec, Some(config)))
}

fn frame(codec: Codec, ts_ms: u32, cts: i64, keyframe: bool, payload: Bytes) -> Tag {
    let dts = i64::from(ts_ms) * 1000;
    Tag::Frame(
        codec,
        Frame {
            dts,
            pts: dts + cts * 1000,
            keyframe,
            payload,
        },
    )
}

/// Parses the body of a video tag (RTMP message type 9) sent at `ts_ms`.
pub fn parse_video(ts_ms: u32, body: &Bytes) -> Result<Tag, FlvError> {
    let b0 = *body.first().ok_or(FlvError::Truncated("video"))?;
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: [IsExHeader | FrameType(3) | PacketType(4)] FourCC(4) ...
        if body.len() < 5 {
            return Err(FlvError::Truncated("enhanced video"));
        }
        let frame_type = (b0 >> 4) & 0x07;
        let packet_type = b0 & 0x0f;
        let Some(codec) = fourcc_codec(&body[1..5]) else {
            return Ok(Tag::Ignored("unsupported video FourCC"));
        };
        if frame_type == 5 {
            return Ok(Tag::Ignored("video command frame"));
        }
        let key = frame_type == 1;
        return Ok(match packet_type {
            0 => video_config(codec, body.slice(5..)),
            1 if codec != Codec::Av1 => {
                if body.len() < 8 {
                    return Err(FlvError::Truncated("enhanced video"));
                }
                frame(codec, ts_ms, cts24(&body[5..8]), key, body.slice(8..))
            }
            1 | 3 => frame(codec, ts_ms, 0, key, body.slice(5..)),
            2 => Tag::Ignored("end of sequence"),
            _ => Tag::Ignored("unsupported enhanced video packet type"),
        });
    }
    let frame_type = b0 >> 4;
    let codec = match b0 & 0x0f {
        7 => Codec::H264,
        12 => Codec::H265,
        _ => return Ok(Tag::Ignored("unsupported video codec")),
    };
    if frame_type == 5 {
        return Ok(Tag::Ignored("video command frame"));
    }
    if body.len() < 5 {
        return Err(FlvError::Truncated("video"));
    }
    Ok(match body[1] {
        0 => video_config(codec, body.slice(5..)),
        1 => frame(
            codec,
            ts_ms,
            cts24(&body[2..5]),
            frame_type == 1,
            body.slice(5..),
        ),
        _ => Tag::Ignored("end of sequence"),
    })
}

/// Parses the body of an audio tag (RTMP message type 8) sent at `ts_ms`.
pub fn parse_audio(ts_ms: u32, body: &Bytes) -> Result<Tag, FlvError> {
    let b0 = *body.first().ok_or(FlvError::Truncated("audio"))?;
    if b0 >> 4 != 10 {
        return Ok(Tag::Ignored("unsupported audio codec"));
    }
    if body.len() < 2 {
        return Err(FlvError::Truncated("audio"));
    }
    Ok(match body[1] {
        0 => Tag::Config(TrackInfo::from_config(Codec::Aac, Some(body.slice(2..)))),
        _ => frame(Codec::Aac, ts_ms, 0, true, body.slice(2..)),
    })
}

/// The tag-body header for a frame: up to 8 bytes, then the payload follows.
pub(crate) fn frame_header(codec: Codec, f: &Frame, out: &mut BytesMut) {
    let cts = ((f.pts - f.dts) / 1000).clamp(-(1 << 23), (1 << 23) - 1) as i32;
    let cts = &cts.to_be_bytes()[1..];
    match codec {
        Codec::Aac => out.put_slice(&[0xAF, 1]),
        Codec::Opus => out.put_u8(0x90),
        Codec::H264 => {
            out.put_u8(if f.keyframe { 0x17 } else { 0x27 });
            out.put_u8(1);
            out.put_slice(cts);
        }
        Codec::H265 | Codec::Av1 => {
            let ft = if f.keyframe { 0x10 } else { 0x20 };
            let with_cts = codec == Codec::H265 && f.pts != f.dts;
            out.put_u8(0x80 | ft | if with_cts { 1 } else { 3 });
            out.put_slice(codec_fourcc(codec));
            if with_cts {
                out.put_slice(cts);
            }
        }
    }
}

/// The tag-body header of a sequence header; the config follows.
pub(crate) fn config_header(codec: Codec, out: &mut BytesMut) {
    match codec {
        Codec::Aac => out.put_slice(&[0xAF, 0]),
        Codec::Opus => out.put_u8(0x90),
        Codec::H264 => out.put_slice(&[0x17, 0, 0, 0, 0]),
        Codec::H265 | Codec::Av1 => {
            out.put_u8(0x90);
            out.put_slice(codec_fourcc(codec));
        }
    }
}

/// FLV tag type for a codec's track.
pub(crate) fn tag_type(codec: Codec) -> u8 {
    match codec.kind() {
        crate::media::TrackKind::Video => TAG_VIDEO,
        crate::media::TrackKind::Audio => TAG_AUDIO,
    }
}

/// Metadata from the properties of an `onMetaData` object: numbers, flags and strings are kept.
pub(crate) fn metadata_from_amf(v: &Amf0) -> Metadata {
    match v {
        Amf0::Object(p) | Amf0::EcmaArray(p) => p
            .iter()
            .filter_map(|(k, v)| {
                let v = match v {
                    Amf0::Number(n) => MetaValue::Number(*n),
                    Amf0::Boolean(b) => MetaValue::Bool(*b),
                    Amf0::String(s) => MetaValue::Text(s.clone()),
                    _ => return None,
                };
                Some((k.clone(), v))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The `onMetaData` script body for `metadata` (what players read first).
pub(crate) fn on_metadata_body(metadata: &Metadata) -> BytesMut {
    let mut props: Vec<(String, Amf0)> = metadata
        .iter()
        .map(|(k, v)| {
            let v = match v {
                MetaValue::Number(n) => Amf0::Number(*n),
                MetaValue::Bool(b) => Amf0::Boolean(*b),
                MetaValue::Text(s) => Amf0::String(s.clone()),
            };
            (k.clone(), v)
        })
        .collect();
    if !props.iter().any(|(k, _)| k == "server") {
        props.push((
            "server".into(),
            Amf0::String(concat!("castnode ", env!("CARGO_PKG_VERSION")).into()),
        ));
    }
    super::amf0::encode_all(&[Amf0::String("onMetaData".into()), Amf0::EcmaArray(props)])
}

/// The 13 bytes that open an FLV stream: the file header and PreviousTagSize0.
pub(crate) fn file_header(audio: bool, video: bool) -> [u8; 13] {
    let flags = u8::from(audio) << 2 | u8::from(video);
    [b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0]
}

/// Appends one FLV tag (header, body parts, PreviousTagSize) to `out`.
pub(crate) fn put_tag(out: &mut BytesMut, tag_type: u8, ts_ms: u32, body: &[&[u8]]) {
    let len: usize = body.iter().map(|b| b.len()).sum();
    out.reserve(len + 15);
    out.put_u8(tag_type);
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_slice(&(ts_ms & 0xFF_FFFF).to_be_bytes()[1..]);
    out.put_u8((ts_ms >> 24) as u8);
    out.put_slice(&[0, 0, 0]);
    for b in body {
        out.put_slice(b);
    }
    out.put_u32(len as u32 + 11);
}

/// Reads tags from an FLV file or stream held in memory.
pub struct FlvReader {
    data: Bytes,
    pos: usize,
}

/// One tag read by [`FlvReader`].
#[derive(Debug, Clone)]
pub struct RawTag {
    /// 8, 9 or 18.
    pub tag_type: u8,
    /// Timestamp in milliseconds.
    pub ts_ms: u32,
    /// The body.
    pub body: Bytes,
}

impl FlvReader {
    /// A reader over a whole FLV file; `None` without an FLV header.
    pub fn new(data: Bytes) -> Option<Self> {
        if data.len() < 13 || &data[..3] != b"FLV" {
            return None;
        }
        let header = u32::from_be_bytes([data[5], data[6], data[7], data[8]]) as usize;
        Some(Self {
            data,
            pos: header + 4,
        })
    }
}

impl Iterator for FlvReader {
    type Item = RawTag;

    fn next(&mut self) -> Option<RawTag> {
        let h = self.data.get(self.pos..self.pos + 11)?;
        let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts_ms = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let tag_type = h[0] & 0x1f;
        let start = self.pos + 11;
        let body = self.data.get(start..start + len)?;
        let body = self.data.slice_ref(body);
        self.pos = start + len + 4;
        Some(RawTag {
            tag_type,
            ts_ms,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsers_never_panic(body in prop::collection::vec(any::<u8>(), 0..64), ts in any::<u32>()) {
            let body = Bytes::from(body);
            let _ = parse_video(ts, &body);
            let _ = parse_audio(ts, &body);
        }
    }

    #[test]
    fn avc_frame_round_trip() {
        let body = Bytes::from_static(&[0x27, 1, 0, 0, 66, 0, 0, 0, 2, 0xAA, 0xBB]);
        let Tag::Frame(codec, f) = parse_video(1000, &body).unwrap() else {
            panic!()
        };
        assert_eq!(
            (codec, f.dts, f.pts, f.keyframe),
            (Codec::H264, 1_000_000, 1_066_000, false)
        );
        let mut out = BytesMut::new();
        frame_header(codec, &f, &mut out);
        out.extend_from_slice(&f.payload);
        assert_eq!(out.freeze(), body);
    }

    #[test]
    fn negative_cts() {
        let body = Bytes::from_static(&[0x27, 1, 0xFF, 0xFF, 0xFF, 1]);
        let Tag::Frame(_, f) = parse_video(1000, &body).unwrap() else {
            panic!()
        };
        assert_eq!(f.pts, 999_000);
    }

    #[test]
    fn enhanced_hevc_round_trip() {
        let seq = Bytes::from_static(&[0x90, b'h', b'v', b'c', b'1', 1, 2, 3]);
        let Tag::Config(info) = parse_video(0, &seq).unwrap() else {
            panic!()
        };
        assert_eq!(
            (info.codec, info.config.as_deref().unwrap()),
            (Codec::H265, &[1u8, 2, 3][..])
        );
        let coded = Bytes::from_static(&[0x91, b'h', b'v', b'c', b'1', 0, 0, 33, 0, 0, 0, 1, 0x26]);
        let Tag::Frame(codec, f) = parse_video(100, &coded).unwrap() else {
            panic!()
        };
        assert_eq!(
            (codec, f.keyframe, f.pts - f.dts),
            (Codec::H265, true, 33_000)
        );
        let mut out = BytesMut::new();
        frame_header(codec, &f, &mut out);
        out.extend_from_slice(&f.payload);
        assert_eq!(out.freeze(), coded);
        let av1 = Bytes::from_static(&[0xA3, b'a', b'v', b'0', b'1', 0x12, 0]);
        let Tag::Frame(codec, f) = parse_video(0, &av1).unwrap() else {
            panic!()
        };
        assert_eq!(
            (codec, f.keyframe, &f.payload[..]),
            (Codec::Av1, false, &[0x12u8, 0][..])
        );
    }

    #[test]
    fn aac_config_and_frame() {
        let Tag::Config(info) =
            parse_audio(0, &Bytes::from_static(&[0xAF, 0, 0x11, 0x90])).unwrap()
        else {
            panic!()
        };
        assert_eq!(info.audio.unwrap().sample_rate, 48000);
        assert!(matches!(
            parse_audio(0, &Bytes::from_static(&[0xAF])),
            Err(FlvError::Truncated(_))
        ));
        assert_eq!(
            parse_audio(0, &Bytes::from_static(&[0x2F, 1])).unwrap(),
            Tag::Ignored("unsupported audio codec")
        );
    }

    #[test]
    fn tag_writer_and_reader_agree() {
        let mut out = BytesMut::from(&file_header(true, true)[..]);
        put_tag(&mut out, TAG_VIDEO, 0x0123_4567, &[b"ab", b"c"]);
        let tags: Vec<_> = FlvReader::new(out.freeze()).unwrap().collect();
        assert_eq!(
            (tags[0].tag_type, tags[0].ts_ms, &tags[0].body[..]),
            (TAG_VIDEO, 0x0123_4567, &b"abc"[..])
        );
    }
}
