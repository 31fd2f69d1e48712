//! The verifier of one worker: cache (a local LRU in front of the Envoy-wide slots), single flight,
//! breaker and rate-limit admission, webhook calls and their retries, and the fan-out of one
//! verdict to every request waiting for it.
//!
//! A webhook call is made from the context whose callback is running (its answer comes back
//! there): the request's own stream for a flight's first call, the root context's timer for
//! retries and for calls whose maker went away. Every verdict goes back to the engine as a
//! `Finished` (the verification and its waiters), which answers, forwards, re-authorizes or ends
//! streams according to each waiter's purpose.
//!
//! A re-verification (an open stream's credential, asked again) never reads the cache; its fresh
//! verdict updates it. A denial of a credential the cache holds revokes it: the shared slot is
//! emptied and the Envoy-wide revocation count goes up, so every worker drops its local cache.

use super::effect::{Ctx, Effect, Level, WebhookCall};
use super::metrics::Metric;
use super::Io;
use crate::auth::gate::{self, Verification};
use crate::auth::reply::{Code, Reply};
use crate::auth::token::Credential;
use crate::auth::token::Kind;
use crate::auth::verdict::{self, Failure, Verdict};
use crate::auth::{cache, precheck};
use crate::config::Config;
use crate::resilience::breaker::{self, Admit};
use crate::resilience::clients;
use crate::resilience::flight::{FlightKey, Flights, Left, Purpose, Waiter};
use crate::shared::{self, SharedStore};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;

/// At most this many verdicts per worker in the local cache (never more than `cache_max_size`).
const LOCAL_CACHE_MAX: u32 = 1024;

/// A verdict in the worker's local cache.
#[derive(Debug, Clone)]
struct Local {
    until_ms: u64,
    expires_at: u64,
    user_id: String,
    /// What the precheck read from the token (`None` with the precheck off): a hit answers the
    /// precheck from it instead of parsing the token again.
    claims: Option<precheck::Claims>,
}

/// The claims a local cache entry of `v` keeps: `Some(None)` with the precheck off, `None` when
/// the token cannot pass the precheck (then it is not kept locally).
fn cache_claims(cfg: &Config, v: &Verification) -> Option<Option<precheck::Claims>> {
    if !cfg.verifier.precheck {
        return Some(None);
    }
    match v.claims {
        Some(c) => Some(Some(c)),
        None => precheck::claims(&v.credential.value).ok().map(Some),
    }
}

/// What a verification came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdicted {
    /// The webhook (or the cache) allows `user_id` until `expires_at`.
    Allowed { user_id: String, expires_at: u64 },
    /// The webhook said no.
    Denied,
    /// No verdict: the webhook failed after its retries.
    Failed,
    /// Refused before any call (circuit open, rate limited), with the answer to give.
    Refused(Reply),
}

impl Verdicted {
    /// The local answer of a request that is not allowed.
    pub fn refusal(&self) -> Option<Reply> {
        match self {
            Verdicted::Allowed { .. } => None,
            Verdicted::Denied => Some(Reply::new(Code::InvalidToken, "the token was refused")),
            Verdicted::Failed => Some(Reply::new(Code::AuthUnavailable, "authentication is unavailable")),
            Verdicted::Refused(reply) => Some(reply.clone()),
        }
    }
}

/// A verification that came to a verdict, with every stream that waited for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub credential: Credential,
    pub topic_id: String,
    pub verdict: Verdicted,
    pub waiters: Vec<Waiter>,
}

/// What `begin` did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// Decided at once: allowed from the cache, or refused at admission.
    Done(Finished),
    /// Waiting for a verdict.
    Pending,
}

/// Verdicts it takes before a worker trusts that the webhook's user ids are the JWTs' `sub`
/// claims.
const SUBJECT_EVIDENCE: u32 = 10;

/// What this worker learned of the webhook's user ids: whether they are the JWTs' `sub` claims.
/// Once they are (`SUBJECT_EVIDENCE` verdicts agreed, none disagreed, and no worker of this Envoy
/// saw one disagree: `SharedStore::user_ids_not_sub`), a challenge response whose claimed user has
/// no open stream on the topic here is refused without asking the webhook (a misrouted refresh
/// costs nothing). One disagreement anywhere in the Envoy turns it off for good. It only ever
/// refuses early what the webhook's verdict would have refused too; it never allows anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Subjects {
    matches: u32,
    mismatch: bool,
}

