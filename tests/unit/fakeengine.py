"""The real `Engine` over a fake model and context: no llama.cpp, no thread unless started.

`fake_engine(monkeypatch, ...)` swaps the native pieces the engine module uses (model, context,
batch, sampler, the start-up self-check and the model fingerprint) for fakes, then builds an
`Engine` with its real scheduler, budget, prefix reuse, sessions and tiers. A test drives it
step by step (`engine.step()`) and can check `engine.check_invariants()` between steps.

The context is a `FakeMemory` that decodes by writing one cell per token; the sampler returns a
token that depends only on the last token and its position (never end-of-generation), so every
request runs to `max_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kv3d.engine.generation import Finished, Rejected, StreamEvent, TextDelta
from kv3d.engine.reuse import ReuseSettings
from kv3d.engine.selfcheck import SelfCheck
from kv3d.engine.settings import EngineSettings
from tests.unit.fakememory import FakeMemory

EOS = 0
VOCAB = 512
FINGERPRINT = b"fake-model-fp-16"


class FakeModel:
    has_per_cell_kv = True
    description = "fake model"
    n_ctx_train = 4096

    def __init__(self, path: Path, *, n_gpu_layers: int = 0):
        self.path = path

    def kv_bytes_per_cell(self, kv_type: str) -> int:
        return 64

    def rope_spec(self) -> None:
        return None  # fake states carry no RoPE: int4p codes their keys as they are

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return f" t{token}".encode()

    def close(self) -> None:
        pass


class FakeBatch:
    def __init__(self, capacity_tokens: int):
        self.capacity = capacity_tokens
        self.entries: list[tuple[int, int, int, bool]] = []

    @property
    def n_tokens(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries = []

    def add(self, token: int, pos: int, seq_id: int, want_logits: bool) -> int:
        assert len(self.entries) < self.capacity, "batch overflow"
        self.entries.append((token, pos, seq_id, want_logits))
        return len(self.entries) - 1

    def close(self) -> None:
        pass


class FakeContext(FakeMemory):
    def __init__(self, model: FakeModel, params):
        super().__init__()
        self.n_ctx_cells = params.n_ctx_cells
        self.rows: list[tuple[int, int, int, bool]] = []

    def decode(self, batch: FakeBatch) -> None:
        for token, pos, seq_id, _ in batch.entries:
            self.write(seq_id, [token], pos)
        self.rows = list(batch.entries)

    def logits(self, batch_index: int) -> np.ndarray:
        return np.zeros(VOCAB, np.float32)

    def close(self) -> None:
        pass


class FakeSampler:
    def __init__(self, *, model, params, seed: int, prompt=(), max_tokens: int = 0):
        self.params = params
        self.seed = seed
        self.closed = False

    def sample(self, ctx: FakeContext, batch_index: int) -> int:
        token, pos, _, _ = ctx.rows[batch_index]
        return (token * 31 + pos * 7) % (VOCAB - 1) + 1  # never EOS

    def close(self) -> None:
        self.closed = True


def settings(cold_path: str = "", **overrides) -> EngineSettings:
    values = dict(
        model_path=Path("fake.gguf"),
        model_id="fake",
        n_gpu_layers=0,
        context_tokens=512,
        max_sequences=4,
        batch_tokens=64,
        kv_type="f16",
        flash_attn=False,
        kv_budget_bytes=64 * 4096,
        threads=1,
        decode_threads=1,
        max_queued_requests=16,
        retry_after_s=1,
        reuse=ReuseSettings(block_tokens=8, min_tokens=4, snapshot_min_tokens=8),
        reuse_enabled=True,
        max_hot_prefixes=1,  # the family prefix takes it: finished sessions park warm
        warm_budget_bytes=64 << 20,
        cold_path=cold_path,
        auto_sessions=False,
    )
    values.update(overrides)
    return EngineSettings(**values)


def fake_engine(monkeypatch, cold_path: str = "", **overrides):
    """An `Engine` (not started) over the fakes; close it when done."""
    import kv3d.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "LlamaModel", FakeModel)
    monkeypatch.setattr(engine_module, "LlamaContext", FakeContext)
    monkeypatch.setattr(engine_module, "LlamaBatch", FakeBatch)
    monkeypatch.setattr(engine_module, "SamplerChain", FakeSampler)
    monkeypatch.setattr(engine_module, "run_self_check", lambda *a, **k: SelfCheck(True))
    monkeypatch.setattr(engine_module, "cache_fingerprint", lambda *a, **k: FINGERPRINT)
    return engine_module.Engine(settings(cold_path, **overrides))


class Stream:
    """What the engine emitted for one request."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []

    def __call__(self, event: StreamEvent) -> None:
        self.events.append(event)

    @property
    def end(self) -> Finished | Rejected | None:
        ends = [e for e in self.events if isinstance(e, Finished | Rejected)]
        assert len(ends) <= 1, f"more than one terminal event: {ends}"
        return ends[0] if ends else None

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def run_to_idle(engine, max_steps: int = 1000) -> int:
    """Step until nothing runs or waits, checking the invariants after every step; stored
    sessions being read are waited for here (the test's thread, not the engine's)."""
    for n in range(max_steps):
        if not engine.scheduler.has_work():
            if not engine.scheduler.num_waiting:
                return n
            engine.sessions.flush()  # every session read queued so far is done after this
        engine.step()
        engine.check_invariants()
    raise AssertionError(f"still busy after {max_steps} steps")
