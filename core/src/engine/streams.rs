//! SSE streams on one worker: every `text/event-stream` response of a verified (or development
//! mode) request gets a session that injects heartbeats, the challenge and the final `expired`
//! event, and takes the new expiry of a re-authorization.
//!
//! How bytes get into a live response (docs/envoy-host.md): Envoy only lets the filter write into
//! a response body while it holds that body. So every upstream chunk is held (`Flow::Pause`) and
//! released at once through the worker's own queue (`Effect::Enqueue`, then `release`). Between
//! chunks the stream stays in that holding state, so a timer can append an injection and release
//! it. Bodies over `HOLD_MAX` (floods) are not held: injections then wait for the next (small)
//! chunk. Injections go only where `Framing` says an upstream event has ended; one due while an
//! event is half through waits for the chunk that ends it and is spliced in right after that event.

use super::effect::{Ctx, Effect, Flow, Level};
use super::metrics::Metric;
use super::Io;
use crate::config::Config;
use crate::shared::{self, SharedStore};
use crate::sse::framing::{self, Framing};
use crate::sse::registry;
use crate::sse::session::{Injection, Session};
use std::collections::{HashMap, HashSet};

/// Who a verified request belongs to, kept from the verdict until its response headers arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub topic_id: String,
    pub expires_at: u64,
}

/// Reads the response chunk being delivered (the host's body buffer).
pub trait ChunkReader {
    /// Up to `len` bytes from offset `start` of the chunk (fewer, or none, if the host has less).
    fn read(&mut self, start: usize, len: usize) -> Vec<u8>;
}

struct Live {
    session: Session,
    framing: Framing,
    /// The stream's identity and its registry key (none in development mode).
    identity: Option<(Identity, registry::Key)>,
    /// Due but waiting for the end of an upstream event.
    pending: Option<Injection>,
    pending_since_ms: u64,
    /// Handed to the host to write; its receipt decides whether it went out.
    writing: Option<Injection>,
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
pub const HOLD_MAX: usize = 64 * 1024;
/// Time given to an `expired` event to reach the client before the stream is reset.
pub const CLOSE_DELAY_MS: u64 = 100;
/// Streams inside this margin before their challenge look for a re-authorization every tick.
const REAUTH_LOOKAHEAD_SEC: u64 = 5;

pub struct Streams {
    live: HashMap<Ctx, Live>,
    identities: HashMap<Ctx, Identity>,
    /// The worker has a release queue (else chunks cannot be held).
    queue: bool,
    /// Earliest time any session needs the timer.
    next_ms: Option<u64>,
}

fn is_event_stream(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| {
        let v = v.trim_ascii_start();
        v.len() >= 17 && v.get(..17).is_some_and(|p| p.eq_ignore_ascii_case(b"text/event-stream"))
    })
}

fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
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

impl Streams {
    pub fn new(queue: bool) -> Streams {
        Streams { live: HashMap::new(), identities: HashMap::new(), queue, next_ms: None }
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.next_ms
    }

    /// Open sessions (for tests and invariants).
    pub fn open(&self) -> usize {
        self.live.len()
    }

    /// Allowed requests whose response has not started yet.
    pub fn awaiting_response(&self) -> usize {
        self.identities.len()
    }

    fn want(&mut self, at: Option<u64>) {
        if let Some(at) = at {
            self.next_ms = Some(self.next_ms.map_or(at, |n| n.min(at)));
        }
    }

    /// A request was allowed: remember who it is for its response.
    pub(crate) fn allowed(&mut self, ctx: Ctx, identity: Identity) {
        self.identities.insert(ctx, identity);
    }

