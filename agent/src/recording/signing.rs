//! ed25519 signatures of a recording's chain head.
//!
//! The agent signs each trailer with the key in `agent.recording_signing_key`
//! (PKCS#8, PEM or DER); `tollgate recordings verify --public-key FILE`
//! checks the signature off the host. What is signed is
//! [`signed_message`], specified in `docs/recording-format.md`.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::format::{SignatureRecord, Trailer};

/// The `algorithm` of every signature this code writes and checks.
pub const ALGORITHM: &str = "ed25519";

/// The first line of every signed message: names the format and its version
/// so a signature cannot be replayed as one over some other text.
const DOMAIN: &str = "tollgate-recording/1";

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410), before the
/// 32 key bytes: what `openssl pkey -pubout` writes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The DER of ring's PKCS#8 v2 ed25519 key up to the 32-byte seed.
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The DER of a PKCS#8 v1 ed25519 key (RFC 8410) up to the 32-byte seed:
/// what `openssl genpkey` writes, and what OpenSSL 3.0 can read (it
/// refuses ring's v2).
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Largest key file read, in bytes: keys are tiny, anything bigger is the
/// wrong file.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Why a key could not be loaded, made or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a key of the expected kind.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The system's random source failed.
    #[error("cannot generate a key: the system random source failed")]
    Random,
}

/// The key the agent signs trailers with.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private half.
        f.debug_struct("SigningKey")
            .field("key_id", &self.public.key_id())
            .finish()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 ed25519 private key, PEM (`PRIVATE KEY`) or DER, as
    /// written by `tollgate recordings keygen` or `openssl genpkey -algorithm
    /// ed25519`.
    pub fn load(path: &Path) -> Result<SigningKey, KeyError> {
        let bytes = read_small(path)?;
        let der = if bytes.starts_with(b"-----") {
            let pem = pem::parse(&bytes).map_err(|e| invalid(path, format!("not PEM: {e}")))?;
            if pem.tag() != "PRIVATE KEY" {
                return Err(invalid(
                    path,
                    format!(
                        "holds a \"{}\", not a PKCS#8 \"PRIVATE KEY\"; create one with `tollgate recordings keygen --out {}`",
                        pem.tag(),
                        path.display()
                    ),
                ));
            }
            pem.into_contents()
        } else {
            bytes
        };
        Self::from_pkcs8(&der).map_err(|why| invalid(path, why))
    }

    /// A key from PKCS#8 DER (v1 or v2).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, String> {
        // v2 carries the public key and is checked against it; openssl
        // writes v1, which only the unchecked parser accepts.
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(der))
            .map_err(|e| {
                format!("not a PKCS#8 ed25519 private key ({e}); create one with `tollgate recordings keygen`")
            })?;
        let mut raw = [0u8; 32];
        let public = pair.public_key().as_ref();
        if public.len() != raw.len() {
            return Err("the key's public half is not 32 bytes".to_string());
        }
        raw.copy_from_slice(public);
        Ok(SigningKey {
            pair,
            public: PublicKey(raw),
        })
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs a trailer of `session`: the signature record to store in it.
    pub fn sign(&self, session: Uuid, trailer: &Trailer) -> SignatureRecord {
        let sig = self.pair.sign(&signed_message(session, trailer));
        SignatureRecord {
            algorithm: ALGORITHM.to_string(),
            key_id: self.public.key_id(),
            public_key: self.public.to_hex(),
            value: hex::encode(sig.as_ref()),
        }
    }
}

