//! Signed tokens whose Ed25519 signature a gate has already verified, so that a token sent
//! again skips the check: `cargo bench -p tokengate-bench --bench decide -- signed`
//! (2026-12-06), an EdDSA token's decision took 38.2 µs the first time, nearly all of it
//! `verify_strict`, and 2.06 µs once remembered (an opaque token: 0.68 µs). Every other check
//! (claims, grant, revocation, clock) runs on every request.
//!
//! Sound because a token is remembered by the SHA-256 of its whole text, after its signature
//! verified with a key of this gate's bundle; a gate is never given other keys (a new bundle
//! is a new gate, with an empty set). Only verified tokens are added, so nobody without an
//! issuer's key adds anything; the set is bounded and emptied when full.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// Tokens remembered per shard before the shard is emptied (16 shards: 64 Ki tokens, ~4 MB).
const PER_SHARD: usize = 4096;
const SHARDS: usize = 16;

/// The set; shared by every thread of a gate (the dynamic module's), so sharded locks.
#[derive(Default)]
pub struct Verified {
    shards: [Mutex<HashSet<[u8; 32]>>; SHARDS],
}

impl Verified {
    /// The key a token is remembered by.
    pub fn key(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn shard(&self, key: &[u8; 32]) -> &Mutex<HashSet<[u8; 32]>> {
        &self.shards[usize::from(key[0]) % SHARDS]
    }

    /// Whether the token with this key verified before.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        let shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.contains(key)
    }

    /// Remembers a token whose signature just verified.
    pub fn insert(&self, key: [u8; 32]) {
        let mut shard = self
            .shard(&key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= PER_SHARD {
            shard.clear();
        }
        shard.insert(key);
    }

    /// Tokens remembered.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for Verified {
    /// A copy of a gate starts with nothing remembered: the set is a cache, not state.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl core::fmt::Debug for Verified {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Verified({} tokens)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_what_it_is_given_and_stays_bounded() {
        let verified = Verified::default();
        let key = Verified::key("a.b.c");
        assert!(!verified.contains(&key));
        verified.insert(key);
        assert!(verified.contains(&key));
        assert!(!verified.contains(&Verified::key("a.b.d")));
        for i in 0..(PER_SHARD * SHARDS * 3) {
            verified.insert(Verified::key(&i.to_string()));
        }
        assert!(verified.len() <= PER_SHARD * SHARDS);
        assert!(verified.clone().is_empty(), "a clone starts empty");
    }
}
