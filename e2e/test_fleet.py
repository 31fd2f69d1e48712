"""Many Envoy replicas (issue 14): two RevenProx replicas behind a front Envoy (e2e/fleet.py).

Tokens live LIFETIME (20) s, the replicas challenge CHALLENGE (8) s before expiry, and every
client acts like a page with an EventSource: the stream on one connection, the refresh POST on a
fresh one with a fresh token of the same user, sent when the challenge arrives. A run lasts three
token lifetimes (plus a little, so the last answers land): the streams must outlive three tokens.

  - user-hash front (deploy/envoy/user-hash-front-proxy.yaml): routes by the verified `sub`, so
    the refresh reaches the replica holding the stream without any help from the filter;
  - round-robin front: the refresh reaches the other replica about every second time (403
    user_mismatch there; once a worker learned that user ids are JWT subs, with no webhook
    call). The streams survive through the filter's server-side refresh: the replica holding a
    stream asks a session-tracking webhook (servers/webhook.py SessionStore) again before the
    stream's expiry.

Each run's numbers (refresh answers, streams alive, webhook calls per reopened token) go to
e2e/artifacts/run-*/fleet-results.json and are printed (pytest -s shows them); README and
docs/deploy.md quote them.
"""
import collections
import json
import time
import uuid
from functools import partial

import pytest

import helpers
from fleet import ISSUER, ROUTE_HEADER, SECRET, EventSourceClient, Fleet, mint, run_all, with_token
from helpers import http1_request, marker
from servers import jwtutil
from servers.webhook import Behaviour, SessionStore

LIFETIME, CHALLENGE = 20, 8
RUN = 3 * LIFETIME + 3       # three token lifetimes; the answers to the challenges at ~60 s land
STREAMS = 20
# early_refresh_refusal: the misrouted refreshes behind round robin cost no webhook call (measured).
FLEET_CFG = {"sse": {"heartbeat_interval_sec": 5, "challenge_before_expiry_sec": CHALLENGE,
                     "max_connection_sec": 3600, "early_refresh_refusal": True}}


@pytest.fixture(scope="module")
def fleet(webhook, upstream):
    f = Fleet(webhook, upstream, n=2, overrides=FLEET_CFG, name="fleet").start()
    yield f
    f.stop()


def own_expiry(token, topic):
    """A verifying webhook without sessions: HS256 + exp, expires_at = the token's own exp."""
    claims = jwtutil.verify_hs256(token, SECRET)
    if not claims or not isinstance(claims.get("sub"), str):
        return {"valid": False, "user_id": None, "expires_at": None}
    return {"valid": True, "user_id": claims["sub"], "expires_at": int(claims["exp"])}


def users(tag, n):
    run = uuid.uuid4().hex[:6]
    return [f"{tag}-{run}-{i:02d}" for i in range(n)]


def record(name, **numbers):
    """Appends a run's numbers to run-*/fleet-results.json and prints them."""
    path = helpers.run_dir() / "fleet-results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = numbers
    path.write_text(json.dumps(results, indent=2))
    print(f"\nfleet results {name}: {json.dumps(numbers)}")


def reconnect_calls(clients, webhook):
    """Webhook calls per reopened token: every client's user opens a stream with a fresh token
    and, like an EventSource after a network error, the same URL (the same token) once more
    (EventSourceClient.reconnect); calls made for that token (1: the second open was a cache hit
    on the first one's replica; 2: it reached another replica)."""
    out = []
    for c in clients:
        token, statuses = c.reconnect()
        assert statuses == [200, 200], (c.user, statuses)
        out.append(len(webhook.calls_for(token)))
    return out


def split(refreshes):
    return dict(collections.Counter(f"{r.status} {r.error or ''}".strip() for r in refreshes))


