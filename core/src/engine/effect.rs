//! What the engine asks the host to do, and what the host reports back.
//!
//! Every effect names the stream context it acts on: the host makes it the effective context
//! before acting, and performs effects only after the engine's borrow is released. Effects whose
//! outcome matters to the engine come back as a `Receipt`.

use crate::auth::reply::Reply;
pub use crate::logline::Level;
use crate::resilience::flight::FlightKey;

/// A proxy-wasm context id (a stream, or a worker's root context).
pub type Ctx = u32;

/// What the host callback returns to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop here: a verdict is awaited, a local reply was sent, or a chunk is held.
    Pause,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Remove a request header (every value of it).
    RemoveRequestHeader { ctx: Ctx, name: String },
    /// Set a request header (replacing every value of it).
    SetRequestHeader { ctx: Ctx, name: String, value: Vec<u8> },
    /// Let a paused request go on to the upstream.
    ResumeRequest { ctx: Ctx },
    /// Answer locally with one of the filter's JSON refusals; the request goes no further.
    Reply { ctx: Ctx, reply: Reply },
    /// Answer a challenge response with `204 No Content`.
    NoContent { ctx: Ctx },
    /// Remove a response header.
    RemoveResponseHeader { ctx: Ctx, name: &'static str },
    /// Replace the response chunk being delivered (`size` bytes) with `bytes`. Only inside that
    /// chunk's body callback. Receipt: `Written` or `Failed`.
    ReplaceChunk { ctx: Ctx, size: usize, bytes: Vec<u8> },
    /// Append `bytes` to the response body the host holds for the stream and release it.
    /// Receipt: `Written` or `Failed`.
    Inject { ctx: Ctx, bytes: &'static [u8] },
    /// Release a held response chunk.
    ResumeResponse { ctx: Ctx },
    /// Ask for a callback on this worker (an empty message on the worker's release queue, which
    /// the host answers with `Engine::released`) that releases the chunk `ctx` holds, and every
    /// chunk held until then. Receipt on failure only.
    Enqueue { ctx: Ctx },
    /// End the stream (both directions).
    Close { ctx: Ctx },
    /// Record on the stream how it ended (`revenprox_end`), for Envoy's access log
    /// (`%FILTER_STATE(wasm.revenprox_end:PLAIN)%`).
    SetEnd { ctx: Ctx, reason: &'static str },
    /// Call the webhook for flight `key`, from context `from` (the context whose callback is
    /// running: its answer comes back there). Receipt: `Dispatched`.
    Dispatch { from: Ctx, key: FlightKey, call: WebhookCall },
    /// Run the worker's timer every `ms` milliseconds (0 stops it).
    SetTick { ms: u64 },
    /// One log line.
    Log { level: Level, message: String },
}

impl Effect {
    /// The context the effect acts on.
    pub fn ctx(&self) -> Option<Ctx> {
        match self {
            Effect::RemoveRequestHeader { ctx, .. }
            | Effect::SetRequestHeader { ctx, .. }
            | Effect::ResumeRequest { ctx }
            | Effect::Reply { ctx, .. }
            | Effect::NoContent { ctx }
            | Effect::RemoveResponseHeader { ctx, .. }
            | Effect::ReplaceChunk { ctx, .. }
            | Effect::Inject { ctx, .. }
            | Effect::ResumeResponse { ctx }
            | Effect::Enqueue { ctx }
            | Effect::Close { ctx }
            | Effect::SetEnd { ctx, .. } => Some(*ctx),
            Effect::Dispatch { from, .. } => Some(*from),
            Effect::SetTick { .. } | Effect::Log { .. } => None,
        }
    }
}

/// One webhook call: the request the host sends (contract "Webhook call").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCall {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub body: String,
    pub timeout_ms: u64,
}

/// What the host reports after performing an effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// `Dispatch` for `key` from `from` was made (`Some(token)`: the host's call token) or
    /// refused (`None`).
    Dispatched { key: FlightKey, from: Ctx, token: Option<u32> },
    /// `Inject` or `ReplaceChunk` reached the stream.
    Written { ctx: Ctx },
    /// The host could not perform this effect (the stream may be gone).
    Failed(Effect),
}