/// An ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl PublicKey {
    /// Parses a public key written as 64 hex digits (what `keygen` writes to
    /// `PATH.pub`), or as a PEM `PUBLIC KEY` (what `openssl pkey -pubout`
    /// writes). Surrounding white space is ignored.
    pub fn parse(text: &[u8]) -> Result<PublicKey, String> {
        let trimmed = String::from_utf8_lossy(text);
        let trimmed = trimmed.trim();
        if trimmed.starts_with("-----") {
            let pem = pem::parse(trimmed).map_err(|e| format!("not PEM: {e}"))?;
            if pem.tag() != "PUBLIC KEY" {
                return Err(format!("holds a \"{}\", not a \"PUBLIC KEY\"", pem.tag()));
            }
            return pem
                .contents()
                .strip_prefix(&SPKI_PREFIX[..])
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .map(PublicKey)
                .ok_or_else(|| "not an ed25519 public key".to_string());
        }
        let bytes = hex::decode(trimmed).map_err(|_| {
            "not an ed25519 public key: expected 64 hex digits (the .pub file `tollgate recordings keygen` writes) or a PEM PUBLIC KEY".to_string()
        })?;
        <[u8; 32]>::try_from(bytes.as_slice())
            .map(PublicKey)
            .map_err(|_| {
                format!(
                    "not an ed25519 public key: {} bytes of hex, expected 32",
                    bytes.len()
                )
            })
    }

    /// Reads a public key file (see [`PublicKey::parse`]).
    pub fn load(path: &Path) -> Result<PublicKey, KeyError> {
        let bytes = read_small(path)?;
        PublicKey::parse(&bytes).map_err(|why| invalid(path, why))
    }

    /// Lowercase hex of the 32 key bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key id written with each signature: the first 16 hex digits of
    /// the SHA-256 of the 32 key bytes.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.0);
        hex::encode(digest.get(..8).unwrap_or_default())
    }

    /// Whether `signature` (64 raw bytes) is this key's signature of `message`.
    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(message, signature)
            .is_ok()
    }
}

/// The exact bytes a trailer's signature covers (UTF-8, fields separated by
/// `\n`, no trailing newline, numbers in decimal):
///
/// ```text
/// tollgate-recording/1\n<session>\n<chain_head>\n<events>\n<statements>\n<denied>\n<lost>
/// ```
///
/// `<session>` is the lowercase hyphenated UUID, `<chain_head>` the trailer's
/// 64 lowercase hex digits as stored.
pub fn signed_message(session: Uuid, trailer: &Trailer) -> Vec<u8> {
    format!(
        "{DOMAIN}\n{}\n{}\n{}\n{}\n{}\n{}",
        session.hyphenated(),
        trailer.chain_head,
        trailer.events,
        trailer.statements,
        trailer.denied,
        trailer.lost
    )
    .into_bytes()
}

/// What [`check_signature`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// No signature (or no trailer).
    Unsigned,
    /// A signature is present; no public key was given to check it with.
    PresentNotChecked {
        /// The key id the trailer names.
        key_id: String,
    },
    /// Signed by one of the given keys, and the signature is good.
    Valid {
        /// The key that signed.
        key_id: String,
    },
    /// Signed by a key other than the ones given.
    UnknownKey {
        /// The key id the trailer names.
        key_id: String,
    },
    /// The signature does not verify: the trailer or the signature changed.
    Invalid {
        /// Why.
        why: String,
    },
}

impl SignatureStatus {
    /// Whether this status fails a verification: a bad or foreign
    /// signature always; an unsigned recording when keys were given.
    pub fn fails(&self, keys_given: bool) -> bool {
        match self {
            SignatureStatus::Unsigned => keys_given,
            SignatureStatus::PresentNotChecked { .. } | SignatureStatus::Valid { .. } => false,
            SignatureStatus::UnknownKey { .. } | SignatureStatus::Invalid { .. } => true,
        }
    }
}

impl fmt::Display for SignatureStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureStatus::Unsigned => f.write_str("unsigned"),
            SignatureStatus::PresentNotChecked { key_id } => write!(
                f,
                "signed by key {key_id}, not checked (give --public-key to check it)"
            ),
            SignatureStatus::Valid { key_id } => write!(f, "signature valid (key {key_id})"),
            SignatureStatus::UnknownKey { key_id } => write!(
                f,
                "signed by key {key_id}, which is not a key given with --public-key"
            ),
            SignatureStatus::Invalid { why } => write!(f, "signature INVALID: {why}"),
        }
    }
}

