"""API tokens: scopes, hashing, verification, and the loopback rule for ``--no-auth``.

A token is ``mox_`` + 256 random bits (URL-safe base64). The store keeps only its SHA-256
(``tokens.hash``), so a leaked database does not leak usable tokens; ``moxco token create`` prints
the secret once. Verification hashes the presented secret, looks the digest up, and compares it
with ``hmac.compare_digest`` (constant time). Verified tokens are cached for ``cache_s`` seconds
per process so a busy ingest path does not pay a database round trip per request; a revocation
therefore takes effect within that time.

Scopes (docs/api.md): ``ingest`` (register runs, send batches, acknowledge and poll decisions),
``read`` (queries), ``decide`` (operator decisions), ``admin`` (everything).
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from moxco.collector.schema import TOKEN_SCOPES
from moxco.collector.store import Store, hash_token

SCOPES = TOKEN_SCOPES


class AuthError(Exception):
    """401 (no or unknown token) or 403 (the token lacks the scope); ``status`` says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and scopes (``anonymous`` when auth is off)."""

    token_id: Optional[int]
    name: str
    scopes: frozenset

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal(None, "anonymous", frozenset(SCOPES))

# The per-token rate limiter (``TokenBucket``, or any callable like it): called with the principal and the route's
# scope, it returns None to let the request through or the seconds the caller should wait (429).
RateLimiter = Callable[[Principal, str], Optional[float]]


class TokenBucket:
    """A ``RateLimiter``: per token, ``rate`` requests per second sustained, bursts of ``burst``.

    Each token (by id; ``anonymous`` when auth is off) has a bucket of ``burst`` credits refilled at
    ``rate`` per second; a request takes one credit, or gets the seconds until one is back (the
    app answers 429 with that as ``Retry-After``). Buckets live in the worker process: with
    ``--workers N`` a token gets up to N × ``rate``. ``clock`` is injectable for tests.
    """

    def __init__(self, rate: float, burst: Optional[float] = None, *, clock: Callable[[], float] = time.monotonic,
                 max_tokens: int = 100_000) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, 2.0 * self.rate)
        if self.burst < 1:
            raise ValueError(f"burst must be ≥ 1, got {burst!r}")
        self.clock = clock
        self.max_tokens = int(max_tokens)
        self._buckets: Dict[Any, Tuple[float, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, principal: Principal, scope: str) -> Optional[float]:
        key = principal.token_id if principal.token_id is not None else principal.name
        now = self.clock()
        with self._lock:
            credits, last = self._buckets.get(key, (self.burst, now))
            credits = min(self.burst, credits + (now - last) * self.rate)
            if len(self._buckets) >= self.max_tokens and key not in self._buckets:
                self._buckets.clear()  # bounded memory; only live tokens reach this point anyway
            if credits >= 1.0:
                self._buckets[key] = (credits - 1.0, now)
                return None
            self._buckets[key] = (credits, now)
            return (1.0 - credits) / self.rate


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def not_local(host: Optional[str], origin: Optional[str]) -> Optional[str]:
    """Why a request to a collector without auth is refused (None: it is not): its ``Host`` header
    must name a loopback address (``127.0.0.1:8000``, ``localhost``, ``[::1]:8000``), and so must
    its ``Origin`` when it has one (``http://127.0.0.1:8000``; ``null`` is refused)."""
    name = _host_name(host or "")
    if not name or not is_loopback(name):
        return (f"this collector runs without auth (--no-auth) and answers only requests addressed to this "
                f"machine: Host {host!r} is not a loopback address (a web page reaching it through DNS "
                "rebinding?). Use http://127.0.0.1:<port>, or serve with tokens")
    if origin is not None:
        from urllib.parse import urlsplit

        try:
            origin_host = urlsplit(origin).hostname or ""
        except ValueError:
            origin_host = ""
        if not origin_host or not is_loopback(origin_host):
            return (f"this collector runs without auth (--no-auth) and answers only pages of this machine: "
                    f"Origin {origin!r} is not (another web site's page writing to it?)")
    return None


def _host_name(host: str) -> str:
    """The name in a ``Host`` header: ``[::1]:8000`` → ``::1``, ``localhost:8000`` → ``localhost``."""
    host = host.strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_no_auth_bind(host: str) -> None:
    """Refuse ``--no-auth`` on an address other machines can reach (docs/api.md, Auth)."""
    if not is_loopback(host):
        raise ValueError(f"--no-auth is only allowed on a loopback address (127.0.0.1, ::1, localhost), "
                         f"not {host!r}: anyone who can reach {host} could write runs and issue decisions. "
                         "Create a token with `moxco token create --scope ingest --scope read` instead.")


class TokenVerifier:
    """Checks ``Authorization: Bearer <token>`` headers against the store's tokens."""

    def __init__(self, store: Store, *, cache_s: float = 5.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: Dict[str, Tuple[float, Optional[Principal]]] = {}
        self._lock = threading.Lock()

    def authenticate(self, header: Optional[str]) -> Principal:
        """The principal of a request's ``Authorization`` header; ``AuthError(401)`` otherwise."""
        if not header:
            raise AuthError(401, "missing token: send `Authorization: Bearer <token>` "
                                 "(create one with `moxco token create --scope …`)")
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthError(401, "malformed Authorization header: expected `Bearer <token>`")
        digest = hash_token(secret)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            row = self.store.token_by_hash(digest)
            principal = None
            if row is not None and hmac.compare_digest(row["hash"], digest):
                principal = Principal(row["id"], row["name"], frozenset(row["scopes"]))
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + self.cache_s, principal)
        if principal is None:
            raise AuthError(401, "unknown or revoked token")
        return principal

    @staticmethod
    def authorize(principal: Principal, scope: str) -> None:
        if not principal.allows(scope):
            raise AuthError(403, f"token {principal.name!r} lacks the {scope!r} scope "
                                 f"(it has: {', '.join(sorted(principal.scopes))})")
