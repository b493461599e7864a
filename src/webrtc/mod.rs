//! WebRTC with str0m: WHEP playback and WHIP ingest, every peer of the node on one UDP socket,
//! ICE-lite, DTLS-SRTP.
//!
//! [`driver`] owns the socket and every peer's sans-IO `Rtc`; [`signal`] is the HTTP side
//! (offer → answer, resource deletion, CORS); [`ingest`] turns a WHIP publisher's frames into
//! hub frames. Media for viewers comes from the hub: H.264 is converted from length-prefixed NAL
//! units to Annex B once per frame (memoized in the hub entry, shared by all viewers) and
//! packetized per viewer by str0m.
//!
//! Not built yet (see the WebRTC issue): NACK answered from one shared packet history (str0m
//! keeps a history per viewer) and one packetization per track shared by every viewer.

pub mod driver;
pub mod ingest;
pub mod signal;
pub mod stats;

/// Why a WebRTC session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    /// The offer is not SDP str0m can parse.
    #[error("malformed SDP offer: {0}")]
    BadOffer(String),
    /// The offer has no codec castnode can use (H.264 video; Opus audio for viewers).
    #[error("the offer has no codec castnode can use: {0}")]
    NoCodec(&'static str),
    /// str0m refused the offer.
    #[error("offer not accepted: {0}")]
    Rejected(String),
    /// The node is at `--max-viewers`.
    #[error("viewer limit reached")]
    Full,
    /// The WebRTC task is gone (the node is shutting down).
    #[error("WebRTC is not running")]
    Stopped,
}
