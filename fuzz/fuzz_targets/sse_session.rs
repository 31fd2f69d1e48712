//! `sse::session::Session` (heartbeat / challenge / expiry schedule) driven by arbitrary sequences
//! of sent bytes, timer ticks and re-authorizations, with arbitrary (webhook-controlled) expiries
//! and settings, including the extremes the arithmetic must saturate at.
//!
//! Properties: no panic (overflow checks on); nothing is due before `next_deadline_ms`; a stream
//! whose token expired, or that reached `max_connection_sec`, is always due `Expired` (it never
//! outlives its token); after `Expired` nothing more is due and nothing extends it; no heartbeat
//! before the first upstream bytes; at most one challenge per expiry value; `extend` only ever
//! moves the expiry later.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::config::SseConfig;
use revenprox::sse::session::{Injection, Session};
use std::collections::HashMap;

#[derive(Arbitrary, Debug)]
enum Op {
    Upstream { dt: u32 },
    Tick { dt: u32 },
    Extend { exp: u64 },
    ExtendRelative { secs: u16 },
    Jump { dt: u64 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    heartbeat: u64,
    challenge: u64,
    max: u64,
    opened_ms: u64,
    expires_at: Option<u64>,
    ops: Vec<Op>,
}

fuzz_target!(|x: Input| {
    let cfg = SseConfig {
        heartbeat_interval_sec: x.heartbeat,
        challenge_before_expiry_sec: x.challenge,
        max_connection_sec: x.max,
        reverify_interval_sec: 0,
        max_streams_per_user: 0,
    };
    let mut s = Session::new(&cfg, x.opened_ms, x.expires_at);
    let max_deadline = x.opened_ms.saturating_add(x.max.saturating_mul(1000));
    let mut now = x.opened_ms;
    let mut upstream_seen = false;
    let mut challenges: HashMap<Option<u64>, u32> = HashMap::new();

    for op in x.ops.iter().take(256) {
        // Nothing is due before the deadline the host schedules its timer for.
        let deadline = s.next_deadline_ms();
        assert_eq!(deadline.is_none(), s.finished());
        match op {
            Op::Upstream { dt } | Op::Tick { dt } => now = now.saturating_add(u64::from(*dt)),
            Op::Jump { dt } => now = now.saturating_add(*dt),
            Op::Extend { .. } | Op::ExtendRelative { .. } => {}
        }
        if let Some(d) = deadline {
            if now < d {
                assert_eq!(s.due(now), None, "due before next_deadline_ms {d} at {now}");
            }
        }
        match op {
            Op::Upstream { .. } => {
                s.on_sent(now, true);
                upstream_seen = true;
            }
            Op::Extend { exp } => {
                let before = s.expires_at_sec();
                let moved = s.extend(*exp);
                assert_eq!(moved, !s.finished() && before.is_some_and(|b| *exp > b));
                if moved {
                    assert_eq!(s.expires_at_sec(), Some(*exp));
                } else {
                    assert_eq!(s.expires_at_sec(), before);
                }
            }
            Op::ExtendRelative { secs } => {
                let _ = s.extend((now / 1000).saturating_add(u64::from(*secs)));
            }
            Op::Tick { .. } | Op::Jump { .. } => {}
        }

        // The stream never outlives its token nor its maximum duration.
        if !s.finished() {
            let token_expired = s.expires_at_sec().is_some_and(|e| now >= e.saturating_mul(1000));
            if token_expired || now >= max_deadline {
                assert!(matches!(s.due(now), Some(Injection::Expired(_))), "{:?} at {now}", s.due(now));
            }
        }

        // The host's timer: inject everything due now.
        let mut guard = 0;
        while let Some(inj) = s.due(now) {
            guard += 1;
            assert!(guard <= 3, "due() does not settle");
            if inj == Injection::Heartbeat {
                assert!(upstream_seen, "heartbeat before the first upstream bytes");
            }
            if inj == Injection::Challenge {
                let n = challenges.entry(s.expires_at_sec()).or_default();
                *n += 1;
                assert!(*n <= 1, "second challenge for the same expiry");
                assert!(s.expires_at_sec().is_some());
            }
            s.mark_sent(inj, now);
            if let Injection::Expired(_) = inj {
                assert!(s.finished());
                assert_eq!(s.due(now), None);
                assert_eq!(s.next_deadline_ms(), None);
                assert!(!s.extend(u64::MAX));
                break;
            }
        }
    }
});
