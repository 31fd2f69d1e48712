//! The request gate: one way through a request's headers, from raw request data to the next step.
//!
//! `admit` runs the contract's checks in order (topic, token, precheck) and returns what the host
//! must do next: answer locally, pass the request on, or verify a credential (cache, then webhook).
//! It is pure: time comes in as an argument, and nothing here calls the host.

use super::cache;
use super::canonical;
use super::precheck;
use super::reply::{Code, Reply};
use super::token::{self, Credential, Kind, RequestParts, TokenError};
use super::topic;
use crate::config::{Config, OtherPaths};

/// The request data the gate reads.
pub struct Request<'a> {
    pub method: &'a [u8],
    /// `:path` with its query string.
    pub path: &'a str,
    pub content_type: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
    pub cookie: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Answer locally; the request never goes upstream.
    Reply(Reply),
    /// Pass upstream without an identity (development mode, or optional authentication without a
    /// token).
    Pass,
    /// A path outside the topic prefix, with `topic.other_paths: "pass"`: forwarded without an
    /// identity; no spelling of it can be read as a topic path.
    Other,
    /// Verify `credential` for the topic; forward on success.
    Verify(Verification),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub credential: Credential,
    pub topic_id: String,
    /// The verdict may come from, and go to, the cache (JWTs while caching is on; never tickets).
    pub cacheable: bool,
    /// A challenge response: on success the filter answers 204 itself and the user's open
    /// streams on the topic take the new expiry; the request is never forwarded.
    pub reauth: bool,
    /// The client address's key (`resilience::clients`), when the verification needs the webhook:
    /// its share of the budget and its circuit. `None` for the filter's own re-verifications.
    pub client: Option<[u8; 32]>,
    /// This verification is its client's half-open probe.
    pub client_probe: bool,
    /// The precheck is still to run (`precheck`): it was left to the verifier, which skips it when
    /// the worker's own cache knows the token (a verdict there keeps the token's `Claims`).
    pub precheck_due: bool,
    /// What the precheck read from the token, once it ran.
    pub claims: Option<precheck::Claims>,
}

impl Verification {
    /// SHA-256 over the credential and the topic id: the cache key and the single-flight key.
    /// Computed on demand: a hit in a worker's local cache never needs it.
    pub fn key(&self) -> cache::Key {
        cache::key(&self.credential.value, &self.topic_id)
    }
}

/// The content type of a challenge response (Zilla's SSE JWT guard wire format).
pub const CHALLENGE_RESPONSE: &str = "application/x-challenge-response";

/// A `POST` with `content-type: application/x-challenge-response` answers a challenge.
fn is_challenge_response(req: &Request) -> bool {
    req.method.eq_ignore_ascii_case(b"POST")
        && req.content_type.is_some_and(|ct| {
            let media = ct.split(|b| *b == b';').next().unwrap_or_default();
            media.trim_ascii().eq_ignore_ascii_case(CHALLENGE_RESPONSE.as_bytes())
        })
}

fn split_query(path: &str) -> (&str, Option<&str>) {
    match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    }
}

/// `:path` without token and ticket parameters, when stripping is on and there was one. The host
/// applies it before anything else, so neither the upstream nor Envoy's access log (also for
/// refused requests) ever sees a token in the URL.
pub fn stripped_path(cfg: &Config, path: &str) -> Option<String> {
    let (path_only, query) = split_query(path);
    let query = query?;
    if !cfg.token.strip_from_upstream {
        return None;
    }
    let kept = token::strip_params(&cfg.token, query);
    if kept.as_deref() == Some(query) {
        return None;
    }
    Some(match kept {
        Some(q) => format!("{path_only}?{q}"),
        None => path_only.to_string(),
    })
}

/// Whether `path` (query included) is outside the topic prefix in every reading an upstream may
/// make of it: the test `admit` applies before a path may pass as `Step::Other`. A path that is not
/// may be read as a topic path by some upstream.
pub fn outside_prefix(cfg: &Config, path: &str) -> bool {
    let (path_only, _) = split_query(path);
    let prefix = &cfg.topic.path_prefix;
    topic::segment(path_only, prefix).and_then(topic::id).is_none()
        && !canonical::under_prefix(path_only, prefix)
}

pub fn admit(cfg: &Config, req: &Request, now_sec: u64) -> Step {
    admit_with(cfg, req, now_sec, &mut topic::id)
}

