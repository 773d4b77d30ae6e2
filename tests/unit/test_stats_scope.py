"""Whose prefix families the stats show (issue 12): each family is recorded under the tenant
whose request computed it, a key sees only its own, an admin key sees every tenant's."""

from __future__ import annotations

import pytest

from kv3d.config import load_config
from kv3d.engine.catalog import CatalogEntry, SnapshotCatalog
from kv3d.engine.generation import GenerationRequest
from kv3d.engine.snapshot import SnapshotMeta, decode_snapshot
from kv3d.server.dashboard import TOP_FAMILIES, build_stats
from kv3d.server.guard import OPEN, Guard, Tenant, digests_from_setting, key_digest
from kv3d.server.metrics import ServerMetrics
from kv3d.server.openai_schema import APIError
from tests.unit.fakememory import Harness

A, B = "a" * 16, "b" * 16
FAMILY = tuple(range(1000, 1040))


def family(key: int, tenant: str | None, hits: int = 1) -> dict:
    f = {"key": f"{key:016x}", "tokens": 64, "bytes": 1000, "hits": hits}
    if tenant is not None:  # None: a registry of an older version, which sent no tenant
        f["tenant"] = tenant
    return f


REGISTRY = {
    "snapshots": 4,
    "bytes": 4000,
    "sessions": 0,
    "families": [family(1, A), family(2, B), family(3, ""), family(4, None)],
}


def keys_seen(viewer: Tenant, registry=REGISTRY) -> set[int]:
    stats = build_stats([], registry, ServerMetrics(), False, viewer=viewer)
    return {int(f["key"], 16) for f in stats["families"]}


def test_a_key_sees_only_its_own_families_and_the_figures_stay_global():
    assert keys_seen(Tenant(A)) == {1}
    assert keys_seen(Tenant(B)) == {2}
    assert keys_seen(Tenant("c" * 16)) == set()
    stats = build_stats([], REGISTRY, ServerMetrics(), False, viewer=Tenant(B))
    assert stats["bytes"]["object_store"] == 4000 and stats["families_scope"] == "tenant"
    assert "tenant" not in stats["families"][0]


def test_an_admin_key_sees_every_tenants_families_with_their_tenant():
    stats = build_stats([], REGISTRY, ServerMetrics(), False, viewer=Tenant(B, admin=True))
    assert stats["families_scope"] == "all"
    assert {int(f["key"], 16): f["tenant"] for f in stats["families"]} == {
        1: A,
        2: B,
        3: "",
        4: "",
    }


def test_the_open_api_is_one_tenant_and_owns_families_of_no_tenant():
    # Families of an older registry (no tenant) are the open API's: no key but an admin sees them.
    assert keys_seen(OPEN) == {3, 4}
    assert keys_seen(OPEN, {"families": [family(5, None), family(6, None)]}) == {5, 6}
    assert keys_seen(Tenant(A), {"families": [family(5, None), {"tenant": 7, "key": "8"}]}) == set()
    assert keys_seen(Tenant(A), None) == set()


def test_the_top_families_are_the_callers_most_hit_not_everyones():
    others = [family(100 + i, B, hits=1000 + i) for i in range(3 * TOP_FAMILIES)]
    registry = {"families": [*others, family(1, A, hits=1)]}
    assert keys_seen(Tenant(A), registry) == {1}
    assert len(keys_seen(Tenant(B), registry)) == TOP_FAMILIES
    assert len(keys_seen(Tenant(A, admin=True), registry)) == TOP_FAMILIES


def test_an_admin_key_is_a_valid_key_and_its_own_tenant():
    guard = Guard(digests_from_setting("k1,k2"), admin_digests=digests_from_setting(" adm ,adm2"))
    k1 = guard.authenticate("Bearer k1")
    adm = guard.authenticate("Bearer adm")
    assert not k1.admin and adm.admin and guard.authenticate("Bearer adm2").admin
    assert adm.namespace == key_digest("adm")[:16] != k1.namespace
    assert adm.sees(k1.namespace) and not k1.sees(adm.namespace) and k1.sees(k1.namespace)
    with pytest.raises(APIError) as err:
        guard.authenticate("Bearer nope")
    assert err.value.status == 401
    # An admin key alone turns keys on.
    only_admin = Guard(admin_digests=digests_from_setting("adm"))
    assert only_admin.enabled and only_admin.authenticate("Bearer adm").admin
    with pytest.raises(APIError):
        only_admin.authenticate(None)
    assert Guard().authenticate(None) == OPEN and not OPEN.admin


