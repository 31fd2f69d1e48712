//! `resilience::flight::Flights` (single flight and retries of one worker) driven the way
//! `src/host/worker.rs` drives it: `begin` (join a flight in progress, or pass admission, start one
//! and call), webhook answers (allow, deny, failure), calls the host refuses at once, timer ticks,
//! streams going away — in arbitrary orders, with arbitrary `retry_attempts` (0..=10), start times
//! (up to `u64::MAX`, where the arithmetic must saturate) and a missing webhook. The worker's glue is
//! wasm32-only, so it is mirrored here step for step without the host calls; a host model delivers
//! each answer to the context that made the call, never to one that went away (plus `Late`: such an
//! answer delivered anyway must change nothing). A reference model of every flight (generation,
//! counted calls, call in progress, due time) is kept beside it, written from the module's contract.
//!
//! Properties, after every step: no panic (overflow checks on); at most one call in progress per
//! flight, and a flight is always either waiting for exactly one live call or scheduled, never both
//! and never neither (stuck); a flight's waiters are exactly the streams that joined it and still
//! wait; an answer is credited only to the flight whose current call it answers (a stale answer, for
//! an earlier flight of the same key or a call lost with its stream, changes nothing); calls are never
//! early, retries back off 100 ms × attempt, `due`/`next_due_ms` agree with the schedule; at most
//! 1 + `retry_attempts` counted calls (a call lost with the stream that made it is given back, once
//! per flight at most); a failure is delivered only once every allowed try failed, an allow only for
//! an `Allow` answer to that flight's own call; every stream gets at most one outcome, only for the
//! flight it joined, none after it left. At the end every answer is delivered and every due call
//! made: every stream that did not leave has exactly one outcome, and nothing is left (no flight, no
//! call token `answered` still knows, no call owner).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use revenprox::resilience::flight::{FlightKey, Flights, Left, Waiter};
use std::collections::HashMap;

/// The root context (makes the retries, from its timer).
const ROOT: u32 = 1;
/// `config.rs`'s bound on `jwt_verifier.retry_attempts`.
const MAX_RETRIES: u8 = 10;
/// Streams per run: enough for every interleaving of a few flights, few enough to keep runs fast
/// (every step checks every flight, stream and call).
const MAX_STREAMS: usize = 32;

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Allow,
    Deny,
    Failure,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A stream's request headers: a JWT on one of three shared keys, or a ticket (its own flight).
    /// `admit % 8`: 0 refused by the breaker or the rate limit, 1 admitted as the half-open probe.
    /// `refuse`: the host refuses the call at once.
    Begin {
        key: u8,
        ticket: bool,
        reauth: bool,
        admit: u8,
        refuse: bool,
    },
    /// The host delivers the answer to a call still pending (index among them).
    Answer {
        call: u8,
        answer: Answer,
    },
    Advance {
        ms: u16,
    },
    /// The root's timer fires (whenever: only due calls are made).
    Tick {
        refuse: bool,
    },
    /// Time goes to the next due call and the timer fires, as `reschedule` arranges.
    Wait {
        refuse: bool,
    },
    /// A stream goes away (`on_done`; index among the streams still there).
    Leave {
        stream: u8,
    },
    /// The answer to a call whose context went away (Envoy drops it; it must change nothing).
    Late {
        call: u8,
        answer: Answer,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    retries: u8,
    no_webhook: u8,
    start_ms: u64,
    ops: Vec<Op>,
    /// What the webhook answers the calls still pending at the end.
    drain: Answer,
}

/// The verification a flight carries: its key and which flight of that key it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verif {
    key: FlightKey,
    generation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Allow,
    Deny,
    Failure,
    /// Refused at admission (circuit open, rate limited): a local reply, no flight.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting(FlightKey, u32),
    Done(Outcome),
    Left,
}

#[derive(Debug)]
struct Stream {
    reauth: bool,
    state: State,
}

