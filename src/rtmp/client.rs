//! The client side of an RTMP connection, sans-IO: publishes or plays one stream. Used by the
//! load tool, by tests that need a publisher ffmpeg cannot imitate (enhanced RTMP), and later by
//! nodes that pull from RTMP sources.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::RtmpError;
use super::amf0::{self, Amf0};
use super::chunk::{ChunkDecoder, Message, encode_message};
use super::handshake;
use super::message::{self as msg, OUT_CHUNK_SIZE, kind};

/// What the client does once connected.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Publish under this key.
    Publish(String),
    /// Play this key.
    Play(String),
}

/// What the client learned.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Publishing or playing has started.
    Ready,
    /// The server refused (the status code).
    Refused(String),
    /// The stream ended (play).
    Ended,
    /// A media or data message (play). With a skimming client, audio/video bodies are empty and
    /// `length` says how long they were.
    Media {
        /// Message type: 8 audio, 9 video, 18 data.
        type_id: u8,
        /// Milliseconds.
        timestamp: u32,
        /// Body.
        body: Bytes,
        /// Body length.
        length: u32,
    },
}

#[derive(Debug, PartialEq)]
enum Phase {
    Hello,
    Chunks,
}

/// A client RTMP session.
pub struct ClientConn {
    mode: Mode,
    phase: Phase,
    inbuf: BytesMut,
    decoder: ChunkDecoder,
    out: BytesMut,
    events: VecDeque<ClientEvent>,
    app: String,
    tc_url: String,
    stream_id: u32,
    received: u64,
    acked: u64,
    ack_window: u32,
}

impl ClientConn {
    /// Starts a session (C0+C1 is queued at once).
    pub fn new(app: &str, tc_url: &str, mode: Mode, seed: u64) -> Self {
        Self::with_decoder(app, tc_url, mode, seed, ChunkDecoder::new(64 << 20))
    }

    /// Starts a playing session that counts media bytes without keeping them.
    pub fn skimming(app: &str, tc_url: &str, key: &str, seed: u64) -> Self {
        Self::with_decoder(
            app,
            tc_url,
            Mode::Play(key.into()),
            seed,
            ChunkDecoder::skimming(64 << 20),
        )
    }

    fn with_decoder(app: &str, tc_url: &str, mode: Mode, seed: u64, decoder: ChunkDecoder) -> Self {
        let mut out = BytesMut::new();
        out.extend_from_slice(&[handshake::VERSION]);
        out.extend_from_slice(&handshake::packet(0, seed));
        Self {
            mode,
            phase: Phase::Hello,
            inbuf: BytesMut::with_capacity(64 << 10),
            decoder,
            out,
            events: VecDeque::new(),
            app: app.into(),
            tc_url: tc_url.into(),
            stream_id: 0,
            received: 0,
            acked: 0,
            ack_window: 0,
        }
    }

