//! The shared-data decoders — `auth::cache::Entry::decode`, `resilience::breaker::State::decode`,
//! `resilience::limiter::Bucket::decode`, `sse::refresh::Entry::decode`,
//! `sse::presence::Bucket::decode` — on arbitrary bytes, and the state machines that consume what
//! they decode (breaker admit/record, bucket take, cache and refresh slot choice, presence counts)
//! at arbitrary times and settings.
//!
//! Shared data is written only by this filter, but a VM of an older build, a torn value or a bug
//! must never panic a worker: every decoder is total, and what it decodes round-trips.
//! Properties: no panic (overflow checks on); `decode(encode(x)) == x`; a decoded cache entry and
//! refresh record re-encode to the bytes they came from; a presence bucket never holds more than
//! `PER_BUCKET` records, and a count change is exact (+1 then -1 is back to the same count); slots are in range; a bucket never allows
//! more than its capacity and its write never exceeds capacity; the breaker never rejects with a
//! zero wait and only a probe closes it from half-open; a client record round-trips, charging its
//! share takes at most one token and never adds any, what it reports used is a fraction, a client
//! that asked for nothing has no floor, and a full Envoy-wide bucket serves any client.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::auth::cache;
use revenprox::resilience::breaker::{self, Admit, Settings};
use revenprox::resilience::clients;
use revenprox::resilience::limiter::Bucket;
use revenprox::slots;
use revenprox::sse::{presence, refresh};

#[derive(Arbitrary, Debug)]
struct Input {
    a: Vec<u8>,
    b: Vec<u8>,
    now_ms: u64,
    rate: u32,
    threshold: u32,
    open_ms: u64,
    probe_timeout_ms: u64,
    ok: bool,
    probe: bool,
    slots: u32,
    ttl: u64,
    expires_at: u64,
    takes: u8,
}

