//! The engine of one worker, sans-IO: host events and the time go in, effects come out.
//!
//! Like quinn-proto's `Connection` or rustls's `ConnectionCommon`, the engine never performs I/O.
//! The host shell (`src/host`) turns each proxy-wasm callback into one call here, then drains
//! `take_effects()` and performs each effect with the engine no longer borrowed, feeding the
//! outcome of those that matter back as a `Receipt`. Envoy-wide state is read and written through
//! the `SharedStore` the engine owns (host shared data in Envoy, `MemStore` in tests).
//!
//! Policy lives here and below (timeouts, retries, give-up rules, what to inject when); the host
//! decides nothing.

pub mod effect;
pub mod metrics;
pub mod streams;
pub mod verifier;

pub use effect::{Ctx, Effect, Flow, Level, Receipt, WebhookCall};
pub use streams::ChunkReader;

use crate::auth::gate::{self, Step};
use crate::auth::reply::{Code, Reply};
use crate::config::Config;
use crate::header_name;
use crate::resilience::flight::Purpose;
use crate::shared::{self, SharedStore};
use crate::sse::{presence, refresh};
use metrics::{Metric, Tally, Update};
use streams::{Identity, Reverified, Reverify, Streams};
use verifier::{Finished, Started, Verdicted, Verifier};

/// Timer granularity: calls and injections are never early, and at most this late.
pub const MIN_TICK_MS: u64 = 20;
/// Longest timer period while anything is scheduled.
pub const MAX_TICK_MS: u64 = 1000;

/// What one event may touch: the configuration, the shared store, the effect and metric outputs,
/// and the time. Built per event from the engine's fields.
pub(crate) struct Io<'a, S: ?Sized> {
    pub cfg: &'a Config,
    pub store: &'a mut S,
    pub out: &'a mut Vec<Effect>,
    pub tally: &'a mut Tally,
    pub now_ms: u64,
    pub debug: bool,
}

impl<S: ?Sized> Io<'_, S> {
    /// A local refusal for stream `ctx`, counted by its code.
    pub fn reply(&mut self, ctx: Ctx, reply: Reply) {
        self.tally.inc(Metric::denied(reply.code));
        if self.debug {
            self.log(
                Level::Debug,
                format!("revenprox: refused with {} ({})", reply.code.as_str(), reply.message),
            );
        }
        self.out.push(Effect::Reply { ctx, reply });
    }

    pub fn log(&mut self, level: Level, message: String) {
        self.out.push(Effect::Log { level, message });
    }
}

pub struct Engine<S> {
    cfg: Config,
    store: S,
    /// This worker's root context (timer and queue callbacks run there).
    root: Ctx,
    verifier: Verifier,
    streams: Streams,
    out: Vec<Effect>,
    tally: Tally,
    /// The timer period last asked for.
    tick_ms: u64,
    debug: bool,
    /// Topic ids of the segments this worker saw lately.
    topics: crate::auth::topic::Ids,
}

impl<S: SharedStore> Engine<S> {
    /// A worker's engine. `worker`: this worker's id among the Envoy's workers (random: it only
    /// has to differ from the others'). `queue`: the host could give the worker a release queue
    /// (without one, chunks cannot be held and injections ride on upstream chunks only). `debug`:
    /// emit the debug-level activity lines (one per refusal, injection, re-authorization).
    pub fn new(
        cfg: Config,
        mut store: S,
        root: Ctx,
        worker: u32,
        queue: bool,
        debug: bool,
        now_ms: u64,
    ) -> Engine<S> {
        shared::init(&mut store, cfg.verifier.rate_limit_per_sec, now_ms);
        Engine {
            verifier: Verifier::new(&cfg),
            streams: Streams::new(queue, worker),
            cfg,
            store,
            root,
            out: Vec::new(),
            tally: Tally::default(),
            tick_ms: 0,
            debug,
            topics: crate::auth::topic::Ids::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The effects to perform, in order; the engine keeps none.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.out)
    }

