//! The shipped engine's SSE streams (`engine::Engine`: sessions, hold-and-release, injections at
//! event boundaries, refreshes, re-verification, expiry) driven through arbitrary host events:
//! upstream chunks of arbitrary bytes and sizes (end of stream included), the worker's release
//! signal, timer ticks and time, challenge responses with later or earlier expiries,
//! re-verification answers (allow, deny, another user, failure), streams going away, with fuzzed
//! heartbeat, challenge, maximum duration and re-verification settings.
//!
//! An Envoy model performs the effects as `src/host/apply.rs` does: a chunk the engine holds
//! (`Flow::Pause`) stays in the response buffer until a release, and a chunk arriving meanwhile is
//! handed over after it (the body callback sees the held bytes again, then the new ones); an
//! `Inject` appends to that buffer and releases it, and fails when nothing is held; a
//! `ReplaceChunk` rewrites the buffer in flight. Some responses declare their length
//! (`content-length`), which their chunks then may or may not respect.
//! What the client receives is kept as segments (upstream bytes, or one injection).
//!
//! Properties: no panic (overflow checks on); the upstream bytes the client receives are exactly
//! the upstream's, in order, up to the stream's end (nothing after `event: expired`); every
//! injection lands on an event boundary of the stream so far (the reference WHATWG parser of
//! `revenprox::testkit` decodes the same upstream events and comments with and without them);
//! at most one challenge per expiry; once time runs far past every deadline, every stream has
//! ended (`expired`, a close, or the upstream's end); no log line carries a credential.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::config;
use revenprox::engine::{ChunkReader, Ctx, Effect, Engine, Flow, Receipt};
use revenprox::shared::MemStore;
use revenprox::sse::session::{ExpiryReason, Injection};
use revenprox::testkit::sse;
use std::collections::HashMap;

const ROOT: Ctx = 1;
/// 2030-01-01.
const T0: u64 = 1_893_456_000_000;
const T0_SEC: u64 = T0 / 1000;
const STREAMS: usize = 3;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reverified {
    Allow { ttl: u16 },
    Deny,
    OtherUser,
    Fail,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Upstream bytes for stream `s`: pieces from a small SSE alphabet.
    Chunk {
        s: u8,
        pieces: Vec<u8>,
        eos: bool,
    },
    /// A big chunk (over the 64 KiB hold limit).
    Flood {
        s: u8,
    },
    /// The worker's queue delivers the release signal.
    Release,
    Advance {
        ms: u16,
    },
    Tick,
    /// Time to the timer's next firing, which fires.
    Wait,
    /// A challenge response for stream `s`'s user, with a token of `ttl` seconds.
    Refresh {
        s: u8,
        ttl: u16,
    },
    /// The webhook answers a pending re-verification call.
    Answer {
        call: u8,
        how: Reverified,
    },
    Leave {
        s: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    heartbeat: u8,
    challenge: u8,
    max: u16,
    reverify: u8,
    ttls: [u16; STREAMS],
    /// A `content-length` for each stream's response, if any.
    lengths: [Option<u16>; STREAMS],
    ops: Vec<Op>,
}

/// Every byte string the filter injects.
const INJECTIONS: [&[u8]; 5] = [
    Injection::Heartbeat.bytes(),
    Injection::Challenge.bytes(),
    Injection::Expired(ExpiryReason::TokenExpired).bytes(),
    Injection::Expired(ExpiryReason::MaxDuration).bytes(),
    Injection::Expired(ExpiryReason::Revoked).bytes(),
];

const PIECES: [&[u8]; 10] =
    [b"data: a", b"\n", b"\r\n", b"\r", b"event: x", b": c", b"id: 1", b"data:", b"\n\n", b"\xef\xbb\xbf"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Up(Vec<u8>),
    /// An injection, and the upstream byte the engine saw right after it when it placed it (spliced
    /// inside a chunk), or `None` (appended to the bytes held so far).
    Injected(Vec<u8>, Option<u8>),
}

/// Whether an injection may sit at the end of `before`: an event boundary of the stream so far,
/// and not between the CR and a possible LF of one line end. After a CR that is only known when
/// the engine saw the next byte (`next`) and it is not an LF.
fn injectable(before: &[u8], next: Option<u8>) -> bool {
    sse::boundaries(before).contains(&before.len())
        && (!before.ends_with(b"\r") || next.is_some_and(|b| b != b'\n'))
}

#[derive(Debug, Default)]
struct Client {
    segments: Vec<Seg>,
    /// Bytes held by Envoy (a chunk the engine paused), with their upstream bytes.
    held: Vec<Seg>,
    holding: bool,
    /// Upstream bytes the upstream sent and the client must get (those the filter dropped after
    /// `expired` excluded).
    upstream: Vec<u8>,
    gone: bool,
    ended: bool,
    challenges: HashMap<u64, u32>,
    /// Segments already checked for challenges.
    checked: usize,
    user: String,
    expiry: u64,
}

struct Host {
    engine: Engine<MemStore>,
    now: u64,
    tick_ms: u64,
    clients: HashMap<Ctx, Client>,
    next_token: u32,
    calls: Vec<u32>,
    secrets: Vec<String>,
    current: Ctx,
}

struct Bytes<'a>(&'a [u8]);

