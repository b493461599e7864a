//! The SRTP keys of a viewer's DTLS handshake, so that castnode can encrypt media itself.
//!
//! str0m does ICE and DTLS for every peer, and keeps the DTLS-SRTP keying material to itself.
//! castnode packetizes a frame once for all viewers and encrypts each viewer's copy with that
//! viewer's keys ([`super::sender`]), so it needs them: str0m is built here with a crypto
//! provider whose DTLS factory makes the dimpl instances itself, and each one created for a
//! viewer copies the keying material it hands to str0m into that viewer's [`KeySlot`].
//!
//! The same provider also makes DTLS cheaper to set up: str0m's default builds a new dimpl
//! configuration for every session, and dimpl validates its crypto provider on every build
//! (test key generations, agreements and signature checks on three curves: about 1 ms, on the
//! one driver task, per viewer). Here every session's dimpl instance shares one configuration,
//! built and validated once per MTU.
//!
//! Guarantees: the DTLS handshake itself is dimpl's with aws-lc-rs, configured as str0m does
//! (no server cookie, str0m's MTU and DTLS version); an `Rtc` built with [`build`] fills its
//! slot exactly once, when its handshake completes; one built otherwise (a WHIP publisher) gets
//! no slot.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};
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
pub(crate) type KeySlot = Arc<OnceLock<Keying>>;

thread_local! {
    /// The slot for the DTLS instance being created by [`build`] on this thread.
    static NEXT: RefCell<Option<KeySlot>> = const { RefCell::new(None) };
}

/// Builds an `RtcConfig`'s `Rtc` with castnode's DTLS provider (shared dimpl configuration), for
/// sessions whose keys castnode does not need (WHIP publishers).
pub fn build_plain(config: RtcConfig, now: Instant) -> Rtc {
    config.set_crypto_provider(provider()).build(now)
}

/// Builds an `Rtc` whose DTLS keying material will be copied into the returned slot.
pub(crate) fn build(config: RtcConfig, now: Instant) -> (Rtc, KeySlot) {
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
        let config = dimpl_config(mtu)?;
        let cert = dimpl::DtlsCertificate {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            #[allow(unreachable_patterns)]
            other => {
                return Err(CryptoError::Other(format!(
                    "unsupported DTLS version: {other}"
                )));
            }
        };
        let slot = NEXT.with(|n| n.borrow_mut().take());
        Ok(Box::new(Capturing { dtls, slot }))
    }
}

/// The dimpl configuration of every session with this MTU, built (and its crypto provider
/// validated) once.
fn dimpl_config(mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
    static CONFIGS: Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>> = Mutex::new(Vec::new());
    let mut configs = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = configs.iter().find(|(m, _)| *m == mtu) {
        return Ok(c.clone());
    }
    // As str0m's aws-lc-rs provider configures it: ICE has checked return routability before
    // DTLS starts, so server cookies are redundant.
    let mut builder = dimpl::Config::builder().use_server_cookie(false);
    if let Some(mtu) = mtu {
        builder = builder.mtu(mtu);
    }
    let config = Arc::new(
        builder
            .build()
            .map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))?,
    );
    configs.push((mtu, config.clone()));
    Ok(config)
}

/// A dimpl instance that copies its SRTP keying material into `slot`, when it has one.
struct Capturing {
    dtls: dimpl::Dtls,
    slot: Option<KeySlot>,
}

impl std::fmt::Debug for Capturing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capturing").finish_non_exhaustive()
    }
}

impl DtlsInstance for Capturing {
    fn set_active(&mut self, active: bool) {
        self.dtls.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.dtls.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        let client = self.dtls.is_active();
        let out = self.dtls.poll_output(buf);
        if let DtlsOutput::KeyingMaterial(material, profile) = &out
            && let Some(slot) = &self.slot
        {
            let profile = match *profile {
                SrtpProfile::AEAD_AES_128_GCM => Some(Profile::AeadAes128Gcm),
                SrtpProfile::AEAD_AES_256_GCM => Some(Profile::AeadAes256Gcm),
                SrtpProfile::AES128_CM_SHA1_80 => Some(Profile::Aes128CmSha1_80),
                #[allow(unreachable_patterns)]
                _ => None,
            };
            if let Some(profile) = profile {
                let _ = slot.set(Keying {
                    material: material.to_vec(),
                    profile,
                    client,
                });
            }
        }
        out
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.dtls.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.dtls.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.dtls.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.dtls.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.dtls.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.dtls.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.dtls.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`build`] relies on str0m creating the `Rtc`'s DTLS instance inside `RtcConfig::build`,
    /// on the calling thread, while the thread-local holds the slot: the slot is then shared
    /// with exactly that instance, and nothing is left behind for a later build.
    #[test]
    fn the_slot_goes_to_the_dtls_instance_of_the_rtc_built_with_it() {
        let (rtc, slot) = build(Rtc::builder(), Instant::now());
        // One reference here, one in the Rtc's DTLS instance.
        assert_eq!(
            Arc::strong_count(&slot),
            2,
            "str0m did not create DTLS in build()"
        );
        assert!(NEXT.with(|n| n.borrow().is_none()));
        // A later build on this thread, plain or not, gets no share of it.
        let plain = build_plain(Rtc::builder(), Instant::now());
        let (other, other_slot) = build(Rtc::builder(), Instant::now());
        assert_eq!(Arc::strong_count(&slot), 2);
        assert_eq!(Arc::strong_count(&other_slot), 2);
        drop(rtc);
        assert_eq!(Arc::strong_count(&slot), 1);
        drop((plain, other));
        assert_eq!(Arc::strong_count(&other_slot), 1);
    }
}
