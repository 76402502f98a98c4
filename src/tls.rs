//! TLS to RabbitMQ (`amqps://`) and Redis (`rediss://`): which servers are trusted, and the
//! client certificate for mutual TLS.
//!
//! Trusted are the system's trust store (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured) and the
//! PEM bundle `WXPUSH_TLS_CA_FILE` (`tls.ca_file`): a company CA goes there. A client
//! certificate and its key (`WXPUSH_TLS_CERT_FILE`, `WXPUSH_TLS_KEY_FILE`) are presented to both
//! servers when they ask for one.
//!
//! The setting is process-wide, like the system trust store it extends: each program calls
//! [`install`] once with its configuration; every connection made after that uses it.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, RwLock},
};

use base64::Engine as _;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use redis::{ClientTlsConfig, TlsCertificates};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

/// The `[tls]` section of the configuration (`WXPUSH_TLS_*` override it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM bundle of CA certificates trusted besides the system's (`WXPUSH_TLS_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS (`WXPUSH_TLS_CERT_FILE`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (`WXPUSH_TLS_KEY_FILE`).
    pub key_file: Option<PathBuf>,
}

impl TlsSettings {
    /// A certificate without its key (or the reverse) is a mistake, not a choice.
    pub fn validate(&self) -> Result<(), TlsError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(TlsError::HalfIdentity);
        }
        Ok(())
    }
}

/// Why the TLS files could not be used; each names the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {setting} {path}")]
    Read { setting: &'static str, path: String, source: std::io::Error },
    #[error("{setting} {path} holds no PEM certificate: it must contain `-----BEGIN CERTIFICATE-----` blocks")]
    NoCertificate {
        setting: &'static str,
        path: String,
        #[source]
        source: Option<rustls_pki_types::pem::Error>,
    },
    #[error("WXPUSH_TLS_KEY_FILE (tls.key_file) {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted)")]
    Key { path: String, source: rustls_pki_types::pem::Error },
    #[error(
        "a client certificate needs its key: set both WXPUSH_TLS_CERT_FILE and WXPUSH_TLS_KEY_FILE \
         (tls.cert_file and tls.key_file), or neither"
    )]
    HalfIdentity,
}

const CA_SETTING: &str = "WXPUSH_TLS_CA_FILE (tls.ca_file)";
const CERT_SETTING: &str = "WXPUSH_TLS_CERT_FILE (tls.cert_file)";

/// A client certificate chain and its key, in PEM.
#[derive(Clone)]
struct Identity {
    cert_pem: Vec<u8>,
    key_pem: SecretSlice<u8>,
}

/// The TLS material of the process, loaded and checked once.
#[derive(Clone, Default)]
pub struct Tls {
    /// The extra CA certificates, PEM (checked to hold at least one certificate).
    ca_pem: Option<String>,
    identity: Option<Identity>,
}

impl fmt::Debug for Tls {
    // Certificates would only be noise, and the key must never be printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("extra_ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl Tls {
    /// Reads and checks the files `settings` names.
    pub fn load(settings: &TlsSettings) -> Result<Tls, TlsError> {
        settings.validate()?;
        let ca_pem = match &settings.ca_file {
            Some(path) => {
                let pem = read(CA_SETTING, path)?;
                certificates(CA_SETTING, path, &pem)?;
                Some(String::from_utf8_lossy(&pem).into_owned())
            }
            None => None,
        };
        let identity = match (&settings.cert_file, &settings.key_file) {
            (Some(cert), Some(key)) => {
                let cert_pem = read(CERT_SETTING, cert)?;
                certificates(CERT_SETTING, cert, &cert_pem)?;
                let key_pem = read("WXPUSH_TLS_KEY_FILE (tls.key_file)", key)?;
                PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|source| TlsError::Key { path: key.display().to_string(), source })?;
                Some(Identity { cert_pem, key_pem: SecretSlice::from(key_pem) })
            }
            _ => None,
        };
        Ok(Tls { ca_pem, identity })
    }

    /// Whether a CA bundle was given.
    pub fn has_extra_ca(&self) -> bool {
        self.ca_pem.is_some()
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.identity.is_some()
    }

    /// lapin's TLS settings. lapin (rustls with the platform verifier) trusts the system store
    /// by itself; the CA bundle is added to it.
    pub fn amqp(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|i| OwnedIdentity::PKCS8 { pem: i.cert_pem.clone(), key: i.key_pem.expose_secret().to_vec() }),
            cert_chain: self.ca_pem.clone(),
        }
    }

    /// The redis client's TLS settings. Given roots, redis trusts only those, so they are the
    /// system store and the CA bundle together; with neither, redis keeps its compiled-in web
    /// PKI roots.
    pub fn redis(&self) -> TlsCertificates {
        let mut roots = system_roots_pem().to_owned();
        if let Some(ca) = &self.ca_pem {
            roots.push_str(ca);
            roots.push('\n');
        }
        TlsCertificates {
            client_tls: self.identity.as_ref().map(|i| ClientTlsConfig {
                client_cert: i.cert_pem.clone(),
                client_key: i.key_pem.expose_secret().to_vec(),
            }),
            root_cert: (!roots.is_empty()).then(|| roots.into_bytes()),
        }
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { setting, path: path.display().to_string(), source })
}

