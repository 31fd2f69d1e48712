//! Shared pieces of the fuzz targets: configurations built from fuzz input (always through the real
//! `config::parse`, so only configurations an operator could load are used), and small *reference*
//! implementations written independently of the filter's code, against which its results are
//! checked (percent-decoding, topic id, path normalization as an upstream might do it, and a WHATWG
//! event-stream parser).
//!
//! The reference code favours obviousness over speed; it is itself unit-tested below
//! (`cargo test --manifest-path fuzz/Cargo.toml --lib`).

use arbitrary::Arbitrary;
use revenprox::config::{self, Config};
use serde_json::json;

/// A configuration chosen by the fuzzer. `build` renders it as the plugin's JSON and parses it with
/// `config::parse`; an input the parser refuses falls back to the default production configuration.
#[derive(Arbitrary, Debug, Clone)]
pub struct CfgSpec {
    pub query_params: Option<Vec<Name>>,
    pub ticket_params: Option<Vec<Name>>,
    pub cookie: Option<Name>,
    pub cookie_off: bool,
    pub strip_from_upstream: bool,
    pub prefix: u8,
    /// 0: webhook + authentication required (production); 1: webhook, authentication optional;
    /// 2: development mode (no webhook, authentication not required).
    pub mode: u8,
    pub precheck: bool,
    pub cache_off: bool,
    /// `topic.other_paths: "pass"`.
    pub other_paths_pass: bool,
}

/// A short parameter/cookie name from an alphabet that makes collisions with the defaults likely.
#[derive(Arbitrary, Debug, Clone)]
pub struct Name(pub Vec<u8>);

impl Name {
    pub fn text(&self) -> String {
        const ALPHABET: &[u8] = b"tokenaicsT_-.~1";
        let s: String = self
            .0
            .iter()
            .take(8)
            .map(|b| char::from(*ALPHABET.get(usize::from(*b) % ALPHABET.len()).unwrap_or(&b't')))
            .collect();
        if s.is_empty() {
            "token".to_string()
        } else {
            s
        }
    }
}

/// Prefixes used by the targets; none contains a dot segment (an operator's choice, not an input).
pub const PREFIXES: [&str; 4] = ["/events/", "/", "/sse/v1/", "/Events/"];

impl CfgSpec {
    pub fn json(&self) -> serde_json::Value {
        let mut jv = match self.mode % 3 {
            0 => json!({"webhook_url": "http://auth.internal/verify", "webhook_cluster": "auth"}),
            1 => json!({"webhook_url": "http://auth.internal/verify", "webhook_cluster": "auth",
                        "require_authentication": false}),
            _ => json!({"webhook_url": "", "require_authentication": false}),
        };
        jv["precheck"] = json!(self.precheck);
        if self.cache_off {
            jv["cache_ttl_sec"] = json!(0);
        }
        let mut token = json!({"strip_from_upstream": self.strip_from_upstream});
        if let Some(q) = &self.query_params {
            token["query_params"] = json!(q.iter().take(4).map(Name::text).collect::<Vec<_>>());
        }
        if let Some(t) = &self.ticket_params {
            token["ticket_params"] = json!(t.iter().take(3).map(Name::text).collect::<Vec<_>>());
        }
        if self.cookie_off {
            token["cookie"] = json!("");
        } else if let Some(c) = &self.cookie {
            token["cookie"] = json!(c.text());
        }
        let prefix = PREFIXES.get(usize::from(self.prefix) % PREFIXES.len()).copied().unwrap_or("/events/");
        let other = if self.other_paths_pass { "pass" } else { "deny" };
        json!({"jwt_verifier": jv, "token": token, "topic": {"path_prefix": prefix, "other_paths": other}})
    }

    pub fn build(&self) -> Config {
        config::parse(self.json().to_string().as_bytes()).unwrap_or_else(|_| production())
    }
}

/// The production default: a webhook, authentication required, everything else default.
pub fn production() -> Config {
    match config::parse(
        br#"{"jwt_verifier":{"webhook_url":"http://auth.internal/verify","webhook_cluster":"auth"}}"#,
    ) {
        Ok(c) => c,
        Err(e) => unreachable!("the default configuration must parse: {e}"),
    }
}

