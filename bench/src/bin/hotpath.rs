//! Native cost of the filter's pure hot path: the filter's own core crate (`core/`, the shipped
//! code, as a dependency) run in a loop.
//!
//!   hotpath                       every case, ns/op (wall clock, median of 5 batches), as JSON
//!   hotpath --only CASE --iters N run one case N times (for `valgrind --tool=callgrind`: the
//!                                 difference between two N gives instructions per op)
//!
//! The host calls themselves (headers, shared data, queues) cannot run natively; `run.py` lists
//! them next to these numbers. Native x86-64 is not V8's wasm code, but the proportions hold.

#![allow(dead_code, unused_imports)]

#[path = "../common.rs"]
mod common;

use revenprox_core::{auth, config, resilience, sse};

use auth::gate::{self, Request, Step};
use auth::{cache, precheck, token, topic, verdict};
use common::{Args, unsigned_token};
use sse::framing::Framing;
use revenprox_core::engine::{ChunkReader, Engine, Flow};
use revenprox_core::shared::{self, MemStore, SharedStore};
use sse::presence;
use sse::session::Session;
use std::hint::black_box;
use std::time::Instant;

const NOW_SEC: u64 = 1_900_000_000 - 3 * 3600 + 60;
/// Events in `flood_chunk`.
const FLOOD_EVENTS: u64 = 150;

struct Fixture {
    cfg: config::Config,
    token: String,
    bearer: String,
    path: String,
    topic_id: String,
    key: cache::Key,
    /// The shared cache holding the fixture's verdict in one of its two slots (another in the other).
    store: MemStore,
    presence_bucket: Vec<u8>,
    verdict_body: Vec<u8>,
    event: Vec<u8>,
    /// ~16 KB of events, as Envoy reads them from a fast upstream (the flood figure).
    flood_chunk: Vec<u8>,
}

fn fixture() -> Fixture {
    let cfg = config::parse(
        br#"{"jwt_verifier":{"webhook_url":"http://auth.bench/verify","webhook_cluster":"webhook","rate_limit_per_sec":1000000},"sse":{"heartbeat_interval_sec":1}}"#,
    )
    .unwrap_or_else(|e| panic!("config: {e}"));
    let token = unsigned_token("user", 42);
    let topic_id = topic::id("bench").unwrap_or_default();
    let key = cache::key(&token, &topic_id);
    let now_ms = common::now_sec() * 1000;
    let mut store = MemStore::new();
    let hit = cache::Entry { key, until_ms: now_ms + 300_000, expires_at: now_ms / 1000 + 3600, user_id: "user-42".into() };
    let other = cache::Entry { key: [7; 32], until_ms: now_ms + 300_000, expires_at: 1, user_id: "user-7".into() };
    // Where the shipped code looks for the key (salted placement): the other entry in the first slot,
    // the hit in the second, so a lookup reads both.
    let [a, b] = shared::cache_slots(&store, &key, cfg.verifier.cache_max_size);
    let _ = store.set(&cache::slot_name(a), &other.encode(), None);
    let _ = store.set(&cache::slot_name(b), &hit.encode(), None);
    let mut bucket = presence::Bucket::default();
    bucket.change(&presence::stream_key("user-7", &topic_id), 1, 1, now_ms);
    Fixture {
        bearer: format!("Bearer {token}"),
        path: "/events/bench?mode=short".into(),
        store,
        presence_bucket: bucket.encode(),
        verdict_body: format!(r#"{{"valid":true,"user_id":"user-42","expires_at":{}}}"#, now_ms / 1000 + 3600).into_bytes(),
        event: format!("data: {{\"t\":{},\"n\":1,\"p\":\"{}\"}}\n\n", common::now_ns(), "x".repeat(64)).into_bytes(),
        flood_chunk: (0..FLOOD_EVENTS)
            .flat_map(|n| format!("data: {{\"t\":{},\"n\":{n},\"p\":\"{}\"}}\n\n", common::now_ns(), "x".repeat(64)).into_bytes())
            .collect(),
        cfg,
        token,
        topic_id,
        key,
    }
}

fn request<'a>(f: &'a Fixture) -> Request<'a> {
    Request { method: b"GET", path: &f.path, content_type: None, authorization: Some(f.bearer.as_bytes()), cookie: None }
}

/// The shipped cache lookup (`shared::cache_get`) over an in-memory store (the host's two slot
/// reads are copies of the stored bytes here).
fn cache_lookup(f: &Fixture, now_ms: u64) -> Option<cache::Entry> {
    shared::cache_get(&f.store, &f.key, f.cfg.verifier.cache_max_size, now_ms)
}