    /// Metric changes since the last call.
    pub fn take_metrics(&mut self) -> Vec<Update> {
        self.tally.drain()
    }

    fn io(&mut self, now_ms: u64) -> (Io<'_, S>, &mut Verifier, &mut Streams) {
        (
            Io {
                cfg: &self.cfg,
                store: &mut self.store,
                out: &mut self.out,
                tally: &mut self.tally,
                now_ms,
                debug: self.debug,
            },
            &mut self.verifier,
            &mut self.streams,
        )
    }

    /// Request headers of stream `ctx` (every header, names lowercase, values as bytes).
    /// `downstream`: the client's address as Envoy sees it (`ip:port`), asked for only when the
    /// request needs the webhook (a cache hit never reads it).
    pub fn request_headers(
        &mut self,
        ctx: Ctx,
        headers: &[(String, Vec<u8>)],
        downstream: &mut dyn FnMut() -> Option<String>,
        now_ms: u64,
    ) -> Flow {
        let mut topics = std::mem::take(&mut self.topics);
        let (mut io, verifier, streams) = self.io(now_ms);
        let flow = request(&mut io, verifier, streams, &mut topics, ctx, headers, downstream);
        self.topics = topics;
        self.reschedule(now_ms);
        flow
    }

    /// A webhook answer arrived (`status` from `:status`, `None` when the host gave no headers).
    pub fn call_answered(&mut self, token: u32, status: Option<u32>, body: &[u8], now_ms: u64) {
        let (mut io, verifier, streams) = self.io(now_ms);
        let finished = verifier.answered(&mut io, token, status, body);
        deliver_all(&mut io, verifier, streams, finished);
        self.reschedule(now_ms);
    }

    /// Response headers of stream `ctx`.
    pub fn response_headers(&mut self, ctx: Ctx, headers: &[(String, Vec<u8>)], now_ms: u64) {
        let (mut io, _, streams) = self.io(now_ms);
        streams.response_headers(&mut io, ctx, headers);
        self.reschedule(now_ms);
    }

    /// A chunk of `size` bytes of stream `ctx`'s response body.
    pub fn response_body(
        &mut self,
        ctx: Ctx,
        size: usize,
        end_of_stream: bool,
        reader: &mut dyn ChunkReader,
        now_ms: u64,
    ) -> Flow {
        let (mut io, _, streams) = self.io(now_ms);
        let flow = streams.body(&mut io, ctx, size, end_of_stream, reader);
        self.reschedule(now_ms);
        flow
    }

    /// The worker's release queue delivered its signal (`Effect::Enqueue`): every chunk held since
    /// goes on.
    pub fn released(&mut self, now_ms: u64) {
        let (mut io, _, streams) = self.io(now_ms);
        streams.released(&mut io);
    }

    /// The worker's timer fired.
    pub fn tick(&mut self, now_ms: u64) {
        let root = self.root;
        let (mut io, verifier, streams) = self.io(now_ms);
        let finished = verifier.tick(&mut io, root);
        deliver_all(&mut io, verifier, streams, finished);
        let reverify = streams.tick(&mut io);
        start_reverifications(&mut io, verifier, streams, root, reverify);
        for parked in streams.take_parked() {
            refresh_or_wait(&mut io, streams, parked);
        }
        self.reschedule(now_ms);
    }

    /// Stream `ctx` is gone (`on_done`).
    pub fn stream_done(&mut self, ctx: Ctx, now_ms: u64) {
        let (mut io, verifier, streams) = self.io(now_ms);
        streams.close(&mut io, ctx);
        verifier.leave(&mut io, ctx);
        self.reschedule(now_ms);
    }

