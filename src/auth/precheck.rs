//! Precheck: refuse, without a webhook call, a token that cannot be a valid JWT.
//!
//! A token passes when it is a compact JWT (three base64url segments whose first two decode to
//! JSON objects) and its `exp` claim, if present, is not past. The signature is not checked: the
//! webhook stays the authority. This keeps floods of garbage or expired tokens off the webhook.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotAJwt,
    Expired,
}

fn json_object(segment: &str) -> Option<serde_json::Map<String, Value>> {
    // Tolerate '=' padding, which some encoders add.
    let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Checks `token` at time `now_sec` (Unix seconds).
pub fn check(token: &str, now_sec: u64) -> Result<(), Refusal> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::NotAJwt);
    };
    let b64url =
        |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=');
    if !b64url(signature) || json_object(header).is_none() {
        return Err(Refusal::NotAJwt);
    }
    let claims = json_object(payload).ok_or(Refusal::NotAJwt)?;
    match claims.get("exp") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(exp) if exp > now_sec as f64 => Ok(()),
            _ => Err(Refusal::Expired),
        },
        // An `exp` that is not a number cannot be honoured by any verifier.
        Some(_) => Err(Refusal::NotAJwt),
    }
}

/// The `exp` claim of a token, if it is a JWT that has one (no validation).
pub fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    json_object(payload)?.get("exp")?.as_u64()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jwt(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload))
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
    fn refuses_expired() {
        assert_eq!(check(&jwt("{}", r#"{"exp":1000}"#), 1000), Err(Refusal::Expired));
        assert_eq!(check(&jwt("{}", r#"{"exp":-5}"#), 1000), Err(Refusal::Expired));
    }

    #[test]
    fn reads_expiry() {
        assert_eq!(expiry(&jwt("{}", r#"{"exp":1234}"#)), Some(1234));
        assert_eq!(expiry("x"), None);
    }
}
