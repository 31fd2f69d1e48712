//! Server-Sent-Events streams, free of host calls: where the filter may put its own bytes into an
//! upstream event stream (`framing`), what it must put there when (`session`), and the Envoy-wide
//! bookkeeping of open streams (`presence`) and of their refreshes (`refresh`).

pub mod framing;
pub mod presence;
pub mod refresh;
pub mod session;
