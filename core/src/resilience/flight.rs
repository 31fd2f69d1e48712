//! Single flight and retries: the verifications in progress on one worker.
//!
//! Requests that miss the cache for the same JWT and topic join one flight and share its webhook
//! call, its retries and its verdict. A ticket always flies alone (it is one-time: two uses are two
//! verifications). A flight owns its schedule: the call in progress, or the time of its next retry
//! (backoff 100 ms × attempt).

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlightKey {
    /// SHA-256 over the JWT and the topic id: concurrent identical requests share it.
    Shared([u8; 32]),
    /// A flight of its own, named by the stream context that started it.
    Solo(u32),
}

/// Why a stream waits for a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A request to forward upstream.
    Forward,
    /// A challenge response (answered 204 or 403 by the filter, never forwarded).
    Refresh,
    /// An open stream's re-verification (nothing is answered: the stream goes on or ends).
    Reverify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub context_id: u32,
    pub purpose: Purpose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flight<V> {
    /// What is being verified (credential, topic, cache key): the same for every waiter.
    pub verification: V,
    pub waiters: Vec<Waiter>,
    /// Calls made so far.
    pub attempts: u32,
    /// The webhook call in progress (its host token), if any.
    pub call: Option<u32>,
    /// When the next call is due, when it is not in progress.
    pub due_ms: Option<u64>,
    /// Admitted as the circuit breaker's half-open probe.
    pub probe: bool,
    pub started_ms: u64,
    pub call_started_ms: u64,
}

/// Delay before retry number `attempt` (1-based): 100 ms × attempt.
pub fn backoff_ms(attempt: u32) -> u64 {
    100 * u64::from(attempt)
}

/// What a stream's departure did to the flight it waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// Others still wait. `orphaned`: the call in progress was made by that stream, so its answer
    /// will never arrive and the flight needs a new call.
    Waiting { key: FlightKey, orphaned: bool },
    /// It was the last waiter: the flight ended. `probe`: the flight was the circuit breaker's
    /// half-open probe, which must be given back or the breaker refuses everything until the
    /// probe times out.
    Ended { key: FlightKey, probe: bool },
}

#[derive(Debug)]
pub struct Flights<V> {
    by_key: HashMap<FlightKey, Flight<V>>,
    by_call: HashMap<u32, FlightKey>,
}

impl<V> Default for Flights<V> {
    fn default() -> Self {
        Flights { by_key: HashMap::new(), by_call: HashMap::new() }
    }
}

impl<V> Flights<V> {
    /// Joins `waiter` to the flight of `key` if one is in progress; `false` if there is none.
    pub fn join(&mut self, key: FlightKey, waiter: Waiter) -> bool {
        match self.by_key.get_mut(&key) {
            Some(f) => {
                f.waiters.push(waiter);
                true
            }
            None => false,
        }
    }

    /// Starts a flight whose first call is due now.
    pub fn start(&mut self, key: FlightKey, verification: V, waiter: Waiter, probe: bool, now_ms: u64) {
        self.by_key.insert(
            key,
            Flight {
                verification,
                waiters: vec![waiter],
                attempts: 0,
                call: None,
                due_ms: Some(now_ms),
                probe,
                started_ms: now_ms,
                call_started_ms: now_ms,
            },
        );
    }

    pub fn get(&self, key: &FlightKey) -> Option<&Flight<V>> {
        self.by_key.get(key)
    }

    /// A call for `key` was made with host token `call`.
    pub fn called(&mut self, key: FlightKey, call: u32, now_ms: u64) {
        if self.attempted(key, now_ms) {
            if let Some(f) = self.by_key.get_mut(&key) {
                f.call = Some(call);
                self.by_call.insert(call, key);
            }
        }
    }

    /// A call for `key` was tried (made, or refused by the host at once). `false` if no such flight.
    pub fn attempted(&mut self, key: FlightKey, now_ms: u64) -> bool {
        let Some(f) = self.by_key.get_mut(&key) else {
            return false;
        };
        if let Some(old) = f.call.take() {
            self.by_call.remove(&old);
        }
        f.attempts = f.attempts.saturating_add(1);
        f.due_ms = None;
        f.call_started_ms = now_ms;
        true
    }

    /// The flight a call's answer belongs to; the call is no longer in progress.
    pub fn answered(&mut self, call: u32) -> Option<FlightKey> {
        let key = self.by_call.remove(&call)?;
        if let Some(f) = self.by_key.get_mut(&key) {
            f.call = None;
        }
        Some(key)
    }

    /// After a failed call: schedules a retry and returns its due time, or `None` when the
    /// flight has used its `retry_attempts` (then it must finish as a failure).
    pub fn retry(&mut self, key: &FlightKey, retry_attempts: u32, now_ms: u64) -> Option<u64> {
        let f = self.by_key.get_mut(key)?;
        if f.attempts > retry_attempts {
            return None;
        }
        let due = now_ms.saturating_add(backoff_ms(f.attempts));
        f.due_ms = Some(due);
        Some(due)
    }

    /// Flights whose next call is due at `now_ms`.
    pub fn due(&self, now_ms: u64) -> Vec<FlightKey> {
        self.by_key.iter().filter(|(_, f)| f.due_ms.is_some_and(|d| d <= now_ms)).map(|(k, _)| *k).collect()
    }

