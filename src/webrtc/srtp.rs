//! SRTP/SRTCP protection for a WebRTC sender that also reads RTCP feedback (sans-IO).
//!
//! # Guarantees
//!
//! - Profiles: `SRTP_AEAD_AES_128_GCM`, `SRTP_AEAD_AES_256_GCM` (RFC 7714) and
//!   `SRTP_AES128_CM_HMAC_SHA1_80` (RFC 3711), keyed from DTLS-SRTP exporter output laid
//!   out as RFC 5764 §4.2, session keys derived with the RFC 3711 §4.3 KDF
//!   (`key_derivation_rate` 0, no MKI).
//! - Nothing here panics on any input: every packet from the network, and every length or
//!   offset from the caller, is checked and refused with an [`SrtpError`].
//! - Nothing allocates per packet: all cipher keys (AES-GCM, AES-CTR, HMAC-SHA1) are set up
//!   once in [`Srtp::new`]; the protect calls grow the caller's `Vec` in place (no
//!   allocation when it has the profile's overhead as spare capacity: the tag, 16 bytes at
//!   most, for RTP; the tag and the 4-byte SRTCP index for RTCP) and the unprotect calls write
//!   into the caller's reusable `out`.
//! - A packet that fails authentication is never decrypted into `out` (it is left empty),
//!   and an SRTCP packet only enters the replay window once it has authenticated.
//! - Outgoing SRTCP indices are never reused: after 2^31 - 1 packets
//!   [`Srtp::protect_rtcp`] refuses with [`SrtpError::SrtcpIndexExhausted`] (rekey).
//!
//! # What the caller owns
//!
//! The RTP rollover counter (ROC) of each SSRC: the sender numbers its packets and passes
//! the ROC of each one. The SRTP (RTP) replay protection of the receive side is also the
//! caller's, since this context does not track per-SSRC RTP state; SRTCP replays are
//! refused here (a 128-index sliding window).
//!
//! # Formats
//!
//! - AEAD (RFC 7714 §8, §9): RTP IV = `00 00 || SSRC || ROC || SEQ` XOR salt, AAD = the RTP
//!   header, tag 16 bytes appended. RTCP IV = `00 00 || SSRC || 00 00 || 0 || index` XOR
//!   salt, AAD = the first 8 bytes || `E || index`, output = first 8 bytes || ciphertext ||
//!   tag || `E || index`.
//! - AES-CM (RFC 3711 §4.1.1, §4.2): IV = salt·2^16 XOR SSRC·2^64 XOR index·2^16, tag = the
//!   first 10 bytes of HMAC-SHA1 over the authenticated portion (RTP: packet || ROC; RTCP:
//!   packet || `E || index`).
//!
//! The first outgoing SRTCP packet carries index 1, as libsrtp (and so every browser) does.

use std::fmt;

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_128, AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;

/// Length of the AEAD authentication tag (RFC 7714 §14.2: 16 octets for both GCM profiles).
const GCM_TAG_LEN: usize = 16;
/// Length of the truncated HMAC-SHA1 tag of `AES128_CM_HMAC_SHA1_80`.
const CM_TAG_LEN: usize = 10;
/// Length of the `E || SRTCP index` word.
const SRTCP_INDEX_LEN: usize = 4;
/// Fixed RTP header length, before CSRCs and extension.
const RTP_FIXED_HEADER_LEN: usize = 12;
/// RTCP header (4 bytes) plus sender SSRC (4 bytes): never encrypted.
const RTCP_HEADER_LEN: usize = 8;
/// The E (encrypted) flag in the `E || SRTCP index` word.
const E_FLAG: u32 = 0x8000_0000;
/// The 31-bit SRTCP index mask.
const SRTCP_INDEX_MASK: u32 = 0x7fff_ffff;
/// KDF labels (RFC 3711 §4.3.1).
const LABEL_RTP_ENC: u8 = 0x00;
const LABEL_RTP_AUTH: u8 = 0x01;
const LABEL_RTP_SALT: u8 = 0x02;
const LABEL_RTCP_ENC: u8 = 0x03;
const LABEL_RTCP_AUTH: u8 = 0x04;
const LABEL_RTCP_SALT: u8 = 0x05;
/// Session salt length of the GCM profiles (RFC 7714 §12: 96 bits).
const GCM_SALT_LEN: usize = 12;
/// Session salt length of the AES-CM profile (RFC 3711 §8.2: 112 bits).
const CM_SALT_LEN: usize = 14;
/// Session authentication key length of `AES128_CM_HMAC_SHA1_80` (160 bits).
const CM_AUTH_KEY_LEN: usize = 20;
/// Number of SRTCP indices the replay window remembers below the highest one seen.
const REPLAY_WINDOW: u32 = 128;

/// SRTP protection profiles (RFC 5764 / RFC 7714).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `SRTP_AEAD_AES_128_GCM` (RFC 7714, DTLS-SRTP id 0x0007).
    AeadAes128Gcm,
    /// `SRTP_AEAD_AES_256_GCM` (RFC 7714, DTLS-SRTP id 0x0008).
    AeadAes256Gcm,
    /// `SRTP_AES128_CM_HMAC_SHA1_80` (RFC 3711 / RFC 5764, DTLS-SRTP id 0x0001).
    Aes128CmSha1_80,
}

impl Profile {
    /// Master key length in bytes.
    fn master_key_len(self) -> usize {
        match self {
            Profile::AeadAes128Gcm | Profile::Aes128CmSha1_80 => 16,
            Profile::AeadAes256Gcm => 32,
        }
    }

    /// Master salt length in bytes.
    fn master_salt_len(self) -> usize {
        match self {
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => GCM_SALT_LEN,
            Profile::Aes128CmSha1_80 => CM_SALT_LEN,
        }
    }

    /// Bytes of DTLS-exported keying material this profile needs: 2*(key+salt).
    pub fn keying_material_len(self) -> usize {
        2 * (self.master_key_len() + self.master_salt_len())
    }

    /// Bytes a protected RTP packet grows by (16 for GCM, 10 for AES-CM-SHA1-80).
    #[cfg(test)]
    pub(crate) fn rtp_overhead(self) -> usize {
        match self {
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => GCM_TAG_LEN,
            Profile::Aes128CmSha1_80 => CM_TAG_LEN,
        }
    }

    /// Bytes a protected RTCP packet grows by (GCM: 16 tag + 4 index; AES-CM: 4 index + 10 tag).
    #[cfg(test)]
    pub(crate) fn rtcp_overhead(self) -> usize {
        self.rtp_overhead() + SRTCP_INDEX_LEN
    }
}

/// Why a packet could not be protected or unprotected, or a context not built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// Keying material, master key or master salt of the wrong length for the profile.
    #[error("{what} is {got} bytes, the profile needs {expected}")]
    KeyingMaterial {
        /// Which input was wrong.
        what: &'static str,
        /// The length the profile needs.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// `start` / `header_len` given to a protect call do not fit the buffer.
    #[error(
        "packet layout out of range: start {start}, header length {header_len}, buffer {buf_len} bytes"
    )]
    Layout {
        /// Offset of the packet in the buffer.
        start: usize,
        /// RTP header length given (0 for RTCP).
        header_len: usize,
        /// Length of the buffer.
        buf_len: usize,
    },
    /// The packet is shorter than its headers and trailer need.
    #[error("packet of {len} bytes is too short (needs at least {min})")]
    TooShort {
        /// Length of the packet.
        len: usize,
        /// Minimum length for this packet and profile.
        min: usize,
    },
    /// The RTP header is not valid (version, CSRC count or extension length).
    #[error("malformed RTP header: {0}")]
    Malformed(&'static str),
    /// The authentication tag did not verify (tampered, wrong key, wrong ROC, or not SRTP).
    #[error("SRTP/SRTCP authentication failed")]
    Auth,
    /// The SRTCP index was already received, or is older than the replay window.
    #[error("SRTCP index {0} replayed or older than the replay window")]
    Replay(u32),
    /// All 2^31 SRTCP indices have been used; the session must be rekeyed.
    #[error("SRTCP index space exhausted; the session must be rekeyed")]
    SrtcpIndexExhausted,
    /// The crypto library refused an operation that cannot fail on valid keys (should not happen).
    #[error("crypto library failure")]
    Crypto,
}

