"""Whose prefix families `/v1/kv3d/stats` shows (issue 12), through the HTTP app over a real
engine whose snapshots go to an in-process catalog, read as the API reads the registry's stats:
a key sees its own families only, an admin key every tenant's, an open API its own."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest

from kv3d.engine.catalog import CatalogEntry, SnapshotCatalog
from kv3d.engine.engine import Engine
from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.guard import Guard, digests_from_setting, key_digest
from tests.integration.httpapp import SYSTEM, bearer, call, engine_config

pytestmark = pytest.mark.integration

ALPHA, BETA, ADMIN = "key-alpha-123", "key-beta-456", "key-admin-789"


def namespace(key: str) -> str:
    return key_digest(key)[:16]


class CatalogBackend(LocalBackend):
    """The real engine; its snapshots kept in a `SnapshotCatalog` here, as the registry actor
    keeps them, and its stats answered as the registry answers them."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.catalog = SnapshotCatalog(1 << 30)
        self._lock = threading.Lock()
        engine.set_snapshot_sink(self._publish)

    def _publish(self, meta, blob) -> None:  # the engine's step thread
        entry = CatalogEntry(meta.key, meta.fingerprint, meta.n_tokens, len(blob), meta.block_keys)
        entry.tenant = meta.tenant
        with self._lock:
            self.catalog.add(entry)

    def owners(self) -> dict[str, str]:
        """Family key -> tenant of every published snapshot."""
        with self._lock:
            return {f["key"]: f["tenant"] for f in self.catalog.families()}

    async def snapshot_stats(self):
        with self._lock:
            families = self.catalog.families()
            return {
                "sessions": 0,
                "snapshots": len(families),
                "bytes": self.catalog.total_bytes,
                "families": families,
            }


@pytest.fixture(scope="module")
def backend():
    with Engine.from_config(engine_config()) as e:
        yield CatalogBackend(e)


def app_for(backend, tok, keys: str = "", admin_keys: str = ""):
    served = ServedModel(backend.engine.model_id, tok, context_tokens=1024)
    guard = Guard(digests_from_setting(keys), admin_digests=digests_from_setting(admin_keys))
    return build_api(served, backend, guard=guard)


def ask(key: str | None, system: str) -> tuple:
    return (
        "POST",
        "/v1/chat/completions",
        {
            "headers": bearer(key) if key else {},
            "json": {
                "model": "m",
                "temperature": 0,
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": "How do I change the port?"},
                ],
            },
        },
    )


def stats(key: str | None) -> tuple:
    return ("GET", "/v1/kv3d/stats", {"headers": bearer(key) if key else {}})


def test_each_key_sees_its_own_families_and_an_admin_key_sees_all(backend, tok, caplog):
    app = app_for(backend, tok, f"{ALPHA},{BETA}", ADMIN)
    caplog.set_level(logging.DEBUG)
    system = uuid.uuid4().hex + " " + SYSTEM  # the same prompt under both keys: two families
    for r in call(app, ask(ALPHA, system), ask(BETA, system), ask(ADMIN, system)):
        assert r.status_code == 200, r.text
    owners = backend.owners()
    by_tenant = {t: {k for k, o in owners.items() if o == t} for t in set(owners.values())}
    alpha, beta, admin = (by_tenant.get(namespace(k), set()) for k in (ALPHA, BETA, ADMIN))
    assert len(alpha) == len(beta) == len(admin) == 1 and not alpha & beta

    as_alpha, as_beta, as_admin, anonymous = call(
        app, stats(ALPHA), stats(BETA), stats(ADMIN), stats(None)
    )
    seen = {
        who: {f["key"] for f in r.json()["families"]}
        for who, r in (("alpha", as_alpha), ("beta", as_beta), ("admin", as_admin))
    }
    assert seen["alpha"] == alpha and seen["beta"] == beta  # never the other tenant's
    assert seen["admin"] >= alpha | beta | admin
    assert as_alpha.json()["families_scope"] == "tenant"
    assert as_admin.json()["families_scope"] == "all"
    tenants = {f["key"]: f["tenant"] for f in as_admin.json()["families"]}
    assert tenants[next(iter(alpha))] == namespace(ALPHA)
    assert tenants[next(iter(beta))] == namespace(BETA)
    assert anonymous.status_code == 401
    # The server-wide figures are the same for every key.
    assert as_alpha.json()["bytes"]["object_store"] == as_beta.json()["bytes"]["object_store"]
    for r in (as_alpha, as_beta, as_admin):
        assert all(k not in r.text for k in (ALPHA, BETA, ADMIN))
    assert all(k not in caplog.text for k in (ALPHA, BETA, ADMIN))


def test_an_open_api_is_one_tenant_and_sees_its_families(backend, tok):
    keyed = app_for(backend, tok, ALPHA)
    (r,) = call(keyed, ask(ALPHA, uuid.uuid4().hex + " " + SYSTEM))
    assert r.status_code == 200
    app = app_for(backend, tok)  # no keys
    system = uuid.uuid4().hex + " " + SYSTEM
    (r,) = call(app, ask(None, system))
    assert r.status_code == 200
    owners = backend.owners()
    open_families = {k for k, t in owners.items() if t == ""}
    assert open_families
    (as_open,) = call(app, stats(None))
    assert as_open.status_code == 200 and as_open.json()["families_scope"] == "tenant"
    seen = {f["key"] for f in as_open.json()["families"]}
    assert seen == open_families  # and nothing of the keyed tenants' from the same registry