def one_replica_per_user(fleet, clients):
    """{user: sorted replica indices of all its requests}, from the replicas' access logs."""
    where = fleet.replicas_of([m for c in clients for m in c.markers])
    missing = [m for m, reps in where.items() if not reps]
    assert not missing, f"{len(missing)} requests never showed up in a replica's access log"
    per_user = collections.defaultdict(set)
    for c in clients:
        for m in c.markers:
            per_user[c.user] |= set(where[m])
    return {u: sorted(r) for u, r in per_user.items()}


# ------------------------------------------------------------------------------------------------
# the session-tracking webhook itself (what the round-robin test relies on)
# ------------------------------------------------------------------------------------------------
def test_session_tracking_webhook_answers_with_the_sessions_newest_expiry(webhook):
    store = webhook.sessions = SessionStore(SECRET)
    now = int(time.time())

    def verify(tok):
        r = http1_request(webhook.port, "/verify", {"content-type": "application/json"}, method="POST",
                          body=json.dumps({"jwt": tok, "topic": "0" * 32}).encode())
        assert r.status == 200
        return r.json()

    user = "sess-" + uuid.uuid4().hex[:8]
    old = jwtutil.make_jwt(sub=user, secret=SECRET, exp=now - 5)
    assert verify(old)["valid"] is False, "expired and no session yet"
    newer = jwtutil.make_jwt(sub=user, secret=SECRET, exp=now + 30)
    assert verify(newer) == {"valid": True, "user_id": user, "expires_at": now + 30}
    # the old token now counts until the session's newest expiry ...
    assert verify(old) == {"valid": True, "user_id": user, "expires_at": now + 30}
    # ... and so does what the issuer registers directly
    store.register(user=user, expires_at=now + 90)
    assert verify(old)["expires_at"] == now + 90 and store.latest(user=user) == now + 90
    # a bad signature never counts; a token with a `sid` belongs to that session, not the user's
    assert verify(jwtutil.make_jwt(sub=user, secret=b"other", exp=now + 60))["valid"] is False
    sid_token = jwtutil.make_jwt(sub=user, secret=SECRET, exp=now - 5, extra={"sid": "s-" + user})
    assert verify(sid_token)["valid"] is False
    store.register(sid="s-" + user, expires_at=now + 40)
    assert verify(sid_token) == {"valid": True, "user_id": user, "expires_at": now + 40}
    # off (the default): the test webhook's usual answer again
    webhook.sessions = None
    assert verify(old)["expires_at"] >= now + 590


