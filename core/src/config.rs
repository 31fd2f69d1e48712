//! Plugin configuration: the contract's JSON schema, its defaults and its validation.
//!
//! Parsing is strict: an unknown key, a wrong type or an impossible value is an error whose
//! message starts with the dotted path of the offending key (`jwt_verifier.timeout_ms: ...`), so
//! the one log line Envoy shows names what to fix. Every key is optional; defaults are the seed's.

use crate::header_name;
use crate::logline::Level;
use serde_json::{Map, Value};

/// Every key the configuration accepts, section by section. The parser rejects any other key with
/// this list in its message, and unit tests check README's config reference and docs/contract.md
/// against it, so code and docs cannot drift.
pub const SECTIONS: &[(&str, &[&str])] = &[
    (
        "jwt_verifier",
        &[
            "webhook_url",
            "webhook_cluster",
            "timeout_ms",
            "retry_attempts",
            "cache_ttl_sec",
            "cache_max_size",
            "circuit_breaker_threshold",
            "circuit_breaker_timeout_sec",
            "rate_limit_per_sec",
            "rate_limit_per_client_per_sec",
            "require_authentication",
            "precheck",
        ],
    ),
    ("token", &["query_params", "ticket_params", "cookie", "strip_from_upstream", "forward_to_upstream"]),
    ("topic", &["path_prefix", "other_paths"]),
    (
        "sse",
        &[
            "heartbeat_interval_sec",
            "challenge_before_expiry_sec",
            "max_connection_sec",
            "reverify_interval_sec",
            "max_streams_per_user",
            "early_refresh_refusal",
        ],
    ),
];

/// Keys of the top level that are not sections.
pub const TOP_LEVEL: &[&str] = &["user_header"];

/// Every key as a dotted path (`jwt_verifier.timeout_ms`, ..., `user_header`).
pub fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = SECTIONS
        .iter()
        .flat_map(|(section, names)| names.iter().map(move |n| format!("{section}.{n}")))
        .collect();
    keys.extend(TOP_LEVEL.iter().map(|k| k.to_string()));
    keys
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub verifier: VerifierConfig,
    pub token: TokenConfig,
    pub topic: TopicConfig,
    pub sse: SseConfig,
    /// Lowercased header name that carries the verified user id upstream.
    pub user_header: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// `None` only in development mode (empty `webhook_url`, authentication not required).
    pub webhook: Option<Webhook>,
    pub timeout_ms: u64,
    pub retry_attempts: u32,
    pub cache_ttl_sec: u64,
    pub cache_max_size: u32,
    pub circuit_breaker_threshold: u32,
    pub circuit_breaker_timeout_sec: u64,
    pub rate_limit_per_sec: u32,
    /// One client address's share of `rate_limit_per_sec` (`resilience::clients`).
    pub rate_limit_per_client_per_sec: u32,
    pub require_authentication: bool,
    pub precheck: bool,
}

/// Where the verification call goes: the Envoy cluster and the `:authority` / `:path` it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub cluster: String,
    pub authority: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub query_params: Vec<String>,
    pub ticket_params: Vec<String>,
    /// Empty: the cookie channel is off.
    pub cookie: String,
    pub strip_from_upstream: bool,
    /// Forward the `Authorization` header and the token cookie to the upstream (by default they
    /// are removed from allowed requests, like `jwt_authn`'s `forward: false`).
    pub forward_to_upstream: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    pub path_prefix: String,
    /// What the filter does with a path outside `path_prefix`.
    pub other_paths: OtherPaths,
}

/// `topic.other_paths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherPaths {
    /// `"deny"`: 404 `no_topic`, never forwarded.
    Deny,
    /// `"pass"`: forwarded without an identity (the client's identity header removed, token
    /// parameters stripped), unless some upstream could read the path as a topic path (then 404).
    Pass,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseConfig {
    pub heartbeat_interval_sec: u64,
    pub challenge_before_expiry_sec: u64,
    pub max_connection_sec: u64,
    /// Open streams are verified again at least this often (0: never).
    pub reverify_interval_sec: u64,
    /// Open streams one user may have in this Envoy (0: no limit).
    pub max_streams_per_user: u32,
    /// Refuse a challenge response whose JWT `sub` has no stream here before any webhook call (it
    /// reveals to anyone whether some user has a stream on a topic: off by default).
    pub early_refresh_refusal: bool,
}

