//! `auth::gate::admit` (the one way through request headers) with arbitrary method, path,
//! content type, `Authorization` and `Cookie`, at an arbitrary time, under arbitrary valid
//! configurations (production, optional authentication, development mode, precheck and cache on or
//! off, other token names and prefixes).
//!
//! Properties: no panic; `Pass` only in development mode or, with authentication optional, for a
//! request that carries no credential (never for a challenge response); when authentication is
//! required a request without a credential is always refused; `Verify` carries exactly the
//! credential `token::extract` finds, the topic id of the path's topic (32 lowercase hex), the cache
//! key bound to both, `cacheable` only for JWTs with the cache on, and a JWT that passed the
//! precheck; refusals are only the gate's own codes, each a 401/403/404 with a JSON body; and the
//! topic authorized is the topic an upstream that normalizes the path would serve.
#![no_main]

use arbitrary::Arbitrary;
use fuzz_support::{assert_not_under_prefix, assert_topic_is_served, reference, CfgSpec};
use libfuzzer_sys::fuzz_target;
use revenprox::auth::gate::{self, Request, Step, CHALLENGE_RESPONSE};
use revenprox::auth::reply::Code;
use revenprox::auth::token::{self, Kind, RequestParts};
use revenprox::auth::{cache, precheck, topic};
use revenprox::config::OtherPaths;

#[derive(Arbitrary, Debug)]
enum Method {
    Get,
    Post,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ContentType {
    None,
    Challenge,
    Other(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: CfgSpec,
    method: Method,
    path: String,
    content_type: ContentType,
    authorization: Option<Vec<u8>>,
    cookie: Option<Vec<u8>>,
    now: u64,
}

fuzz_target!(|input: Input| {
    let cfg = input.cfg.build();
    let method: Vec<u8> = match input.method {
        Method::Get => b"GET".to_vec(),
        Method::Post => b"POST".to_vec(),
        Method::Other(m) => m,
    };
    let content_type: Option<Vec<u8>> = match input.content_type {
        ContentType::None => None,
        ContentType::Challenge => Some(CHALLENGE_RESPONSE.as_bytes().to_vec()),
        ContentType::Other(c) => Some(c),
    };
    let path = input.path.as_str();
    let req = Request {
        method: &method,
        path,
        content_type: content_type.as_deref(),
        authorization: input.authorization.as_deref(),
        cookie: input.cookie.as_deref(),
    };
    let step = gate::admit(&cfg, &req, input.now);

    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let parts = RequestParts {
        authorization: input.authorization.as_deref(),
        cookie: input.cookie.as_deref(),
        query,
    };
    let extracted = token::extract(&cfg.token, &parts);
    let prefix = cfg.topic.path_prefix.as_str();
    let segment = topic::segment(path_only, prefix);
    let reauth_possible = method.eq_ignore_ascii_case(b"POST") && content_type.is_some();

    match &step {
        Step::Other => {
            assert!(cfg.topic.other_paths == OtherPaths::Pass, "Other while other_paths is deny");
            assert!(segment.is_none(), "a topic path passed as another path: {path:?}");
            assert_not_under_prefix(prefix, path_only);
        }
        Step::Pass => {
            assert!(!cfg.verifier.require_authentication, "Pass while authentication is required");
            if !cfg.development_mode() {
                assert!(extracted.is_err(), "Pass although a credential was there: {extracted:?}");
                let is_challenge =
                    matches!(&content_type, Some(c) if c.as_slice() == CHALLENGE_RESPONSE.as_bytes());
                assert!(!(is_challenge && method.as_slice() == b"POST"), "a challenge response passed");
            }
        }
        Step::Verify(v) => {
            assert!(!cfg.development_mode());
            assert_eq!(extracted.as_ref(), Ok(&v.credential), "Verify with another credential");
            let seg = segment.unwrap_or_else(|| panic!("Verify without a topic segment: {path:?}"));
            assert_eq!(Some(&v.topic_id), reference::topic_id(seg).as_ref());
            assert!(
                v.topic_id.len() == 32
                    && v.topic_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            );
            assert_eq!(v.key(), cache::key(&v.credential.value, &v.topic_id));
            assert_eq!(v.cacheable, v.credential.kind == Kind::Jwt && cfg.verifier.cache_ttl_sec > 0);
            // The precheck ran here and passed, or is left to the verifier for a request to forward
            // that the cache may answer (the verifier runs it unless the worker's cache knows the
            // token).
            let prechecked = v.credential.kind == Kind::Jwt && cfg.verifier.precheck;
            assert_eq!(v.precheck_due, prechecked && v.cacheable && !v.reauth);
            if prechecked && !v.precheck_due {
                assert_eq!(precheck::check(&v.credential.value, input.now), Ok(()));
                assert!(v.claims.is_some_and(|c| c.unexpired(input.now)));
            }
            if v.reauth {
                assert!(reauth_possible);
            }
            // The topic authorized is the topic served, however the upstream normalizes the path.
            assert_topic_is_served(prefix, seg, path_only);
        }
        Step::Reply(r) => {
            assert!(r.retry_after.is_none());
            match r.code {
                Code::NoTopic => assert!(!cfg.development_mode() || reauth_possible),
                Code::MissingToken => assert!(matches!(extracted, Err(token::TokenError::Missing))),
                Code::MalformedAuthorization => {
                    assert!(matches!(extracted, Err(token::TokenError::MalformedAuthorization)))
                }
                Code::InvalidToken => assert!(
                    matches!(extracted, Err(token::TokenError::Unusable))
                        || matches!(&extracted, Ok(c) if c.kind == Kind::Jwt && cfg.verifier.precheck
                            && precheck::check(&c.value, input.now).is_err())
                ),
                Code::UserMismatch => assert!(cfg.development_mode() && reauth_possible),
                other => panic!("the gate answered {other:?}"),
            }
            let body: serde_json::Value =
                serde_json::from_str(&r.body()).unwrap_or_else(|e| panic!("reply body: {e}"));
            assert_eq!(body["error"], r.code.as_str());
        }
    }

    // Authentication required and nothing that could be a credential: always refused (or, with
    // other_paths pass, passed as a path that is no topic path).
    if cfg.verifier.require_authentication
        && input.authorization.is_none()
        && input.cookie.is_none()
        && query.is_none()
    {
        assert!(matches!(step, Step::Reply(_) | Step::Other), "{step:?}");
    }
});
