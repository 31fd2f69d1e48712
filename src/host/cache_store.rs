//! The verdict cache in Envoy's shared data, visible to every worker VM of one Envoy. The slot
//! layout and replacement policy live in `auth::cache`; this is only the host access.

use crate::auth::cache::{self, Entry, Key};
use proxy_wasm::hostcalls;

fn read(slot: u32) -> Option<Entry> {
    match hostcalls::get_shared_data(&cache::slot_name(slot)) {
        Ok((Some(bytes), _)) => Entry::decode(&bytes),
        _ => None,
    }
}

/// The live entry for `key`, if any.
pub fn get(key: &Key, slots: u32, now_ms: u64) -> Option<Entry> {
    let [a, b] = cache::slots(key, slots);
    let candidates = [read(a), if a == b { None } else { read(b) }];
    cache::find(key, now_ms, &candidates).cloned()
}

/// Stores `entry` in one of its two slots (last writer wins: a cache, not a ledger).
pub fn put(entry: &Entry, slots: u32, now_ms: u64) {
    let [a, b] = cache::slots(&entry.key, slots);
    let candidates = [read(a), if a == b { None } else { read(b) }];
    let slot = if cache::victim(&entry.key, now_ms, &candidates) == 0 { a } else { b };
    if let Err(status) = hostcalls::set_shared_data(&cache::slot_name(slot), Some(&entry.encode()), None) {
        log::warn!("verdict cache write failed: {status:?}");
    }
}
