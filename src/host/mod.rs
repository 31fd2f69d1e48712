//! The host edge: the only code that calls proxy-wasm. It turns host callbacks into calls on the
//! core (`auth`, `config`) and the core's decisions into host calls. No policy lives here.

mod abi;
mod metrics;
pub mod root;
mod sessions;
mod shared;
mod stream;
mod worker;

use std::time::UNIX_EPOCH;

/// Host time in Unix milliseconds (0 if the host cannot tell, which fails every expiry check
/// safely: cached entries and verdicts are judged against a time long past).
fn now_ms() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