def test_admin_key_config_from_file_env_and_overrides(monkeypatch, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"server": {"admin_api_key": "from-file"}}')
    assert load_config(path).server.admin_api_key == "from-file"
    monkeypatch.setenv("KV3D_SERVER__ADMIN_API_KEY", "from-env")
    assert load_config(path).server.admin_api_key == "from-env"
    cfg = load_config(path, overrides={"server": {"admin_api_key": "x,y"}})
    assert cfg.server.admin_api_key == "x,y"


def test_the_serve_application_args_carry_digests_never_the_keys():
    pytest.importorskip("ray")
    from deployments.app import build_from_config

    cfg = load_config(overrides={"server": {"api_key": "plain-key", "admin_api_key": "admin-key"}})
    app = build_from_config(cfg)
    args = repr(_bound_args(app))
    assert "plain-key" not in args and "admin-key" not in args
    assert key_digest("plain-key") in args and key_digest("admin-key") in args


def _bound_args(app) -> tuple:
    bound = app._bound_deployment
    return (bound.init_args, bound.init_kwargs)


# --- the engine side: the tenant travels from the request to the published snapshot ----------
def chat(rid: str, private: tuple[int, ...], tenant: str, salt: str = "") -> GenerationRequest:
    return GenerationRequest(
        rid,
        FAMILY + private,
        4,
        family_tokens=len(FAMILY),
        cache_salt=salt or tenant,
        tenant=tenant,
    )


def test_a_published_snapshot_names_the_tenant_whose_request_computed_it():
    published: list[tuple[SnapshotMeta, bytes]] = []
    h = Harness(publish=lambda meta, blob: published.append((meta, blob)))
    for rid, tenant in (("a", A), ("b", B), ("o", "")):
        progress, adm = h.admit(h.submit(chat(rid, (1, 2, 3), tenant)))
        h.prefill(progress)
        assert adm.prefix is not None and adm.prefix.tenant == tenant
        h.finish(progress)
    assert [m.tenant for m, _ in published] == [A, B, ""]
    assert len({m.key for m, _ in published}) == 3  # salted per tenant: three families
    # The container itself is unchanged: the tenant travels beside it, never inside.
    meta, blob = published[0]
    assert decode_snapshot(blob, b"f" * 16).meta == SnapshotMeta(
        meta.key, meta.fingerprint, meta.n_tokens, meta.state_bytes, meta.block_keys
    )
    h.check()


def test_a_restored_snapshot_is_the_requesting_tenants():
    published = []
    a = Harness(publish=lambda meta, blob: published.append(blob))
    progress, _ = a.admit(a.submit(chat("a", (1, 2, 3), A)))
    a.prefill(progress)
    b = Harness()
    pending = b.submit(chat("b", (7, 7, 7), A))
    pending.snapshot = published[0]
    _, adm = b.admit(pending)
    assert adm.restore_s is not None and adm.prefix.tenant == A


def test_the_catalog_lists_snapshots_with_their_tenant_and_not_sessions():
    catalog = SnapshotCatalog(10_000)
    catalog.add(CatalogEntry(7, b"f" * 16, 64, 100, (5, 7), tenant=A))
    catalog.add(CatalogEntry(9, b"f" * 16, 64, 100, (9,)))
    catalog.add(CatalogEntry(("session", b"f" * 16, "s"), b"f" * 16, 0, 100, ()))
    assert catalog.families() == [
        {"key": f"{7:016x}", "tokens": 64, "bytes": 100, "hits": 0, "tenant": A},
        {"key": f"{9:016x}", "tokens": 64, "bytes": 100, "hits": 0, "tenant": ""},
    ]
