"""The Python recipe of docs/clients.md (the part between the `recipe` lines is copied into the doc
verbatim; e2e/test_clients.py checks that), and the driver e2e/test_clients.py runs it with:

    python follow.py recipe URL TOKEN_URL REFRESHES   the recipe: answers REFRESHES challenges,
                                                      returns at `expired`
    python follow.py plain URL TOKEN_URL              a bare httpx-sse loop that does not stop at
                                                      `expired`: what it sees, and what it raises

Every GET of TOKEN_URL returns a fresh token. One JSON line per thing seen goes to stdout.
httpx and httpx-sse (pinned) come from .venv (make client-deps).
"""
import time

# recipe:start
import json
import sys

import httpx
from httpx_sse import connect_sse


def follow(url, get_token, on_event):
    """Follows a RevenProx topic until the filter ends it; returns the reason of `event: expired`
    ('token_expired' or 'max_duration'). Any exception is a failure, not the expiry: the reset
    that follows `expired` is never read. get_token(): a NEW token (a later exp) per call, or
    None when the session is over (the challenge then goes unanswered and the stream expires)."""
    # Heartbeats come every heartbeat_interval_sec (15 s by default): a minute of silence is a
    # dead connection.
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
        headers = {"Authorization": f"Bearer {get_token()}"}
        with connect_sse(client, "GET", url, headers=headers) as source:
            source.response.raise_for_status()  # 401/403/404/429/503 with a JSON error body
            for sse in source.iter_sse():
                if sse.event == "message" and sse.data == "":
                    continue  # `: heartbeat` (httpx-sse reports it as an empty message, #35)
                if sse.event == "challenge":
                    token = get_token()
                    if token:
                        r = client.post(url, headers={"content-type": "application/x-challenge-response",
                                                      "Authorization": f"Bearer {token}"})
                        if r.status_code != 204:
                            print(f"challenge answer refused: {r.status_code} {r.text}", file=sys.stderr)
                elif sse.event == "expired":
                    return json.loads(sse.data)["reason"]  # leave before the filter resets the stream
                else:
                    on_event(sse)
    raise ConnectionError("the stream ended without event: expired")
# recipe:end


T0 = time.monotonic()


def out(kind, **extra):
    print(json.dumps({"t": round(time.monotonic() - T0, 3), "at": time.time(), "kind": kind, **extra}), flush=True)


def main(mode, url, token_url, refreshes="0"):
    left = {"n": int(refreshes) + 1}

    def get_token():
        if left["n"] <= 0:
            return None
        left["n"] -= 1
        return httpx.get(token_url).text

    if mode == "recipe":
        try:
            reason = follow(url, get_token, lambda sse: out("message", event=sse.event, data=sse.data, id=sse.id))
            out("expired", reason=reason)
        except Exception as e:
            out("raised", type=f"{type(e).__module__}.{type(e).__name__}", message=str(e))
    elif mode == "plain":
        with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
            try:
                with connect_sse(client, "GET", url, params={"token": get_token()}) as source:
                    for sse in source.iter_sse():
                        out(sse.event, data=sse.data, id=sse.id)
                out("ended")
            except Exception as e:
                out("raised", type=f"{type(e).__module__}.{type(e).__name__}", message=str(e))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(*sys.argv[1:])
