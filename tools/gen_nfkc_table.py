#!/usr/bin/env python3
r"""Generates core/src/auth/nfkc.rs: the code points that NFKC turns into text with ASCII in it.

    python3 tools/gen_nfkc_table.py              # rewrites core/src/auth/nfkc.rs
    python3 tools/gen_nfkc_table.py OUTPUT.rs    # writes elsewhere (e2e/test_build.py compares)

The table holds every code point c that is not ASCII, not a surrogate and assigned in the Unicode
version of this Python's `unicodedata`, whose NFKC form differs from c and contains at least one
ASCII character (U+FF0E -> ".", U+2025 -> "..", U+FF3C -> "\\", U+212A -> "K", U+33A7 -> "m\u2215s").
The Rust module looks them up with `ascii_folding(c)`, which returns that NFKC form.

Encoding, for a small .wasm:
- RANGES (start, len, first): code points start..start+len whose NFKC forms are the single ASCII
  characters first, first+1, ... (fullwidth letters, mathematical alphanumerics); runs of at least
  two code points, at most 255.
- PAIRS (code point, offset, len): every other code point, sorted; its NFKC form is
  STRINGS[offset..offset + len].
- STRINGS: the printable ASCII characters " " to "~" (ranges and one-character pairs point
  there), then each longer form that is not already a substring of what comes before.

The output is deterministic and already formatted as `cargo fmt` (rustfmt.toml: max_width 110)
would format it, so e2e/test_build.py can compare it byte for byte with the committed file.
"""
import pathlib
import sys
import unicodedata

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "core/src/auth/nfkc.rs"
MAX_WIDTH = 110
ASCII_PRINTABLE = "".join(chr(b) for b in range(0x20, 0x7F))
MIN_RUN = 2
MAX_RUN = 255
# Rust layouts of the tuple elements: (u32, u8, u8) and (u32, u16, u8) are both 8 bytes.
RANGE_BYTES = 8
PAIR_BYTES = 8


def folding_entries():
    """(code point, NFKC form) for every code point the table holds, in code point order."""
    entries = []
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if unicodedata.category(c) == "Cn":
            continue
        nfkc = unicodedata.normalize("NFKC", c)
        if nfkc != c and any(ord(x) < 0x80 for x in nfkc):
            entries.append((cp, nfkc))
    return entries


def single_ascii(form):
    return len(form) == 1 and form in ASCII_PRINTABLE


def split_runs(entries):
    """(ranges, pairs): ranges as (start, len, first ASCII code), pairs as (code point, form)."""
    ranges, pairs = [], []
    i = 0
    while i < len(entries):
        cp, form = entries[i]
        j = i + 1
        if single_ascii(form):
            while j < len(entries) and j - i < MAX_RUN:
                ncp, nform = entries[j]
                if ncp != cp + (j - i) or not single_ascii(nform) or ord(nform) != ord(form) + (j - i):
                    break
                j += 1
        if j - i >= MIN_RUN:
            ranges.append((cp, j - i, ord(form)))
        else:
            j = i + 1
            pairs.append((cp, form))
        i = j
    return ranges, pairs


def build_strings(pairs):
    """STRINGS and (code point, offset, len) for each pair (offsets and lengths in UTF-8 bytes)."""
    text = ASCII_PRINTABLE
    for _, form in pairs:
        if form not in text:
            text += form
    data = text.encode("utf-8")
    encoded = []
    for cp, form in pairs:
        raw = form.encode("utf-8")
        offset = data.find(raw)
        # The first occurrence starts at a character boundary: `form` starts with a whole character
        # and UTF-8 is self-synchronizing, so a byte match cannot start inside a character.
        assert offset >= 0 and offset + len(raw) < 1 << 16 and len(raw) <= 0xFF, (hex(cp), form)
        encoded.append((cp, offset, len(raw)))
    return text, encoded


def check(entries, ranges, pairs, text):
    """Decodes the table as the Rust lookup does and compares it with `entries`."""
    data = text.encode("utf-8")
    decoded = {}
    for start, length, first in ranges:
        for k in range(length):
            decoded[start + k] = chr(first + k)
    for cp, offset, length in pairs:
        assert cp not in decoded, hex(cp)
        decoded[cp] = data[offset:offset + length].decode("utf-8")
    assert decoded == dict(entries), "table does not decode to the NFKC forms"
    assert [r[0] for r in ranges] == sorted(r[0] for r in ranges)
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)


def rust_string_chunks(text, width):
    """`text` as Rust string literal bodies of at most `width` source characters each. Non-ASCII
    and control characters are escaped as \\u{...}, so the source stays ASCII."""
    chunks, current = [], ""
    for ch in text:
        if ch == "\\":
            esc = "\\\\"
        elif ch == '"':
            esc = '\\"'
        elif " " <= ch <= "~":
            esc = ch
        else:
            esc = "\\u{%x}" % ord(ch)
        if len(current) + len(esc) > width:
            chunks.append(current)
            current = ""
        current += esc
    if current:
        chunks.append(current)
    return chunks