# ------------------------------------------------------------------------------------------------
# the user-hash front
# ------------------------------------------------------------------------------------------------
def test_user_hash_front_routes_by_the_verified_sub_only(fleet, webhook):
    """Tokens of one user on every channel reach one replica, which still gets the token
    (forward: true) and decides; a client-sent route header never counts; requests without a
    token the front can verify (another issuer, expired, a ticket) go to RevenProx untouched and
    are hashed by source IP; the front's access log names replica and user, never a token."""
    front = fleet.front("user_hash")

    def get(path, headers=()):
        m = marker()
        r = http1_request(front.port, f"{path}{'&' if '?' in path else '?'}{m}", list(headers) + [("x-upstream-mode", "end")])
        return r, m

    user = "route-" + uuid.uuid4().hex[:8]
    seen = []
    for channel in ("header", "query", "cookie", "access_token"):
        tok = mint(user, 600)
        if channel == "access_token":
            path, headers = f"/events/news?access_token={tok}", []
        else:
            path, headers = with_token("/events/news", channel, tok, [(ROUTE_HEADER, "someone-else")])
        r, m = get(path, headers)
        assert r.status == 200, (channel, r)
        echo = r.first_event_json()
        assert echo["headers"]["x-revenprox-user"] == user, channel
        assert echo["headers"][ROUTE_HEADER] == user, f"{channel}: the verified sub replaces a client's header"
        assert tok not in echo["path"], "RevenProx still strips the token from the upstream path"
        seen.append(m)
    where = fleet.replicas_of(seen)
    assert len({tuple(v) for v in where.values()}) == 1 and len(where[seen[0]]) == 1, where
    home = where[seen[0]][0]

    # the source-IP replica (all test clients are 127.0.0.1) and a user that hashes to the other one
    foreign = helpers.new_token("no-issuer")  # signed with the test key but without the front's `iss`
    r, m = get("/events/news", [("Authorization", f"Bearer {foreign}")])
    assert r.status == 200 and ROUTE_HEADER not in r.first_event_json()["headers"]
    by_ip = fleet.replicas_of([m])[m]
    other = None
    for _ in range(40):  # bounded: each user has an even chance to hash to the other replica
        candidate = "route-" + uuid.uuid4().hex[:8]
        r, m = get("/events/news", [("Authorization", f"Bearer {mint(candidate, 600)}")])
        assert r.status == 200
        if fleet.replicas_of([m])[m] != by_ip:
            other = candidate
            break
    assert other, "40 users all hashed to the source-IP replica"
    # naming that user in the header without a token the front verifies: removed, source-IP replica
    markers = []
    for cred in (("Authorization", f"Bearer {helpers.new_token('no-issuer')}"),
                 ("Cookie", f"revenprox_token={helpers.new_token('no-issuer')}")):
        r, m = get("/events/news", [cred, (ROUTE_HEADER, other)])
        assert r.status == 200 and ROUTE_HEADER not in r.first_event_json()["headers"], r
        markers.append(m)
    r, m = get(f"/events/news?ticket={helpers.new_ticket()}", [(ROUTE_HEADER, other)])
    assert r.status == 200 and ROUTE_HEADER not in r.first_event_json()["headers"], "a ticket is opaque: no route header"
    markers.append(m)
    assert all(v == by_ip for v in fleet.replicas_of(markers).values())
    # the front refuses nothing: an expired token of the right issuer reaches RevenProx, whose 401 it is
    expired = jwtutil.make_jwt(sub=user, secret=SECRET, exp=int(time.time()) - 120, extra={"iss": ISSUER})
    helpers.SENT_TOKENS.append(expired)
    r, _ = get("/events/news", [("Authorization", f"Bearer {expired}")])
    assert r.status == 401 and r.json()["error"] == "invalid_token", r
    # the front's access log: which replica served which user, no query, no token
    line = front.wait_log(f'route_user="{user}"', timeout=5, access=True)
    assert line and f"replica=127.0.0.1:{fleet.replicas[home].port}" in line
    assert "?" not in "".join(ln.split('"')[1] for ln in front.access_log().splitlines() if ln)


@pytest.fixture(scope="module")
def user_hash_run(fleet, webhook):
    """One run of three token lifetimes behind the user-hash front, shared by the two tests below
    (they overlap in time: the suite stays short): 20 users, one stream each (tokens on the header,
    query and cookie channels), and one more user with two tabs opened at the same moment (the
    parallel-EventSource case that defeated cookie affinity), one with ?token=, one with the
    cookie. A stateless webhook: the token's own expiry."""
    webhook.default = Behaviour(verdict=own_expiry)
    front = fleet.front("user_hash")
    before = fleet.counters()
    clients = [EventSourceClient(front.port, u, partial(mint, ttl=LIFETIME), RUN, channel=("header", "query", "cookie")[i % 3])
               for i, u in enumerate(users("uh", STREAMS))]
    (tab_user,) = users("tabs", 1)
    tabs = [EventSourceClient(front.port, tab_user, partial(mint, ttl=LIFETIME), RUN, channel=ch) for ch in ("query", "cookie")]
    try:
        run_all(clients + tabs, timeout=RUN + 20)
    finally:
        for c in clients + tabs:
            c.close()
    every = [r for c in clients + tabs for r in c.refreshes]
    assert helpers.wait_until(lambda: fleet.delta(before, "revenprox_reauthorizations") == len(every), 5), \
        (fleet.delta(before, "revenprox_reauthorizations"), len(every))
    return {"clients": clients, "tabs": tabs, "tab_user": tab_user,
            "user_mismatch": fleet.delta(before, "revenprox_denied_user_mismatch"),
            "streams_expired": fleet.delta(before, "revenprox_streams_expired")}


