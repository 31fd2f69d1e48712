//! Native cost of the filter's pure hot path: the filter's own core modules (`src/config.rs`,
//! `src/auth`, `src/resilience`, `src/sse`) compiled here unchanged, run in a loop.
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

#[path = "../../../src/config.rs"]
mod config;

#[path = "../../../src/auth/mod.rs"]
mod auth;

#[path = "../../../src/resilience/mod.rs"]
mod resilience;

#[path = "../../../src/sse/mod.rs"]
mod sse;

use auth::gate::{self, Request, Step};
use auth::{cache, precheck, token, topic, verdict};
use common::{Args, unsigned_token};
use sse::framing::Framing;
use sse::registry;
use sse::session::Session;
use std::hint::black_box;
use std::time::Instant;

const NOW_SEC: u64 = 1_900_000_000 - 3 * 3600 + 60;
/// Events in `flood_chunk`.
const FLOOD_EVENTS: u64 = 150;

/// Candidate for `src/sse/framing.rs`: the state after a chunk, from its trailing run of CR/LF
/// bytes only. After any byte that is not CR or LF the tracker is inside a line, whatever came
/// before, so only the bytes after the chunk's last such byte matter (and the previous state, when
/// the chunk is nothing but CR/LF). `sessions::body` needs the boundary offset only when an
/// injection is waiting; otherwise this replaces the byte-by-byte scan of every upstream byte.
fn framing_advance(prev: Framing, chunk: &[u8]) -> Framing {
    match chunk.iter().rposition(|&b| b != b'\n' && b != b'\r') {
        Some(i) => {
            let mut f = Framing::new();
            f.feed(b"x");
            f.feed(&chunk[i + 1..]);
            f
        }
        None => {
            let mut f = prev;
            f.feed(chunk);
            f
        }
    }
}

/// `framing_advance` must leave the tracker exactly where `Framing::feed` does, on every chunk of
/// pseudo-random streams over {a, :, space, CR, LF} split at pseudo-random places.
fn framing_equivalence() -> (u64, u64) {
    let alphabet = b"a: \r\n\n\r";
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut same, mut total) = (0, 0);
    for _ in 0..2_000 {
        let len = rnd(200) as usize;
        let stream: Vec<u8> = (0..len).map(|_| alphabet[rnd(alphabet.len() as u64) as usize]).collect();
        let (mut full, mut fast) = (Framing::new(), Framing::new());
        let mut at = 0;
        while at < stream.len() {
            let end = (at + 1 + rnd(12) as usize).min(stream.len());
            let chunk = &stream[at..end];
            full.feed(chunk);
            fast = framing_advance(fast, chunk);
            total += 1;
            same += (full == fast) as u64;
            at = end;
        }
    }
    (same, total)
}