    /// The earliest scheduled call, for timers.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.by_key.values().filter_map(|f| f.due_ms).min()
    }

    /// Ends a flight, returning it with its waiters.
    pub fn finish(&mut self, key: &FlightKey) -> Option<Flight<V>> {
        let f = self.by_key.remove(key)?;
        if let Some(call) = f.call {
            self.by_call.remove(&call);
        }
        Some(f)
    }

    /// A waiting stream went away: what that did to the flight it waited on (`None` when it
    /// waited on none).
    pub fn leave(&mut self, context_id: u32, call_owner: impl Fn(u32) -> bool) -> Option<Left> {
        let key = *self.by_key.iter().find(|(_, f)| f.waiters.iter().any(|w| w.context_id == context_id))?.0;
        let f = self.by_key.get_mut(&key)?;
        f.waiters.retain(|w| w.context_id != context_id);
        if f.waiters.is_empty() {
            let probe = f.probe;
            self.finish(&key);
            return Some(Left::Ended { key, probe });
        }
        let orphaned = f.call.is_some_and(&call_owner);
        Some(Left::Waiting { key, orphaned })
    }

    /// The flight stream `context_id` waits on, if any.
    pub fn key_of(&self, context_id: u32) -> Option<FlightKey> {
        self.by_key
            .iter()
            .find(|(_, f)| f.waiters.iter().any(|w| w.context_id == context_id))
            .map(|(k, _)| *k)
    }

    /// Makes a flight whose call was lost due again at once (without counting an attempt).
    pub fn recall(&mut self, key: &FlightKey, now_ms: u64) {
        if let Some(f) = self.by_key.get_mut(key) {
            if let Some(call) = f.call.take() {
                self.by_call.remove(&call);
            }
            f.attempts = f.attempts.saturating_sub(1);
            f.due_ms = Some(now_ms);
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The keys of the flights in progress.
    pub fn keys(&self) -> Vec<FlightKey> {
        self.by_key.keys().copied().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn w(id: u32) -> Waiter {
        Waiter { context_id: id, purpose: Purpose::Forward }
    }

    #[test]
    fn identical_misses_share_one_flight() {
        let mut f: Flights<&str> = Flights::default();
        let k = FlightKey::Shared([1; 32]);
        assert!(!f.join(k, w(1)));
        f.start(k, "v", w(1), false, 0);
        assert!(f.join(k, w(2)));
        assert!(f.join(k, w(3)));
        assert_eq!(f.due(0), vec![k]);
        f.called(k, 77, 0);
        assert!(f.due(0).is_empty());
        assert_eq!(f.answered(77), Some(k));
        let done = f.finish(&k).unwrap();
        assert_eq!(done.waiters.len(), 3);
        assert!(f.is_empty());
    }

    #[test]
    fn retries_back_off_and_stop() {
        let mut f: Flights<()> = Flights::default();
        let k = FlightKey::Solo(9);
        f.start(k, (), w(9), false, 0);
        f.called(k, 1, 0);
        f.answered(1);
        assert_eq!(f.retry(&k, 2, 1000), Some(1100));
        assert!(f.due(1099).is_empty());
        assert_eq!(f.due(1100), vec![k]);
        f.called(k, 2, 1100);
        f.answered(2);
        assert_eq!(f.retry(&k, 2, 2000), Some(2200));
        f.called(k, 3, 2200);
        f.answered(3);
        assert_eq!(f.retry(&k, 2, 3000), None, "1 + retry_attempts calls at most");
        assert_eq!(f.get(&k).unwrap().attempts, 3);
    }

    #[test]
    fn no_retries_means_one_call() {
        let mut f: Flights<()> = Flights::default();
        let k = FlightKey::Solo(1);
        f.start(k, (), w(1), false, 0);
        f.called(k, 5, 0);
        f.answered(5);
        assert_eq!(f.retry(&k, 0, 10), None);
    }

    #[test]
    fn leaving_waiters() {
        let mut f: Flights<()> = Flights::default();
        let k = FlightKey::Shared([2; 32]);
        f.start(k, (), w(1), false, 0);
        f.join(k, w(2));
        f.called(k, 40, 0);
        // The caller leaves: its call's answer is lost, the flight must call again.
        assert_eq!(f.leave(1, |call| call == 40), Some(Left::Waiting { key: k, orphaned: true }));
        f.recall(&k, 5);
        assert_eq!(f.due(5), vec![k]);
        assert_eq!(f.get(&k).unwrap().attempts, 0);
        assert_eq!(f.answered(40), None);
        // The last waiter leaves: the flight ends.
        assert_eq!(f.leave(2, |_| false), Some(Left::Ended { key: k, probe: false }));
        assert!(f.is_empty());
        assert_eq!(f.leave(3, |_| false), None);
    }

    #[test]
    fn a_probe_abandoned_by_its_last_waiter_is_reported() {
        // Found while modelling fuzz/fuzz_targets/flight.rs: the ended probe flight was reported
        // like any departure, so the breaker stayed half-open (refusing every verification in the
        // Envoy) until the probe timed out.
        let mut f: Flights<()> = Flights::default();
        let k = FlightKey::Shared([3; 32]);
        f.start(k, (), w(1), true, 0);
        f.join(k, w(2));
        f.called(k, 7, 0);
        assert_eq!(f.leave(1, |c| c == 7), Some(Left::Waiting { key: k, orphaned: true }));
        assert_eq!(f.leave(2, |_| false), Some(Left::Ended { key: k, probe: true }));
        assert!(f.is_empty());
        assert_eq!(f.answered(7), None);
    }

    #[test]
    fn next_due() {
        let mut f: Flights<()> = Flights::default();
        assert_eq!(f.next_due_ms(), None);
        f.start(FlightKey::Solo(1), (), w(1), false, 50);
        f.start(FlightKey::Solo(2), (), w(2), false, 20);
        assert_eq!(f.next_due_ms(), Some(20));
    }
}
