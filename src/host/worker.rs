//! Per-worker state shared by the root context and the worker's HTTP streams, and the verifier
//! that runs on it: cache lookup, single flight, breaker and rate-limit admission, webhook calls,
//! retries, and the fan-out of one verdict to every stream waiting for it.
//!
//! A webhook call's answer goes to the context that made it: the stream that started the flight,
//! or the root context for retries (made from its timer). Either hands the answer to `answered`,
//! so there is one way through whatever context receives it.

use super::abi;
use super::metrics::Metrics;
use super::sessions::{self, Identity, Sessions};
use super::shared;
use lru::LruCache;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};
use revenprox_core::auth::cache;
use revenprox_core::auth::gate::Verification;
use revenprox_core::auth::reply::{Code, Reply};
use revenprox_core::auth::token::Kind;
use revenprox_core::auth::verdict::{self, Failure, Verdict, MAX_BODY};
use revenprox_core::config::Config;
use revenprox_core::resilience::breaker::{self, Admit};
use revenprox_core::resilience::flight::{FlightKey, Flights, Left, Waiter};
use revenprox_core::sse::registry;
use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::time::Duration;

pub struct Worker {
    pub cfg: Rc<Config>,
    pub metrics: Metrics,
    flights: Flights<Verification>,
    /// Webhook call token → the context that made it (its answer goes there).
    call_owner: HashMap<u32, u32>,
    root_id: u32,
    /// The tick period currently set, to avoid redundant host calls.
    tick_ms: u64,
    breaker_seen: Option<breaker::State>,
    pub sessions: Sessions,
    /// Recent verdicts of this worker, in front of the shared cache: a hit costs no SHA-256 and
    /// no shared-data read. Entries live no longer than their shared-cache twins.
    local: Option<LruCache<String, Local>>,
}

/// A verdict in the worker's local cache.
#[derive(Debug, Clone)]
struct Local {
    until_ms: u64,
    expires_at: u64,
    user_id: String,
}

/// At most this many verdicts per worker in the local cache (never more than `cache_max_size`).
const LOCAL_CACHE_MAX: u32 = 1024;

fn local_key(v: &Verification) -> String {
    let mut k = String::with_capacity(v.credential.value.len() + v.topic_id.len() + 1);
    k.push_str(&v.topic_id);
    k.push('\n');
    k.push_str(&v.credential.value);
    k
}

pub type WorkerRef = Rc<RefCell<Worker>>;

impl Worker {
    pub fn new(cfg: Rc<Config>, metrics: Metrics, root_id: u32) -> Worker {
        let capacity = cfg.verifier.cache_max_size.min(LOCAL_CACHE_MAX);
        let local = (cfg.verifier.cache_enabled())
            .then(|| NonZeroUsize::new(usize::try_from(capacity).unwrap_or(1)))
            .flatten()
            .map(LruCache::new);
        Worker {
            local,
            cfg,
            metrics,
            flights: Flights::default(),
            call_owner: HashMap::new(),
            root_id,
            tick_ms: 0,
            breaker_seen: None,
            sessions: Sessions::default(),
        }
    }

    fn local_get(&mut self, key: &str, now_ms: u64) -> Option<Local> {
        let cache = self.local.as_mut()?;
        match cache.get(key) {
            Some(hit) if hit.until_ms > now_ms => Some(hit.clone()),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        }
    }

    fn local_put(&mut self, key: String, until_ms: u64, expires_at: u64, user_id: &str) {
        if let Some(cache) = self.local.as_mut() {
            cache.put(key, Local { until_ms, expires_at, user_id: user_id.to_string() });
        }
    }

    fn breaker_settings(&self) -> breaker::Settings {
        let v = &self.cfg.verifier;
        breaker::Settings {
            threshold: v.circuit_breaker_threshold,
            open_ms: v.circuit_breaker_timeout_sec.saturating_mul(1000),
            // A probe that has not reported back after every try it may make is lost.
            probe_timeout_ms: (v.timeout_ms + 1000).saturating_mul(u64::from(v.retry_attempts) + 1),
        }
    }

