//! Token extraction: which credential a request carries, and on which channel.
//!
//! Order (contract): `Authorization: Bearer` first, then the query parameters in the configured
//! order, then the ticket parameters, then the cookie. A present but malformed `Authorization`
//! header is an error of its own (`malformed_authorization`), not a reason to look elsewhere:
//! the client clearly meant to authenticate with it.

use super::percent::decode_component;
use crate::config::TokenConfig;

/// Longest credential accepted; a real JWT is a few KB at most.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JWT: prechecked, and its verdicts cached.
    Jwt,
    /// A one-time ticket: sent to the webhook as is, never prechecked, never cached.
    Ticket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Header,
    Query,
    Ticket,
    Cookie,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub value: String,
    pub kind: Kind,
    pub channel: Channel,
}

impl Credential {
    /// A credential known from an earlier request (a stream's refresh), whose channel no longer
    /// matters.
    pub fn refreshed(value: String, kind: Kind) -> Credential {
        let channel = match kind {
            Kind::Jwt => Channel::Header,
            Kind::Ticket => Channel::Ticket,
        };
        Credential { value, kind, channel }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// No channel carries a credential.
    Missing,
    /// `Authorization` is present but not `Bearer <token>`.
    MalformedAuthorization,
    /// A credential is present but cannot be a token (too long, not printable ASCII).
    Unusable,
}

/// What the filter needs of a request to find its credential.
pub struct RequestParts<'a> {
    pub authorization: Option<&'a [u8]>,
    pub cookie: Option<&'a [u8]>,
    /// The query string, without the leading `?`.
    pub query: Option<&'a str>,
}

/// A token is printable ASCII without spaces, separators that would break the webhook JSON, or
/// anything that could smuggle a header.
fn usable(token: &str) -> Result<(), TokenError> {
    if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err(TokenError::Unusable);
    }
    Ok(())
}

fn bearer(header: &[u8]) -> Result<&str, TokenError> {
    let text = std::str::from_utf8(header).map_err(|_| TokenError::MalformedAuthorization)?;
    let text = text.trim();
    let (scheme, rest) = text.split_once(' ').ok_or(TokenError::MalformedAuthorization)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::MalformedAuthorization);
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() || token.contains(' ') {
        return Err(TokenError::MalformedAuthorization);
    }
    Ok(token)
}

/// The first non-empty value of query parameter `name`, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(k, true)?.as_slice() == name.as_bytes()).then_some(v)
        })
        .filter_map(|v| String::from_utf8(decode_component(v, true)?).ok())
        .find(|v| !v.is_empty())
}

fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(header).ok()?;
    text.split(';')
        .filter_map(|c| c.trim().split_once('='))
        // Quotes off before the emptiness check: `name=""` carries no token.
        .map(|(k, v)| (k, v.trim_matches('"')))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v)
}

/// Finds the request's credential, in the contract's order.
pub fn extract(cfg: &TokenConfig, req: &RequestParts) -> Result<Credential, TokenError> {
    let found = |value: String, kind, channel| {
        usable(&value)?;
        Ok(Credential { value, kind, channel })
    };
    if let Some(header) = req.authorization {
        let token = bearer(header)?;
        return found(token.to_string(), Kind::Jwt, Channel::Header);
    }
    if let Some(query) = req.query {
        for name in &cfg.query_params {
            if let Some(v) = query_value(query, name) {
                return found(v, Kind::Jwt, Channel::Query);
            }
        }
        for name in &cfg.ticket_params {
            if let Some(v) = query_value(query, name) {
                return found(v, Kind::Ticket, Channel::Ticket);
            }
        }
    }
    if let (Some(header), false) = (req.cookie, cfg.cookie.is_empty()) {
        if let Some(v) = cookie_value(header, &cfg.cookie) {
            return found(v.to_string(), Kind::Jwt, Channel::Cookie);
        }
    }
    Err(TokenError::Missing)
}

