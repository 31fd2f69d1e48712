//! Token bucket for webhook verifications: `rate` per second for the whole Envoy, held in shared
//! data and taken from by compare-and-swap. Capacity is one second's worth, so a burst after a quiet
//! period never exceeds `rate` calls. The bucket also remembers whether it is refusing, so that
//! "rate limiting started" and "ended" are each logged once per Envoy, by the CAS winner.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Thousandths of a token.
    pub milli_tokens: u64,
    pub last_ms: u64,
    /// The last take was refused.
    pub limiting: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    pub allowed: bool,
    /// Until a token is back (0 when allowed).
    pub wait_ms: u64,
    /// The bucket to write, or `None` when nothing needs writing (a refusal while already refusing).
    pub write: Option<Bucket>,
}

impl Bucket {
    pub fn full(rate: u32, now_ms: u64) -> Bucket {
        Bucket { milli_tokens: u64::from(rate) * 1000, last_ms: now_ms, limiting: false }
    }

    /// Takes one token at `now_ms`.
    pub fn take(self, rate: u32, now_ms: u64) -> Take {
        let rate = u64::from(rate.max(1));
        let capacity = rate * 1000;
        let elapsed = now_ms.saturating_sub(self.last_ms);
        // `rate` tokens per second = `rate` milli-tokens per millisecond.
        let tokens = self.milli_tokens.saturating_add(elapsed.saturating_mul(rate)).min(capacity);
        if tokens >= 1000 {
            let next =
                Bucket { milli_tokens: tokens - 1000, last_ms: now_ms.max(self.last_ms), limiting: false };
            Take { allowed: true, wait_ms: 0, write: Some(next) }
        } else {
            let wait_ms = (1000 - tokens).div_ceil(rate);
            let write = (!self.limiting).then_some(Bucket { limiting: true, ..self });
            Take { allowed: false, wait_ms, write }
        }
    }

    pub fn encode(self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&self.milli_tokens.to_be_bytes());
        out[8..16].copy_from_slice(&self.last_ms.to_be_bytes());
        out[16] = u8::from(self.limiting);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        Some(Bucket {
            milli_tokens: u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?),
            last_ms: u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?),
            limiting: *bytes.get(16)? != 0,
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
        // The first refusal marks the bucket as limiting; later refusals write nothing.
        let b = refused.write.unwrap();
        assert!(b.limiting);
        assert_eq!(b.take(5, 100).write, None);
        // 200 ms later one token is back, and limiting ends.
        let t = b.take(5, 200);
        assert!(t.allowed && !t.write.unwrap().limiting);
        assert!(!t.write.unwrap().take(5, 200).allowed);
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
        let b = Bucket { milli_tokens: 1234, last_ms: 99, limiting: true };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b"short"), None);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let b = Bucket { milli_tokens: 0, last_ms: 1000, limiting: false };
        assert!(!b.take(10, 500).allowed);
    }
}
