//! The server side of an RTMP connection, sans-IO: bytes and time in; bytes to send, events and a
//! deadline out.
//!
//! Guarantees: any input either advances the session or yields an [`RtmpError`] after which the
//! driver closes this connection only; no input panics. Replies that OBS and ffmpeg wait for are
//! sent (OBS sends no media before `NetStream.Publish.Start`). The handshake must finish before
//! the deadline given at creation.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::RtmpError;
use super::amf0::{self, Amf0};
use super::chunk::{ChunkDecoder, ChunkError, Message};
use super::handshake;
use super::message::{self as msg, OUT_CHUNK_SIZE, kind};

/// What the session learned that the driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// The client sent `connect` for `app`.
    Connected {
        /// Application name (the first path segment of the URL).
        app: String,
    },
    /// The client asks to publish `app/key` on `stream_id`; answer with
    /// [`ServerConn::accept_publish`] or [`ServerConn::reject_publish`].
    PublishRequested {
        /// Message stream.
        stream_id: u32,
        /// Application.
        app: String,
        /// Stream key (without query string).
        key: String,
        /// What followed the key after `?` (empty when nothing did).
        query: String,
    },
    /// The client asks to play `app/key`; answer with [`ServerConn::accept_play`] or
    /// [`ServerConn::reject_play`].
    PlayRequested {
        /// Message stream.
        stream_id: u32,
        /// Application.
        app: String,
        /// Stream key (without query string).
        key: String,
        /// What followed the key after `?` (`rendition=360p`; empty when nothing did).
        query: String,
    },
    /// `@setDataFrame onMetaData` from a publisher.
    Metadata(Amf0),
    /// An audio or video message from a publisher.
    Media {
        /// 8 audio, 9 video.
        type_id: u8,
        /// Milliseconds.
        timestamp: u32,
        /// FLV tag body.
        body: Bytes,
    },
    /// The client ended its stream (FCUnpublish, deleteStream or closeStream).
    StreamClosed,
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Waiting for C0+C1.
    Hello,
    /// Waiting for C2.
    Ack,
    /// Chunk stream.
    Chunks,
}

/// Limits of one connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    /// Largest message accepted.
    pub(crate) max_message: usize,
}

/// A server-side RTMP session.
pub(crate) struct ServerConn {
    phase: Phase,
    inbuf: BytesMut,
    decoder: ChunkDecoder,
    out: BytesMut,
    events: VecDeque<Event>,
    app: Option<String>,
    next_stream_id: u32,
    publishing: Option<u32>,
    received: u64,
    acked: u64,
    ack_window: u32,
    deadline: Option<Instant>,
    seed: u64,
}

impl ServerConn {
    /// A session whose handshake must finish by `handshake_deadline`. `seed` varies the filler
    /// of S1.
    pub(crate) fn new(cfg: &ConnConfig, handshake_deadline: Instant, seed: u64) -> Self {
        Self {
            phase: Phase::Hello,
            inbuf: BytesMut::new(),
            decoder: ChunkDecoder::new(cfg.max_message),
            out: BytesMut::new(),
            events: VecDeque::new(),
            app: None,
            next_stream_id: 1,
            publishing: None,
            received: 0,
            acked: 0,
            ack_window: 0,
            deadline: Some(handshake_deadline),
            seed,
        }
    }

