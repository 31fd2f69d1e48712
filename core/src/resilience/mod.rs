//! Protecting the webhook: circuit breaker, rate limit, single flight and retries. Pure state
//! machines; the host stores the Envoy-wide ones in shared data and changes them by CAS.

pub mod breaker;
pub mod flight;
pub mod limiter;