impl ChunkReader for Bytes<'_> {
    fn read(&mut self, start: usize, len: usize) -> Vec<u8> {
        self.0.get(start..).map(|s| s.get(..len).unwrap_or(s).to_vec()).unwrap_or_default()
    }
}

fn token(user: &str, n: u32) -> String {
    format!("eyJhbGciOiJIUzI1NiJ9.{user}-{n}.sig")
}

fn upstream_text(segs: &[Seg]) -> Vec<u8> {
    segs.iter().flat_map(|s| if let Seg::Up(b) = s { b.clone() } else { Vec::new() }).collect()
}

/// Every byte of the segments, as the client gets them.
fn all_bytes(segs: &[Seg]) -> Vec<u8> {
    segs.iter()
        .flat_map(|s| match s {
            Seg::Up(b) | Seg::Injected(b, _) => b.clone(),
        })
        .collect()
}

/// The segments before and after byte `at` (an upstream segment is cut in two there), or `None`
/// when `at` falls inside an injection (the engine splices only into upstream bytes).
fn split_segments(segs: &[Seg], at: usize) -> Option<(Vec<Seg>, Vec<Seg>)> {
    let (mut head, mut tail, mut pos) = (Vec::new(), Vec::new(), 0usize);
    for seg in segs {
        let len = match seg {
            Seg::Up(b) | Seg::Injected(b, _) => b.len(),
        };
        if pos + len <= at {
            head.push(seg.clone());
        } else if pos >= at {
            tail.push(seg.clone());
        } else {
            let Seg::Up(b) = seg else { return None };
            head.push(Seg::Up(b[..at - pos].to_vec()));
            tail.push(Seg::Up(b[at - pos..].to_vec()));
        }
        pos += len;
    }
    Some((head, tail))
}

impl Host {
    fn deliver(&mut self, ctx: Ctx) {
        if let Some(c) = self.clients.get_mut(&ctx) {
            let held = std::mem::take(&mut c.held);
            c.segments.extend(held);
        }
    }

    /// Performs pending effects as the host shell does.
    fn run(&mut self, flow: Flow, chunk_of: Option<Ctx>) -> Flow {
        let mut flow = flow;
        for _ in 0..64 {
            let effects = self.engine.take_effects();
            if effects.is_empty() {
                break;
            }
            for effect in effects {
                let receipt = self.perform(effect, chunk_of);
                if let Some(r) = receipt {
                    if let Some(f) = self.engine.receipt(r, self.now) {
                        flow = f;
                    }
                }
            }
        }
        flow
    }