/// Checks a trailer's signature against `keys` (the trusted public keys).
/// With no keys, a signature is reported as present but not checked: the
/// public key stored beside it proves nothing by itself.
pub fn check_signature(session: Uuid, trailer: &Trailer, keys: &[PublicKey]) -> SignatureStatus {
    let Some(sig) = &trailer.signature else {
        return SignatureStatus::Unsigned;
    };
    if keys.is_empty() {
        return SignatureStatus::PresentNotChecked {
            key_id: sig.key_id.clone(),
        };
    }
    if sig.algorithm != ALGORITHM {
        return SignatureStatus::Invalid {
            why: format!(
                "algorithm \"{}\" is not supported (only {ALGORITHM})",
                sig.algorithm
            ),
        };
    }
    let Some(key) = PublicKey::parse(sig.public_key.as_bytes())
        .ok()
        .and_then(|stored| keys.iter().find(|k| **k == stored))
    else {
        return SignatureStatus::UnknownKey {
            key_id: sig.key_id.clone(),
        };
    };
    let Ok(value) = hex::decode(&sig.value) else {
        return SignatureStatus::Invalid {
            why: "the signature is not hex".to_string(),
        };
    };
    if key.verifies(&signed_message(session, trailer), &value) {
        SignatureStatus::Valid {
            key_id: key.key_id(),
        }
    } else {
        SignatureStatus::Invalid {
            why: "it does not match the session id, chain head and counts (the trailer or the signature was changed)".to_string(),
        }
    }
}

/// What `keygen` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The private key file (PEM PKCS#8, mode 0600).
    pub private: PathBuf,
    /// The public key file (64 hex digits and a newline).
    pub public_path: PathBuf,
    /// The public key.
    pub public: PublicKey,
}

/// Generates a new ed25519 key: the private key (PEM PKCS#8 v1, as
/// `openssl genpkey -algorithm ed25519` writes it) to `out` with mode 0600,
/// and the public key as hex to `out` + `.pub` (mode 0644). Refuses to
/// overwrite either file.
pub fn generate_key(out: &Path) -> Result<GeneratedKey, KeyError> {
    let rng = SystemRandom::new();
    let v2 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Random)?;
    let generated = SigningKey::from_pkcs8(v2.as_ref()).map_err(|why| invalid(out, why))?;
    // Rewritten as v1 for OpenSSL; kept as v2 if ring's layout ever changes
    // or the rewrite would not give back the same key.
    let pkcs8 = v2
        .as_ref()
        .strip_prefix(&PKCS8_V2_PREFIX[..])
        .and_then(|rest| rest.get(..32))
        .map(|seed| [&PKCS8_V1_PREFIX[..], seed].concat())
        .filter(|v1| SigningKey::from_pkcs8(v1).is_ok_and(|k| k.public == generated.public))
        .unwrap_or_else(|| v2.as_ref().to_vec());
    let key = SigningKey::from_pkcs8(&pkcs8).map_err(|why| invalid(out, why))?;
    let mut public_path = out.as_os_str().to_owned();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    if public_path.exists() {
        return Err(invalid(
            &public_path,
            "already exists; remove it or choose another --out".to_string(),
        ));
    }
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
    write_new(out, pem.as_bytes(), 0o600)?;
    let public = *key.public_key();
    if let Err(e) = write_new(
        &public_path,
        format!("{}\n", public.to_hex()).as_bytes(),
        0o644,
    ) {
        // Leave no private key without its public half.
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(GeneratedKey {
        private: out.to_path_buf(),
        public_path,
        public,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                invalid(
                    path,
                    "already exists; remove it or choose another --out".to_string(),
                )
            } else {
                io(e)
            }
        })?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_small(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::io::Read;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(invalid(
            path,
            format!("larger than {MAX_KEY_FILE} bytes: not a key file"),
        ));
    }
    Ok(bytes)
}

fn invalid(path: &Path, why: String) -> KeyError {
    KeyError::Invalid {
        path: path.to_path_buf(),
        why,
    }
}
