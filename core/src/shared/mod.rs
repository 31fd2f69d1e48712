//! Envoy-wide state, seen by every worker of one Envoy: the verdict cache slots, the circuit
//! breaker, the rate-limit bucket, per-client records, presence and refresh records.
//!
//! The engine reaches it through the narrow `SharedStore` trait (get with a CAS token, set with an
//! optional CAS), which the host implements with proxy-wasm shared data and `MemStore` implements in
//! memory for tests and fuzzing, with the host's semantics (docs/envoy-host.md): a CAS write fails
//! on a changed key, a write with no CAS always wins, and a key is never deleted. So every key here
//! is from a fixed set, and the breaker and bucket keys are created at configuration time.
//!
//! Where an entry lives in a fixed-slot table is decided by the Envoy's salt (`Salt`), a random
//! value its workers agree on: a client can compute the keys of other users' entries, but not which
//! slots they take, so it cannot pick keys that crowd out someone else's (the presence records of
//! the per-user limit, the refresh records, the cache).

pub mod mem;

pub use mem::MemStore;

use crate::auth::cache::{self, Entry, Key};
use crate::resilience::breaker::{self, Admit, Settings};
use crate::resilience::clients;
use crate::resilience::limiter::{Bucket, Take};
use crate::slots;
use crate::sse::{presence, refresh};
use sha2::{Digest, Sha256};

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// The key changed since the CAS token was read.
    CasMismatch,
    /// Any other refusal of the host.
    Refused,
}

/// Envoy's shared data, as the engine needs it.
pub trait SharedStore {
    /// The value of `key` and its CAS token (`(None, None)` when absent or unreadable).
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
    /// Writes `value`. With `cas`, only if the key's CAS token is still `cas` (a key that does not
    /// exist yet is written whatever `cas` says: the host's behaviour).
    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
    /// The Envoy-wide count of revoked credentials, which only grows: a worker whose local
    /// verdict cache was filled at a lower count drops it. Read on every local cache hit, so a host
    /// may answer it from a faster mirror than shared data (Envoy: the `revenprox_revocations`
    /// stat, when Envoy's stats configuration keeps it); the count of record is
    /// `revocations_stored`.
    fn revocations(&self) -> u64 {
        revocations_stored(self)
    }
    /// A credential was revoked: counts one more (in shared data, and in the host's mirror).
    fn revoke(&mut self) {
        count_revocation(self);
    }
    /// The salt this worker places entries with (`agree_salt`).
    fn salt(&self) -> Salt;
    fn set_salt(&mut self, salt: Salt);
}

/// The Envoy's placement salt: random, written once to shared data by the first worker to
/// configure, read by the others.
pub type Salt = [u8; 16];

const SALT: &str = "revenprox.salt";
const REVOCATIONS: &str = "revenprox.revocations";
const NOT_SUB: &str = "revenprox.not_sub";

fn read_count<S: SharedStore + ?Sized>(store: &S, key: &str) -> u64 {
    store.get(key).0.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_le_bytes)
}

fn add_one<S: SharedStore + ?Sized>(store: &mut S, key: &str) {
    let _ = cas_update(store, key, |v| {
        let n = v.and_then(|v| <[u8; 8]>::try_from(v).ok()).map_or(0, u64::from_le_bytes);
        ((), Some(n.saturating_add(1).to_le_bytes().to_vec()))
    });
}

/// The namespace of one plugin configuration's keys: workers of one Envoy that run the same
/// configuration share their state, other configurations (another listener, another webhook) never
/// see it.
pub fn namespace(configuration: &[u8]) -> String {
    let digest: [u8; 32] = Sha256::digest(configuration).into();
    format!("rp{}.", hex::encode(digest.get(..6).unwrap_or_default()))
}

/// The count of record of revoked credentials in this Envoy (shared data).
pub fn revocations_stored<S: SharedStore + ?Sized>(store: &S) -> u64 {
    read_count(store, REVOCATIONS)
}

/// Counts one revoked credential in shared data.
pub fn count_revocation<S: SharedStore + ?Sized>(store: &mut S) {
    add_one(store, REVOCATIONS);
}