/// `admit`, with the topic id of a segment from `topic_id` (a worker's `topic::Ids`).
pub fn admit_with(
    cfg: &Config,
    req: &Request,
    now_sec: u64,
    topic_id: &mut dyn FnMut(&str) -> Option<String>,
) -> Step {
    let (path_only, query) = split_query(req.path);
    let reauth = is_challenge_response(req);
    if cfg.development_mode() && !reauth {
        return Step::Pass;
    }
    let Some(topic_id) = topic::segment(path_only, &cfg.topic.path_prefix).and_then(topic_id) else {
        let prefix = &cfg.topic.path_prefix;
        if cfg.topic.other_paths == OtherPaths::Pass && !canonical::under_prefix(path_only, prefix) {
            return Step::Other;
        }
        return Step::Reply(Reply::new(Code::NoTopic, "the path names no topic"));
    };
    let parts = RequestParts { authorization: req.authorization, cookie: req.cookie, query };
    let credential = match token::extract(&cfg.token, &parts) {
        Ok(c) => c,
        Err(TokenError::Missing) if !cfg.verifier.require_authentication && !reauth => {
            return Step::Pass;
        }
        Err(TokenError::Missing) => {
            return Step::Reply(Reply::new(Code::MissingToken, "a bearer token is required"));
        }
        Err(TokenError::MalformedAuthorization) => {
            return Step::Reply(Reply::new(
                Code::MalformedAuthorization,
                "the Authorization header must be 'Bearer <token>'",
            ));
        }
        Err(TokenError::Unusable) => {
            return Step::Reply(Reply::new(Code::InvalidToken, "the token is not usable"));
        }
    };
    let cacheable = credential.kind == Kind::Jwt && cfg.verifier.cache_enabled();
    // A request to forward that the cache may answer leaves the precheck to the verifier: a token
    // in the worker's cache passed it before, and only its `exp` can have changed since.
    let prechecked = credential.kind == Kind::Jwt && cfg.verifier.precheck;
    let precheck_due = prechecked && cacheable && !reauth;
    let mut claims = None;
    if prechecked && !precheck_due {
        match precheck(&credential.value, now_sec) {
            Ok(c) => claims = Some(c),
            Err(reply) => return Step::Reply(reply),
        }
    }
    if cfg.development_mode() {
        // Nothing to verify a refresh against: streams in development mode never expire by token.
        return Step::Reply(Reply::new(
            Code::UserMismatch,
            "development mode: there is no session to re-authorize",
        ));
    }
    Step::Verify(Verification {
        credential,
        topic_id,
        cacheable,
        reauth,
        client: None,
        client_probe: false,
        precheck_due,
        claims,
    })
}

