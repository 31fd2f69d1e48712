//! Root context (one per worker VM, plus one on Envoy's main thread): parses the configuration,
//! defines the metrics, registers the worker's release queue, builds the worker's engine, and turns
//! the timer, the queue and the webhook answers made from the timer into engine events.

use super::metrics::MetricIds;
use super::shared::HostStore;
use super::stream::Stream;
use super::{abi, apply, now_ms, Worker, WorkerRef};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use revenprox_core::auth::verdict::MAX_BODY;
use revenprox_core::config;
use revenprox_core::engine::metrics::Metric;
use revenprox_core::engine::{Engine, Flow, Level};
use std::cell::RefCell;
use std::rc::Rc;

/// A random number (WASI `random_get` seeds `RandomState`): ids that must differ between the
/// worker VMs of one Envoy without a shared counter or a CAS.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// Registers this VM's release queue under a name no other VM uses (a queue is delivered to the
/// last context that registered its name, so names must not collide across workers).
fn register_release_queue() -> Option<u32> {
    let name = format!("revenprox.release.{:016x}", random());
    match hostcalls::register_shared_queue(&name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("revenprox: no release queue ({status:?}): heartbeats only ride on upstream chunks");
            None
        }
    }
}

fn log_line(level: Level, line: &str) {
    match level {
        Level::Debug => log::debug!("{line}"),
        Level::Info => log::info!("{line}"),
        Level::Warn => log::warn!("{line}"),
        Level::Error => log::error!("{line}"),
    }
}

pub struct Root {
    id: u32,
    worker: Option<WorkerRef>,
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root { id, worker: None }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(w) = &self.worker {
            let (status, body) = abi::call_answer(num_headers, body_size, MAX_BODY + 1);
            let now = now_ms();
            w.engine.borrow_mut().call_answered(token, status, &body, now);
            apply::run(w, self.id, Flow::Continue, now);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let cfg = match config::parse(&raw) {
            Ok(cfg) => cfg,
            Err(e) => {
                log::error!("revenprox: invalid plugin configuration: {e}");
                return false;
            }
        };
        for (level, line) in cfg.startup_lines() {
            log_line(level, &line);
        }
        let debug = matches!(hostcalls::get_log_level(), Ok(LogLevel::Trace | LogLevel::Debug));
        let queue = register_release_queue();
        let now = now_ms();
        let metrics = MetricIds::define();
        let mut store = HostStore {
            prefix: revenprox_core::shared::namespace(&raw),
            revocations: metrics.id(Metric::Revocations),
            mirror_works: false,
            salt: [0; 16],
        };
        store.mirror_works = store.probe_mirror();
        if !store.mirror_works {
            log::warn!(
                "revenprox: Envoy's stats configuration drops the revenprox_revocations stat: each cache hit \
                 of a worker reads the revocation count from shared data instead (slower, as correct)"
            );
        }
        // Random (std's RandomState draws on the host's random source), unless another worker of
        // this Envoy wrote one already.
        let candidate = (u128::from(random()) << 64 | u128::from(random())).to_le_bytes();
        revenprox_core::shared::agree_salt(&mut store, candidate);
        let worker_id = u32::try_from(random() >> 32).unwrap_or(0);
        let engine = Engine::new(cfg, store, self.id, worker_id, queue.is_some(), debug, now);
        let worker = Rc::new(Worker { engine: RefCell::new(engine), metrics, queue });
        apply::run(&worker, self.id, Flow::Continue, now);
        self.worker = Some(worker);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let Some(w) = &self.worker else {
            return;
        };
        let now = now_ms();
        // Envoy calls this once per message: take that (empty) message off the queue. An empty
        // message costs no allocation inside the VM, unlike one that carries bytes.
        let _ = abi::dequeue(queue_id);
        w.engine.borrow_mut().released(now);
        apply::run(w, self.id, Flow::Continue, now);
    }

    fn on_tick(&mut self) {
        if let Some(w) = &self.worker {
            let now = now_ms();
            w.engine.borrow_mut().tick(now);
            apply::run(w, self.id, Flow::Continue, now);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
