//! The one placement algorithm of every fixed-slot table in shared data (the verdict cache, the
//! refresh and client records): an entry lives in one of two candidate slots chosen from its key
//! (two-choice hashing). Envoy never deletes a shared-data key, so a table owns a fixed number of
//! slots and memory stays flat whatever the number of distinct keys over time. Pure: the tables'
//! entry types implement `Slotted` where they are defined, and `shared` places them.

/// An entry of a fixed-slot table.
pub trait Slotted {
    fn key(&self) -> &[u8; 32];
    /// Still meaningful at `now_ms` (a dead entry's slot is free).
    fn live(&self, now_ms: u64) -> bool;
    /// Among live entries of other keys, the lowest value is replaced first.
    fn evict_order(&self) -> u64;
}

/// The live entry for `key` among a slot pair's contents, with its index.
pub fn find<'a, T: Slotted>(
    key: &[u8; 32],
    now_ms: u64,
    candidates: &'a [Option<T>; 2],
) -> Option<(usize, &'a T)> {
    candidates
        .iter()
        .enumerate()
        .find_map(|(i, e)| e.as_ref().filter(|e| e.key() == key && e.live(now_ms)).map(|e| (i, e)))
}

/// Which slot of the pair (0 or 1) an entry for `key` takes: the one already holding `key`, else an
/// empty or dead one, else the live one that goes first by `evict_order`. Ties go to slot 0.
pub fn place<T: Slotted>(key: &[u8; 32], now_ms: u64, candidates: &[Option<T>; 2]) -> usize {
    let rank = |slot: &Option<T>| match slot {
        Some(e) if e.key() == key => (0, 0),
        None => (1, 0),
        Some(e) if !e.live(now_ms) => (1, 0),
        Some(e) => (2, e.evict_order()),
    };
    let [a, b] = candidates;
    usize::from(rank(b) < rank(a))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct E {
        key: u8,
        until: u64,
    }

    impl Slotted for E {
        fn key(&self) -> &[u8; 32] {
            // A leaked array per call would be silly: keys in these tests are all-one-byte arrays.
            KEYS.get(usize::from(self.key)).unwrap_or(&[0; 32])
        }
        fn live(&self, now_ms: u64) -> bool {
            self.until > now_ms
        }
        fn evict_order(&self) -> u64 {
            self.until
        }
    }

    static KEYS: [[u8; 32]; 10] = {
        let mut k = [[0u8; 32]; 10];
        let mut i = 0;
        while i < 10 {
            k[i] = [i as u8; 32];
            i += 1;
        }
        k
    };

    fn e(key: u8, until: u64) -> Option<E> {
        Some(E { key, until })
    }

    #[test]
    fn own_slot_then_free_then_oldest() {
        let k = [9; 32];
        assert_eq!(place(&k, 10, &[e(1, 100), e(9, 100)]), 1);
        assert_eq!(place(&k, 10, &[e(1, 100), None]), 1);
        assert_eq!(place(&k, 10, &[e(1, 5), e(2, 100)]), 0);
        assert_eq!(place(&k, 10, &[e(1, 300), e(2, 100)]), 1);
        assert_eq!(place::<E>(&k, 10, &[None, None]), 0);
        // Both dead: the first.
        assert_eq!(place(&k, 500, &[e(2, 5), e(1, 0)]), 0);
    }

    #[test]
    fn find_live_only() {
        let c = [e(1, 100), e(2, 50)];
        assert_eq!(find(&[1; 32], 10, &c).map(|(i, _)| i), Some(0));
        assert_eq!(find(&[2; 32], 60, &c), None);
        assert_eq!(find(&[2; 32], 10, &c).map(|(i, _)| i), Some(1));
        assert_eq!(find(&[3; 32], 10, &c), None);
    }
}
