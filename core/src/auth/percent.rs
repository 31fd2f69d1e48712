//! Percent-decoding of URL path segments and query components.

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and, for query components, `+` as a space, as browsers' `URLSearchParams`
/// encode it). `None` when an escape is truncated or not hex: such input is refused, not guessed.
pub fn decode_component(input: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = hex_value(bytes.next()?)?;
                let lo = hex_value(bytes.next()?)?;
                out.push(hi << 4 | lo);
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(b),
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes() {
        assert_eq!(decode_component("caf%C3%A9", false).unwrap(), "café".as_bytes());
        assert_eq!(decode_component("a+b", true).unwrap(), b"a b");
        assert_eq!(decode_component("a+b", false).unwrap(), b"a+b");
        assert_eq!(decode_component("%2f%2F", false).unwrap(), b"//");
    }

    #[test]
    fn refuses_bad_escapes() {
        for bad in ["%", "%4", "%zz", "a%g1"] {
            assert_eq!(decode_component(bad, false), None, "{bad}");
        }
    }
}