    /// Keeps the `revenprox_circuit_state` gauge on the state this worker last saw.
    fn observe_breaker(&mut self, state: breaker::State) {
        if self.breaker_seen.map(breaker::State::gauge) != Some(state.gauge()) {
            self.breaker_seen = Some(state);
            Metrics::record(self.metrics.circuit_state, state.gauge());
        }
    }
}

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// A local reply to the current effective context.
pub fn reply(metrics: &Metrics, reply: &Reply) {
    metrics.denied(reply.code);
    log::debug!("revenprox: refused with {} ({})", reply.code.as_str(), reply.message);
    let headers = reply.headers();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(status) = abi::send_response(reply.code.status(), &headers, reply.body().as_bytes()) {
        log::warn!("revenprox: local reply failed: {status:?}");
    }
}

/// Sets the verified identity on the current effective context's request.
pub fn forward(cfg: &Config, metrics: &Metrics, user_id: Option<&str>) -> bool {
    let ok = user_id
        .is_none_or(|u| abi::set_header(MapType::HttpRequestHeaders, &cfg.user_header, u.as_bytes()).is_ok());
    if ok {
        Metrics::inc(metrics.allowed);
    } else {
        reply(metrics, &Reply::new(Code::AuthUnavailable, "the request could not be forwarded"));
    }
    ok
}

/// The outcome of `begin` for the request headers callback.
pub enum Begun {
    /// Allowed from the cache: continue at once (identity already set).
    Allowed,
    /// Waiting for a verdict, or answered locally.
    Paused,
}

/// Starts verifying for stream `ctx` (called from its request headers callback).
pub fn begin(w: &WorkerRef, ctx: u32, v: Verification, now_ms: u64) -> Begun {
    let (cfg, metrics) = {
        let wb = w.borrow();
        (Rc::clone(&wb.cfg), wb.metrics.clone())
    };
    let waiter = Waiter { context_id: ctx, reauth: v.reauth };
    let allowed_from_cache = |user_id: &str, expires_at: u64| {
        Metrics::inc(metrics.cache_hits);
        if allow(w, &waiter, user_id, expires_at, &v.topic_id, now_ms) && !v.reauth {
            Begun::Allowed
        } else {
            Begun::Paused
        }
    };
    // SHA-256 of the token, computed at most once and only past the local cache.
    let sha = std::cell::OnceCell::new();
    let key_of = || *sha.get_or_init(|| v.key());
    if v.cacheable {
        let lk = local_key(&v);
        let local = w.borrow_mut().local_get(&lk, now_ms);
        if let Some(hit) = local {
            return allowed_from_cache(&hit.user_id, hit.expires_at);
        }
        if let Some(hit) = shared::cache_get(&key_of(), cfg.verifier.cache_max_size, now_ms) {
            w.borrow_mut().local_put(lk, hit.until_ms, hit.expires_at, &hit.user_id);
            return allowed_from_cache(&hit.user_id, hit.expires_at);
        }
        Metrics::inc(metrics.cache_misses);
    }
    let key = match v.credential.kind {
        Kind::Jwt => FlightKey::Shared(key_of()),
        Kind::Ticket => FlightKey::Solo(ctx),
    };
    if w.borrow_mut().flights.join(key, waiter) {
        Metrics::inc(metrics.singleflight_joins);
        return Begun::Paused;
    }

    let settings = w.borrow().breaker_settings();
    let (admit, state) = shared::breaker_admit(&settings, now_ms);
    w.borrow_mut().observe_breaker(state);
    let probe = match admit {
        Admit::Allow => false,
        Admit::Probe => {
            log::info!("revenprox: circuit half-open: probing the webhook");
            true
        }
        Admit::Reject { retry_after_ms } => {
            Metrics::inc(metrics.circuit_rejected);
            reply(
                &metrics,
                &Reply::new(Code::AuthUnavailable, "authentication is unavailable (circuit open)")
                    .retry_after(secs_ceil(retry_after_ms)),
            );
            return Begun::Paused;
        }
    };
    let (take, flip) = shared::limiter_take(cfg.verifier.rate_limit_per_sec, now_ms);
    log_limiting(flip, cfg.verifier.rate_limit_per_sec);
    if !take.allowed {
        Metrics::inc(metrics.rate_limited);
        if probe {
            // Nothing was tried: the next verification may probe.
            shared::breaker_abandon_probe(now_ms);
        }
        reply(
            &metrics,
            &Reply::new(Code::RateLimited, "too many verifications, retry later")
                .retry_after(secs_ceil(take.wait_ms)),
        );
        return Begun::Paused;
    }
    w.borrow_mut().flights.start(key, v, waiter, probe, now_ms);
    call(w, key, ctx, now_ms);
    Begun::Paused
}

