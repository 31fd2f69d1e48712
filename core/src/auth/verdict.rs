//! The webhook contract: the request body we send and the verdict we read back.

use serde_json::Value;

/// Largest verdict body read; a verdict is under 200 bytes, anything past this is a failure.
pub const MAX_BODY: usize = 64 * 1024;

/// Longest `user_id` accepted (it travels upstream in a header).
pub const MAX_USER_ID: usize = 256;

/// `{"jwt":"<token>","topic":"<32-hex>"}`, byte for byte, and for a one-time ticket
/// `{"jwt":"<ticket>","topic":"<32-hex>","kind":"ticket"}`: the webhook can tell which channel a
/// credential came from, and refuse a ticket presented as a JWT (which would be cached, and so
/// reusable). Tokens reaching here are printable ASCII without `"` or `\` (see `token::extract`),
/// and JSON-escaping keeps that true for any input.
pub fn request_body(token: &str, topic_id: &str, ticket: bool) -> String {
    let mut body = String::with_capacity(token.len() + topic_id.len() + 36);
    body.push_str("{\"jwt\":");
    body.push_str(&Value::from(token).to_string());
    body.push_str(",\"topic\":");
    body.push_str(&Value::from(topic_id).to_string());
    if ticket {
        body.push_str(",\"kind\":\"ticket\"");
    }
    body.push('}');
    body
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The webhook allows `user_id` until `expires_at` (Unix seconds, in the future).
    Allow { user_id: String, expires_at: u64 },
    /// An answer that refuses: `valid:false`, or `valid:true` without a usable user or expiry.
    Deny(DenyReason),
    /// No usable answer: never a pass, never cached.
    Failure(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    Invalid,
    NoUser,
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A status other than 200 (Envoy reports connect failures and timeouts as 503 / 504).
    Status(u32),
    /// A 200 whose body is not the verdict JSON.
    Malformed,
    /// No response at all (the call was reset or could not be made).
    NoResponse,
    /// No response within `timeout_ms` (the host tells this from `NoResponse` by the time taken).
    Timeout,
}

impl Failure {
    /// Short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Status(_) => "status",
            Failure::Malformed => "malformed",
            Failure::NoResponse => "reset",
            Failure::Timeout => "timeout",
        }
    }
}