impl From<aws_lc_rs::error::Unspecified> for SrtpError {
    fn from(_: aws_lc_rs::error::Unspecified) -> Self {
        SrtpError::Crypto
    }
}

/// Session keys of one direction and one of RTP / RTCP, ready to use.
enum Keys {
    /// AEAD AES-GCM (128 or 256).
    Gcm {
        key: LessSafeKey,
        salt: [u8; GCM_SALT_LEN],
    },
    /// AES counter mode with HMAC-SHA1-80: boxed, as its HMAC key is large and this profile
    /// is rare (browsers negotiate AES-GCM), so GCM sessions stay small.
    Cm(Box<CmKeys>),
}

/// AES-CM and HMAC-SHA1 keys.
struct CmKeys {
    key: EncryptingKey,
    auth: hmac::Key,
    salt: [u8; CM_SALT_LEN],
}

impl Keys {
    /// AES-GCM keys; the algorithm is chosen by the key length (16 or 32).
    fn gcm(enc: &[u8], salt: [u8; GCM_SALT_LEN]) -> Result<Self, SrtpError> {
        let alg = if enc.len() == 32 {
            &AES_256_GCM
        } else {
            &AES_128_GCM
        };
        Ok(Keys::Gcm {
            key: LessSafeKey::new(UnboundKey::new(alg, enc)?),
            salt,
        })
    }

    /// AES-CM keys; the AES variant is chosen by the key length (16 or 32).
    fn cm(enc: &[u8], auth: &[u8], salt: [u8; CM_SALT_LEN]) -> Result<Self, SrtpError> {
        let alg = if enc.len() == 32 { &AES_256 } else { &AES_128 };
        Ok(Keys::Cm(Box::new(CmKeys {
            key: EncryptingKey::ctr(UnboundCipherKey::new(alg, enc)?)?,
            auth: hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth),
            salt,
        })))
    }

    /// Tag length of these keys.
    fn tag_len(&self) -> usize {
        match self {
            Keys::Gcm { .. } => GCM_TAG_LEN,
            Keys::Cm(_) => CM_TAG_LEN,
        }
    }
}

/// RTP and RTCP session keys of one direction.
struct Direction {
    rtp: Keys,
    rtcp: Keys,
}

impl Direction {
    /// Derives one direction's session keys from its master key and salt (RFC 3711 §4.3).
    fn derive(profile: Profile, master_key: &[u8], master_salt: &[u8]) -> Result<Self, SrtpError> {
        check_len("master key", profile.master_key_len(), master_key.len())?;
        check_len("master salt", profile.master_salt_len(), master_salt.len())?;
        let mut enc = [0u8; 32];
        let enc = &mut enc[..profile.master_key_len()];
        let dir = match profile {
            Profile::AeadAes128Gcm | Profile::AeadAes256Gcm => {
                let mut salt = [0u8; GCM_SALT_LEN];
                kdf(master_key, master_salt, LABEL_RTP_ENC, enc)?;
                kdf(master_key, master_salt, LABEL_RTP_SALT, &mut salt)?;
                let rtp = Keys::gcm(enc, salt)?;
                kdf(master_key, master_salt, LABEL_RTCP_ENC, enc)?;
                kdf(master_key, master_salt, LABEL_RTCP_SALT, &mut salt)?;
                let rtcp = Keys::gcm(enc, salt)?;
                Direction { rtp, rtcp }
            }
            Profile::Aes128CmSha1_80 => {
                let mut auth = [0u8; CM_AUTH_KEY_LEN];
                let mut salt = [0u8; CM_SALT_LEN];
                kdf(master_key, master_salt, LABEL_RTP_ENC, enc)?;
                kdf(master_key, master_salt, LABEL_RTP_AUTH, &mut auth)?;
                kdf(master_key, master_salt, LABEL_RTP_SALT, &mut salt)?;
                let rtp = Keys::cm(enc, &auth, salt)?;
                kdf(master_key, master_salt, LABEL_RTCP_ENC, enc)?;
                kdf(master_key, master_salt, LABEL_RTCP_AUTH, &mut auth)?;
                kdf(master_key, master_salt, LABEL_RTCP_SALT, &mut salt)?;
                let rtcp = Keys::cm(enc, &auth, salt)?;
                auth.fill(0);
                Direction { rtp, rtcp }
            }
        };
        enc.fill(0);
        Ok(dir)
    }
}

/// Sliding window over received SRTCP indices (RFC 3711 §3.3.2).
#[derive(Debug, Default, Clone, Copy)]
struct ReplayWindow {
    /// Highest index accepted so far, `None` before the first packet.
    max: Option<u32>,
    /// Bit `d` set: index `max - d` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// Refuses an index already accepted or too old; does not record it.
    fn check(&self, index: u32) -> Result<(), SrtpError> {
        let Some(max) = self.max else {
            return Ok(());
        };
        if index > max {
            return Ok(());
        }
        let age = max - index;
        if age >= REPLAY_WINDOW || (self.seen >> age) & 1 == 1 {
            return Err(SrtpError::Replay(index));
        }
        Ok(())
    }

    /// Records an index that passed [`Self::check`] and authenticated.
    fn accept(&mut self, index: u32) {
        match self.max {
            Some(max) if index <= max => {
                let age = max - index;
                if age < REPLAY_WINDOW {
                    self.seen |= 1 << age;
                }
            }
            Some(max) => {
                let shift = index - max;
                self.seen = if shift >= REPLAY_WINDOW {
                    0
                } else {
                    self.seen << shift
                };
                self.seen |= 1;
                self.max = Some(index);
            }
            None => {
                self.seen = 1;
                self.max = Some(index);
            }
        }
    }
}

/// One direction pair of an SRTP session: protects what this side sends, unprotects what it receives.
pub(crate) struct Srtp {
    profile: Profile,
    /// Keys of what this side sends.
    tx: Direction,
    /// Keys of what this side receives.
    rx: Direction,
    /// Index of the next outgoing SRTCP packet (31 bits; `SRTCP_INDEX_MASK + 1` = exhausted).
    next_srtcp_index: u32,
    /// Replay window over incoming SRTCP indices.
    replay: ReplayWindow,
}

