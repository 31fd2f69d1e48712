"""Third independent attack run (after the fixes of the second): one test per finding, against the
real Envoy and template (SECURITY.md, "Findings", 28 and later). Each failed on the build before
its fix."""
import copy
import json
import time
import uuid

import pytest
import yaml

import helpers
from helpers import SENT_TOKENS, Stream, free_port, new_ticket, new_token
from servers import jwtutil
from servers.webhook import Behaviour, WebhookServer, invalid, valid
from test_core import bearer
from test_trust_second_run import (CR, LEARN, connection_on_worker, jwt_for, open_victim_stream, request,
                                   stream_until_revoked)


def alg_none(sub):
    """A self-minted, unsigned token naming `sub`: no credential of that user at all."""
    h = jwtutil.b64url(b'{"alg":"none","typ":"JWT"}')
    p = jwtutil.b64url(json.dumps({"sub": sub, "exp": int(time.time()) + 600, "jti": uuid.uuid4().hex}).encode())
    tok = f"{h}.{p}."
    SENT_TOKENS.append(tok)
    return tok


# ----------------------------------------------------------------------------------------------
# 28. The early refusal of a misrouted refresh told anyone whether a user had a stream on a topic
# ----------------------------------------------------------------------------------------------
def test_a_refresh_answer_tells_nothing_of_another_users_streams(envoys, webhook):
    env = envoys.get({"sse": {"reverify_interval_sec": 0}}, name="trust3-oracle")  # the defaults otherwise
    conn_a, w_a = connection_on_worker(env)
    conn_b, _ = connection_on_worker(env, avoid=w_a)
    try:
        for conn in (conn_a, conn_b):  # ordinary users whose user_id is their sub, on both workers
            for i in range(10):
                st, _ = request(conn, "GET", "/events/lobby", {**bearer(new_token(f"ord{i}")), "x-upstream-mode": "end"})
                assert st == 200
        victim = "victim-" + uuid.uuid4().hex[:8]
        with Stream(env.port, "/events/secret-room", {**bearer(jwt_for(victim)), "x-upstream-mode": "silent"},
                    timeout=10) as s:
            assert s.status == 200
            s.read_until(lambda t: "\n\n" in t, timeout=3)
            time.sleep(1.2)  # registered Envoy-wide
            answers = {}
            for topic in ("secret-room", "other-room"):
                forged = alg_none(victim)
                webhook.program(forged, invalid())
                r = env.get(f"/events/{topic}", {**bearer(forged), "content-type": CR}, method="POST", body=b"")
                answers[topic] = (r.status, r.json().get("error"), len(webhook.calls_for(forged)))
        assert answers["secret-room"] == answers["other-room"] == (401, "invalid_token", 1), answers
    finally:
        conn_a.close()
        conn_b.close()


