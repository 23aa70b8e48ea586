//! Targets: the systems Tollgate governs access to, and how a destination
//! address is matched to one.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::identity::ProcessIdentity;
use crate::policy::IdentityMatch;

/// The protocol spoken to a target; it selects the session handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// PostgreSQL frontend/backend protocol v3.
    Postgres,
    /// MySQL / MariaDB client/server protocol.
    Mysql,
    /// SSH: terminated by the agent, which logs in to the host with a
    /// brokered key.
    Ssh,
    /// Opaque TCP: relayed and accounted, not inspected.
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
            Protocol::Ssh => "ssh",
            Protocol::Tcp => "tcp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "postgres" | "postgresql" => Ok(Protocol::Postgres),
            "mysql" | "mariadb" => Ok(Protocol::Mysql),
            "ssh" => Ok(Protocol::Ssh),
            "tcp" => Ok(Protocol::Tcp),
            other => Err(format!(
                "unknown protocol \"{other}\"; use one of: postgres, mysql, ssh, tcp"
            )),
        }
    }
}

/// Where a target lives: a network (a single IP is a /32 or /128) or a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAddress {
    /// An IP network in CIDR notation, or a single address.
    Net(IpNet),
    /// A DNS name, resolved when a connection needs it.
    Host(String),
}

impl TargetAddress {
    /// Parses `10.0.0.5`, `10.0.0.0/24`, `::1`, `fd00::/64` or a host name.
    pub fn parse(s: &str) -> Result<TargetAddress, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "address is empty; give an IP, a CIDR such as 10.0.0.0/24, or a host name".into(),
            );
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(TargetAddress::Net(IpNet::from(ip)));
        }
        if s.contains('/') {
            return s
                .parse::<IpNet>()
                .map(|n| TargetAddress::Net(n.trunc()))
                .map_err(|_| {
                    format!("\"{s}\" is not a valid CIDR network (example: 10.0.0.0/24)")
                });
        }
        let valid_host = s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            });
        if valid_host {
            Ok(TargetAddress::Host(s.to_ascii_lowercase()))
        } else {
            Err(format!(
                "\"{s}\" is neither an IP address, a CIDR network nor a host name"
            ))
        }
    }

    /// The single host to connect to, when the address names exactly one.
    pub fn single_host(&self) -> Option<String> {
        match self {
            TargetAddress::Host(h) => Some(h.clone()),
            TargetAddress::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                Some(n.addr().to_string())
            }
            TargetAddress::Net(_) => None,
        }
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddress::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{}", n.addr())
            }
            TargetAddress::Net(n) => write!(f, "{n}"),
            TargetAddress::Host(h) => f.write_str(h),
        }
    }
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port, inclusive.
    pub last: u16,
}

impl PortRange {
    /// Parses `5432` or `5432-5440`.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let port = |p: &str| -> Result<u16, String> {
            match p.trim().parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("\"{}\" is not a port (1-65535)", p.trim())),
                Ok(n) => Ok(n),
            }
        };
        match s.split_once('-') {
            None => port(s).map(|p| PortRange { first: p, last: p }),
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!(
                        "port range \"{s}\" runs backwards; write {last}-{first}"
                    ));
                }
                Ok(PortRange { first, last })
            }
        }
    }

    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// The port, when the range holds exactly one.
    pub fn single(&self) -> Option<u16> {
        (self.first == self.last).then_some(self.first)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.single() {
            Some(p) => write!(f, "{p}"),
            None => write!(f, "{}-{}", self.first, self.last),
        }
    }
}

/// A named system Tollgate governs access to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Unique name used in policies, logs, metrics and recordings.
    pub name: String,
    /// Where it lives.
    pub address: TargetAddress,
    /// The ports it serves on.
    pub ports: Vec<PortRange>,
    /// The protocol spoken.
    pub protocol: Protocol,
    /// TLS towards the upstream.
    pub tls: UpstreamTls,
    /// Whether sessions record every byte read from each side
    /// (`record_raw`, default false), for replay and pcap export.
    pub record_raw: bool,
    /// Credentials the agent logs in with on the client's behalf
    /// (`[[target.credential]]`), in file order: the first whose `match`
    /// accepts the process is used.
    pub credentials: Vec<BrokeredCredential>,
    /// What happens to a session no credential is for, on a target that
    /// has credentials.
    pub client_credentials: ClientCredentials,
    /// An SSH target's known-hosts file: the host keys the agent accepts
    /// from the real host (required for `ssh`).
    pub ssh_known_hosts: Option<PathBuf>,
}

