//! An in-memory `SharedStore` with the host's semantics, for tests and fuzzing: one `MemStore` is a
//! handle, and clones share the same data (several engines = several workers of one Envoy).

use super::{Salt, SetError, SharedStore};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Key → (value, CAS token).
type Data = HashMap<String, (Vec<u8>, u32)>;

#[derive(Debug, Clone, Default)]
pub struct MemStore {
    data: Rc<RefCell<Data>>,
    /// This handle's salt (each worker holds its own copy, as in Envoy).
    salt: Salt,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Keys currently held (never fewer over time: the host deletes nothing).
    pub fn len(&self) -> usize {
        self.data.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.borrow().is_empty()
    }

    /// Every key, sorted (for tests that check which keys exist).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.data.borrow().keys().cloned().collect();
        keys.sort();
        keys
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.data.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        }
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut data = self.data.borrow_mut();
        match data.get_mut(key) {
            Some((_, current)) if cas.is_some_and(|c| c != 0 && c != *current) => Err(SetError::CasMismatch),
            Some(slot) => {
                slot.0 = value.to_vec();
                slot.1 = slot.1.wrapping_add(1).max(1);
                Ok(())
            }
            None => {
                data.insert(key.to_string(), (value.to_vec(), 1));
                Ok(())
            }
        }
    }

    fn salt(&self) -> Salt {
        self.salt
    }

    fn set_salt(&mut self, salt: Salt) {
        self.salt = salt;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cas_semantics_are_the_hosts() {
        let mut a = MemStore::new();
        let mut b = a.clone();
        // A missing key: two creators with no CAS both win (the host's behaviour).
        assert_eq!(a.set("k", b"1", None), Ok(()));
        assert_eq!(b.set("k", b"2", None), Ok(()));
        let (v, cas) = a.get("k");
        assert_eq!(v.as_deref(), Some(&b"2"[..]));
        // A CAS write fails once someone else wrote.
        b.set("k", b"3", cas).unwrap();
        assert_eq!(a.set("k", b"4", cas), Err(SetError::CasMismatch));
        assert_eq!(a.get("k").0.as_deref(), Some(&b"3"[..]));
        assert_eq!((a.len(), a.keys()), (1, vec!["k".to_string()]));
    }
}
