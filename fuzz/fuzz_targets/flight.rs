//! The shipped engine (`engine::Engine`, the verifier of one worker) driven through arbitrary host
//! events: requests (JWTs on three shared keys, tickets, challenge responses), webhook answers
//! (allow, deny, failures of every kind), calls the host refuses at once, time and timer ticks,
//! streams going away, and answers to calls whose context went away (Envoy drops those; delivered
//! anyway they must change nothing). The breaker, the rate limit and the cache are the real ones,
//! over an in-memory shared store, with fuzzed retry attempts, breaker threshold and rate.
//!
//! A host model performs the effects as `src/host/apply.rs` does and checks, after every event:
//! no panic (overflow checks on); a call is made only from the context whose callback runs (the
//! stream for a first call, the root timer otherwise); a call from the timer is never early (its
//! retry backoff of 100 ms × attempt has passed); every stream gets at most one outcome (forwarded,
//! refused, or 204), never after it left; an allowed outcome only for a token the webhook allowed;
//! no log line carries a credential. At the end Envoy answers every call and the timer makes every
//! due call: every stream that did not leave has exactly one outcome, at most 1 + retry_attempts
//! counted calls were made per verification (plus one per call lost with its stream, and one when
//! an allow answered after a revocation is asked again), and the
//! engine holds no flight and no call.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::config;
use revenprox::engine::{Ctx, Effect, Engine, Flow, Receipt};
use revenprox::resilience::flight::FlightKey;
use revenprox::shared::{MemStore, SharedStore};
use std::collections::{HashMap, HashSet};

const ROOT: Ctx = 1;
/// 2030-01-01 (tokens expire a day later).
const T0: u64 = 1_893_456_000_000;
const MAX_STREAMS: usize = 32;

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Allow,
    Deny,
    Status500,
    Status504,
    Malformed,
    OtherUser,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A stream's request: a JWT of one of three users (`key % 3`) or a ticket; `refuse`: the host
    /// refuses the first webhook call it makes in this event.
    Begin {
        key: u8,
        ticket: bool,
        reauth: bool,
        refuse: bool,
    },
    Answer {
        call: u8,
        answer: Answer,
    },
    Late {
        call: u8,
        answer: Answer,
    },
    Advance {
        ms: u16,
    },
    Tick {
        refuse: bool,
    },
    /// Time goes to the timer's next firing, which fires.
    Wait {
        refuse: bool,
    },
    Leave {
        stream: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    retries: u8,
    threshold: u8,
    rate: u8,
    cache_off: bool,
    ops: Vec<Op>,
    drain: Answer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allowed,
    Refused,
    NoContent,
}

#[derive(Debug)]
struct Stream {
    token: String,
    reauth: bool,
    outcome: Option<Outcome>,
    left: bool,
}

#[derive(Debug)]
struct Call {
    owner: Ctx,
    token: String,
    key: FlightKey,
    delivered: bool,
    dropped: bool,
}

#[derive(Debug, Default)]
struct Tries {
    /// When its last call failed.
    last_fail: u64,
    /// Calls made (or refused by the host).
    dispatched: u64,
    /// Calls lost with the stream that made them (made again, uncounted).
    lost: u64,
    /// The Envoy-wide revocation count when the verdict was last asked for.
    revocations: u64,
    /// An allow came back after a revocation: the engine asks once more, at once (uncounted).
    again: u64,
    /// That call is due and not made yet.
    again_due: bool,
}

struct Host {
    engine: Engine<MemStore>,
    /// The engine's shared store (the same data): the model reads the revocation count.
    store: MemStore,
    now: u64,
    tick_ms: u64,
    streams: HashMap<Ctx, Stream>,
    next_ctx: Ctx,
    /// Host call tokens → call.
    calls: HashMap<u32, Call>,
    next_token: u32,
    /// Token → the users the webhook allowed it as (a cached verdict may serve it later).
    allowed_tokens: HashMap<String, HashSet<String>>,
    /// The running callback's context.
    current: Ctx,
    in_tick: bool,
    refuse_next: bool,
    /// Per flight key, the calls of the verification in progress.
    tries: HashMap<FlightKey, Tries>,
    retries: u64,
    secrets: Vec<String>,
}

