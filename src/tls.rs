//! TLS for the gRPC listener: the rustls server configuration built from PEM files (the
//! server's certificate and key, and for mutual TLS the client CA), reloaded when the files
//! change — a reload that fails keeps the configuration being served and says why — and the
//! caller's identity read from its certificate.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::input::{InputError, printable, read_file};

/// Largest certificate, key or CA file (a long chain or a CA bundle fits with room to spare).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// How long the files must be quiet before a reload: a rotation writes the certificate and the
/// key one after the other, and a reload in between would only see a mismatch.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// The files TLS is built from, as `serve`'s flags name them.
#[derive(Debug, Clone)]
pub struct Files {
    /// `--tls-cert`: the server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// `--tls-key`: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `--tls-client-ca`: CA certificates that client certificates must chain to; clients
    /// without a certificate are then refused.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} `{}`: {source}", printable(&path.display().to_string()))]
    Read { flag: &'static str, path: PathBuf, source: InputError },
    #[error("{flag} `{}`: no PEM certificate in it", printable(&path.display().to_string()))]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} `{}`: not a PEM file: {error}", printable(&path.display().to_string()))]
    Pem { flag: &'static str, path: PathBuf, error: String },
    #[error("--tls-key `{}`: no private key in it (PEM: PKCS#8, PKCS#1 or SEC1)", printable(&path.display().to_string()))]
    NoKey { path: PathBuf },
    #[error("--tls-cert `{}`: the certificate cannot be read: {error}", printable(&path.display().to_string()))]
    Certificate { path: PathBuf, error: String },
    #[error("--tls-cert `{}`: the certificate expired at {not_after}", printable(&path.display().to_string()))]
    Expired { path: PathBuf, not_after: DateTime<Utc> },
    #[error("--tls-key `{}` does not go with --tls-cert `{}`: {error}", printable(&key.display().to_string()), printable(&cert.display().to_string()))]
    KeyMismatch { cert: PathBuf, key: PathBuf, error: String },
    #[error("--tls-client-ca `{}`: {error}", printable(&path.display().to_string()))]
    ClientCa { path: PathBuf, error: String },
}

/// What the served certificate is, for Status and the log.
#[derive(Debug, Clone)]
pub struct Served {
    /// The certificate's own identity (by the rule of [`identity`]).
    pub identity: Option<String>,
    pub not_after: DateTime<Utc>,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub fingerprint: String,
    pub loaded_at: DateTime<Utc>,
    /// Client certificates are required.
    pub client_auth: bool,
}

/// The last reload that failed (the old configuration is still served), until one succeeds.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    pub at: DateTime<Utc>,
}

/// What a reload did.
#[derive(Debug)]
pub enum Reloaded {
    /// A new certificate (or client CA) is served to new connections.
    Swapped,
    /// The files hold what is served already.
    Unchanged,
    /// The new files are refused; the old configuration is still served.
    Failed(TlsError),
}

/// The served TLS configuration and what is known of it.
pub struct Tls {
    files: Files,
    config: ArcSwap<ServerConfig>,
    state: Mutex<State>,
    reloads: AtomicU64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

struct State {
    served: Served,
    /// SHA-256 over the bytes of the files that built the served configuration.
    digest: [u8; 32],
    failure: Option<Failure>,
}

/// One build of the configuration from the files.
struct Built {
    config: ServerConfig,
    served: Served,
    digest: [u8; 32],
}

impl Tls {
    /// Builds the configuration from `files`; an error names the flag and the file.
    pub fn load(files: Files) -> Result<Arc<Tls>, TlsError> {
        let built = build(&files)?;
        Ok(Arc::new(Tls {
            files,
            config: ArcSwap::from_pointee(built.config),
            state: Mutex::new(State { served: built.served, digest: built.digest, failure: None }),
            reloads: AtomicU64::new(0),
        }))
    }

    /// The configuration for the next handshake. Connections keep the one they started with.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    pub fn files(&self) -> &Files {
        &self.files
    }

    /// The served certificate, and the last failed reload if no reload has succeeded since.
    pub fn status(&self) -> (Served, Option<Failure>) {
        match self.state.lock() {
            Ok(s) => (s.served.clone(), s.failure.clone()),
            // A panic while holding the lock cannot happen (no code in it panics); were it
            // to, the poisoned value is still whole.
            Err(poisoned) => {
                let s = poisoned.into_inner();
                (s.served.clone(), s.failure.clone())
            }
        }
    }

