"""Configuration errors refuse Envoy: on_configure fails with one log line naming the key, and
Envoy exits non-zero at start (contract: "Unknown keys, wrong types and impossible values make
`on_configure` fail with one log line naming the key")."""
import re
import uuid

import pytest

from helpers import DELETE, plugin_config

BAD = [
    # (id, config or raw string, key the log must name)
    ("unknown_verifier_key", plugin_config({"jwt_verifier": {"bogus": 1}}), "jwt_verifier.bogus"),
    ("timeout_ms_string", plugin_config({"jwt_verifier": {"timeout_ms": "x"}}), "jwt_verifier.timeout_ms"),
    ("timeout_ms_negative", plugin_config({"jwt_verifier": {"timeout_ms": -5}}), "jwt_verifier.timeout_ms"),
    ("cache_max_size_zero", plugin_config({"jwt_verifier": {"cache_max_size": 0}}), "jwt_verifier.cache_max_size"),
    ("webhook_url_ftp", plugin_config({"jwt_verifier": {"webhook_url": "ftp://x"}}), "jwt_verifier.webhook_url"),
    ("webhook_cluster_missing", plugin_config({"jwt_verifier": {"webhook_cluster": DELETE}}),
     "jwt_verifier.webhook_cluster"),
    ("require_authentication_string", plugin_config({"jwt_verifier": {"require_authentication": "yes"}}),
     "jwt_verifier.require_authentication"),
    ("top_level_unknown_key", plugin_config({"bogus_section": {}}), "bogus_section"),
    ("token_query_params_not_list", plugin_config({"token": {"query_params": "token"}}), "token.query_params"),
    ("token_unknown_key", plugin_config({"token": {"header": "x"}}), "token.header"),
    ("sse_heartbeat_string", plugin_config({"sse": {"heartbeat_interval_sec": "15"}}), "sse.heartbeat_interval_sec"),
    ("section_not_object", plugin_config({"jwt_verifier": ["x"]}), "jwt_verifier"),
    # webhook_cluster is "required when authentication is required": {} cannot run
    ("empty_config", {}, "jwt_verifier.webhook_"),
    ("not_json", "this is { not json", None),
    ("json_not_object", "[1, 2, 3]", None),
]


@pytest.mark.parametrize("cfg,key", [(c, k) for _, c, k in BAD], ids=[i for i, _, _ in BAD])
def test_bad_config_refuses_envoy(envoys, cfg, key):
    rc, log = envoys.expect_exit(cfg, name="badcfg")
    assert rc is not None, "Envoy kept running with a bad plugin configuration"
    assert rc != 0, f"Envoy exited 0 with a bad configuration; log:\n{log[-3000:]}"
    wasm_lines = [ln for ln in log.splitlines() if "wasm log revenprox" in ln]
    assert wasm_lines, f"no log line from the plugin; log:\n{log[-3000:]}"
    if key is not None:
        naming = [ln for ln in wasm_lines if key in ln]
        assert naming, f"no plugin log line names {key!r}; plugin lines:\n" + "\n".join(wasm_lines[-10:])
        assert any(re.search(r"\[(error|critical|warning)\]", ln) for ln in naming), naming
    else:
        errs = [ln for ln in wasm_lines if re.search(r"\[(error|critical)\]", ln)]
        assert errs, "no error line from the plugin:\n" + "\n".join(wasm_lines[-10:])
        assert any(re.search(r"json|configuration|config", ln, re.I) for ln in errs), errs


def test_valid_full_config_starts(envoys):
    """The contract's full example (all keys, defaults) is accepted."""
    full = {
        "jwt_verifier": {
            "webhook_url": "http://auth.test/verify", "webhook_cluster": "auth_webhook", "timeout_ms": 5000,
            "retry_attempts": 3, "cache_ttl_sec": 300, "cache_max_size": 10000, "circuit_breaker_threshold": 10,
            "circuit_breaker_timeout_sec": 60, "rate_limit_per_sec": 1000, "require_authentication": True,
            "precheck": True,
        },
        "token": {"query_params": ["token", "access_token"], "ticket_params": ["ticket"],
                  "cookie": "revenprox_token", "strip_from_upstream": True},
        "topic": {"path_prefix": "/events/"},
        "sse": {"heartbeat_interval_sec": 15, "challenge_before_expiry_sec": 30, "max_connection_sec": 3600},
        "user_header": "x-revenprox-user",
    }
    env = envoys.get(raw=full, name="fullcfg")
    assert env.alive
    r = env.get("/events/news")
    assert r.status == 401


# ----------------------------------------------------------------------------------------------
# start warnings (development mode's is `e2e/test_core.py: test_development_mode`)
# ----------------------------------------------------------------------------------------------
OPTIONAL_AUTH = plugin_config({"jwt_verifier": {"require_authentication": False}})  # webhook kept
OPTIONAL_AUTH_WARNING = re.compile(
    r"\[(warn|warning)\]\[wasm\].*wasm log revenprox.*jwt_verifier\.require_authentication is false: "
    r"requests without a token pass unauthenticated")


def test_optional_authentication_warns_at_start(envoys, upstream):
    oenv = envoys.get(raw=OPTIONAL_AUTH, name="optional-auth")
    log = oenv.wait_log(OPTIONAL_AUTH_WARNING, timeout=5.0)
    assert log is not None, ("optional authentication must log a warning at start; plugin lines:\n"
                             + "\n".join(ln for ln in oenv.envoy_log().splitlines() if "wasm log revenprox" in ln))
    assert "DEVELOPMENT MODE" not in log, "a webhook is configured: this is not development mode"
    # and it is that mode: a request without a token passes, with no user header
    m = "m=" + uuid.uuid4().hex
    r = oenv.get(f"/events/news?{m}", {"x-revenprox-user": "mallory"})
    assert r.status == 200, r
    reqs = upstream.requests_containing(m)
    assert len(reqs) == 1 and reqs[0].header_all("x-revenprox-user") == [], reqs


def test_default_config_has_no_authentication_warning(env):
    r = env.get("/events/news")  # the plugin is configured and serving
    assert r.status == 401, r
    # the log covers the point where the warning would be: the main thread's and every worker's VM
    # were created (and the 401 shows one of them configured)
    created = env.wait_log_count("Thread-Local Wasm created", 1 + env.concurrency)
    assert created >= 1 + env.concurrency, "the log shows no configured wasm VM:\n" + env.log_tail()
    log = env.envoy_log()
    assert not OPTIONAL_AUTH_WARNING.search(log), "optional-authentication warning with the default config"
    lines = [ln for ln in log.splitlines() if "require_authentication is false" in ln or "DEVELOPMENT MODE" in ln]
    assert lines == [], lines