fn log_limiting(flip: Option<bool>, rate: u32) {
    match flip {
        Some(true) => {
            log::warn!("revenprox: rate limiting started: over {rate} webhook verifications per second")
        }
        Some(false) => log::info!("revenprox: rate limiting ended"),
        None => {}
    }
}

/// Makes the flight's next webhook call from context `owner` (the active one).
fn call(w: &WorkerRef, key: FlightKey, owner: u32, now_ms: u64) {
    let (cfg, metrics, request) = {
        let wb = w.borrow();
        let Some(f) = wb.flights.get(&key) else {
            return;
        };
        let body = verdict::request_body(&f.verification.credential.value, &f.verification.topic_id);
        (Rc::clone(&wb.cfg), wb.metrics.clone(), (body, f.attempts))
    };
    let (body, attempts) = request;
    let Some(webhook) = &cfg.verifier.webhook else {
        finish(w, key, Verdict::Failure(Failure::NoResponse), now_ms);
        return;
    };
    let headers = vec![
        (":method", "POST"),
        (":path", webhook.path.as_str()),
        (":authority", webhook.authority.as_str()),
        ("content-type", "application/json"),
    ];
    let timeout = Duration::from_millis(cfg.verifier.timeout_ms);
    match hostcalls::dispatch_http_call(&webhook.cluster, headers, Some(body.as_bytes()), vec![], timeout) {
        Ok(token) => {
            Metrics::inc(metrics.webhook_calls);
            if attempts > 0 {
                Metrics::inc(metrics.webhook_retries);
            }
            let mut wb = w.borrow_mut();
            wb.flights.called(key, token, now_ms);
            wb.call_owner.insert(token, owner);
        }
        Err(status) => {
            log::warn!(
                "revenprox: webhook call to cluster {} could not be made: {status:?}",
                webhook.cluster
            );
            // Count it as a call that failed, so retries and the breaker apply as usual.
            w.borrow_mut().flights.attempted(key, now_ms);
            failed(w, key, Failure::NoResponse, now_ms);
        }
    }
}

/// A webhook answer arrived (in whichever context made the call).
pub fn answered(w: &WorkerRef, token: u32, num_headers: usize, body_size: usize, now_ms: u64) {
    let (key, cfg, metrics, started) = {
        let mut wb = w.borrow_mut();
        wb.call_owner.remove(&token);
        let Some(key) = wb.flights.answered(token) else {
            return;
        };
        let started = wb.flights.get(&key).map_or(now_ms, |f| f.call_started_ms);
        (key, Rc::clone(&wb.cfg), wb.metrics.clone(), started)
    };
    let elapsed = now_ms.saturating_sub(started);
    Metrics::record(metrics.webhook_latency_ms, elapsed);
    let status = if num_headers == 0 {
        None
    } else {
        abi::header(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok())
    };
    let body = abi::buffer(BufferType::HttpCallResponseBody, body_size.min(MAX_BODY + 1)).unwrap_or_default();
    match verdict::parse(status, &body, now_ms / 1000) {
        // Envoy answers a call that ran out of time with its own 504 (or with nothing).
        Verdict::Failure(Failure::NoResponse | Failure::Status(504))
            if elapsed.saturating_add(5) >= cfg.verifier.timeout_ms =>
        {
            failed(w, key, Failure::Timeout, now_ms)
        }
        Verdict::Failure(f) => failed(w, key, f, now_ms),
        v => finish(w, key, v, now_ms),
    }
}

