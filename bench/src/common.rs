//! Shared by the bench binaries: argument parsing, time stamps, tokens, percentiles.

#![allow(dead_code)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// `--key value` arguments after the sub-command.
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    pub fn parse(args: &[String]) -> Args {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                let v = it.next().cloned().unwrap_or_default();
                map.insert(k.to_string(), v);
            } else {
                eprintln!("unexpected argument {a}");
                std::process::exit(2);
            }
        }
        Args { map }
    }

    pub fn str(&self, k: &str, default: &str) -> String {
        self.map.get(k).cloned().unwrap_or_else(|| default.to_string())
    }

    pub fn opt(&self, k: &str) -> Option<String> {
        self.map.get(k).cloned()
    }

    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.map.get(k) {
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("--{k}: not a number: {v}");
                std::process::exit(2)
            }),
            None => default,
        }
    }
}

/// Wall-clock nanoseconds since the Unix epoch: the upstream stamps events with it and the client
/// (same machine, same clock) subtracts it from the arrival time.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn now_sec() -> u64 {
    now_ns() / 1_000_000_000
}

/// A compact JWT shaped like a real RS256 token (header, claims with a future `exp`, a
/// 342-character signature segment) but NOT signed: the filter's precheck does not verify
/// signatures, so setups without jwt_authn can use any number of distinct tokens. jwt_authn (C)
/// gets tokens signed by the bench key instead (made by run.py with openssl).
pub fn unsigned_token(prefix: &str, i: u64) -> String {
    unsigned_token_ttl(prefix, i, 3 * 3600)
}

/// `unsigned_token` expiring `ttl_sec` from now.
pub fn unsigned_token_ttl(prefix: &str, i: u64, ttl_sec: u64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    let claims = format!(
        r#"{{"iss":"https://issuer.bench","sub":"{prefix}-{i}","aud":"revenprox-bench","iat":{},"exp":{},"jti":"{prefix}-{i}"}}"#,
        now_sec(),
        now_sec() + ttl_sec
    );
    let payload = URL_SAFE_NO_PAD.encode(claims.as_bytes());
    // 256 pseudo-random bytes, like an RSA-2048 signature.
    let mut sig = [0u8; 256];
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for b in sig.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `sub` claim of a compact JWT (no verification).
pub fn jwt_sub(token: &str) -> Option<String> {
    jwt_claims(token)?.get("sub")?.as_str().map(str::to_string)
}

/// The `exp` claim of a compact JWT (no verification).
pub fn jwt_exp(token: &str) -> Option<u64> {
    jwt_claims(token)?.get("exp")?.as_u64()
}

/// Percentile (0..=100) of sorted values, nearest rank.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Tokens: from a file (one per line, cycled) or generated (`prefix-index`, distinct, expiring
/// after `--token-ttl` seconds, default 3 h).
pub enum Tokens {
    List(Vec<String>),
    Gen(String, u64),
    None,
}

impl Tokens {
    pub fn from_args(a: &Args) -> Tokens {
        if let Some(f) = a.opt("token-file") {
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| {
                eprintln!("--token-file {f}: {e}");
                std::process::exit(2)
            });
            let v: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if v.is_empty() {
                eprintln!("--token-file {f}: empty");
                std::process::exit(2);
            }
            Tokens::List(v)
        } else if let Some(t) = a.opt("token") {
            Tokens::List(vec![t])
        } else if let Some(p) = a.opt("token-gen") {
            Tokens::Gen(p, a.num("token-ttl", 3 * 3600))
        } else {
            Tokens::None
        }
    }

    pub fn get(&self, i: u64) -> Option<String> {
        match self {
            Tokens::List(v) => Some(v[(i as usize) % v.len()].clone()),
            Tokens::Gen(p, ttl) => Some(unsigned_token_ttl(p, i, *ttl)),
            Tokens::None => None,
        }
    }
}
