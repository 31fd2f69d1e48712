//! Performs the engine's effects. Each callback hands its event to the engine (a short borrow),
//! then calls `run`: the engine's effects are taken out, the borrow ends, and each effect is
//! performed in order on the context it names (made the effective context explicitly). Effects
//! whose outcome the engine needs are reported back as receipts, which may produce more effects;
//! `run` goes on until the engine has none left. No host action ever runs while the engine is
//! borrowed, so a host that performed actions at once, inside the call, would find nothing
//! borrowed (Envoy 1.40 happens to defer them; docs/envoy-host.md).

use super::abi;
use super::Worker;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, Status};
use revenprox_core::engine::{Ctx, Effect, Flow, Level, Receipt};
use std::time::Duration;

/// Rounds of receipts after which `run` stops (a receipt loop would be a bug; never seen).
const MAX_ROUNDS: usize = 64;

/// Performs everything the engine wants done. `current`: the context whose callback is running
/// (effective at entry). `flow`: what the engine answered the callback; returns what the callback
/// must return (a receipt may change it, e.g. a chunk that cannot be held after all).
pub fn run(w: &Worker, current: Ctx, flow: Flow, now_ms: u64) -> Flow {
    let mut flow = flow;
    let mut effective = current;
    for _ in 0..MAX_ROUNDS {
        let effects = w.engine.borrow_mut().take_effects();
        if effects.is_empty() {
            break;
        }
        // A request whose header edit failed is refused by the engine: nothing else of this batch
        // may act on it.
        let mut abandoned: Option<Ctx> = None;
        for effect in effects {
            if let Some(ctx) = effect.ctx() {
                if abandoned == Some(ctx) {
                    continue;
                }
                if ctx != effective {
                    if hostcalls::set_effective_context(ctx).is_err() {
                        // The stream is gone (its `on_done` tells the engine).
                        continue;
                    }
                    effective = ctx;
                }
            }
            let Some(receipt) = perform(w, effect) else {
                continue;
            };
            if let Receipt::Failed(
                Effect::RemoveRequestHeader { ctx, .. } | Effect::SetRequestHeader { ctx, .. },
            ) = &receipt
            {
                abandoned = Some(*ctx);
            }
            if let Some(changed) = w.engine.borrow_mut().receipt(receipt, now_ms) {
                flow = changed;
            }
        }
    }
    let updates = w.engine.borrow_mut().take_metrics();
    w.metrics.apply(&updates);
    flow
}

fn failed_if(effect: Effect, result: Result<(), Status>) -> Option<Receipt> {
    result.is_err().then_some(Receipt::Failed(effect))
}

/// Performs one effect on the effective context; the receipt the engine asked for, if any.
fn perform(w: &Worker, effect: Effect) -> Option<Receipt> {
    match effect {
        Effect::RemoveRequestHeader { ref name, .. } => {
            let result = abi::remove_header(MapType::HttpRequestHeaders, name);
            failed_if(effect, result)
        }
        Effect::SetRequestHeader { ref name, ref value, .. } => {
            let result = abi::set_header(MapType::HttpRequestHeaders, name, value);
            failed_if(effect, result)
        }
        Effect::ResumeRequest { .. } => {
            let result = abi::resume_request();
            failed_if(effect, result)
        }
        Effect::Reply { ref reply, .. } => {
            let headers = reply.headers();
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let details = format!("revenprox_{}", reply.code.as_str());
            let result = abi::send_response(reply.code.status(), &details, &headers, reply.body().as_bytes());
            failed_if(effect, result)
        }
        Effect::NoContent { .. } => {
            let result =
                abi::send_response(204, "revenprox_refreshed", &[("cache-control", "no-store")], b"");
            failed_if(effect, result)
        }
        Effect::RemoveResponseHeader { name, .. } => {
            let _ = abi::remove_header(MapType::HttpResponseHeaders, name);
            None
        }
        Effect::ReplaceChunk { ctx, size, ref bytes } => match abi::replace_body(size, bytes) {
            Ok(()) => Some(Receipt::Written { ctx }),
            Err(_) => Some(Receipt::Failed(effect)),
        },
        Effect::Inject { ctx, bytes } => {
            match abi::append_body(bytes).and_then(|()| abi::resume_response()) {
                Ok(()) => Some(Receipt::Written { ctx }),
                Err(_) => Some(Receipt::Failed(effect)),
            }
        }
        Effect::ResumeResponse { .. } => {
            let _ = abi::resume_response();
            None
        }
        Effect::Enqueue { .. } => {
            let result = match w.queue {
                Some(queue) => abi::enqueue(queue, &[]),
                None => Err(Status::NotFound),
            };
            failed_if(effect, result)
        }
        Effect::Close { .. } => {
            let _ = abi::close_response();
            None
        }
        Effect::SetEnd { reason, .. } => {
            let _ = abi::set_property(&["revenprox_end"], reason.as_bytes());
            None
        }
        Effect::Dispatch { from, key, call } => {
            let headers = vec![
                (":method", "POST"),
                (":path", call.path.as_str()),
                (":authority", call.authority.as_str()),
                ("content-type", "application/json"),
            ];
            // Through the SDK: it routes the answer to the context that is active now (`from`).
            let token = hostcalls::dispatch_http_call(
                &call.cluster,
                headers,
                Some(call.body.as_bytes()),
                vec![],
                Duration::from_millis(call.timeout_ms),
            )
            .ok();
            Some(Receipt::Dispatched { key, from, token })
        }
        Effect::SetTick { ms } => {
            let _ = abi::set_tick_period_ms(ms);
            None
        }
        Effect::Log { level, message } => {
            match level {
                Level::Debug => log::debug!("{message}"),
                Level::Info => log::info!("{message}"),
                Level::Warn => log::warn!("{message}"),
                Level::Error => log::error!("{message}"),
            }
            None
        }
    }
}
