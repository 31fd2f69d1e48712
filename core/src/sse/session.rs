//! The schedule of one SSE stream: heartbeats while it is quiet, a challenge before the token
//! expires, and the final `expired` event (token expiry or maximum duration).
//!
//! Plain state machine: the host tells it what went to the client and when, asks what is due, and
//! schedules its next timer with `next_deadline_ms`. Times are Unix milliseconds; expiry values are
//! Unix seconds, as the webhook gives them. All arithmetic saturates, so a huge `expires_at` simply
//! never comes.

use crate::config::SseConfig;

/// Something the filter writes into the stream on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injection {
    Heartbeat,
    Challenge,
    Expired(ExpiryReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiryReason {
    TokenExpired,
    MaxDuration,
    /// A re-verification was refused: the credential was revoked.
    Revoked,
}

const HEARTBEAT: &[u8] = b": heartbeat\n\n";
const CHALLENGE: &[u8] =
    b"event: challenge\ndata: {\"method\":\"POST\",\"headers\":{\"content-type\":\"application/x-challenge-response\"}}\n\n";
const EXPIRED_TOKEN: &[u8] = b"event: expired\ndata: {\"reason\":\"token_expired\"}\n\n";
const EXPIRED_MAX: &[u8] = b"event: expired\ndata: {\"reason\":\"max_duration\"}\n\n";
const EXPIRED_REVOKED: &[u8] = b"event: expired\ndata: {\"reason\":\"revoked\"}\n\n";

impl Injection {
    /// The exact bytes written to the client. Each is a complete comment or event followed by a
    /// blank line; events carry a `data` line because `EventSource` does not dispatch one without.
    pub const fn bytes(&self) -> &'static [u8] {
        match self {
            Injection::Heartbeat => HEARTBEAT,
            Injection::Challenge => CHALLENGE,
            Injection::Expired(ExpiryReason::TokenExpired) => EXPIRED_TOKEN,
            Injection::Expired(ExpiryReason::MaxDuration) => EXPIRED_MAX,
            Injection::Expired(ExpiryReason::Revoked) => EXPIRED_REVOKED,
        }
    }

    /// For logs and metrics: "heartbeat", "challenge" or "expired".
    pub fn label(&self) -> &'static str {
        match self {
            Injection::Heartbeat => "heartbeat",
            Injection::Challenge => "challenge",
            Injection::Expired(_) => "expired",
        }
    }
}

impl ExpiryReason {
    /// The `reason` of the `expired` event: `token_expired`, `max_duration` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryReason::TokenExpired => "token_expired",
            ExpiryReason::MaxDuration => "max_duration",
            ExpiryReason::Revoked => "revoked",
        }
    }
}

/// Seconds to milliseconds, saturating.
fn ms(sec: u64) -> u64 {
    sec.saturating_mul(1000)
}

/// The schedule of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    heartbeat_ms: u64,
    challenge_before_sec: u64,
    /// When the stream reaches `max_connection_sec`.
    max_deadline_ms: u64,
    /// The token's expiry (Unix seconds); `None` for an unauthenticated (development mode) stream.
    expires_at_sec: Option<u64>,
    /// The expiry value a challenge was last sent for.
    challenged_for: Option<u64>,
    /// When bytes last went to the client, once the heartbeat clock runs (first upstream bytes).
    last_sent_ms: Option<u64>,
    finished: bool,
}

impl Session {
    /// `token_expires_at_sec`: the verified token's expiry (Unix seconds), `None` when the stream was
    /// not authenticated (development mode): then only heartbeats and the maximum duration apply.
    pub fn new(cfg: &SseConfig, opened_ms: u64, token_expires_at_sec: Option<u64>) -> Session {
        Session {
            // The configuration guarantees at least 1 s; never let 0 turn into a heartbeat storm.
            heartbeat_ms: ms(cfg.heartbeat_interval_sec.max(1)),
            challenge_before_sec: cfg.challenge_before_expiry_sec,
            max_deadline_ms: opened_ms.saturating_add(ms(cfg.max_connection_sec)),
            expires_at_sec: token_expires_at_sec,
            challenged_for: None,
            last_sent_ms: None,
            finished: false,
        }
    }