impl fmt::Debug for Srtp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Srtp")
            .field("profile", &self.profile)
            .field("next_srtcp_index", &self.next_srtcp_index)
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl Srtp {
    /// `material` is the DTLS exporter output laid out as RFC 5764 §4.2:
    /// client_write_SRTP_master_key | server_write_SRTP_master_key | client_write_SRTP_master_salt | server_write_SRTP_master_salt.
    /// `client`: this side was the DTLS client (then it sends with the client keys and receives with the server keys; otherwise the reverse).
    ///
    /// Derives the session keys of both directions (RFC 3711 §4.3 KDF, AES-CM PRF of the
    /// master key's size, key_derivation_rate 0) and sets up every cipher key once.
    pub(crate) fn new(profile: Profile, material: &[u8], client: bool) -> Result<Self, SrtpError> {
        check_len(
            "DTLS-SRTP keying material",
            profile.keying_material_len(),
            material.len(),
        )?;
        let k = profile.master_key_len();
        let s = profile.master_salt_len();
        let (client_key, rest) = material.split_at(k);
        let (server_key, rest) = rest.split_at(k);
        let (client_salt, server_salt) = rest.split_at(s);
        if client {
            Self::from_master(profile, client_key, client_salt, server_key, server_salt)
        } else {
            Self::from_master(profile, server_key, server_salt, client_key, client_salt)
        }
    }

    /// Builds a context from the two directions' master keys and salts given explicitly:
    /// `tx_*` protect what this side sends, `rx_*` unprotect what it receives. For tests, a
    /// load client, or keys that did not come from DTLS.
    pub(crate) fn from_master(
        profile: Profile,
        tx_key: &[u8],
        tx_salt: &[u8],
        rx_key: &[u8],
        rx_salt: &[u8],
    ) -> Result<Self, SrtpError> {
        Ok(Srtp {
            profile,
            tx: Direction::derive(profile, tx_key, tx_salt)?,
            rx: Direction::derive(profile, rx_key, rx_salt)?,
            next_srtcp_index: 1,
            replay: ReplayWindow::default(),
        })
    }

    /// The protection profile of this context.
    #[cfg(test)]
    pub(crate) fn profile(&self) -> Profile {
        self.profile
    }

    /// Protects one outgoing RTP packet in place at the end of `buf`: `buf[start..]` holds the whole plain RTP packet (header of `header_len` bytes including CSRCs and any extension, then payload). Encrypts the payload in place and appends the tag, so `buf` grows by `rtp_overhead()`. `roc` is the rollover counter of this packet's SSRC (the caller numbers the packets and tracks wraps). Must not allocate when `buf` has capacity.
    ///
    /// `header_len` is trusted to be the real header length (at least 12 and within the
    /// packet; anything else is refused with [`SrtpError::Layout`] and `buf` is untouched).
    pub(crate) fn protect_rtp(
        &self,
        buf: &mut Vec<u8>,
        start: usize,
        header_len: usize,
        roc: u32,
    ) -> Result<(), SrtpError> {
        let layout = SrtpError::Layout {
            start,
            header_len,
            buf_len: buf.len(),
        };
        let Some(packet) = buf.get_mut(start..) else {
            return Err(layout);
        };
        if header_len < RTP_FIXED_HEADER_LEN || header_len > packet.len() {
            return Err(layout);
        }
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = be_u32(&packet[8..12]);
        let (header, payload) = packet.split_at_mut(header_len);
        match &self.tx.rtp {
            Keys::Gcm { key, salt } => {
                let nonce = Nonce::assume_unique_for_key(gcm_rtp_iv(salt, ssrc, roc, seq));
                let tag = key.seal_in_place_separate_tag(nonce, Aad::from(&*header), payload)?;
                buf.extend_from_slice(tag.as_ref());
            }
            Keys::Cm(cm) => {
                let CmKeys { key, auth, salt } = &**cm;
                let index = (u64::from(roc) << 16) | u64::from(seq);
                ctr(key, cm_iv(salt, ssrc, index), payload)?;
                let mut mac = hmac::Context::with_key(auth);
                mac.update(&buf[start..]);
                mac.update(&roc.to_be_bytes());
                let tag = mac.sign();
                buf.extend_from_slice(&tag.as_ref()[..CM_TAG_LEN]);
            }
        }
        Ok(())
    }

    /// Protects one outgoing (compound) RTCP packet in place at the end of `buf` (`buf[start..]` is the plain compound RTCP, first 8 bytes = header + sender SSRC). Uses and increments this context's own SRTCP index (31 bits, the first packet carries 1 as with libsrtp; E flag set: encrypted). Grows `buf` by `rtcp_overhead()`.
    ///
    /// Refuses with [`SrtpError::SrtcpIndexExhausted`] rather than ever reusing an index.
    pub(crate) fn protect_rtcp(
        &mut self,
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), SrtpError> {
        let Some(packet) = buf.get_mut(start..) else {
            return Err(SrtpError::Layout {
                start,
                header_len: 0,
                buf_len: buf.len(),
            });
        };
        if packet.len() < RTCP_HEADER_LEN {
            return Err(SrtpError::TooShort {
                len: packet.len(),
                min: RTCP_HEADER_LEN,
            });
        }
        let index = self.next_srtcp_index;
        if index > SRTCP_INDEX_MASK {
            return Err(SrtpError::SrtcpIndexExhausted);
        }
        let e_index = (E_FLAG | index).to_be_bytes();
        let ssrc = be_u32(&packet[4..8]);
        let (header, body) = packet.split_at_mut(RTCP_HEADER_LEN);
        match &self.tx.rtcp {
            Keys::Gcm { key, salt } => {
                let nonce = Nonce::assume_unique_for_key(gcm_rtcp_iv(salt, ssrc, index));
                let aad = rtcp_aad(header, e_index);
                let tag = key.seal_in_place_separate_tag(nonce, Aad::from(aad), body)?;
                buf.extend_from_slice(tag.as_ref());
                buf.extend_from_slice(&e_index);
            }
            Keys::Cm(cm) => {
                let CmKeys { key, auth, salt } = &**cm;
                ctr(key, cm_iv(salt, ssrc, u64::from(index)), body)?;
                buf.extend_from_slice(&e_index);
                let tag = hmac::sign(auth, &buf[start..]);
                buf.extend_from_slice(&tag.as_ref()[..CM_TAG_LEN]);
            }
        }
        self.next_srtcp_index = index + 1;
        Ok(())
    }

    /// Unprotects one incoming SRTCP packet (from the peer) into `out` (cleared first): checks the tag, decrypts when the E flag is set, returns the plain compound RTCP in `out`. Rejects replays of an index already seen (a 128-index sliding window) and anything malformed, with an error and no panic.
    ///
    /// On any error `out` is left empty and the replay window is unchanged.
    pub(crate) fn unprotect_rtcp(
        &mut self,
        packet: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SrtpError> {
        out.clear();
        let result = self.unprotect_rtcp_inner(packet, out);
        if result.is_err() {
            out.clear();
        }
        result
    }

    fn unprotect_rtcp_inner(&mut self, packet: &[u8], out: &mut Vec<u8>) -> Result<(), SrtpError> {
        let keys = &self.rx.rtcp;
        let min = RTCP_HEADER_LEN + SRTCP_INDEX_LEN + keys.tag_len();
        if packet.len() < min {
            return Err(SrtpError::TooShort {
                len: packet.len(),
                min,
            });
        }
        let ssrc = be_u32(&packet[4..8]);
        let index_at = match keys {
            // header | ciphertext | tag | E||index
            Keys::Gcm { .. } => packet.len() - SRTCP_INDEX_LEN,
            // header | ciphertext | E||index | tag
            Keys::Cm(_) => packet.len() - CM_TAG_LEN - SRTCP_INDEX_LEN,
        };
        let e_index_bytes = [
            packet[index_at],
            packet[index_at + 1],
            packet[index_at + 2],
            packet[index_at + 3],
        ];
        let e_index = u32::from_be_bytes(e_index_bytes);
        let encrypted = e_index & E_FLAG != 0;
        let index = e_index & SRTCP_INDEX_MASK;
        self.replay.check(index)?;
        match keys {
            Keys::Gcm { key, salt } => {
                let nonce = Nonce::assume_unique_for_key(gcm_rtcp_iv(salt, ssrc, index));
                // header | ciphertext | tag
                let sealed = &packet[..index_at];
                if encrypted {
                    out.extend_from_slice(sealed);
                    let (header, rest) = out.split_at_mut(RTCP_HEADER_LEN);
                    let aad = rtcp_aad(header, e_index_bytes);
                    key.open_in_place(nonce, Aad::from(aad), rest)
                        .map_err(|_| SrtpError::Auth)?;
                    out.truncate(sealed.len() - GCM_TAG_LEN);
                } else {
                    // RFC 7714 §9.2: unencrypted SRTCP authenticates everything as AAD.
                    let (plain, tag) = sealed.split_at(sealed.len() - GCM_TAG_LEN);
                    out.extend_from_slice(plain);
                    out.extend_from_slice(&e_index_bytes);
                    let mut tag_only = [0u8; GCM_TAG_LEN];
                    tag_only.copy_from_slice(tag);
                    key.open_in_place(nonce, Aad::from(&out[..]), &mut tag_only)
                        .map_err(|_| SrtpError::Auth)?;
                    out.truncate(plain.len());
                }
            }
            Keys::Cm(cm) => {
                let CmKeys { key, auth, salt } = &**cm;
                let (authenticated, tag) = packet.split_at(packet.len() - CM_TAG_LEN);
                let expected = hmac::sign(auth, authenticated);
                verify_slices_are_equal(&expected.as_ref()[..CM_TAG_LEN], tag)
                    .map_err(|_| SrtpError::Auth)?;
                out.extend_from_slice(&packet[..index_at]);
                if encrypted {
                    ctr(
                        key,
                        cm_iv(salt, ssrc, u64::from(index)),
                        &mut out[RTCP_HEADER_LEN..],
                    )?;
                }
            }
        }
        self.replay.accept(index);
        Ok(())
    }

    /// Unprotects one incoming SRTP packet into `out` (the plain RTP packet). Used by tests (the sender's and this module's); `roc` supplied by caller. Header length is parsed from the packet itself (12 + 4*CC + extension if X bit), errors on malformed.
    ///
    /// No replay check (the caller owns per-SSRC RTP state). On any error `out` is left empty.
    #[cfg(test)]
    pub(crate) fn unprotect_rtp(
        &self,
        packet: &[u8],
        roc: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), SrtpError> {
        out.clear();
        let result = self.unprotect_rtp_inner(packet, roc, out);
        if result.is_err() {
            out.clear();
        }
        result
    }

    #[cfg(test)]
    fn unprotect_rtp_inner(
        &self,
        packet: &[u8],
        roc: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), SrtpError> {
        let keys = &self.rx.rtp;
        let header_len = rtp_header_len(packet)?;
        let min = header_len + keys.tag_len();
        if packet.len() < min {
            return Err(SrtpError::TooShort {
                len: packet.len(),
                min,
            });
        }
        let seq = u16::from_be_bytes([packet[2], packet[3]]);
        let ssrc = be_u32(&packet[8..12]);
        match keys {
            Keys::Gcm { key, salt } => {
                let nonce = Nonce::assume_unique_for_key(gcm_rtp_iv(salt, ssrc, roc, seq));
                out.extend_from_slice(packet);
                let (header, rest) = out.split_at_mut(header_len);
                key.open_in_place(nonce, Aad::from(&*header), rest)
                    .map_err(|_| SrtpError::Auth)?;
                out.truncate(packet.len() - GCM_TAG_LEN);
            }
            Keys::Cm(cm) => {
                let CmKeys { key, auth, salt } = &**cm;
                let (authenticated, tag) = packet.split_at(packet.len() - CM_TAG_LEN);
                let mut mac = hmac::Context::with_key(auth);
                mac.update(authenticated);
                mac.update(&roc.to_be_bytes());
                let expected = mac.sign();
                verify_slices_are_equal(&expected.as_ref()[..CM_TAG_LEN], tag)
                    .map_err(|_| SrtpError::Auth)?;
                out.extend_from_slice(authenticated);
                let index = (u64::from(roc) << 16) | u64::from(seq);
                ctr(key, cm_iv(salt, ssrc, index), &mut out[header_len..])?;
            }
        }
        Ok(())
    }
}

/// Refuses a key, salt or material of the wrong length.
fn check_len(what: &'static str, expected: usize, got: usize) -> Result<(), SrtpError> {
    if expected == got {
        Ok(())
    } else {
        Err(SrtpError::KeyingMaterial {
            what,
            expected,
            got,
        })
    }
}

/// Big-endian `u32` from exactly four bytes (callers slice within checked bounds).
fn be_u32(b: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&b[..4]);
    u32::from_be_bytes(word)
}

