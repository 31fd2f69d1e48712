//! The host edge: the only code that calls proxy-wasm. Each callback becomes one event for the
//! worker's engine (`revenprox_core::engine`, pure and tested natively); `apply` then performs the
//! effects the engine returns, with the engine no longer borrowed. No policy lives here.

mod abi;
mod apply;
mod metrics;
pub mod root;
mod shared;
mod stream;

use revenprox_core::engine::Engine;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// One worker VM's state, shared by its root context and its HTTP streams.
pub struct Worker {
    pub engine: RefCell<Engine<shared::HostStore>>,
    pub metrics: metrics::MetricIds,
    /// This worker's release queue.
    pub queue: Option<u32>,
}

pub type WorkerRef = Rc<Worker>;

/// Host time in Unix milliseconds (0 if the host cannot tell, which fails every expiry check
/// safely: cached entries and verdicts are judged against a time long past).
fn now_ms() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
