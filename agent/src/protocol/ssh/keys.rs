//! The agent's SSH host identity and the real hosts' keys.
//!
//! The agent ends the client's SSH connection, so towards the client it is
//! the host. It keeps a host CA in `tls_dir` (`ssh_host_ca`, made on first
//! start, root-only) and a host key made at each start; every session gets
//! a host certificate, signed by the CA, for the names the client may have
//! used. Clients trust the CA through one `@cert-authority` line in their
//! known-hosts file (`tollgate ssh known-hosts` prints it), so they work
//! unchanged and are never taught to accept an unknown key.
//!
//! Towards the real host the agent is the client: it accepts only a key
//! its target's known-hosts file lists for that host, and says which line
//! on a mismatch (never trust on first use).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};
use russh::keys::Certificate;

/// The CA key's file name in `tls_dir`.
pub const HOST_CA_FILE: &str = "ssh_host_ca";

/// How long a session's host certificate is valid: the client checks it
/// once, at the handshake.
const CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The agent's host CA and this run's host key.
pub struct HostIdentity {
    ca: PrivateKey,
    host_key: PrivateKey,
}

impl HostIdentity {
    /// Loads the CA from `tls_dir`, making it on first start, and makes a
    /// host key for this run.
    pub fn load(tls_dir: &Path) -> anyhow::Result<HostIdentity> {
        use anyhow::Context as _;
        let ca = load_or_make_ca(&ca_path(tls_dir), "SSH host CA")?;
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .context("cannot make an SSH host key")?;
        Ok(HostIdentity { ca, host_key })
    }

    /// The host key the client sees.
    pub fn host_key(&self) -> &PrivateKey {
        &self.host_key
    }

    /// The CA's public key.
    pub fn ca_public(&self) -> &PublicKey {
        self.ca.public_key()
    }

    /// A host certificate for `names` (the names and addresses a client
    /// may have asked for), valid from a minute ago (clock skew) for a day.
    pub fn certificate(&self, names: &[String]) -> Result<Certificate, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let failed =
            |e: russh::keys::ssh_key::Error| format!("cannot sign a host certificate: {e}");
        let mut builder = Builder::new_with_random_nonce(
            &mut rand::rng(),
            self.host_key.public_key().clone(),
            now.saturating_sub(60),
            now + CERTIFICATE_LIFETIME.as_secs(),
        )
        .map_err(failed)?;
        builder.cert_type(CertType::Host).map_err(failed)?;
        builder.key_id("tollgate").map_err(failed)?;
        for name in names {
            builder.valid_principal(name.as_str()).map_err(failed)?;
        }
        builder.sign(&self.ca).map_err(failed)
    }
}

