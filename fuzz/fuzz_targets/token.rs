//! `auth::token::extract` and `auth::token::strip_params` (and `gate::stripped_path`) on arbitrary
//! `Authorization`, `Cookie` and query strings, under arbitrary valid token configurations.
//!
//! Properties: no panic; an extracted credential is non-empty printable ASCII without `"` or `\`
//! and at most MAX_TOKEN_LEN bytes, on the channel the contract's order gives; the query channel
//! agrees with a reference parser; stripping keeps exactly the other non-empty parameters, byte for
//! byte and in order, and leaves nothing the filter would take as a credential.
#![no_main]

use arbitrary::Arbitrary;
use fuzz_support::{reference, CfgSpec};
use libfuzzer_sys::fuzz_target;
use revenprox::auth::gate;
use revenprox::auth::token::{self, Channel, Kind, RequestParts, TokenError, MAX_TOKEN_LEN};
use revenprox::config::TokenConfig;

/// Raw bytes, or text built from the names the configuration uses (so that the fuzzer reaches
/// the channels' own logic quickly instead of guessing parameter names).
#[derive(Arbitrary, Debug)]
enum Text {
    Raw(Vec<u8>),
    Pairs(Vec<(u8, String, u8)>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    cfg: CfgSpec,
    authorization: Option<Text>,
    cookie: Option<Text>,
    query: Option<Text>,
}

/// Renders `text`; `Pairs` become `name=value` joined by `sep`, names picked among `names`.
fn render(text: Text, names: &[String], sep: &str, bearer: bool) -> Vec<u8> {
    match text {
        Text::Raw(b) => b,
        Text::Pairs(pairs) if bearer => {
            let v: String = pairs.iter().map(|(_, v, _)| v.as_str()).collect();
            format!("Bearer {v}").into_bytes()
        }
        Text::Pairs(pairs) => {
            let items: Vec<String> = pairs
                .iter()
                .map(|(n, v, style)| {
                    let name = names.get(usize::from(*n) % (names.len() + 1)).map_or("x", String::as_str);
                    match style % 4 {
                        0 => format!("{name}={v}"),
                        1 => format!("{name}={}", reference::percent_encode(v.as_bytes())),
                        2 => format!("{name}=\"{v}\""),
                        _ => format!("{}={v}", reference::percent_encode(name.as_bytes())),
                    }
                })
                .collect();
            items.join(sep).into_bytes()
        }
    }
}

fn usable(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_TOKEN_LEN
        && v.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

fn is_param(cfg: &TokenConfig, raw_key: &str) -> bool {
    let Some(key) = reference::percent_decode(raw_key.as_bytes(), true) else { return false };
    cfg.query_params.iter().chain(&cfg.ticket_params).any(|p| p.as_bytes() == key.as_slice())
}

/// The query channel per the contract: for each configured name in order (JWT names, then ticket
/// names), the first non-empty, decodable, UTF-8 value; it must then be usable.
fn reference_query(cfg: &TokenConfig, query: &str) -> Option<Result<(String, Channel), TokenError>> {
    let pairs: Vec<(Option<Vec<u8>>, &str)> = query
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (reference::percent_decode(k.as_bytes(), true), v)
        })
        .collect();
    let names = cfg
        .query_params
        .iter()
        .map(|n| (n, Channel::Query))
        .chain(cfg.ticket_params.iter().map(|n| (n, Channel::Ticket)));
    for (name, channel) in names {
        for (k, v) in &pairs {
            if k.as_deref() != Some(name.as_bytes()) {
                continue;
            }
            let Some(value) = reference::percent_decode(v.as_bytes(), true) else { continue };
            let Ok(value) = String::from_utf8(value) else { continue };
            if value.is_empty() {
                continue;
            }
            return Some(if usable(&value) { Ok((value, channel)) } else { Err(TokenError::Unusable) });
        }
    }
    None
}

struct Plain {
    authorization: Option<Vec<u8>>,
    cookie: Option<Vec<u8>>,
    query: Option<String>,
}

