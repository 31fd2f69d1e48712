//! How a lenient upstream might read a request path, so that the filter decides on every reading
//! an upstream could act on, not only on the bytes it was sent.
//!
//! One *reading* decodes what lenient servers decode: `%XX` escapes (invalid ones are kept), IIS's
//! `%uXXXX`, UTF-8 including overlong forms (`%c0%ae` is a dot to some decoders), Unicode
//! compatibility forms (NFKC, from Unicode data: `auth::nfkc`; U+2025 is `..`, U+FF3C is `\`,
//! U+FF45 is `e`), and `\` as `/`. Servers decode once, twice or more: up to `ROUNDS` readings are
//! considered. A path is judged on the raw bytes and on every reading.

use super::nfkc;

/// Readings considered after the raw path (`%25252e` is a dot after three).
pub const ROUNDS: usize = 3;

fn hex(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// The code point of a `%uXXXX` escape at the start of `bytes`.
fn percent_u(bytes: &[u8]) -> Option<char> {
    let digits = bytes.get(2..6)?;
    if bytes.get(..2)? != b"%u" && bytes.get(..2)? != b"%U" {
        return None;
    }
    let cp = digits.iter().try_fold(0u32, |acc, b| Some(acc * 16 + hex(*b)?))?;
    char::from_u32(cp)
}

/// Percent-decodes `%XX` and `%uXXXX` escapes, keeping everything else (invalid escapes included).
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            if let Some(c) = percent_u(bytes.get(i..).unwrap_or_default()) {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 6;
                continue;
            }
            let escape = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex));
            if let (Some(hi), Some(lo)) = escape {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'%'));
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

/// The code point of a (possibly overlong) UTF-8 sequence at the start of `bytes`, and its length.
fn lenient_utf8(bytes: &[u8]) -> Option<(char, usize)> {
    let lead = *bytes.first()?;
    let (len, init) = match lead {
        0xc0..=0xdf => (2, u32::from(lead & 0x1f)),
        0xe0..=0xef => (3, u32::from(lead & 0x0f)),
        0xf0..=0xf7 => (4, u32::from(lead & 0x07)),
        _ => return None,
    };
    let cont = bytes.get(1..len)?;
    if !cont.iter().all(|b| b & 0xc0 == 0x80) {
        return None;
    }
    let cp = cont.iter().fold(init, |acc, b| (acc << 6) | u32::from(b & 0x3f));
    Some((char::from_u32(cp)?, len))
}

