//! Whole scenarios through the engine, natively: host events in, exact effects out. A `Host` here
//! plays Envoy's part the way `src/host/apply.rs` does (performs effects, sends receipts), with
//! call tokens of its own, so the tests read like the e2e suite without an Envoy.

use super::effect::{Ctx, Effect, Flow, Receipt, WebhookCall};
use super::metrics::{Metric, Update};
use super::streams::REFRESH_GRACE_MS;
use super::{ChunkReader, Engine};
use crate::auth::reply::Code;
use crate::auth::topic;
use crate::config::{self, Config};
use crate::resilience::flight::FlightKey;
use crate::shared::{MemStore, SharedStore};
use crate::sse::session::{ExpiryReason, Injection};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::collections::HashMap;

const ROOT: Ctx = 1;
/// 2030-01-01: every test token's `exp` is relative to this.
const T0: u64 = 1_893_456_000_000;
const T0_SEC: u64 = T0 / 1000;

fn cfg(extra: &str) -> Config {
    let base = r#""jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook"}"#;
    config::parse(format!("{{{base}{extra}}}").as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

/// A compact JWT (unsigned: the webhook decides) for `sub`, expiring `ttl` seconds after T0.
fn jwt(sub: &str, ttl: u64) -> String {
    format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
        URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"{sub}","exp":{}}}"#, T0_SEC + ttl))
    )
}

fn get(path: &str, token: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        ("authorization".into(), format!("Bearer {token}").into_bytes()),
    ]
}

fn refresh(path: &str, token: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), path.as_bytes().to_vec()),
        ("content-type".into(), b"application/x-challenge-response".to_vec()),
        ("authorization".into(), format!("Bearer {token}").into_bytes()),
    ]
}

fn sse_response() -> Vec<(String, Vec<u8>)> {
    vec![(":status".into(), b"200".to_vec()), ("content-type".into(), b"text/event-stream".to_vec())]
}

fn verdict(user: &str, ttl: u64) -> Vec<u8> {
    format!(r#"{{"valid":true,"user_id":"{user}","expires_at":{}}}"#, T0_SEC + ttl).into_bytes()
}

const DENY: &[u8] = br#"{"valid":false,"user_id":null,"expires_at":null}"#;

struct Chunk<'a>(&'a [u8]);

impl ChunkReader for Chunk<'_> {
    fn read(&mut self, start: usize, len: usize) -> Vec<u8> {
        self.0.get(start..).map(|s| s.get(..len).unwrap_or(s).to_vec()).unwrap_or_default()
    }
}

/// One worker's engine with an Envoy stand-in: performs effects the way `src/host/apply.rs` does
/// (receipts included) and records what reached the "wire".
struct Host {
    engine: Engine<MemStore>,
    now: u64,
    next_token: u32,
    /// Dispatched calls not answered yet: token → (flight, from, body).
    calls: HashMap<u32, (FlightKey, Ctx, WebhookCall)>,
    /// Everything performed, in order (logs and timer changes left out).
    done: Vec<Effect>,
    /// Contexts gone: effects on them fail as in Envoy.
    gone: Vec<Ctx>,
    /// `Inject` succeeds only on a held body.
    held: HashMap<Ctx, bool>,
    /// The bytes Envoy holds for a stream until their release: a chunk arriving meanwhile is handed
    /// over after them, as Envoy does.
    buffers: HashMap<Ctx, Vec<u8>>,
    /// What a `ReplaceChunk` made of the chunk in flight.
    replaced: HashMap<Ctx, Vec<u8>>,
    tick_ms: u64,
    metrics: HashMap<&'static str, i64>,
    /// The client address of the next requests.
    address: String,
}

impl Host {
    fn new(cfg: Config, store: MemStore) -> Host {
        let engine = Engine::new(cfg, store, ROOT, 7, true, false, T0);
        let mut h = Host {
            engine,
            now: T0,
            next_token: 100,
            calls: HashMap::new(),
            done: Vec::new(),
            gone: Vec::new(),
            held: HashMap::new(),
            buffers: HashMap::new(),
            replaced: HashMap::new(),
            tick_ms: 0,
            metrics: HashMap::new(),
            address: "10.0.0.1:40000".to_string(),
        };
        h.run();
        h
    }

    /// Performs pending effects until none is left; receipts go back to the engine.
    fn run(&mut self) -> Option<Flow> {
        let mut changed = None;
        loop {
            let effects = self.engine.take_effects();
            if effects.is_empty() {
                break;
            }
            for effect in effects {
                if effect.ctx().is_some_and(|c| self.gone.contains(&c)) {
                    continue;
                }
                let receipt = match &effect {
                    Effect::Dispatch { from, key, call } => {
                        self.next_token += 1;
                        self.calls.insert(self.next_token, (*key, *from, call.clone()));
                        Some(Receipt::Dispatched { key: *key, from: *from, token: Some(self.next_token) })
                    }
                    Effect::Inject { ctx, .. } => Some(if self.held.get(ctx) == Some(&true) {
                        self.buffers.remove(ctx);
                        Receipt::Written { ctx: *ctx }
                    } else {
                        Receipt::Failed(effect.clone())
                    }),
                    Effect::ReplaceChunk { ctx, bytes, .. } => {
                        self.replaced.insert(*ctx, bytes.clone());
                        Some(Receipt::Written { ctx: *ctx })
                    }
                    Effect::ResumeResponse { ctx } => {
                        self.buffers.remove(ctx);
                        None
                    }
                    Effect::SetTick { ms } => {
                        self.tick_ms = *ms;
                        None
                    }
                    _ => None,
                };
                if !matches!(effect, Effect::Log { .. } | Effect::SetTick { .. }) {
                    self.done.push(effect);
                }
                if let Some(r) = receipt {
                    if let Some(f) = self.engine.receipt(r, self.now) {
                        changed = Some(f);
                    }
                }
            }
        }
        for update in self.engine.take_metrics() {
            if let Update::Add(m, d) = update {
                *self.metrics.entry(m.name()).or_default() += d;
            }
        }
        changed
    }

    fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.done)
    }

    fn metric(&self, m: Metric) -> i64 {
        self.metrics.get(m.name()).copied().unwrap_or(0)
    }

    fn request(&mut self, ctx: Ctx, headers: &[(String, Vec<u8>)]) -> Flow {
        let address = self.address.clone();
        let flow = self.engine.request_headers(ctx, headers, &mut || Some(address.clone()), self.now);
        self.run().unwrap_or(flow)
    }

    /// The webhook answers call `token` with a 200 and `body` (or another status).
    fn answer(&mut self, token: u32, status: u32, body: &[u8]) {
        assert!(self.calls.remove(&token).is_some(), "no call {token} in progress");
        self.engine.call_answered(token, Some(status), body, self.now);
        self.run();
    }

    fn pending_calls(&self) -> Vec<(u32, Ctx)> {
        let mut v: Vec<(u32, Ctx)> = self.calls.iter().map(|(t, (_, from, _))| (*t, *from)).collect();
        v.sort_unstable();
        v
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
    }

    /// Time passes timer period by timer period (as Envoy's timer fires) until `until`.
    fn tick_until(&mut self, until: u64) {
        let mut rounds = 0;
        while self.now < until && rounds < 100_000 {
            rounds += 1;
            let step = if self.tick_ms == 0 { until - self.now } else { self.tick_ms.min(until - self.now) };
            self.now += step;
            if self.tick_ms != 0 {
                self.engine.tick(self.now);
                self.run();
            }
        }
    }

    fn done_stream(&mut self, ctx: Ctx) {
        self.gone.push(ctx);
        self.engine.stream_done(ctx, self.now);
        self.run();
    }

    fn response(&mut self, ctx: Ctx) {
        self.engine.response_headers(ctx, &sse_response(), self.now);
        self.run();
    }

    /// Upstream bytes for stream `ctx`: the body callback gets them after whatever Envoy still
    /// holds for the stream.
    fn body(&mut self, ctx: Ctx, bytes: &[u8], eos: bool) -> Flow {
        let mut buffer = if self.held.get(&ctx) == Some(&true) {
            self.buffers.remove(&ctx).unwrap_or_default()
        } else {
            Vec::new()
        };
        buffer.extend_from_slice(bytes);
        self.held.insert(ctx, false);
        let flow = self.engine.response_body(ctx, buffer.len(), eos, &mut Chunk(&buffer), self.now);
        let flow = self.run().unwrap_or(flow);
        let buffer = self.replaced.remove(&ctx).unwrap_or(buffer);
        // A paused body callback leaves the body buffer with the filter (writable from a timer).
        self.held.insert(ctx, flow == Flow::Pause);
        if flow == Flow::Pause {
            self.buffers.insert(ctx, buffer);
        }
        flow
    }

    /// The worker's queue delivers the release signal.
    fn released(&mut self) {
        self.engine.released(self.now);
        self.run();
    }

    /// Opens an allowed SSE stream on `ctx` for `user` (webhook answers at once).
    fn open(&mut self, ctx: Ctx, token: &str, user: &str, ttl: u64) {
        assert_eq!(self.request(ctx, &get("/events/news", token)), Flow::Pause);
        let (call, _) = *self.pending_calls().last().unwrap_or(&(0, 0));
        self.answer(call, 200, &verdict(user, ttl));
        self.response(ctx);
        assert_eq!(self.body(ctx, b"data: hello\n\n", false), Flow::Pause);
        self.released();
        self.take();
    }
}

fn user_header(ctx: Ctx, user: &str) -> Effect {
    Effect::SetRequestHeader { ctx, name: "x-revenprox-user".into(), value: user.as_bytes().to_vec() }
}

fn reply_code(e: &Effect) -> Option<(Ctx, Code)> {
    match e {
        Effect::Reply { ctx, reply } => Some((*ctx, reply.code)),
        _ => None,
    }
}