    /// Successful reloads that swapped the configuration.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reads the files again and serves what they hold from the next handshake on, unless
    /// they fail to build: then the old configuration stays, and Status and the log say why.
    pub fn reload(&self) -> Reloaded {
        let result = build(&self.files);
        let Ok(mut state) = self.state.lock() else {
            return Reloaded::Failed(TlsError::Certificate {
                path: self.files.cert.clone(),
                error: "the TLS state is unavailable".into(),
            });
        };
        match result {
            Ok(built) if built.digest == state.digest => {
                if state.failure.take().is_some() {
                    tracing::info!("the TLS files are whole again; the served certificate is unchanged");
                }
                Reloaded::Unchanged
            }
            Ok(built) => {
                self.config.store(Arc::new(built.config));
                tracing::info!(
                    identity = built.served.identity.as_deref().map(printable).unwrap_or_default().as_ref(),
                    not_after = %built.served.not_after,
                    fingerprint = %built.served.fingerprint,
                    client_auth = built.served.client_auth,
                    "reloaded the TLS certificate: new connections use it"
                );
                state.served = built.served;
                state.digest = built.digest;
                state.failure = None;
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Reloaded::Swapped
            }
            Err(e) => {
                tracing::error!(error = %e, fingerprint = %state.served.fingerprint, "TLS reload failed; still serving the old certificate");
                state.failure = Some(Failure { error: e.to_string(), at: Utc::now() });
                Reloaded::Failed(e)
            }
        }
    }

    /// Reloads after each burst of changes in the folders of the files (and of the files
    /// their links lead to, as cert-manager's and SPIRE's atomic symlink swaps do).
    pub fn watch(self: &Arc<Self>) -> notify::Result<TlsWatch> {
        let (tx, rx) = std::sync::mpsc::channel::<Event>();
        let mut watcher: RecommendedWatcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            if let Ok(e) = event {
                let _ = tx.send(e);
            }
        })?;
        let mut armed = arm(&mut watcher, &self.folders(), &[]);
        let mut own = self.own_folders();
        let tls = Arc::downgrade(self);
        let thread = std::thread::Builder::new().name("agentca-tls-watch".into()).spawn(move || {
            while let Ok(event) = rx.recv() {
                // The folders above are watched for the files' folders coming and going only:
                // what else happens there (an audit log written beside them) is not a reload.
                let concerns = |p: &PathBuf| own.contains(p) || p.parent().is_some_and(|d| own.iter().any(|o| o == d));
                if matches!(event.kind, EventKind::Access(_)) || !event.paths.iter().any(concerns) {
                    continue;
                }
                while rx.recv_timeout(DEBOUNCE).is_ok() {}
                let Some(tls) = tls.upgrade() else { return };
                tls.reload();
                // The links may lead somewhere else now.
                armed = arm(&mut watcher, &tls.folders(), &armed);
                own = tls.own_folders();
            }
        })?;
        Ok(TlsWatch { _thread: thread })
    }

    /// The folders of the files: each file's own folder, and the folder of what its link
    /// leads to.
    fn own_folders(&self) -> Vec<PathBuf> {
        let mut folders = Vec::new();
        for file in [Some(&self.files.cert), Some(&self.files.key), self.files.client_ca.as_ref()].into_iter().flatten()
        {
            let given = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            let resolved = std::fs::canonicalize(file).ok();
            for path in [Some(given), resolved].into_iter().flatten() {
                let parent = path.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
                if !folders.contains(&parent) {
                    folders.push(parent);
                }
            }
        }
        folders
    }

    /// The folders to watch: the files' own, and the folder above each, so that a folder
    /// deleted and made again (its watch gone with it) is seen coming back, and watched again.
    fn folders(&self) -> Vec<PathBuf> {
        let own = self.own_folders();
        let mut folders = own.clone();
        for above in own.iter().filter_map(|f| f.parent()) {
            if !folders.iter().any(|f| f == above) {
                folders.push(above.to_path_buf());
            }
        }
        folders
    }
}

/// The watching thread; it ends with the process (or once the `Tls` is gone).
pub struct TlsWatch {
    _thread: std::thread::JoinHandle<()>,
}

/// Watches `folders` (and stops watching those of `before` no longer among them).
fn arm(watcher: &mut RecommendedWatcher, folders: &[PathBuf], before: &[PathBuf]) -> Vec<PathBuf> {
    for old in before {
        let _ = watcher.unwatch(old);
    }
    for folder in folders {
        if let Err(e) = watcher.watch(folder, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %printable(&folder.display().to_string()), error = %e, "cannot watch a TLS folder: certificate changes there are not seen");
        }
    }
    folders.to_vec()
}

fn read(flag: &'static str, path: &Path) -> Result<String, TlsError> {
    read_file(path, MAX_PEM_BYTES).map_err(|source| TlsError::Read { flag, path: path.to_path_buf(), source })
}

