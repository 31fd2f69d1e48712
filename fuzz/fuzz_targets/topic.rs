//! `auth::topic::{segment, id}` and `auth::percent::decode_component` on arbitrary paths.
//!
//! Properties: no panic; the segment is the non-empty first segment after the prefix, at most
//! MAX_SEGMENT_LEN bytes; the id is 32 lowercase hex digits and equals the README's reference
//! (`None` exactly when the segment has an invalid escape); percent-decoding agrees with a reference
//! decoder and inverts percent-encoding; and the topic the filter authorizes is the topic an
//! upstream that normalizes the path (dot segments, encoded dots and slashes, backslashes, merged
//! slashes) would serve.
#![no_main]

use arbitrary::Arbitrary;
use fuzz_support::{assert_topic_is_served, reference, PREFIXES};
use libfuzzer_sys::fuzz_target;
use revenprox::auth::percent::decode_component;
use revenprox::auth::topic::{self, MAX_SEGMENT_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    prefix: u8,
    path: String,
    plus_is_space: bool,
    raw: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let prefix = PREFIXES[usize::from(input.prefix) % PREFIXES.len()];
    let path = input.path.split('?').next().unwrap_or_default();

    // Percent-decoding.
    assert_eq!(
        decode_component(&input.path, input.plus_is_space),
        reference::percent_decode(input.path.as_bytes(), input.plus_is_space)
    );
    let encoded = reference::percent_encode(&input.raw);
    assert_eq!(decode_component(&encoded, input.plus_is_space).as_deref(), Some(input.raw.as_slice()));

    let Some(seg) = topic::segment(path, prefix) else {
        return;
    };
    assert!(!seg.is_empty() && seg.len() <= MAX_SEGMENT_LEN && !seg.contains('/'));
    let rest = path.strip_prefix(prefix).unwrap_or_else(|| panic!("segment outside the prefix"));
    assert!(rest == seg || rest.starts_with(&format!("{seg}/")), "{path:?} -> {seg:?}");

    let id = topic::id(seg);
    assert_eq!(id, reference::topic_id(seg), "{seg:?}");
    // A worker's cache of ids answers the same, the first time and after.
    let mut ids = topic::Ids::default();
    assert_eq!(ids.id(seg), id);
    assert_eq!(ids.id(seg), id);
    if let Some(id) = &id {
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    // What an upstream that normalizes the path serves must be the topic that was authorized.
    assert_topic_is_served(prefix, seg, path);
});
