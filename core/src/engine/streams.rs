//! SSE streams on one worker: every `text/event-stream` response of a verified (or development
//! mode) request gets a session that injects heartbeats, the challenge and the final `expired`
//! event, follows refreshes and re-verifies its credential.
//!
//! How bytes get into a live response (docs/envoy-host.md): Envoy only lets the filter write into
//! a response body while it holds that body. So an upstream chunk after which something may have
//! to be written is held (`Flow::Pause`) and released at once through the worker's own queue: one
//! empty message (`Effect::Enqueue`) wakes the worker, and `released` lets go of every chunk held
//! since (one signal for all the streams that held a chunk in the meantime; an empty message costs
//! the host no allocation inside the VM). Between chunks the stream stays in that holding state, so
//! a timer can append an injection and release it. Chunks after which nothing could be written
//! are not held (`body`): the one that completes a declared length, one that ends inside an
//! upstream event, and floods (`HOLD_MAX`); injections then wait for the next chunk. Injections go
//! only where `Framing` says an upstream event has ended; one due while an event is half through
//! waits for the chunk that ends it and is spliced in right after that event.
//!
//! A stream's expiry comes only from its own credential's verdicts: the one it opened with, a
//! refresh posted while it was open (on this worker at once, from another worker through the
//! Envoy-wide refresh record at its next decision), and its re-verifications. Decisions are taken
//! at fixed moments, never polled: the re-verification interval, once before each expiry (the
//! server-side refresh: take a refresh made on another worker, else ask the webhook once more),
//! and at the expiry itself.

use super::effect::{Ctx, Effect, Flow, Level};
use super::metrics::Metric;
use super::verifier::Verdicted;
use super::Io;
use crate::auth::token::{Credential, Kind};
use crate::config::Config;
use crate::shared::{self, SharedStore};
use crate::sse::framing::{self, Framing};
use crate::sse::session::{ExpiryReason, Injection, Session};
use crate::sse::{presence, refresh};
use std::collections::{BTreeSet, HashMap, HashSet};

/// What a re-verification's verdict did to its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reverified {
    /// The stream goes on (allowed for its user, a failure, or a verdict about a credential the
    /// stream no longer uses).
    GoesOn,
    /// Denied: the stream is revoked (the verifier already revoked the credential).
    Denied,
    /// Allowed for another user: the stream is revoked, and so must the credential be.
    OtherUser,
    /// The stream is gone, or never had a verdict.
    Gone,
}

/// Who a verified request belongs to, kept from the verdict until its response headers arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub topic_id: String,
    pub expires_at: u64,
    pub credential: Credential,
}

/// Reads the response chunk being delivered (the host's body buffer).
pub trait ChunkReader {
    /// Up to `len` bytes from offset `start` of the chunk (fewer, or none, if the host has less).
    fn read(&mut self, start: usize, len: usize) -> Vec<u8>;
}

/// An authenticated stream's identity and credential.
struct Auth {
    user_id: String,
    topic_id: String,
    /// Its (user, topic) keys, computed on first use (a short response never needs them).
    presence: Option<presence::Key>,
    refresh: Option<refresh::Key>,
    /// The credential the next re-verification sends: the one the stream opened with, or the last
    /// refresh it took.
    credential: Credential,
    opened_ms: u64,
    /// Its place in this worker's order of events (`Streams::seq`): on its own worker a refresh is
    /// taken only if its request came after the stream opened, whatever the clock says.
    opened_seq: u64,
    /// When the refresh the stream last took was posted (0: none).
    refreshed_at_ms: u64,
    /// Counted in the Envoy-wide presence table.
    registered: bool,
    /// When its presence record is touched next (or its registration tried again).
    touch_at_ms: u64,
    /// When the credential was last verified, and when it is verified again.
    verified_ms: u64,
    verify_at_ms: Option<u64>,
    /// A re-verification of this stream is in flight.
    verifying: bool,
    /// The expiry the pre-expiry check has run for.
    checked_for: Option<u64>,
}

impl Auth {
    /// Its key in the presence table (and in `Streams::by_key`).
    fn presence(&mut self) -> presence::Key {
        let (user, topic) = (&self.user_id, &self.topic_id);
        *self.presence.get_or_insert_with(|| presence::stream_key(user, topic))
    }

    /// `presence()` without keeping it.
    fn presence_now(&self) -> presence::Key {
        self.presence.unwrap_or_else(|| presence::stream_key(&self.user_id, &self.topic_id))
    }

    /// Its key in the Envoy-wide refresh records.
    fn refresh(&mut self) -> refresh::Key {
        let (user, topic) = (&self.user_id, &self.topic_id);
        *self.refresh.get_or_insert_with(|| refresh::key(user, topic))
    }
}

