//! Envoy-wide state, seen by every worker of one Envoy: the verdict cache slots, the circuit
//! breaker, the rate-limit bucket and the stream registry.
//!
//! The engine reaches it through the narrow `SharedStore` trait (get with a CAS token, set with an
//! optional CAS), which the host implements with proxy-wasm shared data and `MemStore` implements in
//! memory for tests and fuzzing, with the host's semantics (docs/envoy-host.md): a CAS write fails
//! on a changed key, a write with no CAS always wins, and a key is never deleted. So every key here
//! is from a fixed set, and the breaker and bucket keys are created at configuration time.

pub mod mem;
pub mod slots;

pub use mem::MemStore;

use crate::auth::cache::{self, Entry, Key};
use crate::resilience::breaker::{self, Admit, Settings};
use crate::resilience::limiter::{Bucket, Take};
use crate::sse::registry;

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

/// The live cached verdict for `key`, if any. The second candidate slot is read only when the
/// first does not hold the entry (each shared-data read is a VM round trip).
pub fn cache_get<S: SharedStore + ?Sized>(store: &S, key: &Key, slots: u32, now_ms: u64) -> Option<Entry> {
    let [a, b] = cache::slots(key, slots);
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
    let [a, b] = cache::slots(&entry.key, slots);
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

/// Records a finished verification. Returns `(before, after)` when this call changed the state.
pub fn breaker_record<S: SharedStore + ?Sized>(
    store: &mut S,
    ok: bool,
    probe: bool,
    s: &Settings,
    now_ms: u64,
) -> Option<(breaker::State, breaker::State)> {
    cas_update(store, BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        match breaker::record(state, ok, probe, now_ms, s) {
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

/// Takes one verification from the Envoy-wide bucket. Also returns the bucket's `limiting` flag
/// change, if this take changed it (for logging once per Envoy).
pub fn limiter_take<S: SharedStore + ?Sized>(store: &mut S, rate: u32, now_ms: u64) -> (Take, Option<bool>) {
    cas_update(store, LIMITER, |v| {
        let bucket = v.and_then(Bucket::decode).unwrap_or_else(|| Bucket::full(rate, now_ms));
        let take = bucket.take(rate, now_ms);
        let flip = take.write.filter(|b| b.limiting != bucket.limiting).map(|b| b.limiting);
        ((take, flip), take.write.map(|b| b.encode().to_vec()))
    })
    .unwrap_or((Take { allowed: false, wait_ms: 1000, write: None }, None))
}

fn registry_candidates<S: SharedStore + ?Sized>(
    store: &S,
    key: &registry::Key,
) -> ([u32; 2], [Option<registry::Entry>; 2]) {
    let [a, b] = registry::slots(key);
    let get = |n: u32| read_entry(store, &registry::slot_name(n), registry::Entry::decode);
    ([a, b], [get(a), if a == b { None } else { get(b) }])
}

/// The live registry entry of a (user, topic) stream key.
pub fn registry_get<S: SharedStore + ?Sized>(
    store: &S,
    key: &registry::Key,
    now_ms: u64,
) -> Option<registry::Entry> {
    slots::find(key, now_ms, &registry_candidates(store, key).1).map(|(_, e)| *e)
}

/// Marks a stream key as having an open stream now (keeping its re-authorized expiry).
pub fn registry_touch<S: SharedStore + ?Sized>(store: &mut S, key: &registry::Key, now_ms: u64) {
    let ([a, b], candidates) = registry_candidates(store, key);
    let slot = if slots::place(key, now_ms, &candidates) == 0 { a } else { b };
    let _ = cas_update(store, &registry::slot_name(slot), |v| {
        let existing = v.and_then(registry::Entry::decode);
        ((), Some(registry::touched(existing, key, now_ms).encode()))
    });
}

/// Gives the streams of a key the expiry `expires_at`. `false` when no stream of that key is open
/// (then nothing is written).
pub fn registry_reauthorize<S: SharedStore + ?Sized>(
    store: &mut S,
    key: &registry::Key,
    expires_at: u64,
    now_ms: u64,
) -> bool {
    let ([a, b], candidates) = registry_candidates(store, key);
    let Some((index, _)) = slots::find(key, now_ms, &candidates) else {
        return false;
    };
    let slot = if index == 0 { a } else { b };
    cas_update(store, &registry::slot_name(slot), |v| match v.and_then(registry::Entry::decode) {
        Some(e) if &e.key == key && e.live(now_ms) => {
            let updated = registry::Entry { expires_at: e.expires_at.max(expires_at), ..e };
            (true, Some(updated.encode()))
        }
        _ => (false, None),
    })
    .unwrap_or(false)
}