#[test]
fn herd_fans_one_verdict_out_to_every_waiter() {
    let mut h = Host::new(cfg(""), MemStore::new());
    let token = jwt("alice", 600);
    for ctx in [10, 11, 12] {
        assert_eq!(h.request(ctx, &get("/events/news", &token)), Flow::Pause);
    }
    // One call, made from the first stream (its answer comes back there).
    assert_eq!(h.pending_calls(), vec![(101, 10)]);
    let effects = h.take();
    // The credential stays with the filter: each request loses its Authorization header.
    for ctx in [10, 11, 12] {
        assert!(effects.contains(&Effect::RemoveRequestHeader { ctx, name: "authorization".into() }));
    }
    let Some(Effect::Dispatch { call, .. }) = effects.iter().find(|e| matches!(e, Effect::Dispatch { .. }))
    else {
        panic!("{effects:?}")
    };
    let topic = topic::id("news").unwrap_or_default();
    assert_eq!(call.body, format!(r#"{{"jwt":"{token}","topic":"{topic}"}}"#));
    assert_eq!(
        (call.cluster.as_str(), call.authority.as_str(), call.path.as_str()),
        ("auth_webhook", "auth.test", "/verify")
    );
    assert_eq!(h.metric(Metric::SingleflightJoins), 2);
    h.answer(101, 200, &verdict("alice", 600));
    assert_eq!(
        h.take(),
        vec![
            user_header(10, "alice"),
            Effect::ResumeRequest { ctx: 10 },
            user_header(11, "alice"),
            Effect::ResumeRequest { ctx: 11 },
            user_header(12, "alice"),
            Effect::ResumeRequest { ctx: 12 },
        ]
    );
    // The verdict is cached: the next request continues at once, from the local cache.
    assert_eq!(h.request(13, &get("/events/news", &token)), Flow::Continue);
    assert_eq!(
        h.take(),
        vec![Effect::RemoveRequestHeader { ctx: 13, name: "authorization".into() }, user_header(13, "alice")]
    );
    assert_eq!(
        (h.metric(Metric::WebhookCalls), h.metric(Metric::CacheHits), h.metric(Metric::Allowed)),
        (1, 1, 4)
    );
}

#[test]
fn retries_back_off_from_the_root_then_fail_every_waiter() {
    let mut h = Host::new(
        cfg(
            r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":2}"#,
        ),
        MemStore::new(),
    );
    let token = jwt("bob", 600);
    h.request(20, &get("/events/news", &token));
    h.request(21, &get("/events/news", &token));
    h.take();
    h.answer(101, 500, b"oops");
    assert!(h.take().is_empty(), "a failed call is retried, not answered");
    // The retry is due 100 ms later, made from the root's timer.
    h.tick_until(h.now + 99);
    assert!(h.pending_calls().is_empty());
    h.tick_until(h.now + 1);
    assert_eq!(h.pending_calls(), vec![(102, ROOT)]);
    h.take();
    h.answer(102, 503, b"");
    h.tick_until(h.now + 200);
    assert_eq!(h.pending_calls(), vec![(103, ROOT)]);
    h.take();
    h.answer(103, 200, b"not json");
    let codes: Vec<_> = h.take().iter().filter_map(reply_code).collect();
    assert_eq!(codes, vec![(20, Code::AuthUnavailable), (21, Code::AuthUnavailable)]);
    assert_eq!((h.metric(Metric::WebhookCalls), h.metric(Metric::WebhookRetries)), (3, 2));
    assert_eq!(h.metric(Metric::WebhookFailuresMalformed), 1);
    assert_eq!(h.metric(Metric::DeniedAuthUnavailable), 2);
}

#[test]
fn a_timed_out_call_is_a_timeout_failure() {
    let mut h = Host::new(
        cfg(
            r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":0,"timeout_ms":1000}"#,
        ),
        MemStore::new(),
    );
    h.request(30, &get("/events/news", &jwt("carol", 600)));
    h.take();
    // Envoy answers a call that ran out of time with its own 504.
    h.advance(1000);
    h.answer(101, 504, b"upstream request timeout");
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(30, Code::AuthUnavailable)]);
    assert_eq!((h.metric(Metric::WebhookFailuresTimeout), h.metric(Metric::WebhookFailuresStatus)), (1, 0));
    // A 504 well before the timeout is the webhook's own status.
    h.request(31, &get("/events/news", &jwt("carol2", 600)));
    h.answer(102, 504, b"");
    assert_eq!((h.metric(Metric::WebhookFailuresTimeout), h.metric(Metric::WebhookFailuresStatus)), (1, 1));
}

#[test]
fn an_abandoned_probe_is_given_back() {
    let extra = r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":0,"circuit_breaker_threshold":2,"circuit_breaker_timeout_sec":10}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    // Failures of two client addresses open the Envoy-wide circuit.
    for (ctx, call, address) in [(40, 101, "10.0.0.1:1"), (41, 102, "10.0.0.2:1")] {
        h.address = address.into();
        h.request(ctx, &get("/events/news", &jwt(&format!("u{ctx}"), 600)));
        h.answer(call, 500, b"");
    }
    assert_eq!(h.metric(Metric::CircuitOpened), 1);
    h.take();
    // Open: refused at once, no call.
    h.request(42, &get("/events/news", &jwt("u42", 600)));
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(42, Code::AuthUnavailable)]);
    // After the timeout one request probes; its client leaves during the call.
    h.advance(10_000);
    h.request(43, &get("/events/news", &jwt("u43", 600)));
    assert_eq!(h.pending_calls(), vec![(103, 43)]);
    h.done_stream(43);
    // The probe was given back: the next request probes at once instead of a 503.
    h.take();
    h.request(44, &get("/events/news", &jwt("u44", 600)));
    assert!(h.take().iter().any(|e| matches!(e, Effect::Dispatch { from: 44, .. })));
    h.answer(104, 200, &verdict("u44", 600));
    assert_eq!(h.metric(Metric::CircuitClosed), 1);
}

#[test]
fn a_caller_gone_mid_flight_hands_the_call_to_the_root() {
    let mut h = Host::new(cfg(""), MemStore::new());
    let token = jwt("dave", 600);
    h.request(50, &get("/events/news", &token));
    h.request(51, &get("/events/news", &token));
    assert_eq!(h.pending_calls(), vec![(101, 50)]);
    // The caller leaves: Envoy drops its call, the flight calls again from the root, not counted.
    h.done_stream(50);
    h.calls.remove(&101);
    h.take();
    h.tick_until(h.now + 20);
    assert_eq!(h.pending_calls(), vec![(102, ROOT)]);
    h.answer(102, 200, &verdict("dave", 600));
    assert_eq!(h.take().last(), Some(&Effect::ResumeRequest { ctx: 51 }));
    assert_eq!(h.metric(Metric::WebhookRetries), 0);
    // The last waiter leaving ends the flight: a late answer changes nothing.
    h.request(52, &get("/events/news", &jwt("erin", 600)));
    h.done_stream(52);
    h.take();
    h.engine.call_answered(103, Some(200), &verdict("erin", 600), h.now);
    h.run();
    assert!(h.take().is_empty());
    assert!(h.engine.verifier().flights().is_empty());
}