    fn perform(&mut self, effect: Effect, chunk_of: Option<Ctx>) -> Option<Receipt> {
        if let Effect::Log { message, .. } = &effect {
            for s in &self.secrets {
                assert!(!message.contains(s.as_str()), "a log line carries a credential: {message}");
            }
            return None;
        }
        if let Effect::SetTick { ms } = effect {
            self.tick_ms = ms;
            return None;
        }
        let ctx = effect.ctx()?;
        if self.clients.get(&ctx).is_some_and(|c| c.gone) {
            return None;
        }
        match effect {
            Effect::Dispatch { key, from, call } => {
                assert_eq!(from, self.current, "a call from another context than the running callback's");
                self.next_token += 1;
                let _ = call;
                self.calls.push(self.next_token);
                Some(Receipt::Dispatched { key, from, token: Some(self.next_token) })
            }
            Effect::ReplaceChunk { ctx, size, bytes } => {
                assert_eq!(chunk_of, Some(ctx), "a chunk replaced outside its body callback");
                let c = self.clients.get_mut(&ctx)?;
                // The buffer in flight: what was held, then the new chunk (the last segment).
                let original = all_bytes(&c.held);
                assert_eq!(size, original.len(), "a replacement of another size than the buffer");
                let Some(Seg::Up(new)) = c.held.last().cloned() else {
                    panic!("no chunk in flight to replace");
                };
                if original.starts_with(&bytes) && bytes.len() + new.len() == original.len() {
                    // Dropped: after `expired`, nothing new of the upstream goes on (what was held
                    // before stays).
                    assert!(
                        c.segments
                            .iter()
                            .chain(&c.held)
                            .any(|s| matches!(s, Seg::Injected(b, _) if b.starts_with(b"event: expired"))),
                        "upstream bytes dropped before the stream expired"
                    );
                    assert_eq!(bytes, original[..original.len() - new.len()], "held bytes dropped");
                    c.held.pop();
                    let keep = c.upstream.len() - new.len();
                    c.upstream.truncate(keep);
                } else {
                    // The chunk with one injection spliced in: upstream bytes around it, unchanged,
                    // except after `expired`, where the rest of the chunk goes.
                    // (Where a known injection fits several ways, the place that is an event
                    // boundary is taken; `check` refuses the splice if none is.)
                    let stream_so_far = upstream_text(&c.segments);
                    let fits: Vec<(usize, &[u8])> = INJECTIONS
                        .iter()
                        .flat_map(|inj| (0..=original.len()).map(move |at| (at, *inj)))
                        .filter(|(at, inj)| {
                            let rest =
                                if inj.starts_with(b"event: expired") { &[][..] } else { &original[*at..] };
                            bytes.len() == at + inj.len() + rest.len()
                                && bytes[..*at] == original[..*at]
                                && &bytes[*at..*at + inj.len()] == *inj
                                && bytes[*at + inj.len()..] == *rest
                        })
                        .collect();
                    assert!(!fits.is_empty(), "a replaced chunk is not the chunk plus one injection");
                    let on_boundary = |at: usize| {
                        split_segments(&c.held, at).is_some_and(|(head, _)| {
                            let mut before = stream_so_far.clone();
                            before.extend_from_slice(&upstream_text(&head));
                            injectable(&before, original.get(at).copied())
                        })
                    };
                    let splittable = |at: usize| split_segments(&c.held, at).is_some();
                    let (at, inj) = fits
                        .iter()
                        .find(|(at, _)| on_boundary(*at))
                        .or_else(|| fits.iter().find(|(at, _)| splittable(*at)))
                        .copied()
                        .unwrap_or_else(|| panic!("an injection spliced inside another"));
                    let (mut head, tail) = split_segments(&c.held, at).unwrap_or_default();
                    head.push(Seg::Injected(inj.to_vec(), original.get(at).copied()));
                    if inj.starts_with(b"event: expired") {
                        // The upstream bytes after it were dropped (they are of the new chunk).
                        let dropped = upstream_text(&tail).len();
                        assert_eq!(dropped, original.len() - at, "held bytes dropped");
                        let keep = c.upstream.len() - dropped;
                        c.upstream.truncate(keep);
                    } else {
                        head.extend(tail);
                    }
                    c.held = head;
                }
                Some(Receipt::Written { ctx })
            }
            Effect::Inject { ctx, bytes } => {
                let c = self.clients.get_mut(&ctx)?;
                if !c.holding {
                    return Some(Receipt::Failed(Effect::Inject { ctx, bytes }));
                }
                c.held.push(Seg::Injected(bytes.to_vec(), None));
                self.deliver(ctx);
                Some(Receipt::Written { ctx })
            }
            Effect::ResumeResponse { ctx } => {
                self.deliver(ctx);
                None
            }
            Effect::Close { ctx } => {
                if let Some(c) = self.clients.get_mut(&ctx) {
                    c.ended = true;
                }
                None
            }
            _ => None,
        }
    }