    /// The outcome of an effect. `Some(flow)`: what the callback running now must return instead of
    /// what the engine said.
    pub fn receipt(&mut self, receipt: Receipt, now_ms: u64) -> Option<Flow> {
        let user_header = self.cfg.user_header.clone();
        let (mut io, verifier, streams) = self.io(now_ms);
        let flow = match receipt {
            Receipt::Dispatched { key, from, token } => {
                let finished = verifier.dispatched(&mut io, key, from, token);
                deliver_all(&mut io, verifier, streams, finished);
                None
            }
            Receipt::Written { ctx } => {
                streams.written(&mut io, ctx);
                None
            }
            Receipt::Failed(effect) => match &effect {
                Effect::RemoveRequestHeader { ctx, .. } | Effect::SetRequestHeader { ctx, .. } => {
                    // The request cannot be made safe to forward: refuse it, and forget it.
                    if matches!(&effect, Effect::SetRequestHeader { name, .. } if *name == user_header) {
                        io.tally.add(Metric::Allowed, -1);
                    }
                    streams.close(&mut io, *ctx);
                    verifier.leave(&mut io, *ctx);
                    io.reply(*ctx, Reply::new(Code::AuthUnavailable, "the request could not be processed"));
                    Some(Flow::Pause)
                }
                Effect::Reply { .. } | Effect::NoContent { .. } => {
                    io.log(Level::Warn, "revenprox: local reply failed".to_string());
                    None
                }
                Effect::ResumeRequest { .. } => {
                    io.log(Level::Warn, "revenprox: resuming a request failed".to_string());
                    None
                }
                _ => streams.failed(&mut io, &effect),
            },
        };
        self.reschedule(now_ms);
        flow
    }

    /// Sets the worker's timer to the earliest due call or session deadline (or stops it).
    fn reschedule(&mut self, now_ms: u64) {
        let next = [self.verifier.next_due_ms(), self.streams.next_deadline_ms()].into_iter().flatten().min();
        let period = next.map_or(0, |due| due.saturating_sub(now_ms).clamp(MIN_TICK_MS, MAX_TICK_MS));
        if period != self.tick_ms {
            self.tick_ms = period;
            self.out.push(Effect::SetTick { ms: period });
        }
    }
}

fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
}

/// The request headers callback: the client's identity header goes, tokens leave the URL, then the
/// gate decides.
fn request<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    verifier: &mut Verifier,
    streams: &mut Streams,
    topics: &mut crate::auth::topic::Ids,
    ctx: Ctx,
    headers: &[(String, Vec<u8>)],
    downstream: &mut dyn FnMut() -> Option<String>,
) -> Flow {
    let cfg = io.cfg;
    io.tally.inc(Metric::Requests);
    // The identity header is ours alone, in every spelling an upstream might fold into it (CGI,
    // WSGI, Rack and PHP read `x_user`, `X-User` and `x.user` as the same variable).
    for (name, _) in headers {
        if header_name::same(name, &cfg.user_header) {
            io.out.push(Effect::RemoveRequestHeader { ctx, name: name.clone() });
        }
    }
    let raw_path = find(headers, ":path").unwrap_or_default();
    // Read leniently so that a path with bytes that are not UTF-8 still loses its token below.
    let lossy = String::from_utf8_lossy(raw_path);
    let path: &str = &lossy;
    // Tokens leave the URL before anything else: the upstream and Envoy's access log never see them.
    if let Some(stripped) = gate::stripped_path(cfg, path) {
        io.out.push(Effect::SetRequestHeader {
            ctx,
            name: ":path".to_string(),
            value: stripped.into_bytes(),
        });
    }
    if std::str::from_utf8(raw_path).is_err() {
        io.reply(ctx, Reply::new(Code::NoTopic, "the path names no topic"));
        return Flow::Pause;
    }
    // Several Cookie headers (HTTP/1.1 clients may send them) are one cookie list.
    let cookies: Vec<&[u8]> =
        headers.iter().filter(|(k, _)| k == "cookie").map(|(_, v)| v.as_slice()).collect();
    let joined = if cookies.len() > 1 { Some(cookies.join(&b"; "[..])) } else { None };
    let request = gate::Request {
        method: find(headers, ":method").unwrap_or_default(),
        path,
        content_type: find(headers, "content-type"),
        authorization: find(headers, "authorization"),
        cookie: joined.as_deref().or_else(|| cookies.first().copied()),
    };
    match gate::admit_with(cfg, &request, io.now_ms / 1000, &mut |segment| topics.id(segment)) {
        Step::Reply(reply) => {
            io.reply(ctx, reply);
            Flow::Pause
        }
        Step::Pass => {
            io.tally.inc(Metric::Allowed);
            forwarding(io, ctx, headers, &cookies, !gate::outside_prefix(cfg, path));
            Flow::Continue
        }
        Step::Other => {
            io.tally.inc(Metric::OtherPaths);
            forwarding(io, ctx, headers, &cookies, false);
            Flow::Continue
        }
        Step::Verify(v) => {
            let purpose = if v.reauth { Purpose::Refresh } else { Purpose::Forward };
            if purpose == Purpose::Refresh && misrouted_refresh(io, verifier, streams, &v) {
                io.reply(
                    ctx,
                    Reply::new(Code::UserMismatch, "the token's user has no open stream on this topic"),
                );
                return Flow::Pause;
            }
            if purpose == Purpose::Refresh {
                streams.refresh_posted(ctx, io.now_ms);
            }
            let mut client_key = || downstream().as_deref().and_then(crate::resilience::clients::key);
            let started = verifier.begin(io, ctx, ctx, v, purpose, &mut client_key);
            // A request refused at once is never forwarded: only one that may be loses what it
            // must not take to the upstream.
            let refused =
                matches!(&started, Started::Done(f) if !matches!(f.verdict, Verdicted::Allowed { .. }));
            if purpose == Purpose::Forward && !refused {
                forwarding(io, ctx, headers, &cookies, true);
            }
            match started {
                Started::Done(finished) => deliver(io, verifier, streams, finished, Some(ctx)),
                Started::Pending => Flow::Pause,
            }
        }
    }
}

