//! SSH targets: the agent ends the client's SSH connection, logs in to the
//! real host itself with a brokered key, and relays channel by channel,
//! deciding every request that runs something.
//!
//! A session runs in this order:
//!
//! 1. The process behind the connection is known (the kernel's identity).
//! 2. The target's first credential whose `match` accepts the process is
//!    chosen; none: the client is turned away with a banner saying why.
//! 3. The agent connects to the host over the upstream socket, checks the
//!    host's key against the target's known-hosts file, and logs in with
//!    the credential's key (read from its root-only file now, so a rotated
//!    key needs no reload). A failure turns the client away the same way.
//! 4. Only then does the client's handshake go on ([`front`]): the agent
//!    presents a host certificate its own CA signed for the host's name,
//!    accepts any client authentication (the identity was decided in 2),
//!    and relays channels. `exec`, `shell`, `subsystem` and forwarding
//!    requests are decided by the policy; agent and X11 forwarding are
//!    always refused.
//!
//! The client never holds the host's credential: its environment and files
//! have nothing to leak.

mod front;
mod held;
pub mod keys;
pub mod sftp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PrivateKeyWithHashAlg;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{Handler, HandlerFuture, Refusal, SessionContext};
use crate::config::{Config, Protocol, Target};
use crate::events::{CloseReason, SessionInfo};

/// How long logging in to the host may take, handshake included.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `ssh` targets.
pub struct SshHandler {
    /// The agent's host identity; `None` when no target speaks SSH (no CA
    /// is made then).
    host: Option<Arc<keys::HostIdentity>>,
    /// The SSH targets, by name.
    targets: HashMap<String, Target>,
    upstream_config: Arc<russh::client::Config>,
    /// The same, asking the host for its certificate (a CA in the
    /// target's known-hosts file vouches for it).
    upstream_config_certificates: Arc<russh::client::Config>,
    /// The agent's SSH user CA, when a credential logs in with its
    /// certificates.
    user_ca: Option<Arc<keys::UserCa>>,
}

impl SshHandler {
    /// The handler for `config`'s SSH targets; loads (or makes) the host CA
    /// when there is one.
    pub fn new(config: &Config) -> anyhow::Result<SshHandler> {
        let targets: HashMap<String, Target> = config
            .targets
            .iter()
            .filter(|t| t.protocol == Protocol::Ssh)
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        let host = if targets.is_empty() {
            None
        } else {
            Some(Arc::new(keys::HostIdentity::load(&config.agent.tls_dir)?))
        };
        let upstream_config = || russh::client::Config {
            client_id: russh::SshId::Standard("SSH-2.0-tollgate".into()),
            inactivity_timeout: None,
            ..Default::default()
        };
        let mut certificates = upstream_config();
        certificates.preferred.host_key_certificates = std::borrow::Cow::Borrowed(&[
            russh::keys::Algorithm::Ed25519,
            russh::keys::Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP256,
            },
            russh::keys::Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha512),
            },
        ]);
        let user_ca = if targets
            .values()
            .any(|t| t.credentials.iter().any(|c| c.ssh_certificate))
        {
            Some(Arc::new(keys::UserCa::load(&config.agent.tls_dir)?))
        } else {
            None
        };
        Ok(SshHandler {
            user_ca,
            host,
            targets,
            upstream_config: Arc::new(upstream_config()),
            upstream_config_certificates: Arc::new(certificates),
        })
    }

    /// The host CA's public key, when a target speaks SSH.
    pub fn host_ca(&self) -> Option<&russh::keys::PublicKey> {
        self.host.as_deref().map(keys::HostIdentity::ca_public)
    }
}

impl Handler for SshHandler {
    fn serve<'a>(
        &'a self,
        ctx: &'a SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> HandlerFuture<'a, CloseReason> {
        Box::pin(self.serve_session(ctx, client, upstream))
    }

    /// SSH has no way to say why before the handshake: the client sees the
    /// connection closed, and the agent's log says why.
    fn refuse<'a>(
        &'a self,
        mut client: TcpStream,
        _refusal: Refusal<'a>,
        _timeout: Duration,
    ) -> HandlerFuture<'a, ()> {
        Box::pin(async move {
            let _ = client.shutdown().await;
        })
    }
}