/// Allow verdicts in this Envoy whose `user_id` was not the JWT's `sub` claim, or that were for a
/// ticket. While it is 0 a worker may refuse a misrouted challenge response without asking the
/// webhook (`engine::verifier::Subjects`). Read from shared data (rarely: only for such a
/// refusal), never from a stat, so no stats configuration can turn the check off.
pub fn user_ids_not_sub<S: SharedStore + ?Sized>(store: &S) -> u64 {
    read_count(store, NOT_SUB)
}

/// Counts one allow whose `user_id` was not the JWT's `sub`.
pub fn count_user_id_not_sub<S: SharedStore + ?Sized>(store: &mut S) {
    add_one(store, NOT_SUB);
}

/// At configuration: the Envoy's salt, or `candidate` (random, from the host) when there is none
/// yet. Two workers may both find none and both write; the last write stands, and `recheck_salt`
/// brings the first one round at its next touch.
pub fn agree_salt<S: SharedStore + ?Sized>(store: &mut S, candidate: Salt) {
    if let Some(salt) = stored_salt(store) {
        store.set_salt(salt);
        return;
    }
    let _ = store.set(SALT, &candidate, None);
    let salt = stored_salt(store).unwrap_or(candidate);
    store.set_salt(salt);
}

/// Reads the Envoy's salt again; `true` when it is not the one this worker used (it then uses the
/// stored one, and must place its own entries again).
pub fn recheck_salt<S: SharedStore + ?Sized>(store: &mut S) -> bool {
    match stored_salt(store) {
        Some(salt) if salt != store.salt() => {
            store.set_salt(salt);
            true
        }
        _ => false,
    }
}

fn stored_salt<S: SharedStore + ?Sized>(store: &S) -> Option<Salt> {
    store.get(SALT).0.and_then(|v| Salt::try_from(v.as_slice()).ok())
}

/// Where `key` lives in a fixed-slot table: a digest of the salt and the key, from which each
/// table takes its two candidate slots.
fn placement<S: SharedStore + ?Sized>(store: &S, key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(store.salt());
    h.update(key);
    h.finalize().into()
}

/// The 16-byte form of `placement`, for the presence table.
fn placement16<S: SharedStore + ?Sized>(store: &S, key: &[u8]) -> [u8; 16] {
    let full = placement(store, key);
    let mut p = [0u8; 16];
    p.copy_from_slice(full.get(..16).unwrap_or(&[0; 16]));
    p
}

const BREAKER: &str = "revenprox.breaker";
const LIMITER: &str = "revenprox.limiter";
/// Conflicting writers give up after this many rounds (each round is two in-memory host calls).
const CAS_ROUNDS: usize = 32;

/// Reads `key`, lets `decide` choose a result and an optional new value, and writes that value by
/// CAS, deciding again on conflict. `None` if every round conflicted or the host refused.
pub fn cas_update<S: SharedStore + ?Sized, R>(
    store: &mut S,
    key: &str,
    mut decide: impl FnMut(Option<&[u8]>) -> (R, Option<Vec<u8>>),
) -> Option<R> {
    for _ in 0..CAS_ROUNDS {
        let (value, cas) = store.get(key);
        let (result, write) = decide(value.as_deref());
        let Some(bytes) = write else {
            return Some(result);
        };
        match store.set(key, &bytes, cas) {
            Ok(()) => return Some(result),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Refused) => return None,
        }
    }
    None
}

/// Creates the breaker and bucket keys if they do not exist yet (configuration time, before
/// traffic: two VMs creating them at once write the same initial value).
pub fn init<S: SharedStore + ?Sized>(store: &mut S, rate: u32, now_ms: u64) {
    if store.get(BREAKER).0.is_none() {
        let _ = store.set(BREAKER, &breaker::State::default().encode(), None);
    }
    if store.get(LIMITER).0.is_none() {
        let _ = store.set(LIMITER, &Bucket::full(rate, now_ms).encode(), None);
    }
}

fn read_entry<S: SharedStore + ?Sized, T>(
    store: &S,
    name: &str,
    decode: fn(&[u8]) -> Option<T>,
) -> Option<T> {
    store.get(name).0.and_then(|v| decode(&v))
}