def test_user_hash_front_keeps_20_streams_alive_over_three_token_lifetimes(fleet, webhook, user_hash_run):
    """20 users, 3 token lifetimes: every refresh is answered 204 (and re-authorizes), every
    stream is alive at the end, no replica counted a user_mismatch or an expired stream, each
    user's requests (stream, refreshes, reconnections) all went to one replica, both replicas
    served users, and an EventSource-like reconnection with the same token is a cache hit on that
    replica (one webhook call per token)."""
    clients = user_hash_run["clients"]
    refreshes = [r for c in clients for r in c.refreshes]
    alive = [c for c in clients if c.alive]
    calls = reconnect_calls(clients, webhook)
    per_user = one_replica_per_user(fleet, clients)
    record("user_hash_20_streams", streams=len(clients), alive=len(alive), refreshes=split(refreshes),
           first_refresh=split([c.refreshes[0] for c in clients if c.refreshes]),
           webhook_calls_per_reopened_token=round(sum(calls) / len(calls), 2),
           users_per_replica=dict(collections.Counter(str(v) for v in per_user.values())))
    assert not [c for c in clients if c.error], "\n".join(c.summary() for c in clients if c.error)
    assert len(alive) == STREAMS, "\n".join(c.summary() for c in clients if not c.alive)
    assert all(len(c.refreshes) >= 4 for c in clients), "\n".join(c.summary() for c in clients)
    assert split(refreshes) == {"204": len(refreshes)}
    assert user_hash_run["user_mismatch"] == 0
    assert user_hash_run["streams_expired"] == 0
    assert all(len(v) == 1 for v in per_user.values()), per_user
    assert {v[0] for v in per_user.values()} == {0, 1}, "20 users all hashed to one replica"
    assert calls == [1] * STREAMS, calls


def test_user_hash_front_two_tabs_of_one_user_both_survive(fleet, user_hash_run):
    """One user, two streams on one topic opened at the same moment, one with ?token=, one with the
    cookie: both land on one replica, every refresh is 204 and both are alive after three token
    lifetimes."""
    tabs, user = user_hash_run["tabs"], user_hash_run["tab_user"]
    refreshes = [r for t in tabs for r in t.refreshes]
    per_user = one_replica_per_user(fleet, tabs)
    record("user_hash_two_tabs", streams=2, alive=sum(t.alive for t in tabs), refreshes=split(refreshes),
           replicas=per_user[user])
    assert all(t.alive for t in tabs), "\n".join(t.summary() for t in tabs)
    assert len(refreshes) >= 4 and split(refreshes) == {"204": len(refreshes)}, [t.summary() for t in tabs]
    assert len(per_user[user]) == 1, per_user
    assert user_hash_run["user_mismatch"] == 0
    assert user_hash_run["streams_expired"] == 0


