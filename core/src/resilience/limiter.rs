//! Token buckets for webhook verifications: `rate` per second for the whole Envoy (held in shared
//! data and taken from by compare-and-swap), and `rate` per second for one client address (see
//! `clients`). Capacity is one second's worth, so a burst after a quiet period never exceeds
//! `rate` calls.
//!
//! The Envoy-wide bucket remembers whether it is refusing, so that "rate limiting started" and
//! "ended" are each logged once per Envoy, by the CAS winner — with hysteresis: limiting ends only
//! once a whole `QUIET_MS` passed without a refusal, not at every token that trickles back under a
//! sustained overload.

/// Limiting has ended after this long without a refusal.
pub const QUIET_MS: u64 = 1_000;
/// Refusal times are recorded at this granularity (a refusal a bucket already records writes
/// nothing: refusals under overload cost no shared-data write).
const REFUSAL_GRAIN_MS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a token.
    pub milli_tokens: u64,
    pub last_ms: u64,
    /// Refusing, since a refusal no `QUIET_MS` has passed since.
    pub limiting: bool,
    /// The last refusal (to `REFUSAL_GRAIN_MS`).
    pub refused_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// Until a token is back (0 when allowed).
    pub wait_ms: u64,
    /// The bucket to write, or `None` when nothing needs writing.
    pub write: Option<Bucket>,
}

impl Bucket {
    pub fn full(rate: u32, now_ms: u64) -> Bucket {
        Bucket { milli_tokens: u64::from(rate) * 1000, last_ms: now_ms, limiting: false, refused_ms: 0 }
    }

    /// Tokens (thousandths) at `now_ms`, refilled at `rate` per second up to one second's worth.
    pub fn level(&self, rate: u32, now_ms: u64) -> u64 {
        let rate = u64::from(rate.max(1));
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // `rate` tokens per second = `rate` milli-tokens per millisecond.
        self.milli_tokens.saturating_add(elapsed.saturating_mul(rate)).min(rate * 1000)
    }

    /// Takes one token at `now_ms`.
    pub fn take(self, rate: u32, now_ms: u64) -> Take {
        self.take_above(rate, now_ms, 0)
    }

    /// Takes one token at `now_ms` if at least `floor` thousandths remain after it (a reserve that
    /// only takes within a share may use).
    pub fn take_above(self, rate: u32, now_ms: u64, floor: u64) -> Take {
        let tokens = self.level(rate, now_ms);
        let now = now_ms.max(self.last_ms);
        if tokens >= floor.saturating_add(1000) {
            let quiet = now.saturating_sub(self.refused_ms) >= QUIET_MS;
            let limiting = self.limiting && !quiet;
            let next =
                Bucket { milli_tokens: tokens - 1000, last_ms: now, limiting, refused_ms: self.refused_ms };
            Take { allowed: true, wait_ms: 0, write: Some(next) }
        } else {
            let short = floor.saturating_add(1000).saturating_sub(tokens);
            let wait_ms = short.div_ceil(u64::from(rate.max(1)));
            let recorded = self.limiting && now.saturating_sub(self.refused_ms) < REFUSAL_GRAIN_MS;
            let write = (!recorded).then_some(Bucket { limiting: true, refused_ms: now, ..self });
            Take { allowed: false, wait_ms, write }
        }
    }

    pub fn encode(self) -> [u8; 25] {
        let mut out = [0u8; 25];
        out[..8].copy_from_slice(&self.milli_tokens.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_ms.to_be_bytes());
        out[16] = u8::from(self.limiting);
        out[17..].copy_from_slice(&self.refused_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        Some(Bucket {
            milli_tokens: u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?),
            last_ms: u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?),
            limiting: *bytes.get(16)? != 0,
            // A bucket written by an older build has no refusal time: the last refresh will do.
            refused_ms: bytes.get(17..25).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allows_rate_per_second_then_refuses() {
        let mut b = Bucket::full(5, 0);
        for _ in 0..5 {
            let t = b.take(5, 0);
            assert!(t.allowed);
            b = t.write.unwrap();
        }
        let refused = b.take(5, 0);
        assert_eq!((refused.allowed, refused.wait_ms), (false, 200));
        // The first refusal marks the bucket as limiting; refusals right after write nothing.
        let b = refused.write.unwrap();
        assert!(b.limiting);
        assert_eq!(b.take(5, 50).write, None);
        // 200 ms later one token is back: allowed, but limiting has not ended (no quiet second).
        let t = b.take(5, 200);
        assert!(t.allowed && t.write.unwrap().limiting);
        assert!(!t.write.unwrap().take(5, 200).allowed);
    }

    #[test]
    fn limiting_ends_after_a_quiet_second_only() {
        // A sustained overload at twice the rate: limiting starts once and never flips back.
        let rate = 50;
        let mut b = Bucket::full(rate, 0);
        let (mut started, mut ended) = (0, 0);
        for i in 0..1_000u64 {
            let t = b.take(rate, i * 10);
            if let Some(next) = t.write {
                started += usize::from(next.limiting && !b.limiting);
                ended += usize::from(!next.limiting && b.limiting);
                b = next;
            }
        }
        assert_eq!((started, ended), (1, 0));
        // The load stops; the first take a quiet second later ends it.
        let t = b.take(rate, 10_000 + QUIET_MS);
        assert!(t.allowed && !t.write.unwrap().limiting);
    }

    #[test]
    fn a_floor_keeps_a_reserve() {
        let b = Bucket::full(10, 0);
        // Ten tokens; above a floor of five, five can be taken.
        let mut b = b;
        let mut taken = 0;
        while let Take { allowed: true, write: Some(next), .. } = b.take_above(10, 0, 5_000) {
            b = next;
            taken += 1;
        }
        assert_eq!(taken, 5);
        assert!(b.take(10, 0).allowed, "the reserve is there for takes without a floor");
    }

    #[test]
    fn never_more_than_capacity() {
        let mut b = Bucket::full(3, 0);
        let mut allowed = 0;
        for _ in 0..10 {
            let t = b.take(3, 1_000_000);
            if t.allowed {
                allowed += 1;
            }
            b = t.write.unwrap_or(b);
        }
        assert_eq!(allowed, 3);
    }

    #[test]
    fn encoding_round_trips() {
        let b = Bucket { milli_tokens: 1234, last_ms: 99, limiting: true, refused_ms: 77 };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b"short"), None);
        let old = &b.encode()[..17];
        assert_eq!(Bucket::decode(old), Some(Bucket { refused_ms: 0, ..b }));
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let b = Bucket { milli_tokens: 0, last_ms: 1000, limiting: false, refused_ms: 0 };
        assert!(!b.take(10, 500).allowed);
    }
}
