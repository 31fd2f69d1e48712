//! Envoy's shared data as the engine's `SharedStore`. Every key is visible to all worker VMs of one
//! Envoy; the typed operations (cache slots, breaker, bucket, registry) live in the core
//! (`revenprox_core::shared`).

use super::abi;
use proxy_wasm::types::Status;
use revenprox_core::shared::{Salt, SetError, SharedStore};

/// Proxy-wasm shared data, and the `revenprox_revocations` counter as the Envoy-wide revocation
/// count (a stat is shared by every worker VM, and reading it returns a number without the
/// allocation round trip a shared-data read costs).
pub struct HostStore {
    pub revocations: Option<u32>,
    /// The `revenprox_user_id_not_sub` counter, Envoy-wide the same way.
    pub user_ids_not_sub: Option<u32>,
    /// The Envoy's placement salt (`shared::agree_salt` at configuration).
    pub salt: Salt,
}

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

    fn revocations(&self) -> u64 {
        self.revocations.and_then(|id| abi::get_metric(id).ok()).unwrap_or(0)
    }

    fn salt(&self) -> Salt {
        self.salt
    }

    fn set_salt(&mut self, salt: Salt) {
        self.salt = salt;
    }

    fn user_ids_not_sub(&self) -> u64 {
        self.user_ids_not_sub.and_then(|id| abi::get_metric(id).ok()).unwrap_or(0)
    }

    fn user_id_not_sub(&mut self) {
        if let Some(id) = self.user_ids_not_sub {
            let _ = abi::increment_metric(id, 1);
        }
    }

    fn revoke(&mut self) {
        if let Some(id) = self.revocations {
            let _ = abi::increment_metric(id, 1);
        }
    }
}
