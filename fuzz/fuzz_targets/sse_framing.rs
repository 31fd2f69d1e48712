//! `sse::framing` (event-boundary tracker) over arbitrary upstream bytes in arbitrary chunkings,
//! injecting `": heartbeat\n\n"` (or a complete event) wherever the host may: at the offset `feed`
//! reports, at a chunk's start when the stream was at a boundary before it, and after the last chunk
//! when `at_boundary()`.
//!
//! Properties: no panic; every reported offset and `at_boundary()` agree with a reference WHATWG
//! line splitter; the upstream bytes pass unchanged and in order (removing the injections gives the
//! original stream back); a reference event-stream parser decodes exactly the original events (an
//! injected event only adds itself, a heartbeat only adds a comment), so no injection ever lands
//! inside an upstream event.
#![no_main]

use arbitrary::Arbitrary;
use fuzz_support::reference::{sse_boundaries, sse_decode};
use libfuzzer_sys::fuzz_target;
use revenprox::sse::framing::{splice, Framing};

const HEARTBEAT: &[u8] = b": heartbeat\n\n";
const EVENT: &[u8] = b"event: injected\ndata: {}\n\n";

#[derive(Arbitrary, Debug)]
enum Bytes {
    Raw(Vec<u8>),
    /// Indices into an SSE-flavoured alphabet, so that line ends and fields are frequent.
    Sse(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    bytes: Bytes,
    cuts: Vec<u8>,
    event: bool,
}

const PIECES: [&[u8]; 12] = [
    b"\n",
    b"\r",
    b"\r\n",
    b"data: a",
    b"data",
    b":",
    b": c",
    b"id: 1",
    b"event: e",
    b"x",
    b"\xef\xbb\xbf",
    b"\n\n",
];

fuzz_target!(|input: Input| {
    let s: Vec<u8> = match input.bytes {
        Bytes::Raw(b) => b,
        Bytes::Sse(ix) => {
            ix.iter().flat_map(|i| PIECES[usize::from(*i) % PIECES.len()].iter().copied()).collect()
        }
    };
    let inject = if input.event { EVENT } else { HEARTBEAT };
    let bounds = sse_boundaries(&s);
    let bom = s.starts_with(b"\xef\xbb\xbf");

    // Chunk lengths from the fuzzer (0 allowed: Envoy may deliver empty chunks), cycling.
    let mut lens = Vec::new();
    let (mut total, mut i) = (0usize, 0usize);
    while total < s.len() {
        let len = if input.cuts.is_empty() { s.len() } else { usize::from(input.cuts[i % input.cuts.len()]) };
        let len = len.min(s.len() - total);
        lens.push(len);
        total += len;
        i += 1;
        if i > 4 * s.len() + 16 {
            lens.push(s.len() - total);
            total = s.len();
        }
    }

    let mut f = Framing::new();
    let (mut out, mut mask, mut pos, mut n) = (Vec::new(), Vec::new(), 0usize, 0usize);
    let push = |out: &mut Vec<u8>, mask: &mut Vec<bool>, bytes: &[u8], ours: bool| {
        out.extend_from_slice(bytes);
        mask.extend(std::iter::repeat(ours).take(bytes.len()));
    };
    for &len in &lens {
        let (start, end) = (pos, pos + len);
        let chunk = &s[start..end];
        let before = f.at_boundary();
        let got = f.feed(chunk);
        // The last boundary this chunk confirms: inside it (not right after a CR at its end), or its
        // start when that follows a CR of a blank line.
        let inside =
            bounds.iter().copied().filter(|&b| start < b && b <= end && !(b == end && s[b - 1] == b'\r'));
        let at_start =
            (start > 0 && end > start && s[start - 1] == b'\r' && bounds.contains(&start)).then_some(start);
        let want = inside.chain(at_start).max().map(|b| b - start);
        assert_eq!(got, want, "chunk {start}..{end} of {:?}", String::from_utf8_lossy(&s));
        let reference_at = end == 0 || (s[end - 1] != b'\r' && bounds.contains(&end));
        assert_eq!(f.at_boundary(), reference_at, "after {end} of {:?}", String::from_utf8_lossy(&s));

        // Inject where the host may, tracking which output bytes are ours.
        let mut at = Vec::new();
        if before && !chunk.is_empty() && !(start == 0 && bom) {
            at.push(0);
        }
        if let Some(o) = got {
            at.push(o);
        }
        let mut c = chunk.to_vec();
        let mut m = vec![false; chunk.len()];
        for o in at.into_iter().rev() {
            c = splice(&c, o, inject);
            let mut mm = m[..o].to_vec();
            mm.extend(std::iter::repeat(true).take(inject.len()));
            mm.extend_from_slice(&m[o..]);
            m = mm;
            n += 1;
        }
        assert_eq!(c.len(), m.len());
        out.extend_from_slice(&c);
        mask.extend(m);
        pos = end;
    }
    assert_eq!(pos, s.len());
    if f.at_boundary() {
        push(&mut out, &mut mask, inject, true);
        n += 1;
    }

    // Upstream bytes unchanged and in order.
    let upstream: Vec<u8> = out.iter().zip(&mask).filter(|(_, ours)| !**ours).map(|(b, _)| *b).collect();
    assert_eq!(upstream, s);

    // A reference parser sees the original events, plus only ours.
    let (original, original_comments) = sse_decode(&s);
    let (decoded, comments) = sse_decode(&out);
    let theirs: Vec<_> = decoded.iter().filter(|e| e.kind != b"injected").cloned().collect();
    assert_eq!(theirs, original, "{:?}", String::from_utf8_lossy(&out));
    let ours = decoded.len() - theirs.len();
    if input.event {
        assert_eq!(ours, n);
        assert!(decoded.iter().filter(|e| e.kind == b"injected").all(|e| e.data == b"{}"));
        assert_eq!(comments, original_comments);
    } else {
        assert_eq!(ours, 0);
        let heartbeats = comments.iter().filter(|c| c.as_slice() == b": heartbeat").count();
        let before = original_comments.iter().filter(|c| c.as_slice() == b": heartbeat").count();
        assert_eq!(heartbeats, before + n, "a heartbeat was swallowed by an upstream line");
    }
});
