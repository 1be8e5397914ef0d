//! Who is talking to the web chat.
//!
//! A user is identified only by a bearer token, never by an id the client
//! claims: either a token the server signed (`v1.<user>.<expiry>.<mac>`,
//! HMAC-SHA256 with a key shared by all replicas) or one an operator
//! configured for a fixed user. Knowing another user's id therefore gives
//! no access to their conversation.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. Deliberately vague towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid or expired token")]
    Invalid,
}

/// A token issued to a new user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedToken {
    pub token: String,
    pub user_id: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Signs and verifies user tokens.
pub struct Authenticator {
    /// HMAC keyed once: each check clones it instead of hashing the key
    /// again (half the work of verifying a token).
    keyed: HmacSha256,
    ttl: Duration,
    /// Operator-configured token → user id.
    static_tokens: BTreeMap<String, String>,
}

impl Authenticator {
    /// An authenticator signing with `key`.
    pub fn new(key: Vec<u8>, ttl: Duration, static_tokens: BTreeMap<String, String>) -> Self {
        Authenticator {
            keyed: HmacSha256::new_from_slice(&key).expect("hmac takes any key length"),
            ttl,
            static_tokens,
        }
    }

    /// A random signing key.
    pub fn random_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key
    }

    /// Issues a token for a new, random user id.
    pub fn issue(&self) -> IssuedToken {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let user_id = format!("u_{}", URL_SAFE_NO_PAD.encode(raw));
        let expires_at = unix_now() + self.ttl.as_secs();
        let payload = format!("v1.{user_id}.{expires_at}");
        let token = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(self.mac(&payload)));
        IssuedToken {
            token,
            user_id,
            expires_at,
        }
    }

    /// The user a token belongs to.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if let Some(user) = self.static_user(token) {
            return Ok(user);
        }
        let (payload, mac) = token.rsplit_once('.').ok_or(AuthError::Invalid)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| AuthError::Invalid)?;
        let mut check = self.keyed.clone();
        check.update(payload.as_bytes());
        check.verify_slice(&mac).map_err(|_| AuthError::Invalid)?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(user), Some(expiry), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Invalid);
        };
        let expiry: u64 = expiry.parse().map_err(|_| AuthError::Invalid)?;
        if expiry < unix_now() {
            return Err(AuthError::Invalid);
        }
        Ok(user.to_owned())
    }

    fn static_user(&self, token: &str) -> Option<String> {
        // Compare against every configured token in constant time so the
        // time taken reveals nothing about how much of a token matched.
        let mut found = None;
        for (candidate, user) in &self.static_tokens {
            if constant_time_eq(candidate.as_bytes(), token.as_bytes()) {
                found = Some(user.clone());
            }
        }
        found
    }

    fn mac(&self, payload: &str) -> Vec<u8> {
        let mut mac = self.keyed.clone();
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(
            b"k".to_vec(),
            Duration::from_secs(60),
            [("operator-token".to_owned(), "ops".to_owned())].into(),
        )
    }

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let a = auth();
        let issued = a.issue();
        assert_eq!(a.verify(&issued.token), Ok(issued.user_id.clone()));
        // Claiming another user with the same signature fails.
        let forged = issued.token.replace(&issued.user_id, "u_someone_else");
        assert_eq!(a.verify(&forged), Err(AuthError::Invalid));
        // A token signed with another key fails.
        let other = Authenticator::new(b"other".to_vec(), Duration::from_secs(60), BTreeMap::new());
        assert_eq!(a.verify(&other.issue().token), Err(AuthError::Invalid));
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        assert_eq!(a.verify("garbage"), Err(AuthError::Invalid));
        assert_eq!(a.verify("operator-token"), Ok("ops".to_owned()));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = Authenticator::new(b"k".to_vec(), Duration::ZERO, BTreeMap::new());
        let payload = format!("v1.u_x.{}", unix_now() - 1);
        let token = format!("{payload}.{}", URL_SAFE_NO_PAD.encode(a.mac(&payload)));
        assert_eq!(a.verify(&token), Err(AuthError::Invalid));
    }
}
