//! Tests of the generated table in `nfkc.rs` (hand-written: the generator only declares this module).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;

fn chr(cp: u32) -> char {
    char::from_u32(cp).unwrap()
}

/// What a pair says about `cp`, found by a linear scan.
fn pair_form(cp: u32) -> Option<&'static str> {
    PAIRS.iter().find(|p| p.0 == cp).map(|&(_, offset, len)| &STRINGS[offset as usize..][..len as usize])
}

/// What a range says about `cp`, found by a linear scan.
fn range_form(cp: u32) -> Option<&'static str> {
    RANGES.iter().find(|r| r.0 <= cp && cp < r.0 + u32::from(r.1)).map(|&(start, _, first)| {
        let at = usize::from(first - b' ') + (cp - start) as usize;
        &STRINGS[at..=at]
    })
}

#[test]
fn look_alikes_of_path_characters() {
    // Found by an attack run: NFKC turns these into dots, slashes and backslashes.
    for (cp, form) in [
        (0x2025, ".."),         // TWO DOT LEADER
        (0xFE30, ".."),         // PRESENTATION FORM FOR VERTICAL TWO DOT LEADER
        (0xFE52, "."),          // SMALL FULL STOP
        (0xFE68, "\\"),         // SMALL REVERSE SOLIDUS
        (0xFF3C, "\\"),         // FULLWIDTH REVERSE SOLIDUS
        (0xFF0E, "."),          // FULLWIDTH FULL STOP
        (0x2024, "."),          // ONE DOT LEADER
        (0xFF0F, "/"),          // FULLWIDTH SOLIDUS
        (0xFF45, "e"),          // FULLWIDTH LATIN SMALL LETTER E
        (0x212A, "K"),          // KELVIN SIGN
        (0x017F, "s"),          // LATIN SMALL LETTER LONG S
        (0x2026, "..."),        // HORIZONTAL ELLIPSIS
        (0x00BD, "1\u{2044}2"), // VULGAR FRACTION ONE HALF: ASCII and non-ASCII
    ] {
        assert_eq!(ascii_folding(chr(cp)), Some(form), "U+{cp:04X}");
    }
}

#[test]
fn no_folding_for_ascii_and_characters_without_ascii_in_their_nfkc_form() {
    for c in ['a', 'é', '\u{4E00}', '\u{2215}', '\u{2044}', '\u{D7FF}', '\u{10FFFF}', '\0', '\u{7F}'] {
        assert_eq!(ascii_folding(c), None, "U+{:04X}", u32::from(c));
    }
    assert!((0..0x80).all(|b| ascii_folding(chr(b)).is_none()));
}

#[test]
fn unicode_version_is_recorded() {
    let parts: Vec<&str> = UNICODE_VERSION.split('.').collect();
    assert_eq!(parts.len(), 3, "{UNICODE_VERSION}");
    assert!(
        parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "{UNICODE_VERSION}"
    );
}

#[test]
fn table_is_sorted_disjoint_and_in_bounds() {
    assert!(STRINGS.starts_with(" !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ"));
    assert!(STRINGS[..95].bytes().eq(b' '..=b'~'));
    for w in RANGES.windows(2) {
        assert!(w[0].0 + u32::from(w[0].1) <= w[1].0, "{w:x?}");
    }
    for &(start, len, first) in &RANGES {
        assert!(start >= 0x80 && len >= 2, "{start:x}");
        assert!(first >= b' ' && u32::from(first) + u32::from(len) - 1 <= u32::from(b'~'), "{start:x}");
    }
    for w in PAIRS.windows(2) {
        assert!(w[0].0 < w[1].0, "{w:x?}");
    }
    for &(cp, offset, len) in &PAIRS {
        assert!(cp >= 0x80 && len >= 1, "{cp:x}");
        assert_eq!(range_form(cp), None, "U+{cp:04X} is in a range and a pair");
        let form = STRINGS.get(usize::from(offset)..usize::from(offset) + usize::from(len));
        assert!(form.is_some(), "U+{cp:04X}: {offset}+{len} out of bounds or not on a char boundary");
    }
}