# ------------------------------------------------------------------------------------------------
# the round-robin front: streams live on through the filter's server-side refresh
# ------------------------------------------------------------------------------------------------
def test_round_robin_front_streams_survive_with_server_side_refresh(fleet, webhook):
    """ROUND_ROBIN front, 20 streams, 3 token lifetimes, a session-tracking webhook told of every
    refreshed token by the issuer (mint registers the session's new expiry): refresh POSTs that
    reach the replica without the stream may get 403 user_mismatch, but every stream is alive at
    the end, because the replica holding it asks the webhook again before expires_at and learns
    the session's newest expiry (server-side refresh)."""
    store = webhook.sessions = SessionStore(SECRET)

    def issue(user):  # the token issuer: a fresh token, and the session store hears of it
        tok = mint(user, LIFETIME)
        store.register(user=user, expires_at=jwtutil.decode_unverified(tok)["exp"])
        return tok

    front = fleet.front("round_robin")
    before = fleet.counters()
    clients = [EventSourceClient(front.port, u, issue, RUN, channel=("header", "query", "cookie")[i % 3])
               for i, u in enumerate(users("rr", STREAMS))]
    try:
        run_all(clients, timeout=RUN + 20)
        refreshes = [r for c in clients for r in c.refreshes]
        alive = [c for c in clients if c.alive]
    finally:
        for c in clients:
            c.close()
    calls = reconnect_calls(clients, webhook)
    streams_at = fleet.replicas_of([c.markers[0] for c in clients])
    record("round_robin_20_streams", streams=len(clients), alive=len(alive), refreshes=split(refreshes),
           first_refresh=split([c.refreshes[0] for c in clients if c.refreshes]),
           webhook_calls_per_reopened_token=round(sum(calls) / len(calls), 2),
           streams_per_replica=dict(collections.Counter(str(v) for v in streams_at.values())),
           expired_events=dict(collections.Counter(c.expired for c in clients if c.expired)),
           ended_after_s=sorted(round(c.ended_at) for c in clients if c.ended_at is not None),
           user_mismatch=fleet.delta(before, "revenprox_denied_user_mismatch"),
           streams_expired=fleet.delta(before, "revenprox_streams_expired"),
           refused_refreshes_that_called_the_webhook=sum(
               1 for r in refreshes if r.status == 403 and webhook.calls_for(r.token)))
    assert not [c for c in clients if c.error], "\n".join(c.summary() for c in clients if c.error)
    assert {tuple(v) for v in streams_at.values()} == {(0,), (1,)}, f"round robin used one replica: {streams_at}"
    assert all(r.status == 204 or (r.status == 403 and r.error == "user_mismatch") for r in refreshes), split(refreshes)
    assert len(alive) == STREAMS, (
        f"{STREAMS - len(alive)} of {STREAMS} streams did not outlive 3 token lifetimes behind a round-robin front "
        f"(refreshes {split(refreshes)}):\n"
        + "\n".join(c.summary() for c in clients if not c.alive))