struct Live {
    ctx: Ctx,
    session: Session,
    framing: Framing,
    auth: Option<Auth>,
    /// Due but waiting for the end of an upstream event.
    pending: Option<Injection>,
    pending_since_ms: u64,
    /// Handed to the host to write; its receipt decides whether it went out.
    writing: Option<Injection>,
    /// Envoy holds this response's body buffer (a chunk went through the hold-and-release path).
    held: bool,
    /// The held chunk waits for the worker's release signal.
    releasing: bool,
    /// Bytes in the held buffer when it was last held (what Envoy hands over again, with new
    /// bytes appended, if a chunk arrives before the release).
    buffered: usize,
    /// Bytes the upstream has still to send, when its response declared a length.
    remaining: Option<u64>,
    /// `event: expired` went out; the stream is ended at this time (after the bytes are flushed).
    close_at_ms: Option<u64>,
    /// The upstream compressed the stream (`content-encoding` other than `identity`): nothing can
    /// be written into it, so nothing is; it still ends at its expiry, its maximum duration or its
    /// revocation (without `event: expired`).
    encoded: bool,
    /// Its entry in `Streams::timers`: when the timer visits it next.
    queued_ms: Option<u64>,
    /// Opened since the last tick: not in `timers` nor `by_key` yet, the next tick visits it (a
    /// short response that ends before then never costs either).
    fresh: bool,
}

/// The authenticated streams of one (user, topic) key on this worker.
#[derive(Default)]
struct Keyed {
    ctxs: Vec<Ctx>,
    /// When this worker last wrote the key's presence record.
    touched_ms: u64,
}

/// A re-verification the engine must start (the verifier is not the streams' to call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reverify {
    pub ctx: Ctx,
    pub credential: Credential,
    pub topic_id: String,
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

/// How long before its expiry a stream that no refresh reached asks the webhook once more (the
/// server-side refresh): half the challenge window, within 1 to 10 seconds, so that the client's
/// own refresh (answering the challenge) usually comes first.
pub fn server_refresh_lead_ms(cfg: &Config) -> u64 {
    cfg.sse.challenge_before_expiry_sec.saturating_mul(500).clamp(1_000, 10_000)
}

/// When a stream verified at `verified_ms` is verified again: within the interval, spread over its
/// last tenth by `spread` (so that streams opened together do not all ask at once), never later.
fn next_verify_ms(cfg: &Config, verified_ms: u64, spread: u64) -> Option<u64> {
    let interval = cfg.sse.reverify_interval_sec.saturating_mul(1000);
    (interval > 0).then(|| verified_ms.saturating_add(interval - spread % (interval / 10 + 1)))
}

pub struct Streams {
    live: HashMap<Ctx, Live>,
    identities: HashMap<Ctx, Identity>,
    /// Requests counted against their user's `max_streams_per_user`, until they end.
    reserved: HashMap<Ctx, presence::Key>,
    /// This worker's id in the presence table.
    worker: u32,
    /// The worker has a release queue (else chunks cannot be held).
    queue: bool,
    /// Streams whose held chunk waits for the release signal (some may have let it go since).
    releasing: Vec<Ctx>,
    /// The release signal is on its way through the queue.
    signalled: bool,
    /// When each stream needs the timer next (one entry per stream, `Live::queued_ms`): a tick
    /// visits only the streams that are due, never all of them.
    timers: BTreeSet<(u64, Ctx)>,
    /// Authenticated streams by (user, topic) key: refreshes, presence and coalesced
    /// re-verifications find a key's streams without a scan.
    by_key: HashMap<presence::Key, Keyed>,
    /// Streams opened since the last tick (some may be gone), and when the first of them opened.
    fresh: Vec<Ctx>,
    fresh_at_ms: u64,
    /// When the records of `reserved` (the per-user limit) are touched next.
    touch_at_ms: u64,
    /// Streams visited by the timer so far.
    visits: u64,
    /// Accepted refreshes that found no stream of their user and topic yet (`Parked`).
    parked: Vec<Parked>,
    /// When each refresh request being verified arrived (a refresh is as old as its request), and
    /// its place in this worker's order of events.
    posted: HashMap<Ctx, (u64, u64)>,
    /// This worker's order of events: stream openings and refresh requests.
    seq: u64,
}

/// A refresh the webhook accepted while no stream of its user and topic was known anywhere in the
/// Envoy. A stream counts Envoy-wide from its worker's next tick (up to `MIN_TICK_MS` after it
/// opened, more on a loaded Envoy), so a refresh posted right after the stream opened — a client
/// whose token was already inside the challenge window at open answers at once — may reach another
/// worker first. It waits up to `REFRESH_GRACE_MS` for the stream before it is refused.
#[derive(Debug, Clone)]
pub(crate) struct Parked {
    pub ctx: Ctx,
    pub key: presence::Key,
    pub user_id: String,
    pub topic_id: String,
    pub credential: crate::auth::token::Credential,
    pub expires_at: u64,
    /// When the refresh request arrived: it is as old as that, however long the webhook took and
    /// however long it waits for its stream.
    pub posted_ms: u64,
    /// Its place in this worker's order of events (`Streams::refresh_posted`).
    pub posted_seq: u64,
    pub until_ms: u64,
}

/// How long an accepted refresh waits for its stream to be known Envoy-wide (`Parked`).
pub const REFRESH_GRACE_MS: u64 = 500;

/// Moves stream `live`'s entry in `timers` to `at` (`None`: no visit needed).
fn schedule(timers: &mut BTreeSet<(u64, Ctx)>, live: &mut Live, at: Option<u64>) {
    if live.queued_ms == at || live.fresh {
        return;
    }
    if let Some(q) = live.queued_ms.take() {
        timers.remove(&(q, live.ctx));
    }
    if let Some(at) = at {
        timers.insert((at, live.ctx));
        live.queued_ms = Some(at);
    }
}

