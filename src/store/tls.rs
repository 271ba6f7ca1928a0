//! TLS to PostgreSQL with the standard `sslmode` semantics (libpq's):
//!
//! | sslmode       | encrypted         | certificate chain checked | host name checked |
//! |---------------|-------------------|---------------------------|-------------------|
//! | `disable`     | no                | -                         | -                 |
//! | `prefer`      | if the server can | no                        | no                |
//! | `require`     | yes, or fail      | only with `sslrootcert`   | no                |
//! | `verify-ca`   | yes, or fail      | yes                       | no                |
//! | `verify-full` | yes, or fail      | yes                       | yes               |
//!
//! `sslmode` and `sslrootcert` may be in the URL's query or in
//! `[database]`; the config keys win. Without `sslrootcert`, the verifying
//! modes trust the system's roots. A mode that requires TLS never falls
//! back to plaintext: the connection fails, naming the host and the reason.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;

/// `sslmode`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" | "allow" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }
}

/// The TLS part of a database URL, taken out of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// Splits `sslmode`/`sslrootcert` off a URL (or key=value string), which
/// tokio-postgres would otherwise reject for the verify modes. Returns the
/// rest, for tokio-postgres, and the options (default: `prefer`).
pub fn split_url(raw: &str) -> Result<(String, TlsOptions), String> {
    let mut mode = None;
    let mut root_cert = None;
    let mut take = |k: &str, v: &str| -> Result<bool, String> {
        match k {
            "sslmode" => mode = Some(v.parse::<SslMode>()?),
            "sslrootcert" => root_cert = Some(PathBuf::from(v)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        let mut url = url::Url::parse(raw).map_err(|e| format!("invalid URL: {e}"))?;
        let mut kept = Vec::new();
        for (k, v) in url.query_pairs() {
            if !take(&k, &v)? {
                kept.push((k.into_owned(), v.into_owned()));
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        url.to_string()
    } else {
        let mut kept = Vec::new();
        for part in raw.split_whitespace() {
            match part.split_once('=') {
                Some((k, v)) if take(k, v)? => {}
                _ => kept.push(part),
            }
        }
        kept.join(" ")
    };
    Ok((
        rest,
        TlsOptions {
            mode: mode.unwrap_or(SslMode::Prefer),
            root_cert,
        },
    ))
}

impl TlsOptions {
    /// What tokio-postgres is told: whether TLS may be skipped.
    pub fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        }
    }

    /// The rustls client configuration for this mode (`None` for `disable`).
    pub fn client_config(&self) -> Result<Option<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let verify_chain = matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
            || (self.mode == SslMode::Require && self.root_cert.is_some());
        let config = match self.mode {
            SslMode::Disable => return Ok(None),
            _ if !verify_chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { chain: None, provider }))
                .with_no_client_auth(),
            _ => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                    .build()
                    .map_err(|e| format!("TLS verifier: {e}"))?;
                if self.mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(Lenient {
                            chain: Some(webpki),
                            provider,
                        }))
                        .with_no_client_auth()
                }
            }
        };
        Ok(Some(config))
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                if certs.is_empty() {
                    return Err(format!("sslrootcert {}: no PEM certificate in it", path.display()));
                }
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err("no sslrootcert given and no system root certificates found".into());
                }
            }
        }
        Ok(roots)
    }
}

/// The checks weaker than `verify-full`, as libpq has them:
/// - `chain: None` (`prefer`, and `require` without a root certificate):
///   encrypts without checking who is on the other end;
/// - `chain: Some` (`verify-ca`): the chain must lead to a trusted root, the
///   name may differ.
///
/// The handshake signatures are checked either way, so the session is at
/// least consistent.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_options_are_taken_out_of_urls_and_key_value_strings() {
        let (rest, o) = split_url("postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem&connect_timeout=5")
            .expect("valid");
        assert_eq!(rest, "postgres://u:p@db:5432/x?connect_timeout=5");
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.root_cert, Some(PathBuf::from("/ca.pem")));
        let (rest, o) = split_url("host=db user=u sslmode=verify-ca dbname=x").expect("valid");
        assert_eq!((rest.as_str(), o.mode), ("host=db user=u dbname=x", SslMode::VerifyCa));
        let (_, o) = split_url("postgres://db/x").expect("valid");
        assert_eq!(o.mode, SslMode::Prefer, "libpq's default");
        assert!(split_url("postgres://db/x?sslmode=sometimes").is_err());
    }
}
