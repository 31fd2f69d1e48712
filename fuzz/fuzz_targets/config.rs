//! `config::parse` on arbitrary bytes and on structured documents over the known keys.
//!
//! Properties: no panic; an error is one line that starts with `<key path>: `, where the key path
//! is `configuration`, a section, a `known_keys()` entry, or an unknown key the document really has;
//! an accepted configuration satisfies every documented constraint and survives a round trip
//! (rendered back to JSON, it parses to the same value).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::config::{self, known_keys, Config, OtherPaths};
use serde_json::{json, Value};

#[derive(Arbitrary, Debug)]
enum J {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Small(u8),
    Float(f64),
    Str(String),
    Url(String),
    List(Vec<String>),
    Obj,
}

impl J {
    fn value(&self) -> Value {
        match self {
            J::Null => Value::Null,
            J::Bool(b) => json!(b),
            J::Int(i) => json!(i),
            J::UInt(u) => json!(u),
            J::Small(u) => json!(u),
            J::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            J::Str(s) => json!(s),
            J::Url(s) => json!(format!("http://{s}")),
            J::List(l) => json!(l),
            J::Obj => json!({}),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Keys { base: bool, keys: Vec<(u8, J)>, unknown: Option<(u8, String)> },
}

const SECTIONS: [&str; 4] = ["jwt_verifier", "token", "topic", "sse"];
const TOP: [&str; 5] = ["jwt_verifier", "token", "topic", "sse", "user_header"];

fn document(base: bool, keys: &[(u8, J)], unknown: &Option<(u8, String)>) -> Value {
    let mut doc = if base {
        json!({"jwt_verifier": {"webhook_url": "http://auth.internal/verify", "webhook_cluster": "auth"}})
    } else {
        json!({})
    };
    let known = known_keys();
    for (i, v) in keys {
        let key = known[usize::from(*i) % known.len()].as_str();
        match key.split_once('.') {
            Some((section, name)) => {
                if !doc[section].is_object() {
                    doc[section] = json!({});
                }
                doc[section][name] = v.value();
            }
            None => doc[key] = v.value(),
        }
    }
    if let Some((where_, name)) = unknown {
        match SECTIONS.get(usize::from(*where_) % 5) {
            Some(section) => {
                if !doc[*section].is_object() {
                    doc[*section] = json!({});
                }
                doc[*section][name.as_str()] = json!(1);
            }
            None => doc[name.as_str()] = json!(1),
        }
    }
    doc
}

/// Every key path an error may name for this input.
fn nameable(raw: &[u8]) -> Vec<String> {
    let mut out: Vec<String> = ["configuration"].iter().chain(&SECTIONS).map(|s| s.to_string()).collect();
    out.extend(known_keys());
    if let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(raw) {
        for (k, v) in &top {
            // Unknown keys are named escaped (`escape_debug`), so that the error stays one line.
            if !TOP.contains(&k.as_str()) {
                out.push(k.escape_debug().to_string());
            }
            if let (true, Value::Object(section)) = (SECTIONS.contains(&k.as_str()), v) {
                out.extend(section.keys().map(|n| format!("{k}.{}", n.escape_debug())));
            }
        }
    }
    out
}

fn render(c: &Config) -> Value {
    let v = &c.verifier;
    let (url, cluster) = match &v.webhook {
        Some(w) => (format!("http://{}{}", w.authority, w.path), w.cluster.clone()),
        None => (String::new(), String::new()),
    };
    json!({
        "jwt_verifier": {
            "webhook_url": url, "webhook_cluster": cluster, "timeout_ms": v.timeout_ms,
            "retry_attempts": v.retry_attempts, "cache_ttl_sec": v.cache_ttl_sec,
            "cache_max_size": v.cache_max_size, "circuit_breaker_threshold": v.circuit_breaker_threshold,
            "circuit_breaker_timeout_sec": v.circuit_breaker_timeout_sec,
            "rate_limit_per_sec": v.rate_limit_per_sec,
            "rate_limit_per_client_per_sec": v.rate_limit_per_client_per_sec,
            "require_authentication": v.require_authentication, "precheck": v.precheck
        },
        "token": {
            "query_params": c.token.query_params, "ticket_params": c.token.ticket_params,
            "cookie": c.token.cookie, "strip_from_upstream": c.token.strip_from_upstream,
            "forward_to_upstream": c.token.forward_to_upstream
        },
        "topic": {
            "path_prefix": c.topic.path_prefix,
            "other_paths": match c.topic.other_paths { OtherPaths::Deny => "deny", OtherPaths::Pass => "pass" }
        },
        "sse": {
            "heartbeat_interval_sec": c.sse.heartbeat_interval_sec,
            "challenge_before_expiry_sec": c.sse.challenge_before_expiry_sec,
            "max_connection_sec": c.sse.max_connection_sec,
            "reverify_interval_sec": c.sse.reverify_interval_sec,
            "max_streams_per_user": c.sse.max_streams_per_user,
            "early_refresh_refusal": c.sse.early_refresh_refusal
        },
        "user_header": c.user_header
    })
}

fn param(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

fn check_invariants(c: &Config) {
    let v = &c.verifier;
    match &v.webhook {
        None => assert!(!v.require_authentication, "development mode with authentication required"),
        Some(w) => {
            assert!(!w.cluster.is_empty() && !w.authority.is_empty());
            assert!(w.authority.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)));
            assert!(w.path.starts_with('/'));
            assert!(!w.path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#'));
        }
    }
    assert!((1..=60_000).contains(&v.timeout_ms));
    assert!(v.retry_attempts <= 10);
    assert!(v.cache_ttl_sec <= 86_400 && v.cache_max_size <= 1_000_000);
    assert!(v.cache_ttl_sec == 0 || v.cache_max_size >= 1);
    assert!(
        v.circuit_breaker_threshold >= 1 && v.circuit_breaker_timeout_sec >= 1 && v.rate_limit_per_sec >= 1
    );
    assert!(c.token.query_params.iter().chain(&c.token.ticket_params).all(|p| param(p)));
    assert!(!c.token.ticket_params.iter().any(|t| c.token.query_params.contains(t)));
    assert!(c.token.cookie.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)));
    let p = &c.topic.path_prefix;
    assert!(p.starts_with('/') && p.ends_with('/'));
    assert!(!p.bytes().any(|b| b.is_ascii_control() || b" ?#".contains(&b)));
    assert!((1..=3_600).contains(&c.sse.heartbeat_interval_sec) && c.sse.max_connection_sec >= 1);
    let h = &c.user_header;
    assert!(
        !h.is_empty()
            && h.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
    );
    // No reserved header in any spelling the filter folds together (`_` is `-` to a CGI app).
    let folded = h.replace('_', "-");
    assert!(!folded.starts_with("x-envoy-"));
    assert!(!config::RESERVED_HEADERS.contains(&folded.as_str()));
}

fuzz_target!(|input: Input| {
    let raw = match &input {
        Input::Raw(b) => b.clone(),
        Input::Keys { base, keys, unknown } => document(*base, keys, unknown).to_string().into_bytes(),
    };
    match config::parse(&raw) {
        Err(e) => {
            let e = e.0;
            assert!(!e.contains('\n') && !e.contains('\r'), "error is not one line: {e:?}");
            let ok = nameable(&raw).iter().any(|k| e.starts_with(&format!("{k}: ")));
            assert!(ok, "error names no key path of the input: {e:?}");
        }
        Ok(c) => {
            check_invariants(&c);
            let rendered = render(&c);
            // A key added to the table but not to `render` would make the round trip compare a
            // default with the parsed value; name it instead.
            for key in known_keys() {
                let present = match key.split_once('.') {
                    Some((section, name)) => rendered[section].get(name).is_some(),
                    None => rendered.get(key.as_str()).is_some(),
                };
                assert!(present, "render() leaves out {key}");
            }
            let again = config::parse(rendered.to_string().as_bytes());
            assert_eq!(again.as_ref(), Ok(&c), "round trip of {:?}", String::from_utf8_lossy(&raw));
        }
    }
});
