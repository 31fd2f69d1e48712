//! The Envoy-wide record of the latest accepted refresh of a user's streams on a topic: when it was
//! posted, the expiry it gave, and the credential it carried. A challenge response lands on one
//! worker; streams of that user and topic on other workers take it from here when their expiry or
//! their next re-verification comes — and only if it was posted while they were open, so a stream
//! never inherits a refresh that happened before it existed (it would outlive its own token).
//!
//! Like the verdict cache, a record lives in one of two candidate slots of a fixed set, so memory
//! is fixed at `SLOTS` records whatever the number of users and topics over time; a record is dead
//! once its expiry passed.

use crate::auth::cache;
use crate::auth::token::{Credential, Kind, MAX_TOKEN_LEN};
use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

/// Slots of the table: the most (user, topic) pairs with a live refresh at once.
pub const SLOTS: u32 = 16_384;

pub fn key(user_id: &str, topic_id: &str) -> Key {
    let mut h = Sha256::new();
    h.update(b"refresh\n");
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
    format!("revenprox.refresh.{n}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Key,
    /// When the refresh was accepted (Unix ms).
    pub at_ms: u64,
    /// The expiry it gave (Unix seconds).
    pub expires_at: u64,
    /// The refreshed credential: later re-verifications use it.
    pub credential: Credential,
}

const HEADER: usize = 32 + 8 + 8 + 1;

impl Entry {
    /// key (32) | at_ms (u64 BE) | expires_at (u64 BE) | kind (0 JWT, 1 ticket) | credential.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.credential.value.len());
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(u8::from(self.credential.kind == Kind::Ticket));
        out.extend_from_slice(self.credential.value.as_bytes());
        out
    }

    /// `None` for bytes that are not a record, or whose credential could not have been extracted
    /// (empty, too long, not printable ASCII without `"` and `\`).
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let value = std::str::from_utf8(bytes.get(HEADER..)?).ok()?;
        let usable = !value.is_empty()
            && value.len() <= MAX_TOKEN_LEN
            && value.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !usable {
            return None;
        }
        let kind = match bytes.get(48)? {
            0 => Kind::Jwt,
            1 => Kind::Ticket,
            _ => return None,
        };
        Some(Entry {
            key: bytes.get(..32)?.try_into().ok()?,
            at_ms: u64::from_be_bytes(bytes.get(32..40)?.try_into().ok()?),
            expires_at: u64::from_be_bytes(bytes.get(40..48)?.try_into().ok()?),
            credential: Credential::refreshed(value.to_string(), kind),
        })
    }

    pub fn live(&self, now_ms: u64) -> bool {
        self.expires_at.saturating_mul(1000) > now_ms
    }
}

impl crate::slots::Slotted for Entry {
    fn key(&self) -> &[u8; 32] {
        &self.key
    }
    fn live(&self, now_ms: u64) -> bool {
        Entry::live(self, now_ms)
    }
    /// The record that expires first goes first.
    fn evict_order(&self) -> u64 {
        self.expires_at
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn entry(exp: u64) -> Entry {
        Entry {
            key: key("alice", "t"),
            at_ms: 5,
            expires_at: exp,
            credential: Credential::refreshed("a.b.c".into(), Kind::Jwt),
        }
    }

    #[test]
    fn keys_bind_user_and_topic() {
        assert_ne!(key("alice", "t1"), key("alice", "t2"));
        assert_ne!(key("alice", "t1"), key("bob", "t1"));
        assert_ne!(key("a\nb", "c"), key("a", "b\nc"));
    }

    #[test]
    fn round_trip_and_odd_bytes() {
        let e = entry(99);
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let mut ticket = e.clone();
        ticket.credential = Credential::refreshed("tkt".into(), Kind::Ticket);
        assert_eq!(Entry::decode(&ticket.encode()), Some(ticket));
        assert_eq!(Entry::decode(b"x"), None);
        let mut bad = e.encode();
        bad.push(b'"');
        assert_eq!(Entry::decode(&bad), None, "a credential that could not have been extracted");
        let mut bad = e.encode();
        bad[48] = 7;
        assert_eq!(Entry::decode(&bad), None);
        assert_eq!(Entry::decode(&e.encode()[..HEADER]), None, "no credential");
    }

    #[test]
    fn live_until_its_expiry() {
        assert!(entry(10).live(9_999));
        assert!(!entry(10).live(10_000));
    }
}
