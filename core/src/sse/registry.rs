//! The Envoy-wide registry of open streams, by user and topic, in a fixed set of shared-data
//! slots: it tells a re-authorization (which may land on any worker) whether the user has a stream
//! on the topic, and carries the refreshed expiry to the workers whose streams hold it.
//!
//! Each worker refreshes the `seen` time of its streams' entries every `REFRESH_MS`; an entry not
//! refreshed for `STALE_MS` is gone (its streams ended) and its slot may be reused. Like the
//! verdict cache, an entry lives in one of two candidate slots, so memory is fixed at `SLOTS`
//! entries whatever the number of users, topics and streams over time.

use crate::auth::cache;
use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

/// Slots in the registry: the most (user, topic) pairs with open streams it tracks at once.
pub const SLOTS: u32 = 16_384;
/// How often a worker refreshes the entries of its open streams.
pub const REFRESH_MS: u64 = 10_000;
/// An entry not refreshed for this long has no open stream left.
pub const STALE_MS: u64 = 3 * REFRESH_MS;

pub fn key(user_id: &str, topic_id: &str) -> Key {
    let mut h = Sha256::new();
    h.update(b"stream\n");
    // Length-prefixed, so no (user, topic) pair can spell another.
    h.update((user_id.len() as u64).to_be_bytes());
    h.update(user_id.as_bytes());
    h.update(topic_id.as_bytes());
    h.finalize().into()
}

pub fn slots(key: &Key) -> [u32; 2] {
    cache::slots(key, SLOTS)
}

pub fn slot_name(n: u32) -> String {
    format!("revenprox.streams.{n}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    pub seen_ms: u64,
    /// The latest expiry a re-authorization gave the user's streams on the topic (0: none).
    pub expires_at: u64,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.seen_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        Some(Entry {
            key: bytes.get(..32)?.try_into().ok()?,
            seen_ms: u64::from_be_bytes(bytes.get(32..40)?.try_into().ok()?),
            expires_at: u64::from_be_bytes(bytes.get(40..48)?.try_into().ok()?),
        })
    }

    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.seen_ms.saturating_add(STALE_MS)
    }
}

impl crate::shared::slots::Slotted for Entry {
    fn key(&self) -> &[u8; 32] {
        &self.key
    }
    fn live(&self, now_ms: u64) -> bool {
        Entry::live(self, now_ms)
    }
    /// The entry refreshed longest ago goes first.
    fn evict_order(&self) -> u64 {
        self.seen_ms
    }
}

/// The entry after a refresh of `key` at `now_ms` (keeping a re-authorized expiry of the same key).
pub fn touched(existing: Option<Entry>, key: &Key, now_ms: u64) -> Entry {
    match existing {
        Some(e) if &e.key == key && e.live(now_ms) => Entry { seen_ms: now_ms, ..e },
        _ => Entry { key: *key, seen_ms: now_ms, expires_at: 0 },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn e(k: u8, seen: u64, exp: u64) -> Entry {
        Entry { key: [k; 32], seen_ms: seen, expires_at: exp }
    }

    #[test]
    fn keys_bind_user_and_topic() {
        assert_ne!(key("alice", "t1"), key("alice", "t2"));
        assert_ne!(key("alice", "t1"), key("bob", "t1"));
        assert_ne!(key("a\nb", "c"), key("a", "b\nc"));
    }

    #[test]
    fn round_trip() {
        let x = e(3, 10, 20);
        assert_eq!(Entry::decode(&x.encode()), Some(x));
        assert_eq!(Entry::decode(b"x"), None);
    }

    #[test]
    fn touch_keeps_reauthorized_expiry() {
        let k = [4; 32];
        assert_eq!(touched(Some(e(4, 0, 99)), &k, 50), e(4, 50, 99));
        assert_eq!(touched(Some(e(5, 0, 99)), &k, 50), e(4, 50, 0));
        assert_eq!(touched(Some(e(4, 0, 99)), &k, STALE_MS + 1), e(4, STALE_MS + 1, 0));
        assert_eq!(touched(None, &k, 1), e(4, 1, 0));
    }
}
