//! The baseline filter of `make bench`, and a probe of what host calls cost.
//!
//! With an empty plugin configuration every callback takes the SDK's default (`Continue`): the
//! floor cost of any Rust proxy-wasm filter in Envoy's V8. A configuration such as
//! `headers=10,shared=10,metrics=4,time=4,tick=1,queue=1,body=1` makes it do, per request, that
//! many request-header reads, shared-data reads, counter increments and clock reads, a tick-period
//! change, and, per response chunk, a body read and a hold-and-release through a per-worker shared
//! queue (and records the largest body a callback saw in the gauge `probe_body_max`). `queue=1`
//! sends one 4-byte message per held chunk; `signal=1` is RevenProx's way: one empty message
//! while any chunk waits, and every held chunk released when it arrives. `bench/run.py --only callgrind` runs these to price each host call.
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(Root {
        probe: Rc::new(Cell::new(Probe::default())),
        held: Rc::new(RefCell::new(HashSet::new())),
    }));
}}

#[derive(Clone, Copy, Default)]
struct Probe {
    headers: u32,
    shared: u32,
    metrics: u32,
    time: u32,
    tick: bool,
    body: bool,
    queue: Option<u32>,
    /// With `queue`: empty messages, one for all the chunks held until it arrives.
    signal: bool,
    metric: Option<u32>,
    /// Gauge `probe_body_max`: the largest body size a body callback saw (queue mode).
    body_max: Option<u32>,
    /// Counter `probe_body_again`: body callbacks for a stream whose previous chunk was still held
    /// (Envoy hands the filter the held bytes again, with the new ones appended).
    body_again: Option<u32>,
}

struct Root {
    probe: Rc<Cell<Probe>>,
    /// Streams whose last chunk is held (queue mode).
    held: Rc<RefCell<HashSet<u32>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        let mut p = Probe::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "{}") {
            let (k, v) = item.split_once('=').unwrap_or((item, "1"));
            let n: u32 = v.parse().unwrap_or(0);
            match k {
                "headers" => p.headers = n,
                "shared" => p.shared = n,
                "metrics" => p.metrics = n,
                "time" => p.time = n,
                "tick" => p.tick = n > 0,
                "body" => p.body = n > 0,
                "signal" if n > 0 => {
                    p.signal = true;
                    let name = format!("probe.{:?}", hostcalls::get_current_time().ok());
                    p.queue = hostcalls::register_shared_queue(&name).ok();
                }
                "queue" if n > 0 => {
                    // One queue per VM (worker): a unique name, as RevenProx does.
                    let name = format!("probe.{:?}", hostcalls::get_current_time().ok());
                    p.queue = hostcalls::register_shared_queue(&name).ok();
                }
                _ => {}
            }
        }
        if p.queue.is_some() {
            p.body_max = hostcalls::define_metric(MetricType::Gauge, "probe_body_max").ok();
            p.body_again = hostcalls::define_metric(MetricType::Counter, "probe_body_again").ok();
        }
        if p.metrics > 0 {
            p.metric = hostcalls::define_metric(MetricType::Counter, "probe_counter").ok();
        }
        if p.shared > 0 {
            let _ = hostcalls::set_shared_data("probe.key", Some(&[7u8; 64]), None);
        }
        self.probe.set(p);
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        if self.probe.get().signal {
            // One (empty) message per call: release every held chunk.
            let _ = hostcalls::dequeue_shared_queue(queue_id);
            for id in self.held.borrow_mut().drain() {
                if hostcalls::set_effective_context(id).is_ok() {
                    let _ = hostcalls::resume_http_response();
                }
            }
            return;
        }
        while let Ok(Some(msg)) = hostcalls::dequeue_shared_queue(queue_id) {
            if let Ok(b) = <[u8; 4]>::try_from(msg.as_slice()) {
                self.held.borrow_mut().remove(&u32::from_le_bytes(b));
                if hostcalls::set_effective_context(u32::from_le_bytes(b)).is_ok() {
                    let _ = hostcalls::resume_http_response();
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { id: context_id, probe: self.probe.get(), held: Rc::clone(&self.held) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    id: u32,
    probe: Probe,
    held: Rc<RefCell<HashSet<u32>>>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let p = self.probe;
        for _ in 0..p.headers {
            let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path");
        }
        for _ in 0..p.shared {
            let _ = hostcalls::get_shared_data("probe.key");
        }
        for _ in 0..p.time {
            let _ = hostcalls::get_current_time();
        }
        if let Some(m) = p.metric {
            for _ in 0..p.metrics {
                let _ = hostcalls::increment_metric(m, 1);
            }
        }
        if p.tick {
            let ms = 500 + u64::from(self.id % 400);
            let _ = hostcalls::set_tick_period(Duration::from_millis(ms));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, eos: bool) -> Action {
        let p = self.probe;
        if let (Some(c), true) = (p.body_again, self.held.borrow().contains(&self.id)) {
            let _ = hostcalls::increment_metric(c, 1);
        }
        if let Some(g) = p.body_max {
            if hostcalls::get_metric(g).is_ok_and(|m| (size as u64) > m) {
                let _ = hostcalls::record_metric(g, size as u64);
            }
        }
        if p.body && size > 0 {
            let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
        }
        match p.queue {
            Some(_) if !eos && p.signal => {
                let first = self.held.borrow().is_empty();
                if !first || p.queue.is_some_and(|q| hostcalls::enqueue_shared_queue(q, None).is_ok()) {
                    self.held.borrow_mut().insert(self.id);
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            Some(q) if !eos => {
                if hostcalls::enqueue_shared_queue(q, Some(&self.id.to_le_bytes())).is_ok() {
                    self.held.borrow_mut().insert(self.id);
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
            _ => Action::Continue,
        }
    }
}
