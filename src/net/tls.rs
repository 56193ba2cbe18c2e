//! rustls client configurations (ring provider only) and PEM roots.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::ConfigError;

/// A client's TLS settings: extra roots beside webpki's, or a whole
/// configuration of the user's. One type behind both clients' setters.
#[derive(Clone, Default)]
pub(crate) struct TlsOptions {
    roots: Vec<CertificateDer<'static>>,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl TlsOptions {
    pub(crate) fn add_root(&mut self, der: CertificateDer<'static>) {
        self.roots.push(der);
    }

    /// Adds every certificate of a PEM document ([`parse_pem`]).
    pub(crate) fn add_pem(&mut self, pem: &[u8]) -> Result<(), ConfigError> {
        self.roots.extend(parse_pem(pem)?);
        Ok(())
    }

    pub(crate) fn set_config(&mut self, config: Arc<rustls::ClientConfig>) {
        self.config = Some(config);
    }

    /// The user's configuration, or webpki's roots plus the extra ones
    /// offering `alpn`.
    pub(crate) fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        self.config
            .clone()
            .unwrap_or_else(|| Arc::new(tls_config(&self.roots, alpn)))
    }

    pub(crate) fn extra_roots(&self) -> usize {
        self.roots.len()
    }
}

/// A rustls client configuration on the ring provider with webpki's roots
/// and `extra` roots, offering `alpn` (empty for none).
pub(crate) fn tls_config(
    extra: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        if let Err(e) = roots.add(cert.clone()) {
            tracing::warn!(error = %e, "extra root certificate refused");
        }
    }
    // NOTE: ring only; with two providers compiled in, rustls cannot pick
    // a default and some connectors panic (DESIGN "Dependencies").
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
    .unwrap_or_else(|e| unreachable!("ring supports the default protocol versions: {e}"));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Every certificate in a PEM document, for `with_root_pem`.
///
/// # Errors
///
/// [`ConfigError`] naming `root certificate` when the PEM does not parse or
/// holds no certificate.
pub(crate) fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let shown = || String::from_utf8_lossy(&pem[..pem.len().min(40)]).into_owned();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ConfigError::new("root certificate", shown(), e.to_string()))?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            "root certificate",
            shown(),
            "no certificate in the PEM",
        ));
    }
    Ok(certs)
}