/// A challenge response whose claimed user (the JWT's `sub`) has no open stream on the topic in
/// this Envoy, once this worker learned that the webhook's user ids are those claims: refused
/// before any webhook call (the verdict could only lead to 403).
fn misrouted_refresh<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    verifier: &Verifier,
    streams: &Streams,
    v: &gate::Verification,
) -> bool {
    if !io.cfg.sse.early_refresh_refusal
        || v.credential.kind != crate::auth::token::Kind::Jwt
        || !verifier.subjects().trusted()
    {
        return false;
    }
    let Some(sub) = crate::auth::precheck::claimed_subject(&v.credential.value) else {
        return false;
    };
    let key = presence::stream_key(&sub, &v.topic_id);
    if streams.has_local(&key) || shared::presence_count(io.store, &key, io.now_ms) > 0 {
        return false;
    }
    // Another worker may have seen a webhook whose user ids are not subs: then the stream of the
    // user this token really names may be here under another id.
    if shared::user_ids_not_sub(io.store) > 0 {
        return false;
    }
    // The claim is unverified: quoted and cut short, so it cannot forge or flood a log line.
    let shown: String = sub.chars().take(64).collect();
    let line = format!(
        "revenprox: refresh refused: claimed user {shown:?} has no open stream on topic {} here (no webhook call)",
        v.topic_id
    );
    io.log(Level::Info, line);
    true
}

/// What a request the filter forwards loses first (every forwarded request: verified, passed, or
/// on another path). `topic`: the path may be read as a topic path (`gate::outside_prefix`).
///
/// On a topic path `Accept-Encoding` goes too: the filter writes plain text between upstream
/// events, so the upstream must send the stream uncompressed (Envoy's compressor filter placed
/// before this one compresses what the client receives, injections included).
fn forwarding<S: ?Sized>(
    io: &mut Io<S>,
    ctx: Ctx,
    headers: &[(String, Vec<u8>)],
    cookies: &[&[u8]],
    topic: bool,
) {
    if topic && find(headers, "accept-encoding").is_some() {
        io.out.push(Effect::RemoveRequestHeader { ctx, name: "accept-encoding".to_string() });
    }
    if !io.cfg.token.forward_to_upstream {
        strip_credentials(io, ctx, headers, cookies, topic);
    }
}