/// The two slots of the verdict cache where `key` may live in this Envoy (salted placement).
pub fn cache_slots<S: SharedStore + ?Sized>(store: &S, key: &Key, slots: u32) -> [u32; 2] {
    cache::slots(&placement(store, key), slots)
}

/// The live cached verdict for `key`, if any. The second candidate slot is read only when the
/// first does not hold the entry (each shared-data read is a VM round trip).
pub fn cache_get<S: SharedStore + ?Sized>(store: &S, key: &Key, slots: u32, now_ms: u64) -> Option<Entry> {
    let [a, b] = cache_slots(store, key, slots);
    let first = read_entry(store, &cache::slot_name(a), Entry::decode);
    if let Some(hit) = first.filter(|e| &e.key == key && e.live(now_ms)) {
        return Some(hit);
    }
    if a == b {
        return None;
    }
    read_entry(store, &cache::slot_name(b), Entry::decode).filter(|e| &e.key == key && e.live(now_ms))
}

/// Stores `entry` in one of its two slots (last writer wins: a cache, not a ledger). `false` when
/// the host refused the write.
pub fn cache_put<S: SharedStore + ?Sized>(store: &mut S, entry: &Entry, slots: u32, now_ms: u64) -> bool {
    let [a, b] = cache_slots(store, &entry.key, slots);
    let candidates = [
        read_entry(store, &cache::slot_name(a), Entry::decode),
        if a == b { None } else { read_entry(store, &cache::slot_name(b), Entry::decode) },
    ];
    let slot = if slots::place(&entry.key, now_ms, &candidates) == 0 { a } else { b };
    store.set(&cache::slot_name(slot), &entry.encode(), None).is_ok()
}

/// Asks the breaker whether a verification may call the webhook. Returns the admission and the
/// state the breaker is in afterwards.
pub fn breaker_admit<S: SharedStore + ?Sized>(
    store: &mut S,
    s: &Settings,
    now_ms: u64,
) -> (Admit, breaker::State) {
    cas_update(store, BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        let (admit, next) = breaker::admit(state, now_ms, s);
        ((admit, next.unwrap_or(state)), next.map(|n| n.encode().to_vec()))
    })
    // Endless conflicts: let the verification through rather than fail it on contention.
    .unwrap_or((Admit::Allow, breaker::State::default()))
}

/// Records a finished verification of the client with sketch bit `client`. Returns
/// `(before, after)` when this call changed the state.
pub fn breaker_record<S: SharedStore + ?Sized>(
    store: &mut S,
    ok: bool,
    probe: bool,
    client: u64,
    s: &Settings,
    now_ms: u64,
) -> Option<(breaker::State, breaker::State)> {
    cas_update(store, BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        match breaker::record(state, ok, probe, client, now_ms, s) {
            Some(next) => (Some((state, next)), Some(next.encode().to_vec())),
            None => (None, None),
        }
    })
    .flatten()
}

/// Gives back a probe that was admitted but never made, or whose waiters all left.
pub fn breaker_abandon_probe<S: SharedStore + ?Sized>(store: &mut S, now_ms: u64) {
    let _ = cas_update(store, BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        ((), breaker::abandon_probe(state, now_ms).map(|n| n.encode().to_vec()))
    });
}

/// Takes one verification from the Envoy-wide bucket, if at least `floor` thousandths of a token
/// remain after it. Also returns the bucket's `limiting` flag change, if this take changed it (for
/// logging once per Envoy).
pub fn limiter_take<S: SharedStore + ?Sized>(
    store: &mut S,
    rate: u32,
    floor: u64,
    now_ms: u64,
) -> (Take, Option<bool>) {
    cas_update(store, LIMITER, |v| {
        let bucket = v.and_then(Bucket::decode).unwrap_or_else(|| Bucket::full(rate, now_ms));
        let take = bucket.take_above(rate, now_ms, floor);
        let flip = take.write.filter(|b| b.limiting != bucket.limiting).map(|b| b.limiting);
        ((take, flip), take.write.map(|b| b.encode().to_vec()))
    })
    .unwrap_or((Take { allowed: false, wait_ms: 1000, write: None }, None))
}