/// A `Cookie` header value without the cookie(s) named `name` (the others keep their bytes and
/// order, joined by `; `). `None` when nothing is left.
pub fn strip_cookie(header: &[u8], name: &str) -> Option<Vec<u8>> {
    let kept: Vec<&[u8]> = header
        .split(|b| *b == b';')
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty())
        .filter(|c| c.split(|b| *b == b'=').next().map(<[u8]>::trim_ascii) != Some(name.as_bytes()))
        .collect();
    (!kept.is_empty()).then(|| kept.join(&b"; "[..]))
}

/// The query string with every token and ticket parameter removed (other parameters keep their
/// order and their exact bytes). `None` when nothing is left.
///
/// Parameters are `&`-separated (as in `URLSearchParams`, and as `extract` reads them), but a
/// `;`-separated piece that names a token parameter (`a=1;token=X`) is removed too: some upstream
/// frameworks split on `;`, and the token must reach neither them nor the access log. `extract`
/// does not read such a token, so the request has none.
pub fn strip_params(cfg: &TokenConfig, query: &str) -> Option<String> {
    let is_token_param = |piece: &str| {
        let key = piece.split_once('=').map_or(piece, |(k, _)| k);
        let key = decode_component(key, true).unwrap_or_default();
        cfg.query_params.iter().chain(&cfg.ticket_params).any(|p| p.as_bytes() == key.as_slice())
    };
    let kept: Vec<String> = query
        .split('&')
        .filter(|pair| !is_token_param(pair))
        .map(|pair| pair.split(';').filter(|piece| !is_token_param(piece)).collect::<Vec<_>>().join(";"))
        .filter(|pair| !pair.is_empty())
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn cfg() -> TokenConfig {
        TokenConfig {
            query_params: vec!["token".into(), "access_token".into()],
            ticket_params: vec!["ticket".into()],
            cookie: "revenprox_token".into(),
            strip_from_upstream: true,
            forward_to_upstream: false,
        }
    }

    fn parts<'a>(auth: Option<&'a str>, query: Option<&'a str>, cookie: Option<&'a str>) -> RequestParts<'a> {
        RequestParts { authorization: auth.map(str::as_bytes), cookie: cookie.map(str::as_bytes), query }
    }

    fn get(auth: Option<&str>, query: Option<&str>, cookie: Option<&str>) -> Result<Credential, TokenError> {
        extract(&cfg(), &parts(auth, query, cookie))
    }

    #[test]
    fn strip_cookie_keeps_the_others() {
        let s =
            |h: &str| strip_cookie(h.as_bytes(), "revenprox_token").map(|v| String::from_utf8(v).unwrap());
        assert_eq!(s("a=1; revenprox_token=x; b=2").as_deref(), Some("a=1; b=2"));
        assert_eq!(s("revenprox_token=x").as_deref(), None);
        assert_eq!(s(" revenprox_token = x ;revenprox_tokenx=y").as_deref(), Some("revenprox_tokenx=y"));
        assert_eq!(s("a=1;revenprox_token=x;revenprox_token=y").as_deref(), Some("a=1"));
        assert_eq!(
            s("a=\"q;r\"").as_deref(),
            Some("a=\"q; r\""),
            "a quoted ';' is split like any cookie parser would"
        );
        assert_eq!(strip_cookie(b"x=\xff; revenprox_token=t", "revenprox_token"), Some(b"x=\xff".to_vec()));
    }

    #[test]
    fn bearer_header_any_case() {
        for h in ["Bearer a.b.c", "bearer a.b.c", "BEARER   a.b.c", " Bearer a.b.c "] {
            let c = get(Some(h), None, None).unwrap();
            assert_eq!((c.value.as_str(), c.kind, c.channel), ("a.b.c", Kind::Jwt, Channel::Header), "{h}");
        }
    }

    #[test]
    fn malformed_authorization() {
        for h in ["Basic dXNlcjpw", "Bearer", "Bearer ", "a.b.c", "Bearer a b", ""] {
            assert_eq!(get(Some(h), Some("token=x"), None), Err(TokenError::MalformedAuthorization), "{h:?}");
        }
        assert_eq!(
            extract(&cfg(), &RequestParts { authorization: Some(&[0xff, 0x20]), cookie: None, query: None }),
            Err(TokenError::MalformedAuthorization)
        );
    }

    #[test]
    fn precedence_header_query_ticket_cookie() {
        let c = get(Some("Bearer h"), Some("token=q&ticket=t"), Some("revenprox_token=c")).unwrap();
        assert_eq!(c.value, "h");
        let c = get(None, Some("access_token=q2&token=q1&ticket=t"), Some("revenprox_token=c")).unwrap();
        assert_eq!((c.value.as_str(), c.channel), ("q1", Channel::Query));
        let c = get(None, Some("access_token=q2&ticket=t"), Some("revenprox_token=c")).unwrap();
        assert_eq!(c.value, "q2");
        let c = get(None, Some("ticket=t"), Some("revenprox_token=c")).unwrap();
        assert_eq!((c.value.as_str(), c.kind), ("t", Kind::Ticket));
        let c = get(None, Some("x=1"), Some("a=b; revenprox_token=c; d=e")).unwrap();
        assert_eq!((c.value.as_str(), c.channel), ("c", Channel::Cookie));
        assert_eq!(get(None, Some("x=1"), Some("a=b")), Err(TokenError::Missing));
        assert_eq!(get(None, None, None), Err(TokenError::Missing));
    }

    #[test]
    fn query_values_are_decoded_and_empty_ones_skipped() {
        assert_eq!(get(None, Some("token=&access_token=a%2Eb"), None).unwrap().value, "a.b");
        assert_eq!(get(None, Some("to%6Ben=x"), None).unwrap().value, "x");
        assert_eq!(get(None, Some("tokens=x"), None), Err(TokenError::Missing));
        assert_eq!(get(None, Some("token=%zz"), None), Err(TokenError::Missing));
    }

    #[test]
    fn unusable_tokens() {
        assert_eq!(get(None, Some("token=a%22b"), None), Err(TokenError::Unusable));
        assert_eq!(get(None, Some("token=a%0d%0ab"), None), Err(TokenError::Unusable));
        let long = format!("token={}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(get(None, Some(&long), None), Err(TokenError::Unusable));
    }

    #[test]
    fn empty_quoted_cookie_is_no_token() {
        // Found by fuzz/fuzz_targets/token.rs: `revenprox_token=""` gave an empty credential.
        for cookie in [r#"revenprox_token="""#, r#"revenprox_token=""#, r#"a=1; revenprox_token="""""#] {
            assert_eq!(get(None, None, Some(cookie)), Err(TokenError::Missing), "{cookie}");
        }
        let c = get(None, None, Some(r#"revenprox_token=""; revenprox_token="t""#)).unwrap();
        assert_eq!((c.value.as_str(), c.channel), ("t", Channel::Cookie));
    }

    #[test]
    fn cookie_channel_can_be_off() {
        let mut c = cfg();
        c.cookie = String::new();
        assert_eq!(extract(&c, &parts(None, None, Some("=x"))), Err(TokenError::Missing));
    }

    #[test]
    fn strip_keeps_other_params_in_order() {
        let c = cfg();
        assert_eq!(strip_params(&c, "a=1&token=X&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(strip_params(&c, "token=X&access_token=Y&ticket=Z").as_deref(), None);
        assert_eq!(strip_params(&c, "a=%20&to%6Ben=X").as_deref(), Some("a=%20"));
        assert_eq!(strip_params(&c, "tokenx=1").as_deref(), Some("tokenx=1"));
    }

    #[test]
    fn semicolon_separated_token_params_are_stripped_but_not_read() {
        let c = cfg();
        assert_eq!(strip_params(&c, "a=1;token=X").as_deref(), Some("a=1"));
        assert_eq!(strip_params(&c, "a=1;ticket=T;b=2&c=3").as_deref(), Some("a=1;b=2&c=3"));
        assert_eq!(strip_params(&c, "token=X;a=1&b=2").as_deref(), Some("b=2"));
        assert_eq!(strip_params(&c, ";access_token=Y").as_deref(), None);
        assert_eq!(strip_params(&c, "a=1;;b=2").as_deref(), Some("a=1;;b=2"));
        // `&` separates parameters: after `a=1;` there is no `token` parameter to read.
        assert_eq!(get(None, Some("a=1;token=e30.e30.c2ln"), None), Err(TokenError::Missing));
    }
}