fn token_of(body: &str) -> String {
    let start = body.find("\"jwt\":\"").map_or(0, |i| i + 7);
    body.get(start..).and_then(|s| s.split('"').next()).unwrap_or_default().to_string()
}

fn user_of(token: &str) -> &str {
    token.split('-').nth(1).unwrap_or("nobody")
}

impl Host {
    /// Performs every pending effect as the host shell does; receipts go back to the engine.
    fn run(&mut self, flow: Flow) -> Flow {
        let mut flow = flow;
        for _ in 0..64 {
            let effects = self.engine.take_effects();
            if effects.is_empty() {
                break;
            }
            for effect in effects {
                if let Effect::Log { message, .. } = &effect {
                    for s in &self.secrets {
                        assert!(!message.contains(s.as_str()), "a log line carries a credential: {message}");
                    }
                    continue;
                }
                let Some(ctx) = effect.ctx() else {
                    if let Effect::SetTick { ms } = effect {
                        self.tick_ms = ms;
                    }
                    continue;
                };
                if self.streams.get(&ctx).is_some_and(|s| s.left) {
                    continue; // set_effective_context fails: the stream is gone
                }
                let receipt = match &effect {
                    Effect::Dispatch { from, key, call } => {
                        assert_eq!(
                            *from, self.current,
                            "a call made from {from} in a callback of {}",
                            self.current
                        );
                        let token = token_of(&call.body);
                        let revocations = self.store.revocations();
                        let entry = self.tries.entry(*key).or_default();
                        if entry.dispatched == 0 {
                            entry.revocations = revocations;
                        }
                        if std::mem::take(&mut entry.again_due) {
                            assert_eq!(*from, ROOT, "an allow asked again from a stream");
                        } else if *from == ROOT {
                            assert!(self.in_tick, "a root call outside the timer");
                            // A retry waits 100 ms × the calls counted so far; a lost call is made
                            // again at once.
                            let counted = entry.dispatched.saturating_sub(entry.lost);
                            if counted > 0 && entry.lost == 0 {
                                assert!(
                                    self.now >= entry.last_fail.saturating_add(100 * counted),
                                    "retry after {counted} calls at {} before its backoff from {}",
                                    self.now,
                                    entry.last_fail
                                );
                            }
                        }
                        entry.dispatched += 1;
                        if std::mem::take(&mut self.refuse_next) {
                            entry.last_fail = self.now;
                            Some(Receipt::Dispatched { key: *key, from: *from, token: None })
                        } else {
                            self.next_token += 1;
                            let t = self.next_token;
                            self.calls.insert(
                                t,
                                Call { owner: *from, token, key: *key, delivered: false, dropped: false },
                            );
                            Some(Receipt::Dispatched { key: *key, from: *from, token: Some(t) })
                        }
                    }
                    Effect::SetRequestHeader { name, value, .. } if name == "x-revenprox-user" => {
                        let s = self
                            .streams
                            .get_mut(&ctx)
                            .unwrap_or_else(|| panic!("identity for unknown {ctx}"));
                        assert!(!s.reauth, "a challenge response forwarded");
                        assert_eq!(s.outcome, None, "stream {ctx} got a second outcome");
                        let users = self.allowed_tokens.get(&s.token);
                        let user = String::from_utf8_lossy(value).to_string();
                        assert!(
                            users.is_some_and(|u| u.contains(&user)),
                            "stream {ctx} allowed as {user} without such a verdict"
                        );
                        s.outcome = Some(Outcome::Allowed);
                        None
                    }
                    Effect::Reply { .. } | Effect::NoContent { .. } => {
                        let s =
                            self.streams.get_mut(&ctx).unwrap_or_else(|| panic!("reply to unknown {ctx}"));
                        assert_eq!(s.outcome, None, "stream {ctx} got a second outcome: {effect:?}");
                        if matches!(effect, Effect::NoContent { .. }) {
                            assert!(
                                s.reauth && self.allowed_tokens.contains_key(&s.token),
                                "204 without an allowed refresh"
                            );
                            s.outcome = Some(Outcome::NoContent);
                        } else {
                            s.outcome = Some(Outcome::Refused);
                        }
                        None
                    }
                    _ => None,
                };
                if let Some(r) = receipt {
                    if let Some(f) = self.engine.receipt(r, self.now) {
                        flow = f;
                    }
                }
            }
        }
        flow
    }

