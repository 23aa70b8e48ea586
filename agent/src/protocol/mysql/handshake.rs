//! The connection phase: the server's greeting (HandshakeV10), the client's
//! answer (HandshakeResponse41), and what the proxy changes in them.
//!
//! The proxy relays authentication untouched (the server checks the
//! client's own credentials, whatever the plugin), but it offers the client
//! only the capabilities whose traffic it can follow, and it clears the same
//! bits in the client's answer, so a client cannot ask the server for what
//! was never offered:
//! - TLS, compression: the proxy reads every command. TLS is negotiated by
//!   the proxy on each leg apart: it offers TLS to the client when it
//!   terminates TLS (`client_tls = "terminate"`), and asks the server for
//!   it as the target's `tls` mode says (see the session);
//! - `CLIENT_DEPRECATE_EOF`, optional result metadata, query attributes,
//!   multi-factor authentication: they change the framing of results and
//!   commands; without them every result set ends in an EOF packet;
//! - (`CLIENT_LOCAL_FILES` is kept: the session answers the server's request
//!   for a client file only for a `LOAD DATA LOCAL` a rule allowed, and only
//!   for the file that statement names; any other request gets an empty
//!   file and the client never sees it);
//! - MariaDB's extended capabilities (progress reports, bulk execution,
//!   metadata caching): all of them.

use super::packet::Packet;

/// Capability flags (the protocol's `CLIENT_*`).
pub mod caps {
    /// `CLIENT_LONG_PASSWORD`; a MariaDB server leaves it clear to say
    /// that its greeting carries extended capabilities.
    pub const CLIENT_MYSQL: u32 = 1;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const COMPRESS: u32 = 1 << 5;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const SSL: u32 = 1 << 11;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    pub const OPTIONAL_RESULTSET_METADATA: u32 = 1 << 25;
    pub const ZSTD_COMPRESSION: u32 = 1 << 26;
    pub const QUERY_ATTRIBUTES: u32 = 1 << 27;
    pub const MULTI_FACTOR_AUTH: u32 = 1 << 28;

    /// What the proxy never lets the two sides agree on.
    pub const STRIPPED: u32 = COMPRESS
        | SSL
        | DEPRECATE_EOF
        | OPTIONAL_RESULTSET_METADATA
        | ZSTD_COMPRESSION
        | QUERY_ATTRIBUTES
        | MULTI_FACTOR_AUTH;
}

/// Why a handshake packet could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError(pub String);

