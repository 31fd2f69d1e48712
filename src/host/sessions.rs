//! SSE sessions on one worker: every `text/event-stream` response of a verified (or development
//! mode) request gets a session that injects heartbeats, the challenge and the final `expired`
//! event, and takes the new expiry of a re-authorization.
//!
//! How bytes get into a live response (see `docs/envoy-host.md`): Envoy only
//! lets the filter write into a response body while it holds that body. So every upstream chunk is
//! held (the body callback returns `Pause`) and released at once through the worker's own shared
//! queue (`on_queue_ready` runs on the same thread microseconds later). Between chunks the stream
//! stays in that holding state, so a timer can append an injection and release it. Bodies over
//! `HOLD_MAX` (floods) are not held: injections then wait for the next (small) chunk. Injections go
//! only where `Framing` says an upstream event has ended; one due while an event is half through
//! waits for the chunk that ends it and is spliced in right after that event.

use super::abi;
use super::metrics::Metrics;
use super::shared;
use super::worker::WorkerRef;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, MapType};
use revenprox_core::config::Config;
use revenprox_core::sse::framing::{self, Framing};
use revenprox_core::sse::registry;
use revenprox_core::sse::session::{Injection, Session};
use std::collections::{HashMap, HashSet};

/// Who a verified request belongs to, kept from the verdict until its response headers arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub topic_id: String,
    pub expires_at: u64,
}

struct Live {
    session: Session,
    framing: Framing,
    /// The stream's identity and its registry key (none in development mode).
    identity: Option<(Identity, registry::Key)>,
    /// Due but waiting for the end of an upstream event.
    pending: Option<Injection>,
    pending_since_ms: u64,
    /// Envoy holds this response's body buffer (a chunk went through the hold-and-release path).
    held: bool,
    /// `event: expired` went out; the stream is ended at this time (after the bytes are flushed).
    close_at_ms: Option<u64>,
    presence_ms: u64,
}

/// How long an `expired` event may wait for an upstream event to end before the stream is ended
/// without it.
const EXPIRED_WAIT_MS: u64 = 2_000;
/// Bytes read from the end of a chunk when only its end state is needed.
const TAIL_BYTES: usize = 64;
/// Largest body (everything Envoy buffers for the stream, the new chunk included) that is held.
/// A held body is Envoy's `StopIterationAndBuffer`: while the release is queued Envoy keeps reading
/// the upstream into it, and past its buffer limit (1 MiB by default) it resets the stream
/// (`rs_too_large`). Only a fast upstream delivers this much at once, and then no heartbeat is due,
/// so larger bodies go straight through; the next small chunk is held again. A read landing on a
/// small held chunk is bounded by the upstream cluster's buffer limit, which the template sets well
/// below the listener's (README, "Floods").
const HOLD_MAX: usize = 64 * 1024;
/// Time given to an `expired` event to reach the client before the stream is reset.
const CLOSE_DELAY_MS: u64 = 100;
/// Streams inside this margin before their challenge look for a re-authorization every tick.
const REAUTH_LOOKAHEAD_SEC: u64 = 5;

#[derive(Default)]
pub struct Sessions {
    live: HashMap<u32, Live>,
    identities: HashMap<u32, Identity>,
    /// This worker's release queue.
    pub queue: Option<u32>,
    /// Earliest time any session needs the timer.
    next_ms: Option<u64>,
}

impl Sessions {
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.next_ms
    }

    fn want(&mut self, at: Option<u64>) {
        if let Some(at) = at {
            self.next_ms = Some(self.next_ms.map_or(at, |n| n.min(at)));
        }
    }
}

