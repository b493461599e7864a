//! Encoders for the RTMP messages both sides send: protocol control, user control and AMF0
//! commands. All are written with full (type 0) chunk headers.

use bytes::{BufMut, BytesMut};

use super::amf0::{self, Amf0};
use super::chunk::encode_message;

/// Chunk size castnode sends with (announced right after `connect`).
pub(crate) const OUT_CHUNK_SIZE: usize = 4096;

/// Chunk stream of protocol control messages.
pub(crate) const CSID_CONTROL: u32 = 2;
/// Chunk stream of commands on stream 0.
pub(crate) const CSID_COMMAND: u32 = 3;
/// Chunk stream of audio.
pub(crate) const CSID_AUDIO: u32 = 4;
/// Chunk stream of stream-level commands and data (onStatus, onMetaData).
pub(crate) const CSID_DATA: u32 = 5;
/// Chunk stream of video.
pub(crate) const CSID_VIDEO: u32 = 6;

/// Message type ids.
pub(crate) mod kind {
    /// Set Chunk Size.
    pub(crate) const SET_CHUNK_SIZE: u8 = 1;
    /// Abort.
    pub(crate) const ABORT: u8 = 2;
    /// Acknowledgement.
    pub(crate) const ACK: u8 = 3;
    /// User control.
    pub(crate) const USER_CONTROL: u8 = 4;
    /// Window Acknowledgement Size.
    pub(crate) const WINDOW_ACK_SIZE: u8 = 5;
    /// Set Peer Bandwidth.
    pub(crate) const SET_PEER_BANDWIDTH: u8 = 6;
    /// Audio.
    pub(crate) const AUDIO: u8 = 8;
    /// Video.
    pub(crate) const VIDEO: u8 = 9;
    /// AMF3 data.
    pub(crate) const DATA_AMF3: u8 = 15;
    /// AMF3 command.
    pub(crate) const COMMAND_AMF3: u8 = 17;
    /// AMF0 data.
    pub(crate) const DATA_AMF0: u8 = 18;
    /// AMF0 command.
    pub(crate) const COMMAND_AMF0: u8 = 20;
}

/// Appends a protocol control message with a 4-byte value.
pub(crate) fn control(out: &mut BytesMut, type_id: u8, value: u32) {
    encode_message(
        out,
        CSID_CONTROL,
        0,
        type_id,
        0,
        &[&value.to_be_bytes()],
        OUT_CHUNK_SIZE,
    );
}

/// Appends Set Peer Bandwidth (dynamic limit).
pub(crate) fn set_peer_bandwidth(out: &mut BytesMut, window: u32) {
    let mut b = [2u8; 5];
    b[..4].copy_from_slice(&window.to_be_bytes());
    encode_message(
        out,
        CSID_CONTROL,
        0,
        kind::SET_PEER_BANDWIDTH,
        0,
        &[&b],
        OUT_CHUNK_SIZE,
    );
}

/// Appends a user control event (0 StreamBegin, 1 StreamEOF, 3 SetBufferLength, 6/7 ping).
pub(crate) fn user_control(out: &mut BytesMut, event: u16, data: &[u8]) {
    let mut b = BytesMut::with_capacity(2 + data.len());
    b.put_u16(event);
    b.put_slice(data);
    encode_message(
        out,
        CSID_CONTROL,
        0,
        kind::USER_CONTROL,
        0,
        &[&b],
        OUT_CHUNK_SIZE,
    );
}

/// Appends an AMF0 command or data message.
pub(crate) fn amf(out: &mut BytesMut, csid: u32, type_id: u8, stream_id: u32, values: &[Amf0]) {
    let body = amf0::encode_all(values);
    encode_message(out, csid, 0, type_id, stream_id, &[&body], OUT_CHUNK_SIZE);
}

/// An AMF0 object from string keys.
pub(crate) fn object(props: &[(&str, Amf0)]) -> Amf0 {
    Amf0::Object(
        props
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

/// Appends an `onStatus` on `stream_id`.
pub(crate) fn on_status(
    out: &mut BytesMut,
    stream_id: u32,
    level: &str,
    code: &str,
    description: &str,
) {
    let info = object(&[
        ("level", Amf0::String(level.into())),
        ("code", Amf0::String(code.into())),
        ("description", Amf0::String(description.into())),
    ]);
    amf(
        out,
        CSID_DATA,
        kind::COMMAND_AMF0,
        stream_id,
        &[
            Amf0::String("onStatus".into()),
            Amf0::Number(0.0),
            Amf0::Null,
            info,
        ],
    );
}
