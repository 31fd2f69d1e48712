//! The fast servers of `make bench` (HTTP/1.1 and h2c on 127.0.0.1, tokio + hyper):
//!
//!   benchd upstream  SSE topic server. `?mode=short` (default): one event, then the response ends.
//!                    `?mode=flood&secs=S`: events as fast as the connection takes them (written
//!                    16 at a time).
//!                    `?mode=paced&ms=M&secs=S[&on=ON&off=OFF]`: one event every M ms (for ON ms,
//!                    then OFF ms of silence, repeated).
//!                    `?mode=hold&secs=S`: one event, then nothing until the client leaves.
//!                    Every streamed event carries its send time: `data: {"t":<unix ns>,...}`.
//!   benchd webhook   the filter's auth webhook: `POST {"jwt","topic"}` →
//!                    `{"valid":true,"user_id":<sub>,"expires_at":now+3600}` (with
//!                    `--exp-from-token`: the token's own `exp` claim, when it has one).
//!   benchd authz     ext_authz HTTP service: 200 + `x-user` for a request with an
//!                    `Authorization` header, 403 without.
//!
//! `GET /_count` on webhook/authz answers `{"calls":N}` (calls so far, `/_count` excluded).
//! `--slow-topic NAME --slow-ms MS` delays answers about that topic (the thundering-herd case).
//! Each server prints `READY <port>` once listening and exits by itself after `--max-secs`.

#[path = "../common.rs"]
mod common;

use bytes::Bytes;
use common::{now_ns, now_sec, Args};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A response body: all at once, streamed from a channel, or generated as fast as it is taken.
enum Out {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Bytes>),
    Flood { n: u64, until: std::time::Instant, pad: Arc<Cfg> },
}

impl Body for Out {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            Out::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Out::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
            // No task, no channel: hyper pulls events until its write buffer is full, so the
            // upstream costs little per event.
            Out::Flood { n, until, pad } => {
                if *n % 512 == 0 && std::time::Instant::now() >= *until {
                    return Poll::Ready(None);
                }
                // 16 events per frame: writes stay large, so neither this server nor the client
                // (which then gets large reads too) limits the rate measured through Envoy.
                let mut batch = Vec::with_capacity(16 * 128);
                for _ in 0..16 {
                    *n += 1;
                    batch.extend_from_slice(&event(*n, &pad.pad));
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(batch)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Out::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Out::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Out::Full(None) => SizeHint::with_exact(0),
            Out::Chan(_) | Out::Flood { .. } => SizeHint::default(),
        }
    }
}

fn query<'a>(uri: &'a hyper::Uri, key: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

struct Cfg {
    pad: String,
    calls: AtomicU64,
    slow_topic_id: Option<String>,
    slow_path: Option<String>,
    slow_ms: u64,
    /// The webhook answers with the token's own expiry.
    exp_from_token: bool,
}

fn event(n: u64, pad: &str) -> Bytes {
    Bytes::from(format!("data: {{\"t\":{},\"n\":{n},\"p\":\"{pad}\"}}\n\n", now_ns()))
}

fn sse_response(body: Out) -> Response<Out> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(Out::Full(None)))
}

async fn upstream(cfg: Arc<Cfg>, req: Request<Incoming>) -> Result<Response<Out>, Infallible> {
    let uri = req.uri().clone();
    let mode = query(&uri, "mode").unwrap_or("short");
    // Every stream is bounded in time, whatever the client does.
    let secs: u64 = query(&uri, "secs").and_then(|s| s.parse().ok()).unwrap_or(60).min(900);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    match mode {
        "flood" => {
            let until = std::time::Instant::now() + Duration::from_secs(secs);
            Ok(sse_response(Out::Flood { n: 0, until, pad: cfg }))
        }
        "paced" => {
            let ms: u64 = query(&uri, "ms").and_then(|s| s.parse().ok()).unwrap_or(10).max(1);
            // Optional quiet periods: `on` ms of events, then `off` ms of silence, repeated.
            let on: u64 = query(&uri, "on").and_then(|s| s.parse().ok()).unwrap_or(0);
            let off: u64 = query(&uri, "off").and_then(|s| s.parse().ok()).unwrap_or(0);
            let (tx, rx) = mpsc::channel::<Bytes>(64);
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(ms));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = tx.closed() => return,
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    if on > 0 && off > 0 && (start.elapsed().as_millis() as u64) % (on + off) >= on {
                        continue;
                    }
                    n += 1;
                    if tx.send(event(n, &cfg.pad)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(sse_response(Out::Chan(rx)))
        }
        "hold" => {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                if tx.send(Bytes::from_static(b"retry: 1000\ndata: open\n\n")).await.is_err() {
                    return;
                }
                let _ = tokio::time::timeout_at(deadline, tx.closed()).await;
            });
            Ok(sse_response(Out::Chan(rx)))
        }
        _ => Ok(sse_response(Out::Full(Some(Bytes::from_static(b"data: hello\n\n"))))),
    }
}