    /// When [`ServerConn::handle_timeout`] must be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Fails the session when the handshake has not finished by its deadline.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Result<(), RtmpError> {
        match self.deadline {
            Some(d) if now >= d => Err(RtmpError::HandshakeTimeout),
            _ => Ok(()),
        }
    }

    /// Bytes to send to the peer, if any.
    pub(crate) fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next event, if any.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Gives back buffer capacity the session no longer needs (a player's session receives
    /// little after `play`).
    pub(crate) fn shrink(&mut self) {
        if self.inbuf.is_empty() {
            self.inbuf = BytesMut::new();
        }
        if self.out.is_empty() {
            self.out = BytesMut::new();
        }
        self.events.shrink_to_fit();
    }

    /// Feeds bytes received from the peer.
    pub(crate) fn handle_input(&mut self, data: &[u8]) -> Result<(), RtmpError> {
        self.inbuf.extend_from_slice(data);
        self.received += data.len() as u64;
        if self.phase == Phase::Hello {
            let Some(&version) = self.inbuf.first() else {
                return Ok(());
            };
            if version != handshake::VERSION {
                return Err(RtmpError::BadHandshake(version));
            }
            if self.inbuf.len() < 1 + handshake::PACKET {
                return Ok(());
            }
            let c1 = self.inbuf.split_to(1 + handshake::PACKET);
            self.out.extend_from_slice(&[handshake::VERSION]);
            self.out.extend_from_slice(&handshake::packet(0, self.seed));
            self.out.extend_from_slice(&c1[1..]);
            self.phase = Phase::Ack;
        }
        if self.phase == Phase::Ack {
            if self.inbuf.len() < handshake::PACKET {
                return Ok(());
            }
            let _c2 = self.inbuf.split_to(handshake::PACKET);
            self.phase = Phase::Chunks;
            self.deadline = None;
        }
        while let Some(m) = self.decoder.decode(&mut self.inbuf)? {
            self.handle_message(m)?;
        }
        if self.ack_window > 0 && self.received - self.acked >= u64::from(self.ack_window) {
            self.acked = self.received;
            msg::control(&mut self.out, kind::ACK, self.received as u32);
        }
        Ok(())
    }

    fn handle_message(&mut self, m: Message) -> Result<(), RtmpError> {
        let p = &m.payload;
        let u32_at = |i: usize| -> Result<u32, RtmpError> {
            p.get(i..i + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(RtmpError::BadMessage("control message too short"))
        };
        match m.type_id {
            kind::SET_CHUNK_SIZE => self.decoder.set_chunk_size(u32_at(0)?)?,
            kind::WINDOW_ACK_SIZE => self.ack_window = u32_at(0)?,
            kind::ABORT | kind::ACK | kind::SET_PEER_BANDWIDTH => {}
            kind::USER_CONTROL if p.len() >= 6 && p[..2] == [0, 6] => {
                // Ping request → ping response with the same timestamp.
                msg::user_control(&mut self.out, 7, &p[2..6]);
            }
            kind::AUDIO | kind::VIDEO if self.publishing == Some(m.stream_id) && !p.is_empty() => {
                self.events.push_back(Event::Media {
                    type_id: m.type_id,
                    timestamp: m.timestamp,
                    body: m.payload,
                });
            }
            kind::DATA_AMF0 | kind::DATA_AMF3 => {
                let body = if m.type_id == kind::DATA_AMF3 {
                    p.get(1..).unwrap_or_default()
                } else {
                    &p[..]
                };
                let values = amf0::decode_all(body)?;
                let mut it = values
                    .into_iter()
                    .skip_while(|v| v.as_str() == Some("@setDataFrame"));
                if it.next().as_ref().and_then(Amf0::as_str) == Some("onMetaData")
                    && let Some(meta) = it.next()
                {
                    self.events.push_back(Event::Metadata(meta));
                }
            }
            kind::COMMAND_AMF0 | kind::COMMAND_AMF3 => {
                let body = if m.type_id == kind::COMMAND_AMF3 {
                    p.get(1..).unwrap_or_default()
                } else {
                    &p[..]
                };
                let values = amf0::decode_all(body)?;
                self.handle_command(m.stream_id, values)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn result(&mut self, txid: f64, values: Vec<Amf0>) {
        let mut v = vec![Amf0::String("_result".into()), Amf0::Number(txid)];
        v.extend(values);
        msg::amf(&mut self.out, msg::CSID_COMMAND, kind::COMMAND_AMF0, 0, &v);
    }

    fn handle_command(&mut self, stream_id: u32, values: Vec<Amf0>) -> Result<(), RtmpError> {
        let name = values
            .first()
            .and_then(Amf0::as_str)
            .ok_or(RtmpError::BadMessage("command without a name"))?;
        let txid = values.get(1).and_then(Amf0::as_f64).unwrap_or(0.0);
        let arg = |i: usize| {
            values
                .get(i)
                .and_then(Amf0::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        match name {
            "connect" => {
                let app = values
                    .get(2)
                    .and_then(|o| o.get("app"))
                    .and_then(Amf0::as_str)
                    .unwrap_or_default()
                    .trim_matches('/')
                    .to_owned();
                msg::control(&mut self.out, kind::WINDOW_ACK_SIZE, 2_500_000);
                msg::set_peer_bandwidth(&mut self.out, 2_500_000);
                msg::control(&mut self.out, kind::SET_CHUNK_SIZE, OUT_CHUNK_SIZE as u32);
                let props = msg::object(&[
                    ("fmsVer", Amf0::String("FMS/3,0,1,123".into())),
                    ("capabilities", Amf0::Number(31.0)),
                ]);
                let info = msg::object(&[
                    ("level", Amf0::String("status".into())),
                    ("code", Amf0::String("NetConnection.Connect.Success".into())),
                    ("description", Amf0::String("Connection succeeded.".into())),
                    ("objectEncoding", Amf0::Number(0.0)),
                ]);
                self.result(txid, vec![props, info]);
                self.app = Some(app.clone());
                self.events.push_back(Event::Connected { app });
            }
            "createStream" => {
                let id = self.next_stream_id;
                self.next_stream_id = self.next_stream_id.saturating_add(1).min(1000);
                self.result(txid, vec![Amf0::Null, Amf0::Number(f64::from(id))]);
            }
            "publish" | "play" => {
                let app = self
                    .app
                    .clone()
                    .ok_or(RtmpError::BadMessage("publish or play before connect"))?;
                let full = arg(3);
                let (key, query) = full.split_once('?').unwrap_or((full.as_str(), ""));
                let (key, query) = (key.to_owned(), query.to_owned());
                if !crate::media::valid_name(&key) {
                    let (code, what) = if name == "publish" {
                        ("NetStream.Publish.BadName", "publish")
                    } else {
                        ("NetStream.Play.StreamNotFound", "play")
                    };
                    msg::on_status(
                        &mut self.out,
                        stream_id,
                        "error",
                        code,
                        "Invalid stream key.",
                    );
                    return Err(RtmpError::BadMessage(if what == "publish" {
                        "publish with an invalid stream key"
                    } else {
                        "play with an invalid stream key"
                    }));
                }
                self.events.push_back(if name == "publish" {
                    Event::PublishRequested {
                        stream_id,
                        app,
                        key,
                        query,
                    }
                } else {
                    Event::PlayRequested {
                        stream_id,
                        app,
                        key,
                        query,
                    }
                });
            }
            "FCUnpublish" | "deleteStream" | "closeStream" => {
                if txid != 0.0 && name == "FCUnpublish" {
                    self.result(txid, vec![Amf0::Null, Amf0::Undefined]);
                }
                self.publishing = None;
                self.events.push_back(Event::StreamClosed);
            }
            "releaseStream" | "FCPublish" | "FCSubscribe" | "_checkbw" => {
                if txid != 0.0 {
                    self.result(txid, vec![Amf0::Null, Amf0::Undefined]);
                }
            }
            "getStreamLength" => {
                if txid != 0.0 {
                    self.result(txid, vec![Amf0::Null, Amf0::Number(0.0)]);
                }
            }
            _ => tracing::debug!(command = name, "ignoring unknown RTMP command"),
        }
        Ok(())
    }

    /// Accepts a publish request: the client may now send media.
    pub(crate) fn accept_publish(&mut self, stream_id: u32) {
        self.publishing = Some(stream_id);
        msg::user_control(&mut self.out, 0, &stream_id.to_be_bytes());
        msg::on_status(
            &mut self.out,
            stream_id,
            "status",
            "NetStream.Publish.Start",
            "Publishing.",
        );
    }

    /// Refuses a publish request with `NetStream.Publish.BadName`.
    pub(crate) fn reject_publish(&mut self, stream_id: u32, description: &str) {
        msg::on_status(
            &mut self.out,
            stream_id,
            "error",
            "NetStream.Publish.BadName",
            description,
        );
    }

    /// Accepts a play request; the driver sends metadata and media next.
    pub(crate) fn accept_play(&mut self, stream_id: u32) {
        msg::user_control(&mut self.out, 0, &stream_id.to_be_bytes());
        msg::on_status(
            &mut self.out,
            stream_id,
            "status",
            "NetStream.Play.Reset",
            "Playing and resetting.",
        );
        msg::on_status(
            &mut self.out,
            stream_id,
            "status",
            "NetStream.Play.Start",
            "Started playing.",
        );
        msg::amf(
            &mut self.out,
            msg::CSID_DATA,
            kind::DATA_AMF0,
            stream_id,
            &[
                Amf0::String("|RtmpSampleAccess".into()),
                Amf0::Boolean(true),
                Amf0::Boolean(true),
            ],
        );
    }

    /// Refuses a play request with `NetStream.Play.StreamNotFound`.
    pub(crate) fn reject_play(&mut self, stream_id: u32, description: &str) {
        msg::on_status(
            &mut self.out,
            stream_id,
            "error",
            "NetStream.Play.StreamNotFound",
            description,
        );
    }

    /// Tells a player its stream ended (StreamEOF + `NetStream.Play.UnpublishNotify`).
    pub(crate) fn end_play(&mut self, stream_id: u32) {
        msg::user_control(&mut self.out, 1, &stream_id.to_be_bytes());
        msg::on_status(
            &mut self.out,
            stream_id,
            "status",
            "NetStream.Play.UnpublishNotify",
            "Stream ended.",
        );
    }
}

impl From<ChunkError> for RtmpError {
    fn from(e: ChunkError) -> Self {
        RtmpError::Chunk(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtmp::client::{ClientConn, ClientEvent, Mode};
    use std::time::Duration;

    fn pump(server: &mut ServerConn, client: &mut ClientConn) -> (Vec<Event>, Vec<ClientEvent>) {
        let (mut se, mut ce) = (vec![], vec![]);
        for _ in 0..20 {
            let mut moved = false;
            while let Some(b) = client.poll_transmit() {
                server.handle_input(&b).unwrap();
                moved = true;
            }
            while let Some(e) = server.poll_event() {
                match &e {
                    Event::PublishRequested { stream_id, .. } => server.accept_publish(*stream_id),
                    Event::PlayRequested { stream_id, .. } => server.accept_play(*stream_id),
                    _ => {}
                }
                se.push(e);
            }
            while let Some(b) = server.poll_transmit() {
                client.handle_input(&b).unwrap();
                moved = true;
            }
            while let Some(e) = client.poll_event() {
                ce.push(e);
            }
            if !moved {
                break;
            }
        }
        (se, ce)
    }

    fn server() -> ServerConn {
        ServerConn::new(
            &ConnConfig {
                max_message: 1 << 20,
            },
            Instant::now() + Duration::from_secs(10),
            7,
        )
    }

    #[test]
    fn publish_session_with_our_client() {
        let mut s = server();
        let mut c = ClientConn::new("live", "rtmp://x/live", Mode::Publish("key".into()), 1);
        let (se, ce) = pump(&mut s, &mut c);
        assert!(se.contains(&Event::PublishRequested {
            query: String::new(),
            stream_id: 1,
            app: "live".into(),
            key: "key".into()
        }));
        assert!(ce.contains(&ClientEvent::Ready));
        c.send_media(9, 40, &[&[0x17, 0, 0, 0, 0, 1]]);
        let (se, _) = pump(&mut s, &mut c);
        assert_eq!(
            se,
            vec![Event::Media {
                type_id: 9,
                timestamp: 40,
                body: Bytes::from_static(&[0x17, 0, 0, 0, 0, 1])
            }]
        );
        assert!(s.poll_timeout().is_none());
    }

    #[test]
    fn play_session_with_our_client() {
        let mut s = server();
        let mut c = ClientConn::new("live", "rtmp://x/live", Mode::Play("key".into()), 1);
        let (se, ce) = pump(&mut s, &mut c);
        assert!(matches!(se.last(), Some(Event::PlayRequested { .. })));
        assert!(ce.contains(&ClientEvent::Ready));
    }

    #[test]
    fn bad_handshake_and_timeout() {
        let mut s = server();
        assert_eq!(
            s.handle_input(b"GET / HTTP/1.1\r\n"),
            Err(RtmpError::BadHandshake(b'G'))
        );
        let mut s = server();
        s.handle_input(&[3; 100]).unwrap();
        assert_eq!(
            s.handle_timeout(Instant::now() + Duration::from_secs(11)),
            Err(RtmpError::HandshakeTimeout)
        );
    }

    #[test]
    fn truncated_amf_is_an_error() {
        let mut s = server();
        let mut hello = vec![3u8];
        hello.extend(vec![0u8; 1536 * 2]);
        s.handle_input(&hello).unwrap();
        let mut out = BytesMut::new();
        crate::rtmp::chunk::encode_message(&mut out, 3, 0, 20, 0, &[&[2, 0, 9, b'c']], 128);
        assert!(matches!(s.handle_input(&out), Err(RtmpError::Amf(_))));
    }

    #[test]
    fn keys() {
        assert!(crate::media::valid_name("abc-1_2"));
        assert!(!crate::media::valid_name(""));
        assert!(!crate::media::valid_name("../x"));
        assert!(!crate::media::valid_name("a b"));
    }
}
