//! RevenProx for Envoy: a proxy-wasm HTTP filter that guards Server-Sent-Events topics with JWTs
//! verified by an auth webhook.
//!
//! Two layers: the core (`config`, `auth`) is plain Rust, takes time as an argument and is
//! unit-tested natively; `host` is the only code that talks to proxy-wasm, and is compiled only for
//! wasm32.

pub mod auth;
pub mod config;
pub mod resilience;
pub mod sse;

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|id| Box::new(host::root::Root::new(id)));
}}
