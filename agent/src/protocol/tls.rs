//! TLS on both legs of a session (rustls with the ring provider), for the
//! protocol handlers that speak TLS: the configured modes, the agent's local
//! CA, and a stream that is plaintext or TLS. What follows describes it for
//! PostgreSQL; MySQL's handler (`protocol::mysql::session`) negotiates TLS
//! in its own handshake with the same modes and certificates.
//!
//! # Upstream leg (per target, `tls = ...`)
//!
//! After the TCP connection and before the StartupMessage is forwarded, the
//! proxy sends SSLRequest unless the target says `disable`, and reads
//! exactly one byte:
//!
//! - `S`: the TLS handshake follows. `verify-full` trusts only the CAs of
//!   `tls_ca_file` and checks the name (`tls_server_name`, else the host the
//!   session connects to: the listener's upstream host, or the original
//!   destination IP of a redirected connection). `prefer` and `require`
//!   encrypt without checking the certificate, like libpq's sslmode of the
//!   same name (handshake signatures are still verified).
//! - `N`: `prefer` goes on in plaintext; `require` and `verify-full` refuse
//!   the client with FATAL 08006.
//!
//! Bytes the server sends after its answer and before the handshake are fed
//! to rustls, which rejects them (the CVE-2021-23214 class of injection).
//!
//! # Client leg (`[agent] client_tls = "terminate"`)
//!
//! The agent keeps a local CA in `tls_dir` (`ca.pem`, `ca-key.pem`, made
//! once) and a server certificate signed by it (`server.pem`,
//! `server-key.pem`) whose names cover localhost, 127.0.0.1, ::1 and every
//! target address that is one IP or a host name; the server certificate is
//! made again when that list changes, the CA is kept. Keys are written with
//! mode 0600. Clients trust [`local_ca_path`] for `sslmode=verify-full`.
//!
//! # SCRAM channel binding
//!
//! Channel binding cannot cross a proxy that terminates TLS: the session
//! strips `SCRAM-SHA-256-PLUS` from every AuthenticationSASL (see the
//! session module). A client on TLS to the agent then sends the `y` flag
//! ("I could bind, the server did not offer it"); a server that itself sees
//! a TLS connection rejects that as a downgrade. So a client on TLS to a
//! target whose upstream leg is also TLS cannot use SCRAM: use md5 or
//! password authentication for such targets, a non-TLS upstream
//! (`tls = "disable"`), or a plaintext client leg (`sslmode=prefer` or
//! `disable` on loopback).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ClientTls, Config, TargetAddress, UpstreamTls};

/// ALPN protocol name of PostgreSQL (required by direct TLS negotiation).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A TLS set-up problem, found when the agent starts.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A certificate or key file holds nothing usable.
    #[error("{path}: {message}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls or rcgen refused the material.
    #[error("{0}")]
    Crypto(String),
}

/// Where the local CA's certificate is kept: trust this file for
/// `sslmode=verify-full` through the agent.
pub fn local_ca_path(tls_dir: &Path) -> PathBuf {
    tls_dir.join("ca.pem")
}

/// How the proxy connects to one target.
#[derive(Clone)]
pub enum UpstreamMode {
    /// Plaintext: no SSLRequest.
    Disable,
    /// TLS when offered, the certificate not checked.
    Prefer(TlsConnector),
    /// TLS or refuse, the certificate not checked.
    Require(TlsConnector),
    /// TLS or refuse, the certificate checked against the CA file and name.
    VerifyFull {
        /// Trusting the target's CA file.
        connector: TlsConnector,
        /// `tls_server_name`, if set.
        server_name: Option<String>,
    },
}

impl UpstreamMode {
    /// The configured mode's name, as in the config file.
    pub fn name(&self) -> &'static str {
        match self {
            UpstreamMode::Disable => "disable",
            UpstreamMode::Prefer(_) => "prefer",
            UpstreamMode::Require(_) => "require",
            UpstreamMode::VerifyFull { .. } => "verify-full",
        }
    }
}