/// What a stream's registration costs in the pure part: its presence key (SHA-256), one bucket
/// decoded, changed and encoded, and its session.
fn session_open(f: &Fixture, now_ms: u64) -> Session {
    let key = presence::stream_key("user-42", &f.topic_id);
    let [a, b] = presence::buckets(&key);
    black_box((presence::bucket_name(a), presence::bucket_name(b)));
    let mut bucket = presence::Bucket::decode(&f.presence_bucket);
    bucket.change(&key, 1, 1, now_ms);
    black_box(bucket.encode());
    Session::new(&f.cfg.sse, now_ms, Some(now_ms / 1000 + 3600))
}

thread_local! {
    /// A warm engine: the fixture's token is in its local cache.
    static ENGINE: std::cell::RefCell<Option<Engine<MemStore>>> = const { std::cell::RefCell::new(None) };
}

/// The request headers of the fixture's handshake, as the host hands them to the engine.
fn request_headers(f: &Fixture) -> Vec<(String, Vec<u8>)> {
    vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), f.path.as_bytes().to_vec()),
        ("authorization".to_string(), f.bearer.as_bytes().to_vec()),
    ]
}

/// The shipped engine's request path for a token in its local cache: gate, local LRU hit,
/// identity and credential effects, as `on_http_request_headers` runs it (host calls excluded).
fn engine_cache_hit(f: &Fixture, now_ms: u64) -> u64 {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let engine = slot.get_or_insert_with(|| Engine::new(f.cfg.clone(), f.store.clone(), 1, 1, true, false, now_ms));
        let headers = request_headers(f);
        let flow = engine.request_headers(2, &headers, &mut || None, now_ms);
        let effects = engine.take_effects();
        engine.stream_done(2, now_ms);
        engine.take_effects();
        engine.take_metrics();
        u64::from(flow == Flow::Continue) + effects.len() as u64
    })
}

struct Bytes<'a>(&'a [u8]);

impl ChunkReader for Bytes<'_> {
    fn read(&mut self, start: usize, len: usize) -> Vec<u8> {
        self.0.get(start..).map(|s| s.get(..len).unwrap_or(s).to_vec()).unwrap_or_default()
    }
}

/// A whole one-event handshake through the warm engine, as the host drives it: request headers
/// (from the local cache), response headers (with a content-length), the body, the end of stream,
/// `on_done`. Host calls excluded.
fn engine_handshake(f: &Fixture, now_ms: u64) -> u64 {
    ENGINE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let engine = slot.get_or_insert_with(|| Engine::new(f.cfg.clone(), f.store.clone(), 1, 1, true, false, now_ms));
        let headers = request_headers(f);
        let response = vec![
            (":status".to_string(), b"200".to_vec()),
            ("content-type".to_string(), b"text/event-stream".to_vec()),
            ("content-length".to_string(), b"13".to_vec()),
        ];
        let mut n = engine.request_headers(3, &headers, &mut || None, now_ms) as u64;
        n += engine.take_effects().len() as u64;
        engine.response_headers(3, &response, now_ms);
        n += engine.take_effects().len() as u64;
        n += engine.response_body(3, 13, false, &mut Bytes(b"data: hello\n\n"), now_ms) as u64;
        n += engine.response_body(3, 0, true, &mut Bytes(b""), now_ms) as u64;
        n += engine.take_effects().len() as u64;
        engine.stream_done(3, now_ms);
        engine.take_effects();
        engine.take_metrics();
        n
    })
}

type Case = (&'static str, &'static str, fn(&Fixture, u64) -> u64);

