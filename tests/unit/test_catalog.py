from kv3d.engine.catalog import CatalogEntry, SnapshotCatalog

FP = b"f" * 16


def entry(key: int, nbytes: int, blocks=()) -> CatalogEntry:
    return CatalogEntry(key, FP, n_tokens=10, nbytes=nbytes, block_keys=tuple(blocks) or (key,))


def test_budget_evicts_least_recently_used():
    cat = SnapshotCatalog(budget_bytes=100)
    assert cat.add(entry(1, 40)) == []
    assert cat.add(entry(2, 40)) == []
    cat.lookup(FP, [1])  # 1 is now the most recently used
    evicted = cat.add(entry(3, 40))
    assert [e.key for e in evicted] == [2]
    assert 1 in cat and 3 in cat and cat.total_bytes == 80
    cat.check_invariants()


def test_entry_larger_than_the_budget_is_refused():
    cat = SnapshotCatalog(budget_bytes=10)
    assert cat.add(entry(1, 11)) is None
    assert len(cat) == 0


def test_lookup_returns_the_deepest_known_block():
    cat = SnapshotCatalog(budget_bytes=1000)
    cat.add(entry(10, 5, blocks=(1, 10)))
    cat.add(entry(30, 5, blocks=(1, 2, 30)))
    assert cat.lookup(FP, [1, 2, 30, 99]).key == 30
    assert cat.lookup(FP, [1, 10]).key == 10
    assert cat.lookup(FP, [5]) is None
    assert cat.lookup(b"x" * 16, [1, 2, 30]) is None  # another model's fingerprint
    cat.check_invariants()


def test_republishing_replaces_and_removing_unindexes():
    cat = SnapshotCatalog(budget_bytes=100)
    cat.add(entry(1, 30))
    cat.add(entry(1, 50))
    assert cat.total_bytes == 50 and len(cat) == 1
    cat.remove(1)
    assert cat.lookup(FP, [1]) is None and cat.total_bytes == 0
    cat.check_invariants()


def meta(key: int, blocks: tuple[int, ...], fingerprint: bytes = FP, tenant: str = ""):
    from kv3d.engine.snapshot import SnapshotMeta

    return SnapshotMeta(key, fingerprint, 64, 0, blocks, tenant)


def test_local_snapshots_fetch_the_deepest_published_prefix_of_their_model():
    from kv3d.engine.catalog import LocalSnapshots

    store = LocalSnapshots(budget_bytes=100, fingerprint=FP)
    store.publish(meta(10, (1, 10), tenant="t1"), b"a" * 30)
    store.publish(meta(30, (1, 2, 30)), b"b" * 30)
    store.publish(meta(99, (7, 99), fingerprint=b"x" * 16), b"c" * 30)  # another model's
    assert store.fetch([1, 2, 30, 5]) == b"b" * 30
    assert store.fetch([1, 10]) == b"a" * 30
    assert store.fetch([7, 99]) is None and store.fetch([5]) is None
    stats = store.stats()
    assert stats["snapshots"] == 3 and stats["bytes"] == 90 and stats["budget_bytes"] == 100
    assert {f["tenant"] for f in stats["families"]} == {"t1", ""}


def test_local_snapshots_stay_within_their_budget():
    from kv3d.engine.catalog import LocalSnapshots

    store = LocalSnapshots(budget_bytes=50, fingerprint=FP)
    store.publish(meta(1, (1,)), b"a" * 30)
    store.publish(meta(2, (2,)), b"b" * 30)  # evicts the older
    store.publish(meta(3, (3,)), b"c" * 51)  # larger than the whole budget: not kept
    assert store.fetch([1]) is None and store.fetch([2]) == b"b" * 30
    assert store.fetch([3]) is None and store.stats()["bytes"] == 30
