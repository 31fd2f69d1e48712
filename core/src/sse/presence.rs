//! Envoy-wide counts of open streams, exact and bounded in memory: how many streams a user has on
//! a topic (a challenge response needs one), and how many a user has in all (the per-user limit).
//!
//! Each worker keeps its own record per key (key, worker, count, touched), so a count is the sum of
//! the workers' records and a worker only ever changes its own: a stream's end lowers the count at
//! once, and a record whose count reaches zero is removed. A worker whose VM died can no longer
//! lower its records, so each worker re-touches its records every `REFRESH_MS` and a record not
//! touched for `STALE_MS` counts for nothing (a dead VM's streams are gone with it).
//!
//! Records live in a fixed set of buckets (shared-data keys), up to `PER_BUCKET` records each; a
//! key's records go into one of two buckets chosen from the key. Memory is therefore bounded by
//! `BUCKETS` × `PER_BUCKET` records whatever the number of users, topics and streams over time. A
//! record that finds no room is not kept (`Placed::Full`): the caller treats the key as
//! untracked.

use sha2::{Digest, Sha256};

/// A presence key: 16 bytes of SHA-256 (collisions between live keys are negligible at these
/// table sizes, and a collision can only merge two counts, never split one).
pub type Key = [u8; 16];

/// Shared-data keys of the table.
pub const BUCKETS: u32 = 16_384;
/// Records per bucket.
pub const PER_BUCKET: usize = 8;
/// How often a worker re-touches its records.
pub const REFRESH_MS: u64 = 10_000;
/// A record not touched for this long belongs to a worker that is gone.
pub const STALE_MS: u64 = 3 * REFRESH_MS;

#[cfg(test)]
thread_local! {
    /// Keys hashed by this thread (tests count what a path computes).
    pub static HASHED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

fn hash(parts: &[&[u8]]) -> Key {
    #[cfg(test)]
    HASHED.with(|n| n.set(n.get() + 1));
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so no combination of parts can spell another.
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let full: [u8; 32] = h.finalize().into();
    let mut k = [0u8; 16];
    k.copy_from_slice(full.get(..16).unwrap_or(&[0; 16]));
    k
}

/// The key of a user's streams on one topic.
pub fn stream_key(user_id: &str, topic_id: &str) -> Key {
    hash(&[b"stream", user_id.as_bytes(), topic_id.as_bytes()])
}

/// The key of all of a user's streams.
pub fn user_key(user_id: &str) -> Key {
    hash(&[b"user", user_id.as_bytes()])
}

/// The two buckets of `key`.
pub fn buckets(key: &Key) -> [u32; 2] {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        if let Some(src) = key.get(i..i + 4) {
            b.copy_from_slice(src);
        }
        u32::from_be_bytes(b) % BUCKETS
    };
    [word(0), word(4)]
}

pub fn bucket_name(n: u32) -> String {
    format!("revenprox.presence.{n}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    pub worker: u32,
    pub count: u32,
    pub touched_ms: u64,
}

const RECORD: usize = 16 + 4 + 4 + 8;

impl Record {
    fn live(&self, now_ms: u64) -> bool {
        self.count > 0 && now_ms.saturating_sub(self.touched_ms) < STALE_MS
    }
}

/// A bucket's records (what one shared-data value holds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    pub records: Vec<Record>,
}

impl Bucket {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.records.len() * RECORD);
        for r in &self.records {
            out.extend_from_slice(&r.key);
            out.extend_from_slice(&r.worker.to_be_bytes());
            out.extend_from_slice(&r.count.to_be_bytes());
            out.extend_from_slice(&r.touched_ms.to_be_bytes());
        }
        out
    }

    /// Records of a bucket's bytes; bytes that are not records (a torn or foreign value) decode to
    /// as many whole records as they hold, at most `PER_BUCKET`.
    pub fn decode(bytes: &[u8]) -> Bucket {
        let records = bytes
            .chunks_exact(RECORD)
            .take(PER_BUCKET)
            .filter_map(|c| {
                Some(Record {
                    key: c.get(..16)?.try_into().ok()?,
                    worker: u32::from_be_bytes(c.get(16..20)?.try_into().ok()?),
                    count: u32::from_be_bytes(c.get(20..24)?.try_into().ok()?),
                    touched_ms: u64::from_be_bytes(c.get(24..32)?.try_into().ok()?),
                })
            })
            .collect();
        Bucket { records }
    }

    /// Streams of `key` counted in this bucket (every live worker's record).
    pub fn count(&self, key: &Key, now_ms: u64) -> u64 {
        self.records.iter().filter(|r| &r.key == key && r.live(now_ms)).map(|r| u64::from(r.count)).sum()
    }

    fn own(&self, key: &Key, worker: u32) -> Option<usize> {
        self.records.iter().position(|r| &r.key == key && r.worker == worker)
    }

    /// Room for one more record: a free place, or a dead record's.
    fn room(&self, now_ms: u64) -> bool {
        self.records.len() < PER_BUCKET || self.records.iter().any(|r| !r.live(now_ms))
    }

    /// Whether this bucket holds `worker`'s record of `key`.
    pub fn holds(&self, key: &Key, worker: u32) -> bool {
        self.own(key, worker).is_some()
    }

    /// Changes `worker`'s count of `key` by `delta` (and touches it), dropping dead records and
    /// records whose count reached zero. `false` when the record would need room the bucket has
    /// not (nothing changed then).
    pub fn change(&mut self, key: &Key, worker: u32, delta: i64, now_ms: u64) -> bool {
        self.records.retain(|r| r.live(now_ms) || (&r.key == key && r.worker == worker && r.count > 0));
        match self.own(key, worker) {
            Some(i) => {
                if let Some(r) = self.records.get_mut(i) {
                    let count = i64::from(r.count).saturating_add(delta).clamp(0, i64::from(u32::MAX));
                    r.count = u32::try_from(count).unwrap_or(u32::MAX);
                    r.touched_ms = now_ms;
                }
                self.records.retain(|r| r.count > 0);
                true
            }
            None if delta <= 0 => true,
            None if self.room(now_ms) => {
                let count = u32::try_from(delta).unwrap_or(u32::MAX);
                self.records.push(Record { key: *key, worker, count, touched_ms: now_ms });
                true
            }
            None => false,
        }
    }
}