const CASES: &[Case] = &[
    ("request_cache_hit", "whole pure path of an allowed request from the cache: gate::admit + cache lookup + identity", |f, now| {
        let Step::Verify(v) = gate::admit(&f.cfg, &request(f), now / 1000) else { return 0 };
        let hit = cache_lookup(f, now);
        let ident = hit.map(|h| (h.user_id.clone(), v.topic_id.clone(), h.expires_at));
        black_box(ident).is_some() as u64
    }),
    ("engine_cache_hit", "Engine::request_headers for a token in the local cache (+ stream_done)", engine_cache_hit),
    ("engine_handshake", "a whole one-event handshake through the engine: request (local cache), response headers, body, end, done", engine_handshake),
    ("gate_admit", "gate::admit: topic id, token extraction, precheck, cache key", |f, now| {
        matches!(gate::admit(&f.cfg, &request(f), now / 1000), Step::Verify(_)) as u64
    }),
    ("precheck", "precheck::check: 2 base64 decodes + 2 JSON walks (no Value maps)", |f, now| {
        precheck::check(&f.token, now / 1000).is_ok() as u64
    }),
    ("cache_key", "cache::key: SHA-256 over token + topic id", |f, _| cache::key(&f.token, &f.topic_id)[0] as u64),
    ("topic_id", "topic::id(\"bench\"): percent-decode + SHA-256 + hex", |_, _| topic::id("bench").map_or(0, |s| s.len() as u64)),
    ("token_extract", "token::extract from `Authorization: Bearer`", |f, _| {
        let parts = token::RequestParts { authorization: Some(f.bearer.as_bytes()), cookie: None, query: Some("mode=short") };
        token::extract(&f.cfg.token, &parts).map_or(0, |c| c.value.len() as u64)
    }),
    ("stripped_path", "gate::stripped_path (query without token params)", |f, _| {
        gate::stripped_path(&f.cfg, &f.path).map_or(1, |s| s.len() as u64)
    }),
    ("cache_lookup", "cache slots + 2 slot names + 2 Entry::decode + find (host reads excluded)", |f, now| {
        cache_lookup(f, now).is_some() as u64
    }),
    ("session_open", "presence key (SHA-256) + bucket decode/change/encode + Session::new", |f, now| {
        session_open(f, now).next_deadline_ms().unwrap_or(0)
    }),
    ("webhook_body", "verdict::request_body (cache miss)", |f, _| verdict::request_body(&f.token, &f.topic_id, false).len() as u64),
    ("verdict_parse", "verdict::parse of a 200 answer (cache miss)", |f, now| {
        matches!(verdict::parse(Some(200), &f.verdict_body, now / 1000), verdict::Verdict::Allow { .. }) as u64
    }),
    ("event_chunk", "per upstream chunk: Framing::feed over a ~110-byte event + Session::on_sent/due", |f, now| {
        let mut fr = Framing::new();
        let b = fr.feed(&f.event);
        let mut s = Session::new(&f.cfg.sse, now, Some(now / 1000 + 3600));
        s.on_sent(now, true);
        b.unwrap_or(0) as u64 + s.due(now).is_some() as u64
    }),
    ("framing_16k", "Framing::feed over a 16 KB chunk of 150 events (per chunk)", |f, _| {
        let mut fr = Framing::new();
        fr.feed(&f.flood_chunk).unwrap_or(0) as u64
    }),
    ("framing_advance_16k", "Framing::advance: state from a 16 KB chunk's last 64 bytes (what sessions::body does)", |f, _| {
        let mut fr = Framing::new();
        let tail = &f.flood_chunk[f.flood_chunk.len() - 64..];
        fr.advance(f.flood_chunk.len(), tail) as u64
    }),
    ("chunk_copy", "per upstream chunk: the copy of a ~110-byte chunk into a Vec (get_buffer)", |f, _| {
        black_box(f.event.to_vec()).len() as u64
    }),
];

fn run(case: &Case, f: &Fixture, iters: u64, now: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..iters {
        acc = acc.wrapping_add((case.2)(black_box(f), black_box(now + (i & 1))));
    }
    acc
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let a = Args::parse(argv.get(1..).unwrap_or_default());
    let f = fixture();
    let now = common::now_sec() * 1000;
    // The cases price the cache-hit path: a fixture the shipped lookup misses would silently price
    // a webhook dispatch instead (it did once, when placement became salted).
    if cache_lookup(&f, now).is_none() {
        eprintln!("hotpath: the fixture's verdict is not where the shipped cache lookup reads it");
        std::process::exit(1);
    }
    let mut probe = Engine::new(f.cfg.clone(), f.store.clone(), 1, 1, true, false, now);
    let headers = request_headers(&f);
    if probe.request_headers(9, &headers, &mut || None, now) != Flow::Continue {
        eprintln!("hotpath: the engine does not forward the fixture's request from the cache");
        std::process::exit(1);
    }
    if let Some(only) = a.opt("only") {
        let iters: u64 = a.num("iters", 1000);
        let Some(case) = CASES.iter().find(|c| c.0 == only) else {
            eprintln!("unknown case {only}");
            std::process::exit(2);
        };
        println!("{}", run(case, &f, iters, now));
        return;
    }
    let mut out = Vec::new();
    for case in CASES {
        // Calibrate to ~20 ms per batch, then the median of 5 batches.
        let mut n = 1000u64;
        loop {
            let t = Instant::now();
            black_box(run(case, &f, n, now));
            if t.elapsed().as_millis() >= 20 || n >= 50_000_000 {
                break;
            }
            n *= 2;
        }
        let mut batches: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                black_box(run(case, &f, n, now));
                t.elapsed().as_nanos() as f64 / n as f64
            })
            .collect();
        batches.sort_by(|x, y| x.total_cmp(y));
        out.push(serde_json::json!({"case": case.0, "what": case.1, "ns_per_op": (batches[2] * 10.0).round() / 10.0}));
    }
    println!("{}", serde_json::json!({"token_len": f.token.len(), "cases": out}));
}
