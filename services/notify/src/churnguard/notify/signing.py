"""Signatures notify puts on what it sends, and checks on what comes back.

* Webhooks (the webhook channel and the webhook payment adapter) carry
  ``Churnguard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``,
  the scheme Stripe uses, so a receiver checks both the body and its age (replays of an
  old request fail). :func:`verify_webhook` is the receiver's side.
* Unsubscribe links carry a token that names the address and is signed, so nobody can
  unsubscribe someone else by editing a URL. Tokens do not expire: an unsubscribe link
  in an old email must keep working (RFC 8058 expects that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

SIGNATURE_HEADER = "Churnguard-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_webhook(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class BadSignature(ValueError):
    pass


def verify_webhook(
    secret: str, header: str | None, body: bytes, tolerance_s: int = 300, now: float | None = None
) -> None:
    """Raise :class:`BadSignature` unless ``header`` signs ``body`` within ``tolerance_s``."""
    if not header:
        raise BadSignature(f"missing {SIGNATURE_HEADER} header")
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts["t"])
    except (KeyError, ValueError):
        raise BadSignature("signature header has no timestamp") from None
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        raise BadSignature("signature timestamp outside the tolerance")
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, parts.get("v1", "")):
        raise BadSignature("signature does not match the body")


def unsubscribe_token(secret: str, email: str) -> str:
    address = email.strip().lower().encode()
    mac = hmac.new(secret.encode(), b"unsubscribe:" + address, hashlib.sha256).digest()
    return f"{_b64(address)}.{_b64(mac[:18])}"


def read_unsubscribe_token(secret: str, token: str) -> str:
    """The address a token was made for; :class:`BadSignature` if forged or garbled."""
    try:
        encoded, _, mac = token.partition(".")
        address = _unb64(encoded).decode()
    except (ValueError, UnicodeDecodeError):
        raise BadSignature("unsubscribe token is malformed") from None
    if not hmac.compare_digest(unsubscribe_token(secret, address), f"{encoded}.{mac}"):
        raise BadSignature("unsubscribe token signature does not match")
    return address
