//! `auth::verdict::parse` on arbitrary webhook answers (status, body, time), and
//! `auth::verdict::request_body` on usable tokens.
//!
//! Properties: no panic; `Allow` only for status 200, a body of at most MAX_BODY bytes that is a
//! JSON object with `valid` exactly `true`, `user_id` a non-empty string of printable ASCII (it goes
//! upstream in a header) of at most MAX_USER_ID bytes, and `expires_at` an integer after `now`;
//! `valid` missing or not a boolean is a failure, never a denial or an allow; any status but 200 is
//! a failure. The request body is JSON with exactly the token and the topic id.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::auth::verdict::{self, Failure, Verdict, MAX_BODY, MAX_USER_ID};
use serde_json::Value;

#[derive(Arbitrary, Debug)]
enum Status {
    Ok,
    None,
    Other(u32),
}

#[derive(Arbitrary, Debug)]
struct Input {
    status: Status,
    body: Vec<u8>,
    now: u64,
    token: String,
}

fuzz_target!(|input: Input| {
    let status = match input.status {
        Status::Ok => Some(200),
        Status::None => None,
        Status::Other(s) => Some(s),
    };
    let now = input.now;
    let v = verdict::parse(status, &input.body, now);
    let json: Option<Value> = serde_json::from_slice(&input.body).ok();
    match &v {
        Verdict::Allow { user_id, expires_at } => {
            assert_eq!(status, Some(200));
            assert!(input.body.len() <= MAX_BODY);
            let obj =
                json.as_ref().and_then(Value::as_object).unwrap_or_else(|| panic!("allow without an object"));
            assert_eq!(obj.get("valid"), Some(&Value::Bool(true)));
            assert_eq!(obj.get("user_id").and_then(Value::as_str), Some(user_id.as_str()));
            assert!(!user_id.is_empty() && user_id.len() <= MAX_USER_ID);
            assert!(
                user_id.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "user id {user_id:?} cannot be a header value"
            );
            assert_eq!(obj.get("expires_at").and_then(Value::as_u64), Some(*expires_at));
            assert!(*expires_at > now);
        }
        Verdict::Deny(_) => {
            assert_eq!(status, Some(200));
            let obj =
                json.as_ref().and_then(Value::as_object).unwrap_or_else(|| panic!("deny without an object"));
            assert!(matches!(obj.get("valid"), Some(Value::Bool(_))), "deny without a boolean valid");
        }
        Verdict::Failure(Failure::Status(s)) => assert!(status == Some(*s) && *s != 200),
        Verdict::Failure(Failure::NoResponse) => assert_eq!(status, None),
        Verdict::Failure(Failure::Timeout) => panic!("parse never decides a timeout"),
        Verdict::Failure(Failure::Malformed) => {
            assert_eq!(status, Some(200));
            let valid_bool = json
                .as_ref()
                .and_then(Value::as_object)
                .is_some_and(|o| matches!(o.get("valid"), Some(Value::Bool(_))));
            assert!(input.body.len() > MAX_BODY || !valid_bool, "a well-formed verdict called malformed");
        }
    }

    // The request body: usable tokens (see token::extract) and a topic id.
    let token = input.token;
    if token.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        let topic = "0123456789abcdef0123456789abcdef";
        let body = verdict::request_body(&token, topic, false);
        assert_eq!(body, format!("{{\"jwt\":\"{token}\",\"topic\":\"{topic}\"}}"));
        let body = verdict::request_body(&token, topic, true);
        assert_eq!(body, format!("{{\"jwt\":\"{token}\",\"topic\":\"{topic}\",\"kind\":\"ticket\"}}"));
    }
    let body = verdict::request_body(&token, "t", false);
    let parsed: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("request body {body:?}: {e}"));
    assert_eq!(parsed, serde_json::json!({"jwt": token, "topic": "t"}));
    let body = verdict::request_body(&token, "t", true);
    let parsed: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("request body {body:?}: {e}"));
    assert_eq!(parsed, serde_json::json!({"jwt": token, "topic": "t", "kind": "ticket"}));
});
