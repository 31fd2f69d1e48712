//! Protecting the webhook: circuit breakers, rate limits, single flight and retries. Pure state
//! machines; the host stores the Envoy-wide and per-client ones in shared data and changes them by
//! CAS.

pub mod breaker;
pub mod clients;
pub mod flight;
pub mod limiter;
