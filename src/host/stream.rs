//! HTTP stream context: runs the gate on the request headers, asks the cache and the webhook, and
//! turns the outcome into a forwarded request or a local reply.

use super::abi;
use super::cache_store;
use super::metrics::Metrics;
use super::now_ms;
use crate::auth::cache;
use crate::auth::gate::{self, Step, Verification};
use crate::auth::reply::{Code, Reply};
use crate::auth::verdict::{self, Verdict, MAX_BODY};
use crate::config::Config;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use std::rc::Rc;
use std::time::Duration;

pub struct Stream {
    cfg: Option<Rc<Config>>,
    metrics: Rc<Metrics>,
    /// The verification waiting for the webhook's answer.
    pending: Option<Pending>,
}

struct Pending {
    verification: Verification,
    started_ms: u64,
}

impl Stream {
    pub fn new(cfg: Option<Rc<Config>>, metrics: Rc<Metrics>) -> Stream {
        Stream { cfg, metrics, pending: None }
    }

    fn request_header(name: &str) -> Option<Vec<u8>> {
        abi::header(MapType::HttpRequestHeaders, name).ok().flatten()
    }

    /// Answers locally; the request never reaches the upstream.
    fn reply(&self, reply: &Reply) {
        self.metrics.denied(reply.code);
        log::debug!("revenprox: refused with {} ({})", reply.code.as_str(), reply.message);
        let headers = reply.headers();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(status) = abi::send_response(reply.code.status(), &headers, reply.body().as_bytes()) {
            log::warn!("revenprox: local reply failed: {status:?}");
        }
    }

    /// Lets the request go upstream, with the verified identity when there is one.
    fn forward(&self, cfg: &Config, user_id: Option<&str>, path: Option<&str>) -> bool {
        if let Some(path) = path {
            if abi::set_header(MapType::HttpRequestHeaders, ":path", path.as_bytes()).is_err() {
                return false;
            }
        }
        if let Some(user) = user_id {
            if abi::set_header(MapType::HttpRequestHeaders, &cfg.user_header, user.as_bytes()).is_err() {
                return false;
            }
        }
        Metrics::inc(self.metrics.allowed);
        true
    }

    /// Cache first, then the webhook. Returns the action for the request headers callback.
    fn verify(&mut self, cfg: &Config, v: Verification, now: u64) -> Action {
        if let Some(key) = &v.cache_key {
            if let Some(hit) = cache_store::get(key, cfg.verifier.cache_max_size, now) {
                Metrics::inc(self.metrics.cache_hits);
                return self.forward_or_fail(cfg, Some(&hit.user_id), v.path.as_deref());
            }
            Metrics::inc(self.metrics.cache_misses);
        }
        let Some(webhook) = &cfg.verifier.webhook else {
            // Unreachable by construction (gate passes everything in development mode).
            self.reply(&Reply::new(Code::AuthUnavailable, "no webhook is configured"));
            return Action::Pause;
        };
        let body = verdict::request_body(&v.credential.value, &v.topic_id);
        let headers = vec![
            (":method", "POST"),
            (":path", webhook.path.as_str()),
            (":authority", webhook.authority.as_str()),
            ("content-type", "application/json"),
        ];
        let timeout = Duration::from_millis(cfg.verifier.timeout_ms);
        match self.dispatch_http_call(&webhook.cluster, headers, Some(body.as_bytes()), vec![], timeout) {
            Ok(_) => {
                Metrics::inc(self.metrics.webhook_calls);
                self.pending = Some(Pending { verification: v, started_ms: now });
                Action::Pause
            }
            Err(status) => {
                Metrics::inc(self.metrics.webhook_failures);
                log::warn!(
                    "revenprox: webhook call to cluster {} could not be made: {status:?}",
                    webhook.cluster
                );
                self.reply(&Reply::new(Code::AuthUnavailable, "authentication is unavailable"));
                Action::Pause
            }
        }
    }

    fn forward_or_fail(&self, cfg: &Config, user_id: Option<&str>, path: Option<&str>) -> Action {
        if self.forward(cfg, user_id, path) {
            Action::Continue
        } else {
            self.reply(&Reply::new(Code::AuthUnavailable, "the request could not be forwarded"));
            Action::Pause
        }
    }

    fn resume(&self) {
        if let Err(status) = abi::resume_request() {
            log::warn!("revenprox: resuming the request failed: {status:?}");
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let Some(cfg) = self.cfg.clone() else {
            return;
        };
        let now = now_ms();
        Metrics::record(self.metrics.webhook_latency_ms, now.saturating_sub(pending.started_ms));
        let status = abi::header(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u32>().ok());
        let body =
            abi::buffer(BufferType::HttpCallResponseBody, body_size.min(MAX_BODY + 1)).unwrap_or_default();
        let v = pending.verification;
        match verdict::parse(status, &body, now / 1000) {
            Verdict::Allow { user_id, expires_at } => {
                if let Some(key) = v.cache_key {
                    if let Some(until_ms) = cache::cache_until_ms(now, cfg.verifier.cache_ttl_sec, expires_at)
                    {
                        let entry = cache::Entry { key, until_ms, expires_at, user_id: user_id.clone() };
                        cache_store::put(&entry, cfg.verifier.cache_max_size, now);
                    }
                }
                if self.forward(&cfg, Some(&user_id), v.path.as_deref()) {
                    self.resume();
                } else {
                    self.reply(&Reply::new(Code::AuthUnavailable, "the request could not be forwarded"));
                }
            }
            Verdict::Deny(_) => {
                self.reply(&Reply::new(Code::InvalidToken, "the token was refused"));
            }
            Verdict::Failure(failure) => {
                Metrics::inc(self.metrics.webhook_failures);
                log::warn!(
                    "revenprox: webhook failure ({}{}) for topic {}",
                    failure.label(),
                    status.map(|s| format!(" {s}")).unwrap_or_default(),
                    v.topic_id
                );
                self.reply(&Reply::new(Code::AuthUnavailable, "authentication is unavailable"));
            }
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(cfg) = self.cfg.clone() else {
            self.reply(&Reply::new(Code::AuthUnavailable, "the filter is not configured"));
            return Action::Pause;
        };
        Metrics::inc(self.metrics.requests);
        // Never trust a client-supplied identity: the header is ours alone.
        if abi::remove_header(MapType::HttpRequestHeaders, &cfg.user_header).is_err() {
            self.reply(&Reply::new(Code::AuthUnavailable, "the request could not be processed"));
            return Action::Pause;
        }
        let path = Self::request_header(":path").and_then(|p| String::from_utf8(p).ok()).unwrap_or_default();
        let authorization = Self::request_header("authorization");
        let cookie = Self::request_header("cookie");
        let now = now_ms();
        let request =
            gate::Request { path: &path, authorization: authorization.as_deref(), cookie: cookie.as_deref() };
        match gate::admit(&cfg, &request, now / 1000) {
            Step::Reply(reply) => {
                self.reply(&reply);
                Action::Pause
            }
            Step::Pass { path } => self.forward_or_fail(&cfg, None, path.as_deref()),
            Step::Verify(v) => self.verify(&cfg, v, now),
        }
    }
}
