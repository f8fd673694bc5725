//! Customer bearer tokens: 256 bits from the operating system's random source, shown to
//! their user once, and stored only as their SHA-256.
//!
//! A salted, slow hash protects passwords, which people choose from a small space; a token
//! drawn from 2^256 values cannot be found from its hash by any search, so one fast hash is
//! enough, and it lets a token be looked up by its hash with an index.

use sha2::{Digest, Sha256};

/// What every token starts with, so that a leaked one is recognisable (secret scanners,
/// logs) and a token of another system is refused without a lookup.
pub const TOKEN_PREFIX: &str = "ecp_";

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// The SHA-256 of a token: what the database keeps.
pub type TokenHash = [u8; 32];

/// A freshly made token and its hash. The token itself is for its user's eyes only.
pub struct NewToken {
    pub token: String,
    pub hash: TokenHash,
}

/// Makes a token from the operating system's random source.
pub fn new_token() -> Result<NewToken, getrandom::Error> {
    let mut bytes = [0_u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes)?;
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + 2 * TOKEN_BYTES);
    token.push_str(TOKEN_PREFIX);
    for byte in bytes {
        token.push(hex_digit(byte >> 4));
        token.push(hex_digit(byte & 0x0f));
    }
    let hash = hash_token(&token);
    Ok(NewToken { token, hash })
}

/// The hash under which `token` is stored.
pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `token` has the shape of one of ours: the prefix and 64 lowercase hex digits.
/// Anything else cannot be valid and is refused without touching the database.
pub fn is_well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == 2 * TOKEN_BYTES && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn hex_digit(nibble: u8) -> char {
    char::from(if nibble < 10 {
        b'0' + nibble
    } else {
        b'a' + nibble - 10
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_well_formed_distinct_and_stored_by_their_hash() {
        let first = new_token().ok();
        let second = new_token().ok();
        let (Some(first), Some(second)) = (first, second) else {
            panic!("the OS random source failed");
        };
        assert!(is_well_formed(&first.token), "{}", first.token);
        assert_ne!(first.token, second.token);
        assert_eq!(hash_token(&first.token), first.hash);
        assert_ne!(first.hash, second.hash);
    }

    #[test]
    fn anything_else_is_not_a_token() {
        let good = format!("{TOKEN_PREFIX}{}", "ab".repeat(32));
        assert!(is_well_formed(&good));
        for bad in [
            String::new(),
            "ab".repeat(32),
            format!("{TOKEN_PREFIX}{}", "ab".repeat(31)),
            format!("{TOKEN_PREFIX}{}", "AB".repeat(32)),
            format!("{TOKEN_PREFIX}{}g", "ab".repeat(31)),
            format!("{good}0"),
        ] {
            assert!(!is_well_formed(&bad), "{bad}");
        }
    }

    #[test]
    fn the_hash_is_sha256_of_the_token_text() {
        // SHA-256("abc"), from FIPS 180-2.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let hex: String = hash_token("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }
}