    fn begin(&mut self, key: u8, ticket: bool, reauth: bool, refuse: bool) {
        self.next_ctx += 1;
        let ctx = self.next_ctx;
        let token =
            if ticket { format!("tkt-u{}-{ctx}", key % 3) } else { format!("hdr.jwt-u{}-x.sig", key % 3) };
        let path = if ticket { format!("/events/news?ticket={token}") } else { "/events/news".to_string() };
        let mut headers = vec![(":path".to_string(), path.into_bytes())];
        if reauth {
            headers.push((":method".into(), b"POST".to_vec()));
            headers.push(("content-type".into(), b"application/x-challenge-response".to_vec()));
        } else {
            headers.push((":method".into(), b"GET".to_vec()));
        }
        if !ticket {
            headers.push(("authorization".into(), format!("Bearer {token}").into_bytes()));
        }
        self.secrets.push(token.clone());
        self.streams.insert(ctx, Stream { token, reauth, outcome: None, left: false });
        self.current = ctx;
        self.in_tick = false;
        self.refuse_next = refuse;
        let flow = self.engine.request_headers(
            ctx,
            &headers,
            &mut || Some(format!("10.0.{}.1:1", ctx % 3)),
            self.now,
        );
        let flow = self.run(flow);
        self.refuse_next = false;
        if flow == Flow::Continue {
            let s = self.streams.get(&ctx).unwrap_or_else(|| panic!("lost {ctx}"));
            assert_eq!(s.outcome, Some(Outcome::Allowed), "continued without an identity");
        }
    }

