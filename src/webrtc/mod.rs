//! WebRTC playback (WHEP) with str0m: every peer of the node on one UDP socket, ICE-lite,
//! DTLS-SRTP.
//!
//! [`driver`] owns the socket and every peer's sans-IO `Rtc`; [`whep`] is the HTTP side
//! (offer → answer, resource deletion, CORS). Media comes from the hub: H.264 is converted from
//! length-prefixed NAL units to Annex B once per frame (memoized in the hub entry, shared by all
//! viewers) and packetized per viewer by str0m.
//!
//! Not built yet (see the WebRTC issue): WHIP ingest, AAC → Opus for RTMP sources (their viewers
//! get video only), the B-frame re-encode (a stream with B-frames is sent as it is), NACK from a
//! shared history, the player and publisher pages.

pub mod driver;
pub mod whep;

/// Why a WebRTC session could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    /// The offer is not SDP str0m can parse.
    #[error("malformed SDP offer: {0}")]
    BadOffer(String),
    /// The offer has nothing castnode can send (no H.264 video).
    #[error("the offer accepts no codec castnode can send: {0}")]
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