# ------------------------------------------------------------------------------------------------
# the front carries as many streams as the replicas do
# ------------------------------------------------------------------------------------------------
def test_user_hash_front_carries_more_than_1024_streams(fleet, webhook):
    """1,100 streams of four users opened back to back through the user-hash front: every one is
    answered 200 and held open on the replicas. Each stream is one long request (over HTTP/1.1,
    one connection) in the front's replica cluster for as long as it lasts; with Envoy's default
    circuit breakers (1,024) stream 1,025 would wait forever for its response headers."""
    front = fleet.front("user_hash")
    n, per_user = 1100, 275
    tokens = [mint(u, 600) for u in users("many", n // per_user)]
    for tok in tokens:
        webhook.program(tok, Behaviour(verdict=own_expiry))
    requests = [helpers.silent_stream_request(tok) for tok in tokens for _ in range(per_user)]
    open_streams = lambda: sum(r.stats().get("revenprox_open_streams") or 0 for r in fleet.replicas)
    base = open_streams()
    socks, answers = helpers.open_silent_streams(front.port, requests)
    try:
        assert answers == {"HTTP/1.1 200 OK": n}, (dict(answers), helpers.cluster_pressure(front.stats(), "revenprox_replicas"))
        assert helpers.wait_until(lambda: open_streams() >= base + n, timeout=10), (open_streams(), base + n)
    finally:
        for s in socks:
            s.close()
    assert helpers.wait_until(lambda: open_streams() <= base, timeout=20), (open_streams(), base)


# ------------------------------------------------------------------------------------------------
# behind the front, each client is still its own client
# ------------------------------------------------------------------------------------------------
LB = "127.0.0.4"  # the load balancer's address, when there is one


@pytest.mark.parametrize("behind_lb", [False, True], ids=["clients-at-the-front", "front-behind-a-balancer"])
def test_behind_the_front_one_client_cannot_lock_out_the_others(webhook, upstream, behind_lb):
    """The replicas key per-client fairness and per-client circuits on the client's address. Behind
    the front that must still be the client's address, not the front's (every user would share one
    budget and one circuit) and not one a client names in X-Forwarded-For. mallory (127.0.0.5),
    claiming 127.0.0.6 in X-Forwarded-For, sends tokens the webhook fails on until her circuit
    opens on the replica that holds her user; then 20 other users from 127.0.0.6 (sending that
    address in X-Forwarded-For too, as a client behind its own proxy does), spread over both
    replicas, are all served. Fails with any part of the setup missing: a front that does not
    append the peer (mallory's claim is believed) or replicas that trust one hop too few (everyone
    is the front, or the balancer). With a balancer (127.0.0.4) before the front, the requests
    come from it with the client's address appended, and the front and replicas are set up as
    the front file's comment says (one hop more on each side)."""
    f = Fleet(webhook, upstream, n=2, name="fleet-clients", behind_lb=behind_lb,
              overrides={"jwt_verifier": {"circuit_breaker_threshold": 5, "circuit_breaker_timeout_sec": 60,
                                          "retry_attempts": 0}}).start()

    def send(path, tok, client, claimed):
        """A request of `client` that says X-Forwarded-For: `claimed`, directly or through the
        balancer (which appends the client's address and connects from its own)."""
        xff, source = (f"{claimed}, {client}", LB) if behind_lb else (claimed, client)
        return helpers.http1_request(front.port, path, {"Authorization": f"Bearer {tok}", "X-Forwarded-For": xff},
                                     source=source).status

    try:
        front = f.front("user_hash")
        bad = [mint("mallory", 600) for _ in range(8)]
        for tok in bad:
            webhook.program(tok, Behaviour(status=500))
        refused = [send("/events/news", tok, "127.0.0.5", claimed="127.0.0.6") for tok in bad]
        assert set(refused) == {503}, refused
        opened = [r.stats().get("revenprox_client_circuit_opened") or 0 for r in f.replicas]
        assert sum(opened) >= 1, opened
        mallory_replica = opened.index(max(opened))
        served, markers = [], []
        for user in [f"victim-{i:02d}" for i in range(20)]:
            tok, m = mint(user, 600), marker()
            webhook.program(tok, Behaviour(verdict=own_expiry))
            markers.append(m)
            served.append(send(f"/events/news?{m}", tok, "127.0.0.6", claimed="127.0.0.6"))
        at = f.replicas_of(markers)
        on_mallorys = sum(1 for m in markers if at[m] == [mallory_replica])
        assert on_mallorys >= 1, f"no victim landed on mallory's replica: {at}"
        assert served == [200] * 20, (served, f"{on_mallorys} victims on mallory's replica")
        assert all((r.stats().get("revenprox_circuit_state") or 0) == 0 for r in f.replicas)
    finally:
        f.stop()


@pytest.mark.parametrize("authorization", ["Bearer {}", "bearer {}", "BEARER {}", "Bearer  {}"])
def test_user_hash_front_routes_every_common_scheme_spelling_by_user(fleet, webhook, upstream, authorization):
    """RevenProx takes `Authorization: <scheme> <jwt>` with the scheme in any case; a refresh
    that `fetch` sends as `bearer <jwt>` must reach the user's replica like `Bearer` does, so the
    front's jwt_authn must find the token in it (its prefix match is case-sensitive: lowercase and
    uppercase were routed by source IP, and some refreshes landed on the other replica: 403)."""
    front = fleet.front("user_hash")
    user = f"scheme-{uuid.uuid4().hex[:6]}"
    tok, m = mint(user, 600), marker()
    webhook.program(tok, Behaviour(verdict=own_expiry))
    r = http1_request(front.port, f"/events/news?{m}", {"Authorization": authorization.format(tok)})
    assert r.status == 200, r
    (seen,) = upstream.requests_containing(m)
    assert [v for k, v in seen.headers if k.lower() == ROUTE_HEADER] == [user], seen.headers