/// Loads the CA key at `path` (OpenSSH format), making it (mode 0600, its
/// public key beside it as `.pub`) when there is none.
fn load_or_make_ca(path: &Path, what: &str) -> anyhow::Result<PrivateKey> {
    use anyhow::Context as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create tls_dir {}", dir.display()))?;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.trim()).with_context(|| {
            format!(
                "{} is not an OpenSSH private key; remove it to make a new {what} (what trusts the old one then needs the new one)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
                .with_context(|| format!("cannot make an {what} key"))?;
            let text = ca
                .to_openssh(LineEnding::LF)
                .with_context(|| format!("cannot encode the {what} key"))?;
            crate::protocol::tls::write_file(path, text.as_bytes(), 0o600)?;
            let public = ca
                .public_key()
                .to_openssh()
                .with_context(|| format!("cannot encode the {what}'s public key"))?;
            crate::protocol::tls::write_file(
                &path.with_extension("pub"),
                format!("{public}\n").as_bytes(),
                0o644,
            )?;
            tracing::info!(ca = %path.display(), "made an {what}");
            Ok(ca)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The agent's SSH user CA: hosts that trust it (`TrustedUserCAKeys`)
/// let the agent log in with a certificate it signs for one session.
pub struct UserCa {
    ca: PrivateKey,
}

/// The user CA key's file name in `tls_dir`.
pub const USER_CA_FILE: &str = "ssh_user_ca";

/// How long a session's user certificate is valid: the host checks it
/// once, at login.
const USER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(300);

impl UserCa {
    /// Loads the user CA from `tls_dir`, making it on first use.
    pub fn load(tls_dir: &Path) -> anyhow::Result<UserCa> {
        Ok(UserCa {
            ca: load_or_make_ca(&tls_dir.join(USER_CA_FILE), "SSH user CA")?,
        })
    }

    /// The CA's public key, for the hosts' `TrustedUserCAKeys`.
    pub fn public(&self) -> &PublicKey {
        self.ca.public_key()
    }

    /// A fresh key and a user certificate for it, for `user` only, valid
    /// from a minute ago (clock skew) for five minutes, with `key_id`
    /// (which the host logs) naming the session.
    pub fn session_login(
        &self,
        user: &str,
        key_id: &str,
    ) -> Result<(PrivateKey, Certificate), String> {
        let failed =
            |e: russh::keys::ssh_key::Error| format!("cannot sign a user certificate: {e}");
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).map_err(failed)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut builder = Builder::new_with_random_nonce(
            &mut rand::rng(),
            key.public_key().clone(),
            now.saturating_sub(60),
            now + USER_CERTIFICATE_LIFETIME.as_secs(),
        )
        .map_err(failed)?;
        builder.cert_type(CertType::User).map_err(failed)?;
        builder.key_id(key_id).map_err(failed)?;
        builder.valid_principal(user).map_err(failed)?;
        for extension in ["permit-pty", "permit-port-forwarding"] {
            builder.extension(extension, "").map_err(failed)?;
        }
        let cert = builder.sign(&self.ca).map_err(failed)?;
        Ok((key, cert))
    }
}

/// Where the CA key lives.
pub fn ca_path(tls_dir: &Path) -> PathBuf {
    tls_dir.join(HOST_CA_FILE)
}

/// The `@cert-authority` line a client's known-hosts file needs to accept
/// the agent for `patterns` (host patterns, e.g. `10.0.0.*,db.internal`).
pub fn cert_authority_line(ca: &PublicKey, patterns: &str) -> Result<String, String> {
    let key = ca
        .to_openssh()
        .map_err(|e| format!("cannot encode the SSH host CA's public key: {e}"))?;
    Ok(format!("@cert-authority {patterns} {key}"))
}

/// Checks the key the real host presented against `known_hosts`, for the
/// host as reached (`host` at `port`): `Ok(())` when a line lists it, the
/// reason it is refused otherwise.
pub fn check_host_key(
    known_hosts: &Path,
    host: &str,
    port: u16,
    key: &PublicKey,
) -> Result<(), String> {
    let fingerprint = key.fingerprint(Default::default());
    match russh::keys::check_known_hosts_path(host, port, key, known_hosts) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the host key of {host} port {port} ({fingerprint}) is not in {}; add the host's key there (ssh-keyscan, checked out of band)",
            known_hosts.display()
        )),
        Err(russh::keys::Error::KeyChanged { line }) => Err(format!(
            "the host key of {host} port {port} ({fingerprint}) does not match line {line} of {}: the host changed its key or someone is in the middle; refused",
            known_hosts.display()
        )),
        Err(e) => Err(format!(
            "cannot check the host key of {host} against {}: {e}",
            known_hosts.display()
        )),
    }
}

/// The CA keys `known_hosts` trusts for `host` at `port` (its
/// `@cert-authority` lines whose patterns match the host as OpenSSH looks
/// it up: `host` for port 22, `[host]:port` otherwise).
pub fn trusted_host_cas(known_hosts: &Path, host: &str, port: u16) -> Vec<PublicKey> {
    use russh::keys::ssh_key::known_hosts::{HostPatterns, KnownHosts, Marker};
    let Ok(text) = std::fs::read_to_string(known_hosts) else {
        return Vec::new();
    };
    let lookup = if port == 22 {
        host.to_ascii_lowercase()
    } else {
        format!("[{}]:{port}", host.to_ascii_lowercase())
    };
    KnownHosts::new(&text)
        .filter_map(Result::ok)
        .filter(|entry| entry.marker() == Some(&Marker::CertAuthority))
        .filter(|entry| match entry.host_patterns() {
            HostPatterns::Patterns(patterns) => patterns_match(patterns, &lookup),
            HostPatterns::HashedName { .. } => false,
        })
        .map(|entry| entry.public_key().clone())
        .collect()
}

/// OpenSSH's host pattern list: some pattern matches and no negated one.
fn patterns_match(patterns: &[String], name: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('!') {
            Some(negated) if glob(negated.as_bytes(), name.as_bytes()) => return false,
            Some(_) => {}
            None => matched |= glob(pattern.as_bytes(), name.as_bytes()),
        }
    }
    matched
}

/// `*` and `?` globbing, as known-hosts patterns use it.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| glob(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
    }
}

