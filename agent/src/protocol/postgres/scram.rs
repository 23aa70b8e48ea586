//! The client side of PostgreSQL password authentication, for brokered
//! credentials: SCRAM-SHA-256 (RFC 5802, RFC 7677, without channel
//! binding), the `md5` hash, sans I/O.
//!
//! The server checks the client's proof; the client checks the server's
//! signature, so a server that does not know the password cannot pass as
//! the real one. PostgreSQL takes the user from the StartupMessage and
//! ignores the SCRAM user name, so it is sent empty, as libpq does.
//! Passwords are used as bytes: PostgreSQL applies SASLprep when a
//! password is set, so a non-ASCII password must be stored in its
//! normalised (NFKC) form.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::{digest, hmac, pbkdf2, rand};

/// The mechanism name in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The most PBKDF2 iterations a server may ask for (PostgreSQL's default is
/// 4096): more would let a server tie up the agent's CPU for seconds.
const MAX_ITERATIONS: u32 = 1_000_000;

/// `c=biws`: base64 of the GS2 header `n,,` (no channel binding).
const CHANNEL_BINDING: &str = "c=biws";

/// One SCRAM-SHA-256 exchange, client side.
pub struct ScramClient {
    client_first_bare: String,
    nonce: String,
    password: Vec<u8>,
    /// The server key and the auth message, once the proof is sent.
    server_check: Option<(hmac::Key, String)>,
}

impl ScramClient {
    /// Starts an exchange with a fresh random nonce; the second value is
    /// the client-first-message for SASLInitialResponse.
    pub fn start(password: &[u8]) -> Result<(ScramClient, Vec<u8>), String> {
        let mut raw = [0u8; 18];
        rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut raw)
            .map_err(|_| "the system's random source failed".to_owned())?;
        Ok(Self::with_nonce("", &STANDARD.encode(raw), password))
    }

    fn with_nonce(user: &str, nonce: &str, password: &[u8]) -> (ScramClient, Vec<u8>) {
        let client_first_bare = format!("n={user},r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        let client = ScramClient {
            client_first_bare,
            nonce: nonce.to_owned(),
            password: password.to_vec(),
            server_check: None,
        };
        (client, first)
    }

    /// Reads the server-first-message (AuthenticationSASLContinue) and
    /// returns the client-final-message with the proof.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(server_first)
            .map_err(|_| "the server's SCRAM challenge is not UTF-8".to_owned())?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in text.split(',') {
            match attribute.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => {
                    return Err("the server asks for a SCRAM extension (m=)".to_owned())
                }
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(
                "the server's SCRAM challenge lacks its nonce, salt or iteration count".to_owned(),
            );
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err("the server's SCRAM nonce does not extend the client's".to_owned());
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| "the server's SCRAM salt is not base64".to_owned())?;
        let iterations = iterations
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .filter(|i| i.get() <= MAX_ITERATIONS)
            .ok_or_else(|| {
                format!("the server's SCRAM iteration count \"{iterations}\" is not between 1 and {MAX_ITERATIONS}")
            })?;
        let mut salted = [0u8; digest::SHA256_OUTPUT_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("{CHANNEL_BINDING},r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac::sign(&salted, b"Server Key");
        self.server_check = Some((
            hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message,
        ));
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message (AuthenticationSASLFinal): the
    /// server proves it knows the password too.
    pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(server_final)
            .map_err(|_| "the server's SCRAM answer is not UTF-8".to_owned())?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM proof: {error}"));
        }
        let given = text
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or_else(|| "the server's SCRAM answer has no signature".to_owned())?;
        match &self.server_check {
            // Compared in constant time.
            Some((key, auth_message)) => hmac::verify(key, auth_message.as_bytes(), &given)
                .map_err(|_| "the server's SCRAM signature is wrong: it does not know the password (an impostor?)".to_owned()),
            None => Err("the server ended SCRAM before its challenge".to_owned()),
        }
    }
}

impl Drop for ScramClient {
    fn drop(&mut self) {
        self.password.fill(0);
    }
}

/// The PasswordMessage text for `md5`: `md5` and the hex MD5 of the hex
/// MD5 of password and user, followed by the salt.
pub fn md5_password(user: &str, password: &[u8], salt: [u8; 4]) -> String {
    use md5::Digest;
    let inner = md5::Md5::new()
        .chain_update(password)
        .chain_update(user.as_bytes())
        .finalize();
    let outer = md5::Md5::new()
        .chain_update(hex::encode(inner).as_bytes())
        .chain_update(salt)
        .finalize();
    format!("md5{}", hex::encode(outer))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_rfc_7677_exchange() {
        let (mut client, first) =
            ScramClient::with_nonce("user", "rOprNGfwEbeRWgbNEkqO", b"pencil");
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let last = client
            .client_final(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
            .unwrap();
        assert_eq!(
            String::from_utf8(last).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        client
            .verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        let err = client
            .verify_server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap_err();
        assert!(err.contains("impostor"), "{err}");
        assert!(client
            .verify_server_final(b"e=invalid-proof")
            .unwrap_err()
            .contains("invalid-proof"));
    }

    #[test]
    fn a_challenge_that_does_not_extend_the_nonce_or_asks_too_much_is_refused() {
        let (mut client, _) = ScramClient::with_nonce("", "abc", b"pw");
        for (challenge, why) in [
            (&b"r=xyz1,s=AAAA,i=4096"[..], "nonce"),
            (b"r=abc,s=AAAA,i=4096", "nonce"),
            (b"r=abc1,s=AAAA,i=0", "iteration"),
            (b"r=abc1,s=AAAA,i=99999999", "iteration"),
            (b"r=abc1,s=!!,i=4096", "base64"),
            (b"r=abc1,i=4096", "salt"),
            (b"\xff", "UTF-8"),
        ] {
            let err = client.client_final(challenge).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        assert!(client
            .verify_server_final(b"v=AAAA")
            .unwrap_err()
            .contains("before"));
    }

    #[test]
    fn md5_is_what_postgres_stores_and_checks() {
        // md5('secret' || 'alice') = the hash PostgreSQL stores without
        // its `md5` prefix; then the salt.
        let stored = hex::encode({
            use md5::Digest;
            md5::Md5::digest(b"secretalice")
        });
        let expected = hex::encode({
            use md5::Digest;
            md5::Md5::new()
                .chain_update(stored.as_bytes())
                .chain_update([1, 2, 3, 4])
                .finalize()
        });
        assert_eq!(
            md5_password("alice", b"secret", [1, 2, 3, 4]),
            format!("md5{expected}")
        );
    }
}
