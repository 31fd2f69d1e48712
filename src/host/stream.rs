//! HTTP stream context: every callback is one engine event, then `apply::run` performs what the
//! engine decided.

use super::{abi, apply, now_ms, WorkerRef};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, MapType};
use revenprox_core::auth::reply::{Code, Reply};
use revenprox_core::auth::verdict::MAX_BODY;
use revenprox_core::engine::{ChunkReader, Flow};

pub struct Stream {
    id: u32,
    worker: Option<WorkerRef>,
}

impl Stream {
    pub fn new(id: u32, worker: Option<WorkerRef>) -> Stream {
        Stream { id, worker }
    }
}

fn action(flow: Flow) -> Action {
    match flow {
        Flow::Continue => Action::Continue,
        Flow::Pause => Action::Pause,
    }
}

/// The response chunk being delivered, read on demand.
struct BodyReader;

impl ChunkReader for BodyReader {
    fn read(&mut self, start: usize, len: usize) -> Vec<u8> {
        abi::buffer_at(BufferType::HttpResponseBody, start, len).unwrap_or_default()
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(w) = &self.worker {
            let (status, body) = abi::call_answer(num_headers, body_size, MAX_BODY + 1);
            let now = now_ms();
            w.engine.borrow_mut().call_answered(token, status, &body, now);
            apply::run(w, self.id, Flow::Continue, now);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(w) = &self.worker {
            let now = now_ms();
            w.engine.borrow_mut().stream_done(self.id, now);
            apply::run(w, self.id, Flow::Continue, now);
        }
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(w) = &self.worker else {
            // No configuration took: refuse rather than pass unchecked.
            let reply = Reply::new(Code::AuthUnavailable, "the filter is not configured");
            let headers = reply.headers();
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _ = abi::send_response(
                reply.code.status(),
                "revenprox_not_configured",
                &headers,
                reply.body().as_bytes(),
            );
            return Action::Pause;
        };
        // One host call for all request headers.
        let headers = abi::headers(MapType::HttpRequestHeaders).unwrap_or_default();
        // Test-only (feature `fault-injection`, never in the shipped build): kill this VM on demand
        // with a trap, what a panic becomes under panic=abort (e2e/test_vm_failure.py).
        #[cfg(feature = "fault-injection")]
        if abi::find(&headers, "x-revenprox-fault") == Some(&b"trap"[..]) {
            core::arch::wasm32::unreachable();
        }
        let now = now_ms();
        // Read only when the request needs the webhook (never on a cache hit).
        let mut downstream =
            || abi::property(&["source", "address"]).ok().flatten().and_then(|a| String::from_utf8(a).ok());
        let flow = w.engine.borrow_mut().request_headers(self.id, &headers, &mut downstream, now);
        action(apply::run(w, self.id, flow, now))
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(w) = &self.worker {
            let headers = abi::headers(MapType::HttpResponseHeaders).unwrap_or_default();
            let now = now_ms();
            w.engine.borrow_mut().response_headers(self.id, &headers, now);
            apply::run(w, self.id, Flow::Continue, now);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(w) = &self.worker else {
            return Action::Continue;
        };
        let now = now_ms();
        let flow =
            w.engine.borrow_mut().response_body(self.id, body_size, end_of_stream, &mut BodyReader, now);
        action(apply::run(w, self.id, flow, now))
    }
}
