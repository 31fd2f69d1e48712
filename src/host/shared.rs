//! Typed access to Envoy's shared data, visible to every worker VM of one Envoy: the verdict
//! cache slots, the circuit breaker and the rate-limit bucket. Transitions of the breaker and the
//! bucket are compare-and-swap loops, so each happens once however many workers race.
//!
//! Envoy never deletes a shared-data key, and a write with no CAS to a key that does not exist
//! yet always succeeds (two creators both win). So every key here is from a fixed set, and the
//! breaker and bucket keys are created at configuration time, before traffic, where two VMs
//! creating them at once write the same initial value.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use revenprox_core::auth::cache::{self, Entry, Key};
use revenprox_core::resilience::breaker::{self, Admit, Settings};
use revenprox_core::resilience::limiter::{Bucket, Take};
use revenprox_core::sse::registry;

const BREAKER: &str = "revenprox.breaker";
const LIMITER: &str = "revenprox.limiter";
/// Conflicting writers give up after this many rounds (each round is two in-memory host calls).
const CAS_ROUNDS: usize = 32;

fn read(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Reads `key`, lets `decide` choose a result and an optional new value, and writes that value by
/// CAS, deciding again on conflict. `None` if every round conflicted.
fn cas_update<R>(key: &str, mut decide: impl FnMut(Option<&[u8]>) -> (R, Option<Vec<u8>>)) -> Option<R> {
    for _ in 0..CAS_ROUNDS {
        let (value, cas) = read(key);
        let (result, write) = decide(value.as_deref());
        let Some(bytes) = write else {
            return Some(result);
        };
        match hostcalls::set_shared_data(key, Some(&bytes), cas) {
            Ok(()) => return Some(result),
            Err(Status::CasMismatch) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Creates the breaker and bucket keys if they do not exist yet (configuration time).
pub fn init(rate: u32, now_ms: u64) {
    if read(BREAKER).0.is_none() {
        let _ = hostcalls::set_shared_data(BREAKER, Some(&breaker::State::default().encode()), None);
    }
    if read(LIMITER).0.is_none() {
        let _ = hostcalls::set_shared_data(LIMITER, Some(&Bucket::full(rate, now_ms).encode()), None);
    }
}

fn cache_candidates(key: &Key, slots: u32) -> ([u32; 2], [Option<Entry>; 2]) {
    let [a, b] = cache::slots(key, slots);
    let get = |n: u32| read(&cache::slot_name(n)).0.and_then(|v| Entry::decode(&v));
    ([a, b], [get(a), if a == b { None } else { get(b) }])
}

/// The live cached verdict for `key`, if any. The second candidate slot is read only when the
/// first does not hold the entry (each shared-data read is a VM round trip).
pub fn cache_get(key: &Key, slots: u32, now_ms: u64) -> Option<Entry> {
    let [a, b] = cache::slots(key, slots);
    let get = |n: u32| read(&cache::slot_name(n)).0.and_then(|v| Entry::decode(&v));
    let first = [get(a), None];
    if let Some(hit) = cache::find(key, now_ms, &first) {
        return Some(hit.clone());
    }
    if a == b {
        return None;
    }
    cache::find(key, now_ms, &[get(b), None]).cloned()
}

/// Stores `entry` in one of its two slots (last writer wins: a cache, not a ledger).
pub fn cache_put(entry: &Entry, slots: u32, now_ms: u64) {
    let (names, candidates) = cache_candidates(&entry.key, slots);
    let slot = if cache::victim(&entry.key, now_ms, &candidates) == 0 { names[0] } else { names[1] };
    if let Err(status) = hostcalls::set_shared_data(&cache::slot_name(slot), Some(&entry.encode()), None) {
        log::warn!("revenprox: verdict cache write failed: {status:?}");
    }
}

/// Asks the breaker whether a verification may call the webhook. Returns the admission and the
/// state the breaker is in afterwards.
pub fn breaker_admit(s: &Settings, now_ms: u64) -> (Admit, breaker::State) {
    cas_update(BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        let (admit, next) = breaker::admit(state, now_ms, s);
        ((admit, next.unwrap_or(state)), next.map(|n| n.encode().to_vec()))
    })
    // Endless conflicts: let the verification through rather than fail it on contention.
    .unwrap_or((Admit::Allow, breaker::State::default()))
}

/// Records a finished verification. Returns `(before, after)` when this call changed the state.
pub fn breaker_record(
    ok: bool,
    probe: bool,
    s: &Settings,
    now_ms: u64,
) -> Option<(breaker::State, breaker::State)> {
    cas_update(BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        match breaker::record(state, ok, probe, now_ms, s) {
            Some(next) => (Some((state, next)), Some(next.encode().to_vec())),
            None => (None, None),
        }
    })
    .flatten()
}

/// Gives back a probe that was admitted but never made.
pub fn breaker_abandon_probe(now_ms: u64) {
    let _ = cas_update(BREAKER, |v| {
        let state = v.and_then(breaker::State::decode).unwrap_or_default();
        ((), breaker::abandon_probe(state, now_ms).map(|n| n.encode().to_vec()))
    });
}

/// Takes one verification from the Envoy-wide bucket. Also returns the bucket's `limiting` flag
/// change, if this take changed it (for logging once per Envoy).
pub fn limiter_take(rate: u32, now_ms: u64) -> (Take, Option<bool>) {
    cas_update(LIMITER, |v| {
        let bucket = v.and_then(Bucket::decode).unwrap_or_else(|| Bucket::full(rate, now_ms));
        let take = bucket.take(rate, now_ms);
        let flip = take.write.filter(|b| b.limiting != bucket.limiting).map(|b| b.limiting);
        ((take, flip), take.write.map(|b| b.encode().to_vec()))
    })
    .unwrap_or((Take { allowed: false, wait_ms: 1000, write: None }, None))
}

fn registry_candidates(key: &registry::Key) -> ([u32; 2], [Option<registry::Entry>; 2]) {
    let [a, b] = registry::slots(key);
    let get = |n: u32| read(&registry::slot_name(n)).0.and_then(|v| registry::Entry::decode(&v));
    ([a, b], [get(a), if a == b { None } else { get(b) }])
}

/// The live registry entry of a (user, topic) stream key.
pub fn registry_get(key: &registry::Key, now_ms: u64) -> Option<registry::Entry> {
    registry::find(key, now_ms, &registry_candidates(key).1).map(|(_, e)| e)
}

/// Marks a stream key as having an open stream now (keeping its re-authorized expiry).
pub fn registry_touch(key: &registry::Key, now_ms: u64) {
    let (names, candidates) = registry_candidates(key);
    let slot = names.get(registry::place(key, now_ms, &candidates)).copied().unwrap_or(names[0]);
    let _ = cas_update(&registry::slot_name(slot), |v| {
        let existing = v.and_then(registry::Entry::decode);
        ((), Some(registry::touched(existing, key, now_ms).encode()))
    });
}

/// Gives the streams of a key the expiry `expires_at`. `false` when no stream of that key is open
/// (then nothing is written).
pub fn registry_reauthorize(key: &registry::Key, expires_at: u64, now_ms: u64) -> bool {
    let (names, candidates) = registry_candidates(key);
    let Some((index, _)) = registry::find(key, now_ms, &candidates) else {
        return false;
    };
    let Some(slot) = names.get(index) else {
        return false;
    };
    cas_update(&registry::slot_name(*slot), |v| match v.and_then(registry::Entry::decode) {
        Some(e) if &e.key == key && e.live(now_ms) => {
            let updated = registry::Entry { expires_at: e.expires_at.max(expires_at), ..e };
            (true, Some(updated.encode()))
        }
        _ => (false, None),
    })
    .unwrap_or(false)
}
