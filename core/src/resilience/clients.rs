//! Per-client fairness of the webhook budget: what one client address may take of the Envoy-wide
//! verification budget, and its own circuit breaker.
//!
//! A client address is the downstream address as Envoy sees it (so its `X-Forwarded-For` trust
//! settings apply): an IPv4 address, or an IPv6 /64 (one host gets a whole /64 to pick from).
//!
//! - **Budget.** Each client has a bucket of `rate_limit_per_client_per_sec` (its share), charged
//!   for every verification it asks for, served or refused: how empty it is says how much of its
//!   share the client asked for in the last second. A client takes from the Envoy-wide bucket only
//!   while at least that fraction of the Envoy-wide bucket is left: a client that asked for little
//!   takes whenever a token is there, one at or past its share only when the bucket is full. So a
//!   client alone still gets the whole rate (it takes each token as the bucket refills), and no
//!   number of busy addresses can starve one that asks for little: they leave the bucket full
//!   for it.
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

/// Charges one verification the client asks for to its share (`rate` per second; an empty share
/// stays empty). Returns how much of its share the client had asked for in the last second before
/// this one, in thousandths (0: nothing, 1000: all of it or more).
pub fn charge(record: &mut Record, rate: u32, now_ms: u64) -> u64 {
    let capacity = u64::from(rate.max(1)) * 1000;
    let level = record.bucket.level(rate, now_ms).min(capacity);
    record.bucket = Bucket {
        milli_tokens: level.saturating_sub(1000),
        last_ms: now_ms.max(record.bucket.last_ms),
        limiting: false,
        refused_ms: 0,
    };
    (capacity - level) * 1000 / capacity
}

/// The floor of the Envoy-wide bucket (`rate` per second) for a client that had asked for `used`
/// thousandths of its share: it takes only while at least that fraction of the bucket is there.
/// Always below a full bucket's level minus one token, so a full bucket serves any client.
pub fn floor(used: u64, rate: u32) -> u64 {
    (u64::from(rate.max(1)) * used.min(1000)).saturating_sub(1000)
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

    /// Ten seconds of `flooders` addresses asking 100 times a second each (5x the rate of 20), and
    /// a client asking every 250 ms (half its share): (fair served, fair asked, flood served).
    fn simulate(flooders: u8) -> (usize, usize, usize) {
        let rate = 20;
        let client_rate = rate / 2;
        let mut global = Bucket::full(rate, 0);
        let mut flood: Vec<Record> = (0..flooders).map(|i| Record::new([i; 32], client_rate, 0)).collect();
        let mut fair = Record::new([200; 32], client_rate, 0);
        let (mut fair_ok, mut fair_sent, mut flood_ok) = (0, 0, 0);
        let take = |global: &mut Bucket, c: &mut Record, now: u64| -> bool {
            let used = charge(c, client_rate, now);
            let t: Take = global.take_above(rate, now, floor(used, rate));
            if let Some(b) = t.write {
                *global = b;
            }
            t.allowed
        };
        for ms in (0..10_000u64).step_by(10) {
            for f in flood.iter_mut() {
                flood_ok += usize::from(take(&mut global, f, ms));
            }
            if ms % 250 == 0 {
                fair_sent += 1;
                fair_ok += usize::from(take(&mut global, &mut fair, ms));
            }
        }
        (fair_ok, fair_sent, flood_ok)
    }

    /// Floods from one, two, four or eight addresses at five times the rate each: a client that
    /// asks for little is always served, and the floods never get more than the rate.
    #[test]
    fn no_number_of_floods_can_take_the_budget_from_a_light_client() {
        for flooders in [1, 2, 4, 8] {
            let (fair_ok, fair_sent, flood_ok) = simulate(flooders);
            assert_eq!(fair_ok, fair_sent, "{flooders} flooding addresses");
            assert!(flood_ok <= 10 * 20 + 20, "{flooders}: {flood_ok}");
        }
        // Alone, one address gets the whole rate: it takes every token as the bucket refills.
        let mut global = Bucket::full(20, 0);
        let mut alone = Record::new([1; 32], 10, 0);
        let served = (0..10_000u64)
            .step_by(10)
            .filter(|ms| {
                let t = global.take_above(20, *ms, floor(charge(&mut alone, 10, *ms), 20));
                global = t.write.unwrap_or(global);
                t.allowed
            })
            .count();
        assert!(served >= 9 * 20, "{served}");
    }

    #[test]
    fn the_floor_follows_what_the_client_asked_for() {
        let mut r = Record::new([1; 32], 4, 0);
        // A fresh client asked for nothing: no floor. Each ask uses a quarter of a share of 4/s.
        assert_eq!(charge(&mut r, 4, 0), 0);
        assert_eq!(charge(&mut r, 4, 0), 250);
        assert_eq!(charge(&mut r, 4, 0), 500);
        assert_eq!(charge(&mut r, 4, 0), 750);
        assert_eq!(charge(&mut r, 4, 0), 1000);
        assert_eq!(charge(&mut r, 4, 0), 1000, "an empty share stays empty");
        // A second later the share is back.
        assert_eq!(charge(&mut r, 4, 1_000), 0);
        assert_eq!((floor(0, 10), floor(500, 10), floor(1000, 10)), (0, 4_000, 9_000));
        assert_eq!(floor(5_000, 10), 9_000);
        assert!(Bucket::full(10, 0).take_above(10, 0, floor(1000, 10)).allowed);
        assert!(Bucket::full(1, 0).take_above(1, 0, floor(1000, 1)).allowed);
    }
}