#[test]
fn expiry_while_a_chunk_is_held() {
    let mut h = Host::new(cfg(r#","sse":{"challenge_before_expiry_sec":0}"#), MemStore::new());
    h.open(60, &jwt("frank", 60), "frank", 60);
    // The stream sits on a held chunk; at the token's expiry the event goes out, the stream ends.
    let expired = Injection::Expired(ExpiryReason::TokenExpired);
    h.tick_until(T0 + 60_000 - 1);
    assert!(!h.take().iter().any(|e| matches!(e, Effect::Inject { bytes, .. } if *bytes == expired.bytes())));
    h.tick_until(T0 + 60_020);
    let effects = h.take();
    assert!(effects.contains(&Effect::Inject { ctx: 60, bytes: expired.bytes() }), "{effects:?}");
    assert_eq!(h.metric(Metric::StreamsExpired), 1);
    h.tick_until(h.now + 120);
    assert!(h.take().contains(&Effect::Close { ctx: 60 }));
    // Upstream bytes after it are dropped.
    assert_eq!(h.body(60, b"data: late\n\n", false), Flow::Continue);
    assert_eq!(h.take(), vec![Effect::ReplaceChunk { ctx: 60, size: 12, bytes: vec![] }]);
}

#[test]
fn a_chunk_ending_inside_an_event_goes_on_unheld_and_the_heartbeat_waits_for_the_boundary() {
    let mut h = Host::new(cfg(r#","sse":{"heartbeat_interval_sec":1}"#), MemStore::new());
    h.open(70, &jwt("gina", 600), "gina", 600);
    // Half an event arrives and goes on unheld (nothing may be written after it): the heartbeat
    // due meanwhile waits for its end...
    h.tick_until(h.now + 500);
    assert_eq!(h.body(70, b"data: par", false), Flow::Continue);
    assert_eq!(signals(&h.take()), 0);
    h.tick_until(h.now + 1_100);
    assert!(!h.take().iter().any(|e| matches!(e, Effect::Inject { .. })));
    // ...and is spliced in right after it.
    h.body(70, b"t\n\ndata: next", false);
    let effects = h.take();
    assert!(
        effects.contains(&Effect::ReplaceChunk {
            ctx: 70,
            size: 13,
            bytes: b"t\n\n: heartbeat\n\ndata: next".to_vec()
        }),
        "{effects:?}"
    );
    assert_eq!(h.metric(Metric::HeartbeatsSent), 1);
}

#[test]
fn a_refresh_on_one_worker_extends_streams_on_another() {
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":10}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    a.open(80, &jwt("hana", 60), "hana", 60);
    // The first tick registers the stream Envoy-wide.
    a.tick_until(a.now + 20);
    // The challenge goes out 10 s before the expiry.
    a.tick_until(T0 + 50_020);
    assert!(a.take().contains(&Effect::Inject { ctx: 80, bytes: Injection::Challenge.bytes() }));
    // The client answers it on another worker with a fresh token.
    b.now = a.now;
    b.request(90, &refresh("/events/news", &jwt("hana", 120)));
    b.answer(101, 200, &verdict("hana", 120));
    assert_eq!(b.take().last(), Some(&Effect::NoContent { ctx: 90 }));
    assert_eq!(b.metric(Metric::Reauthorizations), 1);
    // Worker A's stream takes the new expiry: nothing expires at the old one.
    a.tick_until(T0 + 61_000);
    let ended = |e: &Effect| match e {
        Effect::Close { .. } => true,
        Effect::Inject { bytes, .. } => bytes.starts_with(b"event: expired"),
        _ => false,
    };
    assert!(!a.take().iter().any(ended));
    // A refresh of another user, or for a topic without a stream, is refused and extends nothing.
    b.request(91, &refresh("/events/news", &jwt("ivan", 120)));
    b.answer(102, 200, &verdict("ivan", 120));
    b.tick_until(b.now + REFRESH_GRACE_MS + 40);
    assert_eq!(b.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(91, Code::UserMismatch)]);
}

#[test]
fn denials_and_local_refusals() {
    let mut h = Host::new(cfg(""), MemStore::new());
    h.request(100, &get("/events/news", &jwt("jack", 600)));
    h.answer(101, 200, DENY);
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(100, Code::InvalidToken)]);
    // The client's identity header is removed, the token leaves the URL, then the gate refuses.
    let mut headers = get("/events/?token=abc", "x");
    headers.retain(|(k, _)| k != "authorization");
    headers.push(("x-revenprox-user".into(), b"admin".to_vec()));
    assert_eq!(h.request(101, &headers), Flow::Pause);
    assert_eq!(
        h.take()
            .iter()
            .map(|e| match e {
                Effect::Reply { ctx, reply } => format!("reply {ctx} {}", reply.code.as_str()),
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>(),
        vec![
            format!("{:?}", Effect::RemoveRequestHeader { ctx: 101, name: "x-revenprox-user".into() }),
            format!(
                "{:?}",
                Effect::SetRequestHeader { ctx: 101, name: ":path".into(), value: b"/events/".to_vec() }
            ),
            "reply 101 no_topic".to_string(),
        ]
    );
}

#[test]
fn a_failed_identity_edit_refuses_the_request() {
    let mut h = Host::new(cfg(""), MemStore::new());
    let token = jwt("kim", 600);
    h.request(110, &get("/events/news", &token));
    h.answer(101, 200, &verdict("kim", 600));
    h.take();
    // Cached now; this time the host cannot set the identity header.
    let flow = h.engine.request_headers(111, &get("/events/news", &token), &mut || None, h.now);
    assert_eq!(flow, Flow::Continue);
    let effects = h.engine.take_effects();
    assert_eq!(
        effects,
        vec![Effect::RemoveRequestHeader { ctx: 111, name: "authorization".into() }, user_header(111, "kim")]
    );
    let changed = h.engine.receipt(Receipt::Failed(user_header(111, "kim")), h.now);
    assert_eq!(changed, Some(Flow::Pause));
    let codes: Vec<_> = h.engine.take_effects().iter().filter_map(reply_code).collect();
    assert_eq!(codes, vec![(111, Code::AuthUnavailable)]);
}

fn dispatch_token(e: &Effect) -> Option<String> {
    match e {
        Effect::Dispatch { call, .. } => {
            let start = call.body.find("\"jwt\":\"")? + 7;
            call.body.get(start..)?.split('"').next().map(str::to_string)
        }
        _ => None,
    }
}

fn injected(effects: &[Effect], what: &[u8]) -> bool {
    effects.iter().any(|e| matches!(e, Effect::Inject { bytes, .. } if bytes.starts_with(what)))
}

const REVOKED: &[u8] = b"event: expired\ndata: {\"reason\":\"revoked\"}";

#[test]
fn open_streams_are_reverified_and_share_one_call() {
    let mut h = Host::new(cfg(r#","sse":{"reverify_interval_sec":10}"#), MemStore::new());
    let token = jwt("lena", 3_600);
    h.open(130, &token, "lena", 3_600);
    // A second stream of the same credential and topic: served from the cache.
    assert_eq!(h.request(131, &get("/events/news", &token)), Flow::Continue);
    h.response(131);
    h.body(131, b"data: x\n\n", false);
    h.take();
    let calls = h.metric(Metric::WebhookCalls);
    // Within the interval (spread over its last tenth), one call for both streams, from the root.
    h.tick_until(T0 + 10_000);
    let effects = h.take();
    let dispatched: Vec<_> = effects.iter().filter_map(dispatch_token).collect();
    assert_eq!(dispatched, vec![token.clone()], "{effects:?}");
    assert_eq!(h.pending_calls().len(), 1);
    assert_eq!(h.pending_calls()[0].1, ROOT);
    assert_eq!(h.metric(Metric::Reverifications), 1);
    // Still valid, with a later expiry: both go on and take it.
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 200, &verdict("lena", 7_200));
    assert_eq!(h.engine.streams().expires_at(130), Some(T0_SEC + 7_200));
    assert_eq!(h.engine.streams().expires_at(131), Some(T0_SEC + 7_200));
    // And again one interval later.
    h.tick_until(T0 + 20_000);
    assert_eq!(h.pending_calls().len(), 1);
    assert_eq!(h.metric(Metric::WebhookCalls), calls + 2);
}

#[test]
fn a_refused_reverification_revokes_the_stream_and_the_cache_everywhere() {
    revoked_everywhere(DENY);
}

#[test]
fn a_reverification_for_another_user_revokes_the_stream_and_the_cache_everywhere() {
    // The contract treats "valid for another user_id" as a denial: the allow it carries must not
    // be cached either, or both workers go on serving the credential (as either user).
    revoked_everywhere(&verdict("someone-else", 3_600));
}

fn revoked_everywhere(answer: &[u8]) {
    let store = MemStore::new();
    let extra = r#","sse":{"reverify_interval_sec":5}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    let token = jwt("mona", 3_600);
    a.open(140, &token, "mona", 3_600);
    // Worker B has the verdict in its local cache too.
    b.now = a.now;
    assert_eq!(b.request(150, &get("/events/news", &token)), Flow::Continue);
    b.take();
    a.tick_until(T0 + 5_000);
    let (call, _) = a.pending_calls()[0];
    a.answer(call, 200, answer);
    a.tick_until(a.now + 40);
    let effects = a.take();
    assert!(injected(&effects, REVOKED), "{effects:?}");
    assert_eq!(a.metric(Metric::StreamsRevoked), 1);
    a.tick_until(a.now + 200);
    assert!(a.take().contains(&Effect::Close { ctx: 140 }));
    // Neither worker serves the credential from its cache any more: the webhook is asked.
    for (h, ctx) in [(&mut a, 141), (&mut b, 151)] {
        assert_eq!(h.request(ctx, &get("/events/news", &token)), Flow::Pause);
        assert!(h.take().iter().any(|e| dispatch_token(e).as_deref() == Some(token.as_str())));
    }
}

#[test]
fn a_failed_reverification_leaves_the_stream_until_its_expiry() {
    let extra = r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":0},"sse":{"reverify_interval_sec":5,"challenge_before_expiry_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(160, &jwt("nina", 12), "nina", 12);
    h.tick_until(T0 + 5_000);
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 503, b"");
    h.tick_until(T0 + 9_000);
    assert!(!h.take().iter().any(|e| matches!(e, Effect::Close { .. })));
    assert_eq!(h.metric(Metric::ReverifyFailures), 1);
    // The server-side refresh before the expiry fails too; the token's expiry still ends it.
    for (call, _) in h.pending_calls() {
        h.answer(call, 503, b"");
    }
    h.tick_until(T0 + 12_050);
    let effects = h.take();
    assert!(injected(&effects, b"event: expired\ndata: {\"reason\":\"token_expired\"}"), "{effects:?}");
}

#[test]
fn the_per_user_limit_counts_streams_of_every_worker() {
    let store = MemStore::new();
    let extra = r#","sse":{"max_streams_per_user":2}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    a.open(170, &jwt("olga", 600), "olga", 600);
    b.open(180, &jwt("olga", 601), "olga", 600);
    // A third stream, any topic, on either worker: 429 too_many_streams, nothing forwarded.
    assert_eq!(a.request(171, &get("/events/sports", &jwt("olga", 602))), Flow::Pause);
    a.answer(a.pending_calls()[0].0, 200, &verdict("olga", 600));
    let effects = a.take();
    assert_eq!(effects.iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(171, Code::TooManyStreams)]);
    assert!(!effects.iter().any(|e| matches!(e, Effect::ResumeRequest { .. })));
    // Another user is not affected; a challenge response never counts.
    assert_eq!(a.request(172, &get("/events/news", &jwt("pia", 600))), Flow::Pause);
    a.answer(a.pending_calls()[0].0, 200, &verdict("pia", 600));
    assert_eq!(a.take().last(), Some(&Effect::ResumeRequest { ctx: 172 }));
    // One of olga's streams ends: a new one is accepted at once.
    b.done_stream(180);
    assert_eq!(a.request(173, &get("/events/news", &jwt("olga", 600))), Flow::Continue);
    assert_eq!(a.engine.streams().reserved(), 3);
    a.done_stream(173);
    a.done_stream(172);
    a.done_stream(170);
    assert_eq!(a.engine.streams().reserved(), 0);
}

#[test]
fn a_stream_never_takes_a_refresh_posted_before_it_opened() {
    // Finding 3: alice refreshes her stream for an hour; a stream opened afterwards with a stolen
    // 12-second alice token must still end at 12 s.
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":0,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    a.open(190, &jwt("alice", 60), "alice", 60);
    a.tick_until(T0 + 40);
    a.request(191, &refresh("/events/news", &jwt("alice", 3_600)));
    a.answer(a.pending_calls()[0].0, 200, &verdict("alice", 3_600));
    assert_eq!(a.take().last(), Some(&Effect::NoContent { ctx: 191 }));
    assert_eq!(a.engine.streams().expires_at(190), Some(T0_SEC + 3_600));
    // The attacker's stream on the other worker, opened after the refresh; alice leaves.
    b.now = a.now;
    b.open(200, &jwt("alice", 12), "alice", 12);
    a.done_stream(190);
    b.tick_until(T0 + 12_050);
    let effects = b.take();
    assert!(injected(&effects, b"event: expired\ndata: {\"reason\":\"token_expired\"}"), "{effects:?}");
}

#[test]
fn a_refresh_after_the_last_stream_closed_is_refused_at_once() {
    // Finding 11: no 30-second window of 204s after the stream is gone.
    let mut h = Host::new(cfg(""), MemStore::new());
    h.open(210, &jwt("quinn", 600), "quinn", 600);
    h.tick_until(T0 + 40);
    h.done_stream(210);
    h.request(211, &refresh("/events/news", &jwt("quinn", 900)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("quinn", 900));
    // Refused once the grace for a stream just opened elsewhere has run out, never 204.
    assert!(!h.take().contains(&Effect::NoContent { ctx: 211 }));
    h.tick_until(h.now + REFRESH_GRACE_MS + 40);
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(211, Code::UserMismatch)]);
}

#[test]
fn the_server_side_refresh_extends_a_stream_no_refresh_reached() {
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let token = jwt("rita", 20);
    h.open(220, &token, "rita", 20);
    // Half the challenge window (4 s) before the expiry, the webhook is asked once more.
    h.tick_until(T0 + 15_999);
    assert!(h.pending_calls().is_empty());
    h.tick_until(T0 + 16_020);
    let effects = h.take();
    assert_eq!(effects.iter().filter_map(dispatch_token).collect::<Vec<_>>(), vec![token]);
    // A webhook that tracks sessions knows the user refreshed (elsewhere): a later expiry.
    h.answer(h.pending_calls()[0].0, 200, &verdict("rita", 40));
    h.tick_until(T0 + 21_000);
    assert!(!injected(&h.take(), b"event: expired"));
    assert_eq!(h.engine.streams().expires_at(220), Some(T0_SEC + 40));
}

#[test]
fn a_refresh_on_another_worker_is_taken_before_the_expiry_without_a_call() {
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    a.open(230, &jwt("sara", 20), "sara", 20);
    a.tick_until(T0 + 12_020);
    b.now = a.now;
    b.request(240, &refresh("/events/news", &jwt("sara", 60)));
    b.answer(b.pending_calls()[0].0, 200, &verdict("sara", 60));
    assert_eq!(b.take().last(), Some(&Effect::NoContent { ctx: 240 }));
    let calls = a.metric(Metric::WebhookCalls);
    a.tick_until(T0 + 21_000);
    assert!(!injected(&a.take(), b"event: expired"));
    assert_eq!(a.engine.streams().expires_at(230), Some(T0_SEC + 60));
    assert_eq!(a.metric(Metric::WebhookCalls), calls, "taken from the refresh record, not the webhook");
}

/// Every spelling of `x-revenprox-user` some upstream reads as HTTP_X_REVENPROX_USER: each legal
/// header-name character that is not a letter or digit as the separator (lighttpd maps all of them
/// to `_`), and ASCII case.
const SPELLINGS: [&str; 18] = [
    "x-revenprox-user",
    "x_revenprox_user",
    "x-revenprox_user",
    "x.revenprox.user",
    "X-Revenprox-User",
    "x~revenprox~user",
    "x+revenprox+user",
    "x!revenprox!user",
    "x*revenprox*user",
    "x|revenprox|user",
    "x^revenprox^user",
    "x'revenprox'user",
    "x`revenprox`user",
    "x#revenprox#user",
    "x$revenprox$user",
    "x%revenprox%user",
    "x&revenprox&user",
    "X~REVENPROX.user",
];

#[test]
fn no_spelling_of_the_identity_header_survives_and_credentials_stay_with_the_filter() {
    let mut h = Host::new(cfg(r#","topic":{"other_paths":"pass"}"#), MemStore::new());
    let token = jwt("tina", 600);
    let mut headers = get("/events/news", &token);
    for name in SPELLINGS {
        headers.push((name.into(), b"admin".to_vec()));
    }
    headers.push(("x-revenprox-users".into(), b"kept".to_vec()));
    headers.push(("cookie".into(), b"a=1; revenprox_token=secret".to_vec()));
    headers.push(("cookie".into(), b"b=2".to_vec()));
    h.request(250, &headers);
    let effects = h.take();
    for name in SPELLINGS.iter().chain(&["authorization"]) {
        assert!(
            effects.contains(&Effect::RemoveRequestHeader { ctx: 250, name: name.to_string() }),
            "{name}"
        );
    }
    assert!(!effects
        .iter()
        .any(|e| matches!(e, Effect::RemoveRequestHeader { name, .. } if name == "x-revenprox-users")));
    assert!(effects.contains(&Effect::SetRequestHeader {
        ctx: 250,
        name: "cookie".into(),
        value: b"a=1; b=2".to_vec()
    }));
    // A path outside the prefix: forwarded, identity spellings removed, token parameter stripped.
    let mut other = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/api/me?token=x&q=1".to_vec()),
    ];
    other.push(("X_REVENPROX_USER".into(), b"admin".to_vec()));
    assert_eq!(h.request(251, &other), Flow::Continue);
    assert_eq!(
        h.take(),
        vec![
            Effect::RemoveRequestHeader { ctx: 251, name: "X_REVENPROX_USER".into() },
            Effect::SetRequestHeader { ctx: 251, name: ":path".into(), value: b"/api/me?q=1".to_vec() },
        ]
    );
    assert_eq!(h.metric(Metric::OtherPaths), 1);
    // With forward_to_upstream the credential goes on.
    let mut keep = Host::new(cfg(r#","token":{"forward_to_upstream":true}"#), MemStore::new());
    keep.request(252, &get("/events/news", &jwt("uma", 600)));
    assert!(!keep.take().iter().any(|e| matches!(e, Effect::RemoveRequestHeader { .. })));
}

/// Second attack run, finding 22: the token cookie reached the upstream on every path the filter
/// passed without verifying (another path, optional authentication without a token, development
/// mode), and `Authorization` on topic paths it passed.
#[test]
fn the_token_cookie_leaves_every_forwarded_request_and_authorization_every_topic_path() {
    let with = |path: &str, auth: Option<&str>| {
        let mut headers = vec![(":method".to_string(), b"GET".to_vec()), (":path".to_string(), path.into())];
        if let Some(auth) = auth {
            headers.push(("authorization".into(), auth.as_bytes().to_vec()));
        }
        headers.push(("cookie".into(), b"theme=dark; revenprox_token=secret".to_vec()));
        headers.push(("cookie".into(), b"lang=fr".to_vec()));
        headers
    };
    let cookie_kept =
        |ctx| Effect::SetRequestHeader { ctx, name: "cookie".into(), value: b"theme=dark; lang=fr".to_vec() };
    let authorization_removed = |ctx| Effect::RemoveRequestHeader { ctx, name: "authorization".into() };
    // Another path: the token cookie and the token parameter go; Authorization (there, the
    // application's own) stays.
    let mut h = Host::new(cfg(r#","topic":{"other_paths":"pass"}"#), MemStore::new());
    assert_eq!(h.request(260, &with("/api/me?token=x&q=1", Some("Bearer app-session"))), Flow::Continue);
    let effects = h.take();
    assert!(effects.contains(&cookie_kept(260)), "{effects:?}");
    assert!(!effects.contains(&authorization_removed(260)), "{effects:?}");
    assert!(effects.contains(&Effect::SetRequestHeader {
        ctx: 260,
        name: ":path".into(),
        value: b"/api/me?q=1".to_vec()
    }));
    // Only the token cookie there: the header goes.
    let mut alone = with("/app/page", None);
    alone.truncate(2);
    alone.push(("cookie".into(), b"revenprox_token=secret".to_vec()));
    assert_eq!(h.request(261, &alone), Flow::Continue);
    assert!(h.take().contains(&Effect::RemoveRequestHeader { ctx: 261, name: "cookie".into() }));
    // Optional authentication, a topic path without a usable token (an empty token cookie).
    let mut optional = Host::new(
        cfg(
            r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","require_authentication":false}"#,
        ),
        MemStore::new(),
    );
    let mut empty = with("/events/news", None);
    empty.truncate(2);
    empty.push(("cookie".into(), b"a=1; revenprox_token=".to_vec()));
    assert_eq!(optional.request(262, &empty), Flow::Continue);
    let effects = optional.take();
    assert!(
        effects.contains(&Effect::SetRequestHeader {
            ctx: 262,
            name: "cookie".into(),
            value: b"a=1".to_vec()
        }),
        "{effects:?}"
    );
    // Development mode passes everything: on a topic path both credentials go, elsewhere the
    // token cookie only.
    let mut dev = Host::new(
        config::parse(br#"{"jwt_verifier":{"webhook_url":"","require_authentication":false}}"#).unwrap(),
        MemStore::new(),
    );
    assert_eq!(dev.request(263, &with("/events/news", Some("Bearer secret"))), Flow::Continue);
    let effects = dev.take();
    assert!(
        effects.contains(&authorization_removed(263)) && effects.contains(&cookie_kept(263)),
        "{effects:?}"
    );
    assert_eq!(dev.request(264, &with("/index.html", Some("Bearer app-session"))), Flow::Continue);
    let effects = dev.take();
    assert!(
        !effects.contains(&authorization_removed(264)) && effects.contains(&cookie_kept(264)),
        "{effects:?}"
    );
    // With forward_to_upstream both go on, everywhere.
    let mut keep = Host::new(
        cfg(r#","topic":{"other_paths":"pass"},"token":{"forward_to_upstream":true}"#),
        MemStore::new(),
    );
    assert_eq!(keep.request(265, &with("/api/me", Some("Bearer app-session"))), Flow::Continue);
    assert!(!keep
        .take()
        .iter()
        .any(|e| matches!(e, Effect::RemoveRequestHeader { .. } | Effect::SetRequestHeader { .. })));
}

/// Second attack run, finding 23: the filter wrote plaintext heartbeats and events into a
/// gzip-compressed event stream. A compressed stream is never written into, and still ends at its
/// expiry, its maximum duration and its revocation (without the event it cannot carry).
#[test]
fn a_compressed_event_stream_gets_no_injection_and_still_ends_on_time() {
    let gzip = || {
        let mut headers = sse_response();
        headers.push(("content-encoding".into(), b"gzip".to_vec()));
        headers.push(("content-length".into(), b"99".to_vec()));
        headers
    };
    let open = |h: &mut Host, ctx: Ctx, token: &str, ttl: u64, response: Vec<(String, Vec<u8>)>| {
        h.request(ctx, &get("/events/news", token));
        let (call, _) = h.pending_calls()[0];
        h.answer(call, 200, &verdict("zoe", ttl));
        h.engine.response_headers(ctx, &response, h.now);
        h.run();
    };
    let written = |effects: &[Effect]| {
        effects.iter().any(|e| {
            matches!(e, Effect::Inject { .. } | Effect::ReplaceChunk { .. } | Effect::Enqueue { .. })
        })
    };
    let ended = |effects: &[Effect], ctx: Ctx, reason: &'static str| {
        effects.contains(&Effect::SetEnd { ctx, reason }) && effects.contains(&Effect::Close { ctx })
    };
    let extra = r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":5,"max_connection_sec":30,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    // Token expiry: the bytes pass as they are, nothing is injected (no heartbeat, no challenge),
    // and at the expiry the stream is ended without the event.
    open(&mut h, 600, &jwt("zoe", 10), 10, gzip());
    let effects = h.take();
    assert!(!effects.iter().any(|e| matches!(e, Effect::RemoveResponseHeader { .. })), "{effects:?}");
    assert_eq!(h.metric(Metric::StreamsEncoded), 1);
    for step in 0..9u64 {
        h.tick_until(T0 + step * 1_000 + 500);
        assert_eq!(h.body(600, b"\x1f\x8b\x08\n\n: not a boundary\n\n", false), Flow::Continue);
    }
    h.tick_until(T0 + 9_990);
    let effects = h.take();
    assert!(!written(&effects) && !ended(&effects, 600, "token_expired"), "{effects:?}");
    h.tick_until(T0 + 10_050);
    assert!(ended(&h.take(), 600, "token_expired"));
    assert_eq!((h.metric(Metric::HeartbeatsSent), h.metric(Metric::ChallengesSent)), (0, 0));
    assert_eq!(h.metric(Metric::StreamsExpired), 1);
    // Maximum duration: a stream whose token outlives it.
    let mut h = Host::new(cfg(extra), MemStore::new());
    open(&mut h, 610, &jwt("zoe", 3_600), 3_600, gzip());
    h.body(610, b"\x1f\x8b", false);
    h.tick_until(T0 + 30_050);
    let effects = h.take();
    assert!(!written(&effects) && ended(&effects, 610, "max_duration"), "{effects:?}");
    // Revocation: the re-verification refuses the credential.
    let revoke = r#","sse":{"heartbeat_interval_sec":1,"reverify_interval_sec":5}"#;
    let mut h = Host::new(cfg(revoke), MemStore::new());
    open(&mut h, 620, &jwt("zoe", 3_600), 3_600, gzip());
    h.tick_until(T0 + 5_000);
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 200, DENY);
    h.tick_until(h.now + 40);
    let effects = h.take();
    assert!(!written(&effects) && ended(&effects, 620, "revoked"), "{effects:?}");
    assert_eq!(h.metric(Metric::StreamsRevoked), 1);
    // `identity` (any case, in a list) is no compression: injections as usual.
    let mut h = Host::new(cfg(extra), MemStore::new());
    let mut plain = sse_response();
    plain.push(("content-encoding".into(), b" Identity , identity".to_vec()));
    open(&mut h, 630, &jwt("zoe", 3_600), 3_600, plain);
    assert_eq!(h.body(630, b"data: a\n\n", false), Flow::Pause);
    h.released();
    h.tick_until(h.now + 1_100);
    assert!(injected(&h.take(), b": heartbeat"));
    assert_eq!(h.metric(Metric::StreamsEncoded), 0);
}

/// The upstream is asked for an uncompressed body on topic paths only.
#[test]
fn accept_encoding_leaves_topic_requests_only() {
    let accepting = |mut headers: Vec<(String, Vec<u8>)>| {
        headers.push(("accept-encoding".into(), b"gzip, br".to_vec()));
        headers
    };
    let removed = |ctx| Effect::RemoveRequestHeader { ctx, name: "accept-encoding".into() };
    let mut h = Host::new(
        cfg(r#","topic":{"other_paths":"pass"},"token":{"forward_to_upstream":true}"#),
        MemStore::new(),
    );
    h.request(640, &accepting(get("/events/news", &jwt("yves", 600))));
    assert!(h.take().contains(&removed(640)));
    let other = vec![(":method".to_string(), b"GET".to_vec()), (":path".to_string(), b"/app.js".to_vec())];
    assert_eq!(h.request(641, &accepting(other)), Flow::Continue);
    assert!(!h.take().contains(&removed(641)));
    let mut dev = Host::new(
        config::parse(br#"{"jwt_verifier":{"webhook_url":"","require_authentication":false}}"#).unwrap(),
        MemStore::new(),
    );
    let anonymous =
        vec![(":method".to_string(), b"GET".to_vec()), (":path".to_string(), b"/events/news".to_vec())];
    assert_eq!(dev.request(642, &accepting(anonymous)), Flow::Continue);
    assert!(dev.take().contains(&removed(642)));
}

/// Rate 20/s; `flooders` addresses each send distinct forged tokens at five times the rate for
/// 3 s, another sends a fresh valid token every 250 ms: (fresh tokens served, sent, flood
/// verifications made, the Host).
fn flood(flooders: u64) -> (usize, usize, usize, Host) {
    let extra = r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","rate_limit_per_sec":20}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let (mut fair_ok, mut fair_sent, mut flood_ok, mut ctx) = (0, 0, 0, 1_000);
    for step in 0..300u64 {
        h.advance(10);
        for f in 0..flooders {
            ctx += 1;
            h.address = format!("10.6.6.{f}:1000");
            h.request(ctx, &get("/events/news", &jwt(&format!("forged{step}-{f}"), 600)));
            if let Some(&(call, _)) = h.pending_calls().last() {
                flood_ok += 1;
                h.answer(call, 200, DENY);
            }
        }
        if step % 25 == 0 {
            ctx += 1;
            fair_sent += 1;
            h.address = "10.1.1.1:2000".into();
            h.request(ctx, &get("/events/news", &jwt(&format!("fair{step}"), 600)));
            if let Some(&(call, _)) = h.pending_calls().last() {
                h.answer(call, 200, &verdict("fair", 600));
            }
            fair_ok += usize::from(h.take().contains(&Effect::ResumeRequest { ctx }));
        }
        h.take();
    }
    (fair_ok, fair_sent, flood_ok, h)
}

#[test]
fn one_client_cannot_drain_the_budget_of_the_others() {
    // Finding 4: one address floods; every fresh token of the other address is served.
    let (fair_ok, fair_sent, flood_ok, h) = flood(1);
    assert_eq!((fair_ok, fair_sent), (12, 12));
    assert!(flood_ok <= 3 * 20 + 20, "the flood took {flood_ok} verifications in 3 s");
    assert!(h.metric(Metric::DeniedRateLimited) > 100);
}

/// Second attack run, finding 24: each address's share was half the budget, so two addresses
/// within their shares took all of it and a third got 429. Two and four addresses flood.
#[test]
fn several_addresses_cannot_drain_the_budget_of_another() {
    for flooders in [2u64, 4] {
        let (fair_ok, fair_sent, flood_ok, _) = flood(flooders);
        assert_eq!((fair_ok, fair_sent), (12, 12), "{flooders} flooding addresses");
        assert!(flood_ok <= 3 * 20 + 20, "{flooders} addresses took {flood_ok} verifications in 3 s");
    }
}

#[test]
fn one_client_cannot_open_the_circuit_for_the_others() {
    // Finding 5: the webhook answers 500 to one client's tokens (a kid it does not know).
    let extra = r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":0,"circuit_breaker_threshold":3,"circuit_breaker_timeout_sec":30}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    for i in 0..12u32 {
        h.address = "10.6.6.6:1".into();
        h.request(300 + i, &get("/events/news", &jwt(&format!("bad{i}"), 600)));
        if let Some(&(call, _)) = h.pending_calls().last() {
            h.answer(call, 500, b"unknown kid");
        }
    }
    // Its own circuit opened after 3: the other 9 were refused at once, with no call.
    assert_eq!(h.metric(Metric::ClientCircuitOpened), 1);
    assert_eq!(h.metric(Metric::ClientCircuitRejected), 9);
    assert_eq!(h.metric(Metric::WebhookCalls), 3);
    assert_eq!(h.metric(Metric::CircuitOpened), 0);
    // Another client is served all along.
    h.take();
    h.address = "10.1.1.1:1".into();
    h.request(400, &get("/events/news", &jwt("good", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("good", 600));
    assert_eq!(h.take().last(), Some(&Effect::ResumeRequest { ctx: 400 }));
    // The bad client's circuit probes after its timeout, and closes when the webhook answers.
    h.advance(30_000);
    h.address = "10.6.6.6:1".into();
    h.request(401, &get("/events/news", &jwt("fixed", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("bad", 600));
    assert_eq!(h.take().last(), Some(&Effect::ResumeRequest { ctx: 401 }));
}

/// Second attack run, finding 24: webhook 4xx answers counted toward the Envoy-wide circuit, so
/// three addresses whose tokens the webhook answers 400 opened it for everyone.
#[test]
fn webhook_4xx_answers_open_no_circuit() {
    let extra = r#","jwt_verifier":{"webhook_url":"http://auth.test/verify","webhook_cluster":"auth_webhook","retry_attempts":0,"circuit_breaker_threshold":3,"circuit_breaker_timeout_sec":30}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let mut ctx = 700;
    let mut ask = |h: &mut Host, address: &str, status: u32, body: &[u8]| -> Vec<Effect> {
        ctx += 1;
        h.address = address.into();
        h.request(ctx, &get("/events/news", &jwt(&format!("t{ctx}"), 600)));
        if let Some(&(call, _)) = h.pending_calls().last() {
            h.answer(call, status, body);
        }
        h.take()
    };
    // Four addresses, three 400s each: no circuit opens, not even their own (behind a NAT that
    // would lock out the neighbours: third attack run), and their next tokens are verified.
    for a in 0..4 {
        for _ in 0..3 {
            ask(&mut h, &format!("10.7.7.{a}:1"), 400, b"bad request");
        }
    }
    assert_eq!((h.metric(Metric::ClientCircuitOpened), h.metric(Metric::CircuitOpened)), (0, 0));
    assert!(ask(&mut h, "10.7.7.0:1", 200, &verdict("neighbour", 600))
        .iter()
        .any(|e| matches!(e, Effect::ResumeRequest { .. })));
    assert!(ask(&mut h, "10.1.1.1:1", 200, &verdict("good", 600))
        .iter()
        .any(|e| matches!(e, Effect::ResumeRequest { .. })));
    // Failures that say the webhook is sick (5xx) from three addresses still open it...
    for a in 0..3 {
        ask(&mut h, &format!("10.8.8.{a}:1"), 500, b"");
    }
    assert_eq!(h.metric(Metric::CircuitOpened), 1);
    // ...and a probe answered with a 4xx is given back: the next verification probes at once.
    h.advance(30_000);
    ask(&mut h, "10.9.9.1:1", 400, b"bad request");
    assert_eq!(h.metric(Metric::CircuitRejected), 0);
    let effects = ask(&mut h, "10.9.9.2:1", 200, &verdict("next", 600));
    assert!(effects.iter().any(|e| matches!(e, Effect::ResumeRequest { .. })), "{effects:?}");
    assert_eq!(h.metric(Metric::CircuitClosed), 1);
}

/// `n` users open streams whose verdicts name their JWT `sub` (contexts `ctx0`..): what makes a
/// worker trust that user ids are subs.
fn learn_subs(h: &mut Host, n: u32, ctx0: Ctx, prefix: &str) {
    for i in 0..n {
        let user = format!("{prefix}{i}");
        h.request(ctx0 + i, &get("/events/news", &jwt(&user, 600)));
        h.answer(h.pending_calls()[0].0, 200, &verdict(&user, 600));
    }
    h.take();
}

#[test]
fn a_misrouted_refresh_costs_no_call_once_user_ids_are_known_to_be_subs() {
    let mut h = Host::new(cfg(r#","sse":{"early_refresh_refusal":true}"#), MemStore::new());
    // Before the worker knows how the webhook names users, a refresh is verified.
    h.request(500, &refresh("/events/news", &jwt("vera", 600)));
    assert_eq!(h.pending_calls().len(), 1);
    h.answer(h.pending_calls()[0].0, 200, &verdict("vera", 600));
    h.tick_until(h.now + REFRESH_GRACE_MS + 40);
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(500, Code::UserMismatch)]);
    // Ten verdicts whose user_id is the token's sub.
    learn_subs(&mut h, 10, 510, "u");
    let calls = h.metric(Metric::WebhookCalls);
    h.request(520, &refresh("/events/news", &jwt("wanda", 700)));
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(520, Code::UserMismatch)]);
    assert_eq!(h.metric(Metric::WebhookCalls), calls, "refused without a webhook call");
    // A user with a stream here is verified as ever.
    h.open(530, &jwt("xena", 600), "xena", 600);
    h.request(531, &refresh("/events/news", &jwt("xena", 900)));
    assert_eq!(h.pending_calls().len(), 1);
    // One verdict whose user_id is not the sub turns the shortcut off for good.
    h.answer(h.pending_calls()[0].0, 200, &verdict("xena", 900));
    h.request(540, &get("/events/news", &jwt("yara", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("account-42", 600));
    h.request(541, &refresh("/events/news", &jwt("zoe", 700)));
    assert_eq!(h.pending_calls().len(), 1, "verified again");
}

#[test]
fn one_worker_seeing_a_user_id_that_is_not_the_sub_stops_the_shortcut_on_every_worker() {
    let store = MemStore::new();
    let early = r#","sse":{"early_refresh_refusal":true}"#;
    let mut a = Host::new(cfg(early), store.clone());
    let mut b = Host::new(cfg(early), store);
    // Worker B learns from ten verdicts whose user_id is the sub.
    learn_subs(&mut b, 10, 600, "s");
    // Worker A sees a token whose user is not its sub (a service account, an alias), and opens
    // that user's stream.
    a.now = b.now;
    a.open(700, &jwt("svc-token-sub", 600), "account-7", 600);
    a.tick_until(a.now + 50); // registers the stream Envoy-wide
    b.now = a.now;
    // The user's refresh reaches worker B: its sub has no stream, but B must ask the webhook.
    b.request(610, &refresh("/events/news", &jwt("svc-token-sub", 900)));
    assert_eq!(b.pending_calls().len(), 1, "refused without asking although user ids are not all subs");
    b.answer(b.pending_calls()[0].0, 200, &verdict("account-7", 900));
    assert!(b.take().contains(&Effect::NoContent { ctx: 610 }));
}

#[test]
fn an_allow_asked_for_before_a_revocation_is_asked_again_and_never_cached() {
    // Second attack run: a slow allow for J on worker A lands after worker B revoked J; it was
    // cached and served J for cache_ttl_sec.
    let store = MemStore::new();
    let extra = r#","sse":{"reverify_interval_sec":5}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    let token = jwt("rita", 3_600);
    assert_eq!(a.request(900, &get("/events/news", &token)), Flow::Pause);
    let (slow, _) = a.pending_calls()[0];
    b.open(910, &token, "rita", 3_600);
    b.tick_until(b.now + 5_000);
    let (reverify, _) = b.pending_calls()[0];
    b.answer(reverify, 200, DENY);
    assert_eq!(b.metric(Metric::StreamsRevoked), 1);
    // The slow allow, decided before the revocation, arrives: asked again, nothing forwarded.
    a.now = b.now;
    a.answer(slow, 200, &verdict("rita", 3_600));
    assert!(!a.take().contains(&Effect::ResumeRequest { ctx: 900 }));
    a.tick_until(a.now + 50);
    let (again, from) = a.pending_calls()[0];
    assert_eq!(from, ROOT);
    a.answer(again, 200, DENY);
    assert_eq!(a.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(900, Code::InvalidToken)]);
    // Nothing cached it: the next request asks the webhook.
    assert_eq!(a.request(901, &get("/events/news", &token)), Flow::Pause);
    assert!(a.take().iter().any(|e| dispatch_token(e).as_deref() == Some(token.as_str())));
}

#[test]
fn an_allow_that_raced_two_revocations_is_delivered_but_not_cached() {
    let store = MemStore::new();
    let mut a = Host::new(cfg(""), store.clone());
    let mut other = store.clone();
    let token = jwt("sam", 3_600);
    a.request(920, &get("/events/news", &token));
    other.revoke();
    a.answer(a.pending_calls()[0].0, 200, &verdict("sam", 3_600));
    a.tick_until(a.now + 50);
    let (again, _) = a.pending_calls()[0];
    other.revoke();
    a.answer(again, 200, &verdict("sam", 3_600));
    assert!(a.take().contains(&Effect::ResumeRequest { ctx: 920 }));
    assert_eq!(a.request(921, &get("/events/news", &token)), Flow::Pause, "not served from a cache");
}

#[test]
fn a_stream_opened_with_a_ticket_stops_the_shortcut_on_every_worker() {
    // Second attack run: a ticket names no sub, so its user's stream may be here under an id no
    // JWT claims; the refresh of that user (a JWT whose sub differs) must reach the webhook.
    let store = MemStore::new();
    let early = r#","sse":{"early_refresh_refusal":true}"#;
    let mut a = Host::new(cfg(early), store.clone());
    let mut b = Host::new(cfg(early), store);
    learn_subs(&mut b, 10, 630, "t");
    a.now = b.now;
    let ticket = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/events/news?ticket=tkt_0123456789".to_vec()),
    ];
    assert_eq!(a.request(720, &ticket), Flow::Pause);
    a.answer(a.pending_calls()[0].0, 200, &verdict("tina", 600));
    a.response(720);
    a.body(720, b"data: hi\n\n", false);
    a.tick_until(a.now + 50);
    b.now = a.now;
    b.request(640, &refresh("/events/news", &jwt("Tina", 900)));
    assert_eq!(b.pending_calls().len(), 1, "refused without asking although a ticket's user has a stream");
    b.answer(b.pending_calls()[0].0, 200, &verdict("tina", 900));
    assert!(b.take().contains(&Effect::NoContent { ctx: 640 }));
}

#[test]
fn a_worker_that_placed_records_with_another_salt_places_them_again() {
    // Two workers configure at once, both find no salt and both write one: the last write stands,
    // and the other worker's records sit where its own salt put them until its next touch.
    let store = MemStore::new();
    let (mut sa, mut sb) = (store.clone(), store.clone());
    crate::shared::agree_salt(&mut sa, [1; 16]);
    let _ = sb.set("revenprox.salt", &[2; 16], None);
    crate::shared::agree_salt(&mut sb, [9; 16]);
    assert_eq!((sa.salt(), sb.salt()), ([1; 16], [2; 16]));
    let extra = r#","sse":{"max_streams_per_user":1}"#;
    let mut a = Host::new(cfg(extra), sa);
    let mut b = Host::new(cfg(extra), sb);
    a.open(800, &jwt("uma", 600), "uma", 600);
    a.tick_until(a.now + crate::sse::presence::REFRESH_MS + 50);
    // After A's touch it uses the stored salt, and B sees A's stream: uma is at her limit.
    b.now = a.now;
    assert_eq!(b.request(810, &get("/events/sports", &jwt("uma", 601))), Flow::Pause);
    b.answer(b.pending_calls()[0].0, 200, &verdict("uma", 600));
    assert_eq!(b.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(810, Code::TooManyStreams)]);
}

#[test]
fn a_ticket_answered_after_a_revocation_is_not_asked_again() {
    // Third attack run: the webhook consumed the ticket on its first call; asking again refused
    // its one legitimate use. A ticket's allow is never cached, so it cannot revive anything.
    let store = MemStore::new();
    let mut a = Host::new(cfg(""), store.clone());
    let mut other = store;
    let ticket = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/events/news?ticket=tkt_abcdefabcdef".to_vec()),
    ];
    assert_eq!(a.request(930, &ticket), Flow::Pause);
    other.revoke();
    a.answer(a.pending_calls()[0].0, 200, &verdict("tara", 600));
    assert!(a.take().contains(&Effect::ResumeRequest { ctx: 930 }));
    assert!(a.pending_calls().is_empty());
}

#[test]
fn by_default_a_refresh_is_always_verified_so_its_answer_tells_nothing_of_other_streams() {
    // Third attack run: refusing early told an unauthenticated client (a forged token naming the
    // victim) whether the victim had a stream on a topic: 403 at once without one, 401 with one.
    let mut h = Host::new(cfg(""), MemStore::new());
    learn_subs(&mut h, 12, 940, "d");
    h.request(960, &refresh("/events/secret-room", &jwt("victim", 700)));
    assert_eq!(h.pending_calls().len(), 1, "verified like any other refresh");
}

fn resumed(effects: &[Effect]) -> Vec<Ctx> {
    effects
        .iter()
        .filter_map(|e| if let Effect::ResumeResponse { ctx } = e { Some(*ctx) } else { None })
        .collect()
}

fn signals(effects: &[Effect]) -> usize {
    effects.iter().filter(|e| matches!(e, Effect::Enqueue { .. })).count()
}

#[test]
fn one_release_signal_lets_go_of_every_chunk_held_before_it_arrives() {
    let mut h = Host::new(cfg(""), MemStore::new());
    for (ctx, user) in [(20, "ann"), (21, "bob"), (22, "cy")] {
        h.open(ctx, &jwt(user, 600), user, 600);
    }
    // Three streams hold a chunk before the worker's queue comes round: one signal for all.
    assert_eq!(h.body(20, b"data: a\n\n", false), Flow::Pause);
    assert_eq!(h.body(21, b"data: b\n\n", false), Flow::Pause);
    assert_eq!(h.body(22, b"data: c\n\n", false), Flow::Pause);
    // One of them ends meanwhile: Envoy lets its bytes go with the end of stream.
    assert_eq!(h.body(22, b"", true), Flow::Continue);
    assert_eq!(signals(&h.take()), 1);
    h.released();
    let mut resumed = resumed(&h.take());
    resumed.sort_unstable();
    assert_eq!(resumed, vec![20, 21]);
    // The next chunk needs a new signal, and a signal with nothing held releases nothing.
    assert_eq!(h.body(20, b"data: d\n\n", false), Flow::Pause);
    assert_eq!(signals(&h.take()), 1);
    h.released();
    assert_eq!(self::resumed(&h.take()), vec![20]);
    h.released();
    assert!(h.take().is_empty());
}

/// A reader that counts how often the engine reads the chunk.
struct Counted<'a>(&'a [u8], usize);

impl ChunkReader for Counted<'_> {
    fn read(&mut self, start: usize, len: usize) -> Vec<u8> {
        self.1 += 1;
        Chunk(self.0).read(start, len)
    }
}

fn response_with_length(len: usize) -> Vec<(String, Vec<u8>)> {
    let mut headers = sse_response();
    headers.push(("content-length".into(), len.to_string().into_bytes()));
    headers
}

#[test]
fn the_chunk_that_completes_a_declared_length_goes_on_unheld_and_unread() {
    let mut h = Host::new(cfg(r#","sse":{"heartbeat_interval_sec":1}"#), MemStore::new());
    let token = jwt("dora", 600);
    assert_eq!(h.request(30, &get("/events/news", &token)), Flow::Pause);
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 200, &verdict("dora", 600));
    h.engine.response_headers(30, &response_with_length(13), h.now);
    h.run();
    assert!(h.take().contains(&Effect::RemoveResponseHeader { ctx: 30, name: "content-length" }));
    // A one-event response: its body, then the end of the stream. Nothing to hold, nothing to read.
    let mut reader = Counted(b"data: hello\n\n", 0);
    assert_eq!(h.engine.response_body(30, 13, false, &mut reader, h.now), Flow::Continue);
    h.run();
    assert_eq!((reader.1, signals(&h.take())), (0, 0));
    assert_eq!(h.body(30, b"", true), Flow::Continue);
    // Before the declared length is complete, a chunk at an event boundary is held as usual.
    h.engine.response_headers(31, &response_with_length(26), h.now);
    h.run();
    assert_eq!(h.body(31, b"data: hello\n\n", false), Flow::Pause);
    assert_eq!(signals(&h.take()), 1);
    h.released();
    assert_eq!(h.body(31, b"data: again\n\n", false), Flow::Continue);
}

#[test]
fn a_chunk_handed_over_again_before_its_release_is_counted_and_observed_once() {
    let mut h = Host::new(cfg(""), MemStore::new());
    h.engine.response_headers(32, &response_with_length(27), h.now);
    h.run();
    assert_eq!(h.body(32, b"data: a\n\n", false), Flow::Pause);
    // The next chunk arrives before the release: Envoy hands over the held bytes again with it.
    // 18 bytes of 27 arrived, not 27: still held.
    let mut reader = Counted(b"data: a\n\ndata: b\n\n", 0);
    assert_eq!(h.engine.response_body(32, 18, false, &mut reader, h.now), Flow::Pause);
    h.run();
    h.buffers.insert(32, b"data: a\n\ndata: b\n\n".to_vec());
    h.released();
    assert_eq!(resumed(&h.take()), vec![32]);
    // Released: the next callback has only the new bytes, which complete the length.
    assert_eq!(h.body(32, b"data: c\n\n", false), Flow::Continue);
}

#[test]
fn a_stream_that_goes_quiet_right_after_a_burst_still_gets_heartbeats_and_its_expiry() {
    let extra = r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(33, &jwt("eve", 5), "eve", 5);
    // A burst: events in quick succession, some split across chunks, then silence.
    for chunk in [&b"data: 1\n\ndata: 2\n\ndata: 3"[..], b"\n\ndata: 4\n", b"\n", b"data: 5\n\n"] {
        h.body(33, chunk, false);
        h.advance(1);
    }
    h.released();
    h.take();
    h.tick_until(h.now + 2_100);
    let effects = h.take();
    let heartbeats = effects
        .iter()
        .filter(|e| matches!(e, Effect::Inject { bytes, .. } if *bytes == Injection::Heartbeat.bytes()))
        .count();
    assert_eq!(heartbeats, 2, "{effects:?}");
    h.tick_until(T0 + 5_200);
    let effects = h.take();
    let expired = Injection::Expired(ExpiryReason::TokenExpired);
    assert!(effects.contains(&Effect::Inject { ctx: 33, bytes: expired.bytes() }), "{effects:?}");
    assert!(effects.contains(&Effect::Close { ctx: 33 }), "{effects:?}");
}

#[test]
fn an_expiry_on_an_unheld_stream_waits_for_the_end_of_the_event_like_a_held_one() {
    let extra = r#","sse":{"challenge_before_expiry_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(34, &jwt("fay", 2), "fay", 2);
    assert_eq!(h.body(34, b"data: long", false), Flow::Continue);
    h.take();
    h.tick_until(T0 + 2_500);
    assert!(!h.take().iter().any(|e| matches!(e, Effect::Close { .. })));
    h.body(34, b" event\n\n", false);
    let expired = Injection::Expired(ExpiryReason::TokenExpired);
    let mut spliced = b" event\n\n".to_vec();
    spliced.extend_from_slice(expired.bytes());
    assert!(h.take().contains(&Effect::ReplaceChunk { ctx: 34, size: 8, bytes: spliced }));
    // After `expired` nothing is held; the stream ends.
    h.tick_until(h.now + 200);
    assert!(h.take().contains(&Effect::Close { ctx: 34 }));
}

#[test]
fn nothing_of_the_upstream_follows_an_expired_event_spliced_into_a_chunk() {
    let extra = r#","sse":{"challenge_before_expiry_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(35, &jwt("gus", 2), "gus", 2);
    h.body(35, b"data: long", false);
    h.take();
    h.tick_until(T0 + 2_500);
    // The chunk ends the event and starts the next: `expired` goes after the first, and the start
    // of the next never reaches the client.
    h.body(35, b"\n\ndata: y", false);
    let expired = Injection::Expired(ExpiryReason::TokenExpired);
    let mut spliced = b"\n\n".to_vec();
    spliced.extend_from_slice(expired.bytes());
    assert!(h.take().contains(&Effect::ReplaceChunk { ctx: 35, size: 9, bytes: spliced }));
}

fn parsed() -> u32 {
    crate::auth::precheck::PARSED.with(|n| n.replace(0))
}

#[test]
fn a_token_in_the_workers_cache_is_not_prechecked_again_but_its_exp_still_counts() {
    let mut h = Host::new(cfg(""), MemStore::new());
    // The webhook allows for 600 s; the token itself says it expires after 2 s.
    let token = jwt("ivy", 2);
    assert_eq!(h.request(40, &get("/events/news", &token)), Flow::Pause);
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 200, &verdict("ivy", 600));
    h.take();
    parsed();
    // From the worker's cache: the token is not parsed again.
    assert_eq!(h.request(41, &get("/events/news", &token)), Flow::Continue);
    assert!(h.take().contains(&user_header(41, "ivy")));
    assert_eq!(parsed(), 0);
    // Its `exp` passed: refused as the precheck refuses it, still without parsing, and never
    // forwarded (nothing stripped from it either).
    h.advance(2_000);
    assert_eq!(h.request(42, &get("/events/news", &token)), Flow::Pause);
    let effects = h.take();
    assert_eq!(effects.len(), 1, "{effects:?}");
    assert_eq!(reply_code(&effects[0]), Some((42, Code::InvalidToken)));
    assert_eq!(parsed(), 0);
    // The entry is gone: the precheck runs (and refuses) before anything else.
    assert_eq!(h.request(43, &get("/events/news", &token)), Flow::Pause);
    assert_eq!(h.take().iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(43, Code::InvalidToken)]);
    assert_eq!(parsed(), 1);
    assert!(h.pending_calls().is_empty());
    // A token never seen is prechecked once.
    h.request(44, &get("/events/news", &jwt("jay", 600)));
    assert_eq!(parsed(), 1);
}

#[test]
fn a_tick_visits_only_the_streams_that_are_due() {
    let mut h = Host::new(cfg(""), MemStore::new());
    // 200 quiet streams opened 50 ms apart (heartbeats every 15 s): their moments are spread out,
    // so the timer runs often, and each run has little to do.
    for i in 0..200u32 {
        let user = format!("u{i}");
        h.open(1_000 + i, &jwt(&user, 3_600), &user, 3_600);
        h.advance(50);
    }
    h.take();
    let before = h.engine.streams().visits();
    let mut ticks = 0;
    let until = h.now + 30_000;
    while h.now < until {
        h.now += h.tick_ms.clamp(1, until - h.now);
        h.engine.tick(h.now);
        h.run();
        ticks += 1;
    }
    let visits = h.engine.streams().visits() - before;
    // Two heartbeats and three presence touches each in 30 s; never every stream at every tick.
    assert!(ticks > 300, "{ticks}");
    assert!(visits <= 200 * 6, "{visits} visits in {ticks} ticks");
    assert_eq!(h.metric(Metric::HeartbeatsSent), 400);
    assert_eq!(h.engine.streams().scheduled(), 200);
    for i in 0..200u32 {
        h.done_stream(1_000 + i);
    }
    assert_eq!(h.engine.streams().scheduled(), 0);
}

#[test]
fn a_response_that_ends_before_the_next_tick_computes_no_stream_keys() {
    let mut h = Host::new(cfg(""), MemStore::new());
    let token = jwt("kim", 600);
    h.request(50, &get("/events/news", &token));
    let (call, _) = h.pending_calls()[0];
    h.answer(call, 200, &verdict("kim", 600));
    let hashed = || crate::sse::presence::HASHED.with(|n| n.replace(0));
    hashed();
    // A one-event response, then the end: no presence or refresh key, no timer entry.
    h.engine.response_headers(50, &response_with_length(13), h.now);
    h.run();
    assert_eq!(h.body(50, b"data: hello\n\n", false), Flow::Continue);
    assert_eq!(h.body(50, b"", true), Flow::Continue);
    h.done_stream(50);
    assert_eq!(hashed(), 0);
    assert_eq!(h.engine.streams().scheduled(), 0);
    // A stream still open at the next tick gets its keys then (and is registered).
    h.request(51, &get("/events/news", &token));
    h.response(51);
    assert!(h
        .engine
        .streams()
        .has_local(&crate::sse::presence::stream_key("kim", &topic::id("news").unwrap())));
    hashed();
    h.tick_until(h.now + 30);
    assert_eq!(hashed(), 1);
    assert_eq!(h.engine.streams().scheduled(), 1);
}

// Fourth attack run (finding 34): an upstream that pauses inside an event leaves a heartbeat
// waiting for the event's end; the stream's re-verification, refresh adoption and pre-expiry
// check must go on meanwhile, and the timer must not visit it on every tick.
#[test]
fn a_stream_paused_inside_an_event_is_still_reverified() {
    let extra =
        r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":0,"reverify_interval_sec":2}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let token = jwt("pia", 3_600);
    h.open(300, &token, "pia", 3_600);
    // The upstream starts its next event and pauses inside it.
    assert_eq!(h.body(300, b"data: part", false), Flow::Continue);
    h.take();
    let calls = h.metric(Metric::WebhookCalls);
    h.tick_until(T0 + 5_000);
    assert!(
        h.metric(Metric::WebhookCalls) > calls,
        "no re-verification in 5 s at reverify_interval_sec 2 (pending calls {:?})",
        h.pending_calls()
    );
}

#[test]
fn a_refresh_on_another_worker_reaches_a_stream_paused_inside_an_event() {
    let store = MemStore::new();
    let extra =
        r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    a.open(330, &jwt("rita", 20), "rita", 20);
    assert_eq!(a.body(330, b"data: part", false), Flow::Continue);
    a.tick_until(T0 + 12_020);
    b.now = a.now;
    b.request(340, &refresh("/events/news", &jwt("rita", 60)));
    b.answer(b.pending_calls()[0].0, 200, &verdict("rita", 60));
    assert_eq!(b.take().last(), Some(&Effect::NoContent { ctx: 340 }));
    a.take();
    a.tick_until(T0 + 24_000);
    let closed = a.take().iter().any(|e| matches!(e, Effect::Close { ctx: 330 }));
    assert!(
        !closed && a.engine.streams().expires_at(330) == Some(T0_SEC + 60),
        "refresh accepted on worker B (204), yet the stream on A: closed={closed}, expires_at={:?}",
        a.engine.streams().expires_at(330).map(|e| e as i64 - T0_SEC as i64)
    );
}

#[test]
fn a_stream_paused_inside_an_event_still_gets_its_server_side_refresh() {
    // README "Scaling and state": a stream whose expiry is near and that no refresh reached asks the
    // webhook once more about its own credential half the challenge window before `expires_at`.
    let extra =
        r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let token = jwt("sol", 20);
    h.open(360, &token, "sol", 20);
    assert_eq!(h.body(360, b"data: part", false), Flow::Continue);
    h.take();
    let calls = h.metric(Metric::WebhookCalls);
    h.tick_until(T0 + 19_500);
    assert!(
        h.metric(Metric::WebhookCalls) > calls,
        "no server-side refresh before the expiry of a stream paused inside an event"
    );
}

#[test]
fn a_stream_paused_inside_an_event_is_not_visited_every_tick() {
    let extra =
        r#","sse":{"heartbeat_interval_sec":1,"challenge_before_expiry_sec":0,"reverify_interval_sec":2}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(370, &jwt("tom", 3_600), "tom", 3_600);
    assert_eq!(h.body(370, b"data: part", false), Flow::Continue);
    h.tick_until(T0 + 3_000);
    let before = h.engine.streams().visits();
    h.tick_until(T0 + 8_000);
    let visits = h.engine.streams().visits() - before;
    // "The timer visits only the streams that are due": nothing is due in these 5 s but presence.
    assert!(visits <= 5, "{visits} visits of one paused stream in 5 s (timer period {} ms)", h.tick_ms);
}

// Fourth attack run (finding 35): a stream counts Envoy-wide from its worker's next tick; a refresh
// accepted on another worker before that waits for it instead of being refused.
#[test]
fn a_refresh_on_another_worker_right_after_the_stream_opened_is_accepted() {
    let store = MemStore::new();
    let mut a = Host::new(cfg(""), store.clone());
    let mut b = Host::new(cfg(""), store);
    a.open(600, &jwt("wren", 20), "wren", 20);
    // No tick on worker A yet: its stream is known only there. The refresh comes 3 ms later.
    b.now = a.now + 3;
    b.request(610, &refresh("/events/news", &jwt("wren", 600)));
    b.answer(b.pending_calls()[0].0, 200, &verdict("wren", 600));
    assert!(b.take().iter().filter_map(reply_code).next().is_none(), "refused before the grace ran out");
    a.tick_until(a.now + 40);
    b.tick_until(a.now);
    assert_eq!(b.take().last(), Some(&Effect::NoContent { ctx: 610 }));
    // Worker A's stream takes the new expiry from the refresh record.
    a.tick_until(T0 + 25_000);
    assert_eq!(a.engine.streams().expires_at(600), Some(T0_SEC + 600));
}

#[test]
fn a_waiting_refresh_whose_client_left_is_forgotten() {
    let mut h = Host::new(cfg(""), MemStore::new());
    h.request(620, &refresh("/events/news", &jwt("xena", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("xena", 600));
    h.done_stream(620);
    h.take();
    h.tick_until(h.now + REFRESH_GRACE_MS + 40);
    assert!(h.take().iter().all(|e| e.ctx() != Some(620)), "an answer for a request that is gone");
}

// Second look at findings 34 and 35 (findings 36-39): a waiting refresh is as old as its
// acceptance (never taken by a stream opened while it waited, never newer than a later refresh);
// an expiry's 2 s wait for the end of an event is neither restarted by a late verdict nor used up
// by a heartbeat or challenge that waited before it.
#[test]
fn a_waiting_refresh_never_extends_a_stream_opened_after_it_was_posted_same_worker() {
    // Alice posts a 1-hour refresh while she has no stream; 100 ms later an attacker opens a stream
    // with a stolen 12-second alice token. "never a refresh posted before it opened" (finding 10).
    let extra = r#","sse":{"challenge_before_expiry_sec":0,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.request(700, &refresh("/events/news", &jwt("alice", 3_600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("alice", 3_600));
    assert!(h
        .take()
        .iter()
        .all(|e| !matches!(e, Effect::NoContent { ctx: 700 } | Effect::Reply { ctx: 700, .. })));
    h.advance(100);
    h.open(701, &jwt("alice", 12), "alice", 12);
    h.tick_until(h.now + 60);
    let effects = h.take();
    let answered_204 = effects.contains(&Effect::NoContent { ctx: 700 });
    assert_eq!(
        h.engine.streams().expires_at(701),
        Some(T0_SEC + 12),
        "stream opened 100 ms after the refresh was posted took its expiry (204 to refresh: {answered_204})"
    );
}

#[test]
fn a_waiting_refresh_never_extends_a_stream_opened_after_it_was_posted_other_worker() {
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    // Refresh posted and accepted on worker B with no alice stream anywhere.
    b.request(710, &refresh("/events/news", &jwt("alice", 3_600)));
    b.answer(b.pending_calls()[0].0, 200, &verdict("alice", 3_600));
    assert!(b
        .take()
        .iter()
        .all(|e| !matches!(e, Effect::NoContent { ctx: 710 } | Effect::Reply { ctx: 710, .. })));
    // 100 ms later the attacker's stream opens on worker A with a stolen 12 s token.
    b.tick_until(T0 + 100);
    a.now = b.now;
    a.open(711, &jwt("alice", 12), "alice", 12);
    // Both workers' timers run side by side.
    for step in 1..=4u64 {
        a.tick_until(T0 + 100 + step * 20);
        b.tick_until(T0 + 100 + step * 20);
    }
    let bt = b.take();
    let answered_204 = bt.contains(&Effect::NoContent { ctx: 710 });
    a.tick_until(T0 + 11_000);
    a.tick_until(T0 + 12_100);
    let effects = a.take();
    assert!(
        injected(&effects, b"event: expired\ndata: {\"reason\":\"token_expired\"}"),
        "the stream opened after the refresh was posted outlived its 12 s token (204: {answered_204}, expires_at {:?})",
        a.engine.streams().expires_at(711).map(|e| e as i64 - T0_SEC as i64)
    );
}

#[test]
fn a_waiting_refresh_does_not_undo_a_later_accepted_refresh_on_another_worker() {
    // Two refreshes of bob: the first (until +100 s) waits for a stream; the second (until +3600 s)
    // is posted once the stream is known and gets 204. The stream must take the later one.
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    b.request(720, &refresh("/events/news", &jwt("bob", 100)));
    b.answer(b.pending_calls()[0].0, 200, &verdict("bob", 100));
    b.tick_until(T0 + 40);
    a.now = b.now;
    a.open(721, &jwt("bob", 20), "bob", 20);
    a.tick_until(T0 + 60);
    // The stream is known Envoy-wide now; the second refresh arrives before B's next tick.
    b.now = T0 + 61;
    b.request(722, &refresh("/events/news", &jwt("bob", 3_600)));
    let call = b.pending_calls().iter().find(|(_, c)| *c == 722).copied().unwrap_or((0, 0)).0;
    b.answer(call, 200, &verdict("bob", 3_600));
    let effects = b.take();
    assert!(effects.contains(&Effect::NoContent { ctx: 722 }), "{effects:?}");
    b.tick_until(T0 + 100);
    assert!(b.take().contains(&Effect::NoContent { ctx: 720 }));
    a.tick_until(T0 + 30_000);
    assert_eq!(
        a.engine.streams().expires_at(721),
        Some(T0_SEC + 3_600),
        "the refresh answered 204 last (until +3600 s) was replaced by the older waiting one"
    );
}

#[test]
fn a_verdict_arriving_while_the_expiry_waits_for_the_end_of_an_event_does_not_restart_the_wait() {
    // README: "an expiry waits up to 2 s for it [the end of the upstream event], then the stream is reset".
    let extra = r#","sse":{"challenge_before_expiry_sec":0,"reverify_interval_sec":1}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    let token = jwt("uma", 10);
    h.open(730, &token, "uma", 10);
    // The upstream starts an event and never ends it.
    assert_eq!(h.body(730, b"data: part", false), Flow::Continue);
    // Re-verifications every second, answered at once until 8 s; the one asked after that is slow.
    while h.now < T0 + 8_000 {
        h.tick_until(h.now + 20);
        for (t, _) in h.pending_calls() {
            h.answer(t, 200, &verdict("uma", 10));
        }
    }
    while h.pending_calls().is_empty() && h.now < T0 + 9_900 {
        h.tick_until(h.now + 20);
    }
    let (call, _) = *h.pending_calls().last().expect("a re-verification in flight before the expiry");
    let asked_at = h.now - T0;
    h.tick_until(T0 + 10_900);
    let early = h.take();
    assert!(
        !early.iter().any(|e| matches!(e, Effect::Close { ctx: 730 })),
        "{early:?} {:?}",
        h.pending_calls()
    );
    // Expired at 10 s, waiting for the end of the event; the webhook (within its 5 s timeout) now
    // refuses the credential.
    h.answer(call, 200, DENY);
    let mut closed_at = None;
    while h.now < T0 + 16_000 && closed_at.is_none() {
        h.tick_until(h.now + 20);
        if h.take().iter().any(|e| matches!(e, Effect::Close { ctx: 730 })) {
            closed_at = Some(h.now - T0);
        }
    }
    assert!(
        closed_at.is_some_and(|t| t <= 12_100),
        "expired at 10 s mid-event, closed at {closed_at:?} ms (README: the expiry waits up to 2 s; re-verification asked at {asked_at} ms, refused at 10.9 s)"
    );
}

#[test]
fn an_expiry_after_a_long_waiting_challenge_still_waits_for_the_end_of_the_event() {
    // README: "a waiting injection goes into the later chunk that ends that event; an expiry waits
    // up to 2 s for it, then the stream is reset". Here the challenge has waited since 2 s.
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.open(740, &jwt("vic", 10), "vic", 10);
    assert_eq!(h.body(740, b"data: part", false), Flow::Continue);
    // The server-side refresh (asked 4 s before the expiry) comes back with the same expiry.
    while h.now < T0 + 9_000 {
        h.tick_until(h.now + 20);
        for (t, _) in h.pending_calls() {
            h.answer(t, 200, &verdict("vic", 10));
        }
    }
    h.take();
    h.tick_until(T0 + 10_100);
    let at_expiry = h.take();
    // The upstream ends its event 100 ms after the expiry.
    h.body(740, b" end\n\n", false);
    let after = h.take();
    let closed_without_event = at_expiry.iter().any(|e| matches!(e, Effect::Close { ctx: 740 }));
    assert!(
        !closed_without_event && after.iter().any(|e| matches!(e, Effect::ReplaceChunk { ctx: 740, .. })),
        "reset at the expiry without waiting for the end of the event: {at_expiry:?}"
    );
}

#[test]
fn a_waiting_refresh_is_answered_once_only_for_its_own_user_and_topic_and_the_timer_rests() {
    let mut h = Host::new(cfg(""), MemStore::new());
    h.request(750, &refresh("/events/news", &jwt("wes", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("wes", 600));
    h.request(751, &refresh("/events/news", &jwt("wes2", 600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("wes2", 600));
    h.take();
    // Another user's stream on the topic, and wes's stream on another topic.
    h.open(752, &jwt("zed", 600), "zed", 600);
    assert_eq!(h.request(753, &get("/events/sports", &jwt("wes", 600))), Flow::Pause);
    h.answer(h.pending_calls()[0].0, 200, &verdict("wes", 600));
    h.response(753);
    h.body(753, b"data: x\n\n", false);
    h.released();
    // wes2's client leaves while waiting.
    h.done_stream(751);
    h.take();
    h.tick_until(h.now + REFRESH_GRACE_MS + 100);
    let effects = h.take();
    let answers: Vec<_> = effects
        .iter()
        .filter(|e| matches!(e, Effect::NoContent { .. } | Effect::Reply { .. }))
        .cloned()
        .collect();
    assert_eq!(answers.iter().filter_map(reply_code).collect::<Vec<_>>(), vec![(750, Code::UserMismatch)]);
    assert_eq!(answers.len(), 1, "{answers:?}");
    h.tick_until(h.now + 2_000);
    assert!(h.take().iter().all(|e| !matches!(e, Effect::NoContent { .. } | Effect::Reply { .. })));
    h.done_stream(752);
    h.done_stream(753);
    h.tick_until(h.now + 40_000);
    assert!(h.tick_ms >= 1_000 || h.tick_ms == 0, "timer period {} ms", h.tick_ms);
}

// Third look (findings 40-41): a refresh is as old as its request — one posted before a stream
// opened is never taken by it, however long the webhook took to answer or the refresh waited, and
// on one worker the order of events decides, not the millisecond.
#[test]
fn a_refresh_posted_before_the_stream_opened_but_answered_after_is_not_taken_same_worker() {
    // Alice posts a 1-hour refresh; the webhook answers 300 ms later. Meanwhile (100 ms after the
    // post) an attacker opens a stream with a stolen 12 s alice token. The refresh was posted
    // before the stream opened: the stream must end at 12 s.
    let extra = r#","sse":{"challenge_before_expiry_sec":0,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.request(800, &refresh("/events/news", &jwt("alice", 3_600)));
    let (refresh_call, _) = h.pending_calls()[0];
    h.advance(100);
    h.open(801, &jwt("alice", 12), "alice", 12);
    h.advance(200);
    h.answer(refresh_call, 200, &verdict("alice", 3_600));
    let effects = h.take();
    h.tick_until(h.now + 60);
    assert_eq!(
        h.engine.streams().expires_at(801),
        Some(T0_SEC + 12),
        "stream opened 100 ms after the refresh was posted took its expiry (204: {})",
        effects.contains(&Effect::NoContent { ctx: 800 })
    );
}

#[test]
fn a_refresh_posted_before_the_stream_opened_but_answered_after_is_not_taken_other_worker() {
    let store = MemStore::new();
    let extra = r#","sse":{"challenge_before_expiry_sec":8,"reverify_interval_sec":0}"#;
    let mut a = Host::new(cfg(extra), store.clone());
    let mut b = Host::new(cfg(extra), store);
    b.request(810, &refresh("/events/news", &jwt("alice", 3_600)));
    let (refresh_call, _) = b.pending_calls()[0];
    a.now = T0 + 100;
    a.open(811, &jwt("alice", 12), "alice", 12);
    a.tick_until(T0 + 200);
    b.now = T0 + 300;
    b.answer(refresh_call, 200, &verdict("alice", 3_600));
    let answered_204 = b.take().contains(&Effect::NoContent { ctx: 810 });
    a.tick_until(T0 + 12_100);
    let effects = a.take();
    assert!(
        injected(&effects, b"event: expired\ndata: {\"reason\":\"token_expired\"}"),
        "the stream opened after the refresh was posted outlived its 12 s token (204: {answered_204}, expires_at {:?})",
        a.engine.streams().expires_at(811).map(|e| e as i64 - T0_SEC as i64)
    );
}

#[test]
fn a_waiting_refresh_accepted_in_the_same_ms_before_a_stream_opened_is_not_taken_same_worker() {
    // The refresh is accepted (and parks: no stream yet) at T0; the attacker's stream opens
    // afterwards, in the same millisecond.
    let extra = r#","sse":{"challenge_before_expiry_sec":0,"reverify_interval_sec":0}"#;
    let mut h = Host::new(cfg(extra), MemStore::new());
    h.request(820, &refresh("/events/news", &jwt("alice", 3_600)));
    h.answer(h.pending_calls()[0].0, 200, &verdict("alice", 3_600));
    assert!(h
        .take()
        .iter()
        .all(|e| !matches!(e, Effect::NoContent { ctx: 820 } | Effect::Reply { ctx: 820, .. })));
    h.open(821, &jwt("alice", 12), "alice", 12);
    h.tick_until(h.now + 60);
    assert_eq!(
        h.engine.streams().expires_at(821),
        Some(T0_SEC + 12),
        "parked refresh taken by a stream opened after it"
    );
}
