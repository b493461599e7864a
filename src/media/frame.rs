//! The media model: tracks, frames and metadata.
//!
//! A broadcast carries tracks (one per kind and rendition); a track carries frames in decode
//! order. Payloads are codec-native: H.264/H.265 as length-prefixed NAL units (AVCC/HVCC), AAC as
//! raw access units with the AudioSpecificConfig as the track's config. Times are microseconds on
//! the broadcast's own timeline.

use std::sync::Arc;

use bytes::Bytes;

/// Index of a track inside its broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u8);

impl TrackId {
    /// Tracks 0 and 1 are the broadcast's own (what its publisher sent); higher ids are
    /// renditions.
    pub(crate) const SOURCE_TRACKS: u8 = 2;
    /// Tracks below this travel with the broadcast from node to node: the source's, then the
    /// renditions of its ABR ladder (named: [`TrackInfo::rendition`]; a transcoder makes them
    /// once for the whole cluster). Ids from here on are renditions a node makes for its own
    /// viewers (Opus, AAC, B-frame-free video), which never leave it.
    pub const SHARED_TRACKS: u8 = 10;

    /// Whether this is one of the broadcast's own tracks, not a rendition.
    pub(crate) const fn is_source(self) -> bool {
        self.0 < Self::SOURCE_TRACKS
    }

    /// Whether this track travels with the broadcast (the source's, or a ladder's rung).
    pub const fn travels(self) -> bool {
        self.0 < Self::SHARED_TRACKS
    }

    /// Whether this id is a ladder rung's.
    pub const fn is_ladder(self) -> bool {
        self.0 >= Self::SOURCE_TRACKS && self.0 < Self::SHARED_TRACKS
    }
}

/// What a track carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackKind {
    /// Pictures.
    Video,
    /// Sound.
    Audio,
}

/// The codecs castnode understands well enough to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// H.264 / AVC; config is an AVCDecoderConfigurationRecord.
    H264,
    /// H.265 / HEVC; config is an HEVCDecoderConfigurationRecord.
    H265,
    /// AV1; config is an AV1CodecConfigurationRecord.
    Av1,
    /// AAC; config is an AudioSpecificConfig.
    Aac,
    /// Opus.
    Opus,
}

impl Codec {
    /// Short lowercase name used in APIs and metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Codec::H264 => "h264",
            Codec::H265 => "h265",
            Codec::Av1 => "av1",
            Codec::Aac => "aac",
            Codec::Opus => "opus",
        }
    }

    /// Whether frames of this codec are pictures.
    pub(crate) fn kind(self) -> TrackKind {
        match self {
            Codec::H264 | Codec::H265 | Codec::Av1 => TrackKind::Video,
            Codec::Aac | Codec::Opus => TrackKind::Audio,
        }
    }
}

pub use crate::codec::{AudioInfo, VideoInfo};

/// A track's description: codec and the configuration a decoder needs first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackInfo {
    /// The codec.
    pub(crate) codec: Codec,
    /// Decoder configuration (codec specific), if the codec has one.
    pub(crate) config: Option<Bytes>,
    /// Set for video tracks whose config could be parsed.
    pub(crate) video: Option<VideoInfo>,
    /// Set for audio tracks whose config could be parsed.
    pub(crate) audio: Option<AudioInfo>,
    /// The ABR ladder rung this track is (`360p`: what `?rendition=` names), on ids
    /// [`TrackId::is_ladder`]; `None` for the source's tracks and a node's own renditions.
    pub rendition: Option<Arc<str>>,
}

impl TrackInfo {
    /// A track's description from its codec and config alone, the video/audio facts parsed from
    /// the config. Use it wherever a track is declared from received bytes, so every protocol
    /// derives the same facts. Opus is always 48 kHz; its channel count comes from an `OpusHead`
    /// config (RFC 7845 §5.1) when there is one, and is 2 otherwise (how WebRTC signals Opus).
    pub(crate) fn from_config(codec: Codec, config: Option<Bytes>) -> TrackInfo {
        let cfg = config.as_deref();
        let (video, audio) = match codec {
            Codec::H264 => (cfg.and_then(crate::codec::h264::parse_avcc), None),
            Codec::H265 | Codec::Av1 => (None, None),
            Codec::Aac => (None, cfg.and_then(crate::codec::aac::parse_asc)),
            Codec::Opus => {
                let channels = cfg
                    .filter(|c| c.len() >= 19 && c.starts_with(b"OpusHead"))
                    .map_or(2, |c| c[9]);
                let info = AudioInfo {
                    sample_rate: 48_000,
                    channels,
                };
                (None, Some(info))
            }
        };
        TrackInfo {
            codec,
            config,
            video,
            audio,
            rendition: None,
        }
    }
}

/// One access unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Presentation time in microseconds.
    pub pts: i64,
    /// Decode time in microseconds; frames of a track arrive in decode order.
    pub dts: i64,
    /// A random-access point (IDR for video; every audio frame).
    pub keyframe: bool,
    /// Codec-native payload, shared by every consumer.
    pub payload: Bytes,
}

/// A value of broadcast metadata (the publisher's description of its stream).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// A number.
    Number(f64),
    /// A flag.
    Bool(bool),
    /// Text.
    Text(String),
}

/// Publisher-supplied key/value metadata, in the order it was given.
pub type Metadata = Vec<(String, MetaValue)>;

/// What travels through the hub's log, in the publisher's order.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// A track's (new) decoder configuration; consumers pass it on before the track's next frame.
    Config {
        /// The track.
        track: TrackId,
        /// The track's description at this point.
        info: TrackInfo,
    },
    /// A frame of a track.
    Frame {
        /// The track.
        track: TrackId,
        /// The frame.
        frame: Frame,
    },
}