/// A webhook call on the host's side.
#[derive(Debug)]
struct Call {
    owner: u32,
    key: FlightKey,
    generation: u32,
    delivered: bool,
    /// Its owner went away: the host never delivers its answer.
    dropped: bool,
}

impl Call {
    fn live(&self) -> bool {
        !self.delivered && !self.dropped
    }
}

/// The reference model of one flight in progress.
#[derive(Debug)]
struct Model {
    generation: u32,
    /// Calls that count towards `1 + retry_attempts` (made or refused, not lost with a stream).
    counted: u32,
    /// Calls lost with the stream that made them.
    lost: u32,
    call: Option<u32>,
    due: Option<u64>,
    probe: bool,
    started: u64,
}

struct Sim {
    flights: Flights<Verif>,
    /// The worker's map: call token → context that made it.
    call_owner: HashMap<u32, u32>,
    retries: u32,
    webhook: bool,
    now: u64,
    /// Stream context ids are 2, 3, …
    streams: Vec<Stream>,
    /// Host call tokens are 1, 2, …
    calls: Vec<Call>,
    model: HashMap<FlightKey, Model>,
    generations: u32,
}

fn order(k: &FlightKey) -> (u8, u32) {
    match k {
        FlightKey::Shared(b) => (0, u32::from(b[0])),
        FlightKey::Solo(c) => (1, *c),
    }
}

fn index(id: u32) -> usize {
    usize::try_from(id).unwrap_or(usize::MAX)
}

impl Sim {
    fn stream(&mut self, ctx: u32) -> &mut Stream {
        &mut self.streams[index(ctx) - 2]
    }

    fn call_of(&self, token: u32) -> &Call {
        &self.calls[index(token) - 1]
    }

    /// Streams waiting for flight `generation` of `key`, sorted.
    fn waiting(&self, key: FlightKey, generation: u32) -> Vec<u32> {
        (2u32..)
            .zip(&self.streams)
            .filter(|(_, s)| s.state == State::Waiting(key, generation))
            .map(|(ctx, _)| ctx)
            .collect()
    }

    // ---- worker.rs, step for step ----

    fn begin(&mut self, ctx: u32, key: FlightKey, reauth: bool, admit: u8, refuse: bool) {
        let waiter = Waiter { context_id: ctx, reauth };
        if self.flights.join(key, waiter) {
            let g = self.model.get(&key).map(|m| m.generation);
            let g = g.unwrap_or_else(|| panic!("joined {key:?}, which has no flight"));
            self.stream(ctx).state = State::Waiting(key, g);
            return;
        }
        assert!(!self.model.contains_key(&key), "join refused while {key:?} has a flight");
        let probe = match admit % 8 {
            0 => {
                self.stream(ctx).state = State::Done(Outcome::Refused);
                return;
            }
            1 => true,
            _ => false,
        };
        self.generations += 1;
        let g = self.generations;
        self.flights.start(key, Verif { key, generation: g }, waiter, probe, self.now);
        let m = Model {
            generation: g,
            counted: 0,
            lost: 0,
            call: None,
            due: Some(self.now),
            probe,
            started: self.now,
        };
        self.model.insert(key, m);
        self.stream(ctx).state = State::Waiting(key, g);
        self.call(key, ctx, refuse);
    }

    fn call(&mut self, key: FlightKey, owner: u32, refuse: bool) {
        let Some(f) = self.flights.get(&key) else {
            return;
        };
        let attempts = f.attempts;
        let now = self.now;
        let m = self.model.get_mut(&key).unwrap_or_else(|| panic!("{key:?} has no model"));
        assert!(m.due.is_some_and(|d| d <= now), "call for {key:?} at {now}, due {:?}", m.due);
        assert_eq!(attempts, m.counted, "attempts of {key:?} before a call");
        if !self.webhook {
            self.finish(key, Answer::Failure);
            return;
        }
        m.counted += 1;
        m.due = None;
        if refuse {
            self.flights.attempted(key, now);
            self.failed(key);
        } else {
            let token = u32::try_from(self.calls.len() + 1).unwrap_or(u32::MAX);
            m.call = Some(token);
            let generation = m.generation;
            self.flights.called(key, token, now);
            self.call_owner.insert(token, owner);
            self.calls.push(Call { owner, key, generation, delivered: false, dropped: false });
        }
    }