fn certificates(flag: &'static str, path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { flag, path: path.to_path_buf(), error: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { flag, path: path.to_path_buf() });
    }
    Ok(certs)
}

fn build(files: &Files) -> Result<Built, TlsError> {
    let cert_pem = read("--tls-cert", &files.cert)?;
    let key_pem = read("--tls-key", &files.key)?;
    let ca_pem = files.client_ca.as_deref().map(|p| read("--tls-client-ca", p)).transpose()?;
    let mut digest = Sha256::new();
    for part in [Some(&cert_pem), Some(&key_pem), ca_pem.as_ref()] {
        let bytes = part.map_or(&[][..], |s| s.as_bytes());
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(bytes);
    }
    let digest: [u8; 32] = digest.finalize().into();

    let chain = certificates("--tls-cert", &files.cert, &cert_pem)?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::NoKey { path: files.key.clone() })?;
    // INVARIANT: `certificates` returns at least one.
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate { flag: "--tls-cert", path: files.cert.clone() })?;
    let info = Leaf::parse(leaf).map_err(|error| TlsError::Certificate { path: files.cert.clone(), error })?;
    if info.not_after <= Utc::now() {
        return Err(TlsError::Expired { path: files.cert.clone(), not_after: info.not_after });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Certificate { path: files.cert.clone(), error: e.to_string() })?;
    let builder = match (&files.client_ca, &ca_pem) {
        (Some(path), Some(pem)) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates("--tls-client-ca", path, pem)? {
                roots.add(ca).map_err(|e| TlsError::ClientCa { path: path.clone(), error: e.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::ClientCa { path: path.clone(), error: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // Checks that the key is one rustls can use and that it goes with the certificate.
    let mut config = builder.with_single_cert(chain.clone(), key).map_err(|e| TlsError::KeyMismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        error: e.to_string(),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let served = Served {
        identity: info.identity,
        not_after: info.not_after,
        fingerprint: hex::encode(Sha256::digest(leaf.as_ref())),
        loaded_at: Utc::now(),
        client_auth: files.client_ca.is_some(),
    };
    Ok(Built { config, served, digest })
}

/// What the server needs to know of a certificate.
struct Leaf {
    identity: Option<String>,
    not_after: DateTime<Utc>,
}

impl Leaf {
    fn parse(der: &[u8]) -> Result<Leaf, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let not_after = DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
            .ok_or_else(|| "its expiry is out of range".to_string())?;
        Ok(Leaf { identity: identity_of(&cert), not_after })
    }
}

/// The identity a certificate (DER) stands for: its SPIFFE ID (a `spiffe://` URI SAN) if it
/// has one, else its first DNS SAN, else its subject's common name. None if it has none of
/// them, or cannot be parsed.
pub fn identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    identity_of(&cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Option<String> {
    // A certificate with two SAN extensions is malformed: fall through to the CN rather than
    // pick one of them.
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        let spiffe = names.iter().find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some(*d),
            _ => None,
        });
        if let Some(name) = spiffe.or(dns) {
            return Some(name.to_string());
        }
    }
    cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok().filter(|s| !s.is_empty()).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn der(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn with_cn(mut params: CertificateParams, cn: &str) -> CertificateParams {
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params
    }

    #[test]
    fn identity_is_the_spiffe_id_then_the_first_dns_name_then_the_common_name() {
        let mut all = CertificateParams::default();
        all.subject_alt_names = vec![
            SanType::DnsName("issuer.corp.example".try_into().unwrap()),
            SanType::URI("https://not-spiffe.example/".try_into().unwrap()),
            SanType::URI("spiffe://corp.example/ns/issuers/sa/mint".try_into().unwrap()),
        ];
        assert_eq!(identity(&der(with_cn(all, "cn"))).as_deref(), Some("spiffe://corp.example/ns/issuers/sa/mint"));

        let dns = CertificateParams::new(vec!["gw-1.corp.example".into(), "gw.corp.example".into()]).unwrap();
        assert_eq!(identity(&der(with_cn(dns, "cn"))).as_deref(), Some("gw-1.corp.example"));

        let mut other_uri = CertificateParams::default();
        other_uri.subject_alt_names = vec![SanType::URI("https://x.example/".try_into().unwrap())];
        assert_eq!(identity(&der(with_cn(other_uri, "ops-cli"))).as_deref(), Some("ops-cli"));
        let mut nameless = CertificateParams::default();
        nameless.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(identity(&der(nameless)), None);
        assert_eq!(identity(b"not a certificate"), None);
    }
}