/// The topic the filter authorized (`seg`, first segment of `path` after `prefix`) is the topic an
/// upstream serves, however it normalizes the path (RFC 3986 dot removal, with or without merged
/// slashes and dropped `;` parameters): dot segments never take the topic out of (or back to) the
/// prefix, and the served path is the authorized topic or below it.
pub fn assert_topic_is_served(prefix: &str, seg: &str, path: &str) {
    for (merge, params) in [(false, false), (true, false), (false, true), (true, true)] {
        // (A topic named `;x` is `/events/` itself to a Servlet container: not a dot-segment
        // question, and not something the filter claims to handle.)
        if params && seg.starts_with(';') {
            continue;
        }
        let authorized = reference::normalize_path(&format!("{prefix}{seg}"), merge, params);
        let served = reference::normalize_path(path, merge, params);
        let undotted = reference::normalize_path_with(&format!("{prefix}{seg}"), merge, params, false);
        assert!(
            undotted.len() > prefix.len() && undotted.starts_with(prefix),
            "path {path:?}: topic {seg:?} is not a topic under {prefix:?} once normalized ({undotted:?})"
        );
        let ok = served == authorized
            || served
                .strip_prefix(&authorized)
                .is_some_and(|r| authorized.ends_with('/') || r.starts_with('/'));
        assert!(ok, "path {path:?}: topic {seg:?} authorized, upstream may serve {served:?}");
    }
}

/// A path the filter passed as "not a topic path" is not one to an upstream either, however it
/// reads it: percent-decoded once or twice (the reference decoder), ASCII case ignored, then
/// normalized (RFC 3986 dot removal, with or without merged slashes and dropped `;` parameters).
pub fn assert_not_under_prefix(prefix: &str, path: &str) {
    let base = prefix.trim_end_matches('/').to_ascii_lowercase();
    if base.is_empty() {
        panic!("every path is under prefix {prefix:?}, yet {path:?} passed as another path");
    }
    let once =
        reference::percent_decode(path.as_bytes(), false).map(|b| String::from_utf8_lossy(&b).to_string());
    let twice = once
        .as_ref()
        .and_then(|p| reference::percent_decode(p.as_bytes(), false))
        .map(|b| String::from_utf8_lossy(&b).to_string());
    for reading in [Some(path.to_string()), once, twice].into_iter().flatten() {
        for (merge, params) in [(false, false), (true, false), (false, true), (true, true)] {
            let served =
                reference::normalize_path(&reading.replace('\\', "/"), merge, params).to_ascii_lowercase();
            assert!(
                !(served == base || served.starts_with(&format!("{base}/"))),
                "{path:?} passed as another path, but an upstream may serve {served:?} under {prefix:?}"
            );
        }
    }
}

pub mod reference {
    //! Reference implementations, written from the specifications rather than from the filter.

    use sha2::{Digest, Sha256};

    fn hex(b: u8) -> Option<u8> {
        char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
    }

