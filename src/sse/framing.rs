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