    /// Bytes went to the client at `now_ms` (upstream bytes or an injection). The first call with
    /// `upstream: true` starts the heartbeat clock: heartbeats count from the first upstream body
    /// bytes (before them, nothing can be injected anyway).
    pub fn on_sent(&mut self, now_ms: u64, upstream: bool) {
        match self.last_sent_ms {
            // A clock that went backwards never brings a heartbeat forward.
            Some(last) => self.last_sent_ms = Some(last.max(now_ms)),
            None if upstream => self.last_sent_ms = Some(now_ms),
            None => {}
        }
    }

    /// What must be injected at `now_ms`, if anything. Priority: expired, then challenge, then
    /// heartbeat. When both expiries have passed, the one whose deadline came first is the reason
    /// (token expiry on a tie).
    pub fn due(&self, now_ms: u64) -> Option<Injection> {
        if self.finished {
            return None;
        }
        let token = self.expires_at_sec.map(ms).filter(|&t| now_ms >= t);
        let max = (now_ms >= self.max_deadline_ms).then_some(self.max_deadline_ms);
        match (token, max) {
            (Some(t), Some(m)) if m < t => return Some(Injection::Expired(ExpiryReason::MaxDuration)),
            (Some(_), _) => return Some(Injection::Expired(ExpiryReason::TokenExpired)),
            (None, Some(_)) => return Some(Injection::Expired(ExpiryReason::MaxDuration)),
            (None, None) => {}
        }
        if self.challenge_at_ms().is_some_and(|c| now_ms >= c) {
            return Some(Injection::Challenge);
        }
        if self.heartbeat_at_ms().is_some_and(|h| now_ms >= h) {
            return Some(Injection::Heartbeat);
        }
        None
    }

    /// `injection` was written to the client at `now_ms`: it counts as bytes sent; a challenge is
    /// not repeated for the same expiry; after `Expired` the session is finished.
    pub fn mark_sent(&mut self, injection: Injection, now_ms: u64) {
        self.on_sent(now_ms, false);
        match injection {
            Injection::Heartbeat => {}
            Injection::Challenge => {
                if self.expires_at_sec.is_some() {
                    self.challenged_for = self.expires_at_sec;
                }
            }
            Injection::Expired(_) => self.finished = true,
        }
    }

    /// A re-authorization moved the token's expiry. Returns true if `new_expires_at_sec` is later than
    /// the current expiry (then a new challenge is due before it); an earlier or equal value is
    /// ignored. Also ignored (false): a development-mode stream (no token to extend) and a finished
    /// session.
    pub fn extend(&mut self, new_expires_at_sec: u64) -> bool {
        match self.expires_at_sec {
            Some(current) if !self.finished && new_expires_at_sec > current => {
                self.expires_at_sec = Some(new_expires_at_sec);
                true
            }
            _ => false,
        }
    }

    /// A re-verification's verdict: the expiry becomes `expires_at_sec`, later or earlier. Returns
    /// true if it changed. Ignored (false) for a development-mode stream and a finished session.
    pub fn set_expiry(&mut self, expires_at_sec: u64) -> bool {
        match self.expires_at_sec {
            Some(current) if !self.finished && expires_at_sec != current => {
                self.expires_at_sec = Some(expires_at_sec);
                true
            }
            _ => false,
        }
    }

    pub fn expires_at_sec(&self) -> Option<u64> {
        self.expires_at_sec
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The earliest time (ms) at which `due()` may become `Some`, for scheduling a timer (in the
    /// past or now when something is already due); `None` when finished. Exact as long as nothing
    /// is sent and the expiry does not change in between.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.finished {
            return None;
        }
        let deadline = [self.expires_at_sec.map(ms), self.challenge_at_ms(), self.heartbeat_at_ms()]
            .into_iter()
            .flatten()
            .fold(self.max_deadline_ms, u64::min);
        Some(deadline)
    }

    /// While `pending` (an injection that was due) waits to be written: the earliest time something
    /// more important becomes due, the challenge (above a heartbeat), the token's expiry or the
    /// maximum duration. `None` for an expiry (nothing outranks it) and a finished session.
    pub fn next_deadline_above(&self, pending: Injection) -> Option<u64> {
        if self.finished {
            return None;
        }
        let challenge = match pending {
            Injection::Heartbeat => self.challenge_at_ms(),
            Injection::Challenge => None,
            Injection::Expired(_) => return None,
        };
        let deadline = [self.expires_at_sec.map(ms), challenge]
            .into_iter()
            .flatten()
            .fold(self.max_deadline_ms, u64::min);
        Some(deadline)
    }

