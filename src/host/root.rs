//! Root context (one per worker VM, plus one on Envoy's main thread): parses and validates the
//! configuration, defines the metrics, creates the Envoy-wide shared state, and runs the worker's
//! timer (webhook retries).

use super::metrics::Metrics;
use super::now_ms;
use super::sessions;
use super::shared;
use super::stream::Stream;
use super::worker::{self, Worker, WorkerRef};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use revenprox_core::config;
use std::cell::RefCell;
use std::rc::Rc;

/// Registers this VM's release queue under a name no other VM uses (a queue is delivered to the
/// last context that registered its name, so names must not collide across workers). The name is
/// random (WASI `random_get` seeds `RandomState`), which needs no shared counter and no CAS.
fn register_release_queue() -> Option<u32> {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    let name = format!("revenprox.release.{:016x}", h.finish());
    match hostcalls::register_shared_queue(&name) {
        Ok(id) => Some(id),
        Err(status) => {
            log::warn!("revenprox: no release queue ({status:?}): heartbeats only ride on upstream chunks");
            None
        }
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
            worker::answered(w, token, num_headers, body_size, now_ms());
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
        if cfg.development_mode() {
            log::warn!(
                "revenprox: DEVELOPMENT MODE: jwt_verifier.require_authentication is false and no \
                 webhook_url is set; every request passes unauthenticated. Never run this in production."
            );
        } else if !cfg.verifier.require_authentication {
            log::warn!(
                "revenprox: jwt_verifier.require_authentication is false: requests without a token \
                 pass unauthenticated; requests with one are verified"
            );
        }
        shared::init(cfg.verifier.rate_limit_per_sec, now_ms());
        let mut worker = Worker::new(Rc::new(cfg), Metrics::define(), self.id);
        worker.sessions.queue = register_release_queue();
        self.worker = Some(Rc::new(RefCell::new(worker)));
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        sessions::drain(queue_id);
    }

    fn on_tick(&mut self) {
        if let Some(w) = &self.worker {
            worker::tick(w, now_ms());
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(context_id, self.worker.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
