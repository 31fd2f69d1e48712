//! The verdict cache's policy: key derivation, TTL, and the fixed-slot layout it uses in Envoy's
//! shared data.
//!
//! Envoy never deletes shared-data keys, so the cache cannot key its entries by token. Instead it
//! owns exactly `cache_max_size` slots (`revenprox.cache.<n>`) and an entry lives in one of two
//! candidate slots chosen from its key (two-choice hashing). Storing replaces, in order: the same
//! key, an empty or expired slot, then the slot that expires first. Memory is therefore fixed at
//! `cache_max_size` slots however many distinct tokens arrive, and there are never more than
//! `cache_max_size` entries.

use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

/// SHA-256 over the JWT, a `\n` separator, and the topic id: a token allowed on topic A never opens
/// topic B from the cache.
pub fn key(jwt: &str, topic_id: &str) -> Key {
    let mut h = Sha256::new();
    h.update(jwt.as_bytes());
    h.update(b"\n");
    h.update(topic_id.as_bytes());
    h.finalize().into()
}

/// How long a successful verdict may be cached from `now_ms`: until the lesser of
/// `now + cache_ttl_sec` and the token's `expires_at`. `None` when nothing is left to cache.
pub fn cache_until_ms(now_ms: u64, cache_ttl_sec: u64, expires_at_sec: u64) -> Option<u64> {
    let until =
        now_ms.saturating_add(cache_ttl_sec.saturating_mul(1000)).min(expires_at_sec.saturating_mul(1000));
    (until > now_ms).then_some(until)
}

/// The two candidate slots of `key` among `slots`.
pub fn slots(key: &Key, slots: u32) -> [u32; 2] {
    let n = u64::from(slots.max(1));
    let word = |i: usize| {
        let mut b = [0u8; 8];
        if let Some(src) = key.get(i..i + 8) {
            b.copy_from_slice(src);
        }
        u64::from_be_bytes(b)
    };
    let a = (word(0) % n) as u32;
    let b = (word(8) % n) as u32;
    [a, b]
}

/// Shared-data key of slot `n`.
pub fn slot_name(n: u32) -> String {
    format!("revenprox.cache.{n}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub until_ms: u64,
    pub expires_at: u64,
    pub user_id: String,
}

const HEADER: usize = 32 + 8 + 8;

impl Entry {
    /// Slot layout: key (32) | until_ms (u64 BE) | expires_at (u64 BE) | user_id (UTF-8).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.user_id.len());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.until_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(self.user_id.as_bytes());
        out
    }

    /// `None` for an empty slot or bytes that are not an entry.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let key: Key = bytes.get(..32)?.try_into().ok()?;
        let until_ms = u64::from_be_bytes(bytes.get(32..40)?.try_into().ok()?);
        let expires_at = u64::from_be_bytes(bytes.get(40..48)?.try_into().ok()?);
        let user_id = String::from_utf8(bytes.get(HEADER..)?.to_vec()).ok()?;
        Some(Entry { key, until_ms, expires_at, user_id })
    }

    pub fn live(&self, now_ms: u64) -> bool {
        self.until_ms > now_ms
    }
}

/// Bytes that mark a slot as empty (shared data cannot delete a key).
pub const EMPTY: &[u8] = b"";

impl crate::slots::Slotted for Entry {
    fn key(&self) -> &[u8; 32] {
        &self.key
    }
    fn live(&self, now_ms: u64) -> bool {
        Entry::live(self, now_ms)
    }
    /// The entry that expires first goes first.
    fn evict_order(&self) -> u64 {
        self.until_ms
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn entry(k: u8, until: u64) -> Entry {
        Entry { key: [k; 32], until_ms: until, expires_at: 99, user_id: "alice".into() }
    }

    #[test]
    fn key_binds_token_and_topic() {
        assert_ne!(key("t", "a"), key("t", "b"));
        assert_ne!(key("ta", "b"), key("t", "ab"));
        assert_eq!(key("t", "a"), key("t", "a"));
    }

    #[test]
    fn ttl_is_the_lesser() {
        assert_eq!(cache_until_ms(1_000_000, 300, 2_000), Some(1_300_000));
        assert_eq!(cache_until_ms(1_000_000, 300, 1_010), Some(1_010_000));
        assert_eq!(cache_until_ms(1_000_000, 300, 1_000), None);
        assert_eq!(cache_until_ms(1_000_000, 0, 2_000), None);
    }

    #[test]
    fn slots_are_in_range() {
        for n in [1, 2, 7, 10_000] {
            for k in 0..=255u8 {
                let [a, b] = slots(&key(&k.to_string(), "t"), n);
                assert!(a < n && b < n);
            }
        }
    }

    #[test]
    fn entries_round_trip() {
        let e = entry(7, 123);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(EMPTY), None);
        assert_eq!(Entry::decode(&[1, 2, 3]), None);
    }
}
