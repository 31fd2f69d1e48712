//! RevenProx's core: everything the filter decides, as plain Rust with no proxy-wasm dependency.
//! Time is an argument, Envoy-wide state is reached through the narrow `shared::SharedStore`
//! trait, and `cargo test` runs all of it natively. The cdylib shell (`../src`) only turns host
//! callbacks into engine events and performs the effects the engine returns.

pub mod auth;
pub mod config;
pub mod engine;
pub mod header_name;
pub mod logline;
pub mod resilience;
pub mod shared;
pub mod slots;
pub mod sse;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