/// Brings stream `live`'s next visit forward to `at` if that is earlier.
fn schedule_by(timers: &mut BTreeSet<(u64, Ctx)>, live: &mut Live, at: u64) {
    if live.queued_ms.is_none_or(|q| at < q) {
        schedule(timers, live, Some(at));
    }
}

/// When stream `live` needs the timer next: its close, its presence record, its re-verification and
/// pre-expiry check, and what its session has due, or, while an injection waits to be written,
/// only what could change that (more important injections, the expiry's wait running out). Never
/// polled: between these moments a visit would find nothing to do.
fn next_visit(cfg: &Config, live: &Live, now_ms: u64) -> Option<u64> {
    if live.close_at_ms.is_some() {
        return live.close_at_ms;
    }
    if live.session.finished() {
        // `expired` went out (or the stream was ended without it): it only waits for its end.
        return None;
    }
    let mut next: Option<u64> = None;
    let mut want = |at: u64| next = Some(next.map_or(at, |n: u64| n.min(at)));
    // An ending stream decides nothing more (`visit`): its re-verification and checks are not due.
    if let Some(auth) = live.auth.as_ref().filter(|_| !ending(live.pending)) {
        want(auth.touch_at_ms);
        if let Some(at) = auth.verify_at_ms.filter(|_| !auth.verifying) {
            want(at);
        }
        if let Some(at) = check_at_ms(cfg, auth, &live.session) {
            want(at);
        }
    }
    match live.pending {
        Some(_) if live.held && live.framing.at_boundary() => want(now_ms),
        Some(Injection::Expired(_)) => want(live.pending_since_ms.saturating_add(EXPIRED_WAIT_MS)),
        Some(pending) => {
            if let Some(at) = live.session.next_deadline_above(pending) {
                want(at);
            }
        }
        None => {
            if let Some(at) = live.session.next_deadline_ms() {
                want(at);
            }
        }
    }
    next
}

