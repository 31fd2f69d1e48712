//! `auth::precheck::check` on arbitrary tokens, raw or built from fuzzed JSON segments (so that the
//! fuzzer reaches the claim checks, not only the base64 layer).
//!
//! Properties: no panic; `Ok` only for three segments whose first two are base64url JSON objects
//! and whose `exp`, when present and not null, is a number after `now`; and the same answer as a
//! reference that parses both segments into `serde_json::Value` (the filter walks them without
//! building them).
#![no_main]

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use revenprox::auth::precheck::{self, Refusal};
use serde_json::Value;

#[derive(Arbitrary, Debug)]
enum Token {
    Raw(String),
    Parts { header: String, payload: String, signature: String, pad: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    token: Token,
    now: u64,
}

fn object(segment: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fuzz_target!(|input: Input| {
    let token = match input.token {
        Token::Raw(s) => s,
        Token::Parts { header, payload, signature, pad } => {
            let p = if pad { "==" } else { "" };
            format!("{}{p}.{}.{signature}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload))
        }
    };
    let now = input.now;
    let result = precheck::check(&token, now);
    let parts: Vec<&str> = token.split('.').collect();
    if let Ok(()) = result {
        assert_eq!(parts.len(), 3, "{token:?}");
        assert!(parts[2].bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)));
        assert!(object(parts[0]).is_some(), "header is not a JSON object: {token:?}");
        let claims = object(parts[1]).unwrap_or_else(|| panic!("payload is not a JSON object: {token:?}"));
        match claims.get("exp") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                let exp = n.as_f64().unwrap_or(f64::NAN);
                assert!(exp > now as f64, "expired token passed: exp {n} now {now}");
            }
            Some(other) => panic!("non-numeric exp {other} passed"),
        }
    }
    if result == Err(Refusal::Expired) {
        let claims = object(parts[1]).unwrap_or_else(|| panic!("Expired without claims"));
        assert!(matches!(claims.get("exp"), Some(Value::Number(_))));
    }
    assert_eq!(result, reference(&token, now), "{token:?}");
});

/// The straightforward precheck: both JSON segments parsed into `Value` maps.
fn reference(token: &str, now: u64) -> Result<(), Refusal> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else { return Err(Refusal::NotAJwt) };
    if !signature.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b))
        || object(header).is_none()
    {
        return Err(Refusal::NotAJwt);
    }
    match object(payload).ok_or(Refusal::NotAJwt)?.get("exp") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(exp) if exp > now as f64 => Ok(()),
            _ => Err(Refusal::Expired),
        },
        Some(_) => Err(Refusal::NotAJwt),
    }
}