/// Which of a key's two buckets takes a new record: the one already holding the worker's record,
/// else the first with room, else the second. Filling the first bucket first keeps concurrent
/// writers of one key on the same shared-data key, where compare-and-swap orders them. `None`:
/// neither has room.
pub fn place(key: &Key, worker: u32, now_ms: u64, buckets: &[Bucket; 2]) -> Option<usize> {
    if let Some(i) = buckets.iter().position(|b| b.holds(key, worker)) {
        return Some(i);
    }
    buckets.iter().position(|b| b.room(now_ms))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn keys_bind_user_and_topic() {
        assert_ne!(stream_key("alice", "t1"), stream_key("alice", "t2"));
        assert_ne!(stream_key("alice", "t1"), stream_key("bob", "t1"));
        assert_ne!(stream_key("a\nb", "c"), stream_key("a", "b\nc"));
        assert_ne!(user_key("alice"), stream_key("alice", ""));
        let [a, b] = buckets(&user_key("x"));
        assert!(a < BUCKETS && b < BUCKETS);
    }

    #[test]
    fn counts_are_per_worker_and_exact() {
        let k = stream_key("alice", "news");
        let mut b = Bucket::default();
        assert!(b.change(&k, 1, 1, 0));
        assert!(b.change(&k, 1, 1, 0));
        assert!(b.change(&k, 2, 1, 5));
        assert_eq!(b.count(&k, 10), 3);
        // A stream ends: its worker's count drops at once; at zero the record is gone.
        assert!(b.change(&k, 2, -1, 20));
        assert_eq!((b.count(&k, 20), b.records.len()), (2, 1));
        assert!(b.change(&k, 1, -2, 30));
        assert_eq!((b.count(&k, 30), b.records.len()), (0, 0));
        // Lowering a count that is not there changes nothing.
        assert!(b.change(&k, 1, -1, 30));
        assert!(b.records.is_empty());
        assert_eq!(Bucket::decode(&b.encode()), b);
    }

    #[test]
    fn a_dead_workers_records_count_for_nothing_and_make_room() {
        let mut b = Bucket::default();
        for i in 0..PER_BUCKET as u32 {
            assert!(b.change(&user_key(&i.to_string()), 9, 1, 0));
        }
        // Full: a new key finds no room...
        assert!(!b.change(&user_key("new"), 1, 1, 1_000));
        assert_eq!(b.records.len(), PER_BUCKET);
        // ...until worker 9 stops touching its records.
        assert_eq!(b.count(&user_key("0"), STALE_MS - 1), 1);
        assert_eq!(b.count(&user_key("0"), STALE_MS), 0);
        assert!(b.change(&user_key("new"), 1, 1, STALE_MS));
        assert_eq!(b.records.len(), 1);
        // Touching keeps a record alive.
        let mut b = Bucket::default();
        b.change(&user_key("a"), 1, 1, 0);
        b.change(&user_key("a"), 1, 0, STALE_MS - 1);
        assert_eq!(b.count(&user_key("a"), 2 * STALE_MS - 2), 1);
    }

    #[test]
    fn placement_prefers_own_then_first() {
        let k = user_key("k");
        let mut a = Bucket::default();
        let mut b = Bucket::default();
        a.change(&user_key("x"), 1, 1, 0);
        assert_eq!(place(&k, 1, 0, &[a.clone(), b.clone()]), Some(0));
        b.change(&k, 1, 1, 0);
        assert_eq!(place(&k, 1, 0, &[a.clone(), b.clone()]), Some(1), "its own record's bucket");
        assert_eq!(place(&k, 2, 0, &[a.clone(), b.clone()]), Some(0));
        let full = Bucket {
            records: (0..PER_BUCKET as u32)
                .map(|i| Record { key: user_key(&i.to_string()), worker: 1, count: 1, touched_ms: 0 })
                .collect(),
        };
        assert_eq!(place(&k, 3, 0, &[full.clone(), full.clone()]), None);
        assert_eq!(place(&k, 3, 0, &[full.clone(), a]), Some(1));
    }

    #[test]
    fn decoding_odd_bytes_never_fails() {
        assert_eq!(Bucket::decode(b""), Bucket::default());
        assert_eq!(Bucket::decode(&[7; 31]), Bucket::default());
        assert_eq!(Bucket::decode(&[7; 33]).records.len(), 1);
        assert_eq!(Bucket::decode(&[1; RECORD * 20]).records.len(), PER_BUCKET);
    }
}
