"""The API's guardrails: who may call, under which cache namespace, and how much at once.

Keys are kept only as SHA-256 digests (the raw key never reaches logs, the Serve application's
arguments or the dashboard) and compared in constant time against every known digest. Each key
is a tenant: its namespace salts every prefix block key and scopes every session id, so one
tenant can neither hit nor time another tenant's cached prompts. The families a tenant's
requests compute are recorded under its namespace, and the stats show each tenant only its own;
an admin key (`server.admin_api_key`), itself a tenant too, sees every tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from kv3d.config import LimitsConfig
from kv3d.server.openai_schema import APIError

NAMESPACE_CHARS = 16


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def digests_from_setting(api_key: str) -> tuple[str, ...]:
    """`server.api_key` or `server.admin_api_key` (one key, or several separated by commas) as
    digests."""
    return tuple(key_digest(k.strip()) for k in api_key.split(",") if k.strip())


@dataclass(frozen=True, slots=True)
class Tenant:
    namespace: str = ""  # "" when the API is open
    admin: bool = False  # an admin key: sees every tenant's figures

    def sees(self, owner: str) -> bool:
        """Whether figures about what `owner` (a namespace, `GenerationRequest.tenant`) cached
        are shown to this tenant: its own only, or everyone's to an admin key."""
        return self.admin or owner == self.namespace

    def cache_salt(self, request_salt: str | None) -> str:
        """The salt of this tenant's block keys, with the request's own `cache_salt`."""
        if not self.namespace and not request_salt:
            return ""
        return f"{self.namespace}|{request_salt or ''}"

    def session_id(
        self, session_id: str | None, cache_salt: str | None = None, user: str | None = None
    ) -> str | None:
        """The engine's id of a conversation: the client's id within this tenant's namespace,
        the request's `cache_salt` and OpenAI's `user` (an end user, who may hold many
        conversations), so that a session is reachable only from the same three."""
        if session_id is None:
            return None
        if not (self.namespace or cache_salt or user):
            return session_id
        # Hashed together, so no choice of salt and user can spell another pair's scope.
        scope = hashlib.blake2b(
            json.dumps([cache_salt or "", user or ""]).encode(), digest_size=8
        ).hexdigest()
        return f"{self.namespace}/{scope}/{session_id}"


OPEN = Tenant()


class Guard:
    """Authenticates requests and counts each tenant's generation requests in flight.

    Invariant: `_in_flight[tenant]` is the number of `acquire`s not yet `release`d; it never
    exceeds `limits.max_streams_per_key`. Thread-safe.
    """

    def __init__(
        self,
        key_digests: Iterable[str] = (),
        limits: LimitsConfig | None = None,
        admin_digests: Iterable[str] = (),
    ):
        """`admin_digests`: keys that also see every tenant's figures (valid API keys too)."""
        self._digests = tuple(key_digests)
        self._admin_digests = tuple(admin_digests)
        self.limits = limits or LimitsConfig()
        self._in_flight: dict[Tenant, int] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._digests or self._admin_digests)

    def authenticate(self, authorization: str | None) -> Tenant:
        if not self.enabled:
            return OPEN
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("missing API key: send Authorization: Bearer <key>")
        digest = key_digest(token)
        found = admin = False
        # No early exit: the time does not tell which key matched, nor whether it is an admin's.
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        for known in self._admin_digests:
            admin |= hmac.compare_digest(digest, known)
        if not (found or admin):
            raise _unauthorized("invalid API key")
        return Tenant(digest[:NAMESPACE_CHARS], admin=admin)

    def acquire(self, tenant: Tenant) -> None:
        """Count one more request in flight for `tenant`, or raise 429 past the limit."""
        with self._lock:
            n = self._in_flight.get(tenant, 0)
            if n >= self.limits.max_streams_per_key:
                raise APIError(
                    429,
                    f"too many concurrent requests for this API key "
                    f"(limit {self.limits.max_streams_per_key})",
                    type="rate_limit_error",
                    code="too_many_concurrent_requests",
                    headers={"Retry-After": "1"},
                )
            self._in_flight[tenant] = n + 1

    def release(self, tenant: Tenant) -> None:
        with self._lock:
            n = self._in_flight.get(tenant, 0) - 1
            if n > 0:
                self._in_flight[tenant] = n
            else:
                self._in_flight.pop(tenant, None)


def _unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="invalid_request_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