fuzz_target!(|x: Input| {
    let now = x.now_ms;

    // Verdict cache slots.
    let ea = cache::Entry::decode(&x.a);
    let eb = cache::Entry::decode(&x.b);
    if let Some(e) = &ea {
        assert_eq!(e.encode(), x.a, "a cache entry re-encodes to its bytes");
        assert_eq!(cache::Entry::decode(&e.encode()).as_ref(), Some(e));
    }
    let key = cache::key(&String::from_utf8_lossy(&x.a), &String::from_utf8_lossy(&x.b));
    let [s0, s1] = cache::slots(&key, x.slots);
    assert!(s0 < x.slots.max(1) && s1 < x.slots.max(1));
    let pair = [ea.clone(), eb.clone()];
    let victim = slots::place(&key, now, &pair);
    assert!(victim < 2);
    if let Some((_, found)) = slots::find(&key, now, &pair) {
        assert!(found.key == key && found.live(now));
    }
    if let Some(until) = cache::cache_until_ms(now, x.ttl, x.expires_at) {
        assert!(until > now && until <= x.expires_at.saturating_mul(1000));
    }

    // Refresh record slots.
    let ra = refresh::Entry::decode(&x.a);
    let rb = refresh::Entry::decode(&x.b);
    if let Some(e) = &ra {
        assert_eq!(e.encode(), x.a, "a refresh record re-encodes to its bytes");
        assert_eq!(refresh::Entry::decode(&e.encode()).as_ref(), Some(e));
    }
    let rkey = refresh::key(&String::from_utf8_lossy(&x.b), "0123456789abcdef0123456789abcdef");
    let [r0, r1] = refresh::slots(&rkey);
    assert!(r0 < refresh::SLOTS && r1 < refresh::SLOTS);
    let rpair = [ra, rb];
    assert!(slots::place(&rkey, now, &rpair) < 2);
    if let Some((i, e)) = slots::find(&rkey, now, &rpair) {
        assert!(i < 2 && e.key == rkey && e.live(now));
    }

    // Presence buckets.
    let mut bucket = presence::Bucket::decode(&x.a);
    assert!(bucket.records.len() <= presence::PER_BUCKET);
    assert_eq!(presence::Bucket::decode(&bucket.encode()), bucket);
    let pkey = presence::user_key(&String::from_utf8_lossy(&x.b));
    let worker = x.rate;
    let before = bucket.count(&pkey, now);
    if bucket.change(&pkey, worker, 1, now) {
        assert!(bucket.records.len() <= presence::PER_BUCKET);
        assert!(bucket.count(&pkey, now) >= 1);
        assert!(bucket.change(&pkey, worker, -1, now));
        // Dead records may have gone, live ones stay: the count is back (or was only dead ones).
        assert!(bucket.count(&pkey, now) <= before);
    }
    let [p0, p1] = presence::buckets(&pkey);
    assert!(p0 < presence::BUCKETS && p1 < presence::BUCKETS);

    // Circuit breaker.
    let s = Settings {
        threshold: x.threshold,
        open_ms: x.open_ms,
        probe_timeout_ms: x.probe_timeout_ms,
        min_clients: u32::from(x.takes % 4),
    };
    if let Some(st) = breaker::State::decode(&x.a) {
        assert_eq!(breaker::State::decode(&st.encode()), Some(st));
        let _ = st.gauge();
        let (admit, next) = breaker::admit(st, now, &s);
        if let Admit::Reject { retry_after_ms } = admit {
            assert!(retry_after_ms > 0 && next.is_none());
        }
        if admit == Admit::Probe {
            assert!(matches!(next, Some(breaker::State::HalfOpen { .. })));
        }
        let after = next.unwrap_or(st);
        let bit = 1u64 << (x.rate % 64);
        if let Some(n) = breaker::record(after, x.ok, x.probe, bit, now, &s) {
            assert_eq!(breaker::State::decode(&n.encode()), Some(n));
            // The Envoy-wide breaker opens only on failures of enough different clients.
            if let (breaker::State::Closed { clients, .. }, breaker::State::Open { .. }) = (after, n) {
                assert!((clients | bit).count_ones() >= s.min_clients, "opened on too few clients");
            }
            if matches!(after, breaker::State::HalfOpen { .. }) {
                assert!(x.probe, "only the probe decides a half-open breaker");
            }
            if matches!(after, breaker::State::Open { .. }) {
                panic!("a result changed an open breaker");
            }
        }
    }

    // A client's share of the budget, and its floor in the Envoy-wide bucket.
    let share = x.threshold;
    let mut record =
        clients::Record::decode(&x.a).unwrap_or_else(|| clients::Record::new([7; 32], share, x.open_ms));
    assert_eq!(clients::Record::decode(&record.encode()), Some(record));
    let rate = x.rate.max(1);
    assert_eq!(clients::floor(0, rate), 0, "a client that asked for nothing has no floor");
    for _ in 0..x.takes % 8 {
        let capacity = u64::from(share.max(1)) * 1000;
        let before = record.bucket.level(share, now).min(capacity);
        let used = clients::charge(&mut record, share, now);
        let after = record.bucket.level(share, now);
        assert!(used <= 1000, "used {used} thousandths of a share");
        assert!(after <= before && before - after <= 1000, "a charge takes one token at most");
        let full = Bucket::full(rate, now).take_above(rate, now, clients::floor(used, rate));
        assert!(full.allowed, "a full bucket refused a client that used {used}");
    }

    // Rate-limit bucket.
    if let Some(b) = Bucket::decode(&x.a) {
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        let rate = x.rate;
        let capacity = u64::from(rate.max(1)) * 1000;
        let mut bucket = b;
        let mut allowed = 0u32;
        for _ in 0..x.takes % 16 {
            let t = bucket.take(rate, now);
            if t.allowed {
                allowed += 1;
                assert_eq!(t.wait_ms, 0);
            } else {
                assert!(t.wait_ms > 0);
            }
            if let Some(w) = t.write {
                assert!(!t.allowed || w.milli_tokens < capacity);
                bucket = w;
            }
        }
        assert!(
            u64::from(allowed) <= u64::from(rate.max(1)),
            "more than one second's capacity at one instant"
        );
    }
});
