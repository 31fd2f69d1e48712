//! Event boundaries of an upstream SSE stream that arrives in arbitrary chunks.
//!
//! The filter injects its own events and comments (heartbeat, challenge, expired) only between
//! upstream events, never inside one that is split across body chunks. `Framing` watches the
//! upstream bytes go by (it never changes or keeps them) and says where such a gap is.
//!
//! SSE (WHATWG HTML, "Interpreting an event stream"): a line ends with CRLF, LF or CR; an event
//! ends at a blank line. An *event boundary* is the start of the stream, or the position right after
//! the line terminator of a blank line: there the parser is at the start of a line with an empty
//! event buffer, so a complete comment or event placed there changes nothing upstream sent. Comment
//! lines (`: x`) and field lines belong to the event they are in; a blank line after only comments
//! is a boundary like any other. A UTF-8 BOM is just bytes of the first line.
//!
//! CR and CRLF. After a CR the next byte decides what the terminator was: an LF right after it is
//! part of the same CRLF. So the position between a CR and a possible LF is never reported:
//! - a chunk ending in the CR of a blank line leaves `at_boundary()` false (the LF may come next);
//! - if the next chunk starts with LF, the boundary is after that LF (offset 1);
//! - if it starts with anything else, the boundary was the end of the previous chunk, which is
//!   offset 0 of this one: `feed` reports `Some(0)` when no later boundary completes in the chunk.
//!   Injecting at offset 0 (before the chunk's first byte) is the same stream position.
//!
//! The consequence: an upstream that ends its events with CR alone gets its boundary confirmed only
//! when its next byte arrives, so nothing is injected into such a stream while it is idle.
//! Upstreams using LF or CRLF (nearly all) are not affected.
//!
//! Caveat for the start of the stream: `at_boundary()` is true before anything was fed, but if the
//! upstream's first chunk starts with a UTF-8 BOM, bytes prepended at offset 0 push the BOM into the
//! middle of the stream, where a client no longer strips it and reads it as part of the first
//! field name. Only a host that injects before the first upstream byte needs to care.

/// Where the stream fed so far stands, in terms of lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line, and the last line was blank (or nothing was fed): a boundary.
    Boundary,
    /// At the start of a line after a non-blank line (LF or CRLF terminated).
    LineStart,
    /// Inside a line.
    InLine,
    /// Right after a CR that ended a non-blank line; an LF now would be part of it.
    Cr,
    /// Right after a CR that ended a blank line: a boundary, unless an LF follows (then the boundary
    /// is after that LF).
    BlankCr,
}

/// Tracks event boundaries over the chunks of one upstream SSE body. O(1) state; it keeps no
/// upstream bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    state: State,
}

impl Default for Framing {
    fn default() -> Self {
        Framing { state: State::Boundary }
    }
}

impl Framing {
    /// A tracker at the start of a stream, which is a boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Observes the next upstream chunk (the bytes go on unchanged; this only looks at them).
    ///
    /// Returns the offset within `chunk` just after the last event boundary confirmed by this chunk,
    /// or `None` if there is none. The offset is in `1..=chunk.len()`, except `Some(0)`: the
    /// previous chunk ended with the CR of a blank line, this chunk does not start with LF (so the
    /// boundary was exactly at its start), and no later boundary completes inside it.
    pub fn feed(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut last = None;
        let mut state = self.state;
        for (i, &byte) in chunk.iter().enumerate() {
            state = match (state, byte) {
                (State::BlankCr, b'\n') => {
                    last = Some(i + 1);
                    State::Boundary
                }
                (State::BlankCr, _) => {
                    // The CR was a terminator on its own: the boundary is right before this byte.
                    last = Some(i);
                    Self::line_start(byte, i, &mut last)
                }
                (State::Cr, b'\n') => State::LineStart,
                (State::Boundary | State::LineStart | State::Cr, _) => Self::line_start(byte, i, &mut last),
                (State::InLine, b'\n') => State::LineStart,
                (State::InLine, b'\r') => State::Cr,
                (State::InLine, _) => State::InLine,
            };
        }
        self.state = state;
        last
    }

    /// Observes a chunk of `chunk_len` bytes from its last bytes only (`tail`), when the caller
    /// needs no boundary offset (nothing waits to be injected). After any byte other than CR or
    /// LF the tracker is inside a line whatever came before, so the end state depends only on the
    /// chunk's trailing run of CR/LF bytes. Returns `false`, observing nothing, when `tail` is all
    /// CR/LF and shorter than the chunk: then the caller must `feed` the whole chunk.
    pub fn advance(&mut self, chunk_len: usize, tail: &[u8]) -> bool {
        if tail.len() >= chunk_len {
            self.feed(tail);
            return true;
        }
        let Some(last_text) = tail.iter().rposition(|b| *b != b'\r' && *b != b'\n') else {
            return false;
        };
        self.state = State::InLine;
        self.feed(tail.get(last_text + 1..).unwrap_or_default());
        true
    }

