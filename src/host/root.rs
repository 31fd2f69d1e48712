//! Root context: parses and validates the configuration once per VM, defines the metrics, and
//! hands each HTTP stream a shared reference to both.

use super::metrics::Metrics;
use super::stream::Stream;
use crate::config::{self, Config};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;

#[derive(Default)]
pub struct Root {
    config: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match config::parse(&raw) {
            Ok(cfg) => {
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
                self.metrics = Rc::new(Metrics::define());
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                log::error!("revenprox: invalid plugin configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream::new(self.config.clone(), Rc::clone(&self.metrics))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
