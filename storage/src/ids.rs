//! Id and secret generation, hashing, and the wall clock.

use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// Length of the random part of generated ids (`file-` + 24 alphanumerics ≈ 142 bits).
const ID_RANDOM_LEN: usize = 24;
/// Length of the random part of API keys (`sk-molt-` + 48 alphanumerics ≈ 285 bits).
const KEY_RANDOM_LEN: usize = 48;
/// The fixed start of every API key secret.
pub const API_KEY_PREFIX: &str = "sk-molt-";
/// How many characters of a key secret are kept in clear for listing (`sk-molt-AbCd`).
pub const API_KEY_VISIBLE_LEN: usize = API_KEY_PREFIX.len() + 4;

/// A new random id with the given prefix, e.g. `new_id("file")` → `file-3hG…`.
/// Random alphanumerics from the thread-local CSPRNG.
pub fn new_id(prefix: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + ID_RANDOM_LEN);
    s.push_str(prefix);
    s.push('-');
    Alphanumeric.append_string(&mut rand::rng(), &mut s, ID_RANDOM_LEN);
    s
}

/// A new API key secret (shown to the user once, stored only as [`hash_secret`]).
pub fn new_api_key_secret() -> String {
    let mut s = String::with_capacity(API_KEY_PREFIX.len() + KEY_RANDOM_LEN);
    s.push_str(API_KEY_PREFIX);
    Alphanumeric.append_string(&mut rand::rng(), &mut s, KEY_RANDOM_LEN);
    s
}

/// Hex SHA-256 of a secret. API keys are high-entropy random strings, so a fast unsalted hash
/// is enough: nobody can brute-force 285 random bits, and the hash is the lookup key.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The visible prefix of a secret kept for listing.
pub fn visible_prefix(secret: &str) -> String {
    secret.chars().take(API_KEY_VISIBLE_LEN).collect()
}

/// Unix time in seconds from this machine's clock (row timestamps).
pub fn now_secs() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_and_are_unique() {
        let a = new_id("file");
        let b = new_id("file");
        assert!(a.starts_with("file-"));
        assert_eq!(a.len(), 5 + ID_RANDOM_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn secrets_hash_stably() {
        let s = new_api_key_secret();
        assert!(s.starts_with(API_KEY_PREFIX));
        assert_eq!(hash_secret(&s), hash_secret(&s));
        assert_eq!(hash_secret(&s).len(), 64);
        assert_eq!(visible_prefix(&s).len(), API_KEY_VISIBLE_LEN);
    }
}