    /// Strict percent-decoding (RFC 3986 `pct-encoded`); `+` is a space in query components.
    pub fn percent_decode(s: &[u8], plus_is_space: bool) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let b = s[i];
            if b == b'%' {
                let hi = hex(*s.get(i + 1)?)?;
                let lo = hex(*s.get(i + 2)?)?;
                out.push(hi * 16 + lo);
                i += 3;
            } else {
                out.push(if b == b'+' && plus_is_space { b' ' } else { b });
                i += 1;
            }
        }
        Some(out)
    }

    /// Percent-encodes every byte that is not unreserved.
    pub fn percent_encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for &b in bytes {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    /// The README's Python `topic_id`, made strict about escapes (an invalid one names no topic).
    pub fn topic_id(segment: &str) -> Option<String> {
        if segment.len() == 32 && segment.chars().all(|c| c.is_ascii_hexdigit()) {
            return Some(segment.to_lowercase());
        }
        let decoded = percent_decode(segment.as_bytes(), false)?;
        let digest = Sha256::digest(&decoded);
        Some(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
    }

    /// A path as a lenient upstream may see it: `%2e` decoded, optionally `%2f`, `%5c` decoded and
    /// `\` taken as `/` (`slashes`), slashes merged (nginx) and `;` parameters dropped from each
    /// segment (Servlet containers), then RFC 3986 `remove_dot_segments`.
    pub fn normalize_path(path: &str, merge_slashes: bool, drop_params: bool) -> String {
        normalize_path_with(path, merge_slashes, drop_params, true)
    }

    pub fn normalize_path_with(path: &str, merge_slashes: bool, drop_params: bool, slashes: bool) -> String {
        let mut s = String::new();
        let bytes = path.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let esc = bytes.get(i..i + 3).map(|e| e.to_ascii_lowercase());
            match esc.as_deref() {
                Some(b"%2e") => {
                    s.push('.');
                    i += 3;
                }
                Some(b"%2f") | Some(b"%5c") if slashes => {
                    s.push('/');
                    i += 3;
                }
                _ => {
                    let c = bytes[i];
                    s.push(if c == b'\\' && slashes { '/' } else { char::from(c) });
                    i += 1;
                }
            }
        }
        if drop_params {
            s = s
                .split('/')
                .map(|seg| seg.split(';').next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("/");
        }
        if merge_slashes {
            while s.contains("//") {
                s = s.replace("//", "/");
            }
        }
        remove_dot_segments(&s)
    }

    /// RFC 3986 section 5.2.4, literally.
    pub fn remove_dot_segments(input: &str) -> String {
        let mut input = input.to_string();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input.strip_prefix("../") {
                input = rest.to_string();
            } else if let Some(rest) = input.strip_prefix("./") {
                input = rest.to_string();
            } else if input.starts_with("/./") {
                input = input[2..].to_string();
            } else if input == "/." {
                input = "/".to_string();
            } else if input.starts_with("/../") || input == "/.." {
                input = if input == "/.." { "/".to_string() } else { input[3..].to_string() };
                match output.rfind('/') {
                    Some(i) => output.truncate(i),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input = input[end..].to_string();
            }
        }
        output
    }

    // ---- SSE: the core's test kit holds the one reference interpreter ----

    pub use revenprox::testkit::sse::{
        boundaries as sse_boundaries, decode as sse_decode, lines as sse_lines, Event,
    };

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn percent() {
            assert_eq!(percent_decode(b"caf%C3%a9+x", true).as_deref(), Some("café x".as_bytes()));
            assert_eq!(percent_decode(b"%4", false), None);
            assert_eq!(percent_decode(b"%zz", false), None);
            assert_eq!(
                percent_decode(percent_encode(b"a b/\xff").as_bytes(), false).as_deref(),
                Some(&b"a b/\xff"[..])
            );
        }

        #[test]
        fn readme_topic_ids() {
            assert_eq!(topic_id("news").as_deref(), Some("19fba0e995b9794fc2c26217bf3b725c"));
            assert_eq!(topic_id("caf%C3%A9").as_deref(), Some("850f7dc43910ff890f8879c0ed26fe69"));
            assert_eq!(
                topic_id("A1B2C3D4E5F67890ABCDEF1234567890").as_deref(),
                Some("a1b2c3d4e5f67890abcdef1234567890")
            );
        }

        #[test]
        fn rfc3986_examples() {
            assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
            assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
            assert_eq!(normalize_path("/events/news/../secret", false, false), "/events/secret");
            assert_eq!(normalize_path("/events/news/%2E%2e/secret", false, false), "/events/secret");
            assert_eq!(normalize_path("/events/news/..%2Fsecret", false, false), "/events/secret");
            assert_eq!(normalize_path("/events/news//../secret", true, false), "/events/secret");
            assert_eq!(normalize_path("/events/news//../secret", false, false), "/events/news/secret");
            assert_eq!(normalize_path("/events/news\\..\\secret", false, false), "/events/secret");
            assert_eq!(normalize_path("/events/news/..;x/secret", false, true), "/events/secret");
            assert_eq!(normalize_path("/events/news;x/a", false, true), "/events/news/a");
            assert_eq!(normalize_path("/events/news", false, false), "/events/news");
        }
    }
}