/// A call failed: retry later if the flight may, else the verification fails.
fn failed(w: &WorkerRef, key: FlightKey, failure: Failure, now_ms: u64) {
    let (metrics, retries) = {
        let wb = w.borrow();
        (wb.metrics.clone(), wb.cfg.verifier.retry_attempts)
    };
    metrics.webhook_failure(failure);
    match failure {
        Failure::Status(code) => log::warn!("revenprox: webhook call failed (status {code})"),
        other => log::warn!("revenprox: webhook call failed ({})", other.label()),
    }
    let retry_at = w.borrow_mut().flights.retry(&key, retries, now_ms);
    match retry_at {
        Some(_) => reschedule(w, now_ms),
        None => finish(w, key, Verdict::Failure(failure), now_ms),
    }
}

/// Ends a flight: breaker, cache, then every waiting stream gets the verdict.
fn finish(w: &WorkerRef, key: FlightKey, verdict: Verdict, now_ms: u64) {
    let Some(flight) = w.borrow_mut().flights.finish(&key) else {
        return;
    };
    let (cfg, metrics, settings) = {
        let wb = w.borrow();
        (Rc::clone(&wb.cfg), wb.metrics.clone(), wb.breaker_settings())
    };
    let ok = !matches!(verdict, Verdict::Failure(_));
    if let Some((before, after)) = shared::breaker_record(ok, flight.probe, &settings, now_ms) {
        w.borrow_mut().observe_breaker(after);
        match (before, after) {
            (_, breaker::State::Open { .. }) => {
                Metrics::inc(metrics.circuit_opened);
                log::warn!(
                    "revenprox: circuit opened: the webhook failed {} consecutive verifications; \
                     refusing verifications for {} s",
                    cfg.verifier.circuit_breaker_threshold,
                    cfg.verifier.circuit_breaker_timeout_sec
                );
            }
            (breaker::State::HalfOpen { .. }, breaker::State::Closed { .. }) => {
                Metrics::inc(metrics.circuit_closed);
                log::info!("revenprox: circuit closed: the webhook answered the probe");
            }
            _ => {}
        }
    }
    if let Verdict::Allow { user_id, expires_at } = &verdict {
        if flight.verification.cacheable {
            if let Some(until_ms) = cache::cache_until_ms(now_ms, cfg.verifier.cache_ttl_sec, *expires_at) {
                let v = &flight.verification;
                let entry = cache::Entry {
                    key: v.key(),
                    until_ms,
                    expires_at: *expires_at,
                    user_id: user_id.clone(),
                };
                shared::cache_put(&entry, cfg.verifier.cache_max_size, now_ms);
                w.borrow_mut().local_put(local_key(v), until_ms, *expires_at, user_id);
            }
        }
    }
    for waiter in &flight.waiters {
        if hostcalls::set_effective_context(waiter.context_id).is_err() {
            continue; // that stream is gone
        }
        match &verdict {
            Verdict::Allow { user_id, expires_at } => {
                let topic = &flight.verification.topic_id;
                if allow(w, waiter, user_id, *expires_at, topic, now_ms) && !waiter.reauth {
                    if let Err(status) = abi::resume_request() {
                        log::warn!("revenprox: resuming a request failed: {status:?}");
                    }
                }
            }
            Verdict::Deny(_) => reply(&metrics, &Reply::new(Code::InvalidToken, "the token was refused")),
            Verdict::Failure(_) => {
                reply(&metrics, &Reply::new(Code::AuthUnavailable, "authentication is unavailable"))
            }
        }
    }
}