/// The credential stays with the filter (like `jwt_authn`'s `forward: false`). The token cookie
/// (only that cookie) exists only for the filter, and browsers send it with every request to the
/// origin: it is removed from every forwarded request. The `Authorization` header is removed on
/// topic paths; elsewhere it may be the application's own authentication, which the filter neither
/// reads nor touches there (like `jwt_authn`, which leaves requests its rules do not match alone).
fn strip_credentials<S: ?Sized>(
    io: &mut Io<S>,
    ctx: Ctx,
    headers: &[(String, Vec<u8>)],
    cookies: &[&[u8]],
    topic: bool,
) {
    if topic && find(headers, "authorization").is_some() {
        io.out.push(Effect::RemoveRequestHeader { ctx, name: "authorization".to_string() });
    }
    let name = &io.cfg.token.cookie;
    if name.is_empty() || cookies.is_empty() {
        return;
    }
    let joined = cookies.join(&b"; "[..]);
    let kept = crate::auth::token::strip_cookie(&joined, name);
    if kept.as_deref() == Some(joined.as_slice()) {
        return;
    }
    io.out.push(match kept {
        Some(value) => Effect::SetRequestHeader { ctx, name: "cookie".to_string(), value },
        None => Effect::RemoveRequestHeader { ctx, name: "cookie".to_string() },
    });
}

/// Starts the re-verifications the streams asked for, from the root's timer.
fn start_reverifications<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    verifier: &mut Verifier,
    streams: &mut Streams,
    root: Ctx,
    due: Vec<Reverify>,
) {
    for r in due {
        let v = gate::Verification {
            cacheable: r.credential.kind == crate::auth::token::Kind::Jwt && io.cfg.verifier.cache_enabled(),
            credential: r.credential,
            topic_id: r.topic_id,
            reauth: false,
            client: None,
            client_probe: false,
            precheck_due: false,
            claims: None,
        };
        if let Started::Done(finished) = verifier.begin(io, r.ctx, root, v, Purpose::Reverify, &mut || None) {
            deliver(io, verifier, streams, finished, None);
        }
    }
}

fn deliver_all<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    verifier: &mut Verifier,
    streams: &mut Streams,
    finished: Vec<Finished>,
) {
    for f in finished {
        deliver(io, verifier, streams, f, None);
    }
}

/// A verdict for every stream that waited for it, by purpose. A request to forward gets its
/// identity and goes upstream (resumed, unless its own callback is running: `in_callback`), or its
/// refusal; a challenge response is answered here (204 when the user has an open stream on the
/// topic, which then takes the new expiry, else 403); a re-verified stream goes on or ends, and
/// when it ends because the credential now names another user, the credential is revoked like a
/// denied one (no cache serves it again). The flow is the one for `in_callback`'s request.
fn deliver<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    verifier: &mut Verifier,
    streams: &mut Streams,
    f: Finished,
    in_callback: Option<Ctx>,
) -> Flow {
    let mut flow = Flow::Pause;
    let mut other_user = false;
    for w in &f.waiters {
        let ctx = w.context_id;
        match (w.purpose, &f.verdict) {
            (Purpose::Reverify, verdict) => {
                other_user |= streams.reverified(io, ctx, &f.credential, verdict) == Reverified::OtherUser;
            }
            (_, verdict @ (Verdicted::Denied | Verdicted::Failed | Verdicted::Refused(_))) => {
                if let Some(reply) = verdict.refusal() {
                    io.reply(ctx, reply);
                }
            }
            (Purpose::Forward, Verdicted::Allowed { user_id, expires_at }) => {
                if io.cfg.sse.max_streams_per_user > 0 && !streams.reserve(io, ctx, user_id) {
                    let reply =
                        Reply::new(Code::TooManyStreams, "the user has too many open streams").retry_after(1);
                    io.reply(ctx, reply);
                    continue;
                }
                io.out.push(Effect::SetRequestHeader {
                    ctx,
                    name: io.cfg.user_header.clone(),
                    value: user_id.clone().into_bytes(),
                });
                io.tally.inc(Metric::Allowed);
                let identity = Identity {
                    user_id: user_id.clone(),
                    topic_id: f.topic_id.clone(),
                    expires_at: *expires_at,
                    credential: f.credential.clone(),
                };
                streams.allowed(ctx, identity);
                if in_callback == Some(ctx) {
                    flow = Flow::Continue;
                } else {
                    io.out.push(Effect::ResumeRequest { ctx });
                }
            }
            (Purpose::Refresh, Verdicted::Allowed { user_id, expires_at }) => {
                refresh_streams(io, streams, ctx, &f, user_id, *expires_at);
            }
        }
    }
    if other_user {
        verifier.revoke_credential(io, &f.credential, &f.topic_id);
    }
    flow
}