/// The connection id the server gave the session, from its greeting (the
/// id `KILL` and `SHOW PROCESSLIST` use).
pub fn connection_id(greeting: &Packet) -> Option<u32> {
    let p = greeting.payload.get(1..)?;
    let end = p.iter().position(|&b| b == 0)?;
    let raw = p.get(end + 1..end + 5)?;
    Some(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// Character sets whose multi-byte characters may end in a byte that is a
/// backslash or a quote in ASCII: text in them is not read as the UTF-8
/// analysis reads it (`'\xbf\\' OR 1=1 -- '` is one string in UTF-8 and
/// a string and SQL in GBK).
pub const UNSAFE_CHARSETS: &[&str] = &["big5", "cp932", "gbk", "gb18030", "sjis"];

/// Whether the collation with this id belongs to one of
/// [`UNSAFE_CHARSETS`] (big5 1, 84; sjis 13, 88; gbk 28, 87; cp932 95, 96;
/// MySQL's gb18030 248-250).
pub fn collation_is_unsafe(id: u8) -> bool {
    matches!(id, 1 | 84 | 13 | 88 | 28 | 87 | 95 | 96 | 248..=250)
}

/// The server's version string from its greeting (`10.11.19-MariaDB`).
pub fn server_version(greeting: &Packet) -> Option<&str> {
    let p = greeting.payload.get(1..)?;
    let end = p.iter().position(|&b| b == 0)?;
    std::str::from_utf8(p.get(..end)?).ok()
}

/// Removes [`caps::STRIPPED`] and MariaDB's extended capabilities from the
/// server's greeting, in place, offering TLS when `offer_tls` (the proxy
/// terminates it); the capabilities the server offered.
pub fn restrict_greeting(greeting: &mut Packet, offer_tls: bool) -> Result<u32, HandshakeError> {
    let p = &mut greeting.payload;
    if p.first() != Some(&10) {
        return Err(HandshakeError(format!(
            "the server's greeting has protocol version {:?}, not 10",
            p.first()
        )));
    }
    let version_end = p
        .iter()
        .skip(1)
        .position(|&b| b == 0)
        .map(|i| i + 1)
        .ok_or_else(|| HandshakeError("the server's version is not terminated".into()))?;
    // Connection id (4), scramble (8), filler (1), then the low half.
    let low = version_end + 14;
    let high = low + 5; // charset (1) and status (2) between them
    let (Some(lo), Some(hi)) = (p.get(low..low + 2), p.get(high..high + 2)) else {
        return Err(HandshakeError("the server's greeting is cut short".into()));
    };
    let offered = u32::from(u16::from_le_bytes([lo[0], lo[1]]))
        | u32::from(u16::from_le_bytes([hi[0], hi[1]])) << 16;
    let mut kept = offered & !caps::STRIPPED;
    if offer_tls {
        kept |= caps::SSL;
    }
    if let Some(slot) = p.get_mut(low..low + 2) {
        slot.copy_from_slice(&(kept as u16).to_le_bytes());
    }
    if let Some(slot) = p.get_mut(high..high + 2) {
        slot.copy_from_slice(&((kept >> 16) as u16).to_le_bytes());
    }
    // Auth data length (1), then 10 reserved bytes whose last 4 are
    // MariaDB's extended capabilities.
    if offered & caps::CLIENT_MYSQL == 0 {
        let extended = high + 2 + 1 + 6;
        if let Some(slot) = p.get_mut(extended..extended + 4) {
            slot.fill(0);
        }
    }
    Ok(offered)
}

/// The SSLRequest the proxy sends the server for a client's answer: the
/// answer's first 32 bytes (capabilities, maximum packet size, character
/// set) with `CLIENT_SSL` set.
pub fn ssl_request(answer: &Packet) -> Result<Packet, HandshakeError> {
    let mut payload = answer
        .payload
        .get(..32)
        .ok_or_else(|| HandshakeError("the client's handshake answer is cut short".into()))?
        .to_vec();
    let asked = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    payload[..4].copy_from_slice(&(asked | caps::SSL).to_le_bytes());
    Ok(Packet {
        seq: answer.seq,
        payload,
    })
}

/// Sets or clears `CLIENT_SSL` in a client's answer, in place: it must say
/// whether the leg it is forwarded on is TLS.
pub fn set_tls(answer: &mut Packet, tls: bool) {
    if let Some(raw) = answer.payload.get_mut(..4) {
        let asked = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let asked = if tls {
            asked | caps::SSL
        } else {
            asked & !caps::SSL
        };
        raw.copy_from_slice(&asked.to_le_bytes());
    }
}

/// What the client's answer says about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The capabilities the client asked for (after the proxy's changes).
    pub capabilities: u32,
    /// The database user.
    pub user: String,
    /// The database, when given.
    pub database: Option<String>,
    /// The collation (and so the character set) the client's text is
    /// read in, by its id.
    pub collation: u8,
    /// The authentication plugin the client's answer was made with.
    pub auth_plugin: Option<String>,
}

/// What the client's first packet is.
#[derive(Debug)]
pub enum ClientAnswer {
    /// An SSLRequest: the client wants TLS first.
    WantsTls,
    /// A HandshakeResponse41, its capabilities restricted in place.
    Hello(ClientHello),
}

/// Reads the client's answer to the greeting and clears the capabilities
/// the proxy does not allow, in place.
pub fn read_client_answer(answer: &mut Packet) -> Result<ClientAnswer, HandshakeError> {
    let p = &mut answer.payload;
    let Some(raw) = p.get(0..4) else {
        return Err(HandshakeError(
            "the client's handshake answer is cut short".into(),
        ));
    };
    let asked = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    if asked & caps::PROTOCOL_41 == 0 {
        return Err(HandshakeError(
            "the client does not speak protocol 4.1, which the agent requires".into(),
        ));
    }
    if asked & caps::SSL != 0 && p.len() <= 32 {
        return Ok(ClientAnswer::WantsTls);
    }
    let kept = asked & !caps::STRIPPED;
    if let Some(slot) = p.get_mut(0..4) {
        slot.copy_from_slice(&kept.to_le_bytes());
    }
    // Max packet (4), charset (1), 23 reserved bytes whose last 4 are
    // MariaDB's extended capabilities.
    if kept & caps::CLIENT_MYSQL == 0 {
        if let Some(slot) = p.get_mut(28..32) {
            slot.fill(0);
        }
    }
    let rest = p
        .get(32..)
        .ok_or_else(|| HandshakeError("the client's handshake answer is cut short".into()))?;
    let (user, after_user) = nul_terminated(rest)
        .ok_or_else(|| HandshakeError("the client's user name is not terminated".into()))?;
    let auth_len = if kept & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        super::packet::lenenc_int(after_user)
            .and_then(|(n, used)| usize::try_from(n).ok().and_then(|n| n.checked_add(used)))
    } else if kept & caps::SECURE_CONNECTION != 0 {
        after_user.first().map(|&n| usize::from(n) + 1)
    } else {
        after_user.iter().position(|&b| b == 0).map(|i| i + 1)
    }
    .ok_or_else(|| HandshakeError("the client's authentication data is cut short".into()))?;
    let after_auth = after_user.get(auth_len..).unwrap_or_default();
    let (database, after_database) = if kept & caps::CONNECT_WITH_DB != 0 {
        match nul_terminated(after_auth) {
            Some((db, rest)) => (Some(db), rest),
            None => (None, &[][..]),
        }
    } else {
        (None, after_auth)
    };
    let auth_plugin = if kept & caps::PLUGIN_AUTH != 0 {
        nul_terminated(after_database).map(|(plugin, _)| plugin)
    } else {
        None
    };
    Ok(ClientAnswer::Hello(ClientHello {
        capabilities: kept,
        user,
        database: database.filter(|d| !d.is_empty()),
        collation: p.get(8).copied().unwrap_or_default(),
        auth_plugin,
    }))
}

