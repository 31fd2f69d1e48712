//! Test helpers shared by the core's unit tests and the fuzz crate (feature `testkit`; never in
//! the shipped filter): one deterministic random generator, and a reference WHATWG event-stream
//! interpreter written independently of `sse::framing`, against which the filter's results are
//! checked.

/// splitmix64: deterministic, so a failure reproduces from its seed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64().checked_rem(n).unwrap_or(0)
    }

    /// An index in `0..n`.
    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    /// True `p` percent of the time.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        xs.get(self.index(xs.len()))
    }
}

/// Reference event-stream interpreter (WHATWG HTML, "Interpreting an event stream"), on bytes.
pub mod sse {
    /// Lines of a whole stream: (content start, content end, end after terminator) of each line
    /// that has a terminator (CRLF, LF or CR; the end of the stream ends a final CR).
    pub fn lines(s: &[u8]) -> Vec<(usize, usize, usize)> {
        let mut lines = Vec::new();
        let (mut start, mut i) = (0, 0);
        while let Some(&b) = s.get(i) {
            let end = match (b, s.get(i + 1)) {
                (b'\r', Some(b'\n')) => i + 2,
                (b'\r' | b'\n', _) => i + 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            lines.push((start, i, end));
            start = end;
            i = end;
        }
        lines
    }

    /// Event boundaries: the start, and the end of every blank line.
    pub fn boundaries(s: &[u8]) -> Vec<usize> {
        let mut b = vec![0];
        b.extend(lines(s).into_iter().filter(|&(cs, ce, _)| cs == ce).map(|(_, _, end)| end));
        b
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Event {
        pub kind: Vec<u8>,
        pub data: Vec<u8>,
        pub id: Vec<u8>,
    }

    /// Dispatched events of a whole stream, and its comment lines.
    pub fn decode(s: &[u8]) -> (Vec<Event>, Vec<Vec<u8>>) {
        let s = s.strip_prefix("\u{feff}".as_bytes()).unwrap_or(s);
        let (mut events, mut comments) = (Vec::new(), Vec::new());
        let (mut kind, mut data, mut id) = (Vec::new(), Vec::new(), Vec::new());
        for (cs, ce, _) in lines(s) {
            let line = s.get(cs..ce).unwrap_or_default();
            if line.is_empty() {
                if !data.is_empty() {
                    data.pop();
                    let k = if kind.is_empty() { b"message".to_vec() } else { kind.clone() };
                    events.push(Event { kind: k, data: data.clone(), id: id.clone() });
                }
                kind.clear();
                data.clear();
                continue;
            }
            if line.first() == Some(&b':') {
                comments.push(line.to_vec());
                continue;
            }
            let (field, val) = match line.iter().position(|&b| b == b':') {
                Some(p) => {
                    let v = line.get(p + 1..).unwrap_or_default();
                    (line.get(..p).unwrap_or_default(), v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &b""[..]),
            };
            match field {
                b"event" => kind = val.to_vec(),
                b"data" => {
                    data.extend_from_slice(val);
                    data.push(b'\n');
                }
                b"id" if !val.contains(&0) => id = val.to_vec(),
                _ => {}
            }
        }
        (events, comments)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reference_sanity() {
            let s = b"\xef\xbb\xbfid: 7\r\nevent: e\rdata: a\ndata:b\n: c\n\ndata: x\n\nretry: 5\n\ndata";
            let (ev, comments) = decode(s);
            assert_eq!(
                ev,
                [
                    Event { kind: b"e".to_vec(), data: b"a\nb".to_vec(), id: b"7".to_vec() },
                    Event { kind: b"message".to_vec(), data: b"x".to_vec(), id: b"7".to_vec() },
                ]
            );
            assert_eq!(comments, vec![b": c".to_vec()]);
            assert_eq!(boundaries(b"a\r\n\r\nb\r\rc\n"), [0, 5, 8]);
        }
    }
}