    /// Response headers: start a session when the upstream answers with an event stream.
    pub(crate) fn response_headers<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        ctx: Ctx,
        headers: &[(String, Vec<u8>)],
    ) {
        let identity = self.identities.remove(&ctx);
        if find(headers, ":status") != Some(b"200") || !is_event_stream(find(headers, "content-type")) {
            return;
        }
        // Injected bytes change the length: let Envoy frame the body itself.
        if find(headers, "content-length").is_some() {
            io.out.push(Effect::RemoveResponseHeader { ctx, name: "content-length" });
        }
        let now_ms = io.now_ms;
        let session = Session::new(&io.cfg.sse, now_ms, identity.as_ref().map(|i| i.expires_at));
        let identity = identity.map(|i| {
            let key = registry::key(&i.user_id, &i.topic_id);
            (i, key)
        });
        // The registry entry is written by the first tick (within the timer's granularity), not
        // here: a stream that ends before then (a short response) never costs shared-data work.
        let live = Live {
            session,
            framing: Framing::new(),
            identity,
            pending: None,
            pending_since_ms: 0,
            writing: None,
            held: false,
            close_at_ms: None,
            presence_ms: 0,
        };
        let deadline = if live.identity.is_some() { Some(now_ms) } else { live.session.next_deadline_ms() };
        self.live.insert(ctx, live);
        self.want(deadline);
        io.tally.add(Metric::OpenStreams, 1);
    }

    /// A chunk of the upstream body: observe its framing, splice in a waiting injection at the end
    /// of an event, and hold it for release through the queue (so the buffer stays writable).
    pub(crate) fn body<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        ctx: Ctx,
        size: usize,
        end_of_stream: bool,
        reader: &mut dyn ChunkReader,
    ) -> Flow {
        let queue = self.queue;
        let Some(live) = self.live.get_mut(&ctx) else {
            return Flow::Continue;
        };
        let now_ms = io.now_ms;
        if live.session.finished() {
            // `event: expired` went out: nothing of the upstream follows it.
            io.out.push(Effect::ReplaceChunk { ctx, size, bytes: Vec::new() });
            return Flow::Continue;
        }
        // With nothing waiting to be injected only the chunk's end state matters: read its last bytes
        // instead of scanning all of it (a flood delivers up to a megabyte per chunk).
        let tail_read = size > TAIL_BYTES && live.pending.is_none() && {
            let tail = reader.read(size - TAIL_BYTES, TAIL_BYTES);
            tail.len() == TAIL_BYTES && live.framing.advance(size, &tail)
        };
        if !tail_read && size > 0 {
            let chunk = reader.read(0, size);
            let boundary = live.framing.feed(&chunk);
            if let (Some(injection), Some(at)) = (live.pending, boundary) {
                let bytes = framing::splice(&chunk, at, injection.bytes());
                io.out.push(Effect::ReplaceChunk { ctx, size: chunk.len(), bytes });
                live.pending = None;
                live.writing = Some(injection);
            }
        }
        if tail_read || size > 0 {
            live.session.on_sent(now_ms, true);
        }
        if end_of_stream || size > HOLD_MAX || !queue {
            live.held = false;
            return Flow::Continue;
        }
        io.out.push(Effect::Enqueue { ctx });
        live.held = true;
        Flow::Pause
    }

    /// The queue says: let stream `ctx`'s held bytes go.
    pub(crate) fn release<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) {
        if self.live.contains_key(&ctx) {
            io.out.push(Effect::ResumeResponse { ctx });
        }
    }

    /// An injection reached the client (receipt of `Inject` or `ReplaceChunk`).
    pub(crate) fn written<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) {
        let Some(live) = self.live.get_mut(&ctx) else {
            return;
        };
        let Some(injection) = live.writing.take() else {
            return;
        };
        sent(io, live, injection);
        let (close, next) = (live.close_at_ms, live.session.next_deadline_ms());
        self.want(close);
        self.want(next);
    }

    /// The host could not perform `effect` on one of these streams. `Some(flow)`: what the body
    /// callback running now must return instead.
    pub(crate) fn failed<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        effect: &Effect,
    ) -> Option<Flow> {
        let ctx = effect.ctx()?;
        let live = self.live.get_mut(&ctx)?;
        match effect {
            Effect::Inject { .. } | Effect::ReplaceChunk { .. } => {
                // Not written: wait again (an `Inject` that failed means the body is not held).
                if matches!(effect, Effect::Inject { .. }) {
                    live.held = false;
                }
                if let Some(injection) = live.writing.take() {
                    if live.pending.is_none() {
                        live.pending_since_ms = io.now_ms;
                    }
                    live.pending = Some(injection);
                }
                self.want(Some(io.now_ms));
                None
            }
            Effect::Enqueue { .. } => {
                // No release will come: let the chunk through now.
                live.held = false;
                Some(Flow::Continue)
            }
            _ => None,
        }
    }

    /// Timer: injections that are due, re-authorizations to pick up, registry refreshes, ends.
    pub(crate) fn tick<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>) {
        let now_ms = io.now_ms;
        let cfg = io.cfg;
        let mut refreshed: HashSet<registry::Key> = HashSet::new();
        let mut next: Option<u64> = None;
        let mut want = |at: u64| next = Some(next.map_or(at, |n: u64| n.min(at)));
        for (&ctx, live) in self.live.iter_mut() {
            if let Some(at) = live.close_at_ms {
                if now_ms >= at {
                    live.close_at_ms = None;
                    io.out.push(Effect::Close { ctx });
                } else {
                    want(at);
                }
                continue;
            }
            if let Some((_, key)) = &live.identity {
                if now_ms.saturating_sub(live.presence_ms) >= registry::REFRESH_MS {
                    if refreshed.insert(*key) {
                        shared::registry_touch(io.store, key, now_ms);
                    }
                    live.presence_ms = now_ms;
                }
                want(live.presence_ms.saturating_add(registry::REFRESH_MS));
                if let Some(start) = reauth_window_start_ms(cfg, live) {
                    if now_ms >= start {
                        if let Some(entry) = shared::registry_get(io.store, key, now_ms) {
                            live.session.extend(entry.expires_at);
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
                if live.held && live.framing.at_boundary() {
                    io.out.push(Effect::Inject { ctx, bytes: injection.bytes() });
                    live.pending = None;
                    live.writing = Some(injection);
                    // Its receipt schedules what comes next.
                    continue;
                } else if matches!(injection, Injection::Expired(_))
                    && (!live.held || now_ms.saturating_sub(live.pending_since_ms) >= EXPIRED_WAIT_MS)
                {
                    // Nowhere to write the event (no body yet, or an upstream event never ends):
                    // end the stream without it.
                    live.pending = None;
                    live.session.mark_sent(injection, now_ms);
                    io.tally.inc(Metric::StreamsExpired);
                    io.out.push(Effect::Close { ctx });
                    continue;
                } else {
                    want(now_ms.saturating_add(100));
                }
            }
            if let Some(at) = live.session.next_deadline_ms() {
                want(at);
            }
        }
        self.next_ms = next;
    }

    /// A re-authorization on this worker: its streams of that user and topic take the new expiry
    /// at once (other workers pick it up from the registry).
    pub(crate) fn extend_local(&mut self, key: &registry::Key, expires_at: u64) {
        for live in self.live.values_mut() {
            if live.identity.as_ref().is_some_and(|(_, k)| k == key) {
                live.session.extend(expires_at);
            }
        }
        self.next_ms = Some(0);
    }

    /// Whether this worker has an open stream with registry key `key`.
    pub fn has_local(&self, key: &registry::Key) -> bool {
        self.live.values().any(|l| l.identity.as_ref().is_some_and(|(_, k)| k == key))
    }

    /// The stream ended.
    pub(crate) fn close<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) {
        self.identities.remove(&ctx);
        if self.live.remove(&ctx).is_some() {
            io.tally.add(Metric::OpenStreams, -1);
        }
    }
}

/// `injection` reached the client.
fn sent<S: SharedStore + ?Sized>(io: &mut Io<S>, live: &mut Live, injection: Injection) {
    let now_ms = io.now_ms;
    live.session.mark_sent(injection, now_ms);
    match injection {
        Injection::Heartbeat => io.tally.inc(Metric::HeartbeatsSent),
        Injection::Challenge => io.tally.inc(Metric::ChallengesSent),
        Injection::Expired(_) => {
            io.tally.inc(Metric::StreamsExpired);
            live.close_at_ms = Some(now_ms.saturating_add(CLOSE_DELAY_MS));
        }
    }
    if io.debug {
        let who = live.identity.as_ref().map_or("-", |(i, _)| i.user_id.as_str());
        io.log(Level::Debug, format!("revenprox: {} sent user={who}", injection.label()));
    }
}