fn is_event_stream(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| {
        let v = v.trim_ascii_start();
        v.len() >= 17 && v.get(..17).is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// A request was allowed: remember who it is for its response.
pub fn allowed(w: &WorkerRef, ctx: u32, identity: Identity) {
    w.borrow_mut().sessions.identities.insert(ctx, identity);
}

fn reauth_window_start_ms(cfg: &Config, live: &Live) -> Option<u64> {
    live.identity.as_ref()?;
    let exp = live.session.expires_at_sec()?;
    Some(
        exp.saturating_sub(cfg.sse.challenge_before_expiry_sec)
            .saturating_sub(REAUTH_LOOKAHEAD_SEC)
            .saturating_mul(1000),
    )
}

/// Response headers: start a session when the upstream answers with an event stream.
pub fn open(w: &WorkerRef, ctx: u32, now_ms: u64) {
    let identity = w.borrow_mut().sessions.identities.remove(&ctx);
    let headers = abi::headers(MapType::HttpResponseHeaders).unwrap_or_default();
    if abi::find(&headers, ":status") != Some(b"200") || !is_event_stream(abi::find(&headers, "content-type"))
    {
        return;
    }
    // Injected bytes change the length: let Envoy frame the body itself.
    if abi::find(&headers, "content-length").is_some() {
        let _ = abi::remove_header(MapType::HttpResponseHeaders, "content-length");
    }
    let mut wb = w.borrow_mut();
    let session = Session::new(&wb.cfg.sse, now_ms, identity.as_ref().map(|i| i.expires_at));
    let identity = identity.map(|i| {
        let key = registry::key(&i.user_id, &i.topic_id);
        (i, key)
    });
    // The registry entry is written by the first tick (within MIN_TICK_MS), not here: a stream
    // that ends before then (a short response) never costs shared-data work.
    let live = Live {
        session,
        framing: Framing::new(),
        identity,
        pending: None,
        pending_since_ms: 0,
        held: false,
        close_at_ms: None,
        presence_ms: 0,
    };
    let deadline = if live.identity.is_some() { Some(now_ms) } else { live.session.next_deadline_ms() };
    wb.sessions.live.insert(ctx, live);
    wb.sessions.want(deadline);
    Metrics::inc_by(wb.metrics.open_streams, 1);
}

/// A chunk of the upstream body: observe its framing, splice in a waiting injection at the end of
/// an event, and hold it for release through the queue (so the buffer stays writable).
pub fn body(w: &WorkerRef, ctx: u32, size: usize, end_of_stream: bool, now_ms: u64) -> Action {
    let mut wb = w.borrow_mut();
    let queue = wb.sessions.queue;
    let metrics = wb.metrics.clone();
    let Some(live) = wb.sessions.live.get_mut(&ctx) else {
        return Action::Continue;
    };
    if live.session.finished() {
        // `event: expired` went out: nothing of the upstream follows it.
        let _ = abi::replace_body(size, b"");
        return Action::Continue;
    }
    // With nothing waiting to be injected only the chunk's end state matters: read its last bytes
    // instead of scanning all of it (a flood delivers up to a megabyte per chunk).
    let tail_read = size > TAIL_BYTES && live.pending.is_none() && {
        let start = size - TAIL_BYTES;
        let tail = abi::buffer_at(BufferType::HttpResponseBody, start, TAIL_BYTES).unwrap_or_default();
        tail.len() == TAIL_BYTES && live.framing.advance(size, &tail)
    };
    if tail_read {
        live.session.on_sent(now_ms, true);
    } else if size > 0 {
        let chunk = abi::buffer(BufferType::HttpResponseBody, size).unwrap_or_default();
        let boundary = live.framing.feed(&chunk);
        if let (Some(injection), Some(at)) = (live.pending, boundary) {
            let spliced = framing::splice(&chunk, at, injection.bytes());
            if abi::replace_body(chunk.len(), &spliced).is_ok() {
                live.pending = None;
                sent(live, &metrics, injection, now_ms);
            }
        }
        live.session.on_sent(now_ms, true);
    }
    if end_of_stream || size > HOLD_MAX {
        live.held = false;
        return Action::Continue;
    }
    let Some(queue) = queue else {
        live.held = false;
        return Action::Continue;
    };
    if hostcalls::enqueue_shared_queue(queue, Some(&ctx.to_le_bytes())).is_err() {
        live.held = false;
        return Action::Continue;
    }
    live.held = true;
    Action::Pause
}

fn sent(live: &mut Live, metrics: &Metrics, injection: Injection, now_ms: u64) {
    live.session.mark_sent(injection, now_ms);
    match injection {
        Injection::Heartbeat => Metrics::inc(metrics.heartbeats),
        Injection::Challenge => Metrics::inc(metrics.challenges),
        Injection::Expired(_) => {
            Metrics::inc(metrics.streams_expired);
            live.close_at_ms = Some(now_ms.saturating_add(CLOSE_DELAY_MS));
        }
    }
}

/// The queue says: let stream `ctx`'s held bytes go.
pub fn release(ctx: u32) {
    if hostcalls::set_effective_context(ctx).is_ok() {
        let _ = abi::resume_response();
    }
}

/// Drains this worker's queue.
pub fn drain(queue: u32) {
    while let Ok(Some(message)) = hostcalls::dequeue_shared_queue(queue) {
        if let Ok(bytes) = <[u8; 4]>::try_from(message.as_slice()) {
            release(u32::from_le_bytes(bytes));
        }
    }
}

/// Timer: injections that are due, re-authorizations to pick up, registry refreshes, ends.
pub fn tick(w: &WorkerRef, now_ms: u64) {
    let mut wb = w.borrow_mut();
    let cfg = std::rc::Rc::clone(&wb.cfg);
    let metrics = wb.metrics.clone();
    let mut refreshed: HashSet<registry::Key> = HashSet::new();
    let mut next: Option<u64> = None;
    let mut want = |at: u64| next = Some(next.map_or(at, |n: u64| n.min(at)));
    for (&ctx, live) in wb.sessions.live.iter_mut() {
        if let Some(at) = live.close_at_ms {
            if now_ms >= at {
                live.close_at_ms = None;
                if hostcalls::set_effective_context(ctx).is_ok() {
                    let _ = abi::close_response();
                }
            } else {
                want(at);
            }
            continue;
        }
        if let Some((_, key)) = &live.identity {
            if now_ms.saturating_sub(live.presence_ms) >= registry::REFRESH_MS {
                if refreshed.insert(*key) {
                    shared::registry_touch(key, now_ms);
                }
                live.presence_ms = now_ms;
            }
            want(live.presence_ms.saturating_add(registry::REFRESH_MS));
            if let Some(start) = reauth_window_start_ms(&cfg, live) {
                if now_ms >= start {
                    if let Some(entry) = shared::registry_get(key, now_ms) {
                        if live.session.extend(entry.expires_at) {
                            log::debug!("revenprox: stream {ctx} re-authorized until {}", entry.expires_at);
                        }
                    }
                    want(now_ms.saturating_add(1000));
                } else {
                    want(start);
                }
            }
        }
        if let Some(due) = live.session.due(now_ms) {
            // An earlier injection still waiting is superseded by a more important one.
            let injection = match live.pending {
                Some(Injection::Expired(r)) => Injection::Expired(r),
                _ => due,
            };
            if live.pending.is_none() {
                live.pending_since_ms = now_ms;
            }
            live.pending = Some(injection);
        }
        if let Some(injection) = live.pending {
            let written = live.held
                && live.framing.at_boundary()
                && hostcalls::set_effective_context(ctx).is_ok()
                && abi::append_body(injection.bytes()).is_ok()
                && abi::resume_response().is_ok();
            if written {
                live.pending = None;
                sent(live, &metrics, injection, now_ms);
            } else if matches!(injection, Injection::Expired(_))
                && (!live.held || now_ms.saturating_sub(live.pending_since_ms) >= EXPIRED_WAIT_MS)
            {
                // Nowhere to write the event (no body yet, or an upstream event never ends):
                // end the stream without it.
                live.pending = None;
                live.session.mark_sent(injection, now_ms);
                Metrics::inc(metrics.streams_expired);
                if hostcalls::set_effective_context(ctx).is_ok() {
                    let _ = abi::close_response();
                }
                continue;
            } else {
                want(now_ms.saturating_add(100));
            }
        }
        if let Some(at) = live.close_at_ms {
            want(at);
        }
        if let Some(at) = live.session.next_deadline_ms() {
            want(at);
        }
    }
    wb.sessions.next_ms = next;
}

/// A re-authorization on this worker: its streams of that user and topic take the new expiry at
/// once (other workers pick it up from the registry).
pub fn extend_local(w: &WorkerRef, key: &registry::Key, expires_at: u64) {
    let mut wb = w.borrow_mut();
    for live in wb.sessions.live.values_mut() {
        if live.identity.as_ref().is_some_and(|(_, k)| k == key) {
            live.session.extend(expires_at);
        }
    }
    wb.sessions.next_ms = Some(0);
}

/// Whether this worker has an open stream with registry key `key`.
pub fn has_local(w: &WorkerRef, key: &registry::Key) -> bool {
    w.borrow().sessions.live.values().any(|l| l.identity.as_ref().is_some_and(|(_, k)| k == key))
}

/// The stream ended.
pub fn close(w: &WorkerRef, ctx: u32) {
    let mut wb = w.borrow_mut();
    wb.sessions.identities.remove(&ctx);
    if wb.sessions.live.remove(&ctx).is_some() {
        Metrics::inc_by(wb.metrics.open_streams, -1);
    }
}
