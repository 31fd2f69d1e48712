//! Envoy's shared data as the engine's `SharedStore`. Every key is visible to all worker VMs of one
//! Envoy that run the same plugin configuration: keys are prefixed with a digest of that
//! configuration, so two configurations in one Envoy (two listeners, two webhooks) never share a
//! cache, a breaker, a bucket or stream records. The typed operations live in the core
//! (`revenprox_core::shared`).

use super::abi;
use proxy_wasm::types::Status;
use revenprox_core::shared::{self, Salt, SetError, SharedStore};

pub struct HostStore {
    /// Prepended to every key: this configuration's namespace.
    pub prefix: String,
    /// The `revenprox_revocations` gauge, a mirror of the revocation count that every worker reads
    /// on each local cache hit without the allocating round trip of a shared-data read. Only used
    /// when it was seen to work (`mirror_works`): Envoy's `stats_matcher` can turn a wasm stat
    /// into one that always reads 0.
    pub revocations: Option<u32>,
    pub mirror_works: bool,
    /// The Envoy's placement salt (`shared::agree_salt` at configuration).
    pub salt: Salt,
}

impl HostStore {
    /// Whether the `revenprox_revocations` gauge keeps what is written to it: +1, read, -1.
    pub fn probe_mirror(&self) -> bool {
        let Some(id) = self.revocations else {
            return false;
        };
        let before = abi::get_metric(id).unwrap_or(0);
        if abi::increment_metric(id, 1).is_err() {
            return false;
        }
        let after = abi::get_metric(id).unwrap_or(0);
        let _ = abi::increment_metric(id, -1);
        after > before
    }
}

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        abi::get_shared_data(&format!("{}{key}", self.prefix)).unwrap_or((None, None))
    }

    fn set(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        match abi::set_shared_data(&format!("{}{key}", self.prefix), value, cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(SetError::CasMismatch),
            Err(_) => Err(SetError::Refused),
        }
    }

    fn revocations(&self) -> u64 {
        match self.revocations {
            Some(id) if self.mirror_works => abi::get_metric(id).unwrap_or(0),
            _ => shared::revocations_stored(self),
        }
    }

    fn revoke(&mut self) {
        shared::count_revocation(self);
        if let Some(id) = self.revocations {
            let _ = abi::increment_metric(id, 1);
        }
    }

    fn salt(&self) -> Salt {
        self.salt
    }

    fn set_salt(&mut self, salt: Salt) {
        self.salt = salt;
    }
}
