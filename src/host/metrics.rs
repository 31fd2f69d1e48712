//! The filter's metrics, as Envoy stats. Names carry the `revenprox_` prefix; Envoy shows
//! wasm-defined stats at `/stats/prometheus` under those names.

use crate::auth::reply::Code;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub requests: Option<u32>,
    pub allowed: Option<u32>,
    pub denied: [Option<u32>; 6],
    pub cache_hits: Option<u32>,
    pub cache_misses: Option<u32>,
    pub webhook_calls: Option<u32>,
    pub webhook_failures: Option<u32>,
    pub webhook_latency_ms: Option<u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("metric {name} could not be defined: {status:?}");
            None
        }
    }
}

impl Metrics {
    pub fn define() -> Metrics {
        let c = |n: &str| define(MetricType::Counter, n);
        let mut denied = [None; 6];
        for (slot, code) in denied.iter_mut().zip(Code::ALL) {
            *slot = c(&format!("revenprox_denied_{}", code.as_str()));
        }
        Metrics {
            requests: c("revenprox_requests"),
            allowed: c("revenprox_allowed"),
            denied,
            cache_hits: c("revenprox_cache_hits"),
            cache_misses: c("revenprox_cache_misses"),
            webhook_calls: c("revenprox_webhook_calls"),
            webhook_failures: c("revenprox_webhook_failures"),
            webhook_latency_ms: define(MetricType::Histogram, "revenprox_webhook_latency_ms"),
        }
    }

    pub fn inc(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn record(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub fn denied(&self, code: Code) {
        let index = Code::ALL.iter().position(|c| *c == code);
        Self::inc(index.and_then(|i| self.denied.get(i).copied().flatten()));
    }
}