impl Subjects {
    pub fn trusted(&self) -> bool {
        !self.mismatch && self.matches >= SUBJECT_EVIDENCE
    }

    /// Learns from an allow verdict; false when its `user_id` is not the claimed `sub`.
    fn learn(&mut self, claimed: Option<&str>, user_id: &str) -> bool {
        match claimed {
            Some(sub) if sub == user_id => {
                self.matches = self.matches.saturating_add(1);
                true
            }
            _ => {
                self.mismatch = true;
                false
            }
        }
    }
}

pub struct Verifier {
    flights: Flights<Verification>,
    /// Webhook call token → the context that made it (its answer goes there).
    call_owner: HashMap<u32, Ctx>,
    /// Recent verdicts of this worker, in front of the shared cache: a hit costs no SHA-256 and
    /// no shared-data read. Entries live no longer than their shared-cache twins.
    local: Option<LruCache<String, Local>>,
    /// The Envoy-wide revocation count when the local cache was (re)started.
    local_epoch: u64,
    /// The breaker state this worker last reported in `revenprox_circuit_state`.
    breaker_seen: Option<u64>,
    subjects: Subjects,
    /// For each flight: the Envoy-wide revocation count when its verdict was asked for, and
    /// whether it was asked again already (`stale_allow`).
    asked_at: HashMap<FlightKey, Asked>,
}

#[derive(Debug, Clone, Copy)]
struct Asked {
    revocations: u64,
    again: bool,
}

