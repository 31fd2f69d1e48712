"""pytest fixtures for the RevenProx e2e suite (see helpers.py for the harness itself)."""
import json

import pytest

import helpers
from helpers import Envoy, HarnessError, plugin_config
from servers.sse_upstream import SseUpstream
from servers.webhook import Behaviour, WebhookServer


def pytest_sessionstart(session):
    # Fail loudly before anything runs: never skip because the wasm or Envoy is missing.
    try:
        helpers.check_prerequisites()
    except HarnessError as e:
        raise pytest.UsageError(str(e))


@pytest.fixture(scope="session")
def webhook():
    srv = WebhookServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def upstream():
    srv = SseUpstream(default_mode="end").start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _reset_webhook_default(webhook):
    # per-token programs use unique tokens; only the default behaviour (and session tracking,
    # off by default) can leak between tests
    webhook.default, webhook.sessions = Behaviour(), None
    yield
    webhook.default, webhook.sessions = Behaviour(), None


class EnvoyPool:
    """Starts Envoys on demand, one per distinct (config, webhook port) per module."""

    def __init__(self, webhook, upstream, module_name):
        self.webhook = webhook
        self.upstream = upstream
        self.module_name = module_name
        self._cache = {}
        self._all = []

    def get(self, overrides=None, *, raw=None, webhook_port=None, name=None, leak_check=True, **kw):
        """A running Envoy. overrides: merged over the test default config; raw: exact config
        (dict or str) instead. Same arguments -> same (already running) Envoy."""
        cfg = raw if raw is not None else plugin_config(overrides)
        wport = webhook_port if webhook_port is not None else self.webhook.port
        key = (json.dumps(cfg, sort_keys=True) if not isinstance(cfg, str) else cfg, wport,
               json.dumps(kw, sort_keys=True, default=str))
        env = self._cache.get(key)
        if env is not None and env.alive:
            return env
        env = Envoy(cfg, webhook_port=wport, upstream_port=self.upstream.port,
                    name=name or f"{self.module_name}-{len(self._all)}", leak_check=leak_check, **kw)
        self._all.append(env)
        env.start()
        self._cache[key] = env
        return env

    def expect_exit(self, cfg, name="bad-config", timeout=30.0):
        """Start Envoy with `cfg` (dict or raw str, used as-is) and wait for it to exit."""
        env = Envoy(cfg, webhook_port=self.webhook.port, upstream_port=self.upstream.port, name=name,
                    leak_check=False)
        self._all.append(env)
        return env.run_expect_exit(timeout=timeout)

    def stop_all(self):
        for env in self._all:
            env.stop()


@pytest.fixture(scope="module")
def envoys(request, webhook, upstream):
    pool = EnvoyPool(webhook, upstream, request.module.__name__.split(".")[-1])
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def env(envoys):
    """Envoy with the default test config (webhook at auth.test/verify via cluster auth_webhook)."""
    return envoys.get(name="default")