    fn open(&mut self, ctx: Ctx, user: &str, ttl: u64, length: Option<u16>) {
        let tok = token(user, ctx);
        self.secrets.push(tok.clone());
        let headers = vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/events/news".to_vec()),
            ("authorization".to_string(), format!("Bearer {tok}").into_bytes()),
        ];
        self.current = ctx;
        let flow = self.engine.request_headers(ctx, &headers, &mut || Some("10.0.0.1:1".into()), self.now);
        self.run(flow, None);
        let call = self.calls.pop().unwrap_or_else(|| panic!("no call for stream {ctx}"));
        let expiry = T0_SEC + ttl;
        let verdict = format!(r#"{{"valid":true,"user_id":"{user}","expires_at":{expiry}}}"#);
        self.engine.call_answered(call, Some(200), verdict.as_bytes(), self.now);
        self.run(Flow::Continue, None);
        let mut sse = vec![
            (":status".to_string(), b"200".to_vec()),
            ("content-type".to_string(), b"text/event-stream".to_vec()),
        ];
        if let Some(n) = length {
            sse.push(("content-length".to_string(), n.to_string().into_bytes()));
        }
        self.engine.response_headers(ctx, &sse, self.now);
        self.run(Flow::Continue, None);
        self.clients.insert(ctx, Client { user: user.to_string(), expiry, ..Client::default() });
    }

    fn chunk(&mut self, ctx: Ctx, bytes: Vec<u8>, eos: bool) {
        let Some(c) = self.clients.get_mut(&ctx) else { return };
        // Bounded: a few floods per stream at most (the checks scan every byte).
        if c.gone || c.ended || c.upstream.len() > 400_000 {
            return;
        }
        c.upstream.extend_from_slice(&bytes);
        // While a chunk is held, the body callback gets the held bytes again, then the new ones.
        if !c.holding {
            let held = std::mem::take(&mut c.held);
            c.segments.extend(held);
        }
        c.held.push(Seg::Up(bytes));
        let buffer = all_bytes(&c.held);
        self.current = ctx;
        let flow = self.engine.response_body(ctx, buffer.len(), eos, &mut Bytes(&buffer), self.now);
        let flow = self.run(flow, Some(ctx));
        let c = self.clients.get_mut(&ctx).unwrap_or_else(|| panic!("lost {ctx}"));
        c.holding = flow == Flow::Pause;
        if flow == Flow::Continue {
            self.deliver(ctx);
        }
        if eos {
            if let Some(c) = self.clients.get_mut(&ctx) {
                c.ended = true;
            }
        }
    }

    fn tick(&mut self) {
        self.current = ROOT;
        self.engine.tick(self.now);
        self.run(Flow::Continue, None);
    }

    /// After each event: new challenges are attributed to the expiry their stream has now.
    fn attribute(&mut self) {
        for (ctx, c) in self.clients.iter_mut() {
            for s in c.segments.get(c.checked..).unwrap_or_default() {
                if matches!(s, Seg::Injected(b, _) if b.starts_with(b"event: challenge")) {
                    let exp = self.engine.streams().expires_at(*ctx).unwrap_or(0);
                    *c.challenges.entry(exp).or_default() += 1;
                }
            }
            c.checked = c.segments.len();
            for (exp, n) in &c.challenges {
                assert!(*n <= 1, "stream {ctx}: {n} challenges for expiry {exp}");
            }
        }
    }

