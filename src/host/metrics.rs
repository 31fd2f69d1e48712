//! The filter's metrics as Envoy stats: each of the core's metrics (`engine::metrics::ALL`, names
//! with the `revenprox_` prefix) is defined once per VM, and the engine's tally is applied after
//! every callback. Envoy shows wasm-defined stats at `/stats/prometheus` under exactly those names
//! (it strips its `wasmcustom.` namespace).

use super::abi;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use revenprox_core::engine::metrics::{Kind, Update, ALL};

pub struct MetricIds {
    ids: [Option<u32>; ALL.len()],
}

impl MetricIds {
    pub fn define() -> MetricIds {
        let mut ids = [None; ALL.len()];
        for (slot, metric) in ids.iter_mut().zip(ALL) {
            let kind = match metric.kind() {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            *slot = match hostcalls::define_metric(kind, metric.name()) {
                Ok(id) => Some(id),
                Err(status) => {
                    log::warn!("revenprox: metric {} could not be defined: {status:?}", metric.name());
                    None
                }
            };
        }
        MetricIds { ids }
    }

    pub fn apply(&self, updates: &[Update]) {
        for update in updates {
            let (metric, result) = match *update {
                Update::Add(m, delta) => (m, self.id(m).map(|id| abi::increment_metric(id, delta))),
                Update::Set(m, value) | Update::Record(m, value) => {
                    (m, self.id(m).map(|id| abi::record_metric(id, value)))
                }
            };
            if let Some(Err(status)) = result {
                log::debug!("revenprox: metric {} not updated: {status:?}", metric.name());
            }
        }
    }

    pub fn id(&self, metric: revenprox_core::engine::metrics::Metric) -> Option<u32> {
        self.ids.get(metric as usize).copied().flatten()
    }
}