#[test]
fn every_listed_code_point_folds_to_its_entry_and_its_neighbours_to_theirs() {
    let listed = RANGES.iter().flat_map(|&(start, len, _)| start..start + u32::from(len));
    let listed: Vec<u32> = listed.chain(PAIRS.iter().map(|p| p.0)).collect();
    for &cp in &listed {
        let c = chr(cp);
        let form = ascii_folding(c);
        assert!(form.is_some(), "U+{cp:04X} is listed but not found");
        assert_eq!(form, range_form(cp).or(pair_form(cp)), "U+{cp:04X}");
        let form = form.unwrap();
        assert!(form.bytes().any(|b| b.is_ascii()), "U+{cp:04X}: {form:?} holds no ASCII");
        assert!(form.bytes().filter(u8::is_ascii).all(|b| (b' '..=b'~').contains(&b)), "U+{cp:04X}");
        assert_ne!(form, c.encode_utf8(&mut [0; 4]), "U+{cp:04X} folds to itself");
    }
    // Just outside every range and next to every pair: what the other entries say, or nothing.
    let edges = RANGES.iter().flat_map(|&(start, len, _)| [start - 1, start + u32::from(len)]);
    let edges = edges.chain(PAIRS.iter().flat_map(|p| [p.0 - 1, p.0 + 1]));
    for cp in edges.filter(|cp| char::from_u32(*cp).is_some()) {
        assert_eq!(ascii_folding(chr(cp)), range_form(cp).or(pair_form(cp)), "U+{cp:04X}");
    }
    // Every code point: exactly the listed ones fold.
    let folding = (0..=0x10FFFF).filter_map(char::from_u32).filter(|c| ascii_folding(*c).is_some()).count();
    assert_eq!(folding, listed.len());
}

#[test]
fn look_alikes_of_path_significant_characters_are_reviewed() {
    // Every character whose NFKC form holds `.`, `/`, `\`, `%` or `;`, which path checks must treat
    // as those characters. A new Unicode version that adds one fails here until it is reviewed.
    let found: Vec<(u32, &str)> = (0x80..=0x10FFFF)
        .filter_map(char::from_u32)
        .filter_map(|c| ascii_folding(c).map(|f| (u32::from(c), f)))
        .filter(|(_, f)| f.contains(['.', '/', '\\', '%', ';']))
        .collect();
    let mut expected = vec![
        (0x037E, ";"),   // GREEK QUESTION MARK
        (0x2024, "."),   // ONE DOT LEADER
        (0x2025, ".."),  // TWO DOT LEADER
        (0x2026, "..."), // HORIZONTAL ELLIPSIS
        (0x2100, "a/c"), // ACCOUNT OF
        (0x2101, "a/s"), // ADDRESSED TO THE SUBJECT
        (0x2105, "c/o"), // CARE OF
        (0x2106, "c/u"), // CADA UNA
    ];
    // DIGIT ONE FULL STOP .. NUMBER TWENTY FULL STOP
    let numbered = ["1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9.", "10.", "11.", "12.", "13."];
    expected.extend(
        (0x2488..).zip(numbered.into_iter().chain(["14.", "15.", "16.", "17.", "18.", "19.", "20."])),
    );
    expected.extend([
        (0x33C2, "a.m."), // SQUARE AM
        (0x33C7, "Co."),  // SQUARE CO
        (0x33D8, "p.m."), // SQUARE PM
        (0xFE14, ";"),    // PRESENTATION FORM FOR VERTICAL SEMICOLON
        (0xFE19, "..."),  // PRESENTATION FORM FOR VERTICAL HORIZONTAL ELLIPSIS
        (0xFE30, ".."),   // PRESENTATION FORM FOR VERTICAL TWO DOT LEADER
        (0xFE52, "."),    // SMALL FULL STOP
        (0xFE54, ";"),    // SMALL SEMICOLON
        (0xFE68, "\\"),   // SMALL REVERSE SOLIDUS
        (0xFE6A, "%"),    // SMALL PERCENT SIGN
        (0xFF05, "%"),    // FULLWIDTH PERCENT SIGN
        (0xFF0E, "."),    // FULLWIDTH FULL STOP
        (0xFF0F, "/"),    // FULLWIDTH SOLIDUS
        (0xFF1B, ";"),    // FULLWIDTH SEMICOLON
        (0xFF3C, "\\"),   // FULLWIDTH REVERSE SOLIDUS
        (0x1F100, "0."),  // DIGIT ZERO FULL STOP
    ]);
    assert_eq!(found, expected);
}