    fn answered(&mut self, token: u32, answer: Answer) {
        self.call_owner.remove(&token);
        let c = &mut self.calls[index(token) - 1];
        c.delivered = true;
        let (key, generation) = (c.key, c.generation);
        let current =
            self.model.get(&key).is_some_and(|m| m.generation == generation && m.call == Some(token));
        let got = self.flights.answered(token);
        if !current {
            assert_eq!(got, None, "stale answer (call {token}, flight {generation} of {key:?}) credited");
            return;
        }
        assert_eq!(got, Some(key), "answer to call {token} not credited to its flight");
        if let Some(m) = self.model.get_mut(&key) {
            m.call = None;
        }
        match answer {
            Answer::Failure => self.failed(key),
            verdict => self.finish(key, verdict),
        }
    }

    fn failed(&mut self, key: FlightKey) {
        let retry = self.flights.retry(&key, self.retries, self.now);
        let tries = 1 + self.retries;
        let now = self.now;
        let m = self.model.get_mut(&key).unwrap_or_else(|| panic!("{key:?} failed without a model"));
        match retry {
            Some(due) => {
                assert!(m.counted < tries, "retry after {} calls, retry_attempts {}", m.counted, tries - 1);
                assert_eq!(
                    due,
                    now.saturating_add(100 * u64::from(m.counted)),
                    "backoff after {}",
                    m.counted
                );
                m.due = Some(due);
            }
            None => {
                assert!(m.counted >= tries, "gave up after {} of {tries} calls", m.counted);
                self.finish(key, Answer::Failure);
            }
        }
    }

    fn finish(&mut self, key: FlightKey, verdict: Answer) {
        let Some(f) = self.flights.finish(&key) else {
            return;
        };
        let m = self.model.remove(&key).unwrap_or_else(|| panic!("finished {key:?} without a model"));
        assert_eq!(f.verification, Verif { key, generation: m.generation }, "another flight's verification");
        if verdict == Answer::Failure && self.webhook {
            assert_eq!(m.counted, 1 + self.retries, "failure delivered before every try failed");
        }
        let mut got: Vec<u32> = f.waiters.iter().map(|w| w.context_id).collect();
        got.sort_unstable();
        assert_eq!(got, self.waiting(key, m.generation), "waiters of {key:?} at its verdict");
        let outcome = match verdict {
            Answer::Allow => Outcome::Allow,
            Answer::Deny => Outcome::Deny,
            Answer::Failure => Outcome::Failure,
        };
        for w in &f.waiters {
            let s = self.stream(w.context_id);
            assert_eq!(s.reauth, w.reauth);
            assert_eq!(s.state, State::Waiting(key, m.generation), "outcome for stream {}", w.context_id);
            s.state = State::Done(outcome);
        }
    }

    fn tick(&mut self, refuse: bool) {
        let mut due = self.flights.due(self.now);
        let mut expected: Vec<FlightKey> = self
            .model
            .iter()
            .filter(|(_, m)| m.due.is_some_and(|d| d <= self.now))
            .map(|(k, _)| *k)
            .collect();
        // Sorted for reproducible runs (the worker's order is the map's, and each flight is independent).
        due.sort_by_key(order);
        expected.sort_by_key(order);
        assert_eq!(due, expected, "due({})", self.now);
        for key in due {
            self.call(key, ROOT, refuse);
        }
    }

