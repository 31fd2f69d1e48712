//! Server-Sent-Events streams, free of host calls: where the filter may put its own bytes into an
//! upstream event stream (`framing`) and what it must put there when (`session`).

pub mod framing;
pub mod registry;
pub mod session;
