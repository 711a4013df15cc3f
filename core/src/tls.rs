//! Mutual TLS between mover and agent, with pinned certificate
//! fingerprints instead of a CA — like ssh's known_hosts: each side keeps a
//! self-signed key pair (`floe agent init`), and each trusts exactly the
//! fingerprints it was told (`--trust-mover`, `--agent-fingerprint`).
//! rustls with the ring provider; TLS 1.2 and 1.3.

use crate::error::{Error, ErrorKind, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The SHA-256 fingerprint of a certificate: `SHA256:<hex>`.
pub fn fingerprint(cert: &[u8]) -> String {
    let d = Sha256::digest(cert);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

fn tls_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, msg)
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// Make a key pair `NAME.crt`/`NAME.key` in `dir` (the key readable by its
/// owner only); its fingerprint. Refuses to overwrite.
pub fn init(dir: &Path, name: &str) -> Result<String> {
    let (crt, key) = paths(dir, name);
    if crt.exists() || key.exists() {
        return Err(tls_err(format!(
            "{} already exists: not overwriting a key",
            crt.display()
        ))
        .path(crt));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create key directory", e).path(dir))?;
    let kp =
        rcgen::KeyPair::generate().map_err(|e| tls_err(format!("key generation failed: {e}")))?;
    let params = rcgen::CertificateParams::new(vec![format!("floe-{name}")])
        .map_err(|e| tls_err(format!("certificate parameters: {e}")))?;
    let cert = params
        .self_signed(&kp)
        .map_err(|e| tls_err(format!("self-signing failed: {e}")))?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .map_err(|e| Error::io("write key", e).path(&key))?;
        f.write_all(kp.serialize_pem().as_bytes())
            .map_err(|e| Error::io("write key", e).path(&key))?;
    }
    std::fs::write(&crt, cert.pem()).map_err(|e| Error::io("write certificate", e).path(&crt))?;
    Ok(fingerprint(cert.der()))
}

/// A key pair loaded from `dir`.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Load `NAME.crt` and `NAME.key` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Identity> {
        let (crt, key) = paths(dir, name);
        let cert = CertificateDer::from_pem_file(&crt).map_err(|e| {
            tls_err(format!(
                "cannot read certificate {}: {e} (make one with `floe agent init`)",
                crt.display()
            ))
        })?;
        let key = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| tls_err(format!("cannot read key {}: {e}", key.display())))?;
        Ok(Identity { cert, key })
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pinned(
    fps: &[String],
    cert: &CertificateDer<'_>,
    who: &str,
) -> std::result::Result<(), rustls::Error> {
    let fp = fingerprint(cert);
    if fps.iter().any(|p| p == &fp) {
        Ok(())
    } else {
        Err(rustls::Error::General(format!(
            "{who} certificate {fp} is not one this side trusts"
        )))
    }
}

/// Trusts exactly the certificates whose fingerprints it holds; `who` is
/// the peer's role, for messages. Serves as the mover's check of the agent
/// and the agent's check of movers.
#[derive(Debug)]
struct Pinned {
    fps: Vec<String>,
    who: &'static str,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> std::result::Result<(), rustls::Error> {
        pinned(&self.fps, cert, self.who)
    }
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// The agent's TLS configuration: its identity, and the movers it trusts.
pub fn server_config(me: Identity, trusted_movers: &[String]) -> Result<Arc<ServerConfig>> {
    if trusted_movers.is_empty() {
        return Err(tls_err(
            "a TLS agent must trust at least one mover fingerprint (--trust-mover)",
        ));
    }
    let p = provider();
    let verifier = Arc::new(Pinned {
        fps: trusted_movers.to_vec(),
        who: "mover",
        provider: p.clone(),
    });
    let cfg = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![me.cert], me.key)
        .map_err(|e| tls_err(format!("bad agent key pair: {e}")))?;
    Ok(Arc::new(cfg))
}

/// The mover's TLS configuration: its identity, and the agent it expects.
pub fn client_config(me: Identity, agent_fingerprints: &[String]) -> Result<Arc<ClientConfig>> {
    if agent_fingerprints.is_empty() {
        return Err(tls_err(
            "a TLS mover must pin the agent's fingerprint (--agent-fingerprint)",
        ));
    }
    let p = provider();
    let verifier = Arc::new(Pinned {
        fps: agent_fingerprints.to_vec(),
        who: "agent",
        provider: p.clone(),
    });
    let cfg = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![me.cert], me.key)
        .map_err(|e| tls_err(format!("bad mover key pair: {e}")))?;
    Ok(Arc::new(cfg))
}

/// One end of a duplex stream shared between a reading and a writing half
/// (the protocol never reads and writes at once, so a lock suffices).
pub struct Half<S>(Arc<Mutex<S>>);

/// Split a duplex stream (a TLS session) into a reading and a writing half.
pub fn split<S: Read + Write>(s: S) -> (Half<S>, Half<S>) {
    let a = Arc::new(Mutex::new(s));
    (Half(a.clone()), Half(a))
}

impl<S: Read> Read for Half<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read(buf)
    }
}

impl<S: Write> Write for Half<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Complete a TLS handshake as the agent on an accepted connection.
pub fn accept(
    cfg: Arc<ServerConfig>,
    tcp: std::net::TcpStream,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>> {
    let conn = rustls::ServerConnection::new(cfg).map_err(|e| tls_err(e.to_string()))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| {
            Error::new(ErrorKind::Denied, "TLS handshake with a mover failed")
                .op("tls accept")
                .source(e)
        })?;
    }
    Ok(s)
}

/// Connect to an agent over TLS.
pub fn connect(
    cfg: Arc<ClientConfig>,
    addr: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| {
        Error::new(ErrorKind::Remote, format!("cannot reach agent at {addr}")).source(e)
    })?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("floe-agent").map_err(|e| tls_err(e.to_string()))?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| tls_err(e.to_string()))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| {
            Error::new(
                ErrorKind::Denied,
                format!("TLS handshake with the agent at {addr} failed"),
            )
            .op("tls connect")
            .source(e)
        })?;
    }
    Ok(s)
}