def byte_literal(code):
    ch = chr(code)
    if ch in "\\'":
        return "b'\\%s'" % ch
    return "b'%s'" % ch


def render(version, entries, ranges, pairs, text):
    data_bytes = len(ranges) * RANGE_BYTES + len(pairs) * PAIR_BYTES + len(text.encode("utf-8"))
    out = []
    w = out.append
    w("//! Compatibility look-alikes of ASCII: the code points whose NFKC form holds ASCII characters.")
    w("//!")
    w("//! GENERATED by tools/gen_nfkc_table.py from Python's `unicodedata` (Unicode %s): do not edit." % version)
    w("//! Regenerate with `python3 tools/gen_nfkc_table.py`; e2e/test_build.py fails when this file")
    w("//! differs from what the generator writes.")
    w("//!")
    w("//! %d code points (not ASCII, not surrogates, assigned) whose NFKC form differs from them and" % len(entries))
    w("//! contains ASCII: %d in %d ranges of consecutive ASCII letters, digits or signs, %d in pairs;"
      % (sum(r[1] for r in ranges), len(ranges), len(pairs)))
    w("//! static data %d bytes (RANGES %d, PAIRS %d, STRINGS %d)."
      % (data_bytes, len(ranges) * RANGE_BYTES, len(pairs) * PAIR_BYTES, len(text.encode("utf-8"))))
    w("")
    w("/// Version of the Unicode Character Database the table was generated from.")
    w('pub const UNICODE_VERSION: &str = "%s";' % version)
    w("")
    w("/// `Some(NFKC form of c)` when NFKC turns `c` into something else that contains ASCII")
    w('/// (U+FF0E -> ".", U+2025 -> "..", U+FF3C -> "\\\\", U+FF45 -> "e", U+2100 -> "a/c"); `None`')
    w("/// otherwise, for ASCII too. The form may also hold non-ASCII characters (U+00BD -> \"1\\u{2044}2\").")
    w("pub fn ascii_folding(c: char) -> Option<&'static str> {")
    w("    let cp = u32::from(c);")
    w("    in_ranges(cp).or_else(|| in_pairs(cp))")
    w("}")
    w("")
    w("fn in_ranges(cp: u32) -> Option<&'static str> {")
    w("    let i = RANGES.partition_point(|&(start, _, _)| start <= cp).checked_sub(1)?;")
    w("    let &(start, len, first) = RANGES.get(i)?;")
    w("    let delta = u8::try_from(cp.checked_sub(start)?).ok().filter(|d| *d < len)?;")
    w("    let at = usize::from(first.checked_sub(b' ')?.checked_add(delta)?);")
    w("    STRINGS.get(at..=at)")
    w("}")
    w("")
    w("fn in_pairs(cp: u32) -> Option<&'static str> {")
    w("    let i = PAIRS.binary_search_by_key(&cp, |&(c, _, _)| c).ok()?;")
    w("    let &(_, offset, len) = PAIRS.get(i)?;")
    w("    let start = usize::from(offset);")
    w("    STRINGS.get(start..start.checked_add(usize::from(len))?)")
    w("}")
    w("")
    w("/// (start, len, first): code points `start..start + len` fold to the ASCII characters")
    w("/// `first, first + 1, ...`.")
    w("static RANGES: [(u32, u8, u8); %d] = [" % len(ranges))
    for start, length, first in ranges:
        w("    (0x%04X, %d, %s)," % (start, length, byte_literal(first)))
    w("];")
    w("")
    w("/// (code point, offset, len): the code point folds to `STRINGS[offset..offset + len]`.")
    w("static PAIRS: [(u32, u16, u8); %d] = [" % len(pairs))
    for cp, offset, length in pairs:
        w("    (0x%04X, %d, %d)," % (cp, offset, length))
    w("];")
    w("")
    w("/// The printable ASCII characters in order (`first` of RANGES points here), then the longer")
    w("/// NFKC forms.")
    w("static STRINGS: &str = concat!(")
    for chunk in rust_string_chunks(text, MAX_WIDTH - len('    "",')):
        w('    "%s",' % chunk)
    w(");")
    w("")
    w("#[cfg(test)]")
    w("mod tests;")
    for line in out:
        assert len(line) <= MAX_WIDTH, line
    return "\n".join(out) + "\n", data_bytes


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        sys.stderr.write("usage: gen_nfkc_table.py [OUTPUT.rs]   (default %s)\n" % DEFAULT_OUTPUT)
        return 2
    output = pathlib.Path(argv[1]) if len(argv) == 2 else DEFAULT_OUTPUT
    entries = folding_entries()
    ranges, single = split_runs(entries)
    text, pairs = build_strings(single)
    check(entries, ranges, pairs, text)
    source, data_bytes = render(unicodedata.unidata_version, entries, ranges, pairs, text)
    output.write_bytes(source.encode("ascii"))
    print("%s: Unicode %s, %d entries: %d ranges (%d code points) + %d pairs; static data %d bytes"
          % (output, unicodedata.unidata_version, len(entries), len(ranges), sum(r[1] for r in ranges),
             len(pairs), data_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
