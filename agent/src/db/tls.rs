//! TLS for both sides, with libpq's `sslmode` semantics, on rustls (ring).
//!
//! - `disable`: no TLS; `allow`/`prefer`: TLS when the server offers it,
//!   certificate not checked;
//! - `require`: TLS; the certificate is not checked, unless `sslrootcert` is
//!   given, in which case its chain is (as libpq does);
//! - `verify-ca`: the chain must lead to a trusted root;
//! - `verify-full`: the chain, and the host name (or IP) must match.
//!
//! Trusted roots are the PEM bundle named by `sslrootcert` (RDS: its global
//! bundle), else the Mozilla roots. tokio-postgres knows only the first modes
//! and rejects `sslrootcert`, so pgferry takes those parameters out of the URL
//! and does the checking in its own verifier.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::ConfigError;

/// What the URL asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if offered, unchecked.
    Prefer,
    /// TLS, unchecked (checked against `sslrootcert` when given).
    Require,
    /// TLS, chain checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling, for `PGSSLMODE` of child processes.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The nearest mode tokio-postgres understands (checking is ours).
    fn driver_mode(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        }
    }
}

/// TLS settings of one endpoint.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The mode.
    pub mode: SslMode,
    /// A PEM bundle of trusted roots.
    pub root_cert: Option<PathBuf>,
}

/// Percent-decodes a URL component.
pub fn decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Takes `sslmode` and `sslrootcert` out of a libpq URL: returns the URL
/// for tokio-postgres (with a mode it understands) and the settings.
pub fn split_url(url: &str) -> Result<(String, TlsSettings), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let mut mode = SslMode::Prefer;
    let mut root_cert = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => {
                mode = match decode(v).as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("unknown sslmode {other:?}")),
                }
            }
            "sslrootcert" => root_cert = Some(PathBuf::from(decode(v))),
            "sslcert" | "sslkey" => {
                return Err("client certificates (sslcert, sslkey) are not supported yet".into());
            }
            _ => kept.push(pair.to_string()),
        }
    }
    kept.push(format!("sslmode={}", mode.driver_mode()));
    Ok((
        format!("{base}?{}", kept.join("&")),
        TlsSettings { mode, root_cert },
    ))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the connector for these settings. Reads the root bundle now, so a
/// missing or unreadable file is a configuration error up front.
pub fn connector(s: &TlsSettings) -> Result<MakeRustlsConnect, ConfigError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    match &s.root_cert {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<_, _>>())
                .map_err(|e| {
                    ConfigError::Invalid(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError::Invalid(format!(
                    "sslrootcert {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let check_chain = matches!(s.mode, SslMode::VerifyCa | SslMode::VerifyFull)
        || (s.mode == SslMode::Require && s.root_cert.is_some());
    let verifier: Arc<dyn ServerCertVerifier> = if check_chain {
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| ConfigError::Invalid(format!("TLS roots unusable: {e}")))?;
        Arc::new(Checked {
            inner: webpki,
            check_host: s.mode == SslMode::VerifyFull,
        })
    } else {
        Arc::new(Unchecked(provider.clone()))
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("TLS setup failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Chain checked by webpki; the host name too for verify-full.
#[derive(Debug)]
struct Checked {
    inner: Arc<WebPkiServerVerifier>,
    check_host: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_host => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Encryption without checking who is at the other end (sslmode=require
/// without roots, prefer): the handshake signatures are still verified.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// True when a connection error came from the TLS layer (handshake or
/// certificate), found by walking the error's sources.
pub fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_tls_parameters_out_of_the_url() {
        let (url, s) =
            split_url("postgres://u:p@h:5432/db?sslmode=verify-full&sslrootcert=%2Fetc%2Frds%20ca.pem&application_name=x")
                .unwrap();
        assert_eq!(url, "postgres://u:p@h:5432/db?application_name=x&sslmode=require");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/rds ca.pem")));
        let (url, s) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=prefer");
        assert_eq!(s.mode, SslMode::Prefer);
        assert!(split_url("postgres://u@h/db?sslmode=bogus").is_err());
        assert!(split_url("postgres://u@h/db?sslcert=a").is_err());
    }

    #[test]
    fn a_missing_root_bundle_is_refused_up_front() {
        let s = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        };
        let err = connector(&s).err().expect("a missing bundle is refused");
        assert!(err.to_string().contains("sslrootcert"));
        let s = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: None,
        };
        assert!(connector(&s).is_ok());
    }
}
