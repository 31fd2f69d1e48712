"""Compact JWT (HS256) helpers and the contract's topic id, stdlib only.

Used by the e2e tests, the test/demo webhook and demo/run.py.
"""
import base64
import hashlib
import hmac
import json
import re
import time
import urllib.parse

_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def make_jwt(sub="user", exp=None, secret=b"test-secret", ttl=600, extra=None, header=None) -> str:
    """A real compact JWT: base64url(header).base64url(payload).base64url(HS256 signature).

    exp defaults to now + ttl; pass exp=False to omit the claim.
    """
    if isinstance(secret, str):
        secret = secret.encode()
    hdr = header if header is not None else {"alg": "HS256", "typ": "JWT"}
    now = int(time.time())
    payload = {"sub": sub, "iat": now}
    if exp is None:
        payload["exp"] = now + ttl
    elif exp is not False:
        payload["exp"] = int(exp)
    if extra:
        payload.update(extra)
    signing_input = (
        b64url(json.dumps(hdr, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(payload, separators=(",", ":")).encode())
    )
    sig = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def decode_unverified(token: str):
    """Payload dict of a compact JWT without checking anything, or None."""
    try:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        payload = json.loads(b64url_decode(parts[1]))
        return payload if isinstance(payload, dict) else None
    except Exception:
        return None


def verify_hs256(token: str, secret, now=None, check_exp=True):
    """Checked payload (signature HS256 + exp in the future) or None. check_exp=False checks the
    signature only (the payload must still have a numeric exp)."""
    if isinstance(secret, str):
        secret = secret.encode()
    try:
        h, p, s = token.split(".")
        header = json.loads(b64url_decode(h))
        if not isinstance(header, dict) or header.get("alg") != "HS256":
            return None
        want = hmac.new(secret, f"{h}.{p}".encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(want, b64url_decode(s)):
            return None
        payload = json.loads(b64url_decode(p))
        if not isinstance(payload, dict):
            return None
        exp = payload.get("exp")
        now = time.time() if now is None else now
        if not isinstance(exp, (int, float)) or (check_exp and exp <= now):
            return None
        return payload
    except Exception:
        return None


def topic_id(segment: str) -> str:
    """The contract's topic id for a raw (still percent-encoded) path segment.

    32 hex digits -> the segment itself, lowercased; otherwise the first 16 bytes of
    SHA-256 of the percent-decoded segment, hex-encoded.
    """
    if _HEX32.match(segment):
        return segment.lower()
    decoded = urllib.parse.unquote_to_bytes(segment)
    return hashlib.sha256(decoded).digest()[:16].hex()
