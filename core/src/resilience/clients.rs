//! Per-client fairness of the webhook budget: what one client address may take of the Envoy-wide
//! verification budget, and its own circuit breaker.
//!
//! A client address is the downstream address as Envoy sees it (so its `X-Forwarded-For` trust
//! settings apply): an IPv4 address, or an IPv6 /64 (one host gets a whole /64 to pick from).
//!
//! - **Budget.** Each client has a bucket of `rate_limit_per_client_per_sec`. A verification within
//!   the client's share takes from the Envoy-wide bucket as usual; one past it takes only while more
//!   than half the Envoy-wide bucket is left. So a client alone can use the whole budget, but a
//!   flood from one address can never take the half that clients within their share rely on.
//! - **Circuit.** Consecutive failed verifications of one client open that client's circuit (same
//!   threshold and timeout as the Envoy-wide one, see `breaker`), and count towards the Envoy-wide
//!   circuit only together with failures of other clients.
//!
//! Records live in a fixed set of shared-data slots (two candidates per client, the least recently
//! seen replaced first), so memory is fixed whatever the number of addresses.

use super::breaker;
use super::limiter::Bucket;
use sha2::{Digest, Sha256};

pub type Key = [u8; 32];

/// Slots of the table: the most client addresses tracked at once.
pub const SLOTS: u32 = 4_096;
/// A record not seen for this long (and whose circuit is closed) may be replaced.
pub const IDLE_MS: u64 = 300_000;

/// The key of a client address (`ip:port`, `[ipv6]:port`, or a bare address): `None` when it is
/// no address.
pub fn key(address: &str) -> Option<Key> {
    let host = match address.strip_prefix('[') {
        Some(rest) => rest.split(']').next()?,
        None => match address.rsplit_once(':') {
            // IPv4 with a port; a bare IPv6 address has more than one ':'.
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => address,
        },
    };
    let mut h = Sha256::new();
    h.update(b"client\n");
    if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
        h.update(v4.octets());
    } else if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        match v6.to_ipv4_mapped() {
            Some(v4) => h.update(v4.octets()),
            None => h.update(v6.octets().get(..8)?),
        }
    } else {
        return None;
    }
    Some(h.finalize().into())
}

pub fn slots(key: &Key) -> [u32; 2] {
    crate::auth::cache::slots(key, SLOTS)
}

pub fn slot_name(n: u32) -> String {
    format!("revenprox.clients.{n}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    pub seen_ms: u64,
    pub bucket: Bucket,
    pub breaker: breaker::State,
}

impl Record {
    pub fn new(key: Key, rate: u32, now_ms: u64) -> Record {
        Record {
            key,
            seen_ms: now_ms,
            bucket: Bucket::full(rate, now_ms),
            breaker: breaker::State::default(),
        }
    }

    /// key (32) | seen_ms (u64 BE) | bucket (25) | breaker (17).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(82);
        out.extend_from_slice(&self.key);
        out.extend_from_slice(&self.seen_ms.to_be_bytes());
        out.extend_from_slice(&self.bucket.encode());
        out.extend_from_slice(&self.breaker.encode());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Record> {
        Some(Record {
            key: bytes.get(..32)?.try_into().ok()?,
            seen_ms: u64::from_be_bytes(bytes.get(32..40)?.try_into().ok()?),
            bucket: Bucket::decode(bytes.get(40..65)?)?,
            breaker: breaker::State::decode(bytes.get(65..82)?)?,
        })
    }
}

impl crate::slots::Slotted for Record {
    fn key(&self) -> &[u8; 32] {
        &self.key
    }
    fn live(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.seen_ms) < IDLE_MS
            || !matches!(self.breaker, breaker::State::Closed { .. })
    }
    /// The client seen longest ago goes first.
    fn evict_order(&self) -> u64 {
        self.seen_ms
    }
}

/// Whether a verification of this client is within its share at `now_ms`.
pub fn within_share(record: &Record, rate: u32, now_ms: u64) -> bool {
    record.bucket.level(rate, now_ms) >= 1000
}

/// The floor of the Envoy-wide bucket for a verification: none within the client's share, half
/// the bucket past it.
pub fn floor(within_share: bool, rate: u32) -> u64 {
    if within_share {
        0
    } else {
        u64::from(rate) * 500
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resilience::limiter::Take;

    #[test]
    fn addresses_as_envoy_writes_them() {
        assert_eq!(key("10.0.0.1:5555"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1:5555"), key("10.0.0.2:5555"));
        // One IPv6 /64 is one client; IPv4-mapped addresses are their IPv4 address.
        assert_eq!(key("[2001:db8:1:2::1]:443"), key("[2001:db8:1:2:ffff::9]:80"));
        assert_ne!(key("[2001:db8:1:2::1]:443"), key("[2001:db8:1:3::1]:443"));
        assert_eq!(key("[::ffff:10.0.0.1]:1"), key("10.0.0.1:2"));
        assert_eq!(key("2001:db8::1"), key("[2001:db8::2]:9"));
        assert_eq!(key("not an address"), None);
        assert_eq!(key(""), None);
    }

    #[test]
    fn round_trip() {
        let r = Record::new([3; 32], 10, 77);
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(b"x"), None);
    }

    /// A flood from one address at five times the rate, and a client within its share: the
    /// client within its share is always served.
    #[test]
    fn a_flood_cannot_take_the_reserve() {
        let rate = 20;
        let client_rate = rate / 2;
        let mut global = Bucket::full(rate, 0);
        let mut flood = Record::new([1; 32], client_rate, 0);
        let mut fair = Record::new([2; 32], client_rate, 0);
        let (mut fair_ok, mut fair_sent, mut flood_ok) = (0, 0, 0);
        let take = |global: &mut Bucket, c: &mut Record, now: u64| -> bool {
            let within = within_share(c, client_rate, now);
            let t: Take = global.take_above(rate, now, floor(within, rate));
            if let Some(b) = t.write {
                *global = b;
            }
            if t.allowed && within {
                if let Some(b) = c.bucket.take(client_rate, now).write {
                    c.bucket = b;
                }
            }
            t.allowed
        };
        for ms in (0..10_000u64).step_by(10) {
            // 100 forged tokens per second...
            flood_ok += usize::from(take(&mut global, &mut flood, ms));
            // ...and a fresh valid token every 250 ms.
            if ms % 250 == 0 {
                fair_sent += 1;
                fair_ok += usize::from(take(&mut global, &mut fair, ms));
            }
        }
        assert_eq!(fair_ok, fair_sent, "every fair request was served");
        assert!(flood_ok <= 10 * rate as usize, "{flood_ok}");
        // Alone, one address can use the whole budget.
        let mut global = Bucket::full(rate, 0);
        let mut alone = Record::new([1; 32], client_rate, 0);
        let served = (0..10_000u64).step_by(10).filter(|ms| take(&mut global, &mut alone, *ms)).count();
        assert!(served >= 9 * rate as usize, "{served}");
    }
}
