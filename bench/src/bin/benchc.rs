//! The SSE clients of `make bench` (HTTP/1.1, one TCP connection per stream, 127.0.0.1 only).
//! Each mode prints one JSON object on stdout.
//!
//!   benchc stream --port P --path PATH --streams N --warmup W --secs S [--latency off] [tokens]
//!       N long-lived streams; counts events arriving in [W, W+S] s and the latency of each
//!       (arrival − the upstream's send stamp `"t":<unix ns>`; not with `--latency off`).
//!   benchc hold --port P --path PATH --streams N [--open-concurrency C] [--max-secs S] [tokens]
//!               [--paths P1,P2,..] [--drain on]
//!       opens N streams, waits for the first event of each, prints {"opened":..}, then holds them
//!       until a line (or EOF) on stdin, or --max-secs. `--paths`: stream i requests path
//!       i mod the number of paths. `--drain on`: keeps reading every stream (counts its events,
//!       heartbeats and `expired` events, and whether it ended) and prints the counts at the end.
//!   benchc load --port P --path PATH --requests M [--start K] --concurrency C [tokens]
//!       M short requests over C keep-alive connections; request i uses token K+i.
//!   benchc herd --port P --path PATH --n N --token T
//!       N connections opened first, then N requests written at the same instant.
//!
//! tokens: --token T | --token-file F (cycled) | --token-gen PREFIX [--token-ttl S] (distinct
//! unsigned JWTs expiring after S seconds, default 3 h).

#[path = "../common.rs"]
mod common;

use bytes::Bytes;
use common::{now_ns, pct, Args, Tokens};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(port: u16) -> Result<Sender, String> {
    let sock = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(sock)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(path: &str, token: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(path).header("host", "127.0.0.1").header("accept", "text/event-stream");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Empty::new()).unwrap_or_else(|_| Request::new(Empty::new()))
}

fn emit(v: serde_json::Value) {
    println!("{v}");
    let _ = std::io::stdout().flush();
}

/// Splits an SSE body into blocks across frames, in one pass over the bytes. Only when `keep` is
/// set are block bytes kept (to read their stamp); otherwise it just counts events and comments.
#[derive(Default)]
struct Blocks {
    block: Vec<u8>,
    last_nl: bool,
    first: Option<u8>,
}

impl Blocks {
    /// Calls `f(first byte, block bytes if kept)` at each blank line.
    fn feed(&mut self, data: &[u8], keep: bool, mut f: impl FnMut(u8, &[u8])) {
        for &b in data {
            if b == b'\n' {
                if self.last_nl {
                    if let Some(first) = self.first.take() {
                        f(first, &self.block);
                    }
                    self.block.clear();
                    self.last_nl = false;
                    continue;
                }
                self.last_nl = true;
            } else {
                self.last_nl = false;
                if self.first.is_none() {
                    self.first = Some(b);
                }
            }
            if keep {
                self.block.push(b);
            }
        }
    }
}

