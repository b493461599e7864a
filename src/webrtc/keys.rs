//! The SRTP keys of a viewer's DTLS handshake, so that castnode can encrypt media itself.
//!
//! str0m does ICE and DTLS for every peer, and keeps the DTLS-SRTP keying material to itself.
//! castnode packetizes a frame once for all viewers and encrypts each viewer's copy with that
//! viewer's keys ([`super::sender`]), so it needs them: the crypto provider str0m is built with
//! here wraps the default DTLS provider, and each DTLS instance created for a viewer copies the
//! keying material it hands to str0m into that viewer's [`KeySlot`].
//!
//! Guarantees: the DTLS handshake itself is str0m's and aws-lc-rs's, unchanged; an `Rtc` built
//! with [`build`] fills its slot exactly once, when its handshake completes; one built otherwise
//! (a WHIP publisher) is untouched.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use str0m::crypto::dtls::{
    DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
    SrtpProfile,
};
use str0m::crypto::{CryptoError, CryptoProvider};
use str0m::{Rtc, RtcConfig};

use super::srtp::Profile;

/// What a completed DTLS-SRTP handshake exported.
#[derive(Debug)]
pub struct Keying {
    /// Keying material, laid out as RFC 5764 §4.2.
    pub material: Vec<u8>,
    /// The negotiated protection profile.
    pub profile: Profile,
    /// This side was the DTLS client.
    pub client: bool,
}

/// Where a session's keys land once its handshake completes.
pub type KeySlot = Arc<OnceLock<Keying>>;

thread_local! {
    /// The slot for the DTLS instance being created by [`build`] on this thread.
    static NEXT: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// Builds an `Rtc` whose DTLS keying material will be copied into the returned slot.
pub fn build(config: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
    let slot = KeySlot::default();
    NEXT.with(|n| *n.borrow_mut() = Some(slot.clone()));
    let rtc = config.set_crypto_provider(provider()).build(now);
    NEXT.with(|n| n.borrow_mut().take());
    (rtc, slot)
}

/// The default crypto provider with the capturing DTLS provider in place of its own.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let base = str0m::crypto::from_feature_flags();
            let dtls: &'static Capture = Box::leak(Box::new(Capture(base.dtls_provider)));
            Arc::new(CryptoProvider {
                dtls_provider: dtls,
                ..base
            })
        })
        .clone()
}

#[derive(Debug)]
struct Capture(&'static dyn DtlsProvider);

impl DtlsProvider for Capture {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.0.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = self.0.new_dtls(cert, now, dtls_version, mtu)?;
        match NEXT.with(|n| n.borrow_mut().take()) {
            Some(slot) => Ok(Box::new(Capturing { inner, slot })),
            None => Ok(inner),
        }
    }
}

#[derive(Debug)]
struct Capturing {
    inner: Box<dyn DtlsInstance>,
    slot: KeySlot,
}

impl DtlsInstance for Capturing {
    fn set_active(&mut self, active: bool) {
        self.inner.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.inner.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let client = self.inner.is_active();
        let out = self.inner.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(material, profile) = &out {
            let profile = match *profile {
                SrtpProfile::AEAD_AES_128_GCM => Some(Profile::AeadAes128Gcm),
                SrtpProfile::AEAD_AES_256_GCM => Some(Profile::AeadAes256Gcm),
                SrtpProfile::AES128_CM_SHA1_80 => Some(Profile::Aes128CmSha1_80),
                #[allow(unreachable_patterns)]
                _ => None,
            };
            if let Some(profile) = profile {
                let _ = self.slot.set(Keying {
                    material: material.to_vec(),
                    profile,
                    client,
                });
            }
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.inner.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.inner.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.inner.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.inner.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.inner.close()
    }
}
