"""Measurement, not a test (issue 13): Envoy's memory while streams of many distinct users open and
close through one Envoy with `sse.max_streams_per_user` set.

Every user's stream is counted in the Envoy-wide presence table (its user record at admission, its
user-and-topic record once the worker's timer registers it) and removed from it when the stream
ends; the table is a fixed set of shared-data buckets, so Envoy's RSS must level off whatever the
number of users. This opens and ends one stream per distinct user (a distinct JWT whose `sub` is
the user: one webhook verification each), `--concurrency` at a time, and prints Envoy's VmRSS
(/proc/<pid>/status of the Envoy this script started) at the start and after every `--every`
users, then the gauges once everything is closed.

    make wasm envoy
    .venv/bin/python e2e/presence_rss.py                       # 100,000 users (minutes)
    .venv/bin/python e2e/presence_rss.py --users 10000 --hold-ms 100

--hold-ms 0 (default): each stream ends by the upstream (`x-upstream-mode: end`) on a kept-alive
connection, the fastest way through admission and release. --hold-ms N: each stream stays open N
ms (long enough for the timer to write its user-and-topic record), then the client closes its
connection. Everything runs on 127.0.0.1 and stops by itself; Envoy is stopped by its PID.
"""
import argparse
import concurrent.futures
import http.client
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402
from helpers import Envoy, plugin_config, wait_until  # noqa: E402
from servers import jwtutil  # noqa: E402
from servers.sse_upstream import SseUpstream  # noqa: E402
from servers.webhook import WebhookServer  # noqa: E402


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Lane:
    """One client connection (kept alive when the upstream ends the streams)."""

    def __init__(self, port, hold_ms):
        self.port, self.hold_ms, self.conn = port, hold_ms, None

    def stream(self, user, topic):
        tok = jwtutil.make_jwt(sub=user, ttl=3600)
        mode = "silent" if self.hold_ms else "end"
        for attempt in range(3):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.request("GET", f"/events/{topic}",
                                  headers={"authorization": f"Bearer {tok}", "x-upstream-mode": mode})
                resp = self.conn.getresponse()
                if resp.status != 200 or not self.hold_ms:
                    resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"user {user}: status {resp.status}")
                    return
                resp.read1(65536)  # the first event: the stream is open
                time.sleep(self.hold_ms / 1000)
                self.conn.close()
                self.conn = None
                return
            except (ConnectionError, http.client.HTTPException, OSError):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=10_000, help="print RSS after this many users")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--limit", type=int, default=2, help="sse.max_streams_per_user")
    ap.add_argument("--hold-ms", type=int, default=0)
    ap.add_argument("--topics", type=int, default=4, help="topics the users' streams spread over")
    args = ap.parse_args(argv)
    helpers.check_prerequisites()

    webhook = WebhookServer().start()
    upstream = SseUpstream(default_mode="end").start()
    cfg = plugin_config({"jwt_verifier": {"rate_limit_per_sec": 1_000_000, "rate_limit_per_client_per_sec": 1_000_000},
                         "sse": {"max_streams_per_user": args.limit}})
    env = Envoy(cfg, webhook_port=webhook.port, upstream_port=upstream.port, name="presence-rss", leak_check=False)
    env.start()
    try:
        pid = env.proc.pid
        run = f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cores, --concurrency {args.concurrency}, " \
              f"--hold-ms {args.hold_ms}, max_streams_per_user {args.limit}"
        print(f"presence RSS: {run}; Envoy pid {pid}, log {env.log_path}", flush=True)
        print(f"{'users':>9} {'RSS MiB':>9} {'elapsed s':>10} {'users/s':>8}", flush=True)
        start_rss = rss_kb(pid)
        print(f"{0:>9} {start_rss / 1024:>9.1f} {0:>10.1f} {'-':>8}", flush=True)
        run_id = os.urandom(3).hex()
        counter = iter(range(args.users))
        lock = threading.Lock()
        done = [0]
        t0 = time.monotonic()
        next_report = [args.every]
        rows = []

        def lane_main():
            lane = Lane(env.port, args.hold_ms)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                lane.stream(f"rss-{run_id}-{i}", f"topic{i % args.topics}")
                with lock:
                    done[0] += 1
                    if done[0] >= next_report[0]:
                        next_report[0] += args.every
                        el = time.monotonic() - t0
                        row = (done[0], rss_kb(pid), el)
                        rows.append(row)
                        print(f"{row[0]:>9} {row[1] / 1024:>9.1f} {el:>10.1f} {row[0] / el:>8.0f}", flush=True)

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as ex:
            for f in [ex.submit(lane_main) for _ in range(args.concurrency)]:
                f.result()
        took = time.monotonic() - t0
        wait_until(lambda: env.stats().get("revenprox_open_streams") == 0, timeout=10, interval=0.1)
        time.sleep(2)
        st = env.stats()
        end_rss = rss_kb(pid)
        print(f"done: {args.users} users in {took:.1f}s ({args.users / took:.0f}/s); RSS {start_rss / 1024:.1f} MiB "
              f"at start, {end_rss / 1024:.1f} MiB at the end (+{(end_rss - start_rss) / 1024:.1f} MiB)")
        if len(rows) >= 2:
            first = rows[0]
            print(f"after the first {first[0]} users: {first[1] / 1024:.1f} MiB; from there to {args.users}: "
                  f"{(end_rss - first[1]) / 1024:+.1f} MiB")
        print(f"revenprox_open_streams {st.get('revenprox_open_streams'):.0f}, "
              f"revenprox_presence_full {st.get('revenprox_presence_full'):.0f}, "
              f"revenprox_denied_too_many_streams {st.get('revenprox_denied_too_many_streams'):.0f}, "
              f"revenprox_webhook_calls {st.get('revenprox_webhook_calls'):.0f}, "
              f"revenprox_allowed {st.get('revenprox_allowed'):.0f}")
    finally:
        env.stop()
        upstream.stop()
        webhook.stop()


if __name__ == "__main__":
    main()