fn client_candidates<S: SharedStore + ?Sized>(
    store: &S,
    key: &clients::Key,
) -> ([u32; 2], [Option<clients::Record>; 2]) {
    let [a, b] = clients::slots(&placement(store, key));
    let get = |n: u32| read_entry(store, &clients::slot_name(n), clients::Record::decode);
    ([a, b], [get(a), if a == b { None } else { get(b) }])
}

/// The record of a client address (a fresh one, full bucket and closed circuit, when there is
/// none).
pub fn client_get<S: SharedStore + ?Sized>(
    store: &S,
    key: &clients::Key,
    rate: u32,
    now_ms: u64,
) -> clients::Record {
    slots::find(key, now_ms, &client_candidates(store, key).1)
        .map(|(_, r)| *r)
        .unwrap_or_else(|| clients::Record::new(*key, rate, now_ms))
}

/// Changes a client's record by CAS (`change` sees the current record, or a fresh one), returning
/// what `change` returned for the record written.
pub fn client_update<S: SharedStore + ?Sized, R>(
    store: &mut S,
    key: &clients::Key,
    rate: u32,
    now_ms: u64,
    mut change: impl FnMut(&mut clients::Record) -> R,
) -> Option<R> {
    let ([a, b], candidates) = client_candidates(store, key);
    let slot = if slots::place(key, now_ms, &candidates) == 0 { a } else { b };
    cas_update(store, &clients::slot_name(slot), |v| {
        let mut record = v
            .and_then(clients::Record::decode)
            .filter(|r| &r.key == key)
            .unwrap_or_else(|| clients::Record::new(*key, rate, now_ms));
        let result = change(&mut record);
        record.seen_ms = record.seen_ms.max(now_ms);
        (result, Some(record.encode()))
    })
}

/// Empties `key`'s cache slot, if one holds it (a revoked credential must not be served again).
pub fn cache_remove<S: SharedStore + ?Sized>(store: &mut S, key: &Key, slots: u32) {
    let [a, b] = cache::slots(&placement(store, key), slots);
    for slot in if a == b { vec![a] } else { vec![a, b] } {
        let name = cache::slot_name(slot);
        let _ = cas_update(store, &name, |v| {
            let holds = v.and_then(Entry::decode).is_some_and(|e| &e.key == key);
            ((), holds.then(|| cache::EMPTY.to_vec()))
        });
    }
}

fn presence_buckets<S: SharedStore + ?Sized>(
    store: &S,
    key: &presence::Key,
) -> ([u32; 2], [presence::Bucket; 2]) {
    let [a, b] = presence::buckets(&placement16(store, key));
    let get = |n: u32| {
        store.get(&presence::bucket_name(n)).0.map(|v| presence::Bucket::decode(&v)).unwrap_or_default()
    };
    ([a, b], [get(a), if a == b { presence::Bucket::default() } else { get(b) }])
}

/// Streams of `key` open in this Envoy (every live worker's record).
pub fn presence_count<S: SharedStore + ?Sized>(store: &S, key: &presence::Key, now_ms: u64) -> u64 {
    let ([a, b], [ba, bb]) = presence_buckets(store, key);
    ba.count(key, now_ms) + if a == b { 0 } else { bb.count(key, now_ms) }
}

/// Changes this worker's count of `key` by `delta` (touching its record when `delta` is 0).
/// `false` when the record found no room (the key is then untracked on this worker).
pub fn presence_change<S: SharedStore + ?Sized>(
    store: &mut S,
    key: &presence::Key,
    worker: u32,
    delta: i64,
    now_ms: u64,
) -> bool {
    let ([a, b], buckets) = presence_buckets(store, key);
    let Some(i) = presence::place(key, worker, now_ms, &buckets) else {
        return delta <= 0;
    };
    let name = presence::bucket_name(if i == 0 { a } else { b });
    cas_update(store, &name, |v| {
        let mut bucket = v.map(presence::Bucket::decode).unwrap_or_default();
        if bucket.change(key, worker, delta, now_ms) {
            (true, Some(bucket.encode()))
        } else {
            (false, None)
        }
    })
    .unwrap_or(false)
}