/// A credential the agent holds for a target: the governed client connects
/// with no secret, and the agent authenticates to the server as `user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokeredCredential {
    /// The database role the agent logs in as (the client's requested user
    /// is replaced; both are recorded).
    pub user: String,
    /// The file that holds the password: root-only, read at each session
    /// so that a rotated password needs no reload.
    pub password_file: Option<PathBuf>,
    /// A client certificate the agent presents on the TLS upstream leg
    /// (for `cert` in pg_hba.conf), read at start.
    pub client_cert: Option<ClientCertificate>,
    /// The private key the agent logs in to an SSH host with (OpenSSH
    /// format, root-only), read at each session.
    pub ssh_key_file: Option<PathBuf>,
    /// Log in to an SSH host with a certificate the agent's user CA signs
    /// for the session (`ssh_certificate = true`), in place of a key.
    pub ssh_certificate: bool,
    /// Which processes it is for (none given: every process).
    pub identity: Arc<IdentityMatch>,
}

/// A client certificate chain and its key, both PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key: root-only, as a password file.
    pub key_file: PathBuf,
}

/// What a target with credentials does with a session none of them is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCredentials {
    /// Refused at start-up, saying so (the default).
    #[default]
    Refuse,
    /// Relayed as on a target without credentials: the client
    /// authenticates with its own.
    Pass,
}

impl Target {
    /// How a session of `identity` logs in: with the first credential
    /// whose `match` accepts it (and its place among the target's), with
    /// its own (`None`: no credentials, or `client_credentials = "pass"`),
    /// or not at all (the message that says why).
    pub fn login_for(
        &self,
        identity: &ProcessIdentity,
    ) -> Result<Option<(usize, &BrokeredCredential)>, String> {
        if self.credentials.is_empty() {
            return Ok(None);
        }
        match (self.credential_for(identity), self.client_credentials) {
            (Some(found), _) => Ok(Some(found)),
            (None, ClientCredentials::Pass) => Ok(None),
            (None, ClientCredentials::Refuse) => Err(format!(
                "tollgate: target \"{}\" logs in with brokered credentials and none of them is for this process ({})",
                self.name,
                identity.summary()
            )),
        }
    }

    /// The first credential whose `match` accepts `identity`, and its
    /// place among the target's.
    pub fn credential_for(
        &self,
        identity: &ProcessIdentity,
    ) -> Option<(usize, &BrokeredCredential)> {
        self.credentials
            .iter()
            .enumerate()
            .find(|(_, c)| c.identity.matches(identity))
    }
}

/// How the proxy secures its connection to a target (libpq's sslmode).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UpstreamTls {
    /// Plaintext.
    Disable,
    /// TLS if the server offers it, else plaintext.
    #[default]
    Prefer,
    /// TLS required; the certificate is not checked.
    Require,
    /// TLS required, the certificate checked against a CA and the host name.
    VerifyFull {
        /// PEM file of the CA(s) to trust.
        ca_file: std::path::PathBuf,
        /// Name the certificate must carry (default: the target's host).
        server_name: Option<String>,
    },
}

impl Target {
    /// Whether a destination IP and port belong to this target. Host-name
    /// targets match through the addresses they resolved to, which the caller
    /// passes in `resolved`.
    pub fn matches(&self, dest: SocketAddr, resolved: &[IpAddr]) -> bool {
        if !self.ports.iter().any(|r| r.contains(dest.port())) {
            return false;
        }
        let ip = canonical_ip(dest.ip());
        match &self.address {
            TargetAddress::Net(net) => net.contains(&ip),
            TargetAddress::Host(_) => resolved.iter().any(|r| canonical_ip(*r) == ip),
        }
    }

    /// The one port, when the target has exactly one.
    pub fn single_port(&self) -> Option<u16> {
        match self.ports.as_slice() {
            [only] => only.single(),
            _ => None,
        }
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// All targets, in the order the file declares them.
#[derive(Debug, Clone, Default)]
pub struct TargetSet {
    targets: Vec<Target>,
}

impl TargetSet {
    /// Builds the set; names must already be unique.
    pub fn new(targets: Vec<Target>) -> TargetSet {
        TargetSet { targets }
    }

    /// The target with this name.
    pub fn get(&self, name: &str) -> Option<&Target> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// The first target a destination belongs to. `resolve` gives the
    /// addresses of host-name targets (the agent keeps them resolved).
    pub fn find(&self, dest: SocketAddr, resolve: impl Fn(&str) -> Vec<IpAddr>) -> Option<&Target> {
        self.targets.iter().find(|t| match &t.address {
            TargetAddress::Host(h) => t.matches(dest, &resolve(h)),
            TargetAddress::Net(_) => t.matches(dest, &[]),
        })
    }

    /// Iterates over the targets in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.iter()
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no targets.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}