    /// Bytes to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// A buffer to read into directly (saves a copy in load clients); call
    /// [`ClientConn::handle_buffered`] after filling it.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.inbuf
    }

    /// Feeds received bytes.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), RtmpError> {
        self.inbuf.extend_from_slice(data);
        self.handle_buffered(data.len())
    }

    /// Processes `n` bytes already appended to [`ClientConn::input_buffer`].
    pub fn handle_buffered(&mut self, n: usize) -> Result<(), RtmpError> {
        self.received += n as u64;
        if self.phase == Phase::Hello {
            if self.inbuf.len() < 1 + 2 * handshake::PACKET {
                return Ok(());
            }
            let s = self.inbuf.split_to(1 + 2 * handshake::PACKET);
            if s[0] != handshake::VERSION {
                return Err(RtmpError::BadHandshake(s[0]));
            }
            self.out.extend_from_slice(&s[1..1 + handshake::PACKET]);
            self.phase = Phase::Chunks;
            msg::control(&mut self.out, kind::SET_CHUNK_SIZE, OUT_CHUNK_SIZE as u32);
            let cmd = msg::object(&[
                ("app", Amf0::String(self.app.clone())),
                ("type", Amf0::String("nonprivate".into())),
                (
                    "flashVer",
                    Amf0::String("FMLE/3.0 (compatible; castnode)".into()),
                ),
                ("tcUrl", Amf0::String(self.tc_url.clone())),
            ]);
            self.command(0, &[Amf0::String("connect".into()), Amf0::Number(1.0), cmd]);
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

    fn command(&mut self, stream_id: u32, values: &[Amf0]) {
        let csid = if stream_id == 0 {
            msg::CSID_COMMAND
        } else {
            msg::CSID_DATA
        };
        msg::amf(&mut self.out, csid, kind::COMMAND_AMF0, stream_id, values);
    }

    fn handle_message(&mut self, m: Message) -> Result<(), RtmpError> {
        match m.type_id {
            kind::SET_CHUNK_SIZE => {
                let b = m
                    .payload
                    .get(..4)
                    .ok_or(RtmpError::BadMessage("short Set Chunk Size"))?;
                self.decoder
                    .set_chunk_size(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
            }
            kind::WINDOW_ACK_SIZE => {
                if let Some(b) = m.payload.get(..4) {
                    self.ack_window = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            kind::USER_CONTROL if m.payload.len() >= 6 && m.payload[..2] == [0, 6] => {
                // Ping request → ping response with the same timestamp.
                msg::user_control(&mut self.out, 7, &m.payload[2..6]);
            }
            kind::AUDIO | kind::VIDEO | kind::DATA_AMF0 => {
                self.events.push_back(ClientEvent::Media {
                    type_id: m.type_id,
                    timestamp: m.timestamp,
                    length: m.length,
                    body: m.payload,
                });
            }
            kind::COMMAND_AMF0 => {
                let values = amf0::decode_all(&m.payload)?;
                self.handle_command(&values);
            }
            _ => {}
        }
        Ok(())
    }

    fn handle_command(&mut self, values: &[Amf0]) {
        let name = values.first().and_then(Amf0::as_str).unwrap_or_default();
        let txid = values.get(1).and_then(Amf0::as_f64).unwrap_or(0.0);
        match (name, txid as u32) {
            ("_result", 1) => {
                if let Mode::Publish(key) = &self.mode {
                    let key = Amf0::String(key.clone());
                    self.command(
                        0,
                        &[
                            Amf0::String("releaseStream".into()),
                            Amf0::Number(2.0),
                            Amf0::Null,
                            key.clone(),
                        ],
                    );
                    self.command(
                        0,
                        &[
                            Amf0::String("FCPublish".into()),
                            Amf0::Number(3.0),
                            Amf0::Null,
                            key,
                        ],
                    );
                }
                self.command(
                    0,
                    &[
                        Amf0::String("createStream".into()),
                        Amf0::Number(4.0),
                        Amf0::Null,
                    ],
                );
            }
            ("_result", 4) => {
                self.stream_id = values.get(3).and_then(Amf0::as_f64).unwrap_or(1.0) as u32;
                let sid = self.stream_id;
                match self.mode.clone() {
                    Mode::Publish(key) => self.command(
                        sid,
                        &[
                            Amf0::String("publish".into()),
                            Amf0::Number(5.0),
                            Amf0::Null,
                            Amf0::String(key),
                            Amf0::String("live".into()),
                        ],
                    ),
                    Mode::Play(key) => {
                        let mut b = sid.to_be_bytes().to_vec();
                        b.extend_from_slice(&3000u32.to_be_bytes());
                        msg::user_control(&mut self.out, 3, &b);
                        self.command(
                            sid,
                            &[
                                Amf0::String("play".into()),
                                Amf0::Number(5.0),
                                Amf0::Null,
                                Amf0::String(key),
                                Amf0::Number(-1000.0),
                            ],
                        );
                    }
                }
            }
            ("onStatus", _) => {
                let code = values
                    .get(3)
                    .and_then(|o| o.get("code"))
                    .and_then(Amf0::as_str)
                    .unwrap_or_default();
                let level = values
                    .get(3)
                    .and_then(|o| o.get("level"))
                    .and_then(Amf0::as_str)
                    .unwrap_or_default();
                match code {
                    "NetStream.Publish.Start" | "NetStream.Play.Start" => {
                        self.events.push_back(ClientEvent::Ready)
                    }
                    "NetStream.Play.UnpublishNotify" | "NetStream.Play.Stop" => {
                        self.events.push_back(ClientEvent::Ended)
                    }
                    _ if level == "error" => {
                        self.events.push_back(ClientEvent::Refused(code.to_owned()))
                    }
                    _ => {}
                }
            }
            ("_error", _) => self.events.push_back(ClientEvent::Refused(format!(
                "_error for transaction {txid}"
            ))),
            _ => {}
        }
    }

    /// Queues `@setDataFrame onMetaData` (publish).
    pub fn send_metadata(&mut self, metadata: Amf0) {
        let v = [
            Amf0::String("@setDataFrame".into()),
            Amf0::String("onMetaData".into()),
            metadata,
        ];
        msg::amf(
            &mut self.out,
            msg::CSID_DATA,
            kind::DATA_AMF0,
            self.stream_id,
            &v,
        );
    }

    /// Queues an audio (8) or video (9) message whose body is the concatenation of `body`.
    pub fn send_media(&mut self, type_id: u8, timestamp: u32, body: &[&[u8]]) {
        let csid = if type_id == kind::AUDIO {
            msg::CSID_AUDIO
        } else {
            msg::CSID_VIDEO
        };
        encode_message(
            &mut self.out,
            csid,
            timestamp,
            type_id,
            self.stream_id,
            body,
            OUT_CHUNK_SIZE,
        );
    }

    /// Queues FCUnpublish + deleteStream.
    pub fn finish(&mut self) {
        let sid = Amf0::Number(f64::from(self.stream_id));
        if let Mode::Publish(key) = self.mode.clone() {
            self.command(
                0,
                &[
                    Amf0::String("FCUnpublish".into()),
                    Amf0::Number(6.0),
                    Amf0::Null,
                    Amf0::String(key),
                ],
            );
        }
        self.command(
            0,
            &[
                Amf0::String("deleteStream".into()),
                Amf0::Number(7.0),
                Amf0::Null,
                sid,
            ],
        );
    }
}