    /// Bytes went by unobserved (a chunk let through unread): assume the position least likely to
    /// be a boundary, inside a line, until later bytes tell. From there every boundary `feed`
    /// reports, and every `at_boundary()`, holds whatever the unobserved bytes were; a later
    /// chunk's text makes the state exact again.
    pub fn forget(&mut self) {
        self.state = State::InLine;
    }

    /// The byte at offset `i` starts a line: an LF or CR here ends a blank line.
    fn line_start(byte: u8, i: usize, last: &mut Option<usize>) -> State {
        match byte {
            b'\n' => {
                *last = Some(i + 1);
                State::Boundary
            }
            b'\r' => State::BlankCr,
            _ => State::InLine,
        }
    }

    /// True when everything fed so far ends exactly at an event boundary (or nothing was fed), so
    /// injected bytes may be appended now. False right after the CR of a blank line, since an LF
    /// may still follow it.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Boundary
    }
}

/// `chunk` with `insert` placed at byte offset `at` (clamped to the chunk's length).
pub fn splice(chunk: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
    let (head, tail) = chunk.split_at_checked(at).unwrap_or((chunk, &[]));
    let mut out = Vec::with_capacity(chunk.len().saturating_add(insert.len()));
    out.extend_from_slice(head);
    out.extend_from_slice(insert);
    out.extend_from_slice(tail);
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used)]
mod tests {
    use super::*;

    const HEARTBEAT: &[u8] = b": heartbeat\n\n";

    /// Feeds `chunks` in order; the result of each `feed` and `at_boundary()` after it.
    fn run(chunks: &[&[u8]]) -> Vec<(Option<usize>, bool)> {
        let mut f = Framing::new();
        chunks
            .iter()
            .map(|c| {
                let r = f.feed(c);
                (r, f.at_boundary())
            })
            .collect()
    }

    #[test]
    fn start_of_stream_is_a_boundary() {
        let f = Framing::new();
        assert!(f.at_boundary());
        assert_eq!(f, Framing::default());
        let mut f = Framing::new();
        assert_eq!(f.feed(b""), None);
        assert!(f.at_boundary());
    }

    #[test]
    fn whole_event_in_one_chunk() {
        assert_eq!(run(&[b"data: a\n\n"]), [(Some(9), true)]);
        assert_eq!(run(&[b"id: 1\nevent: x\ndata: a\ndata: b\n\n"]), [(Some(32), true)]);
    }

    #[test]
    fn event_split_inside_a_line_and_between_lines() {
        assert_eq!(
            run(&[b"da", b"ta: a", b"\n", b"\n"]),
            [(None, false), (None, false), (None, false), (Some(1), true)]
        );
        assert_eq!(
            run(&[b"data: a\n", b"data: b\n", b"\n"]),
            [(None, false), (None, false), (Some(1), true)]
        );
    }

    #[test]
    fn last_boundary_of_several_and_partial_tail() {
        // Boundaries after offsets 9 and 18; then an event starts and is not finished.
        assert_eq!(run(&[b"data: a\n\ndata: b\n\ndata: c"]), [(Some(18), false)]);
        assert_eq!(run(&[b"data: a\n\ndata: b\n\n"]), [(Some(18), true)]);
        // The first chunk finishes an event started earlier and starts the next.
        assert_eq!(run(&[b"data: a\n", b"\ndata: b\n"]), [(None, false), (Some(1), false)]);
    }

    #[test]
    fn lf_cr_and_crlf_line_endings() {
        assert_eq!(run(&[b"data: a\n\n"]), [(Some(9), true)]);
        assert_eq!(run(&[b"data: a\r\n\r\n"]), [(Some(11), true)]);
        // CR alone: the final CR's boundary is not confirmed until the next byte is seen.
        assert_eq!(run(&[b"data: a\r\rdata: b\r\r"]), [(Some(9), false)]);
        // Mixed: CR then LF-blank is one CRLF terminator, not a blank line.
        assert_eq!(run(&[b"data: a\r\n"]), [(None, false)]);
        assert_eq!(run(&[b"data: a\n\r\n"]), [(Some(10), true)]);
        assert_eq!(run(&[b"data: a\r\n\n"]), [(Some(10), true)]);
        assert_eq!(run(&[b"data: a\n\rx"]), [(Some(9), false)]);
    }

