//! Root context (one per worker VM, plus one on Envoy's main thread): parses and validates the
//! configuration, defines the metrics, creates the Envoy-wide shared state, and runs the worker's
//! timer (webhook retries).

use super::metrics::Metrics;
use super::now_ms;
use super::shared;
use super::stream::Stream;
use super::worker::{self, Worker, WorkerRef};
use crate::config;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::cell::RefCell;
use std::rc::Rc;

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
        self.worker = Some(Rc::new(RefCell::new(Worker::new(Rc::new(cfg), Metrics::define(), self.id))));
        true
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
