//! Precheck: refuse, without a webhook call, a token that cannot be a valid JWT.
//!
//! A token passes when it is a compact JWT (three base64url segments whose first two decode to
//! JSON objects) and its `exp` claim, if present, is not past. The signature is not checked: the
//! webhook stays the authority. This keeps floods of garbage or expired tokens off the webhook.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotAJwt,
    Expired,
}

/// The `exp` member of a JSON object, as far as the precheck cares.
enum Exp {
    Absent,
    Null,
    Number(Option<f64>),
    Other,
}

/// A member name, reduced to "is it `exp`" (escapes such as `\u0065xp` are decoded first).
struct IsExp(bool);

impl<'de> Deserialize<'de> for IsExp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = IsExp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, v: &str) -> Result<IsExp, E> {
                Ok(IsExp(v == "exp"))
            }
        }
        d.deserialize_str(Name)
    }
}

/// Any JSON value, read and dropped without building it. Unlike `serde::de::IgnoredAny` it goes
/// through `deserialize_any`, so it refuses exactly what `serde_json::Value` refuses (numbers out
/// of `f64` range, strings that are not UTF-8).
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// Walks a JSON object without building it (other members are read with `Skip`), keeping
/// only the last `exp` member when `want_exp` (as `serde_json::Value` would keep the last one).
struct Object {
    want_exp: bool,
}

impl<'de> Visitor<'de> for Object {
    type Value = Exp;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Exp, A::Error> {
        let mut exp = Exp::Absent;
        while let Some(IsExp(is_exp)) = map.next_key()? {
            if is_exp && self.want_exp {
                exp = match map.next_value::<Value>()? {
                    Value::Null => Exp::Null,
                    Value::Number(n) => Exp::Number(n.as_f64()),
                    _ => Exp::Other,
                };
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok(exp)
    }
}

/// Decodes a base64url segment (tolerating the `=` padding some encoders add) and checks that it
/// is exactly one JSON object; its `exp` member when `want_exp`.
fn json_object(segment: &str, want_exp: bool) -> Option<Exp> {
    let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let exp = de.deserialize_map(Object { want_exp }).ok()?;
    de.end().ok()?;
    Some(exp)
}

/// The `sub` claim of a compact JWT, read without verifying anything: only ever used to refuse
/// early, never to allow (see `engine::verifier::Subjects`).
pub fn claimed_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice::<Value>(&bytes).ok()?.get("sub")? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// What the precheck read from a token that has the shape of a JWT: its `exp` claim, the only
/// part of the verdict that changes with time. A worker that keeps a token's verdict keeps this
/// with it and answers the precheck again without parsing the token (`Claims::unexpired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The `exp` claim as `f64` bits; `None` when absent or null.
    exp: Option<u64>,
}

impl Claims {
    /// The precheck's own comparison: the token has not expired at `now_sec` (Unix seconds).
    pub fn unexpired(&self, now_sec: u64) -> bool {
        self.exp.is_none_or(|bits| f64::from_bits(bits) > now_sec as f64)
    }
}

#[cfg(test)]
thread_local! {
    /// Tokens parsed by this thread (tests count the parses a path makes).
    pub static PARSED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The shape of `token` (time aside): its claims, or `NotAJwt`.
pub fn claims(token: &str) -> Result<Claims, Refusal> {
    #[cfg(test)]
    PARSED.with(|n| n.set(n.get() + 1));
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::NotAJwt);
    };
    let b64url =
        |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
    if !b64url(signature) || json_object(header, false).is_none() {
        return Err(Refusal::NotAJwt);
    }
    match json_object(payload, true).ok_or(Refusal::NotAJwt)? {
        Exp::Absent | Exp::Null => Ok(Claims { exp: None }),
        Exp::Number(Some(exp)) => Ok(Claims { exp: Some(exp.to_bits()) }),
        // A number `f64` cannot hold never compares later than now.
        Exp::Number(None) => Ok(Claims { exp: Some(f64::NEG_INFINITY.to_bits()) }),
        // An `exp` that is not a number cannot be honoured by any verifier.
        Exp::Other => Err(Refusal::NotAJwt),
    }
}

/// Checks `token` at time `now_sec` (Unix seconds).
pub fn check(token: &str, now_sec: u64) -> Result<(), Refusal> {
    check_claims(token, now_sec).map(|_| ())
}

