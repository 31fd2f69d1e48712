//! HTTP stream context: runs the gate on the request headers and hands verification to the
//! worker's verifier; its webhook answers (when it made the call) go there too.

use super::abi;
use super::metrics::Metrics;
use super::now_ms;
use super::sessions;
use super::worker::{self, Begun, WorkerRef};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};
use revenprox_core::auth::gate::{self, Step};
use revenprox_core::auth::reply::{Code, Reply};
use std::rc::Rc;

pub struct Stream {
    id: u32,
    worker: Option<WorkerRef>,
}

impl Stream {
    pub fn new(id: u32, worker: Option<WorkerRef>) -> Stream {
        Stream { id, worker }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(w) = &self.worker {
            worker::answered(w, token, num_headers, body_size, now_ms());
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(w) = &self.worker {
            sessions::close(w, self.id);
            worker::leave(w, self.id, now_ms());
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(w) = &self.worker {
            let now = now_ms();
            sessions::open(w, self.id, now);
            worker::reschedule(w, now);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match &self.worker {
            Some(w) => sessions::body(w, self.id, body_size, end_of_stream, now_ms()),
            None => Action::Continue,
        }
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(w) = self.worker.clone() else {
            worker::reply(
                &Metrics::default(),
                &Reply::new(Code::AuthUnavailable, "the filter is not configured"),
            );
            return Action::Pause;
        };
        let (cfg, metrics) = {
            let wb = w.borrow();
            (Rc::clone(&wb.cfg), wb.metrics.clone())
        };
        Metrics::inc(metrics.requests);
        // One host call for all request headers; then the client's identity header goes: it is
        // ours alone.
        let headers = abi::headers(MapType::HttpRequestHeaders).unwrap_or_default();
        // Test-only (feature `fault-injection`, never in the shipped build): kill this VM on demand
        // with a trap, what a panic becomes under panic=abort (e2e/test_vm_failure.py).
        #[cfg(feature = "fault-injection")]
        if abi::find(&headers, "x-revenprox-fault") == Some(&b"trap"[..]) {
            core::arch::wasm32::unreachable();
        }
        if abi::find(&headers, &cfg.user_header).is_some()
            && abi::remove_header(MapType::HttpRequestHeaders, &cfg.user_header).is_err()
        {
            worker::reply(&metrics, &Reply::new(Code::AuthUnavailable, "the request could not be processed"));
            return Action::Pause;
        }
        let raw_path = abi::find(&headers, ":path").unwrap_or_default();
        // Read leniently so that a path with bytes that are not UTF-8 still loses its token below.
        let lossy = String::from_utf8_lossy(raw_path);
        let path: &str = &lossy;
        // Tokens leave the URL before anything else: the upstream and Envoy's access log never see them.
        if let Some(stripped) = gate::stripped_path(&cfg, path) {
            if abi::set_header(MapType::HttpRequestHeaders, ":path", stripped.as_bytes()).is_err() {
                worker::reply(
                    &metrics,
                    &Reply::new(Code::AuthUnavailable, "the request could not be processed"),
                );
                return Action::Pause;
            }
        }
        if std::str::from_utf8(raw_path).is_err() {
            worker::reply(&metrics, &Reply::new(Code::NoTopic, "the path names no topic"));
            return Action::Pause;
        }
        // Several Cookie headers (HTTP/1.1 clients may send them) are one cookie list.
        let cookies: Vec<&[u8]> =
            headers.iter().filter(|(k, _)| k == "cookie").map(|(_, v)| v.as_slice()).collect();
        let cookie = if cookies.len() > 1 { Some(cookies.join(&b"; "[..])) } else { None };
        let now = now_ms();
        let request = gate::Request {
            method: abi::find(&headers, ":method").unwrap_or_default(),
            path,
            content_type: abi::find(&headers, "content-type"),
            authorization: abi::find(&headers, "authorization"),
            cookie: cookie.as_deref().or_else(|| cookies.first().copied()),
        };
        match gate::admit(&cfg, &request, now / 1000) {
            Step::Reply(reply) => {
                worker::reply(&metrics, &reply);
                Action::Pause
            }
            Step::Pass => {
                if worker::forward(&cfg, &metrics, None) {
                    Action::Continue
                } else {
                    Action::Pause
                }
            }
            Step::Verify(v) => match worker::begin(&w, self.id, v, now) {
                Begun::Allowed => Action::Continue,
                Begun::Paused => Action::Pause,
            },
        }
    }
}
