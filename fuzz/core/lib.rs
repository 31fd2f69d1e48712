//! The filter's pure core, module for module as in `src/lib.rs` but without the wasm32-only host
//! edge: the fuzz targets test exactly the code that ships. A new core module in `src/lib.rs` must be
//! added here too (a `crate::` path to it fails to compile until it is).

#[path = "../../src/auth/mod.rs"]
pub mod auth;
#[path = "../../src/config.rs"]
pub mod config;
#[path = "../../src/resilience/mod.rs"]
pub mod resilience;
#[path = "../../src/sse/mod.rs"]
pub mod sse;
