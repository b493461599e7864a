//! What a connected viewer's ICE still needs once str0m's `Rtc` is let go: answering the
//! browser's consent checks (RFC 7675), as an ICE-lite agent does.
//!
//! A viewer's `Rtc` (SDP state, ICE agent, DTLS, stream bookkeeping) costs tens of KiB and,
//! once the media sender has the SRTP keys and the DTLS handshake is well over, does nothing
//! but answer STUN binding requests. [`Consent`] does that with the local ICE credentials
//! alone, so the driver drops the `Rtc` (see `HANDOVER_AFTER` in [`super::table`]).
//!
//! Guarantees: only binding requests whose USERNAME starts with our ufrag and whose
//! MESSAGE-INTEGRITY verifies with our password are answered (with XOR-MAPPED-ADDRESS,
//! MESSAGE-INTEGRITY and FINGERPRINT); anything else is ignored without panicking. Consent
//! expires [`CONSENT_TIMEOUT`] after the last valid request, as RFC 7675 §5.1 has the
//! checking side give up after 30 s.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use str0m::ice::StunMessage;

/// A viewer whose browser sent no valid consent check for this long has gone.
pub(crate) const CONSENT_TIMEOUT: Duration = Duration::from_secs(30);

/// HMAC-SHA1 over the concatenation of `parts` (STUN MESSAGE-INTEGRITY).
fn sha1_hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// The consent-check responder of one viewer.
#[derive(Debug)]
pub(crate) struct Consent {
    /// `"{local ufrag}:"`, what a check's USERNAME starts with.
    prefix: String,
    pwd: String,
    last: Instant,
}

impl Consent {
    /// A responder for the local ICE credentials `ufrag` / `pwd`; consent starts fresh at `now`.
    pub(crate) fn new(ufrag: &str, pwd: &str, now: Instant) -> Self {
        Self {
            prefix: format!("{ufrag}:"),
            pwd: pwd.to_string(),
            last: now,
        }
    }

    /// Handles a datagram from `source`: when it is a valid binding request for us, appends
    /// the answer to `out` and returns true.
    pub(crate) fn handle(
        &mut self,
        datagram: &[u8],
        source: SocketAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> bool {
        let Ok(msg) = StunMessage::parse(datagram) else {
            return false;
        };
        if !msg.is_binding_request()
            || !msg.username().is_some_and(|u| u.starts_with(&self.prefix))
            || !msg.verify(self.pwd.as_bytes(), sha1_hmac)
        {
            return false;
        }
        let reply = StunMessage::binding_reply(msg.trans_id(), source);
        let start = out.len();
        out.resize(start + 256, 0);
        match reply.to_bytes(Some(self.pwd.as_bytes()), &mut out[start..], sha1_hmac) {
            Ok(n) => {
                out.truncate(start + n);
                self.last = now;
                true
            }
            Err(_) => {
                out.truncate(start);
                false
            }
        }
    }

    /// No valid check for [`CONSENT_TIMEOUT`].
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last) > CONSENT_TIMEOUT
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use str0m::ice::TransId;

    /// A STUN binding request for `username`, signed with `pwd` (also the session table's tests').
    pub(crate) fn request(username: &str, pwd: &str) -> Vec<u8> {
        let msg = StunMessage::binding_request(username, TransId::new(), true, 0, 12345, false);
        let mut buf = vec![0u8; 512];
        let n = msg
            .to_bytes(Some(pwd.as_bytes()), &mut buf, sha1_hmac)
            .unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn answers_valid_checks_only() {
        let now = Instant::now();
        let mut c = Consent::new("srv", "server-password-123456", now);
        let source: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let mut out = Vec::new();
        let later = now + Duration::from_secs(20);
        assert!(c.handle(
            &request("srv:brw", "server-password-123456"),
            source,
            later,
            &mut out
        ));
        let reply = StunMessage::parse(&out).unwrap();
        assert!(reply.is_successful_binding_response());
        assert_eq!(reply.mapped_address(), Some(source));
        assert!(reply.verify(b"server-password-123456", sha1_hmac));
        assert!(!c.expired(later + CONSENT_TIMEOUT));
        // Wrong password, wrong ufrag, garbage: ignored, consent not refreshed.
        let mut out = Vec::new();
        assert!(!c.handle(&request("srv:brw", "wrong"), source, later, &mut out));
        assert!(!c.handle(
            &request("other:brw", "server-password-123456"),
            source,
            later,
            &mut out
        ));
        assert!(!c.handle(&[0, 1, 0, 0, 1, 2, 3], source, later, &mut out));
        assert!(out.is_empty());
        assert!(c.expired(later + CONSENT_TIMEOUT + Duration::from_secs(1)));
    }
}