    fn leave(&mut self, ctx: u32) {
        let state = self.stream(ctx).state;
        let result = {
            let owners = &self.call_owner;
            self.flights.leave(ctx, |call| owners.get(&call) == Some(&ctx))
        };
        if let Some(Left::Waiting { key, orphaned: true }) = result {
            self.flights.recall(&key, self.now);
        }
        self.call_owner.retain(|_, owner| *owner != ctx);

        // What the model expects.
        match state {
            State::Waiting(key, g) => {
                let others = self.waiting(key, g).len() - 1;
                let lost = {
                    let m = &self.model[&key];
                    m.call.is_some_and(|t| self.call_of(t).owner == ctx)
                };
                if others == 0 {
                    // The worker gives a half-open probe back to the breaker on `probe: true`.
                    let probe = self.model[&key].probe;
                    assert_eq!(result, Some(Left::Ended { key, probe }), "last waiter of {key:?} left");
                    self.model.remove(&key);
                } else {
                    assert_eq!(
                        result,
                        Some(Left::Waiting { key, orphaned: lost }),
                        "a waiter of {key:?} left"
                    );
                    if lost {
                        let m = self.model.get_mut(&key).unwrap_or_else(|| panic!("no model"));
                        m.counted -= 1;
                        m.lost += 1;
                        m.call = None;
                        m.due = Some(self.now);
                    }
                }
            }
            State::Done(_) => assert_eq!(result, None, "stream {ctx} left after its outcome"),
            State::Left => panic!("stream {ctx} left twice"),
        }
        for c in self.calls.iter_mut().filter(|c| c.owner == ctx && !c.delivered) {
            c.dropped = true;
        }
        self.stream(ctx).state = State::Left;
    }

    // ---- invariants ----

    fn check(&self) {
        assert_eq!(self.flights.len(), self.model.len(), "flights: {:?}", self.model);
        assert_eq!(self.flights.is_empty(), self.model.is_empty());
        let (mut waiters_total, mut calling) = (0, 0);
        for (key, m) in &self.model {
            let f = self.flights.get(key).unwrap_or_else(|| panic!("{key:?} lost its flight"));
            assert_eq!(f.verification, Verif { key: *key, generation: m.generation });
            assert_eq!(f.attempts, m.counted, "attempts of {key:?}");
            assert_eq!(f.call, m.call, "call of {key:?}");
            assert_eq!(f.due_ms, m.due, "due time of {key:?}");
            assert_eq!((f.probe, f.started_ms), (m.probe, m.started));
            assert!(m.call.is_some() != m.due.is_some(), "{key:?} is {m:?}: neither or both calling and due");
            if let Some(t) = m.call {
                let c = self.call_of(t);
                assert!(c.live() && c.key == *key && c.generation == m.generation, "{key:?} calls {c:?}");
                calling += 1;
            }
            assert!(m.counted <= 1 + self.retries, "{} calls, retry_attempts {}", m.counted, self.retries);
            assert!(m.lost <= 1, "{} calls lost with their streams", m.lost);
            let mut waiters: Vec<u32> = f.waiters.iter().map(|w| w.context_id).collect();
            waiters.sort_unstable();
            assert!(!waiters.is_empty(), "{key:?} has a flight but no stream waits for it");
            assert!(waiters.windows(2).all(|w| w[0] != w[1]), "a stream waits twice for {key:?}");
            for ctx in &waiters {
                let s = &self.streams[index(*ctx) - 2];
                assert_eq!(s.state, State::Waiting(*key, m.generation), "waiter {ctx} of {key:?}");
            }
            waiters_total += waiters.len();
        }
        // Each waiter is a stream waiting for that flight; no waiting stream is missing from them.
        let waiting = self.streams.iter().filter(|s| matches!(s.state, State::Waiting(..))).count();
        assert_eq!(waiting, waiters_total, "a waiting stream is no flight's waiter");
        // The live calls of the flights in progress are exactly their calls: one per flight at most.
        let live = self
            .calls
            .iter()
            .filter(|c| c.live() && self.model.get(&c.key).is_some_and(|m| m.generation == c.generation))
            .count();
        assert_eq!(live, calling, "a flight has a live call besides its call in progress");
        assert_eq!(self.flights.next_due_ms(), self.model.values().filter_map(|m| m.due).min());
        for (token, owner) in &self.call_owner {
            let c = self.call_of(*token);
            assert!(c.live() && c.owner == *owner, "call owner {token} → {owner} for {c:?}");
        }
        assert_eq!(self.call_owner.len(), self.calls.iter().filter(|c| c.live()).count());
    }