/// What a `COM_CHANGE_USER` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeUser {
    /// The database user.
    pub user: String,
    /// The database, when given.
    pub database: Option<String>,
    /// The collation id the client's text is read in from now on, when
    /// given and below 256.
    pub collation: Option<u8>,
    /// The authentication plugin the change's answer was made with.
    pub auth_plugin: Option<String>,
}

/// Reads a `COM_CHANGE_USER` (its command byte first) of a session whose
/// capabilities are `capabilities`.
pub fn read_change_user(payload: &[u8], capabilities: u32) -> Option<ChangeUser> {
    let (user, after_user) = nul_terminated(payload.get(1..)?)?;
    let auth_len = if capabilities & caps::SECURE_CONNECTION != 0 {
        usize::from(*after_user.first()?) + 1
    } else {
        after_user.iter().position(|&b| b == 0)? + 1
    };
    let (database, rest) = nul_terminated(after_user.get(auth_len..)?)?;
    let collation = match rest.get(..2) {
        Some([low, 0]) => Some(*low),
        _ => None,
    };
    let auth_plugin = if capabilities & caps::PLUGIN_AUTH != 0 {
        rest.get(2..)
            .and_then(nul_terminated)
            .map(|(plugin, _)| plugin)
    } else {
        None
    };
    Some(ChangeUser {
        user,
        database: (!database.is_empty()).then_some(database),
        collation,
        auth_plugin,
    })
}

/// The plugin an AuthSwitchRequest (`0xFE`, the plugin's name, its data)
/// switches to; `None` for any other packet.
pub fn auth_switch_plugin(payload: &[u8]) -> Option<String> {
    match payload.split_first() {
        Some((0xFE, rest)) if !rest.is_empty() => nul_terminated(rest).map(|(name, _)| name),
        _ => None,
    }
}

/// Whether a client answers `plugin` with the password itself once its
/// connection is TLS: `mysql_clear_password` always, `sha256_password`
/// over TLS, `dialog` (PAM) with what its questions ask.
/// `caching_sha2_password` does so only on its full path (after the
/// server's "perform full authentication", [`CACHING_SHA2_FULL_PATH`]).
pub fn sends_password_in_clear(plugin: &str) -> bool {
    matches!(
        plugin,
        "mysql_clear_password" | "sha256_password" | "dialog"
    )
}

/// caching_sha2_password's "perform full authentication" (AuthMoreData
/// 0x04): a client on TLS answers with its password in clear.
pub const CACHING_SHA2_FULL_PATH: [u8; 2] = [0x01, 0x04];

/// A client's request for the server's RSA public key
/// (`caching_sha2_password` on a plaintext connection).
pub const REQUEST_PUBLIC_KEY: u8 = 0x02;