    /// At the end (delivered bytes never change): integrity of every stream.
    fn check(&mut self) {
        for (ctx, c) in self.clients.iter_mut() {
            // Upstream bytes arrive unchanged and in order (a prefix of what the upstream sent).
            let got = upstream_text(&c.segments);
            assert!(c.upstream.starts_with(&got), "stream {ctx}: upstream bytes changed");
            // Every injection sits on an event boundary of the upstream bytes before it.
            let mut pos = 0usize;
            for s in &c.segments {
                match s {
                    Seg::Up(b) => pos += b.len(),
                    Seg::Injected(b, next) => assert!(
                        injectable(&got[..pos], *next),
                        "stream {ctx}: injection {:?} inside an event at {pos}",
                        String::from_utf8_lossy(b)
                    ),
                }
            }
            // Decoding is the same with and without the injections (unless the upstream itself
            // sends events or comments that look like ours).
            let looks_like_ours = got.windows(8).any(|w| w == b"event: c" || w == b"event: e");
            if !looks_like_ours {
                let client: Vec<u8> = c
                    .segments
                    .iter()
                    .flat_map(|s| match s {
                        Seg::Up(b) | Seg::Injected(b, _) => b.clone(),
                    })
                    .collect();
                let (events, comments) = sse::decode(&got);
                let (all_events, all_comments) = sse::decode(&client);
                let kept: Vec<_> = all_events
                    .into_iter()
                    .filter(|e| e.kind != b"challenge" && e.kind != b"expired")
                    .collect();
                let kept_comments: Vec<_> =
                    all_comments.into_iter().filter(|c| c.as_slice() != b": heartbeat").collect();
                assert_eq!(kept, events, "stream {ctx}: upstream events changed by injections");
                assert_eq!(kept_comments, comments, "stream {ctx}: upstream comments changed by injections");
            }
            // Nothing of the upstream after `expired`.
            if let Some(i) = c
                .segments
                .iter()
                .position(|s| matches!(s, Seg::Injected(b, _) if b.starts_with(b"event: expired")))
            {
                assert!(
                    c.segments[i + 1..].iter().all(|s| !matches!(s, Seg::Up(b) if !b.is_empty())),
                    "stream {ctx}: upstream bytes after expired"
                );
            }
        }
    }
}

