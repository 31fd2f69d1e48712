//! Circuit breaker: one state for the whole Envoy, stored in shared data and changed only by
//! compare-and-swap, so every transition happens once however many workers race.
//!
//! closed ──(threshold consecutive failed verifications)──▶ open ──(timeout)──▶ half-open:
//! exactly one probe verification; success ▶ closed, failure ▶ open again. A probe that never
//! reports back (its worker went away) is given up after `probe_timeout_ms`, and another
//! request may probe.
//!
//! The same machine runs for the whole Envoy and for each client address (`clients`). The
//! Envoy-wide one opens only when the consecutive failures came from at least `min_clients`
//! different client addresses (a 64-bit sketch of them rides along): one client whose tokens the
//! webhook cannot verify opens its own circuit, never everyone's.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `clients`: one bit per client address (hashed to 0..64) among the consecutive failures.
    Closed {
        failures: u32,
        clients: u64,
    },
    Open {
        until_ms: u64,
    },
    HalfOpen {
        since_ms: u64,
    },
}

impl Default for State {
    fn default() -> Self {
        State::Closed { failures: 0, clients: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Verify normally.
    Allow,
    /// Verify: this verification is the one half-open probe.
    Probe,
    /// Fail at once; the breaker is open for `retry_after_ms` more.
    Reject { retry_after_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub threshold: u32,
    pub open_ms: u64,
    pub probe_timeout_ms: u64,
    /// Different client addresses the failures must come from before it opens.
    pub min_clients: u32,
}

/// What a verification may do now, and the state to write (by CAS) when that changes it.
pub fn admit(state: State, now_ms: u64, s: &Settings) -> (Admit, Option<State>) {
    match state {
        State::Closed { .. } => (Admit::Allow, None),
        State::Open { until_ms } if now_ms < until_ms => {
            (Admit::Reject { retry_after_ms: until_ms - now_ms }, None)
        }
        State::Open { .. } => (Admit::Probe, Some(State::HalfOpen { since_ms: now_ms })),
        State::HalfOpen { since_ms } if now_ms >= since_ms.saturating_add(s.probe_timeout_ms) => {
            (Admit::Probe, Some(State::HalfOpen { since_ms: now_ms }))
        }
        State::HalfOpen { .. } => (Admit::Reject { retry_after_ms: 1000 }, None),
    }
}

/// The state after a verification ended (`ok`: the webhook answered, allow or deny), or `None` if
/// it does not change. `probe`: this verification was admitted as the probe. `client`: the bit of
/// the client address it was for (see `client_bit`).
pub fn record(state: State, ok: bool, probe: bool, client: u64, now_ms: u64, s: &Settings) -> Option<State> {
    let open = State::Open { until_ms: now_ms.saturating_add(s.open_ms) };
    match (state, ok) {
        (State::Closed { failures: 0, clients: 0 }, true) => None,
        (State::Closed { .. }, true) => Some(State::Closed { failures: 0, clients: 0 }),
        (State::Closed { failures, clients }, false) => {
            let (failures, clients) = (failures.saturating_add(1), clients | client);
            if failures >= s.threshold && clients.count_ones() >= s.min_clients {
                Some(open)
            } else {
                Some(State::Closed { failures, clients })
            }
        }
        (State::HalfOpen { .. }, true) if probe => Some(State::Closed { failures: 0, clients: 0 }),
        (State::HalfOpen { .. }, false) if probe => Some(open),
        // Late results of verifications that started before the breaker opened change nothing.
        (State::HalfOpen { .. } | State::Open { .. }, _) => None,
    }
}

/// A probe that was admitted but never made (e.g. the rate limit refused it): the next
/// verification may probe at once.
pub fn abandon_probe(state: State, now_ms: u64) -> Option<State> {
    match state {
        State::HalfOpen { .. } => Some(State::Open { until_ms: now_ms }),
        _ => None,
    }
}

/// The sketch bit of a client address key (bit 63 stands for the filter itself: re-verifications).
pub fn client_bit(client: Option<&[u8; 32]>) -> u64 {
    match client {
        Some(key) => 1u64 << (u64::from(key[0]) % 63),
        None => 1 << 63,
    }
}

impl State {
    /// 0 closed, 1 open, 2 half-open (the `revenprox_circuit_state` gauge).
    pub fn gauge(self) -> u64 {
        match self {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen { .. } => 2,
        }
    }

    pub fn encode(self) -> [u8; 17] {
        let (tag, value, clients) = match self {
            State::Closed { failures, clients } => (0u8, u64::from(failures), clients),
            State::Open { until_ms } => (1, until_ms, 0),
            State::HalfOpen { since_ms } => (2, since_ms, 0),
        };
        let mut out = [0u8; 17];
        out[0] = tag;
        out[1..9].copy_from_slice(&value.to_be_bytes());
        out[9..].copy_from_slice(&clients.to_be_bytes());
        out
    }

    /// A state's bytes (a 9-byte value of an older build has no client sketch).
    pub fn decode(bytes: &[u8]) -> Option<State> {
        let tag = *bytes.first()?;
        let value = u64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?);
        let clients = bytes.get(9..17).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
        match tag {
            0 => Some(State::Closed { failures: u32::try_from(value).unwrap_or(u32::MAX), clients }),
            1 => Some(State::Open { until_ms: value }),
            2 => Some(State::HalfOpen { since_ms: value }),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: Settings = Settings { threshold: 3, open_ms: 60_000, probe_timeout_ms: 10_000, min_clients: 1 };

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let mut st = State::default();
        for _ in 0..2 {
            st = record(st, false, false, 1, 0, &S).unwrap();
            assert_eq!(admit(st, 0, &S).0, Admit::Allow);
        }
        st = record(st, false, false, 1, 1_000, &S).unwrap();
        assert_eq!(st, State::Open { until_ms: 61_000 });
        assert_eq!(admit(st, 1_000, &S), (Admit::Reject { retry_after_ms: 60_000 }, None));
    }

    #[test]
    fn the_envoy_wide_breaker_needs_failures_of_several_clients() {
        let s = Settings { min_clients: 2, ..S };
        let mut st = State::default();
        // One client fails again and again: the circuit stays closed for everyone.
        for _ in 0..10 {
            st = record(st, false, false, 1 << 5, 0, &s).unwrap();
        }
        assert!(matches!(st, State::Closed { failures: 10, .. }));
        assert_eq!(admit(st, 0, &s).0, Admit::Allow);
        // A second client fails too: it opens.
        assert_eq!(record(st, false, false, 1 << 9, 7, &s), Some(State::Open { until_ms: 60_007 }));
        // A success anywhere starts over.
        assert_eq!(record(st, true, false, 1 << 9, 7, &s), Some(State::Closed { failures: 0, clients: 0 }));
    }

    #[test]
    fn success_resets_the_count() {
        let st = record(State::Closed { failures: 2, clients: 0 }, true, false, 1, 0, &S).unwrap();
        assert_eq!(st, State::Closed { failures: 0, clients: 0 });
        assert_eq!(record(st, true, false, 1, 0, &S), None);
    }

    #[test]
    fn one_probe_after_timeout() {
        let open = State::Open { until_ms: 100 };
        let (a, next) = admit(open, 100, &S);
        assert_eq!((a, next), (Admit::Probe, Some(State::HalfOpen { since_ms: 100 })));
        let half = next.unwrap();
        // While the probe runs everyone else is refused.
        assert!(matches!(admit(half, 200, &S).0, Admit::Reject { .. }));
        // Probe success closes, failure reopens.
        assert_eq!(record(half, true, true, 1, 300, &S), Some(State::Closed { failures: 0, clients: 0 }));
        assert_eq!(record(half, false, true, 1, 300, &S), Some(State::Open { until_ms: 60_300 }));
        // Non-probe results do not decide.
        assert_eq!(record(half, true, false, 1, 300, &S), None);
        assert_eq!(record(open, false, false, 1, 300, &S), None);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let half = State::HalfOpen { since_ms: 50 };
        let open = abandon_probe(half, 60).unwrap();
        assert_eq!(admit(open, 60, &S).0, Admit::Probe);
        assert_eq!(abandon_probe(State::Closed { failures: 1, clients: 0 }, 60), None);
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let half = State::HalfOpen { since_ms: 0 };
        assert_eq!(admit(half, 10_000, &S), (Admit::Probe, Some(State::HalfOpen { since_ms: 10_000 })));
    }

    #[test]
    fn encoding_round_trips() {
        for st in [
            State::Closed { failures: 7, clients: 0 },
            State::Open { until_ms: 1 << 40 },
            State::HalfOpen { since_ms: 5 },
        ] {
            assert_eq!(State::decode(&st.encode()), Some(st));
        }
        assert_eq!(State::decode(b""), None);
        assert_eq!(State::decode(&[9; 9]), None);
    }
}