/// One lenient reading of `bytes` (see the module documentation).
pub fn read_once(bytes: &[u8]) -> Vec<u8> {
    let decoded = percent_decode(bytes);
    let mut out = Vec::with_capacity(decoded.len());
    let mut i = 0;
    while let Some(&b) = decoded.get(i) {
        if b < 0x80 {
            out.push(if b == b'\\' { b'/' } else { b });
            i += 1;
            continue;
        }
        match lenient_utf8(decoded.get(i..).unwrap_or_default()) {
            Some((c, len)) => {
                let mut buf = [0u8; 4];
                let folded = if c.is_ascii() { None } else { nfkc::ascii_folding(c) };
                let text = folded.unwrap_or_else(|| c.encode_utf8(&mut buf));
                out.extend(text.bytes().map(|b| if b == b'\\' { b'/' } else { b }));
                i += len;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// The raw bytes, then each further reading while it still changes something (at most `ROUNDS`).
pub fn readings(raw: &[u8]) -> Vec<Vec<u8>> {
    let mut all = vec![raw.to_vec()];
    let mut current = raw.to_vec();
    for _ in 0..ROUNDS {
        // Plain ASCII without escapes or backslashes reads as itself.
        if current.iter().all(|b| b.is_ascii() && *b != b'%' && *b != b'\\') {
            break;
        }
        let next = read_once(&current);
        if next == current {
            break;
        }
        all.push(next.clone());
        current = next;
    }
    all
}

/// True when one of the `/`-separated pieces of `bytes` (its `;` parameters dropped) is `.` or
/// `..`.
pub fn has_dot_piece(bytes: &[u8]) -> bool {
    bytes.split(|b| *b == b'/').any(|piece| {
        let name = piece.split(|b| *b == b';').next().unwrap_or_default();
        name == b"." || name == b".."
    })
}

/// True when any reading of `rest` holds a `.` or `..` segment: an upstream that normalizes the
/// path would then serve another resource than the one the raw path seems to name.
pub fn has_dot_segment(rest: &str) -> bool {
    readings(rest.as_bytes()).iter().any(|r| has_dot_piece(r))
}

/// RFC 3986 section 5.2.4 (`remove_dot_segments`), on bytes.
fn remove_dot_segments(input: &[u8]) -> Vec<u8> {
    let mut input = input;
    let mut output: Vec<u8> = Vec::with_capacity(input.len());
    let pop_last = |output: &mut Vec<u8>| {
        let cut = output.iter().rposition(|b| *b == b'/').unwrap_or(0);
        output.truncate(cut);
    };
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix(b"../") {
            input = rest;
        } else if let Some(rest) = input.strip_prefix(b"./") {
            input = rest;
        } else if input.starts_with(b"/./") {
            input = input.get(2..).unwrap_or_default();
        } else if input == b"/." {
            input = b"/";
        } else if input.starts_with(b"/../") {
            input = input.get(3..).unwrap_or_default();
            pop_last(&mut output);
        } else if input == b"/.." {
            input = b"/";
            pop_last(&mut output);
        } else if input == b"." || input == b".." {
            input = b"";
        } else {
            // The first segment, with its leading `/` if any, up to the next `/`.
            let start = usize::from(input.first() == Some(&b'/'));
            let end = input
                .get(start..)
                .and_then(|r| r.iter().position(|b| *b == b'/'))
                .map_or(input.len(), |p| p + start);
            output.extend_from_slice(input.get(..end).unwrap_or_default());
            input = input.get(end..).unwrap_or_default();
        }
    }
    output
}

/// A reading resolved as an upstream might route it: ASCII lowercased, with or without `;`
/// parameters dropped from each segment and slashes merged (upstreams differ on both, and each
/// choice changes which segment a `..` removes), then dot segments removed (RFC 3986 5.2.4).
fn resolve(reading: &[u8], merge_slashes: bool, drop_params: bool) -> Vec<u8> {
    let mut s = reading.to_ascii_lowercase();
    if drop_params {
        let pieces: Vec<&[u8]> =
            s.split(|b| *b == b'/').map(|p| p.split(|b| *b == b';').next().unwrap_or_default()).collect();
        s = pieces.join(&b'/');
    }
    if merge_slashes {
        s.dedup_by(|a, b| *a == b'/' && *b == b'/');
    }
    remove_dot_segments(&s)
}

/// Whether some upstream might serve `path` (query removed) as something at or under `prefix`: a
/// topic path in disguise, such as `//events/news`, `/%65vents/news`, `/EVENTS/news`,
/// `/x/../events/news` or `/%EF%BD%85vents/news`. `/events/` covers every path that starts with
/// `/events` (`/eventsfoo` too: an upstream routing on a bare prefix would take it for a topic).
/// Every reading is resolved every way an upstream might (slashes merged or not, `;` parameters
/// dropped or not); one of them under the prefix is enough.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    let base = resolve(prefix.as_bytes(), true, false);
    let base = base.strip_suffix(b"/").unwrap_or(&base);
    if base.is_empty() {
        return true;
    }
    readings(path.as_bytes()).iter().any(|r| {
        [(true, true), (true, false), (false, true), (false, false)]
            .iter()
            .any(|&(merge, params)| resolve(r, merge, params).starts_with(base))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn readings_decode_what_lenient_servers_decode() {
        let r = |s: &str| String::from_utf8_lossy(&read_once(s.as_bytes())).to_string();
        assert_eq!(r("%2e%2E"), "..");
        assert_eq!(r("%u002e%U002E"), "..");
        assert_eq!(r("%c0%ae%e0%80%ae"), "..");
        assert_eq!(r("\u{2025}"), "..");
        assert_eq!(r("%E2%80%A5"), "..");
        assert_eq!(r("\u{fe30}\u{fe52}"), "...");
        assert_eq!(r("a\\b\u{fe68}c\u{ff3c}d"), "a/b/c/d");
        assert_eq!(r("%EF%BD%85vents"), "events");
        assert_eq!(r("caf%C3%A9"), "café", "letters without an ASCII form stay");
        assert_eq!(r("%zz%4"), "%zz%4", "invalid escapes stay");
        assert_eq!(read_once(b"%ff%c0"), vec![0xff, 0xc0], "bytes that are no UTF-8 stay");
    }

    #[test]
    fn dot_segments_in_every_reading() {
        for rest in [
            "news/../secret",
            "news/%2e%2e/secret",
            "news/%252e%252e/secret",
            "news/%25252e%25252e/secret",
            "news/%u002e%u002e/secret",
            "news/%c0%ae%c0%ae/secret",
            "news/\u{2025}/sports",
            "news/%E2%80%A5/sports",
            "news/%EF%B8%B0/x",
            "news/%EF%B9%92%EF%B9%92/x",
            "news/..%EF%B9%A8x",
            "news/..%EF%BC%BCx",
            "news/..;x/secret",
            "news/.",
            "news\\..\\secret",
        ] {
            assert!(has_dot_segment(rest), "{rest}");
        }
        for rest in ["news", "news/a.b", "news/...x", "news/%2e%2e%2e", "caf%C3%A9", "a%zz"] {
            assert!(!has_dot_segment(rest), "{rest}");
        }
    }

    #[test]
    fn rfc3986_dot_removal() {
        let r = |s: &str| String::from_utf8(remove_dot_segments(s.as_bytes())).unwrap();
        assert_eq!(r("/a/b/c/./../../g"), "/a/g");
        assert_eq!(r("mid/content=5/../6"), "mid/6");
        assert_eq!(r("././/events//.."), "/events/");
        assert_eq!(r("/.."), "/");
        assert_eq!(r("../x"), "x");
    }

    #[test]
    fn disguised_prefixes() {
        for path in [
            "/events",
            "/eventsfoo",
            "/Events-archive/x",
            "/events/news",
            "//events/news",
            "/%65vents/news",
            "/EVENTS/news",
            "/Events/news",
            "/x/../events/news",
            "/./events/news",
            "/events;x/news",
            "/%EF%BD%85vents/news",
            "/\u{ff45}vents/news",
            "/%u0065vents/news",
            "/%2565vents/news",
            "\\events\\news",
            "/events%2fnews",
            "/events/;x/..;y/../z",
            "/events//..",
            ";x/events/news",
            ".%5C;;x/events/;y/..;z",
        ] {
            assert!(under_prefix(path, "/events/"), "{path}");
        }
        for path in ["/", "/healthz", "/api/events/news", "/event/news", "/static/app.js", "/even"] {
            assert!(!under_prefix(path, "/events/"), "{path}");
        }
        assert!(under_prefix("/anything", "/"));
        assert!(under_prefix("/SSE/V1/x", "/sse/v1/"));
    }
}
