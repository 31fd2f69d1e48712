//! Topic id: which topic a request path names, as the 32-hex id the webhook receives.
//!
//! The topic is the first path segment after `topic.path_prefix`. Its id is the segment itself,
//! lowercased, when it already is 32 hex digits; otherwise the first 16 bytes of SHA-256 of the
//! percent-decoded segment, hex-encoded. Example: `/events/news` → SHA-256("news")[..16] =
//! `19fba0e995b9794fc2c26217bf3b725c`.

use super::canonical::has_dot_segment;
use super::percent::decode_component;
use sha2::{Digest, Sha256};

/// Longest topic segment accepted (bytes, before decoding).
pub const MAX_SEGMENT_LEN: usize = 1024;

/// The raw topic segment of `path` (query already removed), or `None` when the path names none,
/// including when any segment after the prefix is a dot segment in some reading of it (see
/// `canonical::has_dot_segment`): `/events/news/../secret` would be authorized as `news` while an
/// upstream that normalizes the path serves `/events/secret`.
pub fn segment<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    if has_dot_segment(rest) {
        return None;
    }
    let seg = rest.split('/').next().unwrap_or_default();
    (!seg.is_empty() && seg.len() <= MAX_SEGMENT_LEN).then_some(seg)
}

/// The 32-hex topic id of a raw segment, or `None` when it holds an invalid percent escape.
pub fn id(segment: &str) -> Option<String> {
    if segment.len() == 32 && segment.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(segment.to_ascii_lowercase());
    }
    let decoded = decode_component(segment, false)?;
    let digest = Sha256::digest(&decoded);
    Some(hex::encode(digest.get(..16)?))
}

/// The topic ids of recent segments: a worker sees few topics, each very often, and `id` of a
/// segment seen before costs a map lookup instead of a SHA-256. Bounded: at most `Ids::MAX`
/// segments of at most `Ids::MAX_LEN` bytes, forgotten all at once when full.
#[derive(Debug, Default)]
pub struct Ids {
    map: std::collections::HashMap<String, Option<String>>,
    #[cfg(test)]
    computed: u32,
}

impl Ids {
    pub const MAX: usize = 256;
    pub const MAX_LEN: usize = 128;

    /// `id(segment)`.
    pub fn id(&mut self, segment: &str) -> Option<String> {
        if let Some(known) = self.map.get(segment) {
            return known.clone();
        }
        #[cfg(test)]
        {
            self.computed += 1;
        }
        let id = id(segment);
        if segment.len() <= Self::MAX_LEN {
            if self.map.len() >= Self::MAX {
                self.map.clear();
            }
            self.map.insert(segment.to_string(), id.clone());
        }
        id
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn ids_answer_like_id_and_stay_bounded() {
        let mut ids = Ids::default();
        let long = "x".repeat(Ids::MAX_LEN + 1);
        let segments = ["news", "News", "a%20b", "bad%zz", "0123456789ABCDEF0123456789abcdef", &long];
        for _ in 0..3 {
            for seg in segments {
                assert_eq!(ids.id(seg), id(seg), "{seg}");
            }
        }
        // Each short segment computed once; the long one every time.
        assert_eq!(ids.computed, 5 + 3);
        for n in 0..1_000 {
            let seg = format!("t{n}");
            assert_eq!(ids.id(&seg), id(&seg));
            assert!(ids.map.len() <= Ids::MAX);
        }
    }

    #[test]
    fn segment_after_prefix() {
        assert_eq!(segment("/events/news", "/events/"), Some("news"));
        assert_eq!(segment("/events/news/more", "/events/"), Some("news"));
        assert_eq!(segment("/events/", "/events/"), None);
        assert_eq!(segment("/events//x", "/events/"), None);
        assert_eq!(segment("/events", "/events/"), None);
        assert_eq!(segment("/other/news", "/events/"), None);
        assert_eq!(segment("/a/b/c", "/a/b/"), Some("c"));
        let long = format!("/events/{}", "a".repeat(MAX_SEGMENT_LEN + 1));
        assert_eq!(segment(&long, "/events/"), None);
    }

    #[test]
    fn dot_segments_name_no_topic() {
        // Found by fuzz/fuzz_targets/topic.rs: `/events/news/../secret` was authorized as topic
        // `news`, while an upstream that normalizes the path serves `/events/secret`.
        for path in [
            "/events/news/../secret",
            "/events/news/..",
            "/events/..",
            "/events/.",
            "/events/./secret",
            "/events/news/%2e%2E/secret",
            "/events/news/..%2fsecret",
            "/events/news%2F..%2F..%2Fadmin",
            "/events/news/..\\secret",
            "/events/news/..;x/secret",
            "/events/news/sub/./x",
            // Found by fuzz/fuzz_targets/gate.rs: an invalid escape in the same segment hid the
            // encoded dots from a strict decoder.
            "/events/news/%zz\\%2e%2e\\secret",
            "/events/news/%2e%2e%2f%zz",
            // Double and triple encoding, for upstreams that decode more than once.
            "/events/news/%252e%252e/secret",
            "/events/news/%25252e%25252E/secret",
            "/events/news/..%252fsecret",
            // Overlong UTF-8 and Unicode look-alikes of `.` and `/`.
            "/events/news/%c0%ae%c0%ae/secret",
            "/events/news/%e0%80%ae%e0%80%ae/secret",
            "/events/news/%ef%bc%8e%ef%bc%8e/secret",
            "/events/news/%e2%80%a4%e2%80%a4/secret",
            "/events/news/..%c0%afsecret",
            "/events/news/..%ef%bc%8fsecret",
            "/events/news/\u{ff0e}\u{ff0e}/secret",
        ] {
            assert_eq!(segment(path, "/events/"), None, "{path}");
        }
        assert_eq!(segment("/.", "/"), None);
        // Dots inside names are fine.
        assert_eq!(segment("/events/a..b/x.y/...", "/events/"), Some("a..b"));
        assert_eq!(segment("/events/.hidden", "/events/"), Some(".hidden"));
        assert_eq!(segment("/events/news/%zz", "/events/"), Some("news"));
        assert_eq!(segment("/events/news/%2e%2e%zz", "/events/"), Some("news"));
        assert_eq!(segment("/events/news/%25%25%25%25", "/events/"), Some("news"));
        assert_eq!(segment("/events/news/%c0%ae%c0%aex", "/events/"), Some("news"));
    }

    #[test]
    fn hex_segment_is_its_own_id() {
        assert_eq!(id("A1B2C3D4E5F67890ABCDEF1234567890").unwrap(), "a1b2c3d4e5f67890abcdef1234567890");
    }

    #[test]
    fn names_are_hashed_after_decoding() {
        // The README's worked example.
        let news = id("news").unwrap();
        assert_eq!(news, "19fba0e995b9794fc2c26217bf3b725c");
        assert_eq!(id("caf%C3%A9").unwrap(), "850f7dc43910ff890f8879c0ed26fe69");
        assert_eq!(news, hex::encode(&Sha256::digest(b"news")[..16]));
        assert_eq!(id("caf%C3%A9").unwrap(), hex::encode(&Sha256::digest("café".as_bytes())[..16]));
        assert_eq!(id("n%65ws").unwrap(), news);
        // 31 or 33 hex digits are names, not ids.
        assert_ne!(id(&"a".repeat(31)).unwrap(), "a".repeat(31));
    }

    #[test]
    fn invalid_escape_is_no_topic() {
        assert_eq!(id("bad%zz"), None);
    }
}
