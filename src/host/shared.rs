//! Envoy's shared data as the engine's `SharedStore`. Every key is visible to all worker VMs of one
//! Envoy; the typed operations (cache slots, breaker, bucket, registry) live in the core
//! (`revenprox_core::shared`).

use super::abi;
use proxy_wasm::types::Status;
use revenprox_core::shared::{SetError, SharedStore};

/// Proxy-wasm shared data (no state of its own).
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        abi::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match abi::set_shared_data(key, value, cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Refused),
        }
    }
}
