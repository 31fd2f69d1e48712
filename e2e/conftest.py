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


_leak_report = []


def pytest_sessionfinish(session, exitstatus):
    """The token-leak scan, once after every test of the run: no credential the tests created
    (helpers.SENT_TOKENS) in the log or access log of any Envoy the run started
    (helpers.ALL_ENVOYS; those started with leak_check=False log tokens on purpose). A leak fails
    the run, whatever the tests said."""
    for env in helpers.ALL_ENVOYS:
        env.stop()  # normally stopped already by its fixture; exiting flushes its access log
    checked = [e for e in helpers.ALL_ENVOYS if e.leak_check]
    leaks = helpers.credential_leaks(checked, helpers.SENT_TOKENS)
    if leaks:
        _leak_report.append(f"{len(leaks)} credential(s) in Envoy logs (the filter or the template logs tokens):")
        _leak_report.extend(f"  {path}: {helpers.describe_credential(c)}" for path, c in leaks)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        _leak_report.append(f"token-leak scan: {len(set(helpers.SENT_TOKENS))} credentials, logs and access logs "
                            f"of {len(checked)} Envoys: none found")


def pytest_terminal_summary(terminalreporter):
    if len(_leak_report) > 1:
        terminalreporter.write_sep("=", "credential leak", red=True, bold=True)
        for line in _leak_report:
            terminalreporter.write_line(line, red=True)
    elif _leak_report:
        terminalreporter.write_line(_leak_report[0])


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


@pytest.fixture(scope="module")
def envoys(request, webhook, upstream):
    pool = helpers.EnvoyPool(webhook, upstream, request.module.__name__.split(".")[-1])
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def env(envoys):
    """Envoy with the default test config (webhook at auth.test/verify via cluster auth_webhook)."""
    return envoys.get(name="default")