/// `expired` waits to be written: the stream is ending.
fn ending(pending: Option<Injection>) -> bool {
    matches!(pending, Some(Injection::Expired(_)))
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

/// The response's content coding when it is not `identity` (every `content-encoding` header, every
/// comma-separated coding in it).
fn content_coding(headers: &[(String, Vec<u8>)]) -> Option<&[u8]> {
    headers.iter().filter(|(k, _)| k == "content-encoding").map(|(_, v)| v.as_slice()).find(|v| {
        v.split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
    })
}

/// Takes the Envoy-wide refresh record of `auth`'s user and topic if it was posted while the stream
/// was open, after the last refresh the stream took, and gives a later expiry.
fn adopt_refresh<S: SharedStore + ?Sized>(io: &mut Io<S>, auth: &mut Auth, session: &mut Session) -> bool {
    let key = auth.refresh();
    let Some(record) = shared::refresh_get(io.store, &key, io.now_ms) else {
        return false;
    };
    // Posted after the stream opened (a refresh of the same millisecond cannot be ordered across
    // workers, and is not taken: finding 10), and after the last refresh it took.
    let newer = record.at_ms > auth.opened_ms && record.at_ms > auth.refreshed_at_ms;
    if !newer || !session.extend(record.expires_at) {
        return false;
    }
    auth.credential = record.credential;
    auth.refreshed_at_ms = record.at_ms;
    true
}

impl Streams {
    pub fn new(queue: bool, worker: u32) -> Streams {
        Streams {
            live: HashMap::new(),
            identities: HashMap::new(),
            reserved: HashMap::new(),
            worker,
            queue,
            releasing: Vec::new(),
            signalled: false,
            timers: BTreeSet::new(),
            by_key: HashMap::new(),
            fresh: Vec::new(),
            fresh_at_ms: 0,
            touch_at_ms: 0,
            visits: 0,
            parked: Vec::new(),
            posted: HashMap::new(),
            seq: 0,
        }
    }

    /// Refresh request `ctx` arrived now: its verdict will be dated from here.
    pub(crate) fn refresh_posted(&mut self, ctx: Ctx, now_ms: u64) {
        self.seq = self.seq.saturating_add(1);
        self.posted.insert(ctx, (now_ms, self.seq));
    }

    /// When refresh request `ctx` arrived, and its place in this worker's order (forgotten here).
    pub(crate) fn take_posted(&mut self, ctx: Ctx) -> Option<(u64, u64)> {
        self.posted.remove(&ctx)
    }

    /// Keeps an accepted refresh until its stream is known or its grace runs out (`Parked`).
    pub(crate) fn park(&mut self, parked: Parked) {
        self.parked.push(parked);
    }

    /// The refreshes waiting for their stream (the caller puts back those that still wait).
    pub(crate) fn take_parked(&mut self) -> Vec<Parked> {
        std::mem::take(&mut self.parked)
    }

    /// The earliest time the timer has something to do.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let stream = self.timers.first().map(|(at, _)| *at);
        let fresh = (!self.fresh.is_empty()).then_some(self.fresh_at_ms);
        let records = self.has_records().then_some(self.touch_at_ms);
        // A waiting refresh looks again at every tick (the shortest period) until its grace ends.
        let parked = self.parked.iter().map(|p| p.until_ms.saturating_sub(REFRESH_GRACE_MS)).min();
        [stream, fresh, records, parked].into_iter().flatten().min()
    }

    /// This worker has presence records to keep (its streams', its reservations'): they are
    /// touched, and the Envoy's salt checked, every `presence::REFRESH_MS`.
    fn has_records(&self) -> bool {
        !self.reserved.is_empty() || !self.live.is_empty()
    }

    /// Streams the timer has an entry for (for tests and invariants).
    pub fn scheduled(&self) -> usize {
        self.timers.len()
    }

    /// Streams visited by the timer so far (for tests: a tick visits only the streams due).
    pub fn visits(&self) -> u64 {
        self.visits
    }

    /// Open sessions (for tests and invariants).
    pub fn open(&self) -> usize {
        self.live.len()
    }

    /// Allowed requests whose response has not started yet.
    pub fn awaiting_response(&self) -> usize {
        self.identities.len()
    }

    /// Requests counted against their user's stream limit.
    pub fn reserved(&self) -> usize {
        self.reserved.len()
    }

    /// The expiry of stream `ctx` (Unix seconds), for tests and invariants.
    pub fn expires_at(&self, ctx: Ctx) -> Option<u64> {
        self.live.get(&ctx)?.session.expires_at_sec()
    }

    /// A request was allowed: remember who it is for its response.
    pub(crate) fn allowed(&mut self, ctx: Ctx, identity: Identity) {
        self.identities.insert(ctx, identity);
    }

    /// Counts request `ctx` against `user_id`'s `max_streams_per_user` until it ends. `false`: the
    /// user is at the limit.
    pub(crate) fn reserve<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        ctx: Ctx,
        user_id: &str,
    ) -> bool {
        let limit = u64::from(io.cfg.sse.max_streams_per_user);
        let key = presence::user_key(user_id);
        match shared::presence_reserve(io.store, &key, self.worker, limit, io.now_ms) {
            shared::Reserve::Reserved => {
                self.reserved.insert(ctx, key);
                true
            }
            shared::Reserve::AtLimit => false,
            shared::Reserve::NoRoom => {
                // No room to count it: let it through rather than refuse a user we cannot count.
                io.tally.inc(Metric::PresenceFull);
                true
            }
        }
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
        let encoded = content_coding(headers).map(|coding| {
            // Not ours to decode: a compressed stream gets no injection (the upstream was asked for
            // none: `Accept-Encoding` is removed on topic paths), and the operator hears of it.
            let shown: String = String::from_utf8_lossy(coding).chars().take(32).collect();
            let topic = identity.as_ref().map_or("-", |i| i.topic_id.as_str());
            let line = format!(
                "revenprox: an event stream (topic {topic}) arrived with content-encoding {shown:?}: \
                 no heartbeat, challenge or expired event can go into it; it is ended at its expiry \
                 without one (have the upstream send it uncompressed; to compress, put Envoy's \
                 compressor filter before this one)"
            );
            io.log(Level::Warn, line);
            io.tally.inc(Metric::StreamsEncoded);
        });
        // Injected bytes change the length: let Envoy frame the body itself.
        let declared = find(headers, "content-length");
        if encoded.is_none() && declared.is_some() {
            io.out.push(Effect::RemoveResponseHeader { ctx, name: "content-length" });
        }
        let remaining = declared.and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
        let now_ms = io.now_ms;
        let session = Session::new(&io.cfg.sse, now_ms, identity.as_ref().map(|i| i.expires_at));
        self.seq = self.seq.saturating_add(1);
        let auth = identity.map(|i| {
            let spread = u64::from(ctx).wrapping_mul(0x9e37_79b9);
            Auth {
                presence: None,
                refresh: None,
                user_id: i.user_id,
                topic_id: i.topic_id,
                credential: i.credential,
                opened_ms: now_ms,
                opened_seq: self.seq,
                refreshed_at_ms: 0,
                registered: false,
                // The first visit registers it.
                touch_at_ms: now_ms,
                verified_ms: now_ms,
                verify_at_ms: next_verify_ms(io.cfg, now_ms, spread),
                verifying: false,
                checked_for: None,
            }
        });
        // The presence record is written by the first tick (within the timer's granularity), not
        // here: a stream that ends before then (a short response) never costs shared-data work.
        let live = Live {
            ctx,
            session,
            framing: Framing::new(),
            auth,
            pending: None,
            pending_since_ms: 0,
            writing: None,
            held: false,
            releasing: false,
            buffered: 0,
            remaining,
            close_at_ms: None,
            encoded: encoded.is_some(),
            queued_ms: None,
            fresh: true,
        };
        if self.fresh.is_empty() {
            self.fresh_at_ms = now_ms;
        }
        self.fresh.push(ctx);
        if let Some(old) = self.live.insert(ctx, live) {
            // A context id is never reused while its stream lives; keep the indexes exact anyway.
            self.forget(&old);
        }
        io.tally.add(Metric::OpenStreams, 1);
    }

    /// A chunk of the upstream body: observe its framing, splice in a waiting injection at the end
    /// of an event, and hold it for release through the queue when an injection may have to
    /// follow it while the stream is idle (the buffer stays writable).
    ///
    /// Held lazily: a chunk goes on unheld when holding it could never let anything be written
    /// after it. That is a chunk after which nothing but the end of the stream comes (it completes
    /// the length the response declared), a chunk that ends inside an upstream event (nothing may
    /// be written there: a later chunk ends the event, and a waiting injection is spliced into that
    /// one), a flood chunk (`HOLD_MAX`), and the end of the stream. An unheld chunk with nothing
    /// waiting to be injected is not even read. Every other chunk is held, the last one before a
    /// silence included, so heartbeats and expiry still reach an idle stream.
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
        // While a held chunk waits for its release, Envoy hands it over again with the new bytes
        // appended: only the bytes after it are new.
        let seen = if live.releasing { live.buffered.min(size) } else { 0 };
        let fresh = size - seen;
        if live.session.finished() {
            // `event: expired` went out: nothing of the upstream follows it (what Envoy still held
            // from before stays).
            if fresh > 0 {
                let kept = if seen > 0 { reader.read(0, seen) } else { Vec::new() };
                io.out.push(Effect::ReplaceChunk { ctx, size, bytes: kept });
            }
            live.held = false;
            live.releasing = false;
            return Flow::Continue;
        }
        if live.encoded {
            // Compressed bytes are not read, held or written into.
            if end_of_stream {
                io.out.push(Effect::SetEnd { ctx, reason: "upstream_end" });
            }
            return Flow::Continue;
        }
        // The chunk that completes a declared length is followed only by the end of the stream.
        let completes = live.remaining.as_mut().is_some_and(|r| {
            *r = r.saturating_sub(fresh as u64);
            *r == 0
        });
        let may_hold = queue && !end_of_stream && size <= HOLD_MAX && !completes;
        if fresh > 0 {
            if live.pending.is_some() {
                // Something waits for the end of an event: find it in the new bytes. The whole
                // buffer is read, as the splice rewrites it from its start.
                let chunk = reader.read(0, size);
                let boundary = live.framing.feed(chunk.get(seen..).unwrap_or_default());
                if let (Some(injection), Some(at)) = (live.pending, boundary) {
                    let mut bytes = framing::splice(&chunk, seen + at, injection.bytes());
                    if matches!(injection, Injection::Expired(_)) {
                        // Nothing of the upstream follows `expired`: the rest of the chunk (the
                        // start of an event it does not finish) goes too.
                        bytes.truncate(seen + at + injection.bytes().len());
                    }
                    live.buffered = bytes.len();
                    io.out.push(Effect::ReplaceChunk { ctx, size: chunk.len(), bytes });
                    live.pending = None;
                    live.writing = Some(injection);
                }
            } else if may_hold {
                // Only the chunk's end state matters (whether an injection may follow it): read
                // its last bytes instead of all of it.
                let tail_read = fresh > TAIL_BYTES && {
                    let tail = reader.read(size - TAIL_BYTES, TAIL_BYTES);
                    tail.len() == TAIL_BYTES && live.framing.advance(fresh, &tail)
                };
                if !tail_read {
                    live.framing.feed(&reader.read(seen, fresh));
                }
            } else {
                live.framing.forget();
            }
            live.session.on_sent(now_ms, true);
            // The first upstream bytes start the heartbeat clock (later ones only move it later:
            // the visit already queued finds that out).
            if let Some(at) = live.session.next_deadline_ms() {
                schedule_by(&mut self.timers, live, at);
            }
        }
        if end_of_stream {
            io.out.push(Effect::SetEnd { ctx, reason: "upstream_end" });
        }
        let expiring = matches!(live.writing, Some(Injection::Expired(_)));
        if !may_hold || expiring || !live.framing.at_boundary() {
            // Continue lets everything Envoy holds for the stream go (a release still on its way
            // then finds nothing to do). After `expired` nothing more is written.
            live.held = false;
            live.releasing = false;
            return Flow::Continue;
        }
        if live.writing.is_none() {
            live.buffered = size;
        }
        live.held = true;
        if !live.releasing {
            live.releasing = true;
            self.releasing.push(ctx);
        }
        if !self.signalled {
            self.signalled = true;
            io.out.push(Effect::Enqueue { ctx });
        }
        Flow::Pause
    }

    /// The release signal arrived: let go of every chunk held since it was sent.
    pub(crate) fn released<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>) {
        self.signalled = false;
        for ctx in std::mem::take(&mut self.releasing) {
            if let Some(live) = self.live.get_mut(&ctx).filter(|l| l.releasing) {
                live.releasing = false;
                io.out.push(Effect::ResumeResponse { ctx });
            }
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
        let next = next_visit(io.cfg, live, io.now_ms);
        schedule(&mut self.timers, live, next);
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
                match effect {
                    Effect::Inject { .. } => live.held = false,
                    // The buffer kept its bytes.
                    Effect::ReplaceChunk { size, .. } => live.buffered = *size,
                    _ => {}
                }
                if let Some(injection) = live.writing.take() {
                    if live.pending.is_none() {
                        live.pending_since_ms = io.now_ms;
                    }
                    live.pending = Some(injection);
                }
                schedule_by(&mut self.timers, live, io.now_ms);
                None
            }
            Effect::Enqueue { .. } => {
                // No release will come: let the chunk through now. The signal is sent when the
                // first stream holds a chunk, so no other stream waits for it.
                live.held = false;
                live.releasing = false;
                self.signalled = false;
                self.releasing.retain(|c| *c != ctx);
                Some(Flow::Continue)
            }
            _ => None,
        }
    }

    /// Timer: the streams that are due (presence records, re-verifications and server-side
    /// refreshes, injections, ends), each scheduled again for its next moment. Returns the
    /// re-verifications the engine must start.
    pub(crate) fn tick<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>) -> Vec<Reverify> {
        let now_ms = io.now_ms;
        if self.has_records() && now_ms >= self.touch_at_ms {
            self.touch_at_ms = now_ms.saturating_add(presence::REFRESH_MS);
            if shared::recheck_salt(io.store) {
                // Another worker's salt stands: this worker's records must be placed again.
                self.replace_records(io);
            }
            // Records of requests counted against their user's limit (streams or not).
            let users: HashSet<presence::Key> = self.reserved.values().copied().collect();
            for key in users {
                shared::presence_change(io.store, &key, self.worker, 0, now_ms);
            }
        }
        // Streams opened since the last tick join the timer and the key index, due now.
        for ctx in std::mem::take(&mut self.fresh) {
            let Some(live) = self.live.get_mut(&ctx).filter(|l| l.fresh) else {
                continue;
            };
            live.fresh = false;
            if let Some(auth) = live.auth.as_mut() {
                self.by_key.entry(auth.presence()).or_default().ctxs.push(ctx);
            }
            schedule(&mut self.timers, live, Some(now_ms));
        }
        let due: Vec<(u64, Ctx)> = self.timers.range(..=(now_ms, Ctx::MAX)).copied().collect();
        let mut reverify: Vec<Reverify> = Vec::new();
        for (at, ctx) in due {
            self.timers.remove(&(at, ctx));
            let Some(live) = self.live.get_mut(&ctx) else {
                continue;
            };
            live.queued_ms = None;
            self.visits += 1;
            if let Some(r) = self.visit(io, ctx) {
                reverify.extend(self.coalesce(r));
            }
            if let Some(live) = self.live.get_mut(&ctx) {
                let next = next_visit(io.cfg, live, now_ms);
                schedule(&mut self.timers, live, next);
            }
        }
        reverify
    }

    /// One stream's turn at the timer. Returns the re-verification it must start, if any.
    fn visit<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) -> Option<Reverify> {
        let now_ms = io.now_ms;
        let worker = self.worker;
        let live = self.live.get_mut(&ctx)?;
        if let Some(at) = live.close_at_ms {
            if now_ms >= at {
                live.close_at_ms = None;
                io.out.push(Effect::Close { ctx });
            }
            return None;
        }
        let mut reverify = None;
        if let Some(auth) = live.auth.as_mut() {
            if now_ms >= auth.touch_at_ms {
                auth.touch_at_ms = now_ms.saturating_add(presence::REFRESH_MS);
                let key = auth.presence();
                let keyed = self.by_key.entry(key).or_default();
                if !auth.registered {
                    auth.registered = shared::presence_change(io.store, &key, worker, 1, now_ms);
                    if auth.registered {
                        keyed.touched_ms = now_ms;
                    } else {
                        // No room in the table: tried again at the next touch.
                        io.tally.inc(Metric::PresenceFull);
                    }
                } else if now_ms.saturating_sub(keyed.touched_ms) >= presence::REFRESH_MS / 2 {
                    // One touch per key however many of its streams are here.
                    shared::presence_change(io.store, &key, worker, 0, now_ms);
                    keyed.touched_ms = now_ms;
                }
            }
            // A heartbeat or challenge waiting for the end of an upstream event does not hold up
            // the stream's re-verification or its pre-expiry check; only an ending stream skips them.
            if !live.session.finished() && !ending(live.pending) {
                reverify = decide(io, ctx, auth, &mut live.session);
            }
        }
        let due = live.session.due(now_ms);
        if let (true, Some(skipped @ (Injection::Heartbeat | Injection::Challenge))) = (live.encoded, due) {
            // A compressed stream gets no challenge (and no heartbeat: its bytes are not read, so
            // the clock never starts). Its end is due like any other stream's, and comes without
            // the event: it is never held.
            live.session.mark_sent(skipped, now_ms);
        } else if let Some(due) = due {
            // At the expiry, one last look for a refresh posted on another worker.
            let adopted = matches!(due, Injection::Expired(ExpiryReason::TokenExpired))
                && !ending(live.pending)
                && live.auth.as_mut().is_some_and(|a| adopt_refresh(io, a, &mut live.session));
            if !adopted {
                // An earlier injection still waiting is superseded by a more important one.
                let injection = match live.pending {
                    Some(Injection::Expired(r)) => Injection::Expired(r),
                    _ => due,
                };
                // The expiry's wait for the end of an event starts when the expiry is due, also
                // when a heartbeat or challenge was already waiting.
                if live.pending.is_none() || (!ending(live.pending) && ending(Some(injection))) {
                    live.pending_since_ms = now_ms;
                }
                live.pending = Some(injection);
            }
        }
        if let Some(injection) = live.pending {
            if live.held && live.framing.at_boundary() {
                // Appending releases what is held (a release still on its way is not needed). Its
                // receipt schedules what comes next.
                io.out.push(Effect::Inject { ctx, bytes: injection.bytes() });
                live.releasing = false;
                live.pending = None;
                live.writing = Some(injection);
            } else if matches!(injection, Injection::Expired(_))
                && ((!live.held && live.framing.at_boundary())
                    || now_ms.saturating_sub(live.pending_since_ms) >= EXPIRED_WAIT_MS)
            {
                // Nowhere to write the event (no body yet, a body let through whole, or an
                // upstream event that never ends): end the stream without it.
                live.pending = None;
                live.session.mark_sent(injection, now_ms);
                io.tally.inc(Metric::StreamsExpired);
                if let Injection::Expired(reason) = injection {
                    io.out.push(Effect::SetEnd { ctx, reason: reason.as_str() });
                }
                io.out.push(Effect::Close { ctx });
            }
        }
        reverify
    }

    /// Places this worker's presence records again (after the Envoy's salt changed under it): its
    /// reservations at once, its streams at the tick that follows. The records left where the old
    /// salt put them are touched no more and count for nothing once stale.
    fn replace_records<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>) {
        let mut reserved: HashMap<presence::Key, i64> = HashMap::new();
        for key in self.reserved.values() {
            *reserved.entry(*key).or_default() += 1;
        }
        for (key, n) in reserved {
            shared::presence_change(io.store, &key, self.worker, n, io.now_ms);
        }
        let now_ms = io.now_ms;
        for live in self.live.values_mut() {
            if let Some(auth) = live.auth.as_mut() {
                // Registered again at its next visit, which is now.
                auth.registered = false;
                auth.touch_at_ms = now_ms;
                schedule_by(&mut self.timers, live, now_ms);
            }
        }
    }

    /// Every stream with the same credential and topic as a re-verification joins it (one webhook
    /// call for all), so their schedules align. Such streams share the (user, topic) key.
    fn coalesce(&mut self, first: Reverify) -> Vec<Reverify> {
        let key = self.live.get(&first.ctx).and_then(|l| l.auth.as_ref()).map(Auth::presence_now);
        let mates: Vec<Ctx> =
            key.and_then(|k| self.by_key.get(&k)).map(|k| k.ctxs.clone()).unwrap_or_default();
        let mut out = vec![first];
        for ctx in mates {
            let Some(live) = self.live.get_mut(&ctx) else {
                continue;
            };
            let Some(auth) = live.auth.as_mut() else {
                continue;
            };
            if auth.verifying || live.session.finished() || ending(live.pending) {
                continue;
            }
            let Some(r) = out.first() else {
                continue;
            };
            if auth.credential == r.credential && auth.topic_id == r.topic_id {
                auth.verifying = true;
                out.push(Reverify {
                    ctx,
                    credential: auth.credential.clone(),
                    topic_id: auth.topic_id.clone(),
                });
            }
        }
        out
    }

    /// A re-verification of stream `ctx` came back.
    pub(crate) fn reverified<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        ctx: Ctx,
        credential: &Credential,
        verdict: &Verdicted,
    ) -> Reverified {
        let cfg = io.cfg;
        let now_ms = io.now_ms;
        let Some(live) = self.live.get_mut(&ctx) else {
            return Reverified::Gone;
        };
        let Some(auth) = live.auth.as_mut() else {
            return Reverified::Gone;
        };
        auth.verifying = false;
        let spread = u64::from(ctx).wrapping_mul(0x9e37_79b9);
        let outcome = match verdict {
            Verdicted::Allowed { user_id, expires_at } if *user_id == auth.user_id => {
                // The verdict was for the credential asked about; a refresh taken meanwhile stays.
                if *credential == auth.credential {
                    live.session.set_expiry(*expires_at);
                }
                auth.verified_ms = now_ms;
                auth.verify_at_ms = next_verify_ms(cfg, now_ms, spread);
                Reverified::GoesOn
            }
            Verdicted::Allowed { .. } | Verdicted::Denied => {
                let other_user = matches!(verdict, Verdicted::Allowed { .. });
                if *credential != auth.credential {
                    // A refresh replaced the credential meanwhile: the verdict is about the old one.
                    auth.verify_at_ms = Some(now_ms);
                    Reverified::GoesOn
                } else {
                    // An expiry already waiting keeps its reason and its wait (a late verdict does
                    // not restart it).
                    if !live.session.finished() && !ending(live.pending) {
                        io.tally.inc(Metric::StreamsRevoked);
                        let line = format!(
                            "revenprox: stream revoked user={} topic={} (re-verification refused)",
                            auth.user_id, auth.topic_id
                        );
                        io.log(Level::Info, line);
                        live.pending = Some(Injection::Expired(ExpiryReason::Revoked));
                        live.pending_since_ms = now_ms;
                    }
                    if other_user {
                        Reverified::OtherUser
                    } else {
                        Reverified::Denied
                    }
                }
            }
            Verdicted::Failed | Verdicted::Refused(_) => {
                // Fail-static: the stream goes on under its last verdict until its expiry.
                io.tally.inc(Metric::ReverifyFailures);
                auth.verify_at_ms = next_verify_ms(cfg, now_ms, spread);
                Reverified::GoesOn
            }
        };
        schedule_by(&mut self.timers, live, now_ms);
        outcome
    }

    /// A challenge response of `user_id` on `topic_id` was accepted on this worker: its streams of
    /// that user and topic take the refreshed credential and expiry at once (other workers take it
    /// from the refresh record).
    pub(crate) fn refreshed(
        &mut self,
        key: &presence::Key,
        credential: &Credential,
        expires_at: u64,
        posted_ms: u64,
        posted_seq: u64,
        now_ms: u64,
    ) {
        let mut ctxs = self.by_key.get(key).map(|k| k.ctxs.clone()).unwrap_or_default();
        ctxs.extend(self.fresh_of(key));
        for ctx in ctxs {
            let Some(live) = self.live.get_mut(&ctx) else {
                continue;
            };
            if let Some(auth) = live.auth.as_mut() {
                // A stream never takes a refresh posted before it opened (finding 10): one that
                // waited for its stream (`Parked`) may find streams opened meanwhile.
                if auth.opened_seq < posted_seq && live.session.extend(expires_at) {
                    auth.credential = credential.clone();
                    auth.refreshed_at_ms = posted_ms;
                }
            }
            schedule_by(&mut self.timers, live, now_ms);
        }
    }

    /// Whether this worker has an open stream of (user, topic) key `key`.
    pub fn has_local(&self, key: &presence::Key) -> bool {
        self.by_key.contains_key(key) || !self.fresh_of(key).is_empty()
    }

    /// The streams of key `key` opened since the last tick.
    fn fresh_of(&self, key: &presence::Key) -> Vec<Ctx> {
        self.fresh
            .iter()
            .copied()
            .filter(|c| {
                self.live
                    .get(c)
                    .is_some_and(|l| l.fresh && l.auth.as_ref().is_some_and(|a| &a.presence_now() == key))
            })
            .collect()
    }

    /// Takes a stream that is gone out of the timer and the key index.
    fn forget(&mut self, live: &Live) {
        if live.fresh {
            // Only in `fresh`, which the next tick clears.
            return;
        }
        if let Some(q) = live.queued_ms {
            self.timers.remove(&(q, live.ctx));
        }
        if let Some(key) = live.auth.as_ref().map(Auth::presence_now) {
            if let Some(keyed) = self.by_key.get_mut(&key) {
                keyed.ctxs.retain(|c| *c != live.ctx);
                if keyed.ctxs.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }

    /// The stream ended: its presence and its place in its user's limit are given back at once.
    pub(crate) fn close<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) {
        self.identities.remove(&ctx);
        self.parked.retain(|p| p.ctx != ctx);
        self.posted.remove(&ctx);
        if let Some(key) = self.reserved.remove(&ctx) {
            shared::presence_change(io.store, &key, self.worker, -1, io.now_ms);
        }
        if let Some(live) = self.live.remove(&ctx) {
            io.tally.add(Metric::OpenStreams, -1);
            self.forget(&live);
            if let Some(auth) = live.auth.filter(|a| a.registered) {
                shared::presence_change(io.store, &auth.presence_now(), self.worker, -1, io.now_ms);
            }
        }
    }
}