/// The certificates of a PEM file; at least one.
fn certificates(setting: &'static str, path: &Path, pem: &[u8]) -> Result<usize, TlsError> {
    let no_certificate = |source| TlsError::NoCertificate { setting, path: path.display().to_string(), source };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| no_certificate(Some(e)))?;
        count += 1;
    }
    if count == 0 {
        return Err(no_certificate(None));
    }
    Ok(count)
}

/// The system trust store as PEM, read once (rustls-native-certs: `SSL_CERT_FILE`,
/// `SSL_CERT_DIR`, else the distribution's bundle). Empty when there is none.
fn system_roots_pem() -> &'static str {
    static ROOTS: OnceLock<String> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(error = %error, "part of the system trust store could not be read");
        }
        let mut pem = String::new();
        for cert in &found.certs {
            pem_encode(cert.as_ref(), &mut pem);
        }
        pem
    })
}

/// Appends `der` as a PEM certificate block.
fn pem_encode(der: &[u8], out: &mut String) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    // Base64 is ASCII, so splitting its bytes keeps whole characters.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
}

static INSTALLED: RwLock<Option<Arc<Tls>>> = RwLock::new(None);

/// Loads the files `settings` names and makes them the process's TLS setting. Programs call it
/// once at start, so that a wrong path stops them there with a clear error.
pub fn install(settings: &TlsSettings) -> Result<(), TlsError> {
    let tls = Arc::new(Tls::load(settings)?);
    if tls.has_extra_ca() || tls.has_client_certificate() {
        tracing::info!(
            extra_ca = tls.has_extra_ca(),
            client_certificate = tls.has_client_certificate(),
            "TLS settings loaded"
        );
    }
    *INSTALLED.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tls);
    Ok(())
}

/// The process's TLS setting: what [`install`] loaded, else what the `WXPUSH_TLS_*` variables
/// name (a program that never called `install` still honours them; files that cannot be used
/// are reported and left out, and the connection then says what failed).
pub fn current() -> Arc<Tls> {
    if let Some(tls) = INSTALLED.read().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref() {
        return Arc::clone(tls);
    }
    static FROM_ENV: OnceLock<Arc<Tls>> = OnceLock::new();
    Arc::clone(FROM_ENV.get_or_init(|| {
        let loaded = crate::config::tls_from_env()
            .map_err(|e| e.to_string())
            .and_then(|settings| Tls::load(&settings).map_err(|e| crate::telemetry::chain(&e).to_string()));
        match loaded {
            Ok(tls) => Arc::new(tls),
            Err(error) => {
                tracing::error!(%error, "TLS settings not usable; connecting with the system trust store only");
                Arc::new(Tls::default())
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("wxpush-tls-{}-{name}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let settings = TlsSettings { cert_file: Some("c.pem".into()), ..TlsSettings::default() };
        let e = Tls::load(&settings).unwrap_err().to_string();
        assert!(e.contains("WXPUSH_TLS_KEY_FILE") && e.contains("WXPUSH_TLS_CERT_FILE"), "{e}");
    }

    #[test]
    fn unusable_files_are_named_with_their_setting() {
        let missing = TlsSettings { ca_file: Some("/nonexistent/ca.pem".into()), ..TlsSettings::default() };
        let e = Tls::load(&missing).unwrap_err().to_string();
        assert!(e.contains("WXPUSH_TLS_CA_FILE") && e.contains("/nonexistent/ca.pem"), "{e}");

        let not_pem = temp("ca.pem", "this is not a certificate\n");
        let e = Tls::load(&TlsSettings { ca_file: Some(not_pem.clone()), ..TlsSettings::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds no PEM certificate") && e.contains(&not_pem.display().to_string()), "{e}");
        let _ = std::fs::remove_file(not_pem);
    }

    #[test]
    fn pem_encoding_round_trips() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut pem = String::new();
        pem_encode(&der, &mut pem);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), der.as_slice());
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let tls = Tls {
            ca_pem: None,
            identity: Some(Identity { cert_pem: b"cert".to_vec(), key_pem: SecretSlice::from(b"KEY".to_vec()) }),
        };
        let shown = format!("{tls:?}");
        assert!(!shown.contains("KEY") && shown.contains("client_certificate: true"), "{shown}");
    }
}