fn stamp(block: &[u8]) -> Option<u64> {
    let i = block.windows(4).position(|w| w == b"\"t\":")?;
    let digits = &block[i + 4..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[derive(Default)]
struct StreamStats {
    events: u64,
    /// Events over the whole run, warm-up included.
    all_events: u64,
    heartbeats: u64,
    lat_ns: Vec<u64>,
}

async fn mode_stream(a: Args) {
    let port: u16 = a.num("port", 0);
    let path = a.str("path", "/events/bench?mode=flood");
    let n: u64 = a.num("streams", 1);
    let warm = Duration::from_secs_f64(a.num("warmup", 1.0));
    let secs = Duration::from_secs_f64(a.num("secs", 3.0));
    let tokens = Arc::new(Tokens::from_args(&a));
    // Per-event latency needs each event's bytes (its stamp); counting does not.
    let latency = a.str("latency", "on") != "off";
    let t0 = Instant::now();
    let (from, to) = (t0 + warm, t0 + warm + secs);
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (path, tokens, errors) = (path.clone(), Arc::clone(&tokens), Arc::clone(&errors));
        tasks.push(tokio::spawn(async move {
            let mut st = StreamStats::default();
            let fail = |e: String| {
                *errors.lock().unwrap_or_else(|p| p.into_inner()).entry(e).or_default() += 1;
            };
            let mut sender = match connect(port).await {
                Ok(s) => s,
                Err(e) => {
                    fail(e);
                    return st;
                }
            };
            let tok = tokens.get(i);
            let resp = match sender.send_request(request(&path, tok.as_deref())).await {
                Ok(r) => r,
                Err(e) => {
                    fail(format!("request: {e}"));
                    return st;
                }
            };
            if resp.status() != 200 {
                fail(format!("status {}", resp.status()));
                return st;
            }
            let mut body = resp.into_body();
            let mut parser = Blocks::default();
            loop {
                let left = to.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let frame = match tokio::time::timeout(left, body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    Ok(Some(Err(e))) => {
                        fail(format!("body: {e}"));
                        break;
                    }
                    Ok(None) => {
                        fail("stream ended early".into());
                        break;
                    }
                    Err(_) => break,
                };
                let Ok(data) = frame.into_data() else { continue };
                let arrived = now_ns();
                let counting = Instant::now() >= from;
                parser.feed(&data, latency, |first, b| {
                    if first != b':' {
                        st.all_events += 1;
                    }
                    if first == b':' {
                        st.heartbeats += counting as u64;
                    } else if counting {
                        st.events += 1;
                        if let Some(t) = stamp(b) {
                            st.lat_ns.push(arrived.saturating_sub(t));
                        }
                    }
                });
            }
            st
        }));
    }
    let mut all = StreamStats::default();
    let mut ok = 0u64;
    for t in tasks {
        if let Ok(st) = t.await {
            ok += (st.events > 0) as u64;
            all.events += st.events;
            all.all_events += st.all_events;
            all.heartbeats += st.heartbeats;
            all.lat_ns.extend(st.lat_ns);
        }
    }
    all.lat_ns.sort_unstable();
    let us = |p: f64| pct(&all.lat_ns, p) as f64 / 1000.0;
    let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
    emit(json!({
        "streams": n, "streams_with_events": ok, "events": all.events, "all_events": all.all_events,
        "secs": secs.as_secs_f64(),
        "events_per_sec": all.events as f64 / secs.as_secs_f64(), "heartbeats": all.heartbeats,
        "lat_samples": all.lat_ns.len(), "lat_p50_us": us(50.0), "lat_p90_us": us(90.0),
        "lat_p99_us": us(99.0), "lat_p999_us": us(99.9), "errors": errors,
    }));
}

/// What a drained held stream received after its first event.
#[derive(Default)]
struct Drained {
    events: AtomicU64,
    heartbeats: AtomicU64,
    expired: AtomicU64,
    ended: AtomicU64,
}

async fn mode_hold(a: Args) {
    let port: u16 = a.num("port", 0);
    let path = a.str("path", "/events/bench?mode=hold");
    let paths: Arc<Vec<String>> = Arc::new(match a.opt("paths") {
        Some(p) => p.split(',').map(str::to_string).collect(),
        None => vec![path],
    });
    let drain = a.str("drain", "off") == "on";
    let drained = Arc::new(Drained::default());
    let n: u64 = a.num("streams", 1000);
    let max = Duration::from_secs(a.num("max-secs", 120));
    let open_limit = Arc::new(Semaphore::new(a.num("open-concurrency", 256)));
    let tokens = Arc::new(Tokens::from_args(&a));
    let (close_tx, close_rx) = watch::channel(false);
    let opened = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let path = paths[(i as usize) % paths.len()].clone();
        let (tokens, errors, drained) = (Arc::clone(&tokens), Arc::clone(&errors), Arc::clone(&drained));
        let (opened, done, open_limit) = (Arc::clone(&opened), Arc::clone(&done), Arc::clone(&open_limit));
        let mut close = close_rx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = open_limit.acquire_owned().await;
            let fail = |e: String| {
                *errors.lock().unwrap_or_else(|p| p.into_inner()).entry(e).or_default() += 1;
            };
            let attempt = async {
                let mut sender = connect(port).await?;
                let tok = tokens.get(i);
                let resp = sender.send_request(request(&path, tok.as_deref())).await.map_err(|e| format!("request: {e}"))?;
                if resp.status() != 200 {
                    return Err(format!("status {}", resp.status()));
                }
                let mut body = resp.into_body();
                match body.frame().await {
                    Some(Ok(_)) => Ok((sender, body)),
                    _ => Err("no first event".to_string()),
                }
            };
            let held = tokio::time::timeout(Duration::from_secs(30), attempt).await;
            drop(permit);
            done.fetch_add(1, Ordering::Relaxed);
            match held {
                Ok(Ok((sender, mut body))) if drain => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut parser = Blocks::default();
                    let read = async {
                        while let Some(frame) = body.frame().await {
                            let Ok(frame) = frame else { break };
                            let Ok(data) = frame.into_data() else { continue };
                            parser.feed(&data, true, |first, b| {
                                let counter = match first {
                                    b':' => &drained.heartbeats,
                                    _ if b.starts_with(b"event: expired") => &drained.expired,
                                    _ => &drained.events,
                                };
                                counter.fetch_add(1, Ordering::Relaxed);
                            });
                        }
                        drained.ended.fetch_add(1, Ordering::Relaxed);
                        // Ended by the other side: wait for the end like the others.
                        std::future::pending::<()>().await;
                    };
                    tokio::select! {
                        _ = read => {}
                        _ = close.wait_for(|c| *c) => {}
                    }
                    drop(sender);
                }
                Ok(Ok(conn)) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let _ = close.wait_for(|c| *c).await;
                    drop(conn);
                }
                Ok(Err(e)) => fail(e),
                Err(_) => fail("open timed out".into()),
            }
        }));
    }
    while done.load(Ordering::Relaxed) < n && t0.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let errors_now = errors.lock().map(|e| e.clone()).unwrap_or_default();
    emit(json!({
        "streams": n, "opened": opened.load(Ordering::Relaxed),
        "open_secs": t0.elapsed().as_secs_f64(), "errors": errors_now,
    }));
    // Hold until told (a line or EOF on stdin) or the time bound.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let left = max.saturating_sub(t0.elapsed());
    let _ = tokio::time::timeout(left, rx).await;
    let _ = close_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    emit(json!({
        "closed": true, "events": count(&drained.events), "heartbeats": count(&drained.heartbeats),
        "expired": count(&drained.expired), "ended": count(&drained.ended),
    }));
}

