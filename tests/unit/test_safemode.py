"""Safe mode trips on evidence of wrong state only: never for a full KV cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kv3d.engine.llama import KVCacheFullError
from kv3d.engine.safemode import SafeMode
from kv3d.engine.selfcheck import run_self_check
from tests.unit.fakeengine import FakeBatch, FakeContext, FakeModel


class FullContext(FakeContext):
    """A KV cache with no free cells: every decode is refused, as llama.cpp's code 1."""

    def decode(self, batch) -> None:
        raise KVCacheFullError("no free KV cells for the batch")


class BrokenContext(FakeContext):
    def decode(self, batch) -> None:
        raise RuntimeError("llama_decode failed with code -1")


class Model(FakeModel):
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return [1 + i % 50 for i in range(len(text.split()))]


class Batch(FakeBatch):
    @property
    def capacity_tokens(self) -> int:
        return self.capacity


def parts(context_class):
    model = Model(Path("fake.gguf"))
    ctx = context_class(model, SimpleNamespace(n_ctx_cells=256))
    return model, ctx, Batch(64)


def test_a_canary_without_free_cells_is_skipped_not_a_trip():
    check = run_self_check(*parts(FullContext), seq_ids=(0, 0), exact=False)
    assert not check.ok and not check.conclusive
    safe = SafeMode(forced=False, canary_period_s=60.0)
    assert safe.run_canary(*parts(FullContext)) is False
    assert not safe.active and safe.canary_runs_total == 0


def test_a_canary_whose_machinery_fails_trips_safe_mode_with_its_reason():
    safe = SafeMode(forced=False, canary_period_s=60.0)
    assert safe.run_canary(*parts(BrokenContext)) is True
    assert safe.active and "canary" in safe.reason and "code -1" in safe.reason


def test_the_reason_for_safe_mode_is_in_the_engine_stats(monkeypatch):
    from tests.unit.fakeengine import fake_engine

    engine = fake_engine(monkeypatch, safe_mode=True)
    try:
        stats = engine.stats()
        assert stats.safe_mode == 1 and stats.safe_mode_reason == "forced by server.safe_mode"
    finally:
        engine.close()