/// When the pre-expiry check of a stream runs: `lead` before its expiry, not earlier than a second
/// after its last verification, once per expiry value. `None`: no check is due any more.
fn check_at_ms(cfg: &Config, auth: &Auth, session: &Session) -> Option<u64> {
    let exp_ms = session.expires_at_sec()?.saturating_mul(1000);
    if auth.checked_for == session.expires_at_sec() || auth.credential.kind == Kind::Ticket {
        return None;
    }
    let at = exp_ms.saturating_sub(server_refresh_lead_ms(cfg)).max(auth.verified_ms.saturating_add(1_000));
    (at < exp_ms).then_some(at)
}

/// The decisions of one authenticated stream at this tick: the pre-expiry check (take another
/// worker's refresh, else ask the webhook once more) and the periodic re-verification.
fn decide<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    ctx: Ctx,
    auth: &mut Auth,
    session: &mut Session,
) -> Option<Reverify> {
    let now_ms = io.now_ms;
    if auth.verifying {
        return None;
    }
    let check = check_at_ms(io.cfg, auth, session).is_some_and(|at| now_ms >= at);
    let periodic = auth.verify_at_ms.is_some_and(|at| now_ms >= at);
    if check {
        auth.checked_for = session.expires_at_sec();
        if adopt_refresh(io, auth, session) && !periodic {
            return None;
        }
    } else if periodic {
        adopt_refresh(io, auth, session);
    } else {
        return None;
    }
    // A one-time ticket cannot be asked about twice: a stream opened with one is re-verified once a
    // refresh gave it a JWT.
    if auth.credential.kind == Kind::Ticket {
        let spread = u64::from(ctx).wrapping_mul(0x9e37_79b9);
        auth.verify_at_ms = next_verify_ms(io.cfg, now_ms, spread);
        return None;
    }
    auth.verifying = true;
    Some(Reverify { ctx, credential: auth.credential.clone(), topic_id: auth.topic_id.clone() })
}

/// `injection` reached the client.
fn sent<S: SharedStore + ?Sized>(io: &mut Io<S>, live: &mut Live, injection: Injection) {
    let now_ms = io.now_ms;
    live.session.mark_sent(injection, now_ms);
    match injection {
        Injection::Heartbeat => io.tally.inc(Metric::HeartbeatsSent),
        Injection::Challenge => io.tally.inc(Metric::ChallengesSent),
        Injection::Expired(reason) => {
            io.tally.inc(Metric::StreamsExpired);
            live.close_at_ms = Some(now_ms.saturating_add(CLOSE_DELAY_MS));
            io.out.push(Effect::SetEnd { ctx: live.ctx, reason: reason.as_str() });
        }
    }
    if io.debug {
        let who = live.auth.as_ref().map_or("-", |a| a.user_id.as_str());
        let line = match injection {
            Injection::Expired(reason) => {
                format!("revenprox: stream expired ({}) user={who}", reason.as_str())
            }
            other => format!("revenprox: {} sent user={who}", other.label()),
        };
        io.log(Level::Debug, line);
    }
}