# ----------------------------------------------------------------------------------------------
# 29. Two configurations in one Envoy shared the cache (and the circuit, the budget, the records)
# ----------------------------------------------------------------------------------------------
def two_listener_envoy(webhook_a, webhook_b, upstream, cfg_a, cfg_b, name):
    """One Envoy, the template's listener with `cfg_a`, and a copy on another port with `cfg_b`
    whose webhook cluster `auth_webhook_b` reaches `webhook_b` (same vm_id, as in README)."""
    env = helpers.Envoy(cfg_a, webhook_port=webhook_a.port, upstream_port=upstream.port, name=name)
    doc = yaml.safe_load(env.yaml_path.read_text())
    res = doc["static_resources"]
    lis_b = copy.deepcopy(res["listeners"][0])
    lis_b["name"] = "revenprox_listener_b"
    port_b = free_port()
    lis_b["address"]["socket_address"]["port_value"] = port_b
    hcm = lis_b["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "revenprox_ingress_b"
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            f["typed_config"]["config"]["configuration"]["value"] = json.dumps(cfg_b)
    res["listeners"].append(lis_b)
    wh_b = copy.deepcopy(next(c for c in res["clusters"] if c["name"] == "auth_webhook"))
    wh_b["name"] = wh_b["load_assignment"]["cluster_name"] = "auth_webhook_b"
    wh_b["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = webhook_b.port
    res["clusters"].append(wh_b)
    env.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return env, port_b


def test_a_second_configuration_never_serves_the_first_webhooks_allow(webhook, upstream):
    hook_b = WebhookServer().start()
    hook_b.default = invalid()  # listener B's webhook refuses everything
    cfg_a = helpers.plugin_config({})
    cfg_b = helpers.plugin_config({"jwt_verifier": {"webhook_url": "http://internal-auth.test/verify",
                                                    "webhook_cluster": "auth_webhook_b"}})
    env, port_b = two_listener_envoy(webhook, hook_b, upstream, cfg_a, cfg_b, "trust3-two-configs")
    try:
        env.start()
        tok = new_token("customer")
        webhook.program(tok, valid("customer-1"))
        assert env.get("/events/news", bearer(tok)).status == 200  # allowed and cached by A
        calls_b = len(hook_b.calls)
        rb = helpers.http1_request(port_b, "/events/news", bearer(tok))
        assert rb.status == 401, f"listener B served A's cached allow: {rb!r}"
        assert len(hook_b.calls) == calls_b + 1, "listener B's own webhook was not asked"
    finally:
        env.stop()
        hook_b.stop()


# ----------------------------------------------------------------------------------------------
# 30. A stats_matcher that drops the filter's stats turned the revocation count (and the count of
#     user ids that are not subs) into a stat that always reads 0
# ----------------------------------------------------------------------------------------------
MATCHERS = {
    "exclude-wasmcustom": {"exclusion_list": {"patterns": [{"prefix": "wasmcustom."}]}},
    "inclusion-list": {"inclusion_list": {"patterns": [{"prefix": "server."}, {"prefix": "cluster_manager"},
                                                       {"prefix": "listener"}, {"prefix": "http."}]}},
}


def envoy_with_stats_matcher(cfg, matcher, webhook, upstream, name):
    env = helpers.Envoy(helpers.plugin_config(cfg), webhook_port=webhook.port, upstream_port=upstream.port, name=name)
    doc = yaml.safe_load(env.yaml_path.read_text())
    doc["stats_config"] = {"stats_matcher": MATCHERS[matcher]}
    env.yaml_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return env


@pytest.mark.parametrize("matcher", list(MATCHERS))
def test_with_the_filters_stats_dropped_a_revoked_credential_is_still_never_served(webhook, upstream, matcher):
    cfg = {"jwt_verifier": {"cache_ttl_sec": 300}, "sse": {"heartbeat_interval_sec": 1, "reverify_interval_sec": 2}}
    env = envoy_with_stats_matcher(cfg, matcher, webhook, upstream, f"trust3-stats-{matcher}")
    env.start()
    try:
        assert env.wait_log("drops the revenprox_revocations stat", timeout=5), "no warning at start"
        conn_a, w_a = connection_on_worker(env)
        conn_b, _ = connection_on_worker(env, avoid=w_a)
        tok = new_token("revoked-elsewhere")
        webhook.program(tok, valid("revoked-user", ttl=600), valid("revoked-user", ttl=600), invalid())
        st, _ = request(conn_a, "GET", "/events/news", {**bearer(tok), "x-upstream-mode": "end"})
        assert st == 200  # in worker A's local cache, and the shared one
        stream_until_revoked(conn_b, tok)
        st2, _ = request(conn_a, "GET", "/events/news", {**bearer(tok), "x-upstream-mode": "end"})
        conn_a.close()
        conn_b.close()
        assert st2 == 401, f"[{matcher}] a revoked credential was served from worker A's cache"
    finally:
        env.stop()


def test_with_the_filters_stats_dropped_a_user_whose_id_is_not_the_sub_keeps_its_refresh(webhook, upstream):
    env = envoy_with_stats_matcher(LEARN, "inclusion-list", webhook, upstream, "trust3-stats-subjects")
    env.start()
    try:
        stream_conn, w_stream = connection_on_worker(env)
        other_conn, _ = connection_on_worker(env, avoid=w_stream)
        for i in range(10):
            st, _ = request(other_conn, "GET", "/events/news", {**bearer(new_token(f"ordinary{i}")), "x-upstream-mode": "end"})
            assert st == 200
        sub = "Victim.Smith-" + uuid.uuid4().hex[:6]
        uid = sub.lower()
        open_victim_stream(env, stream_conn, webhook, jwt_for(sub), uid, False)
        refresh = jwt_for(sub)
        webhook.program(refresh, valid(uid, ttl=3600))
        deadline = time.monotonic() + 3
        while True:
            st, body = request(other_conn, "POST", "/events/news", {**bearer(refresh), "content-type": CR}, b"")
            if st == 204 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        stream_conn.close()
        other_conn.close()
        assert st == 204, (st, body)
    finally:
        env.stop()


# ----------------------------------------------------------------------------------------------
# 31. One client locked out everyone behind its address with requests its webhook answers 4xx
# ----------------------------------------------------------------------------------------------
def test_one_client_cannot_lock_out_the_others_behind_its_address(envoys, webhook):
    env = envoys.get({"jwt_verifier": {"circuit_breaker_threshold": 10, "circuit_breaker_timeout_sec": 60},
                      "sse": {"reverify_interval_sec": 0}}, name="trust3-shared-address")
    shared = "127.0.0.77"  # one public address (a NAT), several people behind it
    colleague = new_token("colleague")
    webhook.program(colleague, valid("colleague", ttl=600))
    with Stream(env.port, "/events/news", {**bearer(colleague), "x-upstream-mode": "silent"}, timeout=15) as s:
        assert s.status == 200
        for i in range(10):  # ten tokens its webhook answers 400
            bad = new_token(f"four-hundred-shared{i}")
            webhook.program(bad, Behaviour(status=400))
            assert env.get("/events/news", bearer(bad), source=shared).status == 503
        fresh = new_token("neighbour")
        webhook.program(fresh, valid("neighbour", ttl=600))
        r1 = env.get("/events/news", bearer(fresh), source=shared)
        refresh = new_token("colleague")
        webhook.program(refresh, valid("colleague", ttl=3600))
        deadline = time.monotonic() + 3
        while True:  # the colleague's stream is registered Envoy-wide at its worker's next tick
            r2 = env.get("/events/news", {**bearer(refresh), "content-type": CR}, method="POST", body=b"",
                         source=shared)
            if r2.status != 403 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (r1.status, r2.status) == (200, 204), (r1, r2)


# ----------------------------------------------------------------------------------------------
# 32. A one-time ticket answered after someone else's revocation was asked about again (and refused)
# ----------------------------------------------------------------------------------------------
def test_a_ticket_verified_while_someone_elses_stream_is_revoked_is_still_accepted(envoys, webhook):
    env = envoys.get({"sse": {"heartbeat_interval_sec": 1, "reverify_interval_sec": 2}}, name="trust3-ticket-race")
    conn_a, w_a = connection_on_worker(env)
    conn_b, _ = connection_on_worker(env, avoid=w_a)
    try:
        other = new_token("logged-out")
        webhook.program(other, valid("someone-else", ttl=600), invalid())  # revoked at its re-verification
        conn_b.request("GET", "/events/lobby", headers={**bearer(other), "x-upstream-mode": "silent"})
        rb = conn_b.getresponse()
        assert rb.status == 200
        rb.read1(65536)
        ticket = new_ticket()  # valid once (its answer takes 3 s), consumed after
        webhook.program(ticket, Behaviour(verdict={"valid": True, "user_id": "ticket-holder",
                                                   "expires_at": int(time.time()) + 600}, delay=3.0), invalid())
        st, body = request(conn_a, "GET", f"/events/news?ticket={ticket}", {"x-upstream-mode": "end"})
        assert (env.stats().get("revenprox_revocations") or 0) >= 1, "nothing was revoked during the ticket's call"
        assert st == 200, (st, body[:200], len(webhook.calls_for(ticket)))
        assert len(webhook.calls_for(ticket)) == 1
    finally:
        conn_a.close()
        conn_b.close()