/// What `presence_reserve` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Counted: the key had fewer than the limit.
    Reserved,
    /// The key already has `limit` (nothing counted).
    AtLimit,
    /// No room to count it (nothing counted; the caller decides).
    NoRoom,
}

/// Counts one more of `key` on this worker if the Envoy-wide count stays within `limit`. Counted
/// first and checked after (undone when over), so that racing workers can never both pass.
pub fn presence_reserve<S: SharedStore + ?Sized>(
    store: &mut S,
    key: &presence::Key,
    worker: u32,
    limit: u64,
    now_ms: u64,
) -> Reserve {
    if presence_count(store, key, now_ms) >= limit {
        return Reserve::AtLimit;
    }
    if !presence_change(store, key, worker, 1, now_ms) {
        return Reserve::NoRoom;
    }
    if presence_count(store, key, now_ms) > limit {
        presence_change(store, key, worker, -1, now_ms);
        return Reserve::AtLimit;
    }
    Reserve::Reserved
}

fn refresh_candidates<S: SharedStore + ?Sized>(
    store: &S,
    key: &refresh::Key,
) -> ([u32; 2], [Option<refresh::Entry>; 2]) {
    let [a, b] = refresh::slots(&placement(store, key));
    let get = |n: u32| read_entry(store, &refresh::slot_name(n), refresh::Entry::decode);
    ([a, b], [get(a), if a == b { None } else { get(b) }])
}

/// The live refresh record of a (user, topic) key.
pub fn refresh_get<S: SharedStore + ?Sized>(
    store: &S,
    key: &refresh::Key,
    now_ms: u64,
) -> Option<refresh::Entry> {
    slots::find(key, now_ms, &refresh_candidates(store, key).1).map(|(_, e)| e.clone())
}

/// Records an accepted refresh (the newer one wins: a record is only replaced by a later one).
pub fn refresh_put<S: SharedStore + ?Sized>(store: &mut S, entry: &refresh::Entry, now_ms: u64) {
    let ([a, b], candidates) = refresh_candidates(store, &entry.key);
    let slot = if slots::place(&entry.key, now_ms, &candidates) == 0 { a } else { b };
    let _ = cas_update(store, &refresh::slot_name(slot), |v| {
        let newer = v
            .and_then(refresh::Entry::decode)
            .is_some_and(|e| e.key == entry.key && e.live(now_ms) && e.at_ms > entry.at_ms);
        ((), (!newer).then(|| entry.encode()))
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_first_salt_written_stands_and_a_late_writer_is_brought_round() {
        let store = MemStore::new();
        let (mut a, mut b) = (store.clone(), store.clone());
        agree_salt(&mut a, [1; 16]);
        agree_salt(&mut b, [2; 16]);
        assert_eq!((a.salt(), b.salt()), ([1; 16], [1; 16]), "the second worker reads the first's");
        // Both found none and both wrote: the last write stands, the first worker adopts it.
        let _ = b.set(SALT, &[3; 16], None);
        assert!(recheck_salt(&mut a));
        assert_eq!(a.salt(), [3; 16]);
        assert!(!recheck_salt(&mut a));
    }

    #[test]
    fn where_an_entry_lives_depends_on_the_salt() {
        let (mut a, mut b) = (MemStore::new(), MemStore::new());
        a.set_salt([1; 16]);
        b.set_salt([2; 16]);
        let keys: Vec<[u8; 32]> = (0u8..16).map(|i| [i; 32]).collect();
        let moved = keys
            .iter()
            .filter(|k| cache::slots(&placement(&a, *k), 10_000) != cache::slots(&placement(&b, *k), 10_000))
            .count();
        assert!(moved >= 15, "only {moved} of 16 keys moved with the salt");
        let pk: presence::Key = [7; 16];
        assert_ne!(
            presence::buckets(&placement16(&a, &pk)),
            presence::buckets(&placement16(&b, &pk)),
            "a client that knows a user's key still cannot know its buckets"
        );
    }
}
