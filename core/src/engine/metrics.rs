//! The filter's metrics: names (as Envoy shows them at `/stats/prometheus`), kinds, and the tally
//! the engine keeps between two host callbacks. The host defines each metric once and applies the
//! tally after every callback (`Tally::drain`). README's metrics table lists every name (checked
//! by a unit test).

use crate::auth::reply::Code;
use crate::auth::verdict::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric, in one table: index = `Metric as usize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Requests,
    Allowed,
    DeniedMissingToken,
    DeniedMalformedAuthorization,
    DeniedInvalidToken,
    DeniedNoTopic,
    DeniedUserMismatch,
    DeniedRateLimited,
    DeniedTooManyStreams,
    DeniedAuthUnavailable,
    CacheHits,
    CacheMisses,
    WebhookCalls,
    WebhookRetries,
    WebhookFailures,
    WebhookFailuresStatus,
    WebhookFailuresMalformed,
    WebhookFailuresReset,
    WebhookFailuresTimeout,
    WebhookLatencyMs,
    SingleflightJoins,
    RateLimited,
    CircuitState,
    CircuitOpened,
    CircuitClosed,
    CircuitRejected,
    OpenStreams,
    HeartbeatsSent,
    ChallengesSent,
    Reauthorizations,
    StreamsExpired,
    Reverifications,
    ReverifyFailures,
    StreamsRevoked,
    Revocations,
    PresenceFull,
    OtherPaths,
    ClientCircuitOpened,
    ClientCircuitRejected,
    UserIdNotSub,
    StreamsEncoded,
}

pub const ALL: [Metric; 41] = [
    Metric::Requests,
    Metric::Allowed,
    Metric::DeniedMissingToken,
    Metric::DeniedMalformedAuthorization,
    Metric::DeniedInvalidToken,
    Metric::DeniedNoTopic,
    Metric::DeniedUserMismatch,
    Metric::DeniedRateLimited,
    Metric::DeniedTooManyStreams,
    Metric::DeniedAuthUnavailable,
    Metric::CacheHits,
    Metric::CacheMisses,
    Metric::WebhookCalls,
    Metric::WebhookRetries,
    Metric::WebhookFailures,
    Metric::WebhookFailuresStatus,
    Metric::WebhookFailuresMalformed,
    Metric::WebhookFailuresReset,
    Metric::WebhookFailuresTimeout,
    Metric::WebhookLatencyMs,
    Metric::SingleflightJoins,
    Metric::RateLimited,
    Metric::CircuitState,
    Metric::CircuitOpened,
    Metric::CircuitClosed,
    Metric::CircuitRejected,
    Metric::OpenStreams,
    Metric::HeartbeatsSent,
    Metric::ChallengesSent,
    Metric::Reauthorizations,
    Metric::StreamsExpired,
    Metric::Reverifications,
    Metric::ReverifyFailures,
    Metric::StreamsRevoked,
    Metric::Revocations,
    Metric::PresenceFull,
    Metric::OtherPaths,
    Metric::ClientCircuitOpened,
    Metric::ClientCircuitRejected,
    Metric::UserIdNotSub,
    Metric::StreamsEncoded,
];

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Requests => "revenprox_requests",
            Metric::Allowed => "revenprox_allowed",
            Metric::DeniedMissingToken => "revenprox_denied_missing_token",
            Metric::DeniedMalformedAuthorization => "revenprox_denied_malformed_authorization",
            Metric::DeniedInvalidToken => "revenprox_denied_invalid_token",
            Metric::DeniedNoTopic => "revenprox_denied_no_topic",
            Metric::DeniedUserMismatch => "revenprox_denied_user_mismatch",
            Metric::DeniedRateLimited => "revenprox_denied_rate_limited",
            Metric::DeniedTooManyStreams => "revenprox_denied_too_many_streams",
            Metric::DeniedAuthUnavailable => "revenprox_denied_auth_unavailable",
            Metric::CacheHits => "revenprox_cache_hits",
            Metric::CacheMisses => "revenprox_cache_misses",
            Metric::WebhookCalls => "revenprox_webhook_calls",
            Metric::WebhookRetries => "revenprox_webhook_retries",
            Metric::WebhookFailures => "revenprox_webhook_failures",
            Metric::WebhookFailuresStatus => "revenprox_webhook_failures_status",
            Metric::WebhookFailuresMalformed => "revenprox_webhook_failures_malformed",
            Metric::WebhookFailuresReset => "revenprox_webhook_failures_reset",
            Metric::WebhookFailuresTimeout => "revenprox_webhook_failures_timeout",
            Metric::WebhookLatencyMs => "revenprox_webhook_latency_ms",
            Metric::SingleflightJoins => "revenprox_singleflight_joins",
            Metric::RateLimited => "revenprox_rate_limited",
            Metric::CircuitState => "revenprox_circuit_state",
            Metric::CircuitOpened => "revenprox_circuit_opened",
            Metric::CircuitClosed => "revenprox_circuit_closed",
            Metric::CircuitRejected => "revenprox_circuit_rejected",
            Metric::OpenStreams => "revenprox_open_streams",
            Metric::HeartbeatsSent => "revenprox_heartbeats_sent",
            Metric::ChallengesSent => "revenprox_challenges_sent",
            Metric::Reauthorizations => "revenprox_reauthorizations",
            Metric::StreamsExpired => "revenprox_streams_expired",
            Metric::Reverifications => "revenprox_reverifications",
            Metric::ReverifyFailures => "revenprox_reverify_failures",
            Metric::StreamsRevoked => "revenprox_streams_revoked",
            Metric::Revocations => "revenprox_revocations",
            Metric::PresenceFull => "revenprox_presence_full",
            Metric::OtherPaths => "revenprox_other_paths",
            Metric::ClientCircuitOpened => "revenprox_client_circuit_opened",
            Metric::ClientCircuitRejected => "revenprox_client_circuit_rejected",
            Metric::UserIdNotSub => "revenprox_user_id_not_sub",
            Metric::StreamsEncoded => "revenprox_streams_encoded",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            // Revocations: written by the host store directly, as a mirror every worker reads.
            Metric::CircuitState | Metric::OpenStreams | Metric::Revocations => Kind::Gauge,
            Metric::WebhookLatencyMs => Kind::Histogram,
            _ => Kind::Counter,
        }
    }

    /// The counter of local answers with `code`.
    pub fn denied(code: Code) -> Metric {
        match code {
            Code::MissingToken => Metric::DeniedMissingToken,
            Code::MalformedAuthorization => Metric::DeniedMalformedAuthorization,
            Code::InvalidToken => Metric::DeniedInvalidToken,
            Code::NoTopic => Metric::DeniedNoTopic,
            Code::UserMismatch => Metric::DeniedUserMismatch,
            Code::RateLimited => Metric::DeniedRateLimited,
            Code::TooManyStreams => Metric::DeniedTooManyStreams,
            Code::AuthUnavailable => Metric::DeniedAuthUnavailable,
        }
    }

    /// The counter of webhook failures of this kind.
    pub fn webhook_failure(failure: Failure) -> Metric {
        match failure {
            Failure::Status(_) => Metric::WebhookFailuresStatus,
            Failure::Malformed => Metric::WebhookFailuresMalformed,
            Failure::NoResponse => Metric::WebhookFailuresReset,
            Failure::Timeout => Metric::WebhookFailuresTimeout,
        }
    }
}

/// One change of a metric, for the host to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// Add to a counter, or move a gauge.
    Add(Metric, i64),
    /// Set a gauge.
    Set(Metric, u64),
    /// Record a histogram sample.
    Record(Metric, u64),
}

/// Metric changes since the host last drained them: counter and gauge deltas summed per metric,
/// gauge values and histogram samples in order.
#[derive(Debug, Clone)]
pub struct Tally {
    deltas: [i64; ALL.len()],
    dirty: bool,
    other: Vec<Update>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally { deltas: [0; ALL.len()], dirty: false, other: Vec::new() }
    }
}

impl Tally {
    pub fn add(&mut self, metric: Metric, delta: i64) {
        if let Some(d) = self.deltas.get_mut(metric as usize) {
            *d = d.saturating_add(delta);
            self.dirty = true;
        }
    }

    pub fn inc(&mut self, metric: Metric) {
        self.add(metric, 1);
    }

    pub fn set(&mut self, metric: Metric, value: u64) {
        self.other.push(Update::Set(metric, value));
    }

    pub fn record(&mut self, metric: Metric, value: u64) {
        self.other.push(Update::Record(metric, value));
    }

    /// Every change since the last drain (deltas first, in `ALL` order), and resets the tally.
    pub fn drain(&mut self) -> Vec<Update> {
        let mut out = Vec::new();
        if self.dirty {
            for (metric, d) in ALL.iter().zip(self.deltas.iter_mut()) {
                if *d != 0 {
                    out.push(Update::Add(*metric, *d));
                    *d = 0;
                }
            }
            self.dirty = false;
        }
        out.append(&mut self.other);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_complete_and_ordered() {
        for (i, m) in ALL.iter().enumerate() {
            assert_eq!(*m as usize, i, "{m:?}");
            assert!(m.name().starts_with("revenprox_"));
        }
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for code in Code::ALL {
            assert_eq!(Metric::denied(code).name(), format!("revenprox_denied_{}", code.as_str()));
        }
    }

    #[test]
    fn every_metric_is_in_the_readme() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("## Metrics").unwrap();
        let table = &readme[start..];
        let table = &table[..table.find("\n## ").unwrap_or(table.len())];
        for m in ALL {
            assert!(table.contains(&format!("`{}`", m.name())), "README metrics table lacks {}", m.name());
        }
    }

    #[test]
    fn drain_sums_deltas_and_keeps_samples() {
        let mut t = Tally::default();
        t.inc(Metric::Requests);
        t.inc(Metric::Requests);
        t.add(Metric::OpenStreams, -1);
        t.record(Metric::WebhookLatencyMs, 7);
        t.set(Metric::CircuitState, 1);
        assert_eq!(
            t.drain(),
            vec![
                Update::Add(Metric::Requests, 2),
                Update::Add(Metric::OpenStreams, -1),
                Update::Record(Metric::WebhookLatencyMs, 7),
                Update::Set(Metric::CircuitState, 1),
            ]
        );
        assert!(t.drain().is_empty());
    }
}