fn json(status: StatusCode, body: String) -> Response<Out> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Out::Full(Some(Bytes::from(body))))
        .unwrap_or_else(|_| Response::new(Out::Full(None)))
}

fn count(cfg: &Cfg) -> Response<Out> {
    json(StatusCode::OK, format!("{{\"calls\":{}}}", cfg.calls.load(Ordering::Relaxed)))
}

async fn webhook(cfg: Arc<Cfg>, req: Request<Incoming>) -> Result<Response<Out>, Infallible> {
    if req.uri().path() == "/_count" {
        return Ok(count(&cfg));
    }
    cfg.calls.fetch_add(1, Ordering::Relaxed);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json(StatusCode::BAD_REQUEST, "{}".into())),
    };
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return Ok(json(StatusCode::BAD_REQUEST, "{}".into())),
    };
    let jwt = v.get("jwt").and_then(|j| j.as_str()).unwrap_or_default();
    let topic = v.get("topic").and_then(|j| j.as_str()).unwrap_or_default();
    if cfg.slow_topic_id.as_deref() == Some(topic) {
        tokio::time::sleep(Duration::from_millis(cfg.slow_ms)).await;
    }
    let user = common::jwt_sub(jwt).unwrap_or_else(|| "u".to_string());
    let exp = common::jwt_exp(jwt).filter(|_| cfg.exp_from_token).unwrap_or(now_sec() + 3600);
    let out = serde_json::json!({"valid": true, "user_id": user, "expires_at": exp});
    Ok(json(StatusCode::OK, out.to_string()))
}

async fn authz(cfg: Arc<Cfg>, req: Request<Incoming>) -> Result<Response<Out>, Infallible> {
    if req.uri().path() == "/_count" {
        return Ok(count(&cfg));
    }
    cfg.calls.fetch_add(1, Ordering::Relaxed);
    if !req.headers().contains_key("authorization") {
        return Ok(Response::builder()
            .status(StatusCode::FORBIDDEN)
            .body(Out::Full(None))
            .unwrap_or_else(|_| Response::new(Out::Full(None))));
    }
    if cfg.slow_path.as_deref().is_some_and(|p| req.uri().path().starts_with(p)) {
        tokio::time::sleep(Duration::from_millis(cfg.slow_ms)).await;
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("x-user", "u")
        .body(Out::Full(None))
        .unwrap_or_else(|_| Response::new(Out::Full(None))))
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let role = argv.get(1).cloned().unwrap_or_default();
    let a = Args::parse(argv.get(2..).unwrap_or_default());
    let threads: usize = a.num("threads", 2);
    let port: u16 = a.num("port", 0);
    let max_secs: u64 = a.num("max-secs", 900);
    let slow_topic = a.opt("slow-topic");
    let cfg = Arc::new(Cfg {
        pad: "x".repeat(a.num("pad", 64)),
        calls: AtomicU64::new(0),
        // The webhook sees the topic id (SHA-256 of the segment, 16 bytes hex); ext_authz the path.
        slow_topic_id: slow_topic.as_ref().map(|t| hex::encode(&Sha256::digest(t.as_bytes())[..16])),
        slow_path: slow_topic.as_ref().map(|t| format!("/events/{t}")),
        slow_ms: a.num("slow-ms", 100),
        exp_from_token: a.opt("exp-from-token").is_some_and(|v| v != "off"),
    });
    if !matches!(role.as_str(), "upstream" | "webhook" | "authz") {
        eprintln!("usage: benchd upstream|webhook|authz [--port P] [--threads N] [--max-secs S] [--slow-topic T --slow-ms MS] [--exp-from-token on]");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build();
    let rt = rt.unwrap_or_else(|e| {
        eprintln!("runtime: {e}");
        std::process::exit(1)
    });
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap_or_else(|e| {
            eprintln!("bind 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        });
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        println!("READY {bound}");
        let _ = std::io::stdout().flush();
        let serve = async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let cfg = Arc::clone(&cfg);
                let role = role.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let cfg = Arc::clone(&cfg);
                        let role = role.clone();
                        async move {
                            match role.as_str() {
                                "upstream" => upstream(cfg, req).await,
                                "webhook" => webhook(cfg, req).await,
                                _ => authz(cfg, req).await,
                            }
                        }
                    });
                    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    b.http2().max_concurrent_streams(1_000_000);
                    let _ = b.serve_connection(TokioIo::new(sock), svc).await;
                });
            }
        };
        // Bounded: the server ends by itself even if its owner never stops it.
        let _ = tokio::time::timeout(Duration::from_secs(max_secs), serve).await;
    });
    std::process::exit(0);
}
