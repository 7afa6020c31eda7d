//! API keys and webhook tokens: random secrets of which only a SHA-256 hash
//! is ever stored, compared in constant time.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// 32 random bytes (256 bits) as URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The SHA-256 of a secret, which is what the database keeps.
pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `secret` hashes to `stored_hash`, without leaking through timing
/// how many bytes matched.
pub fn verify(secret: &str, stored_hash: &[u8]) -> bool {
    hash(secret).ct_eq(stored_hash).into()
}

/// An API key as handed to a user: `zf_<key id>_<secret>`. The id finds the
/// row, the secret is checked against its hash. Its `Debug` leaves the
/// secret out, so a logged key gives nothing away.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: uuid::Uuid,
    pub secret: String,
}

impl ApiKey {
    pub fn generate() -> Self {
        Self {
            id: uuid::Uuid::new_v4(),
            secret: random_token(),
        }
    }

    /// Parses the text form; `None` for anything malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("zf_")?;
        let (id, secret) = rest.split_once('_')?;
        let id = uuid::Uuid::parse_str(id).ok()?;
        (!secret.is_empty()).then(|| Self {
            id,
            secret: secret.to_owned(),
        })
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "zf_{}_{}", self.id.simple(), self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_debug_hides_the_secret() {
        let key = ApiKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.secret), "{shown}");
        assert!(shown.contains(&key.id.to_string()), "{shown}");
    }

    #[test]
    fn api_key_round_trips_through_text() {
        let key = ApiKey::generate();
        assert_eq!(ApiKey::parse(&key.to_string()), Some(key));
    }

    #[test]
    fn malformed_api_keys_are_rejected() {
        for text in [
            "",
            "zf_",
            "zf_nope_x",
            "xx_00000000000000000000000000000000_x",
        ] {
            assert_eq!(ApiKey::parse(text), None, "{text}");
        }
    }

    #[test]
    fn tokens_carry_256_bits_and_verify_only_themselves() {
        let token = random_token();
        assert_eq!(URL_SAFE_NO_PAD.decode(&token).unwrap().len(), 32);
        let stored = hash(&token);
        assert!(verify(&token, &stored));
        assert!(!verify(&random_token(), &stored));
    }
}
