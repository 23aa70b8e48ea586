//! Brokered credentials for MySQL and MariaDB, sans I/O: the client's
//! handshake answer rewritten to log in as the credential's user with
//! `mysql_native_password`, computed over the server's scramble, and the
//! server's auth switch answered the same way.

use ring::digest;

use super::handshake::{caps, HandshakeError};
use super::packet::{lenenc_int, Packet};

/// The only plugin brokered credentials answer.
pub const NATIVE_PASSWORD: &str = "mysql_native_password";

/// The scramble of the server's greeting (20 bytes for
/// `mysql_native_password`): 8 bytes after the connection id, the rest
/// after the reserved bytes.
pub fn scramble(greeting: &Packet) -> Option<Vec<u8>> {
    let p = &greeting.payload;
    let version_end = p.iter().skip(1).position(|&b| b == 0)? + 1;
    let first = p.get(version_end + 5..version_end + 13)?;
    // Filler (1), capabilities (2), charset (1), status (2), capabilities
    // (2), data length (1), reserved (10).
    let second_start = version_end + 13 + 1 + 2 + 1 + 2 + 2 + 1 + 10;
    let data_len = usize::from(*p.get(version_end + 13 + 1 + 2 + 1 + 2 + 2)?);
    let second_len = data_len.saturating_sub(8).max(13);
    let second = p.get(second_start..second_start + second_len)?;
    // The second part ends with a NUL that is not part of the scramble.
    let second = second.strip_suffix(&[0]).unwrap_or(second);
    Some([first, second].concat())
}

/// `mysql_native_password`'s answer: SHA1(password) XOR
/// SHA1(scramble + SHA1(SHA1(password))); empty for an empty password.
pub fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let sha1 = |parts: &[&[u8]]| {
        let mut context = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
        for part in parts {
            context.update(part);
        }
        context.finish()
    };
    let once = sha1(&[password]);
    let twice = sha1(&[once.as_ref()]);
    let mixed = sha1(&[scramble, twice.as_ref()]);
    once.as_ref()
        .iter()
        .zip(mixed.as_ref())
        .map(|(a, b)| a ^ b)
        .collect()
}

/// Rewrites a client's HandshakeResponse41, in place, to log in as `user`
/// with `auth` as `mysql_native_password`'s answer; the database,
/// connection attributes and everything before the user name stay the
/// client's.
pub fn login_as(answer: &mut Packet, user: &str, auth: &[u8]) -> Result<(), HandshakeError> {
    let short = || HandshakeError("the client's handshake answer is cut short".into());
    let p = &answer.payload;
    let head = p.get(..32).ok_or_else(short)?;
    let capabilities = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let rest = p.get(32..).ok_or_else(short)?;
    let user_end = rest.iter().position(|&b| b == 0).ok_or_else(short)?;
    let after_user = rest.get(user_end + 1..).ok_or_else(short)?;
    let auth_len = if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        lenenc_int(after_user)
            .and_then(|(n, used)| usize::try_from(n).ok().and_then(|n| n.checked_add(used)))
    } else if capabilities & caps::SECURE_CONNECTION != 0 {
        after_user.first().map(|&n| usize::from(n) + 1)
    } else {
        after_user.iter().position(|&b| b == 0).map(|i| i + 1)
    }
    .ok_or_else(short)?;
    let mut after_auth = after_user.get(auth_len..).ok_or_else(short)?;
    let mut database: &[u8] = &[];
    if capabilities & caps::CONNECT_WITH_DB != 0 {
        let end = after_auth.iter().position(|&b| b == 0).ok_or_else(short)?;
        database = after_auth.get(..=end).ok_or_else(short)?;
        after_auth = after_auth.get(end + 1..).unwrap_or_default();
    }
    if capabilities & caps::PLUGIN_AUTH != 0 {
        // The client's plugin name is replaced below.
        let end = after_auth.iter().position(|&b| b == 0).ok_or_else(short)?;
        after_auth = after_auth.get(end + 1..).unwrap_or_default();
    }
    let attributes = after_auth;
    let auth_len = u8::try_from(auth.len())
        .ok()
        .filter(|n| *n < 251)
        .ok_or_else(|| HandshakeError("an authentication answer over 250 bytes".into()))?;
    let mut payload = Vec::with_capacity(p.len() + user.len() + 64);
    let kept = capabilities | caps::PLUGIN_AUTH | caps::SECURE_CONNECTION;
    payload.extend_from_slice(&kept.to_le_bytes());
    payload.extend_from_slice(head.get(4..).unwrap_or_default());
    payload.extend_from_slice(user.as_bytes());
    payload.push(0);
    // A length under 251 is the same one byte whether the client asked for
    // length-encoded data or not.
    payload.push(auth_len);
    payload.extend_from_slice(auth);
    payload.extend_from_slice(database);
    payload.extend_from_slice(NATIVE_PASSWORD.as_bytes());
    payload.push(0);
    payload.extend_from_slice(attributes);
    answer.payload = payload;
    Ok(())
}