/// RTP header length (12 + 4·CC + extension), checked against the packet.
#[cfg(test)]
fn rtp_header_len(packet: &[u8]) -> Result<usize, SrtpError> {
    if packet.len() < RTP_FIXED_HEADER_LEN {
        return Err(SrtpError::TooShort {
            len: packet.len(),
            min: RTP_FIXED_HEADER_LEN,
        });
    }
    if packet[0] >> 6 != 2 {
        return Err(SrtpError::Malformed("version is not 2"));
    }
    let csrc_count = usize::from(packet[0] & 0x0f);
    let mut len = RTP_FIXED_HEADER_LEN + 4 * csrc_count;
    if packet[0] & 0x10 != 0 {
        // Extension: 16-bit profile, 16-bit length in 32-bit words, then the words.
        let Some(ext) = packet.get(len..len + 4) else {
            return Err(SrtpError::Malformed("extension header past the end"));
        };
        len += 4 + 4 * usize::from(u16::from_be_bytes([ext[2], ext[3]]));
    }
    if len > packet.len() {
        return Err(SrtpError::Malformed("header longer than the packet"));
    }
    Ok(len)
}

/// RFC 7714 §8.1: `00 00 || SSRC || ROC || SEQ` XOR salt.
fn gcm_rtp_iv(salt: &[u8; GCM_SALT_LEN], ssrc: u32, roc: u32, seq: u16) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[6..10].copy_from_slice(&roc.to_be_bytes());
    iv[10..12].copy_from_slice(&seq.to_be_bytes());
    xor_into(&mut iv, salt);
    iv
}

/// RFC 7714 §9.1: `00 00 || SSRC || 00 00 || 0 || SRTCP index` XOR salt.
fn gcm_rtcp_iv(salt: &[u8; GCM_SALT_LEN], ssrc: u32, index: u32) -> [u8; 12] {
    let mut iv = [0u8; 12];
    iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
    iv[8..12].copy_from_slice(&(index & SRTCP_INDEX_MASK).to_be_bytes());
    xor_into(&mut iv, salt);
    iv
}

/// RFC 7714 §9.2: the SRTCP AAD is the first 8 bytes followed by `E || index`.
fn rtcp_aad(header: &[u8], e_index: [u8; 4]) -> [u8; 12] {
    let mut aad = [0u8; 12];
    aad[..RTCP_HEADER_LEN].copy_from_slice(&header[..RTCP_HEADER_LEN]);
    aad[RTCP_HEADER_LEN..].copy_from_slice(&e_index);
    aad
}