    fn answer(&mut self, t: u32, answer: Answer) {
        let Some(call) = self.calls.get_mut(&t) else {
            return;
        };
        call.delivered = true;
        let (owner, token, key, dropped) = (call.owner, call.token.clone(), call.key, call.dropped);
        // Only an answer to a call the engine still waits for is a try of a verification.
        let live = !dropped && self.engine.verifier().flights().get(&key).is_some_and(|f| f.call == Some(t));
        let user = user_of(&token).to_string();
        let exp = T0 / 1000 + 86_400;
        let (status, body) = match answer {
            Answer::Allow => (200, format!(r#"{{"valid":true,"user_id":"{user}","expires_at":{exp}}}"#)),
            Answer::OtherUser => (200, format!(r#"{{"valid":true,"user_id":"x{user}","expires_at":{exp}}}"#)),
            Answer::Deny => (200, r#"{"valid":false,"user_id":null,"expires_at":null}"#.to_string()),
            Answer::Status500 => (500, String::new()),
            Answer::Status504 => (504, String::new()),
            Answer::Malformed => (200, "{".to_string()),
        };
        let cacheable = self.engine.verifier().flights().get(&key).is_some_and(|f| f.verification.cacheable);
        if live && cacheable && matches!(answer, Answer::Allow | Answer::OtherUser) {
            // A cacheable allow decided before a revocation that happened meanwhile: asked once more.
            let now = self.store.revocations();
            let t = self.tries.entry(key).or_default();
            if t.revocations != now && t.again == 0 {
                t.again = 1;
                t.again_due = true;
                t.revocations = now;
            }
        }
        if live {
            match answer {
                Answer::Allow => {
                    self.allowed_tokens.entry(token.clone()).or_default().insert(user.clone());
                }
                Answer::OtherUser => {
                    self.allowed_tokens.entry(token.clone()).or_default().insert(format!("x{user}"));
                }
                Answer::Deny => {}
                Answer::Status500 | Answer::Status504 | Answer::Malformed => {
                    self.tries.entry(key).or_default().last_fail = self.now;
                }
            }
        }
        self.current = owner;
        self.in_tick = false;
        self.engine.call_answered(t, Some(status), body.as_bytes(), self.now);
        self.run(Flow::Continue);
    }

    fn tick(&mut self, refuse: bool) {
        self.current = ROOT;
        self.in_tick = true;
        self.refuse_next = refuse;
        self.engine.tick(self.now);
        self.run(Flow::Continue);
        self.refuse_next = false;
        self.in_tick = false;
    }

    fn leave(&mut self, ctx: Ctx) {
        if let Some(s) = self.streams.get_mut(&ctx) {
            s.left = true;
        }
        for c in self.calls.values_mut().filter(|c| c.owner == ctx && !c.delivered) {
            c.dropped = true;
            if let Some(e) = self.tries.get_mut(&c.key) {
                e.lost += 1;
            }
        }
        self.current = ctx;
        self.in_tick = false;
        self.engine.stream_done(ctx, self.now);
        self.run(Flow::Continue);
    }

    fn pending(&self, dropped: bool) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .calls
            .iter()
            .filter(|(_, c)| !c.delivered && c.dropped == dropped)
            .map(|(t, _)| *t)
            .collect();
        v.sort_unstable();
        v
    }

    /// Verifications whose waiters all have an outcome are over: their call counts are checked and
    /// forgotten.
    fn settle(&mut self) {
        let open: HashSet<FlightKey> = self.engine.verifier().flights_keys().into_iter().collect();
        let retries = self.retries;
        self.tries.retain(|key, t| {
            assert!(
                t.dispatched <= 1 + retries + t.lost + t.again,
                "{} calls for {key:?} (retry_attempts {retries}, {} lost, {} asked again)",
                t.dispatched,
                t.lost,
                t.again
            );
            open.contains(key)
        });
    }
}

fuzz_target!(|x: Input| {
    let retries = u64::from(x.retries % 4);
    let json = serde_json::json!({
        "jwt_verifier": {
            "webhook_url": "http://auth.internal/verify", "webhook_cluster": "auth",
            "retry_attempts": retries, "precheck": false,
            "circuit_breaker_threshold": 1 + u32::from(x.threshold % 6),
            "circuit_breaker_timeout_sec": 1,
            "rate_limit_per_sec": 1 + u32::from(x.rate % 20),
            "cache_ttl_sec": if x.cache_off { 0 } else { 300 },
        }
    });
    let cfg = config::parse(json.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let store = MemStore::new();
    let mut h = Host {
        engine: Engine::new(cfg, store.clone(), ROOT, 7, true, true, T0),
        store,
        now: T0,
        tick_ms: 0,
        streams: HashMap::new(),
        next_ctx: ROOT,
        calls: HashMap::new(),
        next_token: 0,
        allowed_tokens: HashMap::new(),
        current: ROOT,
        in_tick: false,
        refuse_next: false,
        tries: HashMap::new(),
        retries,
        secrets: Vec::new(),
    };
    h.run(Flow::Continue);
    for op in x.ops.iter().take(256) {
        match *op {
            Op::Begin { .. } if h.streams.len() >= MAX_STREAMS => {}
            Op::Begin { key, ticket, reauth, refuse } => h.begin(key, ticket, reauth, refuse),
            Op::Answer { call, answer } => {
                let p = h.pending(false);
                if let Some(t) = p.get(usize::from(call) % p.len().max(1)) {
                    h.answer(*t, answer);
                }
            }
            Op::Late { call, answer } => {
                let p = h.pending(true);
                if let Some(t) = p.get(usize::from(call) % p.len().max(1)) {
                    h.answer(*t, answer);
                }
            }
            Op::Advance { ms } => h.now = h.now.saturating_add(u64::from(ms)),
            Op::Tick { refuse } => h.tick(refuse),
            Op::Wait { refuse } => {
                h.now = h.now.saturating_add(h.tick_ms.max(1));
                h.tick(refuse);
            }
            Op::Leave { stream } => {
                let mut here: Vec<Ctx> = h.streams.iter().filter(|(_, s)| !s.left).map(|(c, _)| *c).collect();
                here.sort_unstable();
                if let Some(ctx) = here.get(usize::from(stream) % here.len().max(1)) {
                    h.leave(*ctx);
                }
            }
        }
        h.settle();
    }
    // The end: Envoy answers every call and the timer fires until nothing is scheduled.
    for _ in 0..10_000 {
        let p = h.pending(false);
        if !p.is_empty() {
            for t in p {
                h.answer(t, x.drain);
            }
        } else if h.tick_ms != 0 {
            h.now = h.now.saturating_add(h.tick_ms);
            h.tick(false);
        } else {
            break;
        }
        h.settle();
    }
    for (ctx, s) in &h.streams {
        assert!(s.left || s.outcome.is_some(), "stream {ctx} never got an outcome: {s:?}");
    }
    assert!(h.engine.verifier().flights().is_empty(), "flights left");
    assert!(h.engine.verifier().calls().is_empty(), "calls left: {:?}", h.engine.verifier().calls());
});