struct Fixture {
    cfg: config::Config,
    token: String,
    bearer: String,
    path: String,
    topic_id: String,
    key: cache::Key,
    cache_slots: [Vec<u8>; 2],
    registry_slot: Vec<u8>,
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
    let hit = cache::Entry { key, until_ms: now_ms + 300_000, expires_at: now_ms / 1000 + 3600, user_id: "user-42".into() };
    let other = cache::Entry { key: [7; 32], until_ms: now_ms + 300_000, expires_at: 1, user_id: "user-7".into() };
    let rk = registry::key("user-42", &topic_id);
    Fixture {
        bearer: format!("Bearer {token}"),
        path: "/events/bench?mode=short".into(),
        cache_slots: [other.encode(), hit.encode()],
        registry_slot: registry::Entry { key: rk, seen_ms: now_ms, expires_at: 0 }.encode(),
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

/// The cache lookup as `host::shared::cache_get` does it, with the two slot reads (host calls)
/// replaced by copies of the stored bytes.
fn cache_lookup(f: &Fixture, now_ms: u64) -> Option<cache::Entry> {
    let [a, b] = cache::slots(&f.key, f.cfg.verifier.cache_max_size);
    let names = [cache::slot_name(a), cache::slot_name(b)];
    black_box(&names);
    let get = |i: usize| cache::Entry::decode(&f.cache_slots[i].clone());
    let candidates = [get(0), get(1)];
    cache::find(&f.key, now_ms, &candidates).cloned()
}

/// What a stream open costs in the pure part (`sessions::open` + `shared::registry_touch`).
fn session_open(f: &Fixture, now_ms: u64) -> Session {
    let rk = registry::key("user-42", &f.topic_id);
    let [a, b] = registry::slots(&rk);
    black_box((registry::slot_name(a), registry::slot_name(b)));
    let c = [registry::Entry::decode(&f.registry_slot.clone()), None];
    let slot = registry::place(&rk, now_ms, &c);
    let e = registry::touched(c[slot], &rk, now_ms).encode();
    black_box(e);
    Session::new(&f.cfg.sse, now_ms, Some(now_ms / 1000 + 3600))
}

/// The precheck with the same answers, without building `serde_json::Value` maps: the header is
/// only validated as a JSON object (`IgnoredAny`), and of the claims only `exp` is kept (other
/// members are skipped without allocating). A candidate for `src/auth/precheck.rs`.
mod precheck_fast {
    use super::precheck::Refusal;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde_json::Value;
    use std::fmt;

    enum Exp {
        Absent,
        Null,
        Num(Option<f64>),
        Other,
    }

    struct IsExp(bool);

    impl<'de> Deserialize<'de> for IsExp {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = IsExp;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a key")
                }
                fn visit_str<E>(self, v: &str) -> Result<IsExp, E> {
                    Ok(IsExp(v == "exp"))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A JSON object; with `want_exp`, its (last) `exp` member.
    struct Object {
        want_exp: bool,
    }

    impl<'de> Visitor<'de> for Object {
        type Value = Exp;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Exp, A::Error> {
            let mut exp = Exp::Absent;
            while let Some(IsExp(is_exp)) = m.next_key()? {
                if is_exp && self.want_exp {
                    exp = match m.next_value::<Value>()? {
                        Value::Null => Exp::Null,
                        Value::Number(n) => Exp::Num(n.as_f64()),
                        _ => Exp::Other,
                    };
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(exp)
        }
    }

    fn object(segment: &str, want_exp: bool) -> Option<Exp> {
        let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let exp = de.deserialize_map(Object { want_exp }).ok()?;
        de.end().ok()?;
        Some(exp)
    }

    pub fn check(token: &str, now_sec: u64) -> Result<(), Refusal> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::NotAJwt);
        };
        let b64url =
            |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
        if !b64url(signature) || object(header, false).is_none() {
            return Err(Refusal::NotAJwt);
        }
        match object(payload, true).ok_or(Refusal::NotAJwt)? {
            Exp::Absent | Exp::Null => Ok(()),
            Exp::Num(Some(exp)) if exp > now_sec as f64 => Ok(()),
            Exp::Num(_) => Err(Refusal::Expired),
            Exp::Other => Err(Refusal::NotAJwt),
        }
    }
}

/// Tokens on which `precheck_fast` must answer exactly like `precheck` (the unit-test vectors and
/// a few more).
fn precheck_equivalence() -> (usize, usize) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let jwt = |h: &str, p: &str| format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(p));
    let mut tokens: Vec<String> = [
        "abc", "a.b", "a.b.c.d", "....", "e30.e30.sig!", "e30.e30.", "e30=.e30==.x",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (h, p) in [
        (r#"{"alg":"HS256"}"#, r#"{"sub":"a","exp":2000}"#),
        (r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#),
        (r#"{"alg":"none"}"#, r#"{"exp":2000.5}"#),
        ("{}", "{}"),
        ("[]", "{}"),
        ("{}", "1"),
        ("{}", r#"{"exp":"soon"}"#),
        ("{}", r#"{"exp":1000}"#),
        ("{}", r#"{"exp":-5}"#),
        ("{}", r#"{"exp":null}"#),
        ("{}", r#"{"exp":2000,"exp":10}"#),
        ("{}", r#"{"exp":10,"exp":2000}"#),
        ("{}", r#"{"\u0065xp":10}"#),
        ("{}", r#"{"nested":{"exp":10},"a":[1,{"b":2}]}"#),
        ("{}", r#"{"exp":2000} x"#),
        ("{} ", r#" {"exp":2000} "#),
        (r#"{"a":1,}"#, "{}"),
        ("{}", r#"{"exp":1e400}"#),
        ("{}", r#"{"exp":[2000]}"#),
    ] {
        tokens.push(jwt(h, p));
    }
    tokens.push(unsigned_token("eq", 1));
    let same = tokens.iter().filter(|t| precheck::check(t, 1000) == precheck_fast::check(t, 1000)).count();
    (same, tokens.len())
}

type Case = (&'static str, &'static str, fn(&Fixture, u64) -> u64);

const CASES: &[Case] = &[
    ("request_cache_hit", "whole pure path of an allowed request from the cache: gate::admit + cache lookup + identity", |f, now| {
        let Step::Verify(v) = gate::admit(&f.cfg, &request(f), now / 1000) else { return 0 };
        let hit = cache_lookup(f, now);
        let ident = hit.map(|h| (h.user_id.clone(), v.topic_id.clone(), h.expires_at));
        black_box(ident).is_some() as u64
    }),
    ("gate_admit", "gate::admit: topic id, token extraction, precheck, cache key", |f, now| {
        matches!(gate::admit(&f.cfg, &request(f), now / 1000), Step::Verify(_)) as u64
    }),
    ("precheck", "precheck::check: 2 base64 decodes + 2 serde_json::Value parses", |f, now| {
        precheck::check(&f.token, now / 1000).is_ok() as u64
    }),
    ("precheck_fast", "candidate precheck: same answers, no Value maps (see precheck_fast)", |f, now| {
        precheck_fast::check(&f.token, now / 1000).is_ok() as u64
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
    ("session_open", "registry key (SHA-256) + touch encode/decode + Session::new", |f, now| {
        session_open(f, now).next_deadline_ms().unwrap_or(0)
    }),
    ("webhook_body", "verdict::request_body (cache miss)", |f, _| verdict::request_body(&f.token, &f.topic_id).len() as u64),
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
    ("framing_advance_16k", "candidate: state from the chunk's trailing CR/LF run only (per 16 KB chunk)", |f, _| {
        framing_advance(Framing::new(), &f.flood_chunk).at_boundary() as u64
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
    let (same, total) = precheck_equivalence();
    let (fsame, ftotal) = framing_equivalence();
    println!(
        "{}",
        serde_json::json!({"token_len": f.token.len(), "cases": out,
                           "precheck_fast_equivalent": format!("{same}/{total}"),
                           "framing_advance_equivalent": format!("{fsame}/{ftotal}")})
    );
}