impl VerifierConfig {
    /// The verdict cache is on when it may keep entries for a while.
    pub fn cache_enabled(&self) -> bool {
        self.cache_ttl_sec > 0
    }
}

impl Config {
    /// Development mode: no webhook at all, every request passes (with a warning at start).
    pub fn development_mode(&self) -> bool {
        self.verifier.webhook.is_none()
    }

    /// The lines the filter logs when this configuration takes effect: one info line with the
    /// effective settings (no secrets: the webhook URL without its query), and a warning for each
    /// mode that lets requests through unauthenticated.
    pub fn startup_lines(&self) -> Vec<(Level, String)> {
        let v = &self.verifier;
        let s = &self.sse;
        let webhook = match &v.webhook {
            Some(w) => {
                let path = w.path.split('?').next().unwrap_or_default();
                format!(
                    "webhook {}{} via cluster {} (timeout {} ms, {} retries)",
                    w.authority, path, w.cluster, v.timeout_ms, v.retry_attempts
                )
            }
            None => "no webhook".to_string(),
        };
        let cache = if v.cache_enabled() {
            format!("cache {} s, {} entries", v.cache_ttl_sec, v.cache_max_size)
        } else {
            "cache off".to_string()
        };
        let mode = if self.development_mode() {
            "DEVELOPMENT (no authentication)"
        } else if v.require_authentication {
            "authentication required"
        } else {
            "authentication optional"
        };
        let mut lines = vec![(
            Level::Info,
            format!(
                "revenprox: configured: {webhook}; {cache}; breaker {} failures / {} s; rate limit {}/s; \
                 precheck {}; topics under {}; heartbeat {} s, challenge {} s before expiry, max {} s; \
                 identity header {}; mode: {mode}",
                v.circuit_breaker_threshold,
                v.circuit_breaker_timeout_sec,
                v.rate_limit_per_sec,
                if v.precheck { "on" } else { "off" },
                self.topic.path_prefix,
                s.heartbeat_interval_sec,
                s.challenge_before_expiry_sec,
                s.max_connection_sec,
                self.user_header,
            ),
        )];
        if self.development_mode() {
            lines.push((
                Level::Warn,
                "revenprox: DEVELOPMENT MODE: jwt_verifier.require_authentication is false and no \
                 webhook_url is set; every request passes unauthenticated. Never run this in production."
                    .to_string(),
            ));
        } else if !v.require_authentication {
            lines.push((
                Level::Warn,
                "revenprox: jwt_verifier.require_authentication is false: requests without a token \
                 pass unauthenticated; requests with one are verified"
                    .to_string(),
            ));
        }
        lines
    }
}

/// A configuration error; its text starts with the dotted key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(key: &str, what: impl std::fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError(format!("{key}: {what}")))
}

/// A JSON object section with its path, that remembers which keys were read so that the rest can
/// be reported as unknown.
struct Section<'a> {
    path: &'a str,
    map: Option<&'a Map<String, Value>>,
}

impl<'a> Section<'a> {
    fn new(path: &'a str, value: Option<&'a Value>) -> Result<Self, ConfigError> {
        match value {
            None | Some(Value::Null) => Ok(Section { path, map: None }),
            Some(Value::Object(map)) => Ok(Section { path, map: Some(map) }),
            Some(other) => err(path, format_args!("expected an object, got {}", kind(other))),
        }
    }

    fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(name)).filter(|v| !v.is_null())
    }

    /// The section `name` of the top level, checked for unknown keys against `SECTIONS`.
    fn section(&self, name: &'a str) -> Result<Section<'a>, ConfigError> {
        let section = Section::new(name, self.get(name))?;
        let allowed = SECTIONS.iter().find(|(n, _)| *n == name).map_or(&[][..], |(_, keys)| *keys);
        section.reject_unknown(allowed)?;
        Ok(section)
    }

    fn reject_unknown(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        if let Some(map) = self.map {
            if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
                // Escaped: a key is any JSON string, and the error must stay one log line.
                let unknown = unknown.escape_debug().to_string();
                return err(&self.key(&unknown), format_args!("unknown key (known: {})", allowed.join(", ")));
            }
        }
        Ok(())
    }

    fn uint(&self, name: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let key = self.key(name);
        // Whole numbers written as floats (`5000.0`, `1e4`, as some control planes emit) count.
        let whole =
            |f: f64| (f.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&f)).then_some(f as u64);
        let Some(n) = v.as_u64().or_else(|| v.as_f64().and_then(whole)) else {
            return err(&key, format_args!("expected a whole number, got {}", kind(v)));
        };
        if n < min || n > max {
            return err(&key, format_args!("{n} is out of range ({min} to {max})"));
        }
        Ok(n)
    }

    fn uint32(&self, name: &str, default: u32, min: u32, max: u32) -> Result<u32, ConfigError> {
        let n = self.uint(name, u64::from(default), u64::from(min), u64::from(max))?;
        u32::try_from(n).or_else(|_| err(&self.key(name), "out of range"))
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => err(&self.key(name), format_args!("expected true or false, got {}", kind(v))),
        }
    }

    fn string(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => err(&self.key(name), format_args!("expected a string, got {}", kind(v))),
        }
    }

    fn param_list(&self, name: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        let key = self.key(name);
        let Some(v) = self.get(name) else {
            return Ok(default.iter().map(|s| s.to_string()).collect());
        };
        let Value::Array(items) = v else {
            return err(&key, format_args!("expected a list of strings, got {}", kind(v)));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Value::String(s) if is_param_name(s) => out.push(s.clone()),
                Value::String(s) => {
                    return err(&key, format_args!("{s:?} is not a usable query parameter name"))
                }
                other => {
                    return err(&key, format_args!("expected strings, got {}", kind(other)));
                }
            }
        }
        Ok(out)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fraction",
        Value::Number(n) if n.is_i64() && !n.is_u64() => "a negative number",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_param_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

/// Headers `user_header` may not name (in any folded spelling; nor any `x-envoy-*`): the
/// credential channels, what framing and routing depend on, hop-by-hop headers, and the client
/// address headers per-client fairness may read.
pub const RESERVED_HEADERS: [&str; 15] = [
    "authorization",
    "cookie",
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
];

fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