    /// When the challenge for the current expiry is due, if one still is.
    fn challenge_at_ms(&self) -> Option<u64> {
        let exp = self.expires_at_sec?;
        if self.challenge_before_sec == 0 || self.challenged_for == Some(exp) {
            return None;
        }
        Some(ms(exp.saturating_sub(self.challenge_before_sec)))
    }

    /// When the next heartbeat is due, once the heartbeat clock runs.
    fn heartbeat_at_ms(&self) -> Option<u64> {
        self.last_sent_ms.map(|last| last.saturating_add(self.heartbeat_ms))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;
    const T0_SEC: u64 = T0 / 1000;
    const HEARTBEAT_AT: Injection = Injection::Heartbeat;
    const TOKEN: Injection = Injection::Expired(ExpiryReason::TokenExpired);
    const MAX: Injection = Injection::Expired(ExpiryReason::MaxDuration);

    fn cfg(heartbeat: u64, challenge: u64, max: u64) -> SseConfig {
        SseConfig {
            heartbeat_interval_sec: heartbeat,
            challenge_before_expiry_sec: challenge,
            max_connection_sec: max,
            reverify_interval_sec: 0,
            max_streams_per_user: 0,
            early_refresh_refusal: false,
        }
    }

    fn default_cfg() -> SseConfig {
        cfg(15, 30, 3600)
    }

    #[test]
    fn injection_bytes_and_labels() {
        assert_eq!(Injection::Heartbeat.bytes(), b": heartbeat\n\n");
        assert_eq!(
            Injection::Challenge.bytes(),
            b"event: challenge\ndata: {\"method\":\"POST\",\"headers\":{\"content-type\":\"application/x-challenge-response\"}}\n\n"
        );
        assert_eq!(TOKEN.bytes(), b"event: expired\ndata: {\"reason\":\"token_expired\"}\n\n");
        assert_eq!(MAX.bytes(), b"event: expired\ndata: {\"reason\":\"max_duration\"}\n\n");
        assert_eq!(
            [Injection::Heartbeat.label(), Injection::Challenge.label(), TOKEN.label(), MAX.label()],
            ["heartbeat", "challenge", "expired", "expired"]
        );
        // Every event's data line is one JSON object.
        for inj in [Injection::Challenge, TOKEN, MAX] {
            let text = std::str::from_utf8(inj.bytes()).unwrap();
            let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            assert!(serde_json::from_str::<serde_json::Value>(data).unwrap().is_object());
            assert!(text.ends_with("\n\n") && text.matches('\n').count() == 3);
        }
    }

    #[test]
    fn heartbeat_not_before_first_upstream_bytes() {
        let mut s = Session::new(&default_cfg(), T0, None);
        assert_eq!(s.due(T0 + 100_000), None);
        assert_eq!(s.next_deadline_ms(), Some(T0 + 3_600_000));
        // An injection alone does not start the clock.
        s.on_sent(T0 + 1_000, false);
        s.mark_sent(Injection::Heartbeat, T0 + 1_500);
        assert_eq!(s.due(T0 + 100_000), None);
        // The first upstream bytes do.
        s.on_sent(T0 + 2_000, true);
        assert_eq!(s.due(T0 + 16_999), None);
        assert_eq!(s.due(T0 + 17_000), Some(HEARTBEAT_AT));
        assert_eq!(s.next_deadline_ms(), Some(T0 + 17_000));
    }

    #[test]
    fn heartbeat_interval_resets_on_any_sent_bytes() {
        let mut s = Session::new(&default_cfg(), T0, None);
        s.on_sent(T0, true);
        s.on_sent(T0 + 10_000, true);
        assert_eq!(s.due(T0 + 24_999), None);
        assert_eq!(s.due(T0 + 25_000), Some(HEARTBEAT_AT));
        s.mark_sent(Injection::Heartbeat, T0 + 25_000);
        assert_eq!(s.due(T0 + 39_999), None);
        assert_eq!(s.due(T0 + 40_000), Some(HEARTBEAT_AT));
        // Non-upstream bytes (another injection) reset it too, once the clock runs.
        s.on_sent(T0 + 30_000, false);
        assert_eq!(s.due(T0 + 44_999), None);
        assert_eq!(s.due(T0 + 45_000), Some(HEARTBEAT_AT));
        // A timestamp from the past never brings the heartbeat forward.
        s.on_sent(T0 + 1_000, true);
        assert_eq!(s.due(T0 + 44_999), None);
        assert_eq!(s.next_deadline_ms(), Some(T0 + 45_000));
    }

    #[test]
    fn challenge_exactly_once_per_expiry() {
        let exp = T0_SEC + 600;
        let mut s = Session::new(&default_cfg(), T0, Some(exp));
        assert_eq!(s.expires_at_sec(), Some(exp));
        assert_eq!(s.next_deadline_ms(), Some((exp - 30) * 1000));
        assert_eq!(s.due((exp - 30) * 1000 - 1), None);
        assert_eq!(s.due((exp - 30) * 1000), Some(Injection::Challenge));
        s.mark_sent(Injection::Challenge, (exp - 30) * 1000 + 5);
        assert_eq!(s.due((exp - 30) * 1000 + 5), None);
        assert_eq!(s.due(exp * 1000 - 1), None);
        assert_eq!(s.next_deadline_ms(), Some(exp * 1000));
        assert_eq!(s.due(exp * 1000), Some(TOKEN));
    }

    #[test]
    fn challenge_immediately_when_opened_inside_the_window() {
        let s = Session::new(&default_cfg(), T0, Some(T0_SEC + 10));
        assert_eq!(s.due(T0), Some(Injection::Challenge));
        assert!(s.next_deadline_ms().unwrap() <= T0);
        // Window larger than the expiry value itself: saturates to 0, i.e. due at once.
        let s = Session::new(&cfg(15, u64::MAX, 3600), T0, Some(T0_SEC + 10_000));
        assert_eq!(s.due(T0), Some(Injection::Challenge));
    }

    #[test]
    fn no_challenge_when_window_is_zero() {
        let exp = T0_SEC + 60;
        let mut s = Session::new(&cfg(15, 0, 3600), T0, Some(exp));
        s.on_sent(T0, true);
        let mut t = T0;
        while t < exp * 1000 {
            if let Some(inj) = s.due(t) {
                assert_eq!(inj, HEARTBEAT_AT);
                s.mark_sent(inj, t);
            }
            t += 100;
        }
        assert_eq!(s.due(exp * 1000), Some(TOKEN));
    }

    #[test]
    fn extend_later_brings_a_new_challenge_earlier_is_ignored() {
        let exp = T0_SEC + 600;
        let mut s = Session::new(&default_cfg(), T0, Some(exp));
        let t = (exp - 30) * 1000;
        s.mark_sent(s.due(t).unwrap(), t);
        assert_eq!(s.due(t + 1_000), None);
        // Earlier or equal values change nothing.
        assert!(!s.extend(exp));
        assert!(!s.extend(exp - 100));
        assert!(!s.extend(0));
        assert_eq!(s.expires_at_sec(), Some(exp));
        assert_eq!(s.due(t + 1_000), None);
        // A later one does: no expiry at the old time, a new challenge before the new one.
        assert!(s.extend(exp + 300));
        assert_eq!(s.expires_at_sec(), Some(exp + 300));
        assert_eq!(s.due(exp * 1000), None);
        assert_eq!(s.next_deadline_ms(), Some((exp + 270) * 1000));
        assert_eq!(s.due((exp + 270) * 1000 - 1), None);
        assert_eq!(s.due((exp + 270) * 1000), Some(Injection::Challenge));
        s.mark_sent(Injection::Challenge, (exp + 270) * 1000);
        assert_eq!(s.due((exp + 300) * 1000 - 1), None);
        assert_eq!(s.due((exp + 300) * 1000), Some(TOKEN));
    }

    #[test]
    fn extend_inside_the_new_window_challenges_at_once() {
        let exp = T0_SEC + 100;
        let mut s = Session::new(&default_cfg(), T0, Some(exp));
        let t = (exp - 10) * 1000;
        s.mark_sent(Injection::Challenge, t);
        assert_eq!(s.due(t + 1), None);
        // The new window opened 25 s before the old expiry, which is already past.
        assert!(s.extend(exp + 5));
        assert_eq!(s.due(t + 1), Some(Injection::Challenge));
    }

    #[test]
    fn extend_ignored_in_development_mode_and_after_the_end() {
        let mut s = Session::new(&default_cfg(), T0, None);
        assert!(!s.extend(T0_SEC + 1_000));
        assert_eq!(s.expires_at_sec(), None);
        let mut s = Session::new(&default_cfg(), T0, Some(T0_SEC + 5));
        s.mark_sent(TOKEN, T0 + 5_000);
        assert!(!s.extend(T0_SEC + 1_000));
        assert_eq!(s.due(T0 + 6_000), None);
    }

    #[test]
    fn priority_expired_then_challenge_then_heartbeat() {
        let exp = T0_SEC + 100;
        let mut s = Session::new(&default_cfg(), T0, Some(exp));
        s.on_sent(T0, true);
        // At 80 s a heartbeat (since 15 s) and the challenge (since 70 s) are both due.
        assert_eq!(s.due(T0 + 80_000), Some(Injection::Challenge));
        // At the expiry all three are.
        assert_eq!(s.due(exp * 1000), Some(TOKEN));
        s.mark_sent(Injection::Challenge, T0 + 80_000);
        assert_eq!(s.due(T0 + 95_000), Some(HEARTBEAT_AT));
        assert_eq!(s.due(exp * 1000), Some(TOKEN));
        // Max duration beats a pending challenge and heartbeat too.
        let mut s = Session::new(&cfg(15, 30, 60), T0, Some(T0_SEC + 70));
        s.on_sent(T0, true);
        assert_eq!(s.due(T0 + 60_000), Some(MAX));
    }

    #[test]
    fn what_outranks_a_waiting_injection() {
        let exp = T0_SEC + 100;
        let mut s = Session::new(&cfg(1, 30, 600), T0, Some(exp));
        s.on_sent(T0, true);
        // A heartbeat waiting: the challenge comes first.
        assert_eq!(s.due(T0 + 1_000), Some(HEARTBEAT_AT));
        assert_eq!(s.next_deadline_above(HEARTBEAT_AT), Some((exp - 30) * 1000));
        assert_eq!(s.due((exp - 30) * 1000), Some(Injection::Challenge));
        // A challenge waiting: the expiry.
        assert_eq!(s.next_deadline_above(Injection::Challenge), Some(exp * 1000));
        assert_eq!(s.next_deadline_above(TOKEN), None);
        // Without a token, the maximum duration.
        let s = Session::new(&cfg(1, 30, 600), T0, None);
        assert_eq!(s.next_deadline_above(HEARTBEAT_AT), Some(T0 + 600_000));
        let mut s = Session::new(&cfg(1, 30, 600), T0, None);
        s.mark_sent(MAX, T0);
        assert_eq!(s.next_deadline_above(HEARTBEAT_AT), None);
    }

    #[test]
    fn max_duration() {
        let mut s = Session::new(&cfg(15, 30, 120), T0, Some(T0_SEC + 1_000));
        s.on_sent(T0, true);
        assert_eq!(s.due(T0 + 119_999), Some(HEARTBEAT_AT));
        s.mark_sent(HEARTBEAT_AT, T0 + 119_999);
        assert_eq!(s.due(T0 + 119_999), None);
        assert_eq!(s.next_deadline_ms(), Some(T0 + 120_000));
        assert_eq!(s.due(T0 + 120_000), Some(MAX));
        // Both passed: the reason is the deadline that came first, the token on a tie.
        let s = Session::new(&cfg(15, 30, 120), T0, Some(T0_SEC + 100));
        assert_eq!(s.due(T0 + 200_000), Some(TOKEN));
        let s = Session::new(&cfg(15, 30, 120), T0, Some(T0_SEC + 150));
        assert_eq!(s.due(T0 + 200_000), Some(MAX));
        let s = Session::new(&cfg(15, 30, 120), T0, Some(T0_SEC + 120));
        assert_eq!(s.due(T0 + 120_000), Some(TOKEN));
    }

    #[test]
    fn token_already_expired_at_open() {
        let s = Session::new(&default_cfg(), T0, Some(T0_SEC - 1));
        assert_eq!(s.due(T0), Some(TOKEN));
        assert!(s.next_deadline_ms().unwrap() <= T0);
    }

    #[test]
    fn development_mode_never_challenges_or_expires_by_token() {
        let mut s = Session::new(&cfg(15, 30, 600), T0, None);
        s.on_sent(T0, true);
        let mut t = T0;
        while t < T0 + 600_000 {
            if let Some(inj) = s.due(t) {
                assert_eq!(inj, HEARTBEAT_AT, "at {t}");
                s.mark_sent(inj, t);
            }
            t += 100;
        }
        assert_eq!(s.due(T0 + 600_000), Some(MAX));
    }

    #[test]
    fn finished_after_expired() {
        let mut s = Session::new(&default_cfg(), T0, Some(T0_SEC + 60));
        s.on_sent(T0, true);
        assert!(!s.finished());
        s.mark_sent(TOKEN, T0 + 60_000);
        assert!(s.finished());
        assert_eq!(s.due(T0 + 60_000), None);
        assert_eq!(s.due(u64::MAX), None);
        assert_eq!(s.next_deadline_ms(), None);
        s.on_sent(T0 + 61_000, true);
        assert_eq!(s.due(T0 + 200_000), None);
    }

    #[test]
    fn huge_values_saturate() {
        // Expiry far past u64 milliseconds: neither challenge nor expiry before max duration.
        let mut s = Session::new(&cfg(15, 30, u64::MAX), u64::MAX - 10, Some(u64::MAX));
        assert_eq!(s.due(u64::MAX - 10), None);
        s.on_sent(u64::MAX - 5, true);
        assert_eq!(s.due(u64::MAX - 1), None);
        // Everything lands on u64::MAX, where the expiry (token, on the tie) is due.
        assert_eq!(s.next_deadline_ms(), Some(u64::MAX));
        assert_eq!(s.due(u64::MAX), Some(TOKEN));
        assert!(!s.extend(u64::MAX));
        let s = Session::new(&cfg(u64::MAX, u64::MAX, u64::MAX), 0, Some(u64::MAX / 2));
        assert_eq!(s.due(0), Some(Injection::Challenge));
        // Zero heartbeat interval (the configuration forbids it) is taken as one second.
        let mut s = Session::new(&cfg(0, 0, 10), T0, None);
        s.on_sent(T0, true);
        assert_eq!(s.due(T0), None);
        assert_eq!(s.due(T0 + 1_000), Some(HEARTBEAT_AT));
    }

    /// Steps time in 100 ms increments through a stream with irregular upstream traffic and
    /// re-authorizations, injecting whatever is due. `next_deadline_ms()` must never be later than
    /// the moment `due()` becomes `Some`, and is exact: `due()` is `Some` at the deadline.
    #[test]
    fn next_deadline_never_later_than_due() {
        let mut rng = crate::testkit::Rng(0x2545_f491_4f6c_dd1d);
        let mut rand = move |n: u64| rng.below(n);
        let configs = [cfg(15, 30, 900), cfg(1, 0, 300), cfg(7, 120, 1_200), cfg(60, 5, 90), cfg(3, 3, 400)];
        let mut checked = 0u64;
        let mut seen = [0u64; 5];
        for (n, c) in configs.iter().enumerate() {
            for run in 0..4u64 {
                let opened = T0 + rand(1_000);
                let token = match run {
                    0 => None,
                    _ => Some(opened / 1000 + rand(700)),
                };
                let mut s = Session::new(c, opened, token);
                let first_upstream = opened + rand(5_000);
                let mut t = opened;
                let mut deadline = s.next_deadline_ms().unwrap();
                while !s.finished() {
                    // The deadline computed at the last change holds until the next change.
                    let due = s.due(t);
                    assert_eq!(
                        due.is_some(),
                        deadline <= t,
                        "config {n} run {run} at {t}: {due:?} {deadline}"
                    );
                    checked += 1;
                    let mut changed = false;
                    if let Some(inj) = due {
                        s.mark_sent(inj, t);
                        seen[match inj {
                            Injection::Heartbeat => 0,
                            Injection::Challenge => 1,
                            Injection::Expired(ExpiryReason::TokenExpired) => 2,
                            Injection::Expired(ExpiryReason::MaxDuration) => 3,
                            Injection::Expired(ExpiryReason::Revoked) => 4,
                        }] += 1;
                        changed = true;
                    }
                    if t >= first_upstream && rand(100) < 3 {
                        s.on_sent(t, true);
                        changed = true;
                    }
                    if let Some(exp) = s.expires_at_sec() {
                        if rand(1000) < 2 && s.extend(exp + rand(200)) {
                            changed = true;
                        }
                    }
                    if changed {
                        match s.next_deadline_ms() {
                            Some(d) => {
                                // Exact: due at the deadline and not a millisecond before (when
                                // that is still in the future).
                                assert!(s.due(d).is_some());
                                if d > t + 1 {
                                    assert_eq!(s.due(d - 1), None);
                                }
                                deadline = d;
                            }
                            None => assert!(s.finished()),
                        }
                    }
                    t += 100;
                }
            }
        }
        assert!(checked > 50_000, "{checked}");
        assert!(seen.iter().take(4).all(|&k| k > 0), "{seen:?}");
    }
}