/// The plugin and its data in a server's AuthSwitchRequest (`0xFE`, the
/// plugin name, NUL, the data); `None` for any other packet.
pub fn auth_switch(payload: &[u8]) -> Option<(&str, &[u8])> {
    let rest = payload.strip_prefix(&[0xFE])?;
    let end = rest.iter().position(|&b| b == 0)?;
    let plugin = std::str::from_utf8(rest.get(..end)?).ok()?;
    let data = rest.get(end + 1..).unwrap_or_default();
    Some((plugin, data.strip_suffix(&[0]).unwrap_or(data)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_native_password_answer_is_what_the_server_checks() {
        // The server stores SHA1(SHA1(password)) and checks that
        // SHA1(answer XOR SHA1(scramble + stored)) equals it.
        let scramble = b"abcdefghijklmnopqrst";
        let answer = native_password(b"secret", scramble);
        let stored = {
            let once = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, b"secret");
            digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, once.as_ref())
        };
        let mut context = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
        context.update(scramble);
        context.update(stored.as_ref());
        let mixed = context.finish();
        let recovered: Vec<u8> = answer
            .iter()
            .zip(mixed.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(
            digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &recovered).as_ref(),
            stored.as_ref()
        );
        assert!(native_password(b"", scramble).is_empty());
    }

    #[test]
    fn a_login_is_rewritten_and_the_database_and_attributes_kept() {
        let capabilities = caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::PLUGIN_AUTH
            | caps::CONNECT_WITH_DB
            | (1 << 20);
        let mut payload = capabilities.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 1, 45]);
        payload.extend_from_slice(&[0; 23]);
        payload.extend_from_slice(b"me\0");
        payload.extend_from_slice(&[3, 1, 2, 3]);
        payload.extend_from_slice(b"shop\0client_ed25519\0");
        payload.extend_from_slice(&[4, 1, b'a', 1, b'b']);
        let mut answer = Packet { seq: 1, payload };
        login_as(&mut answer, "deployer", &[9; 20]).unwrap();
        let p = &answer.payload;
        assert_eq!(&p[..4], &capabilities.to_le_bytes());
        let rest = &p[32..];
        assert!(rest.starts_with(b"deployer\0\x14"));
        let after = &rest[9 + 1 + 20..];
        assert_eq!(after, b"shop\0mysql_native_password\0\x04\x01a\x01b");
        // A cut-short answer is an error, not a panic.
        let mut short = Packet {
            seq: 1,
            payload: answer.payload[..40].to_vec(),
        };
        short.payload[32..40].copy_from_slice(b"deployer");
        assert!(login_as(&mut short, "x", &[]).is_err());
    }

    #[test]
    fn an_auth_switch_gives_its_plugin_and_scramble() {
        let mut payload = vec![0xFE];
        payload.extend_from_slice(b"mysql_native_password\0abcdefghijklmnopqrst\0");
        assert_eq!(
            auth_switch(&payload),
            Some((NATIVE_PASSWORD, &b"abcdefghijklmnopqrst"[..]))
        );
        assert_eq!(auth_switch(&[0x00, 0, 0]), None);
    }
}