/// TLS material of the running agent, made once at start.
pub struct TlsState {
    upstream: HashMap<String, UpstreamMode>,
    /// For brokered credentials with a client certificate: by target and
    /// the credential's place in it.
    with_certificate: HashMap<(String, usize), UpstreamMode>,
    client: Option<TlsAcceptor>,
}

impl TlsState {
    /// No TLS on either leg (for tests and non-PostgreSQL set-ups).
    pub fn plaintext() -> TlsState {
        TlsState {
            upstream: HashMap::new(),
            with_certificate: HashMap::new(),
            client: None,
        }
    }

    /// Loads the CA files of `verify-full` targets and, with
    /// `client_tls = "terminate"`, makes or loads the local CA and the
    /// agent's certificate. `alpn` is the protocol name offered and
    /// accepted in the TLS handshake, when the protocol has one.
    pub fn load(config: &Config, alpn: Option<&[u8]>) -> Result<TlsState, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let mut upstream = HashMap::new();
        let mut with_certificate = HashMap::new();
        let unverified = unverified_connector(provider.clone(), &alpn, None)?;
        for target in config.targets.iter() {
            let mode = |client_auth: Option<ClientAuth>| -> Result<UpstreamMode, TlsError> {
                let plain = |client_auth: Option<ClientAuth>| match client_auth {
                    None => Ok(unverified.clone()),
                    some => unverified_connector(provider.clone(), &alpn, some),
                };
                Ok(match &target.tls {
                    UpstreamTls::Disable => UpstreamMode::Disable,
                    UpstreamTls::Prefer => UpstreamMode::Prefer(plain(client_auth)?),
                    UpstreamTls::Require => UpstreamMode::Require(plain(client_auth)?),
                    UpstreamTls::VerifyFull {
                        ca_file,
                        server_name,
                    } => UpstreamMode::VerifyFull {
                        connector: verifying_connector(
                            provider.clone(),
                            ca_file,
                            &alpn,
                            client_auth,
                        )?,
                        server_name: server_name.clone(),
                    },
                })
            };
            upstream.insert(target.name.clone(), mode(None)?);
            for (index, credential) in target.credentials.iter().enumerate() {
                if let Some(cert) = &credential.client_cert {
                    let auth = load_client_auth(&cert.cert_file, &cert.key_file)?;
                    with_certificate.insert((target.name.clone(), index), mode(Some(auth))?);
                }
            }
        }
        let client = match config.agent.client_tls {
            ClientTls::Off => None,
            ClientTls::Terminate => {
                let names = certificate_names(config);
                let (chain, key) = ensure_local_ca(&config.agent.tls_dir, &names)?;
                let mut server = ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| TlsError::Crypto(e.to_string()))?
                    .with_no_client_auth()
                    .with_single_cert(chain, key)
                    .map_err(|e| TlsError::Crypto(format!("the agent's certificate: {e}")))?;
                server.alpn_protocols = alpn;
                Some(TlsAcceptor::from(Arc::new(server)))
            }
        };
        Ok(TlsState {
            upstream,
            with_certificate,
            client,
        })
    }

    /// How to connect to `target` (plaintext for a target not configured).
    pub fn upstream(&self, target: &str) -> &UpstreamMode {
        self.upstream.get(target).unwrap_or(&UpstreamMode::Disable)
    }

    /// How to connect to `target` for a session logging in with its
    /// brokered credential number `credential`: with that credential's
    /// client certificate when it has one.
    pub fn upstream_for(&self, target: &str, credential: Option<usize>) -> &UpstreamMode {
        credential
            .and_then(|index| self.with_certificate.get(&(target.to_owned(), index)))
            .unwrap_or_else(|| self.upstream(target))
    }

    /// The acceptor for clients asking for TLS, when terminating.
    pub fn client(&self) -> Option<&TlsAcceptor> {
        self.client.as_ref()
    }
}