    #[test]
    fn crlf_split_across_chunks() {
        // The blank line's CR ends the chunk: not a boundary yet; the LF opens the next chunk.
        assert_eq!(run(&[b"data: a\r\n\r", b"\n"]), [(None, false), (Some(1), true)]);
        assert_eq!(run(&[b"data: a\r\n\r", b"\ndata: b\r\n"]), [(None, false), (Some(1), false)]);
        // A non-blank line's CR ends the chunk; its LF comes next, then the blank line.
        assert_eq!(run(&[b"data: a\r", b"\n\r\n"]), [(None, false), (Some(3), true)]);
        assert_eq!(
            run(&[b"data: a\r", b"\n", b"\r", b"\n"]),
            [(None, false), (None, false), (None, false), (Some(1), true)]
        );
    }

    #[test]
    fn lone_cr_confirmed_at_offset_zero_of_the_next_chunk() {
        assert_eq!(run(&[b"data: a\r\r", b"data: b\r"]), [(None, false), (Some(0), false)]);
        // A later boundary in the same chunk wins.
        assert_eq!(run(&[b"data: a\r\r", b"data: b\r\rx"]), [(None, false), (Some(9), false)]);
        // Empty chunks in between change nothing.
        assert_eq!(run(&[b"data: a\r\r", b"", b"x"]), [(None, false), (None, false), (Some(0), false)]);
        // A CR right after a lone blank-line CR is another blank line, also pending.
        assert_eq!(run(&[b"data: a\r\r", b"\r"]), [(None, false), (Some(0), false)]);
        assert_eq!(run(&[b"data: a\r\r", b"\r", b"\n"]), [(None, false), (Some(0), false), (Some(1), true)]);
    }

    #[test]
    fn comments_are_part_of_events() {
        assert_eq!(run(&[b": keep-alive\n"]), [(None, false)]);
        assert_eq!(run(&[b": keep-alive\n\n"]), [(Some(14), true)]);
        assert_eq!(run(&[b":\n", b"\n"]), [(None, false), (Some(1), true)]);
        assert_eq!(run(&[b"data: a\n: c\n", b"\n"]), [(None, false), (Some(1), true)]);
    }

    #[test]
    fn blank_lines_alone_are_boundaries() {
        assert_eq!(run(&[b"\n"]), [(Some(1), true)]);
        assert_eq!(run(&[b"\n\n\n"]), [(Some(3), true)]);
        assert_eq!(run(&[b"\r\n", b"\r"]), [(Some(2), true), (None, false)]);
    }

    #[test]
    fn bom_is_just_bytes_of_the_first_line() {
        let bom = "\u{feff}";
        assert_eq!(run(&[format!("{bom}data: a\n\n").as_bytes()]), [(Some(12), true)]);
        // Conservative: the BOM makes the first line non-blank for the tracker.
        assert_eq!(run(&[format!("{bom}\n").as_bytes()]), [(None, false)]);
    }

    #[test]
    fn boundary_tracking_does_not_depend_on_line_length() {
        let long = vec![b'x'; 100_000];
        let mut f = Framing::new();
        assert_eq!(f.feed(b"data: "), None);
        for _ in 0..10 {
            assert_eq!(f.feed(&long), None);
            assert!(!f.at_boundary());
        }
        assert_eq!(f.feed(b"\n\n"), Some(2));
        assert!(f.at_boundary());
    }

    #[test]
    fn splice_places_bytes_and_clamps() {
        assert_eq!(splice(b"abc", 0, b"X"), b"Xabc");
        assert_eq!(splice(b"abc", 1, b"X"), b"aXbc");
        assert_eq!(splice(b"abc", 3, b"X"), b"abcX");
        assert_eq!(splice(b"abc", 99, b"XY"), b"abcXY");
        assert_eq!(splice(b"abc", usize::MAX, b""), b"abc");
        assert_eq!(splice(b"", 5, b"X"), b"X");
        assert_eq!(splice(b"data: a\n\ndata: b", 9, HEARTBEAT), b"data: a\n\n: heartbeat\n\ndata: b");
    }

    // ---- property test against reference parsers ----

    use crate::testkit::sse::{boundaries as ref_boundaries, decode as ref_decode, Event};
    use crate::testkit::Rng;

    fn decode(s: &[u8]) -> Vec<Event> {
        ref_decode(s).0
    }