/// A NUL-terminated string at the start of `bytes` and what follows it.
fn nul_terminated(bytes: &[u8]) -> Option<(String, &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    let text = String::from_utf8_lossy(bytes.get(..end)?).into_owned();
    Some((text, bytes.get(end + 1..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn greeting(caps: u32, mariadb_ext: u32) -> Packet {
        let mut p = vec![10];
        p.extend_from_slice(b"10.11.6-MariaDB\0");
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh\0");
        p.extend_from_slice(&(caps as u16).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&mariadb_ext.to_le_bytes());
        p.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        Packet { seq: 0, payload: p }
    }

    fn offered(p: &Packet) -> (u32, u32) {
        let v = 1 + b"10.11.6-MariaDB\0".len();
        let lo = u16::from_le_bytes([p.payload[v + 13], p.payload[v + 14]]);
        let hi = u16::from_le_bytes([p.payload[v + 18], p.payload[v + 19]]);
        let ext = &p.payload[v + 27..v + 31];
        (
            u32::from(lo) | u32::from(hi) << 16,
            u32::from_le_bytes([ext[0], ext[1], ext[2], ext[3]]),
        )
    }

    #[test]
    fn the_greeting_names_version_and_connection() {
        let g = greeting(caps::PROTOCOL_41, 0);
        assert_eq!(server_version(&g), Some("10.11.6-MariaDB"));
        assert_eq!(connection_id(&g), Some(7));
        let cut = Packet {
            seq: 0,
            payload: b"\x0a10.11\0\x07".to_vec(),
        };
        assert_eq!(connection_id(&cut), None);
    }

    #[test]
    fn the_greeting_loses_what_the_proxy_cannot_follow() {
        let all = caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::MULTI_STATEMENTS
            | caps::PLUGIN_AUTH
            | caps::STRIPPED;
        let mut g = greeting(all, 0x1f);
        restrict_greeting(&mut g, false).unwrap();
        let (kept, ext) = offered(&g);
        assert_eq!(kept & caps::STRIPPED, 0);
        assert_eq!(
            kept,
            caps::PROTOCOL_41
                | caps::SECURE_CONNECTION
                | caps::MULTI_STATEMENTS
                | caps::PLUGIN_AUTH
        );
        assert_eq!(ext, 0, "MariaDB's extended capabilities are all cleared");
        // A MySQL server's reserved bytes are left as they are.
        let mut g = greeting(all | caps::CLIENT_MYSQL, 0x1f);
        restrict_greeting(&mut g, false).unwrap();
        assert_eq!(offered(&g).1, 0x1f);
        assert!(restrict_greeting(
            &mut Packet {
                seq: 0,
                payload: vec![10, b'x']
            },
            false
        )
        .is_err());
        // Terminating TLS, the proxy offers it whatever the server does.
        let mut g = greeting(caps::PROTOCOL_41, 0);
        assert_eq!(restrict_greeting(&mut g, true).unwrap(), caps::PROTOCOL_41);
        assert_eq!(offered(&g).0, caps::PROTOCOL_41 | caps::SSL);
    }

    fn answer(caps: u32, user: &str, auth: &[u8], db: Option<&str>) -> Packet {
        let mut p = caps.to_le_bytes().to_vec();
        p.extend_from_slice(&(16u32 << 20).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 19]);
        p.extend_from_slice(&0x0fu32.to_le_bytes());
        p.extend_from_slice(user.as_bytes());
        p.push(0);
        p.push(auth.len() as u8);
        p.extend_from_slice(auth);
        if let Some(db) = db {
            p.extend_from_slice(db.as_bytes());
            p.push(0);
        }
        p.extend_from_slice(b"mysql_native_password\0");
        Packet { seq: 1, payload: p }
    }

    #[test]
    fn the_clients_answer_names_user_and_database_and_loses_stripped_bits() {
        let asked = caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | caps::CONNECT_WITH_DB
            | caps::LOCAL_FILES
            | caps::DEPRECATE_EOF;
        let mut p = answer(asked, "app", &[0xAB; 20], Some("shop"));
        let ClientAnswer::Hello(hello) = read_client_answer(&mut p).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(hello.user, "app");
        assert_eq!(hello.database.as_deref(), Some("shop"));
        assert_eq!(hello.capabilities & caps::STRIPPED, 0);
        let sent = u32::from_le_bytes([p.payload[0], p.payload[1], p.payload[2], p.payload[3]]);
        assert_eq!(sent, hello.capabilities);
        assert_eq!(
            &p.payload[28..32],
            &[0; 4],
            "MariaDB's extended bits cleared"
        );

        let mut p = answer(asked & !caps::CONNECT_WITH_DB, "app", b"", None);
        let ClientAnswer::Hello(hello) = read_client_answer(&mut p).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(hello.database, None);

        // An authentication length at the top of the range is cut short,
        // not an overflow.
        let mut p = answer(
            caps::PROTOCOL_41 | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            "app",
            b"",
            None,
        );
        let at = 32 + b"app\0".len();
        p.payload.splice(
            at..=at,
            [0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        );
        assert!(read_client_answer(&mut p).is_err());

        let mut tls = Packet {
            seq: 1,
            payload: answer(caps::PROTOCOL_41 | caps::SSL, "", b"", None).payload[..32].to_vec(),
        };
        assert!(matches!(
            read_client_answer(&mut tls),
            Ok(ClientAnswer::WantsTls)
        ));
        let mut old = answer(caps::SECURE_CONNECTION, "app", b"", None);
        assert!(read_client_answer(&mut old).is_err());
        let mut cut = Packet {
            seq: 1,
            payload: answer(asked, "app", &[1; 20], None).payload[..36].to_vec(),
        };
        assert!(read_client_answer(&mut cut).is_err());
    }

    #[test]
    fn the_servers_ssl_request_is_made_from_the_clients_answer() {
        let a = answer(
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION,
            "app",
            b"xyz",
            Some("shop"),
        );
        let request = ssl_request(&a).unwrap();
        assert_eq!(request.seq, a.seq);
        assert_eq!(request.payload.len(), 32);
        assert_eq!(&request.payload[4..], &a.payload[4..32]);
        let asked = u32::from_le_bytes(request.payload[..4].try_into().unwrap());
        assert_eq!(
            asked,
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::SSL
        );
        let mut b = a.clone();
        set_tls(&mut b, true);
        assert_eq!(&b.payload[..4], &request.payload[..4]);
        set_tls(&mut b, false);
        assert_eq!(b.payload, a.payload);
        assert!(ssl_request(&Packet {
            seq: 1,
            payload: vec![0; 8]
        })
        .is_err());
    }

    #[test]
    fn a_change_of_user_names_user_database_and_collation() {
        let mut p = vec![0x11];
        p.extend_from_slice(b"other\0");
        p.push(3);
        p.extend_from_slice(b"xyz");
        p.extend_from_slice(b"shop\0");
        p.extend_from_slice(&[28, 0]);
        p.extend_from_slice(b"mysql_native_password\0");
        let change = read_change_user(&p, caps::SECURE_CONNECTION | caps::PLUGIN_AUTH).unwrap();
        assert_eq!(
            change,
            ChangeUser {
                user: "other".into(),
                database: Some("shop".into()),
                collation: Some(28),
                auth_plugin: Some("mysql_native_password".into()),
            }
        );
        let without_plugins = read_change_user(&p, caps::SECURE_CONNECTION).unwrap();
        assert_eq!(without_plugins.auth_plugin, None);
        assert_eq!(read_change_user(&p[..8], caps::SECURE_CONNECTION), None);
    }

    #[test]
    fn the_plugin_of_an_answer_or_a_switch_is_read_and_clear_ones_are_known() {
        let asked = caps::PROTOCOL_41 | caps::SECURE_CONNECTION | caps::PLUGIN_AUTH;
        for db in [None, Some("shop")] {
            let caps = asked
                | if db.is_some() {
                    caps::CONNECT_WITH_DB
                } else {
                    0
                };
            let mut p = answer(caps, "app", &[1; 20], db);
            let ClientAnswer::Hello(hello) = read_client_answer(&mut p).unwrap() else {
                panic!("not a hello");
            };
            assert_eq!(hello.auth_plugin.as_deref(), Some("mysql_native_password"));
        }
        // Without CLIENT_PLUGIN_AUTH the trailing name is not a plugin's.
        let mut p = answer(
            caps::PROTOCOL_41 | caps::SECURE_CONNECTION,
            "app",
            b"",
            None,
        );
        let ClientAnswer::Hello(hello) = read_client_answer(&mut p).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(hello.auth_plugin, None);

        let switch = b"\xFEmysql_clear_password\0";
        assert_eq!(
            auth_switch_plugin(switch).as_deref(),
            Some("mysql_clear_password")
        );
        assert_eq!(
            auth_switch_plugin(b"\xFE"),
            None,
            "the old switch names none"
        );
        assert_eq!(auth_switch_plugin(b"\xFEunterminated"), None);
        assert_eq!(auth_switch_plugin(&CACHING_SHA2_FULL_PATH), None);
        for clear in ["mysql_clear_password", "sha256_password", "dialog"] {
            assert!(sends_password_in_clear(clear), "{clear}");
        }
        for scrambled in [
            "mysql_native_password",
            "caching_sha2_password",
            "client_ed25519",
            "auth_gssapi_client",
        ] {
            assert!(!sends_password_in_clear(scrambled), "{scrambled}");
        }
    }
}