/// A certificate chain and its key, which the agent presents to a server
/// (a brokered credential's client certificate).
type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn unverified_connector(
    provider: Arc<CryptoProvider>,
    alpn: &[Vec<u8>],
    client_auth: Option<ClientAuth>,
) -> Result<TlsConnector, TlsError> {
    let verifier = Arc::new(NoCertificateCheck {
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Crypto(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = with_client_auth(builder, client_auth)?;
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn with_client_auth(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    client_auth: Option<ClientAuth>,
) -> Result<ClientConfig, TlsError> {
    match client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Crypto(format!("the client certificate: {e}"))),
    }
}

/// Reads a brokered credential's client certificate chain and key (PEM).
fn load_client_auth(cert_file: &Path, key_file: &Path) -> Result<ClientAuth, TlsError> {
    let cert_pem = fs::read(cert_file).map_err(|source| TlsError::File {
        what: "cannot read tls_client_cert",
        path: cert_file.to_path_buf(),
        source,
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            path: cert_file.to_path_buf(),
            message: format!("not a PEM certificate file: {e}"),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Content {
            path: cert_file.to_path_buf(),
            message: "holds no certificate".to_owned(),
        });
    }
    let key_pem =
        crate::config::secret::read_secret_file(key_file).map_err(|message| TlsError::Content {
            path: key_file.to_path_buf(),
            message,
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose()).map_err(|e| TlsError::Content {
        path: key_file.to_path_buf(),
        message: format!("not a PEM private key: {e}"),
    })?;
    Ok((chain, key))
}

fn verifying_connector(
    provider: Arc<CryptoProvider>,
    ca_file: &Path,
    alpn: &[Vec<u8>],
    client_auth: Option<ClientAuth>,
) -> Result<TlsConnector, TlsError> {
    let content = |message: String| TlsError::Content {
        path: ca_file.to_path_buf(),
        message,
    };
    let pem = fs::read(ca_file).map_err(|source| TlsError::File {
        what: "cannot read tls_ca_file",
        path: ca_file.to_path_buf(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| content(format!("not a PEM certificate file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| content(format!("a certificate was refused: {e}")))?;
    }
    if roots.is_empty() {
        return Err(content(
            "holds no certificate; give the PEM file of the CA that signed the server's certificate"
                .to_owned(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Crypto(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = with_client_auth(builder, client_auth)?;
    config.alpn_protocols = alpn.to_vec();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// libpq's `sslmode=require`: any certificate, but the handshake's
/// signatures are still checked against the certificate's key.
#[derive(Debug)]
struct NoCertificateCheck {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoCertificateCheck {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls server name for `name` (a host name or an IP literal).
pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_owned())
        .map_err(|_| format!("\"{name}\" is not a valid TLS server name"))
}

/// A handshake failure in words a user can act on.
pub fn describe_handshake_error(e: &io::Error, verify_full: bool) -> String {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return format!("the TLS handshake failed: {e}");
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => {
                    if verify_full {
                        "the certificate is not trusted: it is not signed by a CA in tls_ca_file"
                            .to_owned()
                    } else {
                        "the certificate is not trusted: unknown issuer".to_owned()
                    }
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    "the certificate does not match the server name (set tls_server_name to the name it carries)".to_owned()
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the certificate is not valid yet".to_owned()
                }
                other => format!("the certificate was refused: {other:?}"),
            };
            format!("the server's TLS certificate failed verification: {why}")
        }
        other => format!("the TLS handshake failed: {other}"),
    }
}

/// The names the agent's certificate covers: loopback, and every target
/// address that is one IP or a host name.
fn certificate_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for target in config.targets.iter() {
        let name = match &target.address {
            TargetAddress::Host(h) => Some(h.clone()),
            TargetAddress::Net(_) => target.address.single_host(),
        };
        if let Some(name) = name {
            let name = match name.parse::<IpAddr>() {
                Ok(ip) => ip.to_string(),
                Err(_) => name,
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server-key.pem";
const SERVER_NAMES: &str = "server.names";
const CA_NAME: &str = "Tollgate local CA";

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| TlsError::Crypto(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Tollgate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn random_serial() -> Result<rcgen::SerialNumber, TlsError> {
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| TlsError::Crypto("the system's random source failed".to_owned()))?;
    if let Some(first) = serial.first_mut() {
        *first &= 0x7f;
    }
    Ok(rcgen::SerialNumber::from(serial.to_vec()))
}

fn read_file(path: &Path, what: &'static str) -> Result<Option<String>, TlsError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::File {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a file whole (to a temporary name, then renamed), `mode` bits.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::File {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Makes (or loads) the local CA in `dir` and a server certificate for
/// `names`, made again when the names changed. Returns the chain (server
/// certificate, then the CA) and the server's key.
pub fn ensure_local_ca(
    dir: &Path,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    fs::create_dir_all(dir).map_err(|source| TlsError::File {
        what: "cannot create tls_dir",
        path: dir.to_path_buf(),
        source,
    })?;
    let crypto = |e: rcgen::Error| TlsError::Crypto(e.to_string());
    let (ca_cert_path, ca_key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let (ca_pem, ca_key) = match (
        read_file(&ca_cert_path, "cannot read the local CA")?,
        read_file(&ca_key_path, "cannot read the local CA key")?,
    ) {
        (Some(cert), Some(key)) => {
            let key = rcgen::KeyPair::from_pem(&key).map_err(|e| TlsError::Content {
                path: ca_key_path.clone(),
                message: format!(
                    "not a usable private key: {e}; remove the CA files to make a new CA"
                ),
            })?;
            (cert, key)
        }
        _ => {
            let key = rcgen::KeyPair::generate().map_err(crypto)?;
            let mut params = ca_params()?;
            params.serial_number = Some(random_serial()?);
            let cert = params.self_signed(&key).map_err(crypto)?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&ca_cert_path, cert.pem().as_bytes(), 0o644)?;
            // A new CA: any server certificate left is not signed by it.
            let _ = fs::remove_file(dir.join(SERVER_NAMES));
            tracing::info!(ca = %ca_cert_path.display(), "made a local CA for client TLS");
            (cert.pem(), key)
        }
    };
    let ca_der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Content {
            path: ca_cert_path.clone(),
            message: format!("not a PEM certificate: {e}"),
        })?;

    let (cert_path, key_path, names_path) = (
        dir.join(SERVER_CERT),
        dir.join(SERVER_KEY),
        dir.join(SERVER_NAMES),
    );
    let wanted = names.join("\n");
    let current = (
        read_file(&names_path, "cannot read")?,
        read_file(&cert_path, "cannot read the agent's certificate")?,
        read_file(&key_path, "cannot read the agent's key")?,
    );
    let (cert_pem, key_pem) = match current {
        (Some(have), Some(cert), Some(key)) if have == wanted => (cert, key),
        _ => {
            let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
            let key = rcgen::KeyPair::generate().map_err(crypto)?;
            let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(crypto)?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "tollgate");
            params.serial_number = Some(random_serial()?);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::DigitalSignature,
                rcgen::KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer).map_err(crypto)?;
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
            write_file(&names_path, wanted.as_bytes(), 0o644)?;
            tracing::info!(certificate = %cert_path.display(), names = ?names, "made the agent's certificate for client TLS");
            (cert.pem(), key.serialize_pem())
        }
    };
    let cert =
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| TlsError::Content {
            path: cert_path.clone(),
            message: format!("not a PEM certificate: {e}"),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Content {
        path: key_path.clone(),
        message: format!("not a PEM private key: {e}"),
    })?;
    Ok((vec![cert, ca_der], key))
}

/// Whether a password the client sends in clear under its TLS would cross
/// the network in clear if relayed: the client's leg is TLS, the server's
/// is not, and the server is not on this host's loopback (traffic there
/// never leaves the kernel, and only root can read it). The client chose
/// TLS to keep its password secret; the agent must not undo that.
pub fn clear_password_exposed(client: &Stream, upstream: &Stream, server: SocketAddr) -> bool {
    client.is_tls() && !upstream.is_tls() && !server.ip().to_canonical().is_loopback()
}

/// The refusal when a server asks for a password in clear that
/// [`clear_password_exposed`] says must not be sent: `how` names the
/// server's request.
pub fn clear_password_refusal(target: &str, how: &str) -> String {
    format!(
        "tollgate: target \"{target}\": the server asks for the password in clear ({how}), and the agent's connection to it is not TLS; a password the client sent under TLS is not forwarded in clear over the network (set the target's tls to \"require\" or \"verify-full\")"
    )
}

/// Logs whether each leg of a session is TLS, and which version.
pub fn log_legs(ctx: &crate::protocol::SessionContext, client: &Stream, upstream: &Stream) {
    let describe = |leg: &Stream| if leg.is_tls() { "TLS" } else { "plaintext" };
    tracing::info!(
        session = %ctx.id,
        target = %ctx.target,
        client_tls = client.tls_version().as_deref().unwrap_or("off"),
        upstream_tls = upstream.tls_version().as_deref().unwrap_or("off"),
        "session legs: client {}, upstream {}",
        describe(client),
        describe(upstream),
    );
}

/// One leg of a session: plaintext TCP or TLS over it.
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, either side of the handshake.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

/// The read half of a [`Stream`].
pub enum ReadHalf {
    /// Plaintext: the socket's own half, no lock.
    Plain(OwnedReadHalf),
    /// TLS: both halves share the session.
    Tls(tokio::io::ReadHalf<Stream>),
}

/// The write half of a [`Stream`].
pub enum WriteHalf {
    /// Plaintext.
    Plain(OwnedWriteHalf),
    /// TLS.
    Tls(tokio::io::WriteHalf<Stream>),
}

impl Stream {
    /// Whether the leg is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The TLS version in use, for logs.
    pub fn tls_version(&self) -> Option<String> {
        match self {
            Stream::Plain(_) => None,
            // Spelled as PostgreSQL and OpenSSL spell it ("TLSv1.3").
            Stream::Tls(t) => t.get_ref().1.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
                other => format!("{other:?}"),
            }),
        }
    }

    /// Splits into halves that can be used at once.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            tls @ Stream::Tls(_) => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_local_ca_is_kept_and_the_leaf_follows_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (chain, _key) = ensure_local_ca(dir.path(), &names).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
        assert_eq!(mode(&dir.path().join(SERVER_KEY)), 0o600);
        let ca = fs::read(local_ca_path(dir.path())).unwrap();
        let leaf = fs::read(dir.path().join(SERVER_CERT)).unwrap();

        // Same names: nothing is made again.
        ensure_local_ca(dir.path(), &names).unwrap();
        assert_eq!(fs::read(dir.path().join(SERVER_CERT)).unwrap(), leaf);

        // Other names: a new leaf, the same CA, and the leaf chains to it.
        let more = vec!["localhost".to_owned(), "db.example.com".to_owned()];
        let (chain, _key) = ensure_local_ca(dir.path(), &more).unwrap();
        assert_eq!(fs::read(local_ca_path(dir.path())).unwrap(), ca);
        assert_ne!(fs::read(dir.path().join(SERVER_CERT)).unwrap(), leaf);

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&ca).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::now();
        verifier
            .verify_server_cert(
                &chain[0],
                &[],
                &server_name("db.example.com").unwrap(),
                &[],
                now,
            )
            .expect("the new leaf is signed by the kept CA");
        assert!(verifier
            .verify_server_cert(
                &chain[0],
                &[],
                &server_name("other.example").unwrap(),
                &[],
                now
            )
            .is_err());
    }

    #[test]
    fn certificate_names_cover_loopback_and_single_addresses() {
        let config = Config::from_toml(
            Path::new("t.toml"),
            "[[target]]\nname = \"a\"\naddress = \"10.0.0.5\"\nports = [5432]\nprotocol = \"postgres\"\n\
             [[target]]\nname = \"b\"\naddress = \"db.internal\"\nports = [5432]\nprotocol = \"postgres\"\n\
             [[target]]\nname = \"c\"\naddress = \"10.1.0.0/16\"\nports = [5432]\nprotocol = \"postgres\"\n",
        )
        .unwrap();
        assert_eq!(
            certificate_names(&config),
            ["localhost", "127.0.0.1", "::1", "10.0.0.5", "db.internal"]
        );
    }
}