fuzz_target!(|x: Input| {
    let json = serde_json::json!({
        "jwt_verifier": {"webhook_url": "http://auth.internal/verify", "webhook_cluster": "auth",
                         "retry_attempts": 0, "precheck": false},
        "sse": {
            "heartbeat_interval_sec": 1 + u64::from(x.heartbeat % 5),
            "challenge_before_expiry_sec": u64::from(x.challenge % 20),
            "max_connection_sec": 5 + u64::from(x.max % 120),
            "reverify_interval_sec": u64::from(x.reverify % 11),
        }
    });
    let cfg = config::parse(json.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let max_ms = cfg.sse.max_connection_sec * 1000;
    let mut h = Host {
        engine: Engine::new(cfg, MemStore::new(), ROOT, 7, true, true, T0),
        now: T0,
        tick_ms: 0,
        clients: HashMap::new(),
        next_token: 0,
        calls: Vec::new(),
        secrets: Vec::new(),
        current: ROOT,
    };
    h.run(Flow::Continue, None);
    for (i, ttl) in x.ttls.iter().enumerate() {
        let ctx = 10 + i as Ctx;
        h.open(ctx, &format!("user{}", i % 2), 1 + u64::from(*ttl % 300), x.lengths[i]);
    }
    let ctx_of = |s: u8| 10 + Ctx::from(s) % STREAMS as Ctx;
    let mut refreshes = 100u32;
    for op in x.ops.iter().take(200) {
        match op {
            Op::Chunk { s, pieces, eos } => {
                let bytes: Vec<u8> = pieces
                    .iter()
                    .take(64)
                    .flat_map(|p| PIECES[usize::from(*p) % PIECES.len()].to_vec())
                    .collect();
                h.chunk(ctx_of(*s), bytes, *eos);
            }
            Op::Flood { s } => h.chunk(ctx_of(*s), b"data: f\n\n".repeat(8_000), false),
            Op::Release => {
                h.current = ROOT;
                h.engine.released(h.now);
                h.run(Flow::Continue, None);
            }
            Op::Advance { ms } => h.now += u64::from(*ms),
            Op::Tick => h.tick(),
            Op::Wait => {
                h.now += h.tick_ms.max(1);
                h.tick();
            }
            Op::Refresh { s, ttl } => {
                let ctx = ctx_of(*s);
                let Some(user) = h.clients.get(&ctx).map(|c| c.user.clone()) else { continue };
                refreshes += 1;
                let tok = token(&user, refreshes);
                h.secrets.push(tok.clone());
                let headers = vec![
                    (":method".to_string(), b"POST".to_vec()),
                    (":path".to_string(), b"/events/news".to_vec()),
                    ("content-type".to_string(), b"application/x-challenge-response".to_vec()),
                    ("authorization".to_string(), format!("Bearer {tok}").into_bytes()),
                ];
                h.current = refreshes;
                let flow =
                    h.engine.request_headers(refreshes, &headers, &mut || Some("10.0.0.1:1".into()), h.now);
                h.run(flow, None);
                if let Some(call) = h.calls.pop() {
                    let exp = h.now / 1000 + 1 + u64::from(*ttl % 300);
                    let verdict = format!(r#"{{"valid":true,"user_id":"{user}","expires_at":{exp}}}"#);
                    h.current = refreshes;
                    h.engine.call_answered(call, Some(200), verdict.as_bytes(), h.now);
                    h.run(Flow::Continue, None);
                    // The user's streams that had an earlier expiry take the later one.
                    for c in h.clients.values_mut().filter(|c| c.user == user && c.expiry < exp) {
                        c.expiry = exp;
                    }
                }
                h.engine.stream_done(refreshes, h.now);
                h.run(Flow::Continue, None);
            }
            Op::Answer { call, how } => {
                if h.calls.is_empty() {
                    continue;
                }
                let t = h.calls.remove(usize::from(*call) % h.calls.len());
                let (status, body) = match how {
                    Reverified::Allow { ttl } => (
                        200,
                        format!(
                            r#"{{"valid":true,"user_id":"user0","expires_at":{}}}"#,
                            h.now / 1000 + 1 + u64::from(*ttl % 300)
                        ),
                    ),
                    Reverified::OtherUser => (
                        200,
                        format!(r#"{{"valid":true,"user_id":"zz","expires_at":{}}}"#, h.now / 1000 + 60),
                    ),
                    Reverified::Deny => {
                        (200, r#"{"valid":false,"user_id":null,"expires_at":null}"#.to_string())
                    }
                    Reverified::Fail => (503, String::new()),
                };
                h.current = ROOT;
                h.engine.call_answered(t, Some(status), body.as_bytes(), h.now);
                h.run(Flow::Continue, None);
            }
            Op::Leave { s } => {
                let ctx = ctx_of(*s);
                if let Some(c) = h.clients.get_mut(&ctx) {
                    if !c.gone {
                        c.gone = true;
                        h.current = ctx;
                        h.engine.stream_done(ctx, h.now);
                        h.run(Flow::Continue, None);
                    }
                }
            }
        }
        h.attribute();
    }
    // Time runs far past every deadline (re-verification calls fail): every stream still there
    // ends, with `expired` or a close, never before its expiry.
    let end = h.now + max_ms + 400_000;
    for _ in 0..4_000 {
        if h.now >= end {
            break;
        }
        for t in std::mem::take(&mut h.calls) {
            h.current = ROOT;
            h.engine.call_answered(t, Some(503), b"", h.now);
            h.run(Flow::Continue, None);
        }
        h.now += h.tick_ms.max(250);
        h.tick();
        // Releases of held chunks come as the queue would deliver them.
        h.current = ROOT;
        h.engine.released(h.now);
        h.run(Flow::Continue, None);
        h.attribute();
    }
    h.check();
    for (ctx, c) in &h.clients {
        assert!(c.gone || c.ended, "stream {ctx} outlived every deadline");
    }
});
