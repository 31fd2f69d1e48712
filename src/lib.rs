//! RevenProx for Envoy: a proxy-wasm HTTP filter that guards Server-Sent-Events topics with JWTs
//! verified by an auth webhook.
//!
//! This crate is the host shell: `host` turns proxy-wasm callbacks into events for the core's
//! engine (`revenprox_core`, plain Rust, tested natively) and performs the effects it returns. It
//! compiles to something only for wasm32.

#[cfg(target_arch = "wasm32")]
mod host;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    // Envoy drops lines below its own `wasm` log level; the SDK must not drop them first. The
    // engine writes its per-stream debug lines only when Envoy's level is debug or trace.
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Debug);
    proxy_wasm::set_root_context(|id| Box::new(host::root::Root::new(id)));
}}