fn is_cookie_name(s: &str) -> bool {
    s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

/// Splits `http(s)://authority/path?query` into authority and path (default `/`).
fn parse_webhook_url(url: &str) -> Result<(String, String), String> {
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if let Some(r) = url.strip_prefix("https://") {
        r
    } else {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} names no host"));
    }
    if !authority.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b)) {
        return Err(format!("{url:?} has an invalid host"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'#') {
        return Err(format!("{url:?} has an invalid path"));
    }
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    Ok((authority.to_string(), path))
}

/// Largest values accepted; past these a setting is a typo rather than a choice.
const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_RETRIES: u32 = 10;
const MAX_TTL_SEC: u64 = 86_400;
const MAX_CACHE_SIZE: u32 = 1_000_000;
const MAX_DURATION_SEC: u64 = 7 * 86_400;

/// Parses the plugin configuration. Empty input means "all defaults".
pub fn parse(raw: &[u8]) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(raw).or_else(|_| err("configuration", "is not UTF-8"))?;
    let root: Value = if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(text)
            .or_else(|e| err("configuration", format_args!("is not valid JSON: {e}")))?
    };
    let top = Section::new("", Some(&root)).or_else(|_| err("configuration", "must be a JSON object"))?;
    let top_keys: Vec<&str> =
        SECTIONS.iter().map(|(name, _)| *name).chain(TOP_LEVEL.iter().copied()).collect();
    top.reject_unknown(&top_keys)?;

    let jv = top.section("jwt_verifier")?;
    let webhook_url = jv.string("webhook_url", "")?;
    let webhook_cluster = jv.string("webhook_cluster", "")?;
    let require_authentication = jv.boolean("require_authentication", true)?;
    let webhook = if webhook_url.is_empty() {
        if require_authentication {
            return err(
                "jwt_verifier.webhook_url",
                "is required while jwt_verifier.require_authentication is true",
            );
        }
        None
    } else {
        let (authority, path) =
            parse_webhook_url(&webhook_url).or_else(|e| err("jwt_verifier.webhook_url", e))?;
        if webhook_cluster.is_empty() {
            return err(
                "jwt_verifier.webhook_cluster",
                "is required: name the Envoy cluster that serves jwt_verifier.webhook_url",
            );
        }
        Some(Webhook { cluster: webhook_cluster, authority, path })
    };
    let cache_ttl_sec = jv.uint("cache_ttl_sec", 300, 0, MAX_TTL_SEC)?;
    let cache_max_size = jv.uint32("cache_max_size", 10_000, 0, MAX_CACHE_SIZE)?;
    if cache_ttl_sec > 0 && cache_max_size == 0 {
        return err(
            "jwt_verifier.cache_max_size",
            "must be at least 1 while caching is on (set jwt_verifier.cache_ttl_sec to 0 to turn it off)",
        );
    }
    let rate_limit_per_sec = jv.uint32("rate_limit_per_sec", 1_000, 1, 1_000_000)?;
    let verifier = VerifierConfig {
        webhook,
        timeout_ms: jv.uint("timeout_ms", 5_000, 1, MAX_TIMEOUT_MS)?,
        retry_attempts: jv.uint32("retry_attempts", 3, 0, MAX_RETRIES)?,
        cache_ttl_sec,
        cache_max_size,
        circuit_breaker_threshold: jv.uint32("circuit_breaker_threshold", 10, 1, 1_000_000)?,
        circuit_breaker_timeout_sec: jv.uint("circuit_breaker_timeout_sec", 60, 1, MAX_TTL_SEC)?,
        rate_limit_per_sec,
        rate_limit_per_client_per_sec: jv.uint32(
            "rate_limit_per_client_per_sec",
            rate_limit_per_sec.div_ceil(2),
            1,
            1_000_000,
        )?,
        require_authentication,
        precheck: jv.boolean("precheck", true)?,
    };

    let tk = top.section("token")?;
    let cookie = tk.string("cookie", "revenprox_token")?;
    if !is_cookie_name(&cookie) {
        return err("token.cookie", format_args!("{cookie:?} is not a valid cookie name"));
    }
    let token = TokenConfig {
        query_params: tk.param_list("query_params", &["token", "access_token"])?,
        ticket_params: tk.param_list("ticket_params", &["ticket"])?,
        cookie,
        strip_from_upstream: tk.boolean("strip_from_upstream", true)?,
        forward_to_upstream: tk.boolean("forward_to_upstream", false)?,
    };
    if let Some(dup) = token.ticket_params.iter().find(|t| token.query_params.contains(t)) {
        return err("token.ticket_params", format_args!("{dup:?} is also listed in token.query_params"));
    }

    let tp = top.section("topic")?;
    let path_prefix = tp.string("path_prefix", "/events/")?;
    if !(path_prefix.starts_with('/') && path_prefix.ends_with('/'))
        || path_prefix.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
    {
        return err(
            "topic.path_prefix",
            format_args!("{path_prefix:?} must be a path that starts and ends with '/'"),
        );
    }
    let other_paths = match tp.string("other_paths", "deny")?.as_str() {
        "deny" => OtherPaths::Deny,
        "pass" => OtherPaths::Pass,
        other => return err("topic.other_paths", format_args!("{other:?} is not \"deny\" or \"pass\"")),
    };

    let ss = top.section("sse")?;
    let sse = SseConfig {
        heartbeat_interval_sec: ss.uint("heartbeat_interval_sec", 15, 1, 3_600)?,
        challenge_before_expiry_sec: ss.uint("challenge_before_expiry_sec", 30, 0, MAX_TTL_SEC)?,
        max_connection_sec: ss.uint("max_connection_sec", 3_600, 1, MAX_DURATION_SEC)?,
        reverify_interval_sec: ss.uint("reverify_interval_sec", 300, 0, MAX_TTL_SEC)?,
        max_streams_per_user: ss.uint32("max_streams_per_user", 0, 0, 1_000_000)?,
        early_refresh_refusal: ss.boolean("early_refresh_refusal", false)?,
    };

    let user_header = top.string("user_header", "x-revenprox-user")?.to_ascii_lowercase();
    if !is_header_name(&user_header) {
        return err("user_header", format_args!("{user_header:?} is not a valid header name"));
    }
    // Compared as upstreams read names (`content_type` is Content-Type to a CGI app): the filter
    // removes every client header that folds to user_header, so a reserved name in any spelling
    // would strip that header from every request.
    if RESERVED_HEADERS.iter().any(|r| header_name::same(&user_header, r))
        || header_name::starts_with(&user_header, "x-envoy-")
    {
        return err("user_header", format_args!("{user_header:?} is a reserved header"));
    }

    Ok(Config { verifier, token, topic: TopicConfig { path_prefix, other_paths }, sse, user_header })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    const MIN: &str = r#"{"jwt_verifier":{"webhook_url":"http://auth.example.com/verify","webhook_cluster":"auth_webhook"}}"#;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        parse(s.as_bytes())
    }

    fn error_of(s: &str) -> String {
        parse_str(s).unwrap_err().0
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = parse_str(MIN).unwrap();
        let v = &c.verifier;
        assert_eq!(
            v.webhook,
            Some(Webhook {
                cluster: "auth_webhook".into(),
                authority: "auth.example.com".into(),
                path: "/verify".into()
            })
        );
        assert_eq!(
            (v.timeout_ms, v.retry_attempts, v.cache_ttl_sec, v.cache_max_size),
            (5000, 3, 300, 10000)
        );
        assert_eq!(
            (v.circuit_breaker_threshold, v.circuit_breaker_timeout_sec, v.rate_limit_per_sec),
            (10, 60, 1000)
        );
        assert!(v.require_authentication && v.precheck);
        assert_eq!(c.token.query_params, vec!["token", "access_token"]);
        assert_eq!(c.token.ticket_params, vec!["ticket"]);
        assert_eq!(c.token.cookie, "revenprox_token");
        assert!(c.token.strip_from_upstream);
        assert_eq!(c.topic.path_prefix, "/events/");
        assert_eq!(
            (c.sse.heartbeat_interval_sec, c.sse.challenge_before_expiry_sec, c.sse.max_connection_sec),
            (15, 30, 3600)
        );
        assert_eq!(c.user_header, "x-revenprox-user");
        assert!(!c.development_mode());
    }

    #[test]
    fn the_contract_example_parses() {
        let full = r#"{
          "jwt_verifier": {"webhook_url": "http://auth.example.com/verify", "webhook_cluster": "auth_webhook",
            "timeout_ms": 5000, "retry_attempts": 3, "cache_ttl_sec": 300, "cache_max_size": 10000,
            "circuit_breaker_threshold": 10, "circuit_breaker_timeout_sec": 60, "rate_limit_per_sec": 1000,
            "require_authentication": true, "precheck": true},
          "token": {"query_params": ["token", "access_token"], "ticket_params": ["ticket"],
            "cookie": "revenprox_token", "strip_from_upstream": true},
          "topic": {"path_prefix": "/events/"},
          "sse": {"heartbeat_interval_sec": 15, "challenge_before_expiry_sec": 30, "max_connection_sec": 3600},
          "user_header": "x-revenprox-user"}"#;
        assert_eq!(parse_str(full).unwrap(), parse_str(MIN).unwrap());
    }

    #[test]
    fn webhook_url_forms() {
        let c = parse_str(r#"{"jwt_verifier":{"webhook_url":"https://auth:9000","webhook_cluster":"a"}}"#)
            .unwrap();
        let w = c.verifier.webhook.unwrap();
        assert_eq!((w.authority.as_str(), w.path.as_str()), ("auth:9000", "/"));
        let c =
            parse_str(r#"{"jwt_verifier":{"webhook_url":"http://a/v1/check?x=1","webhook_cluster":"a"}}"#)
                .unwrap();
        assert_eq!(c.verifier.webhook.unwrap().path, "/v1/check?x=1");
    }

    #[test]
    fn development_mode() {
        let c = parse_str(r#"{"jwt_verifier":{"webhook_url":"","require_authentication":false}}"#).unwrap();
        assert!(c.development_mode());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (r#"{"jwt_verifier":{"bogus":1}}"#, "jwt_verifier.bogus"),
            (r#"{"bogus":1}"#, "bogus"),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","timeout_ms":"x"}}"#,
                "jwt_verifier.timeout_ms",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","timeout_ms":0}}"#,
                "jwt_verifier.timeout_ms",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","timeout_ms":1.5}}"#,
                "jwt_verifier.timeout_ms",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","retry_attempts":-1}}"#,
                "jwt_verifier.retry_attempts",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","cache_max_size":0}}"#,
                "jwt_verifier.cache_max_size",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"ftp://x","webhook_cluster":"a"}}"#,
                "jwt_verifier.webhook_url",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http:///v","webhook_cluster":"a"}}"#,
                "jwt_verifier.webhook_url",
            ),
            (r#"{"jwt_verifier":{"webhook_url":"http://a/v"}}"#, "jwt_verifier.webhook_cluster"),
            (r#"{}"#, "jwt_verifier.webhook_url"),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","precheck":"yes"}}"#,
                "jwt_verifier.precheck",
            ),
            (r#"{"jwt_verifier":[]}"#, "jwt_verifier"),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"token":{"query_params":"token"}}"#,
                "token.query_params",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"token":{"query_params":["a b"]}}"#,
                "token.query_params",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"token":{"ticket_params":["token"]}}"#,
                "token.ticket_params",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"token":{"cookie":"a;b"}}"#,
                "token.cookie",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"topic":{"path_prefix":"events"}}"#,
                "topic.path_prefix",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"sse":{"heartbeat_interval_sec":0}}"#,
                "sse.heartbeat_interval_sec",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"sse":{"reverify_interval_sec":86401}}"#,
                "sse.reverify_interval_sec",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"sse":{"max_streams_per_user":-1}}"#,
                "sse.max_streams_per_user",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"sse":{"max_streams_per_user":"2"}}"#,
                "sse.max_streams_per_user",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"topic":{"other_paths":"allow"}}"#,
                "topic.other_paths",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"token":{"forward_to_upstream":"yes"}}"#,
                "token.forward_to_upstream",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"user_header":"bad header"}"#,
                "user_header",
            ),
            (
                r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"user_header":"Authorization"}"#,
                "user_header",
            ),
        ];
        for (input, key) in cases {
            let e = error_of(input);
            assert!(e.starts_with(&format!("{key}: ")), "{input} -> {e}");
        }
    }

    #[test]
    fn unknown_keys_are_escaped_to_keep_one_log_line() {
        // Found by fuzz/fuzz_targets/config.rs: a key with a newline split the log line.
        let e = error_of(
            r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"sse":{";\n":1}}"#,
        );
        assert!(e.starts_with(r"sse.;\n: unknown key"), "{e}");
        let e = error_of(r#"{"bad\r\nkey\u0000":1}"#);
        assert!(e.starts_with(r"bad\r\nkey\0: unknown key"), "{e}");
        assert!(!e.contains(['\n', '\r', '\0']));
        // Ordinary names are unchanged.
        assert!(error_of(r#"{"jwt_verifier":{"bogus":1}}"#).starts_with("jwt_verifier.bogus: unknown key"));
    }

    #[test]
    fn whole_numbers_written_as_floats_count() {
        let c = parse_str(r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","timeout_ms":5000.0,"cache_ttl_sec":6e1}}"#).unwrap();
        assert_eq!((c.verifier.timeout_ms, c.verifier.cache_ttl_sec), (5000, 60));
        assert!(error_of(
            r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","timeout_ms":-5.0}}"#
        )
        .starts_with("jwt_verifier.timeout_ms"));
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(error_of("{not json").starts_with("configuration: is not valid JSON"));
        assert!(error_of("[1]").starts_with("configuration: must be a JSON object"));
        assert!(parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn cache_can_be_turned_off() {
        let c = parse_str(r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a","cache_ttl_sec":0,"cache_max_size":0}}"#).unwrap();
        assert!(!c.verifier.cache_enabled());
    }

    #[test]
    fn user_header_may_not_name_a_reserved_header_in_any_spelling() {
        // The filter removes every client header that folds to user_header: `content_type`
        // would have stripped Content-Type from every request.
        for name in [
            "content_type",
            "Content_Length",
            "transfer_encoding",
            "x_forwarded_for",
            "Connection",
            "upgrade",
            "x-envoy-original-path",
            "x_envoy_internal",
            "authorization",
            "COOKIE",
        ] {
            let cfg = format!(
                r#"{{"jwt_verifier":{{"webhook_url":"http://a/v","webhook_cluster":"a"}},"user_header":"{name}"}}"#
            );
            let e = parse_str(&cfg).err().unwrap_or_else(|| panic!("{name} accepted"));
            assert!(e.0.starts_with("user_header: ") && e.0.contains("reserved"), "{name}: {e}");
        }
        for name in ["x-user", "x_user_id", "x-envoyer", "content-typed"] {
            let cfg = format!(
                r#"{{"jwt_verifier":{{"webhook_url":"http://a/v","webhook_cluster":"a"}},"user_header":"{name}"}}"#
            );
            assert!(parse_str(&cfg).is_ok(), "{name}");
        }
    }

    #[test]
    fn user_header_is_lowercased() {
        let c = parse_str(
            r#"{"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"},"user_header":"X-User"}"#,
        )
        .unwrap();
        assert_eq!(c.user_header, "x-user");
    }

    #[test]
    fn every_key_is_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        let start = readme.find("<!-- config-reference").unwrap();
        let end = readme.find("<!-- /config-reference -->").unwrap();
        let table = &readme[start..end];
        let known = known_keys();
        for key in &known {
            assert!(table.contains(&format!("| `{key}` |")), "README config reference lacks {key}");
        }
        let documented = table.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(documented, known.len(), "README documents keys the parser does not know");
    }

    #[test]
    fn the_contract_documents_every_key_with_its_default() {
        // docs/contract.md's JSON block is the full configuration with every default.
        let doc = include_str!("../../docs/contract.md");
        let start = doc.find("```json\n").unwrap() + 8;
        let end = start + doc[start..].find("\n```").unwrap();
        let example: Value = serde_json::from_str(&doc[start..end]).unwrap();
        let mut keys = Vec::new();
        for (section, v) in example.as_object().unwrap() {
            match v.as_object() {
                Some(m) => keys.extend(m.keys().map(|k| format!("{section}.{k}"))),
                None => keys.push(section.clone()),
            }
        }
        let mut known = known_keys();
        keys.sort();
        known.sort();
        assert_eq!(keys, known, "docs/contract.md's configuration differs from SECTIONS");
        // ...and with the example's values (defaults, plus the webhook) it is the default config.
        assert_eq!(parse_str(&doc[start..end]).unwrap(), parse_str(MIN).unwrap());
    }

    #[test]
    fn known_keys_match_the_parser() {
        // Every documented key is accepted...
        for key in known_keys() {
            let key = key.as_str();
            let (section, name) = key.split_once('.').unwrap_or(("", key));
            let value = if name.ends_with("_params") {
                "[\"p\"]".to_string()
            } else if [
                "require_authentication",
                "precheck",
                "strip_from_upstream",
                "forward_to_upstream",
                "early_refresh_refusal",
            ]
            .contains(&name)
            {
                "true".to_string()
            } else if name == "other_paths" {
                "\"pass\"".to_string()
            } else if ["webhook_url", "webhook_cluster", "cookie", "path_prefix", "user_header"]
                .contains(&name)
            {
                String::new()
            } else {
                "1".to_string()
            };
            let mut doc =
                serde_json::json!({"jwt_verifier":{"webhook_url":"http://a/v","webhook_cluster":"a"}});
            if value.is_empty() {
                continue; // string keys are covered by the tests above
            }
            let v: Value = serde_json::from_str(&value).unwrap();
            if section.is_empty() {
                doc[name] = v;
            } else {
                doc[section][name] = v;
            }
            parse_str(&doc.to_string()).unwrap_or_else(|e| panic!("{key}: {e}"));
        }
    }
}