/// An allowed challenge response: 204 when its user has an open stream on the topic in this Envoy
/// (the streams on this worker take the refresh at once, the others from the refresh record),
/// else 403.
fn refresh_streams<S: SharedStore + ?Sized>(
    io: &mut Io<S>,
    streams: &mut Streams,
    ctx: Ctx,
    f: &Finished,
    user_id: &str,
    expires_at: u64,
) {
    // A refresh is as old as its request (a verdict without one, in tests, is dated now).
    let (posted_ms, posted_seq) = streams.take_posted(ctx).unwrap_or((io.now_ms, u64::MAX));
    let parked = streams::Parked {
        ctx,
        key: presence::stream_key(user_id, &f.topic_id),
        user_id: user_id.to_string(),
        topic_id: f.topic_id.clone(),
        credential: f.credential.clone(),
        expires_at,
        posted_ms,
        posted_seq,
        until_ms: io.now_ms.saturating_add(streams::REFRESH_GRACE_MS),
    };
    refresh_or_wait(io, streams, parked);
}

/// An accepted refresh: its user's streams on its topic take it (those of this worker at once, the
/// others from the refresh record) and the client gets 204; while no such stream is known in the
/// Envoy it waits (`streams::Parked`), and is refused 403 once its grace has run out.
fn refresh_or_wait<S: SharedStore + ?Sized>(io: &mut Io<S>, streams: &mut Streams, p: streams::Parked) {
    let now_ms = io.now_ms;
    // A stream on this worker opened so recently that no tick has registered it yet counts too.
    let present = streams.has_local(&p.key) || shared::presence_count(io.store, &p.key, now_ms) > 0;
    if !present {
        if now_ms < p.until_ms {
            streams.park(p);
            return;
        }
        // Worth an operator's attention: the client's refresh reached a replica without its stream
        // (routing by user, not by connection, avoids it; README "Scaling and state").
        let line = format!(
            "revenprox: refresh refused: user {} has no open stream on topic {} here",
            p.user_id, p.topic_id
        );
        io.log(Level::Info, line);
        io.reply(p.ctx, Reply::new(Code::UserMismatch, "the token's user has no open stream on this topic"));
        return;
    }
    // The refresh is as old as its request: a stream opened while the webhook answered or while it
    // waited never takes it (`adopt_refresh` compares this with the stream's opening), and a later
    // refresh stays newer.
    let record = refresh::Entry {
        key: refresh::key(&p.user_id, &p.topic_id),
        at_ms: p.posted_ms,
        expires_at: p.expires_at,
        credential: p.credential.clone(),
    };
    shared::refresh_put(io.store, &record, now_ms);
    streams.refreshed(&p.key, &p.credential, p.expires_at, p.posted_ms, p.posted_seq, now_ms);
    io.tally.inc(Metric::Reauthorizations);
    if io.debug {
        let line = format!(
            "revenprox: re-authorized user={} topic={} until {}",
            p.user_id, p.topic_id, p.expires_at
        );
        io.log(Level::Debug, line);
    }
    io.out.push(Effect::NoContent { ctx: p.ctx });
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests;