/// The host side of a session, logged in.
pub(super) type Upstream = russh::client::Handle<HostKeyCheck>;

impl SshHandler {
    async fn serve_session(
        &self,
        ctx: &SessionContext,
        client: TcpStream,
        upstream: TcpStream,
    ) -> CloseReason {
        let info = Arc::clone(ctx.start.info().await);
        let (Some(host), Some(target)) = (&self.host, self.targets.get(&ctx.target)) else {
            return CloseReason::ClientError(format!(
                "target \"{}\" is not an ssh target",
                ctx.target
            ));
        };
        let names = host_names(&ctx.upstream_name, ctx.upstream_addr);
        if let Some(failure) = ctx.events.recording_failure() {
            front::turn_away(
                host,
                &names,
                client,
                ctx,
                format!(
                "tollgate: session recording has failed ({failure}), and nothing may run unrecorded"
            ),
            )
            .await;
            return CloseReason::RecordingFailed(failure);
        }
        let forwarded = front::ForwardSlot::default();
        let (upstream, user) = match self
            .log_in(ctx, &info, target, upstream, Arc::clone(&forwarded))
            .await
        {
            Ok(login) => login,
            Err((message, reason)) => {
                tracing::warn!(session = %info.id, target = %ctx.target, "{message}");
                front::turn_away(host, &names, client, ctx, message).await;
                return reason;
            }
        };
        let logged_in = front::LoggedIn {
            upstream,
            user,
            forwarded,
        };
        front::run(ctx, host, &names, info, client, logged_in).await
    }