async fn mode_load(a: Args) {
    let port: u16 = a.num("port", 0);
    let path = a.str("path", "/events/bench?mode=short");
    let m: u64 = a.num("requests", 1000);
    let start: u64 = a.num("start", 0);
    let c: u64 = a.num("concurrency", 32);
    let max = Duration::from_secs(a.num("max-secs", 300));
    let tokens = Arc::new(Tokens::from_args(&a));
    let next = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let (path, tokens, next, statuses) =
            (path.clone(), Arc::clone(&tokens), Arc::clone(&next), Arc::clone(&statuses));
        tasks.push(tokio::spawn(async move {
            let mut sender: Option<Sender> = None;
            let note = |k: String| *statuses.lock().unwrap_or_else(|p| p.into_inner()).entry(k).or_default() += 1;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= m || t0.elapsed() > max {
                    return;
                }
                if sender.is_none() {
                    match connect(port).await {
                        Ok(s) => sender = Some(s),
                        Err(e) => {
                            note(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let Some(s) = sender.as_mut() else { continue };
                let tok = tokens.get(start + i);
                let ok = match s.send_request(request(&path, tok.as_deref())).await {
                    Ok(resp) => {
                        note(resp.status().as_u16().to_string());
                        resp.into_body().collect().await.is_ok()
                    }
                    Err(e) => {
                        note(format!("request: {e}"));
                        false
                    }
                };
                if !ok || s.ready().await.is_err() {
                    sender = None;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let statuses = statuses.lock().map(|s| s.clone()).unwrap_or_default();
    let ok = statuses.get("200").copied().unwrap_or(0);
    emit(json!({"requests": m, "ok": ok, "statuses": statuses, "secs": secs, "rps": m as f64 / secs}));
}

async fn mode_herd(a: Args) {
    let port: u16 = a.num("port", 0);
    let path = a.str("path", "/events/herd?mode=short");
    let n: usize = a.num("n", 1000);
    let token = a.opt("token");
    // 1. Connect everything first.
    let mut senders = Vec::with_capacity(n);
    let limit = Arc::new(Semaphore::new(200));
    let mut conns = Vec::new();
    for _ in 0..n {
        let limit = Arc::clone(&limit);
        conns.push(tokio::spawn(async move {
            let _p = limit.acquire_owned().await;
            connect(port).await
        }));
    }
    let mut connect_errors = 0;
    for c in conns {
        match c.await {
            Ok(Ok(s)) => senders.push(s),
            _ => connect_errors += 1,
        }
    }
    // 2. Every request at the same instant.
    let (go_tx, go_rx) = watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut s in senders {
        let (path, token, ready) = (path.clone(), token.clone(), Arc::clone(&ready));
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let req = request(&path, token.as_deref());
            ready.fetch_add(1, Ordering::Relaxed);
            let _ = go.wait_for(|g| *g).await;
            let t = Instant::now();
            let status = match tokio::time::timeout(Duration::from_secs(30), async {
                let resp = s.send_request(req).await.map_err(|e| format!("request: {e}"))?;
                let st = resp.status().as_u16().to_string();
                resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
                Ok::<String, String>(st)
            })
            .await
            {
                Ok(Ok(st)) => st,
                Ok(Err(e)) => e,
                Err(_) => "timeout".into(),
            };
            (status, t.elapsed())
        }));
    }
    while ready.load(Ordering::Relaxed) < tasks.len() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t0 = Instant::now();
    let _ = go_tx.send(true);
    let mut statuses = BTreeMap::<String, u64>::new();
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok((st, d)) = t.await {
            *statuses.entry(st).or_default() += 1;
            lat.push(d.as_micros() as u64);
        }
    }
    let all_ms = t0.elapsed().as_secs_f64() * 1000.0;
    lat.sort_unstable();
    emit(json!({
        "n": n, "connect_errors": connect_errors, "statuses": statuses, "all_done_ms": all_ms,
        "p50_ms": pct(&lat, 50.0) as f64 / 1000.0, "max_ms": pct(&lat, 100.0) as f64 / 1000.0,
    }));
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let mode = argv.get(1).cloned().unwrap_or_default();
    let a = Args::parse(argv.get(2..).unwrap_or_default());
    let threads: usize = a.num("threads", 1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build();
    let rt = rt.unwrap_or_else(|e| {
        eprintln!("runtime: {e}");
        std::process::exit(1)
    });
    rt.block_on(async move {
        match mode.as_str() {
            "stream" => mode_stream(a).await,
            "hold" => mode_hold(a).await,
            "load" => mode_load(a).await,
            "herd" => mode_herd(a).await,
            _ => {
                eprintln!("usage: benchc stream|hold|load|herd --port P --path PATH ...");
                std::process::exit(2);
            }
        }
    });
    // Do not wait for lingering connection tasks.
    std::process::exit(0);
}
