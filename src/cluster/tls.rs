//! TLS for the cluster link: QUIC endpoints' rustls configurations (aws-lc-rs, TLS 1.3 only,
//! ALPN [`super::wire::ALPN`]).
//!
//! Two ways to run:
//! - **Token only** (the default): each node makes a self-signed certificate at start; clients
//!   accept any server certificate, and both ends prove the cluster token over the TLS exporter
//!   of *this* connection ([`exporter`]), so a peer without the token — or a man in the middle,
//!   whose two connections have different exporters — gets nothing.
//! - **With a CA** (`--cluster-cert`, `--cluster-key`, `--cluster-ca`): the node presents the
//!   operator's certificate and verifies servers against the CA, on top of the token.

use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::wire::{ALPN, EXPORTER_LABEL, EXPORTER_LEN};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read or used.
    #[error("{0}")]
    File(String),
    /// rustls or rcgen refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Certificate files given by the operator.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles<'a> {
    /// PEM certificate chain this node presents.
    pub cert: Option<&'a Path>,
    /// PEM private key of that certificate.
    pub key: Option<&'a Path>,
    /// PEM CA certificates servers are verified against.
    pub ca: Option<&'a Path>,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File(format!("{}: {e}", path.display())))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let pem = read_pem(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::File(format!(
            "{}: no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The QUIC server configuration: the operator's certificate, or a fresh self-signed one.
pub fn server_config(node_id: &str, files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let (chain, key) = match (files.cert, files.key) {
        (Some(cert), Some(key)) => {
            let pem = read_pem(key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| TlsError::File(format!("{}: {e}", key.display())))?;
            (certs(cert)?, key)
        }
        (None, None) => {
            let name = format!("{node_id}.castnode");
            let ck = rcgen::generate_simple_self_signed(vec![name, "castnode".into()])
                .map_err(|e| TlsError::Config(e.to_string()))?;
            let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
            (vec![ck.cert.der().clone()], key)
        }
        _ => {
            return Err(TlsError::File(
                "--cluster-cert and --cluster-key go together".into(),
            ));
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// The QUIC client configuration: servers verified against `--cluster-ca`, or (token-only mode)
/// any server certificate accepted, the token proof doing the authentication.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = match files.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::File(format!("{}: {e}", ca.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TokenOnly(
                provider().signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

/// Transport settings: many concurrent group streams, keep-alives so an idle link stays up and a
/// dead one (a killed peer sends nothing) is noticed within 750 ms.
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(1024u32.into());
    t.max_concurrent_bidi_streams(16u32.into());
    t.keep_alive_interval(Some(std::time::Duration::from_millis(150)));
    t.max_idle_timeout(Some(
        std::time::Duration::from_millis(750)
            .try_into()
            .expect("750 ms is a valid idle timeout"),
    ));
    // Video bursts (a keyframe) should not wait for flow-control credit on a fast link.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    // Loss-based congestion control (Cubic) collapses on links with random loss (a 2 % lossy
    // 80 ms path carries about 1 Mbit/s with it); BBR paces to the measured bandwidth instead.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

/// 32 bytes of this connection's TLS exporter: what the token proofs are computed over.
pub fn exporter(conn: &quinn::Connection) -> Option<[u8; EXPORTER_LEN]> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

/// Accepts any server certificate (signatures on the handshake are still checked): the cluster
/// token, proven over the TLS exporter, authenticates the peer.
#[derive(Debug)]
struct TokenOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for TokenOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}