    fn pending(&self, dropped: bool) -> Vec<u32> {
        (1u32..)
            .zip(&self.calls)
            .filter(|(_, c)| !c.delivered && c.dropped == dropped)
            .map(|(t, _)| t)
            .collect()
    }
}

fuzz_target!(|x: Input| {
    let mut sim = Sim {
        flights: Flights::default(),
        call_owner: HashMap::new(),
        retries: u32::from(x.retries % (MAX_RETRIES + 1)),
        webhook: x.no_webhook != 1,
        now: x.start_ms,
        streams: Vec::new(),
        calls: Vec::new(),
        model: HashMap::new(),
        generations: 0,
    };

    for op in x.ops.iter().take(256) {
        match *op {
            Op::Begin { .. } if sim.streams.len() >= MAX_STREAMS => {}
            Op::Begin { key, ticket, reauth, admit, refuse } => {
                let ctx = u32::try_from(sim.streams.len() + 2).unwrap_or(u32::MAX);
                // `begin` gives it its state (waiting, or refused at admission).
                sim.streams.push(Stream { reauth, state: State::Left });
                let key = if ticket { FlightKey::Solo(ctx) } else { FlightKey::Shared([key % 3; 32]) };
                sim.begin(ctx, key, reauth, admit, refuse);
            }
            Op::Answer { call, answer } => {
                let pending = sim.pending(false);
                if let Some(t) = pending.get(usize::from(call) % pending.len().max(1)) {
                    sim.answered(*t, answer);
                }
            }
            Op::Late { call, answer } => {
                let lost = sim.pending(true);
                if let Some(t) = lost.get(usize::from(call) % lost.len().max(1)) {
                    sim.answered(*t, answer);
                }
            }
            Op::Advance { ms } => sim.now = sim.now.saturating_add(u64::from(ms)),
            Op::Tick { refuse } => sim.tick(refuse),
            Op::Wait { refuse } => {
                if let Some(d) = sim.flights.next_due_ms() {
                    sim.now = sim.now.max(d);
                }
                sim.tick(refuse);
            }
            Op::Leave { stream } => {
                let here: Vec<u32> = (2u32..)
                    .zip(&sim.streams)
                    .filter(|(_, s)| s.state != State::Left)
                    .map(|(c, _)| c)
                    .collect();
                if let Some(ctx) = here.get(usize::from(stream) % here.len().max(1)) {
                    sim.leave(*ctx);
                }
            }
        }
        sim.check();
    }

    // The end: Envoy answers every call (or times it out) and the timer makes every due call.
    // Each flight needs at most a tick and an answer per try it has left (and one for a lost call).
    let bound = sim.model.len() * 2 * (index(sim.retries) + 2) + 2;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= bound, "flights never finish: {:?}", sim.model);
        let pending = sim.pending(false);
        if !pending.is_empty() {
            for t in pending {
                sim.answered(t, x.drain);
            }
        } else if let Some(d) = sim.flights.next_due_ms() {
            sim.now = sim.now.max(d);
            sim.tick(false);
        } else {
            break;
        }
        sim.check();
    }
    assert!(sim.flights.is_empty() && sim.model.is_empty(), "flights left: {:?}", sim.model);
    for (ctx, s) in (2u32..).zip(&sim.streams) {
        assert!(matches!(s.state, State::Done(_) | State::Left), "stream {ctx} never got an outcome");
    }
    for token in 1..=u32::try_from(sim.calls.len()).unwrap_or(u32::MAX) {
        assert_eq!(sim.flights.answered(token), None, "call {token} still in the bookkeeping");
    }
    assert!(sim.call_owner.is_empty(), "call owners left: {:?}", sim.call_owner);
});