    fn value(rng: &mut Rng) -> String {
        let n = rng.below(6);
        (0..n).map(|_| *rng.pick(&["a", "b", " ", ":", "é", "{}", "1", "\u{feff}"]).unwrap_or(&"a")).collect()
    }

    fn eol(rng: &mut Rng) -> &'static str {
        ["\n", "\r", "\r\n"][rng.index(3)]
    }

    /// A random SSE stream: events of fields and comments with mixed line endings, stray blank
    /// lines, sometimes a BOM, sometimes an unfinished event (or line) at the end.
    fn stream(rng: &mut Rng) -> Vec<u8> {
        let mut s = String::new();
        if rng.percent(5) {
            s.push('\u{feff}');
        }
        let line = |rng: &mut Rng| {
            let v = value(rng);
            match rng.below(12) {
                0..=2 => format!("data: {v}"),
                3 => format!("data:{v}"),
                4 => "data".to_string(),
                5 => format!("id: {v}"),
                6 => format!("event: {v}"),
                7 => "retry: 100".to_string(),
                8 => format!(":{v}"),
                9 => format!(": {v}"),
                10 => format!("foo: {v}"),
                _ => format!("x{v}"),
            }
        };
        for _ in 0..rng.below(8) {
            while rng.percent(10) {
                s.push_str(eol(rng));
            }
            for _ in 0..rng.below(5) {
                s.push_str(&line(rng));
                s.push_str(eol(rng));
            }
            s.push_str(eol(rng));
        }
        if rng.percent(15) {
            for _ in 0..rng.below(3) {
                s.push_str(&line(rng));
                s.push_str(eol(rng));
            }
            if rng.percent(50) {
                s.push_str(&line(rng));
            }
        }
        s.into_bytes()
    }

    /// Chunk lengths that add up to `len`: one chunk, single bytes, random cuts (some empty
    /// chunks), or cuts right after every CR.
    fn cuts(rng: &mut Rng, s: &[u8]) -> Vec<usize> {
        let mut points: Vec<usize> = match rng.below(4) {
            0 => vec![],
            1 => (1..s.len()).collect(),
            2 => {
                let p = [3, 20, 50][rng.index(3)];
                (0..=s.len()).filter(|_| rng.percent(p)).collect()
            }
            _ => (0..s.len()).filter(|&i| s[i] == b'\r' || rng.percent(5)).map(|i| i + 1).collect(),
        };
        points.push(s.len());
        let mut at = 0;
        points
            .into_iter()
            .map(|p| {
                let n = p - at;
                at = p;
                n
            })
            .collect()
    }

    #[test]
    fn property_random_streams_and_chunkings() {
        const EVENT: &[u8] = b"event: injected\ndata: {}\n\n";
        let mut rng = Rng(0x5eed_2024);
        let (mut injections, mut events, mut zero_offsets) = (0usize, 0usize, 0usize);
        for case in 0..4000 {
            let s = stream(&mut rng);
            let bounds = ref_boundaries(&s);
            let original = decode(&s);
            events += original.len();
            let lens = cuts(&mut rng, &s);
            for inject in [HEARTBEAT, EVENT] {
                let mut f = Framing::new();
                let (mut out, mut pos, mut n) = (Vec::new(), 0usize, 0usize);
                for &len in &lens {
                    let (start, end) = (pos, pos + len);
                    let chunk = &s[start..end];
                    let before = f.at_boundary();
                    let got = f.feed(chunk);
                    // Exactly the last boundary this chunk confirms: those inside it (not one right
                    // after a CR at its end), or its start when that follows a CR.
                    let inside = bounds
                        .iter()
                        .copied()
                        .filter(|&b| start < b && b <= end && !(b == end && s[b - 1] == b'\r'));
                    let at_start =
                        (start > 0 && end > start && s[start - 1] == b'\r' && bounds.contains(&start))
                            .then_some(start);
                    let want = inside.chain(at_start).max().map(|b| b - start);
                    assert_eq!(
                        got,
                        want,
                        "case {case}: chunk {start}..{end} of {:?}",
                        String::from_utf8_lossy(&s)
                    );
                    // (1) every reported offset is a boundary of the whole stream.
                    if let Some(o) = got {
                        assert!(bounds.contains(&(start + o)), "case {case}");
                        zero_offsets += usize::from(o == 0);
                    }
                    // (2) at_boundary() == the concatenation so far ends at a boundary.
                    let reference = end == 0 || (s[end - 1] != b'\r' && bounds.contains(&end));
                    assert_eq!(
                        f.at_boundary(),
                        reference,
                        "case {case}: after {end} of {:?}",
                        String::from_utf8_lossy(&s)
                    );
                    // (3) inject where the host would: at the reported offset, at the chunk's start
                    // when the stream was at a boundary before it (not before a leading BOM).
                    let mut c = chunk.to_vec();
                    if let Some(o) = got {
                        c = splice(&c, o, inject);
                        n += 1;
                    }
                    if before && !chunk.is_empty() && !(start == 0 && s.starts_with("\u{feff}".as_bytes())) {
                        c = splice(&c, 0, inject);
                        n += 1;
                    }
                    out.extend_from_slice(&c);
                    pos = end;
                }
                assert_eq!(pos, s.len());
                if f.at_boundary() {
                    out.extend_from_slice(inject);
                    n += 1;
                }
                let decoded = decode(&out);
                let upstream: Vec<Event> =
                    decoded.iter().filter(|e| e.kind != b"injected").cloned().collect();
                assert_eq!(upstream, original, "case {case}: {:?}", String::from_utf8_lossy(&out));
                let ours = decoded.len() - upstream.len();
                assert_eq!(ours, if inject == EVENT { n } else { 0 }, "case {case}");
                assert!(decoded.iter().filter(|e| e.kind == b"injected").all(|e| e.data == b"{}"));
                injections += n;
            }
        }
        // The generator really exercises what it should.
        assert!(
            events > 5_000 && injections > 10_000 && zero_offsets > 50,
            "{events} {injections} {zero_offsets}"
        );
    }

    /// `forget` is safe: for every state the unobserved bytes could have left, and every chunk
    /// over the bytes that matter (up to 6 long), what is reported after `forget` is also true
    /// from that state: each boundary offset, and `at_boundary()` at the end.
    #[test]
    fn after_forget_every_reported_boundary_is_a_boundary_whatever_came_before() {
        let alphabet = [b'a', b'\r', b'\n'];
        let prefixes: [&[u8]; 7] = [b"", b"a", b"a\n", b"a\r", b"a\n\n", b"\r", b"a\r\n"];
        let mut chunks: Vec<Vec<u8>> = vec![Vec::new()];
        let mut layer: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..6 {
            layer = layer.iter().flat_map(|c| alphabet.map(|b| [c.as_slice(), &[b]].concat())).collect();
            chunks.extend(layer.iter().cloned());
        }
        let mut reported = 0;
        for chunk in &chunks {
            let mut forgot = Framing::new();
            forgot.forget();
            let assumed = forgot.feed(chunk);
            for prefix in prefixes {
                let mut truth = Framing::new();
                truth.feed(prefix);
                // Every boundary the real state passes through in this chunk.
                let mut real = Vec::new();
                let mut t = truth;
                for i in 0..chunk.len() {
                    if let Some(at) = t.feed(&chunk[i..=i]) {
                        real.push(i + at);
                    }
                }
                if let Some(at) = assumed {
                    assert!(real.contains(&at), "prefix {prefix:?} chunk {chunk:?}: {at} is no boundary");
                    reported += 1;
                }
                if forgot.at_boundary() {
                    assert!(t.at_boundary(), "prefix {prefix:?} chunk {chunk:?}");
                }
            }
        }
        assert!(reported > 1_000, "{reported}");
    }

    #[test]
    fn advance_over_the_tail_ends_like_feed_over_the_chunk() {
        let alphabet = [b'a', b':', b' ', b'\r', b'\n', b'd'];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut next = || rng.next_u64();
        let mut compared = 0;
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let chunk: Vec<u8> = (0..len).map(|_| alphabet[(next() % 6) as usize]).collect();
            let tail_len = (next() % 8) as usize;
            let tail = &chunk[chunk.len().saturating_sub(tail_len)..];
            let mut start = Framing::new();
            // A random starting state, reached by feeding a random prefix.
            let prefix: Vec<u8> = (0..(next() % 4)).map(|_| alphabet[(next() % 6) as usize]).collect();
            start.feed(&prefix);
            let mut by_feed = start;
            by_feed.feed(&chunk);
            let mut by_tail = start;
            if by_tail.advance(chunk.len(), tail) {
                assert_eq!(by_tail, by_feed, "prefix {prefix:?} chunk {chunk:?} tail {tail:?}");
                compared += 1;
            } else {
                assert_eq!(by_tail, start, "a refused advance observes nothing");
                assert!(tail.iter().all(|b| *b == b'\r' || *b == b'\n') && tail.len() < chunk.len());
            }
        }
        assert!(compared > 10_000, "{compared}");
    }
}