/// Checks a host certificate the real host presented: signed by a CA the
/// target's known-hosts file trusts for this host, a host certificate,
/// valid now, naming the host among its principals, with no critical
/// options. `Ok(())` or why it is refused.
pub fn check_host_certificate(
    known_hosts: &Path,
    host: &str,
    port: u16,
    cert: &Certificate,
) -> Result<(), String> {
    let cas = trusted_host_cas(known_hosts, host, port);
    let refused = |why: String| {
        Err(format!(
            "the host certificate of {host} port {port} is refused: {why}"
        ))
    };
    if cas.is_empty() {
        return refused(format!(
            "{} has no @cert-authority line for this host",
            known_hosts.display()
        ));
    }
    let fingerprints: Vec<_> = cas
        .iter()
        .map(|ca| ca.fingerprint(russh::keys::HashAlg::Sha256))
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if cert.validate_at(now, &fingerprints).is_err() {
        return refused(format!(
            "it is not signed by a CA {} trusts for it, or not valid now",
            known_hosts.display()
        ));
    }
    if cert.cert_type() != CertType::Host {
        return refused("it is not a host certificate".to_owned());
    }
    if !cert
        .valid_principals()
        .iter()
        .any(|p| p.eq_ignore_ascii_case(host))
    {
        return refused(format!(
            "it is for {:?}, not for {host}",
            cert.valid_principals()
        ));
    }
    if !cert.critical_options().is_empty() {
        return refused("it carries critical options".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_user_certificate_is_for_one_user_a_few_minutes_and_names_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let ca = UserCa::load(dir.path()).unwrap();
        let again = UserCa::load(dir.path()).unwrap();
        assert_eq!(ca.public(), again.public(), "the CA is kept");
        let (key, cert) = ca.session_login("deploy", "tollgate session 42").unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_principals(), ["deploy"]);
        assert_eq!(cert.key_id(), "tollgate session 42");
        assert_eq!(cert.public_key(), key.public_key().key_data());
        assert!(cert.valid_before() - cert.valid_after() <= 360);
        let fingerprint = ca.public().fingerprint(russh::keys::HashAlg::Sha256);
        cert.validate([&fingerprint]).unwrap();
    }

    #[test]
    fn the_ca_is_made_once_root_only_and_signs_host_certificates_for_the_names() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let first = HostIdentity::load(dir.path()).unwrap();
        let mode = std::fs::metadata(ca_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = HostIdentity::load(dir.path()).unwrap();
        assert_eq!(first.ca_public(), again.ca_public(), "the CA is kept");
        assert_ne!(
            first.host_key().public_key(),
            again.host_key().public_key(),
            "each run has its own host key"
        );
        let cert = first
            .certificate(&["db.internal".into(), "10.0.0.5".into()])
            .unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), ["db.internal", "10.0.0.5"]);
        assert_eq!(
            cert.signature_key(),
            first.ca_public().key_data(),
            "signed by the agent's CA"
        );
        let line = cert_authority_line(first.ca_public(), "10.0.0.*").unwrap();
        assert!(
            line.starts_with("@cert-authority 10.0.0.* ssh-ed25519 "),
            "{line}"
        );
    }

    #[test]
    fn a_garbled_ca_file_stops_the_start_and_says_how_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(ca_path(dir.path()), "not a key").unwrap();
        let e = HostIdentity::load(dir.path()).err().unwrap();
        assert!(
            format!("{e:#}").contains("remove it to make a new SSH host CA"),
            "{e:#}"
        );
    }

    #[test]
    fn host_keys_are_checked_against_the_known_hosts_file() {
        let dir = tempfile::tempdir().unwrap();
        let known = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let other = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(
            &file,
            format!(
                "[10.0.0.5]:2222 {}\n",
                known.public_key().to_openssh().unwrap()
            ),
        )
        .unwrap();
        check_host_key(&file, "10.0.0.5", 2222, known.public_key()).unwrap();
        let changed = check_host_key(&file, "10.0.0.5", 2222, other.public_key()).unwrap_err();
        assert!(changed.contains("does not match line 1"), "{changed}");
        let unknown = check_host_key(&file, "10.0.0.6", 2222, known.public_key()).unwrap_err();
        assert!(unknown.contains("is not in"), "{unknown}");
    }

    #[test]
    fn host_certificates_are_checked_against_the_cert_authority_lines() {
        let dir = tempfile::tempdir().unwrap();
        let ca = HostIdentity::load(dir.path()).unwrap();
        let other = HostIdentity::load(&dir.path().join("other")).unwrap();
        let file = dir.path().join("known_hosts");
        std::fs::write(
            &file,
            format!(
                "{}\n",
                cert_authority_line(ca.ca_public(), "[10.0.0.*]:2222,!10.0.0.9").unwrap()
            ),
        )
        .unwrap();
        let good = ca.certificate(&["10.0.0.5".into()]).unwrap();
        check_host_certificate(&file, "10.0.0.5", 2222, &good).unwrap();
        // Another port, another host, another CA, another name: refused.
        assert!(check_host_certificate(&file, "10.0.0.5", 22, &good).is_err());
        let by_other = other.certificate(&["10.0.0.5".into()]).unwrap();
        let e = check_host_certificate(&file, "10.0.0.5", 2222, &by_other).unwrap_err();
        assert!(e.contains("not signed by a CA"), "{e}");
        let e = check_host_certificate(&file, "10.0.0.6", 2222, &good).unwrap_err();
        assert!(e.contains("not for 10.0.0.6"), "{e}");
        assert!(patterns_match(
            &["[10.0.0.*]:2222".into()],
            "[10.0.0.9]:2222"
        ));
        assert!(!patterns_match(&["*".into(), "!db*".into()], "db1"));
        assert!(patterns_match(
            &["web?.example.com".into()],
            "web1.example.com"
        ));
    }
}
