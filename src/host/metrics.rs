//! The filter's metrics, as Envoy stats. Names carry the `revenprox_` prefix; Envoy shows
//! wasm-defined stats at `/stats/prometheus` under exactly those names (it strips its
//! `wasmcustom.` namespace). The README's metrics table lists each with its meaning.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use revenprox_core::auth::reply::Code;
use revenprox_core::auth::verdict::Failure;

type Id = Option<u32>;

#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub requests: Id,
    pub allowed: Id,
    pub denied: [Id; 7],
    pub cache_hits: Id,
    pub cache_misses: Id,
    pub webhook_calls: Id,
    pub webhook_retries: Id,
    pub webhook_failures: Id,
    /// By kind: status, malformed, reset, timeout.
    pub webhook_failures_by: [Id; 4],
    pub webhook_latency_ms: Id,
    pub singleflight_joins: Id,
    pub rate_limited: Id,
    pub circuit_state: Id,
    pub circuit_opened: Id,
    pub circuit_closed: Id,
    pub circuit_rejected: Id,
    pub open_streams: Id,
    pub heartbeats: Id,
    pub challenges: Id,
    pub reauthorizations: Id,
    pub streams_expired: Id,
}

const FAILURE_KINDS: [&str; 4] = ["status", "malformed", "reset", "timeout"];

fn define(kind: MetricType, name: &str) -> Id {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("revenprox: metric {name} could not be defined: {status:?}");
            None
        }
    }
}

impl Metrics {
    pub fn define() -> Metrics {
        let c = |n: &str| define(MetricType::Counter, &format!("revenprox_{n}"));
        let mut denied = [None; Code::ALL.len()];
        for (slot, code) in denied.iter_mut().zip(Code::ALL) {
            *slot = c(&format!("denied_{}", code.as_str()));
        }
        let mut failures_by = [None; 4];
        for (slot, kind) in failures_by.iter_mut().zip(FAILURE_KINDS) {
            *slot = c(&format!("webhook_failures_{kind}"));
        }
        Metrics {
            requests: c("requests"),
            allowed: c("allowed"),
            denied,
            cache_hits: c("cache_hits"),
            cache_misses: c("cache_misses"),
            webhook_calls: c("webhook_calls"),
            webhook_retries: c("webhook_retries"),
            webhook_failures: c("webhook_failures"),
            webhook_failures_by: failures_by,
            webhook_latency_ms: define(MetricType::Histogram, "revenprox_webhook_latency_ms"),
            singleflight_joins: c("singleflight_joins"),
            rate_limited: c("rate_limited"),
            circuit_state: define(MetricType::Gauge, "revenprox_circuit_state"),
            circuit_opened: c("circuit_opened"),
            circuit_closed: c("circuit_closed"),
            circuit_rejected: c("circuit_rejected"),
            open_streams: define(MetricType::Gauge, "revenprox_open_streams"),
            heartbeats: c("heartbeats_sent"),
            challenges: c("challenges_sent"),
            reauthorizations: c("reauthorizations"),
            streams_expired: c("streams_expired"),
        }
    }

    pub fn inc(id: Id) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// Adds to a counter or moves a gauge (negative offsets lower a gauge).
    pub fn inc_by(id: Id, offset: i64) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, offset);
        }
    }

    /// Sets a gauge or records a histogram sample.
    pub fn record(id: Id, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn denied(&self, code: Code) {
        let index = Code::ALL.iter().position(|c| *c == code);
        Self::inc(index.and_then(|i| self.denied.get(i).copied().flatten()));
    }

    pub fn webhook_failure(&self, failure: Failure) {
        Self::inc(self.webhook_failures);
        let index = FAILURE_KINDS.iter().position(|k| *k == failure.label());
        Self::inc(index.and_then(|i| self.webhook_failures_by.get(i).copied().flatten()));
    }
}
