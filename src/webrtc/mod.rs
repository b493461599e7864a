//! WebRTC with str0m: WHEP playback and WHIP ingest, every peer of the node on one UDP socket,
//! ICE-lite, DTLS-SRTP.
//!
//! [`driver`] owns the socket and the loop, and sends through [`egress`]; [`table`] holds every
//! session (each peer's sans-IO `Rtc`: routing, handover, reaping), testable without a socket;
//! [`signal`] is the HTTP side (offer → answer, resource deletion, CORS); [`ingest`] turns a WHIP
//! publisher's frames into hub frames.
//!
//! Viewers' media does not go through str0m. str0m answers the offer and runs ICE and DTLS;
//! [`keys`] takes the SRTP keys from the DTLS handshake. Then:
//!
//! ```text
//! hub entry ──(once per frame, memoized in the entry)──▶ packetize::RtpFrame (shared payloads)
//!                                                              │ Arc, no copy
//!             ┌────────────────────────────────────────────────┴─────────── … one per viewer
//!             ▼
//! sender::MediaSender: 12-byte header + payload ──srtp (viewer's keys)──▶ egress (GSO batches,
//!                                                                   sendmmsg across viewers)
//!             ▲                                                                │
//!             └── SRTCP from the viewer: NACK → resend from the shared frames  ▼ UDP socket
//!                 PLI/FIR → WHIP publisher; sender reports every second
//! ```
//!
//! An `auto` viewer (WHEP's default on a broadcast with an ABR ladder) is moved between the
//! ladder's rungs by [`abr`]: its sender paces video at the estimated bandwidth and probes with
//! padding; the table switches rungs at keyframes on the viewer's one RTP stream.
//!
//! A WHIP publisher's session is str0m's throughout (depacketizing, NACKs, RTCP).

pub(crate) mod abr;
pub(crate) mod consent;
pub(crate) mod driver;
pub(crate) mod egress;
pub(crate) mod ingest;
pub mod keys;
pub mod packetize;
pub(crate) mod rtcp;
pub mod sender;
pub(crate) mod signal;
pub mod srtp;
pub(crate) use crate::metrics::webrtc as stats;
pub(crate) mod table;

/// Why a WebRTC session could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebrtcError {
    /// The offer is not SDP str0m can parse.
    #[error("malformed SDP offer: {0}")]
    BadOffer(String),
    /// The offer has no codec castnode can use (H.264 video; Opus audio for viewers).
    #[error("the offer has no codec castnode can use: {0}")]
    NoCodec(&'static str),
    /// str0m refused the offer.
    #[error("offer not accepted: {0}")]
    Rejected(String),
    /// The WebRTC task is gone (the node is shutting down).
    #[error("WebRTC is not running")]
    Stopped,
}