/// RFC 3711 §4.1.1: IV = (salt·2^16) XOR (SSRC·2^64) XOR (index·2^16), `index` 48 bits.
fn cm_iv(salt: &[u8; CM_SALT_LEN], ssrc: u32, index: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..CM_SALT_LEN].copy_from_slice(salt);
    iv[4..8]
        .iter_mut()
        .zip(ssrc.to_be_bytes())
        .for_each(|(b, s)| *b ^= s);
    iv[8..14]
        .iter_mut()
        .zip(&index.to_be_bytes()[2..])
        .for_each(|(b, i)| *b ^= i);
    iv
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d ^= s);
}

/// AES counter mode in place from the 128-bit initial counter `iv`.
fn ctr(key: &EncryptingKey, iv: [u8; 16], data: &mut [u8]) -> Result<(), SrtpError> {
    if data.is_empty() {
        return Ok(());
    }
    key.less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from(iv)))?;
    Ok(())
}

/// RFC 3711 §4.3.1/§4.3.3 KDF with key_derivation_rate 0: the AES-CM keystream under the
/// master key (AES-128 or AES-256 by its length, RFC 6188 §3 / RFC 7714 §11) from
/// IV = (master_salt XOR label·2^48)·2^16.
///
/// The 96-bit GCM master salt sits in the high-order 96 bits of the 112-bit salt field,
/// followed by two zero bytes, as libsrtp does (`srtp_kdf_init` copies the salt into a
/// zeroed 14-byte buffer). This is what interoperates with browsers, and the libsrtp
/// `srtp_validate_gcm` reference packet in the tests checks it end to end.
fn kdf(master_key: &[u8], master_salt: &[u8], label: u8, out: &mut [u8]) -> Result<(), SrtpError> {
    let alg = if master_key.len() == 32 {
        &AES_256
    } else {
        &AES_128
    };
    let key = EncryptingKey::ctr(UnboundCipherKey::new(alg, master_key)?)?;
    let mut iv = [0u8; 16];
    let n = master_salt.len().min(CM_SALT_LEN);
    iv[..n].copy_from_slice(&master_salt[..n]);
    iv[7] ^= label;
    out.fill(0);
    ctr(&key, iv, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        assert!(s.len().is_multiple_of(2), "odd hex");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn arr<const N: usize>(s: &str) -> [u8; N] {
        hex(s).try_into().expect("length")
    }

    /// xorshift64*: deterministic, good enough for test inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn fill(&mut self, buf: &mut [u8]) {
            buf.iter_mut().for_each(|b| *b = self.next() as u8);
        }
    }

    const ALL: [Profile; 3] = [
        Profile::AeadAes128Gcm,
        Profile::AeadAes256Gcm,
        Profile::Aes128CmSha1_80,
    ];

    /// Both sides of one session: (DTLS client, DTLS server).
    fn pair(profile: Profile, seed: u64) -> (Srtp, Srtp) {
        let mut rng = Rng(seed);
        let mut material = vec![0u8; profile.keying_material_len()];
        rng.fill(&mut material);
        let client = Srtp::new(profile, &material, true).expect("client");
        let server = Srtp::new(profile, &material, false).expect("server");
        (client, server)
    }

    /// A context with session keys given directly (RFC 7714 vectors are stated that way),
    /// the same for both directions.
    fn from_session_keys(profile: Profile, key: &[u8], salt: [u8; 12]) -> Srtp {
        let dir = || Direction {
            rtp: Keys::gcm(key, salt).expect("rtp"),
            rtcp: Keys::gcm(key, salt).expect("rtcp"),
        };
        Srtp {
            profile,
            tx: dir(),
            rx: dir(),
            next_srtcp_index: 1,
            replay: ReplayWindow::default(),
        }
    }

    fn rtp_packet(
        rng: &mut Rng,
        csrcs: usize,
        ext_words: Option<u16>,
        payload: usize,
    ) -> (Vec<u8>, usize) {
        let mut p = vec![
            0x80 | csrcs as u8,
            96,
            0x12,
            0x34,
            0,
            0,
            0x10,
            0,
            0xca,
            0xfe,
            0xba,
            0xbe,
        ];
        for _ in 0..csrcs {
            p.extend_from_slice(&(rng.next() as u32).to_be_bytes());
        }
        if let Some(words) = ext_words {
            p[0] |= 0x10;
            p.extend_from_slice(&[0xbe, 0xde]);
            p.extend_from_slice(&words.to_be_bytes());
            for _ in 0..words {
                p.extend_from_slice(&(rng.next() as u32).to_be_bytes());
            }
        }
        let header_len = p.len();
        let start = p.len();
        p.resize(start + payload, 0);
        rng.fill(&mut p[start..]);
        (p, header_len)
    }

    fn rtcp_packet(rng: &mut Rng, len: usize) -> Vec<u8> {
        let mut p = vec![0x81, 0xc8, 0, 0, 0x4d, 0x61, 0x72, 0x73];
        p.resize(len.max(8), 0);
        rng.fill(&mut p[8..]);
        p
    }

    // RFC 3711 Appendix B.2: AES-CM keystream, with the IV built by `cm_iv` from the salt
    // F0F1..FD, SSRC 0 and index 0.
    #[test]
    fn rfc3711_b2_aes_cm_keystream() {
        let key = EncryptingKey::ctr(
            UnboundCipherKey::new(&AES_128, &hex("2B7E151628AED2A6ABF7158809CF4F3C")).unwrap(),
        )
        .unwrap();
        let iv = cm_iv(&arr("F0F1F2F3F4F5F6F7F8F9FAFBFCFD"), 0, 0);
        assert_eq!(iv, arr::<16>("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000"));
        let mut stream = vec![0u8; 1_044_512];
        ctr(&key, iv, &mut stream).unwrap();
        assert_eq!(
            stream[..48],
            hex("E03EAD0935C95E80E166B16DD92B4EB4
                 D23513162B02D0F72A43A2FE4A5F97AB
                 41E95B3BB0A2E8DD477901E4FCA894C0")[..]
        );
        assert_eq!(
            stream[stream.len() - 48..],
            hex("EC8CDF7398607CB0F2D21675EA9EA1E4
                 362B7C3C6773516318A077D7FC5073AE
                 6A2CC3787889374FBEB4C81B17BA6C44")[..]
        );
    }

    // RFC 3711 Appendix B.3: key derivation.
    #[test]
    fn rfc3711_b3_key_derivation() {
        let mk = hex("E1F97A0D3E018BE0D64FA32C06DE4139");
        let ms = hex("0EC675AD498AFEEBB6960B3AABE6");
        let mut enc = [0u8; 16];
        kdf(&mk, &ms, LABEL_RTP_ENC, &mut enc).unwrap();
        assert_eq!(enc, arr::<16>("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut salt = [0u8; 14];
        kdf(&mk, &ms, LABEL_RTP_SALT, &mut salt).unwrap();
        assert_eq!(salt, arr::<14>("30CBBC08863D8C85D49DB34A9AE1"));
        let mut auth = [0u8; 20];
        kdf(&mk, &ms, LABEL_RTP_AUTH, &mut auth).unwrap();
        assert_eq!(auth, arr::<20>("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4"));
    }

    const RFC7714_RTP: &str = "8040f17b8041f8d35501a0b2
        47616c6c696120657374206f6d6e69732064697669736120696e207061727465732074726573";
    const RFC7714_RTCP: &str = "81c8000d4d6172734e5450314e545032525450200000042a0000e930
        4c756e61deadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
    const RFC7714_SALT: &str = "517569642070726f2071756f";

    fn rfc7714_case(profile: Profile, key: &str, srtp: &str, srtcp: &str, srtcp_auth_only: &str) {
        let mut ctx = from_session_keys(profile, &hex(key), arr(RFC7714_SALT));
        let plain = hex(RFC7714_RTP);
        let mut buf = plain.clone();
        ctx.protect_rtp(&mut buf, 0, 12, 0).unwrap();
        assert_eq!(buf, hex(srtp), "§16 protect");
        let mut out = Vec::new();
        ctx.unprotect_rtp(&buf, 0, &mut out).unwrap();
        assert_eq!(out, plain, "§16 unprotect");

        let plain = hex(RFC7714_RTCP);
        let mut buf = plain.clone();
        ctx.next_srtcp_index = 0x5d4;
        ctx.protect_rtcp(&mut buf, 0).unwrap();
        assert_eq!(buf, hex(srtcp), "§17 protect");
        ctx.unprotect_rtcp(&buf, &mut out).unwrap();
        assert_eq!(out, plain, "§17 unprotect");

        // Authentication-only SRTCP (E = 0), a fresh receiver so the index is not a replay.
        let mut rx = from_session_keys(profile, &hex(key), arr(RFC7714_SALT));
        rx.unprotect_rtcp(&hex(srtcp_auth_only), &mut out).unwrap();
        assert_eq!(out, plain, "§17 auth-only unprotect");
    }

    // RFC 7714 §16.1.1/§16.1.2 (SRTP), §17.1 (SRTCP) and the authentication-only SRTCP
    // packet, AEAD_AES_128_GCM.
    #[test]
    fn rfc7714_aead_aes_128_gcm() {
        rfc7714_case(
            Profile::AeadAes128Gcm,
            "000102030405060708090a0b0c0d0e0f",
            "8040f17b8041f8d35501a0b2f24de3a3fb34de6cacba861c9d7e4bcabe633bd50d294e6f42a5f47a
             51c7d19b36de3adf8833899d7f27beb16a9152cf765ee4390cce",
            "81c8000d4d61727363e94885dcdab67ca727d7662f6b7e997ff5c0f76c06f32dc676a5f1730d6fda
             4ce09b4686303ded0bb9275bc84aa45896cf4d2fc5abf87245d9eade800005d4",
            "81c8000d4d6172734e5450314e545032525450200000042a0000e9304c756e61deadbeefdeadbeef
             deadbeefdeadbeefdeadbeef841dd9683dd78ec92ae58790125f62b3000005d4",
        );
    }

    // RFC 7714 §16.2.1/§16.2.2 (SRTP), §17.2 (SRTCP) and the authentication-only SRTCP
    // packet, AEAD_AES_256_GCM.
    #[test]
    fn rfc7714_aead_aes_256_gcm() {
        rfc7714_case(
            Profile::AeadAes256Gcm,
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
            "8040f17b8041f8d35501a0b232b1de78a822fe12ef9f78fa332e33aab18012389a58e2f3b50b2a02
             76ffae0f1ba63799b87b7aa3db36dfffd6b0f9bb7878d7a76c13",
            "81c8000d4d617273d50ae4d1f5ce5d304ba297e47d470c282c3ece5dbffe0a50a2eaa5c1110555be
             8415f658c61de0476f1b6fad1d1eb30c4446839f57ff6f6cb26ac3be800005d4",
            "81c8000d4d6172734e5450314e545032525450200000042a0000e9304c756e61deadbeefdeadbeef
             deadbeefdeadbeefdeadbeef91db4afbfeee5a978fab4393ed2615fe000005d4",
        );
    }

    /// libsrtp `test/srtp_driver.c` reference packets (not RFC vectors): master key and
    /// salt through the KDF, SSRC 0xcafebabe, first SRTCP packet = index 1.
    fn libsrtp_case(profile: Profile, key: &str, salt: &str, srtp: &str, srtcp: &str) {
        let (key, salt) = (hex(key), hex(salt));
        let mut ctx = Srtp::from_master(profile, &key, &salt, &key, &salt).unwrap();
        let rtp = hex("800f1234decafbadcafebabeabababababababababababababababab");
        let mut buf = rtp.clone();
        ctx.protect_rtp(&mut buf, 0, 12, 0).unwrap();
        assert_eq!(buf, hex(srtp));
        let mut out = Vec::new();
        ctx.unprotect_rtp(&buf, 0, &mut out).unwrap();
        assert_eq!(out, rtp);

        let rtcp = hex("81c8000bcafebabeabababababababababababababababab");
        let mut buf = rtcp.clone();
        ctx.protect_rtcp(&mut buf, 0).unwrap();
        assert_eq!(buf, hex(srtcp));
        ctx.unprotect_rtcp(&buf, &mut out).unwrap();
        assert_eq!(out, rtcp);
    }

    // libsrtp `srtp_validate`: AES_CM_128_HMAC_SHA1_80 with the RFC 3711 B.3 master key.
    #[test]
    fn libsrtp_aes_cm_128_reference_packets() {
        libsrtp_case(
            Profile::Aes128CmSha1_80,
            "e1f97a0d3e018be0d64fa32c06de4139",
            "0ec675ad498afeebb6960b3aabe6",
            "800f1234decafbadcafebabe4e55dc4ce79978d88ca4d215949d2402b78d6acc99ea179b8dbb",
            "81c8000bcafebabe7128035be487b9bdbef89041f977a5a880000001993e08cd54d6c1230798",
        );
    }

    // libsrtp `srtp_validate_gcm`: AEAD_AES_128_GCM from a 12-byte master salt. This pins the
    // GCM KDF salt alignment (salt in the high 96 bits of the 112-bit field).
    #[test]
    fn libsrtp_aead_aes_128_gcm_reference_packets() {
        libsrtp_case(
            Profile::AeadAes128Gcm,
            "000102030405060708090a0b0c0d0e0f",
            "a0a1a2a3a4a5a6a7a8a9aaab",
            "800f1234decafbadcafebabec5002ede04cfdd2eb91159e0880aa06ed2976826f796b201df3131a127e8a392",
            "81c8000bcafebabec98b8b5df0392a55852b6c21ac8e7025c52c6fbea2b3b446ea31123ba88ce61e80000001",
        );
    }

    // libsrtp `srtp_validate_aes_256` (AES_256_CM_HMAC_SHA1_80, RFC 6188 master key): not a
    // profile offered here, but it checks the AES-256 KDF PRF that AEAD_AES_256_GCM uses.
    #[test]
    fn libsrtp_aes_256_kdf_reference_packet() {
        let mk = hex("f0f04914b513f2763a1b1fa130f10e2998f6f6e43e4309d1e622a0e332b9f1b6");
        let ms = hex("3b04803de51ee7c96423ab5b78d2");
        let mut enc = [0u8; 32];
        let mut auth = [0u8; 20];
        let mut salt = [0u8; 14];
        kdf(&mk, &ms, LABEL_RTP_ENC, &mut enc).unwrap();
        kdf(&mk, &ms, LABEL_RTP_AUTH, &mut auth).unwrap();
        kdf(&mk, &ms, LABEL_RTP_SALT, &mut salt).unwrap();
        let dir = || Direction {
            rtp: Keys::cm(&enc, &auth, salt).unwrap(),
            rtcp: Keys::cm(&enc, &auth, salt).unwrap(),
        };
        let ctx = Srtp {
            profile: Profile::Aes128CmSha1_80,
            tx: dir(),
            rx: dir(),
            next_srtcp_index: 1,
            replay: ReplayWindow::default(),
        };
        let mut buf = hex("800f1234decafbadcafebabeabababababababababababababababab");
        ctx.protect_rtp(&mut buf, 0, 12, 0).unwrap();
        assert_eq!(
            buf,
            hex("800f1234decafbadcafebabef1d9de17ff251ff1aa007774b0b4b40da08d9d9a5b3a55d8873b")
        );
    }

    // An SRTCP packet captured from a browser, from str0m 0.25's tests (not an RFC vector):
    // checks the RFC 5764 keying-material layout and which side uses which keys.
    #[test]
    fn dtls_srtp_material_layout_interop() {
        let material = hex(
            "2CB02346B42276A672CFD143AEC2D5EEDDDE55F0AD7BCAC22666F1C6386173ED6EB25CB7D26A61A1
             EE2C210ADAE760AAA2FD67B672C41AED105F9D36",
        );
        let srtcp = hex(
            "80C800063CD7CC13B7C831DCB776CD8DC26FDA1D9BFC8EE6589A1A8A49289CAEB264200C37D2D0A4
             AFAC6385FFC60DEC7D06D4873DD3A8CC80000001B7BB526521D1E73C0FC0",
        );
        let plain = hex(
            "80c800063cd7cc13e2ee35c8604e618c26f32734000000430000140781ca00063cd7cc130110386e
             467532685766724d44724766346f0000",
        );
        let mut server = Srtp::new(Profile::Aes128CmSha1_80, &material, false).unwrap();
        let mut out = Vec::new();
        server.unprotect_rtcp(&srtcp, &mut out).unwrap();
        assert_eq!(out, plain);
        // The client side, first SRTCP packet, produces the very same bytes.
        let mut client = Srtp::new(Profile::Aes128CmSha1_80, &material, true).unwrap();
        let mut buf = plain.clone();
        client.protect_rtcp(&mut buf, 0).unwrap();
        assert_eq!(buf, srtcp);
        // And the client cannot read its own packets (the directions differ).
        assert_eq!(
            client.unprotect_rtcp(&srtcp, &mut out),
            Err(SrtpError::Auth)
        );
    }

    #[test]
    fn srtp_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Srtp>();
    }

    #[test]
    fn profile_lengths() {
        assert_eq!(Profile::AeadAes128Gcm.keying_material_len(), 56);
        assert_eq!(Profile::AeadAes256Gcm.keying_material_len(), 88);
        assert_eq!(Profile::Aes128CmSha1_80.keying_material_len(), 60);
        assert_eq!(Profile::AeadAes128Gcm.rtp_overhead(), 16);
        assert_eq!(Profile::Aes128CmSha1_80.rtp_overhead(), 10);
        assert_eq!(Profile::AeadAes256Gcm.rtcp_overhead(), 20);
        assert_eq!(Profile::Aes128CmSha1_80.rtcp_overhead(), 14);
        for p in ALL {
            let err = Srtp::new(p, &vec![0; p.keying_material_len() - 1], true).unwrap_err();
            assert!(matches!(err, SrtpError::KeyingMaterial { .. }), "{err}");
            let material = vec![0; p.keying_material_len()];
            assert_eq!(Srtp::new(p, &material, false).unwrap().profile(), p);
        }
    }

    #[test]
    fn rtp_round_trips_both_ways_with_csrcs_extensions_and_roc() {
        let mut rng = Rng(7);
        for p in ALL {
            let (client, server) = pair(p, 1);
            for (csrcs, ext, payload) in [
                (0, None, 0),
                (0, None, 1),
                (2, Some(3), 1200),
                (15, Some(0), 17),
            ] {
                for roc in [0, 1, 0xdead_beef, u32::MAX] {
                    let (plain, header_len) = rtp_packet(&mut rng, csrcs, ext, payload);
                    for (tx, rx) in [(&client, &server), (&server, &client)] {
                        // Packet in the middle of a larger buffer, as a send batch would have it.
                        let mut buf = vec![0xaa; 5];
                        buf.extend_from_slice(&plain);
                        tx.protect_rtp(&mut buf, 5, header_len, roc).unwrap();
                        assert_eq!(buf.len(), 5 + plain.len() + p.rtp_overhead());
                        assert_eq!(buf[5..5 + header_len], plain[..header_len]);
                        if payload > 4 {
                            assert_ne!(buf[5 + header_len..5 + plain.len()], plain[header_len..]);
                        }
                        let mut out = Vec::new();
                        rx.unprotect_rtp(&buf[5..], roc, &mut out).unwrap();
                        assert_eq!(out, plain);
                        // Wrong ROC or the sender's own keys: refused, `out` empty.
                        let wrong = rx.unprotect_rtp(&buf[5..], roc.wrapping_add(1), &mut out);
                        assert_eq!(wrong, Err(SrtpError::Auth));
                        assert!(out.is_empty());
                        assert_eq!(
                            tx.unprotect_rtp(&buf[5..], roc, &mut out),
                            Err(SrtpError::Auth)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rtp_tampering_any_byte_fails() {
        let mut rng = Rng(11);
        for p in ALL {
            let (client, server) = pair(p, 2);
            let (plain, header_len) = rtp_packet(&mut rng, 1, Some(1), 40);
            let mut buf = plain.clone();
            client.protect_rtp(&mut buf, 0, header_len, 3).unwrap();
            let mut out = Vec::new();
            for i in 0..buf.len() {
                for bit in [0x01, 0x80] {
                    let mut bad = buf.clone();
                    bad[i] ^= bit;
                    assert!(
                        server.unprotect_rtp(&bad, 3, &mut out).is_err(),
                        "{p:?} byte {i}"
                    );
                    assert!(out.is_empty());
                }
            }
            server.unprotect_rtp(&buf, 3, &mut out).unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn rtcp_round_trips_indices_increment_and_replays_are_refused() {
        let mut rng = Rng(5);
        for p in ALL {
            let (mut client, mut server) = pair(p, 3);
            let mut sent = Vec::new();
            for n in 0..300u32 {
                let plain = rtcp_packet(&mut rng, 8 + 4 * (n as usize % 20));
                let mut buf = plain.clone();
                client.protect_rtcp(&mut buf, 0).unwrap();
                assert_eq!(buf.len(), plain.len() + p.rtcp_overhead());
                let index_at = match p {
                    Profile::Aes128CmSha1_80 => buf.len() - 14,
                    _ => buf.len() - 4,
                };
                assert_eq!(
                    buf[index_at..index_at + 4],
                    (E_FLAG | (n + 1)).to_be_bytes()
                );
                sent.push((plain, buf));
            }
            let mut out = Vec::new();
            // Deliver 0..150 out of order inside the window: all accepted once.
            for i in (0..150)
                .rev()
                .filter(|i| i % 2 == 0)
                .chain((0..150).filter(|i| i % 2 == 1))
            {
                if 149 - i >= REPLAY_WINDOW as usize {
                    continue;
                }
                server.unprotect_rtcp(&sent[i].1, &mut out).unwrap();
                assert_eq!(out, sent[i].0);
            }
            // Every one of those again: replay.
            for (i, (_, pkt)) in sent.iter().enumerate().take(150) {
                let err = server.unprotect_rtcp(pkt, &mut out).unwrap_err();
                assert_eq!(err, SrtpError::Replay(i as u32 + 1));
                assert!(out.is_empty());
            }
            // Jump ahead; the old ones fall out of the window.
            server.unprotect_rtcp(&sent[299].1, &mut out).unwrap();
            assert_eq!(out, sent[299].0);
            assert_eq!(
                server.unprotect_rtcp(&sent[160].1, &mut out),
                Err(SrtpError::Replay(161))
            );
            server.unprotect_rtcp(&sent[200].1, &mut out).unwrap();
            assert_eq!(out, sent[200].0);
            // The other direction works too, with its own index.
            let plain = rtcp_packet(&mut rng, 28);
            let mut buf = plain.clone();
            server.protect_rtcp(&mut buf, 0).unwrap();
            client.unprotect_rtcp(&buf, &mut out).unwrap();
            assert_eq!(out, plain);
            // A context cannot read what it sent itself (the receive keys differ).
            let (_, mut fresh_server) = pair(p, 3);
            assert_eq!(
                fresh_server.unprotect_rtcp(&buf, &mut out),
                Err(SrtpError::Auth)
            );
        }
    }

    #[test]
    fn rtcp_tampering_any_byte_fails_and_leaves_the_window_alone() {
        let mut rng = Rng(13);
        for p in ALL {
            let (mut client, mut server) = pair(p, 4);
            let plain = rtcp_packet(&mut rng, 32);
            let mut buf = vec![1, 2, 3];
            buf.extend_from_slice(&plain);
            client.protect_rtcp(&mut buf, 3).unwrap();
            let pkt = &buf[3..];
            let mut out = Vec::new();
            for i in 0..pkt.len() {
                let mut bad = pkt.to_vec();
                bad[i] ^= 0x04;
                assert_eq!(
                    server.unprotect_rtcp(&bad, &mut out),
                    Err(SrtpError::Auth),
                    "{p:?} {i}"
                );
                assert!(out.is_empty());
                // Clearing E: the packet then claims to be unencrypted, still refused.
                let mut bad = pkt.to_vec();
                let e_at = match p {
                    Profile::Aes128CmSha1_80 => bad.len() - 14,
                    _ => bad.len() - 4,
                };
                bad[e_at] &= 0x7f;
                assert_eq!(server.unprotect_rtcp(&bad, &mut out), Err(SrtpError::Auth));
            }
            // Nothing above entered the replay window.
            server.unprotect_rtcp(pkt, &mut out).unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn protect_refuses_bad_layouts_without_touching_the_buffer() {
        for p in ALL {
            let (mut client, _) = pair(p, 6);
            let orig = vec![0x80; 20];
            for (start, header_len) in [(21, 12), (0, 11), (0, 21), (10, 12), (usize::MAX, 12)] {
                let mut buf = orig.clone();
                let err = client
                    .protect_rtp(&mut buf, start, header_len, 0)
                    .unwrap_err();
                assert!(matches!(err, SrtpError::Layout { .. }), "{err}");
                assert_eq!(buf, orig);
            }
            let mut buf = orig.clone();
            assert!(client.protect_rtcp(&mut buf, 13).is_err());
            assert!(client.protect_rtcp(&mut buf, 21).is_err());
            assert_eq!(buf, orig);
            // Header-only RTP and 8-byte RTCP are fine.
            client.protect_rtp(&mut buf, 8, 12, 0).unwrap();
            let mut buf = orig.clone();
            client.protect_rtcp(&mut buf, 12).unwrap();
        }
    }

    #[test]
    fn srtcp_index_is_never_reused() {
        for p in ALL {
            let (mut client, _) = pair(p, 8);
            client.next_srtcp_index = SRTCP_INDEX_MASK;
            let mut buf = vec![0x81; 8];
            client.protect_rtcp(&mut buf, 0).unwrap();
            let mut buf = vec![0x81; 8];
            assert_eq!(
                client.protect_rtcp(&mut buf, 0),
                Err(SrtpError::SrtcpIndexExhausted)
            );
            assert_eq!(buf, vec![0x81; 8]);
        }
    }

    #[test]
    fn protect_does_not_reallocate_with_capacity() {
        let mut rng = Rng(9);
        for p in ALL {
            let (mut client, _) = pair(p, 10);
            let (plain, header_len) = rtp_packet(&mut rng, 0, None, 1200);
            let mut buf = Vec::with_capacity(plain.len() + p.rtp_overhead());
            buf.extend_from_slice(&plain);
            let ptr = buf.as_ptr();
            client.protect_rtp(&mut buf, 0, header_len, 0).unwrap();
            assert_eq!((buf.as_ptr(), buf.len()), (ptr, buf.capacity()));
            let plain = rtcp_packet(&mut rng, 100);
            let mut buf = Vec::with_capacity(plain.len() + p.rtcp_overhead());
            buf.extend_from_slice(&plain);
            let ptr = buf.as_ptr();
            client.protect_rtcp(&mut buf, 0).unwrap();
            assert_eq!((buf.as_ptr(), buf.len()), (ptr, buf.capacity()));
        }
    }

    #[test]
    fn replay_window_edges() {
        let mut w = ReplayWindow::default();
        for i in [0, SRTCP_INDEX_MASK] {
            assert!(w.check(i).is_ok());
        }
        w.accept(500);
        assert_eq!(w.check(500), Err(SrtpError::Replay(500)));
        assert!(w.check(500 - 127).is_ok());
        assert_eq!(w.check(500 - 128), Err(SrtpError::Replay(372)));
        w.accept(500 + 1000);
        assert!(w.check(500).is_err());
        assert!(w.check(1499).is_ok());
        w.accept(1499);
        assert!(w.check(1499).is_err());
        w.accept(SRTCP_INDEX_MASK);
        assert!(w.check(SRTCP_INDEX_MASK).is_err());
        assert!(w.check(1499).is_err());
    }

    /// Random bytes, truncations and mutations of valid packets: errors, never panics.
    #[test]
    fn unprotect_never_panics_on_garbage() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = Vec::new();
        for p in ALL {
            let (mut client, mut server) = pair(p, 12);
            let (plain, header_len) = rtp_packet(&mut rng, 2, Some(2), 60);
            let mut rtp = plain.clone();
            client.protect_rtp(&mut rtp, 0, header_len, 1).unwrap();
            let mut rtcp = rtcp_packet(&mut rng, 40);
            client.protect_rtcp(&mut rtcp, 0).unwrap();
            for len in 0..=rtp.len() {
                assert!(
                    server.unprotect_rtp(&rtp[..len], 1, &mut out).is_err() || len == rtp.len()
                );
            }
            for len in 0..rtcp.len() {
                assert!(server.unprotect_rtcp(&rtcp[..len], &mut out).is_err());
            }
            let mut pkt = vec![0u8; 256];
            for round in 0..20_000 {
                let len = rng.below(pkt.len());
                let pkt = &mut pkt[..len];
                match round % 3 {
                    0 => rng.fill(pkt),
                    1 => {
                        let n = len.min(rtp.len());
                        pkt[..n].copy_from_slice(&rtp[..n]);
                        if n > 0 {
                            pkt[rng.below(n)] = rng.next() as u8;
                        }
                    }
                    _ => {
                        let n = len.min(rtcp.len());
                        pkt[..n].copy_from_slice(&rtcp[..n]);
                        if n > 0 {
                            pkt[rng.below(n)] = rng.next() as u8;
                        }
                    }
                }
                // Mostly version-2 packets, so the parsing past the first byte is exercised.
                if round % 2 == 0 && !pkt.is_empty() {
                    pkt[0] = (pkt[0] & 0x3f) | 0x80;
                }
                if server
                    .unprotect_rtp(pkt, rng.next() as u32, &mut out)
                    .is_err()
                {
                    assert!(out.is_empty());
                }
                if server.unprotect_rtcp(pkt, &mut out).is_err() {
                    assert!(out.is_empty());
                }
            }
            // The valid ones still go through afterwards.
            server.unprotect_rtp(&rtp, 1, &mut out).unwrap();
            assert_eq!(out, plain);
        }
    }
}