fn local_key(v: &Verification) -> String {
    let mut k = String::with_capacity(v.credential.value.len() + v.topic_id.len() + 1);
    k.push_str(&v.topic_id);
    k.push('\n');
    k.push_str(&v.credential.value);
    k
}

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The Envoy-wide breaker: it opens only on failures of several client addresses (at most 3, at
/// most the threshold).
pub fn breaker_settings(cfg: &Config) -> breaker::Settings {
    let v = &cfg.verifier;
    breaker::Settings {
        threshold: v.circuit_breaker_threshold,
        open_ms: v.circuit_breaker_timeout_sec.saturating_mul(1000),
        // A probe that has not reported back after every try it may make is lost.
        probe_timeout_ms: (v.timeout_ms + 1000).saturating_mul(u64::from(v.retry_attempts) + 1),
        min_clients: v.circuit_breaker_threshold.min(3),
    }
}

/// A client address's own breaker: the same threshold and timeout, its failures alone.
fn client_breaker_settings(cfg: &Config) -> breaker::Settings {
    breaker::Settings { min_clients: 1, ..breaker_settings(cfg) }
}

impl Verifier {
    pub fn new(cfg: &Config) -> Verifier {
        let capacity = cfg.verifier.cache_max_size.min(LOCAL_CACHE_MAX);
        let local = (cfg.verifier.cache_enabled())
            .then(|| NonZeroUsize::new(usize::try_from(capacity).unwrap_or(1)))
            .flatten()
            .map(LruCache::new);
        Verifier {
            flights: Flights::default(),
            call_owner: HashMap::new(),
            local,
            local_epoch: 0,
            breaker_seen: None,
            subjects: Subjects::default(),
            asked_at: HashMap::new(),
        }
    }

    /// Whether the webhook's user ids are the JWTs' `sub` claims, as far as this worker saw.
    pub fn subjects(&self) -> Subjects {
        self.subjects
    }

    /// The earliest scheduled call, for the timer.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.flights.next_due_ms()
    }

    /// Flights in progress (for tests and invariants).
    pub fn flights(&self) -> &Flights<Verification> {
        &self.flights
    }

    /// The keys of the flights in progress.
    pub fn flights_keys(&self) -> Vec<FlightKey> {
        self.flights.keys()
    }

    /// Calls in progress, by host token, with the context that made each.
    pub fn calls(&self) -> &HashMap<u32, Ctx> {
        &self.call_owner
    }

    fn local_put<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        v: &Verification,
        until_ms: u64,
        expires_at: u64,
        user_id: &str,
    ) {
        let Some(claims) = cache_claims(io.cfg, v) else {
            return;
        };
        if let Some(cache) = self.local_cache(io) {
            cache.put(local_key(v), Local { until_ms, expires_at, user_id: user_id.to_string(), claims });
        }
    }

    /// Keeps the `revenprox_circuit_state` gauge on the state this worker last saw.
    fn observe_breaker<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, state: breaker::State) {
        let gauge = state.gauge();
        if self.breaker_seen != Some(gauge) {
            self.breaker_seen = Some(gauge);
            io.tally.set(Metric::CircuitState, gauge);
        }
    }

    /// The local cache, dropped when a credential was revoked anywhere in the Envoy since it was
    /// filled.
    fn local_cache<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
    ) -> Option<&mut LruCache<String, Local>> {
        let cache = self.local.as_mut()?;
        let revocations = io.store.revocations();
        if revocations != self.local_epoch {
            cache.clear();
            self.local_epoch = revocations;
        }
        Some(cache)
    }

    /// Starts verifying `v` for stream `ctx` (its request headers callback, or, for a
    /// re-verification, the timer; then `ctx` is the stream and calls are made from `from`).
    pub(crate) fn begin<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        ctx: Ctx,
        from: Ctx,
        mut v: Verification,
        purpose: Purpose,
        client: &mut dyn FnMut() -> Option<clients::Key>,
    ) -> Started {
        let waiter = Waiter { context_id: ctx, purpose };
        let now_ms = io.now_ms;
        let done = |v: &Verification, verdict: Verdicted| {
            Started::Done(Finished {
                credential: v.credential.clone(),
                topic_id: v.topic_id.clone(),
                verdict,
                waiters: vec![waiter],
            })
        };
        // SHA-256 of the token, computed at most once and only past the local cache.
        let mut sha: Option<cache::Key> = None;
        let mut key_of = |v: &Verification| *sha.get_or_insert_with(|| v.key());
        // A re-verification asks the webhook, never the cache.
        if v.cacheable && purpose != Purpose::Reverify {
            let lk = local_key(&v);
            let now_sec = now_ms / 1000;
            let hit = self.local_cache(io).and_then(|c| match c.get(&lk) {
                Some(hit) if hit.until_ms > now_ms => Some(hit.clone()),
                Some(_) => {
                    c.pop(&lk);
                    None
                }
                None => None,
            });
            if let Some(hit) = hit {
                // The precheck passed for this token before; only its `exp` can have passed since.
                if v.precheck_due && hit.claims.is_some_and(|c| !c.unexpired(now_sec)) {
                    if let Some(c) = self.local.as_mut() {
                        c.pop(&lk);
                    }
                    let reply = Reply::new(Code::InvalidToken, "the token has expired");
                    return done(&v, Verdicted::Refused(reply));
                }
                io.tally.inc(Metric::CacheHits);
                return done(&v, Verdicted::Allowed { user_id: hit.user_id, expires_at: hit.expires_at });
            }
            if v.precheck_due {
                match gate::precheck(&v.credential.value, now_sec) {
                    Ok(claims) => {
                        v.claims = Some(claims);
                        v.precheck_due = false;
                    }
                    Err(reply) => return done(&v, Verdicted::Refused(reply)),
                }
            }
            if let Some(hit) =
                shared::cache_get(io.store, &key_of(&v), io.cfg.verifier.cache_max_size, now_ms)
            {
                self.local_put(io, &v, hit.until_ms, hit.expires_at, &hit.user_id);
                io.tally.inc(Metric::CacheHits);
                return done(&v, Verdicted::Allowed { user_id: hit.user_id, expires_at: hit.expires_at });
            }
            io.tally.inc(Metric::CacheMisses);
        }
        let key = match v.credential.kind {
            Kind::Jwt => FlightKey::Shared(key_of(&v)),
            Kind::Ticket => FlightKey::Solo(ctx),
        };
        if self.flights.join(key, waiter) {
            io.tally.inc(Metric::SingleflightJoins);
            return Started::Pending;
        }
        // The client's own circuit first: a client whose verifications keep failing is refused at
        // once, and never opens the circuit for the others.
        let client_rate = io.cfg.verifier.rate_limit_per_client_per_sec;
        v.client = if purpose == Purpose::Reverify { None } else { client() };
        // How much of its share the client asked for in the last second (its priority for the
        // budget below); this verification is charged to it, whatever comes of it.
        let mut used = 0;
        if let Some(ck) = v.client {
            let settings = client_breaker_settings(io.cfg);
            let admitted = shared::client_update(io.store, &ck, client_rate, now_ms, |r| {
                let used = clients::charge(r, client_rate, now_ms);
                let (admit, next) = breaker::admit(r.breaker, now_ms, &settings);
                if let Some(next) = next {
                    r.breaker = next;
                }
                (admit, used)
            });
            used = admitted.map_or(0, |(_, used)| used);
            match admitted.map(|(admit, _)| admit) {
                Some(Admit::Reject { retry_after_ms }) => {
                    io.tally.inc(Metric::ClientCircuitRejected);
                    let reply =
                        Reply::new(Code::AuthUnavailable, "authentication is unavailable (circuit open)")
                            .retry_after(secs_ceil(retry_after_ms));
                    return done(&v, Verdicted::Refused(reply));
                }
                Some(Admit::Probe) => v.client_probe = true,
                Some(Admit::Allow) | None => {}
            }
        }
        let (admit, state) = shared::breaker_admit(io.store, &breaker_settings(io.cfg), now_ms);
        self.observe_breaker(io, state);
        let probe = match admit {
            Admit::Allow => false,
            Admit::Probe => {
                io.log(Level::Info, "revenprox: circuit half-open: probing the webhook".to_string());
                true
            }
            Admit::Reject { retry_after_ms } => {
                io.tally.inc(Metric::CircuitRejected);
                self.abandon_client_probe(io, &v);
                let reply = Reply::new(Code::AuthUnavailable, "authentication is unavailable (circuit open)")
                    .retry_after(secs_ceil(retry_after_ms));
                return done(&v, Verdicted::Refused(reply));
            }
        };
        // The budget: a client takes from the Envoy-wide bucket only while at least the fraction of
        // its share it asked for is left there (the filter's own re-verifications: always).
        let rate = io.cfg.verifier.rate_limit_per_sec;
        let (take, flip) = shared::limiter_take(io.store, rate, clients::floor(used, rate), now_ms);
        match flip {
            Some(true) => io.log(
                Level::Warn,
                format!("revenprox: rate limiting started: over {rate} webhook verifications per second"),
            ),
            Some(false) => io.log(Level::Info, "revenprox: rate limiting ended".to_string()),
            None => {}
        }
        if !take.allowed {
            io.tally.inc(Metric::RateLimited);
            if probe {
                // Nothing was tried: the next verification may probe.
                shared::breaker_abandon_probe(io.store, now_ms);
            }
            self.abandon_client_probe(io, &v);
            let reply = Reply::new(Code::RateLimited, "too many verifications, retry later")
                .retry_after(secs_ceil(take.wait_ms));
            return done(&v, Verdicted::Refused(reply));
        }
        if purpose == Purpose::Reverify {
            io.tally.inc(Metric::Reverifications);
        }
        self.flights.start(key, v, waiter, probe, now_ms);
        self.asked_at.insert(key, Asked { revocations: io.store.revocations(), again: false });
        match self.call(io, key, from).pop() {
            Some(finished) => Started::Done(finished),
            None => Started::Pending,
        }
    }

    /// Gives back a client's half-open probe that was admitted but never made.
    fn abandon_client_probe<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, v: &Verification) {
        if let (Some(ck), true) = (v.client, v.client_probe) {
            let rate = io.cfg.verifier.rate_limit_per_client_per_sec;
            let now_ms = io.now_ms;
            shared::client_update(io.store, &ck, rate, now_ms, |r| {
                if let Some(next) = breaker::abandon_probe(r.breaker, now_ms) {
                    r.breaker = next;
                }
            });
        }
    }

    /// Makes the flight's next webhook call from context `from` (the one whose callback runs).
    fn call<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, key: FlightKey, from: Ctx) -> Vec<Finished> {
        let Some(f) = self.flights.get(&key) else {
            return Vec::new();
        };
        let Some(webhook) = &io.cfg.verifier.webhook else {
            return self.finish(io, key, Verdict::Failure(Failure::NoResponse));
        };
        let credential = &f.verification.credential;
        let body = verdict::request_body(
            &credential.value,
            &f.verification.topic_id,
            credential.kind == Kind::Ticket,
        );
        let call = WebhookCall {
            cluster: webhook.cluster.clone(),
            authority: webhook.authority.clone(),
            path: webhook.path.clone(),
            body,
            timeout_ms: io.cfg.verifier.timeout_ms,
        };
        io.out.push(Effect::Dispatch { from, key, call });
        Vec::new()
    }

    /// The host made (or refused) the call `Dispatch` asked for.
    pub(crate) fn dispatched<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        key: FlightKey,
        from: Ctx,
        token: Option<u32>,
    ) -> Vec<Finished> {
        let Some(f) = self.flights.get(&key) else {
            return Vec::new();
        };
        let retry = f.attempts > 0;
        match token {
            Some(token) => {
                io.tally.inc(Metric::WebhookCalls);
                if retry {
                    io.tally.inc(Metric::WebhookRetries);
                }
                self.flights.called(key, token, io.now_ms);
                self.call_owner.insert(token, from);
                Vec::new()
            }
            None => {
                let cluster = io.cfg.verifier.webhook.as_ref().map_or("", |w| w.cluster.as_str());
                io.log(
                    Level::Warn,
                    format!("revenprox: webhook call to cluster {cluster} could not be made"),
                );
                // Count it as a call that failed, so retries and the breaker apply as usual.
                self.flights.attempted(key, io.now_ms);
                self.failed(io, key, Failure::NoResponse)
            }
        }
    }

    /// A webhook answer arrived (in whichever context made the call).
    pub(crate) fn answered<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        token: u32,
        status: Option<u32>,
        body: &[u8],
    ) -> Vec<Finished> {
        self.call_owner.remove(&token);
        let Some(key) = self.flights.answered(token) else {
            return Vec::new();
        };
        let now_ms = io.now_ms;
        let started = self.flights.get(&key).map_or(now_ms, |f| f.call_started_ms);
        let elapsed = now_ms.saturating_sub(started);
        io.tally.record(Metric::WebhookLatencyMs, elapsed);
        match verdict::parse(status, body, now_ms / 1000) {
            // Envoy answers a call that ran out of time with its own 504 (or with nothing).
            Verdict::Failure(Failure::NoResponse | Failure::Status(504))
                if elapsed.saturating_add(5) >= io.cfg.verifier.timeout_ms =>
            {
                self.failed(io, key, Failure::Timeout)
            }
            Verdict::Failure(f) => self.failed(io, key, f),
            Verdict::Allow { .. } if self.stale_allow(io, key) => {
                // Decided before a revocation that happened meanwhile: it may be about a credential
                // revoked since. Ask once more (from the timer, at once).
                self.flights.recall(&key, now_ms);
                Vec::new()
            }
            v => self.finish(io, key, v),
        }
    }

    /// A cacheable allow whose call was made before a credential was revoked somewhere in the
    /// Envoy, and that was not asked again yet (once per flight: the second answer stands, uncached if
    /// another revocation happened meanwhile).
    fn stale_allow<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, key: FlightKey) -> bool {
        // Only an allow the cache would keep can revive a revoked credential; asking again about
        // a one-time ticket would be refused (the webhook consumed it on the first call).
        if !self.flights.get(&key).is_some_and(|f| f.verification.cacheable) {
            return false;
        }
        let now = io.store.revocations();
        match self.asked_at.get_mut(&key) {
            Some(asked) if asked.revocations != now && !asked.again => {
                *asked = Asked { revocations: now, again: true };
                true
            }
            _ => false,
        }
    }

    /// A call failed: retry later if the flight may, else the verification fails.
    fn failed<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        key: FlightKey,
        failure: Failure,
    ) -> Vec<Finished> {
        io.tally.inc(Metric::WebhookFailures);
        io.tally.inc(Metric::webhook_failure(failure));
        let line = match failure {
            Failure::Status(code) => format!("revenprox: webhook call failed (status {code})"),
            other => format!("revenprox: webhook call failed ({})", other.label()),
        };
        io.log(Level::Warn, line);
        // A 4xx is the webhook refusing this request as it is: asking again would get the same.
        let retries = match failure {
            Failure::Status(400..=499) => 0,
            _ => io.cfg.verifier.retry_attempts,
        };
        match self.flights.retry(&key, retries, io.now_ms) {
            Some(_) => Vec::new(),
            None => self.finish(io, key, Verdict::Failure(failure)),
        }
    }

    /// Ends a flight: breaker and cache take its verdict, which goes back with its waiters.
    fn finish<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        key: FlightKey,
        verdict: Verdict,
    ) -> Vec<Finished> {
        let Some(flight) = self.flights.finish(&key) else {
            return Vec::new();
        };
        // Whether no credential was revoked since the verdict was asked for: only then may an
        // allow be cached (a revocation meanwhile may have been of this very credential).
        let fresh = self.asked_at.remove(&key).is_none_or(|a| a.revocations == io.store.revocations());
        let now_ms = io.now_ms;
        let ok = !matches!(verdict, Verdict::Failure(_));
        let v = &flight.verification;
        // A 4xx is the webhook refusing one request as sent, which any client can provoke: it says
        // nothing of the webhook's health, so it counts for no circuit (not even the client's own:
        // behind a NAT that would lock out every neighbour); a probe it answered is given back.
        let refused = matches!(verdict, Verdict::Failure(Failure::Status(400..=499)));
        if refused {
            self.abandon_client_probe(io, v);
        } else if let Some(ck) = v.client {
            let settings = client_breaker_settings(io.cfg);
            let rate = io.cfg.verifier.rate_limit_per_client_per_sec;
            let probe = v.client_probe;
            let opened = shared::client_update(io.store, &ck, rate, now_ms, |r| {
                let next = breaker::record(r.breaker, ok, probe, 1, now_ms, &settings);
                let opened = matches!(next, Some(breaker::State::Open { .. }))
                    && !matches!(r.breaker, breaker::State::Open { .. });
                if let Some(next) = next {
                    r.breaker = next;
                }
                opened
            });
            if opened == Some(true) {
                io.tally.inc(Metric::ClientCircuitOpened);
                io.log(
                    Level::Warn,
                    "revenprox: a client's circuit opened: its verifications kept failing".to_string(),
                );
            }
        }
        if refused && flight.probe {
            shared::breaker_abandon_probe(io.store, now_ms);
        }
        let bit = breaker::client_bit(v.client.as_ref());
        let recorded = (!refused)
            .then(|| {
                shared::breaker_record(io.store, ok, flight.probe, bit, &breaker_settings(io.cfg), now_ms)
            })
            .flatten();
        if let Some((before, after)) = recorded {
            self.observe_breaker(io, after);
            match (before, after) {
                (_, breaker::State::Open { .. }) => {
                    io.tally.inc(Metric::CircuitOpened);
                    let v = &io.cfg.verifier;
                    let line = format!(
                        "revenprox: circuit opened: the webhook failed {} consecutive verifications; \
                         refusing verifications for {} s",
                        v.circuit_breaker_threshold, v.circuit_breaker_timeout_sec
                    );
                    io.log(Level::Warn, line);
                }
                (breaker::State::HalfOpen { .. }, breaker::State::Closed { .. }) => {
                    io.tally.inc(Metric::CircuitClosed);
                    io.log(
                        Level::Info,
                        "revenprox: circuit closed: the webhook answered the probe".to_string(),
                    );
                }
                _ => {}
            }
        }
        let v = flight.verification;
        let verdict = match verdict {
            Verdict::Allow { user_id, expires_at } => {
                // A ticket names no sub: its user's streams may be here under an id no JWT claims.
                let claimed = precheck::claimed_subject(&v.credential.value);
                let sub_named =
                    v.credential.kind == Kind::Jwt && self.subjects.learn(claimed.as_deref(), &user_id);
                if !sub_named {
                    // Every worker must hear of it: a refresh may reach one that saw only subs.
                    shared::count_user_id_not_sub(io.store);
                    io.tally.inc(Metric::UserIdNotSub);
                }
                if v.cacheable && fresh {
                    if let Some(until_ms) =
                        cache::cache_until_ms(now_ms, io.cfg.verifier.cache_ttl_sec, expires_at)
                    {
                        let entry =
                            cache::Entry { key: v.key(), until_ms, expires_at, user_id: user_id.clone() };
                        if !shared::cache_put(io.store, &entry, io.cfg.verifier.cache_max_size, now_ms) {
                            io.log(Level::Warn, "revenprox: verdict cache write failed".to_string());
                        }
                        self.local_put(io, &v, until_ms, expires_at, &user_id);
                    }
                }
                Verdicted::Allowed { user_id, expires_at }
            }
            Verdict::Deny(_) => {
                if v.cacheable {
                    let reverified = flight.waiters.iter().any(|w| w.purpose == Purpose::Reverify);
                    self.revoke(io, &v, reverified);
                }
                Verdicted::Denied
            }
            Verdict::Failure(_) => Verdicted::Failed,
        };
        vec![Finished { credential: v.credential, topic_id: v.topic_id, verdict, waiters: flight.waiters }]
    }

    /// A re-verification found that `credential` now names another user: like a denial, no cache
    /// may serve it for `topic_id` again (the allow `finish` just cached included), on any worker.
    pub(crate) fn revoke_credential<S: SharedStore + ?Sized>(
        &mut self,
        io: &mut Io<S>,
        credential: &Credential,
        topic_id: &str,
    ) {
        let v = Verification {
            credential: credential.clone(),
            topic_id: topic_id.to_string(),
            cacheable: true,
            reauth: false,
            client: None,
            client_probe: false,
            precheck_due: false,
            claims: None,
        };
        self.revoke(io, &v, true);
    }

    /// A denial of a credential the cache may hold: the cache must never serve it again. The shared
    /// slot is emptied, and when the credential was cached anywhere (it was: it is being
    /// re-verified, or a cache holds it) the Envoy-wide revocation count goes up, so that every
    /// worker drops its local cache. A denial of a credential never allowed costs nothing (a flood
    /// of forged tokens cannot make workers drop their caches).
    fn revoke<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, v: &Verification, reverified: bool) {
        let key = v.key();
        let slots = io.cfg.verifier.cache_max_size;
        let shared_held = shared::cache_get(io.store, &key, slots, io.now_ms).is_some();
        let lk = local_key(v);
        let local_held = self.local.as_mut().is_some_and(|c| c.pop(&lk).is_some());
        if shared_held {
            shared::cache_remove(io.store, &key, slots);
        }
        if reverified || shared_held || local_held {
            io.store.revoke();
            io.log(Level::Info, format!("revenprox: a credential for topic {} was revoked", v.topic_id));
        }
    }

    /// Timer: makes the calls that are due (retries, and calls whose maker went away), from `root`.
    pub(crate) fn tick<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, root: Ctx) -> Vec<Finished> {
        let mut allowed = Vec::new();
        for key in self.flights.due(io.now_ms) {
            allowed.extend(self.call(io, key, root));
        }
        allowed
    }

    /// Stream `ctx` went away: it no longer waits, and a call it made is lost with it.
    pub(crate) fn leave<S: SharedStore + ?Sized>(&mut self, io: &mut Io<S>, ctx: Ctx) {
        // The flight's verification, in case this departure ends it (a client's probe to give back).
        let waited =
            self.flights.key_of(ctx).and_then(|k| self.flights.get(&k)).map(|f| f.verification.clone());
        let call_owner = &self.call_owner;
        let left = self.flights.leave(ctx, |call| call_owner.get(&call) == Some(&ctx));
        match left {
            Some(Left::Waiting { key, orphaned: true }) => self.flights.recall(&key, io.now_ms),
            // Nobody waits for the half-open probe any more: give it back, or the breaker would
            // refuse every verification in this Envoy until the probe timed out.
            Some(Left::Ended { key, probe }) => {
                self.asked_at.remove(&key);
                if probe {
                    shared::breaker_abandon_probe(io.store, io.now_ms);
                }
                if let Some(v) = waited {
                    self.abandon_client_probe(io, &v);
                }
            }
            _ => {}
        }
        // Calls this stream made will never be answered to it: forget them.
        self.call_owner.retain(|_, owner| *owner != ctx);
    }
}