fuzz_target!(|input: Input| {
    let cfg = input.cfg.build();
    let tc = &cfg.token;
    let params: Vec<String> = tc.query_params.iter().chain(&tc.ticket_params).cloned().collect();
    let authorization = input.authorization.map(|t| render(t, &[], "", true));
    let cookie = input.cookie.map(|t| render(t, std::slice::from_ref(&tc.cookie), "; ", false));
    let query = input.query.and_then(|t| String::from_utf8(render(t, &params, "&", false)).ok());
    let input = Plain { authorization, cookie, query };
    let parts = RequestParts {
        authorization: input.authorization.as_deref(),
        cookie: input.cookie.as_deref(),
        query: input.query.as_deref(),
    };
    let got = token::extract(tc, &parts);

    match &got {
        Ok(c) => {
            assert!(usable(&c.value), "unusable credential extracted: {c:?}");
            match c.channel {
                Channel::Header => assert!(c.kind == Kind::Jwt && input.authorization.is_some()),
                Channel::Query => assert!(c.kind == Kind::Jwt && input.authorization.is_none()),
                Channel::Ticket => assert!(c.kind == Kind::Ticket && input.authorization.is_none()),
                Channel::Cookie => assert!(
                    c.kind == Kind::Jwt
                        && input.authorization.is_none()
                        && input.cookie.is_some()
                        && !tc.cookie.is_empty()
                ),
            }
        }
        Err(TokenError::MalformedAuthorization) => assert!(input.authorization.is_some()),
        Err(TokenError::Missing) => assert!(input.authorization.is_none()),
        Err(TokenError::Unusable) => {}
    }

    // The query channel against the reference (only when no header decides first).
    if let (None, Some(query)) = (&input.authorization, &input.query) {
        let want = reference_query(tc, query);
        let have = match &got {
            Ok(c) if matches!(c.channel, Channel::Query | Channel::Ticket) => {
                Some(Ok((c.value.clone(), c.channel)))
            }
            Err(TokenError::Unusable) => Some(Err(TokenError::Unusable)),
            _ => None,
        };
        // An unusable cookie also gives Unusable; only compare when the query decided.
        if !(want.is_none() && have == Some(Err(TokenError::Unusable))) {
            assert_eq!(have, want, "query {query:?} with {tc:?}");
        }
    }

    // Stripping.
    if let Some(query) = &input.query {
        let stripped = token::strip_params(tc, query);
        // `&` separates parameters; inside one, a `;`-separated piece naming a token parameter
        // goes too (an upstream may split on `;`).
        let names_param = |p: &str| is_param(tc, p.split_once('=').map_or(p, |(k, _)| k));
        let kept: Vec<String> = query
            .split('&')
            .filter(|p| !names_param(p))
            .map(|p| p.split(';').filter(|piece| !names_param(piece)).collect::<Vec<_>>().join(";"))
            .filter(|p| !p.is_empty())
            .collect();
        let want = (!kept.is_empty()).then(|| kept.join("&"));
        assert_eq!(stripped, want, "strip_params({query:?})");
        if let Some(s) = &stripped {
            assert!(
                !s.split(['&', ';']).any(names_param),
                "a token parameter survived stripping: {query:?} -> {s:?}"
            );
        }
        if let Some(s) = &stripped {
            let again =
                token::extract(tc, &RequestParts { authorization: None, cookie: None, query: Some(s) });
            assert!(
                !matches!(&again, Ok(c) if matches!(c.channel, Channel::Query | Channel::Ticket)),
                "a credential survived stripping: {query:?} -> {s:?}"
            );
            assert_eq!(token::strip_params(tc, s).as_deref(), Some(s.as_str()), "stripping is idempotent");
        }
        // The path the upstream and the access log see.
        let path = format!("/events/t?{query}");
        match gate::stripped_path(&cfg, &path) {
            Some(p) => {
                assert!(tc.strip_from_upstream);
                let (head, q) = p.split_once('?').map_or((p.as_str(), None), |(h, q)| (h, Some(q)));
                assert_eq!(head, "/events/t");
                assert_eq!(q.map(str::to_string), want);
            }
            None => assert!(!tc.strip_from_upstream || want.as_deref() == Some(query.as_str())),
        }
    }
});
