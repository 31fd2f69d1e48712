//! The filter's own answers: status, error code, JSON body and headers (contract "Answers").

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    MissingToken,
    MalformedAuthorization,
    InvalidToken,
    NoTopic,
    /// A challenge response whose user has no open stream on that topic in this Envoy.
    UserMismatch,
    RateLimited,
    /// The user already has `sse.max_streams_per_user` streams open in this Envoy.
    TooManyStreams,
    AuthUnavailable,
}

impl Code {
    pub const ALL: [Code; 8] = [
        Code::MissingToken,
        Code::MalformedAuthorization,
        Code::InvalidToken,
        Code::NoTopic,
        Code::UserMismatch,
        Code::RateLimited,
        Code::TooManyStreams,
        Code::AuthUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::MissingToken => "missing_token",
            Code::MalformedAuthorization => "malformed_authorization",
            Code::InvalidToken => "invalid_token",
            Code::NoTopic => "no_topic",
            Code::UserMismatch => "user_mismatch",
            Code::RateLimited => "rate_limited",
            Code::TooManyStreams => "too_many_streams",
            Code::AuthUnavailable => "auth_unavailable",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Code::MissingToken | Code::MalformedAuthorization | Code::InvalidToken => 401,
            Code::UserMismatch => 403,
            Code::NoTopic => 404,
            Code::RateLimited | Code::TooManyStreams => 429,
            Code::AuthUnavailable => 503,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: Code,
    pub message: &'static str,
    /// Seconds for `Retry-After` (429 and 503 always carry one).
    pub retry_after: Option<u64>,
}

impl Reply {
    pub fn new(code: Code, message: &'static str) -> Reply {
        let retry_after = match code {
            Code::RateLimited | Code::TooManyStreams | Code::AuthUnavailable => Some(1),
            _ => None,
        };
        Reply { code, message, retry_after }
    }

    pub fn retry_after(mut self, secs: u64) -> Reply {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// `{"error":"<code>","message":"..."}`
    pub fn body(&self) -> String {
        let mut obj = serde_json::Map::new();
        obj.insert("error".into(), Value::from(self.code.as_str()));
        obj.insert("message".into(), Value::from(self.message));
        Value::Object(obj).to_string()
    }

    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h =
            vec![("content-type", "application/json".to_string()), ("cache-control", "no-store".to_string())];
        if self.code.status() == 401 {
            h.push(("www-authenticate", "Bearer".to_string()));
        }
        if let Some(secs) = self.retry_after {
            h.push(("retry-after", secs.to_string()));
        }
        h
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let r = Reply::new(Code::MissingToken, "no token");
        assert_eq!(r.code.status(), 401);
        assert_eq!(r.body(), r#"{"error":"missing_token","message":"no token"}"#);
        assert!(r.headers().contains(&("www-authenticate", "Bearer".to_string())));
        assert_eq!(Code::NoTopic.status(), 404);
        let r = Reply::new(Code::AuthUnavailable, "down").retry_after(30);
        assert_eq!(r.code.status(), 503);
        assert!(r.headers().contains(&("retry-after", "30".to_string())));
        assert!(Reply::new(Code::RateLimited, "slow").headers().contains(&("retry-after", "1".to_string())));
        for c in Code::ALL {
            let v: Value = serde_json::from_str(&Reply::new(c, "m").body()).unwrap();
            assert_eq!(v["error"], c.as_str());
        }
    }
}