/// The precheck of a JWT (`precheck::check`) and the refusal it leads to.
pub fn precheck(token: &str, now_sec: u64) -> Result<precheck::Claims, Reply> {
    precheck::check_claims(token, now_sec).map_err(|refusal| match refusal {
        precheck::Refusal::NotAJwt => Reply::new(Code::InvalidToken, "the token is not a JWT"),
        precheck::Refusal::Expired => Reply::new(Code::InvalidToken, "the token has expired"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::config;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn cfg(extra: &str) -> Config {
        let base = r#""jwt_verifier":{"webhook_url":"http://a/verify","webhook_cluster":"a"}"#;
        config::parse(format!("{{{base}{extra}}}").as_bytes()).unwrap()
    }

    fn jwt(exp: u64) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"a","exp":{exp}}}"#))
        )
    }

    fn run(cfg: &Config, path: &str, auth: Option<&str>) -> Step {
        let req = Request {
            method: b"GET",
            path,
            content_type: None,
            authorization: auth.map(str::as_bytes),
            cookie: None,
        };
        admit(cfg, &req, 1000)
    }

    fn post(cfg: &Config, path: &str, content_type: &str, auth: Option<&str>) -> Step {
        let req = Request {
            method: b"POST",
            path,
            content_type: Some(content_type.as_bytes()),
            authorization: auth.map(str::as_bytes),
            cookie: None,
        };
        admit(cfg, &req, 1000)
    }

    #[test]
    fn challenge_responses_are_reauthorizations() {
        let c = cfg("");
        let bearer = format!("Bearer {}", jwt(2000));
        for ct in ["application/x-challenge-response", "Application/X-Challenge-Response; charset=utf-8"] {
            let Step::Verify(v) = post(&c, "/events/news", ct, Some(&bearer)) else { panic!("{ct}") };
            assert!(v.reauth);
        }
        let Step::Verify(v) = post(&c, "/events/news", "application/json", Some(&bearer)) else { panic!() };
        assert!(!v.reauth);
        let Step::Verify(v) = run(&c, "/events/news", Some(&bearer)) else { panic!() };
        assert!(!v.reauth);
        assert_eq!(code(post(&c, "/events/news", CHALLENGE_RESPONSE, None)), "missing_token");
        let mut optional = c.clone();
        optional.verifier.require_authentication = false;
        assert_eq!(code(post(&optional, "/events/news", CHALLENGE_RESPONSE, None)), "missing_token");
    }

    fn code(step: Step) -> &'static str {
        match step {
            Step::Reply(r) => r.code.as_str(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn verifies_a_jwt_with_topic_and_cache_key() {
        let t = jwt(2000);
        let Step::Verify(v) = run(&cfg(""), "/events/news", Some(&format!("Bearer {t}"))) else { panic!() };
        assert_eq!(v.topic_id, topic::id("news").unwrap());
        assert_eq!((v.key(), v.cacheable), (cache::key(&t, &v.topic_id), true));
    }

    #[test]
    fn order_of_refusals() {
        // Cache off: the gate runs the precheck itself.
        let mut c = cfg("");
        c.verifier.cache_ttl_sec = 0;
        assert_eq!(code(run(&c, "/events/", None)), "no_topic");
        assert_eq!(code(run(&c, "/other", Some("Bearer x"))), "no_topic");
        assert_eq!(code(run(&c, "/events/bad%zz", None)), "no_topic");
        assert_eq!(code(run(&c, "/events/news", None)), "missing_token");
        assert_eq!(code(run(&c, "/events/news", Some("Basic x"))), "malformed_authorization");
        assert_eq!(code(run(&c, "/events/news", Some("Bearer abc"))), "invalid_token");
        assert_eq!(code(run(&c, "/events/news", Some(&format!("Bearer {}", jwt(999))))), "invalid_token");
    }

    #[test]
    fn the_precheck_is_left_to_the_verifier_when_the_cache_may_answer() {
        let c = cfg("");
        for (token, claims_now) in [("abc".to_string(), None), (jwt(999), None), (jwt(2000), None)] {
            let Step::Verify(v) = run(&c, "/events/news", Some(&format!("Bearer {token}"))) else { panic!() };
            assert!(v.precheck_due && v.cacheable && v.claims == claims_now, "{token}");
        }
        // A challenge response is prechecked here (it never reads the worker's cache first).
        assert_eq!(code(post(&c, "/events/news", CHALLENGE_RESPONSE, Some("Bearer abc"))), "invalid_token");
        let Step::Verify(v) =
            post(&c, "/events/news", CHALLENGE_RESPONSE, Some(&format!("Bearer {}", jwt(2000))))
        else {
            panic!()
        };
        assert!(!v.precheck_due && v.claims.is_some_and(|cl| cl.unexpired(1999) && !cl.unexpired(2000)));
    }

    #[test]
    fn precheck_can_be_off() {
        let mut c = cfg("");
        c.verifier.precheck = false;
        assert!(matches!(run(&c, "/events/news", Some("Bearer abc")), Step::Verify(_)));
    }

    #[test]
    fn tickets_are_not_prechecked_nor_cached() {
        let Step::Verify(v) = run(&cfg(""), "/events/news?ticket=one-time", None) else { panic!() };
        assert_eq!((v.credential.kind, v.cacheable), (Kind::Ticket, false));
    }

    #[test]
    fn strips_token_params_but_keeps_others() {
        let c = cfg("");
        assert_eq!(
            stripped_path(&c, "/events/news?a=1&token=T&b=2").as_deref(),
            Some("/events/news?a=1&b=2")
        );
        assert_eq!(stripped_path(&c, "/events/news?ticket=T").as_deref(), Some("/events/news"));
        assert_eq!(stripped_path(&c, "/events/news?a=1"), None);
        assert_eq!(stripped_path(&c, "/events/news"), None);
        let keep = cfg(r#","token":{"strip_from_upstream":false}"#);
        assert_eq!(stripped_path(&keep, "/events/news?a=1&token=T"), None);
    }

    #[test]
    fn no_cache_key_when_cache_off() {
        let mut c = cfg("");
        c.verifier.cache_ttl_sec = 0;
        let Step::Verify(v) = run(&c, "/events/news", Some(&format!("Bearer {}", jwt(2000)))) else {
            panic!()
        };
        assert!(!v.cacheable);
    }

    #[test]
    fn other_paths_pass_unless_an_upstream_could_read_a_topic_path() {
        let pass = cfg(r#","topic":{"other_paths":"pass"}"#);
        for path in ["/", "/healthz", "/api/me?token=x", "/even", "/static/app.js"] {
            assert_eq!(run(&pass, path, None), Step::Other, "{path}");
        }
        for path in [
            "//events/news",
            "/%65vents/news",
            "/Events/news",
            "/events",
            "/eventsfoo",
            "/events/",
            "/x/../events/news",
            "/%EF%BD%85vents/news",
            "/events;x/news",
            "/events/news/%E2%80%A5/sports",
        ] {
            assert_eq!(code(run(&pass, path, Some("Bearer x.y.z"))), "no_topic", "{path}");
        }
        // The default refuses every path that names no topic.
        assert_eq!(code(run(&cfg(""), "/healthz", None)), "no_topic");
    }

    #[test]
    fn development_mode_and_optional_auth() {
        let dev =
            config::parse(br#"{"jwt_verifier":{"webhook_url":"","require_authentication":false}}"#).unwrap();
        assert_eq!(run(&dev, "/anything?token=x", None), Step::Pass);
        // A passed request is on a topic path unless no reading of it is under the prefix.
        assert!(outside_prefix(&dev, "/anything?token=x"));
        for path in ["/events/news", "/events/news?x=1", "/EVENTS/news", "//events/x", "/events/"] {
            assert!(!outside_prefix(&dev, path), "{path}");
        }
        let mut optional = cfg("");
        optional.verifier.require_authentication = false;
        assert_eq!(run(&optional, "/events/news", None), Step::Pass);
        assert!(matches!(
            run(&optional, "/events/news", Some(&format!("Bearer {}", jwt(2000)))),
            Step::Verify(_)
        ));
    }
}