/// An allowed verdict for one waiter (in its effective context). A stream request gets its
/// identity and goes upstream (`true`: resume it); a challenge response is answered here: 204 when
/// the user has an open stream on the topic (which then takes the new expiry), else 403.
fn allow(
    w: &WorkerRef,
    waiter: &Waiter,
    user_id: &str,
    expires_at: u64,
    topic_id: &str,
    now_ms: u64,
) -> bool {
    let (cfg, metrics) = {
        let wb = w.borrow();
        (Rc::clone(&wb.cfg), wb.metrics.clone())
    };
    if !waiter.reauth {
        let ok = forward(&cfg, &metrics, Some(user_id));
        if ok {
            let identity =
                Identity { user_id: user_id.to_string(), topic_id: topic_id.to_string(), expires_at };
            sessions::allowed(w, waiter.context_id, identity);
        }
        return ok;
    }
    let key = registry::key(user_id, topic_id);
    // A stream on this worker opened so recently that no tick has registered it yet counts too.
    let present = shared::registry_reauthorize(&key, expires_at, now_ms)
        || (sessions::has_local(w, &key) && {
            shared::registry_touch(&key, now_ms);
            shared::registry_reauthorize(&key, expires_at, now_ms)
        });
    if present {
        sessions::extend_local(w, &key, expires_at);
        reschedule(w, now_ms);
        Metrics::inc(metrics.reauthorizations);
        log::debug!("revenprox: re-authorized a user's streams on topic {topic_id} until {expires_at}");
        if let Err(status) = abi::send_response(204, &[("cache-control", "no-store")], b"") {
            log::warn!("revenprox: local reply failed: {status:?}");
        }
    } else {
        reply(&metrics, &Reply::new(Code::UserMismatch, "the token's user has no open stream on this topic"));
    }
    false
}

/// Root timer: makes the calls that are due (retries, and calls whose maker went away), then
/// the sessions' injections.
pub fn tick(w: &WorkerRef, now_ms: u64) {
    let (due, root) = {
        let wb = w.borrow();
        (wb.flights.due(now_ms), wb.root_id)
    };
    for key in due {
        call(w, key, root, now_ms);
    }
    sessions::tick(w, now_ms);
    reschedule(w, now_ms);
}

/// Stream `ctx` went away: it no longer waits, and a call it made is lost with it.
pub fn leave(w: &WorkerRef, ctx: u32, now_ms: u64) {
    let left = {
        let mut wb = w.borrow_mut();
        let Worker { flights, call_owner, .. } = &mut *wb;
        let left = flights.leave(ctx, |call| call_owner.get(&call) == Some(&ctx));
        if let Some(Left::Waiting { key, orphaned: true }) = left {
            flights.recall(&key, now_ms);
        }
        // Calls this stream made will never be answered to it: forget them.
        call_owner.retain(|_, owner| *owner != ctx);
        left
    };
    match left {
        Some(Left::Waiting { orphaned: true, .. }) => reschedule(w, now_ms),
        // Nobody waits for the half-open probe any more: give it back, or the breaker would
        // refuse every verification in this Envoy until the probe timed out.
        Some(Left::Ended { probe: true, .. }) => shared::breaker_abandon_probe(now_ms),
        _ => {}
    }
}

/// Timer granularity: calls and injections are never early, and at most this late.
const MIN_TICK_MS: u64 = 20;

/// Sets the root's timer to the earliest due call or session deadline (or stops it).
pub fn reschedule(w: &WorkerRef, now_ms: u64) {
    let next = {
        let wb = w.borrow();
        [wb.flights.next_due_ms(), wb.sessions.next_deadline_ms()].into_iter().flatten().min()
    };
    let period = next.map_or(0, |due| due.saturating_sub(now_ms).clamp(MIN_TICK_MS, 1000));
    let mut wb = w.borrow_mut();
    if period != wb.tick_ms {
        wb.tick_ms = period;
        let _ = hostcalls::set_tick_period(Duration::from_millis(period));
    }
}