fn usable_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_USER_ID && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Reads the webhook's answer at time `now_sec` (Unix seconds).
pub fn parse(status: Option<u32>, body: &[u8], now_sec: u64) -> Verdict {
    let status = match status {
        Some(s) => s,
        None => return Verdict::Failure(Failure::NoResponse),
    };
    if status != 200 {
        return Verdict::Failure(Failure::Status(status));
    }
    if body.len() > MAX_BODY {
        return Verdict::Failure(Failure::Malformed);
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Verdict::Failure(Failure::Malformed);
    };
    let valid = match obj.get("valid") {
        Some(Value::Bool(b)) => *b,
        _ => return Verdict::Failure(Failure::Malformed),
    };
    if !valid {
        return Verdict::Deny(DenyReason::Invalid);
    }
    // `valid:true` counts only with a string `user_id` and an integer `expires_at` in the future;
    // anything else in those fields is a denial (contract), not a failure.
    let Some(user_id) = obj.get("user_id").and_then(Value::as_str).filter(|u| usable_user_id(u)) else {
        return Verdict::Deny(DenyReason::NoUser);
    };
    match obj.get("expires_at").and_then(Value::as_u64) {
        Some(exp) if exp > now_sec => Verdict::Allow { user_id: user_id.to_string(), expires_at: exp },
        _ => Verdict::Deny(DenyReason::Expired),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn body_is_exact() {
        assert_eq!(
            request_body("a.b.c", "a1b2c3d4e5f67890abcdef1234567890", false),
            r#"{"jwt":"a.b.c","topic":"a1b2c3d4e5f67890abcdef1234567890"}"#
        );
        assert_eq!(request_body("q\"x", "t", false), r#"{"jwt":"q\"x","topic":"t"}"#);
        assert_eq!(request_body("tkt_1", "t", true), r#"{"jwt":"tkt_1","topic":"t","kind":"ticket"}"#);
    }

    fn p(body: &str) -> Verdict {
        parse(Some(200), body.as_bytes(), 1000)
    }

    #[test]
    fn allow_needs_user_and_future_expiry() {
        assert_eq!(
            p(r#"{"valid":true,"user_id":"alice","expires_at":2000,"extra":[1]}"#),
            Verdict::Allow { user_id: "alice".into(), expires_at: 2000 }
        );
        assert_eq!(
            p(r#"{"valid":true,"user_id":null,"expires_at":2000}"#),
            Verdict::Deny(DenyReason::NoUser)
        );
        assert_eq!(p(r#"{"valid":true,"user_id":"","expires_at":2000}"#), Verdict::Deny(DenyReason::NoUser));
        assert_eq!(
            p(r#"{"valid":true,"user_id":"a\nb","expires_at":2000}"#),
            Verdict::Deny(DenyReason::NoUser)
        );
        assert_eq!(
            p(r#"{"valid":true,"user_id":"alice","expires_at":1000}"#),
            Verdict::Deny(DenyReason::Expired)
        );
        assert_eq!(
            p(r#"{"valid":true,"user_id":"alice","expires_at":-1}"#),
            Verdict::Deny(DenyReason::Expired)
        );
        assert_eq!(
            p(r#"{"valid":true,"user_id":"alice","expires_at":null}"#),
            Verdict::Deny(DenyReason::Expired)
        );
        assert_eq!(p(r#"{"valid":true,"user_id":"alice"}"#), Verdict::Deny(DenyReason::Expired));
    }

    #[test]
    fn user_id_travels_upstream_only_up_to_max_length() {
        let answer = |user: &str| p(&format!(r#"{{"valid":true,"user_id":"{user}","expires_at":2000}}"#));
        let longest = "u".repeat(MAX_USER_ID);
        assert_eq!(answer(&longest), Verdict::Allow { user_id: longest.clone(), expires_at: 2000 });
        assert_eq!(answer(&format!("{longest}u")), Verdict::Deny(DenyReason::NoUser));
        assert_eq!(answer(&"u".repeat(60_000)), Verdict::Deny(DenyReason::NoUser));
        // Non-ASCII (which JSON allows) is refused too: the value becomes a header.
        assert_eq!(answer(r"al\u00efce"), Verdict::Deny(DenyReason::NoUser));
        assert_eq!(answer(r"a\u0000b"), Verdict::Deny(DenyReason::NoUser));
    }

    #[test]
    fn denials() {
        assert_eq!(
            p(r#"{"valid":false,"user_id":null,"expires_at":null}"#),
            Verdict::Deny(DenyReason::Invalid)
        );
        assert_eq!(p(r#"{"valid":false}"#), Verdict::Deny(DenyReason::Invalid));
        assert_eq!(
            p(r#"{"valid":false,"user_id":"alice","expires_at":5000}"#),
            Verdict::Deny(DenyReason::Invalid)
        );
    }

    #[test]
    fn failures() {
        for body in [
            "",
            "nope",
            "[]",
            r#"{"valid":"true","user_id":"a","expires_at":2000}"#,
            r#"{"user_id":"a"}"#,
            r#"{"valid":1,"user_id":"a","expires_at":2000}"#,
            r#"{"valid":null}"#,
        ] {
            assert_eq!(p(body), Verdict::Failure(Failure::Malformed), "{body}");
        }
        // Wrong types beside `valid:true` are denials, not failures.
        assert_eq!(p(r#"{"valid":true,"user_id":5,"expires_at":2000}"#), Verdict::Deny(DenyReason::NoUser));
        assert_eq!(
            p(r#"{"valid":true,"user_id":"a","expires_at":2000.5}"#),
            Verdict::Deny(DenyReason::Expired)
        );
        assert_eq!(
            p(r#"{"valid":true,"user_id":"a","expires_at":"2000"}"#),
            Verdict::Deny(DenyReason::Expired)
        );
        assert_eq!(parse(Some(500), b"{}", 1), Verdict::Failure(Failure::Status(500)));
        assert_eq!(parse(Some(503), b"upstream connect error", 1), Verdict::Failure(Failure::Status(503)));
        assert_eq!(parse(None, b"", 1), Verdict::Failure(Failure::NoResponse));
        let huge = format!(r#"{{"valid":false,"pad":"{}"}}"#, "x".repeat(MAX_BODY));
        assert_eq!(p(&huge), Verdict::Failure(Failure::Malformed));
    }
}