    /// Logs in to the host over `upstream` with the credential for the
    /// process; returns the connection and the user it logged in as, or
    /// the message for the client and why the session ends.
    async fn log_in(
        &self,
        ctx: &SessionContext,
        info: &SessionInfo,
        target: &Target,
        upstream: TcpStream,
        forwarded: front::ForwardSlot,
    ) -> Result<(Upstream, String), (String, CloseReason)> {
        let refused = |m: String| (m.clone(), CloseReason::ClientError(m));
        let credential = match target.login_for(&info.identity) {
            Ok(Some((_, credential))) => credential,
            Ok(None) => {
                return Err(refused(format!(
                    "tollgate: target \"{}\" has no credential for this process",
                    target.name
                )))
            }
            Err(message) => return Err(refused(message)),
        };
        let Some(known_hosts) = &target.ssh_known_hosts else {
            return Err(refused(format!(
                "tollgate: target \"{}\" has no known-hosts file",
                target.name
            )));
        };
        let upstream_failed = |m: String| (m.clone(), CloseReason::UpstreamError(m));
        let credential_key = if credential.ssh_certificate {
            let Some(user_ca) = &self.user_ca else {
                return Err(refused("tollgate: the agent has no SSH user CA".to_owned()));
            };
            // The host logs the certificate's id: it names the session.
            let key_id = format!(
                "tollgate session {} target {} pid {}",
                info.id,
                target.name,
                info.identity
                    .pid
                    .map_or_else(|| "?".to_owned(), |p| p.to_string())
            );
            let (key, cert) = user_ca
                .session_login(&credential.user, &key_id)
                .map_err(|e| {
                    upstream_failed(format!("tollgate: target \"{}\": {e}", target.name))
                })?;
            CredentialKey::Certificate(key, Box::new(cert))
        } else {
            let Some(key_file) = &credential.ssh_key_file else {
                return Err(refused(format!(
                    "tollgate: target \"{}\" has no ssh key",
                    target.name
                )));
            };
            // The key is read at each session (a rotated key needs no
            // reload); its text never reaches a message.
            let secret = crate::config::secret::read_secret_file(key_file).map_err(|e| {
                upstream_failed(format!(
                    "tollgate: cannot read the ssh key of target \"{}\": {e}",
                    target.name
                ))
            })?;
            let key = std::str::from_utf8(secret.expose())
                .ok()
                .and_then(|text| russh::keys::decode_secret_key(text, None).ok())
                .ok_or_else(|| {
                    upstream_failed(format!(
                        "tollgate: {} is not an unencrypted OpenSSH private key",
                        key_file.display()
                    ))
                })?;
            CredentialKey::Key(key)
        };
        let check = HostKeyCheck {
            known_hosts: known_hosts.clone(),
            host: ctx.upstream_name.clone(),
            port: ctx.upstream_addr.port(),
            refusal: Arc::default(),
            forwarded,
        };
        let refusal = Arc::clone(&check.refusal);
        // A host a CA vouches for is asked for its certificate.
        let cas = keys::trusted_host_cas(known_hosts, &ctx.upstream_name, ctx.upstream_addr.port());
        let config = if cas.is_empty() {
            Arc::clone(&self.upstream_config)
        } else {
            Arc::clone(&self.upstream_config_certificates)
        };
        let user = credential.user.clone();
        let login = async {
            let mut handle = russh::client::connect_stream(config, upstream, check)
                .await
                .map_err(|e| {
                    let why = refusal
                        .lock()
                        .ok()
                        .and_then(|mut r| r.take())
                        .unwrap_or_else(|| format!("the SSH handshake failed: {e}"));
                    upstream_failed(format!("tollgate: target \"{}\": {why}", target.name))
                })?;
            let authenticated = match credential_key {
                CredentialKey::Key(key) => {
                    let hash = handle
                        .best_supported_rsa_hash()
                        .await
                        .ok()
                        .flatten()
                        .flatten();
                    handle
                        .authenticate_publickey(
                            user.clone(),
                            PrivateKeyWithHashAlg::new(Arc::new(key), hash),
                        )
                        .await
                }
                CredentialKey::Certificate(key, cert) => {
                    handle
                        .authenticate_openssh_cert(user.clone(), Arc::new(key), *cert)
                        .await
                }
            };
            let result = authenticated.map_err(|e| {
                upstream_failed(format!(
                    "tollgate: target \"{}\": logging in as \"{user}\" failed: {e}",
                    target.name
                ))
            })?;
            if !result.success() {
                return Err(upstream_failed(format!(
                    "tollgate: target \"{}\" refused the agent's key for user \"{user}\"; check that the host's authorized_keys lists it (or, for ssh_certificate, that its TrustedUserCAKeys holds the agent's user CA)",
                    target.name
                )));
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(LOGIN_TIMEOUT, login)
            .await
            .map_err(|_| {
                upstream_failed(format!(
                    "tollgate: target \"{}\" did not complete the SSH login within {}s",
                    target.name,
                    LOGIN_TIMEOUT.as_secs()
                ))
            })??;
        Ok((handle, user))
    }
}

/// The known-hosts lines clients need for `config`'s SSH targets: one
/// `@cert-authority` line per target, for its host patterns (makes the CA
/// in `tls_dir` if the agent has not yet).
pub fn known_hosts_lines(config: &Config) -> anyhow::Result<Vec<String>> {
    let targets: Vec<&Target> = config
        .targets
        .iter()
        .filter(|t| t.protocol == Protocol::Ssh)
        .collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let host = keys::HostIdentity::load(&config.agent.tls_dir)?;
    targets
        .iter()
        .map(|t| {
            let line = keys::cert_authority_line(host.ca_public(), &host_patterns(t))
                .map_err(anyhow::Error::msg)?;
            Ok(format!("{line} tollgate target {}", t.name))
        })
        .collect()
}

/// A target's hosts as known-hosts patterns: the address (an IP network as
/// a wildcard on whole octets, `*` when it has none), and `[host]:port`
/// for each port other than 22, as OpenSSH looks such hosts up.
fn host_patterns(target: &Target) -> String {
    use crate::config::TargetAddress;
    let host = match &target.address {
        TargetAddress::Host(name) => name.clone(),
        TargetAddress::Net(net) if net.prefix_len() == net.max_prefix_len() => {
            net.addr().to_string()
        }
        TargetAddress::Net(ipnet::IpNet::V4(net)) if net.prefix_len() % 8 == 0 => {
            let octets = net.network().octets();
            let kept = usize::from(net.prefix_len() / 8);
            let mut parts: Vec<String> = octets.iter().take(kept).map(u8::to_string).collect();
            parts.push("*".to_owned());
            parts.join(".")
        }
        TargetAddress::Net(_) => "*".to_owned(),
    };
    let mut patterns = Vec::new();
    for range in &target.ports {
        if range.last - range.first >= 16 {
            // A wide range: any port of the host (a pattern per port would
            // make a line nobody reads).
            for pattern in [host.clone(), format!("[{host}]:*")] {
                if !patterns.contains(&pattern) {
                    patterns.push(pattern);
                }
            }
            continue;
        }
        for port in range.first..=range.last {
            let pattern = if port == 22 {
                host.clone()
            } else {
                format!("[{host}]:{port}")
            };
            if !patterns.contains(&pattern) {
                patterns.push(pattern);
            }
        }
    }
    patterns.join(",")
}

/// What the agent logs in to the host with.
enum CredentialKey {
    /// The credential's key.
    Key(russh::keys::PrivateKey),
    /// A fresh key and the certificate the user CA signed for it.
    Certificate(russh::keys::PrivateKey, Box<russh::keys::Certificate>),
}

/// The names a client may have used for the host, for the host certificate.
fn host_names(upstream_name: &str, upstream_addr: SocketAddr) -> Vec<String> {
    let mut names = vec![upstream_name.to_owned()];
    let ip = upstream_addr.ip().to_string();
    if ip != upstream_name {
        names.push(ip);
    }
    names
}

/// Checks the real host's key against the target's known-hosts file.
pub(super) struct HostKeyCheck {
    known_hosts: std::path::PathBuf,
    host: String,
    port: u16,
    /// Why the key was refused, for the message.
    refusal: Arc<Mutex<Option<String>>>,
    /// Where connections to an allowed remote forward go.
    forwarded: front::ForwardSlot,
}

impl russh::client::Handler for HostKeyCheck {
    type Error = russh::Error;

    /// A connection to a remote forward: only one the client asked for and
    /// the policy allowed (the slot is empty otherwise) reaches the client.
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let back = self.forwarded.lock().ok().and_then(|slot| slot.clone());
        let Some(back) = back else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        let relayed = back
            .open(
                channel,
                (connected_address, connected_port),
                (originator_address, originator_port),
            )
            .await;
        if !relayed {
            tracing::debug!("the client refused a forwarded connection from {originator_address}:{originator_port}");
        }
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let checked = match key {
            russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
                keys::check_host_key(&self.known_hosts, &self.host, self.port, key)
            }
            russh::keys::PublicKeyOrCertificate::Certificate(cert) => {
                keys::check_host_certificate(&self.known_hosts, &self.host, self.port, cert)
            }
        };
        match checked {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut slot) = self.refusal.lock() {
                    *slot = Some(why);
                }
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::{PortRange, TargetAddress};

    fn target(address: &str, ports: &[(u16, u16)]) -> Target {
        Target {
            name: "web".into(),
            address: TargetAddress::parse(address).unwrap(),
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocol: Protocol::Ssh,
            tls: Default::default(),
            record_raw: false,
            credentials: Vec::new(),
            client_credentials: Default::default(),
            ssh_known_hosts: None,
        }
    }

    #[test]
    fn known_hosts_patterns_name_the_hosts_as_openssh_looks_them_up() {
        assert_eq!(host_patterns(&target("10.0.0.5", &[(22, 22)])), "10.0.0.5");
        assert_eq!(
            host_patterns(&target("10.0.0.5", &[(22, 22), (2222, 2222)])),
            "10.0.0.5,[10.0.0.5]:2222"
        );
        assert_eq!(host_patterns(&target("10.1.0.0/16", &[(22, 22)])), "10.1.*");
        assert_eq!(host_patterns(&target("10.1.2.0/23", &[(22, 22)])), "*");
        assert_eq!(
            host_patterns(&target("db.internal", &[(1, 65535)])),
            "db.internal,[db.internal]:*"
        );
        assert_eq!(
            host_names("db.internal", "10.0.0.5:22".parse().unwrap()),
            ["db.internal", "10.0.0.5"]
        );
    }
}