/// `check`, keeping what it read.
pub fn check_claims(token: &str, now_sec: u64) -> Result<Claims, Refusal> {
    let claims = claims(token)?;
    if claims.unexpired(now_sec) {
        Ok(claims)
    } else {
        Err(Refusal::Expired)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jwt(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn claimed_subject_reads_sub_only() {
        let t = |payload: &str| {
            format!("{}.{}.sig", URL_SAFE_NO_PAD.encode("{}"), URL_SAFE_NO_PAD.encode(payload))
        };
        assert_eq!(claimed_subject(&t(r#"{"sub":"alice","exp":1}"#)).as_deref(), Some("alice"));
        assert_eq!(claimed_subject(&t(r#"{"sub":7}"#)), None);
        assert_eq!(claimed_subject(&t(r#"{"user":"a"}"#)), None);
        assert_eq!(claimed_subject("not-a-jwt"), None);
    }

    #[test]
    fn accepts_compact_jwts() {
        assert_eq!(check(&jwt(r#"{"alg":"HS256"}"#, r#"{"sub":"a","exp":2000}"#), 1000), Ok(()));
        assert_eq!(check(&jwt(r#"{"alg":"HS256"}"#, r#"{"sub":"a"}"#), 1000), Ok(()));
        assert_eq!(check(&jwt(r#"{"alg":"none"}"#, r#"{"exp":2000.5}"#), 1000), Ok(()));
        assert_eq!(
            check(&format!("{}.{}.", URL_SAFE_NO_PAD.encode("{}"), URL_SAFE_NO_PAD.encode("{}")), 1),
            Ok(())
        );
    }

    #[test]
    fn refuses_non_jwts() {
        for t in [
            "abc",
            "a.b",
            "a.b.c.d",
            "....",
            "e30.e30.sig!",
            &jwt("[]", "{}"),
            &jwt("{}", "1"),
            &jwt("{}", "{\"exp\":\"soon\"}"),
        ] {
            assert_eq!(check(t, 1000), Err(Refusal::NotAJwt), "{t}");
        }
    }

    #[test]
    fn claims_answer_the_precheck_again_at_any_time() {
        for payload in
            [r#"{"exp":2000}"#, r#"{"exp":1000.5}"#, r#"{"a":1}"#, r#"{"exp":null}"#, r#"{"exp":-3}"#]
        {
            let t = jwt("{}", payload);
            let c = claims(&t).unwrap();
            for now in [0, 999, 1000, 1001, 1999, 2000, 2001, u64::MAX] {
                assert_eq!(c.unexpired(now), check(&t, now).is_ok(), "{payload} at {now}");
                assert_eq!(check_claims(&t, now).ok(), check(&t, now).ok().map(|()| c));
            }
        }
        assert_eq!(claims("a.b"), Err(Refusal::NotAJwt));
        assert_eq!(claims(&jwt("{}", r#"{"exp":"x"}"#)), Err(Refusal::NotAJwt));
    }

    #[test]
    fn refuses_expired() {
        assert_eq!(check(&jwt("{}", r#"{"exp":1000}"#), 1000), Err(Refusal::Expired));
        assert_eq!(check(&jwt("{}", r#"{"exp":-5}"#), 1000), Err(Refusal::Expired));
    }

    #[test]
    fn reads_json_like_serde_json_value() {
        // Duplicate members: the last one counts. Escaped names are names. Nested `exp` is not
        // the claim. Trailing garbage or a trailing comma is not JSON.
        assert_eq!(check(&jwt("{}", r#"{"exp":2000,"exp":10}"#), 1000), Err(Refusal::Expired));
        assert_eq!(check(&jwt("{}", r#"{"exp":10,"exp":2000}"#), 1000), Ok(()));
        assert_eq!(check(&jwt("{}", r#"{"\u0065xp":10}"#), 1000), Err(Refusal::Expired));
        assert_eq!(check(&jwt("{}", r#"{"nested":{"exp":10},"a":[1,{"b":2}]}"#), 1000), Ok(()));
        assert_eq!(check(&jwt("{}", r#"{"exp":null}"#), 1000), Ok(()));
        assert_eq!(check(&jwt("{} ", r#" {"exp":2000} "#), 1000), Ok(()));
        assert_eq!(check(&jwt("{}", r#"{"exp":2000} x"#), 1000), Err(Refusal::NotAJwt));
        assert_eq!(check(&jwt(r#"{"a":1,}"#, "{}"), 1000), Err(Refusal::NotAJwt));
        assert_eq!(check(&jwt("{}", r#"{"exp":[2000]}"#), 1000), Err(Refusal::NotAJwt));
        assert_eq!(check(&jwt("{}", r#"{"exp":1e400}"#), 1000), Err(Refusal::NotAJwt));
        // Found by fuzz/fuzz_targets/precheck.rs: `IgnoredAny` let an out-of-range number in another
        // member pass, which `Value` refuses.
        assert_eq!(check(&jwt("{}", r#"{"a":1e344}"#), 1000), Err(Refusal::NotAJwt));
        assert_eq!(check(&jwt(r#"{"a":[{"b":-1e999}]}"#, "{}"), 1000), Err(Refusal::NotAJwt));
        assert_eq!(check("e30=.e30==.x", 1000), Ok(()));
    }
}
