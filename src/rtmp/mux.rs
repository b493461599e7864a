//! Media items → the bytes players receive, computed once per item and shared by every player
//! (through the hub's memo slots, [`MemoSlot::Rtmp`] and [`MemoSlot::Flv`]): RTMP messages
//! already cut into chunks, and FLV tags.
//!
//! Every media message is written with a full (type 0) chunk header, an absolute timestamp and
//! message stream 1, so the bytes do not depend on the player.

use bytes::{Bytes, BytesMut};

use crate::media::{Codec, Entry, Item, MemoSlot, Metadata, TrackId, TrackInfo, feed::Muxer};

use super::chunk::encode_message;
use super::flv;
use super::message::{CSID_AUDIO, CSID_DATA, CSID_VIDEO, OUT_CHUNK_SIZE, kind};

/// Message stream that playing clients get from `createStream`.
pub(crate) const PLAY_STREAM_ID: u32 = 1;

fn ms(us: i64) -> u32 {
    (us.max(0) / 1000) as u32
}

/// Encodes an entry of a track described by `info` as one chunked RTMP message or one FLV tag;
/// empty for a config without bytes.
fn encode(entry: &Entry, info: &TrackInfo, rtmp: bool) -> Bytes {
    if info.codec == Codec::Opus {
        // Legacy FLV cannot carry Opus (a WebRTC rendition or a WHIP source's audio).
        return Bytes::new();
    }
    let mut header = BytesMut::with_capacity(8);
    let (payload, ts) = match &entry.item {
        Item::Frame { frame, .. } => {
            flv::frame_header(info.codec, frame, &mut header);
            (frame.payload.clone(), ms(frame.dts))
        }
        Item::Config { info, .. } => {
            let Some(config) = info.config.clone() else {
                return Bytes::new();
            };
            flv::config_header(info.codec, &mut header);
            (config, ms(entry.dts))
        }
    };
    let tag_type = flv::tag_type(info.codec);
    let mut out = BytesMut::new();
    if rtmp {
        let csid = if tag_type == flv::TAG_AUDIO {
            CSID_AUDIO
        } else {
            CSID_VIDEO
        };
        encode_message(
            &mut out,
            csid,
            ts,
            tag_type,
            PLAY_STREAM_ID,
            &[&header, &payload],
            OUT_CHUNK_SIZE,
        );
    } else {
        flv::put_tag(&mut out, tag_type, ts, &[&header, &payload]);
    }
    out.freeze()
}

/// Encodes media for RTMP players (chunked messages on stream 1).
pub struct RtmpMuxer;
/// Encodes media for HTTP-FLV players (an FLV stream).
pub(crate) struct FlvMuxer;

fn prelude(rtmp: bool, tracks: &[(TrackId, TrackInfo)], metadata: &Metadata, out: &mut Vec<Bytes>) {
    let mut b = BytesMut::new();
    if !rtmp {
        let has = |k| tracks.iter().any(|(_, t)| t.codec.kind() == k);
        b.extend_from_slice(&flv::file_header(
            has(crate::media::TrackKind::Audio),
            has(crate::media::TrackKind::Video),
        ));
    }
    let meta = flv::on_metadata_body(metadata);
    if rtmp {
        encode_message(
            &mut b,
            CSID_DATA,
            0,
            kind::DATA_AMF0,
            PLAY_STREAM_ID,
            &[&meta],
            OUT_CHUNK_SIZE,
        );
    } else {
        flv::put_tag(&mut b, flv::TAG_SCRIPT, 0, &[&meta]);
    }
    out.push(b.freeze());
}

impl Muxer for RtmpMuxer {
    fn prelude(&self, tracks: &[(TrackId, TrackInfo)], metadata: &Metadata, out: &mut Vec<Bytes>) {
        prelude(true, tracks, metadata, out);
    }

    fn entry(&self, entry: &Entry, info: &TrackInfo) -> Option<Bytes> {
        let b = entry.memo(MemoSlot::Rtmp, |_| encode(entry, info, true));
        (!b.is_empty()).then(|| b.clone())
    }

    fn carries(&self, codec: Codec) -> bool {
        codec != Codec::Opus
    }
}

impl Muxer for FlvMuxer {
    fn prelude(&self, tracks: &[(TrackId, TrackInfo)], metadata: &Metadata, out: &mut Vec<Bytes>) {
        prelude(false, tracks, metadata, out);
    }

    fn entry(&self, entry: &Entry, info: &TrackInfo) -> Option<Bytes> {
        let b = entry.memo(MemoSlot::Flv, |_| encode(entry, info, false));
        (!b.is_empty()).then(|| b.clone())
    }

    fn carries(&self, codec: Codec) -> bool {
        codec != Codec::Opus
    }
}
