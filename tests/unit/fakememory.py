"""A fake KV memory for the reuse and session policies: sequences of cells, no model.

Each cell holds one number, `cell_value(token, pos)`, so a test can see exactly which cells a
sequence has and whether they came back right. `seq_state` writes a real (synthetic) llama.cpp
sequence-state blob, so snapshots, the int8 codec and the session tiers run on it unchanged.
"""

from __future__ import annotations

import numpy as np

from kv3d.engine.statefmt import (
    CacheSection,
    LayerTensor,
    SeqState,
    StreamState,
    build_seq_state,
    parse_seq_state,
)

CHANNELS = 32
F16 = 1


def cell_value(token: int, pos: int) -> float:
    return float(((token * 31 + pos * 7) % 997) / 64.0 + 1.0)


class FakeMemory:
    """Implements `kv3d.engine.memory.KVMemory` over plain dicts."""

    def __init__(self) -> None:
        self.cells: dict[int, dict[int, float]] = {}
        self.refuse_restores = 0  # the next N set_seq_state calls fail as llama.cpp would

    # --- what the engine's decode would do --------------------------------------------------
    def write(self, seq_id: int, tokens, start_pos: int) -> None:
        seq = self.cells.setdefault(seq_id, {})
        for i, token in enumerate(tokens):
            seq[start_pos + i] = cell_value(token, start_pos + i)

    def values(self, seq_id: int) -> dict[int, float]:
        return dict(self.cells.get(seq_id, {}))

    # --- KVMemory -----------------------------------------------------------------------------
    def seq_copy(self, src: int, dst: int, pos_from: int = -1, pos_to: int = -1) -> None:
        lo, hi = _range(pos_from, pos_to)
        target = self.cells.setdefault(dst, {})
        for pos, value in self.cells.get(src, {}).items():
            if lo <= pos < hi:
                target[pos] = value

    def seq_remove(self, seq_id: int, pos_from: int = -1, pos_to: int = -1) -> bool:
        lo, hi = _range(pos_from, pos_to)
        seq = self.cells.get(seq_id, {})
        for pos in [p for p in seq if lo <= p < hi]:
            del seq[pos]
        return True

    def seq_pos_max(self, seq_id: int) -> int:
        return max(self.cells.get(seq_id, {}), default=-1)

    def seq_state(self, seq_id: int) -> bytes:
        seq = self.cells.get(seq_id, {})
        positions = np.array(sorted(seq), dtype=np.int32)
        if not len(positions):
            stream = StreamState(positions, (), None, False, (), ())
        else:
            values = np.array([seq[p] for p in positions], dtype=np.float32)
            rows = np.repeat(values[:, None], CHANNELS, axis=1).astype(np.float16)
            raw = np.ascontiguousarray(rows).view(np.uint8).ravel()
            layer = LayerTensor(F16, raw, row_bytes=CHANNELS * 2)
            stream = StreamState(
                positions, tuple((seq_id,) for _ in positions), None, False, (layer,), (layer,)
            )
        return build_seq_state(SeqState(seq_id, (CacheSection((stream,)),)))

    def set_seq_state(self, seq_id: int, blob) -> None:
        if self.refuse_restores:
            self.refuse_restores -= 1
            raise RuntimeError("llama_state_seq_set_data refused the state")
        stream = parse_seq_state(bytes(blob)).sections[0].streams[0]
        seq = {}
        if stream.n_cells:
            rows = stream.k_layers[0].data.view(np.float16).reshape(stream.n_cells, CHANNELS)
            for pos, value in zip(stream.cell_positions.tolist(), rows[:, 0].tolist(), strict=True):
                seq[pos] = float(value)
        self.cells[seq_id] = seq


def _range(pos_from: int, pos_to: int) -> tuple[float, float]:
    return (0 if pos_from < 0 else pos_from), (float("inf") if pos_to < 0 else pos_to)


class Harness:
    """The engine's admission, prefill and finish moves over a `FakeMemory`, step by step: the
    policies run exactly as the engine calls them, with no model and no thread."""

    def __init__(
        self,
        *,
        kv_cells=4096,
        slots=4,
        holders=4,
        store=None,
        fingerprint=b"f" * 16,
        memory=None,
        block_tokens=8,
        auto_sessions=False,
        publish=None,
        snapshot_source=None,
    ):
        from kv3d.engine.budget import KVBudget
        from kv3d.engine.reuse import PrefixReuse, ReuseSettings
        from kv3d.engine.scheduler import Scheduler
        from kv3d.engine.sessions import NoSessions, Sessions

        self.memory = memory or FakeMemory()
        self.budget = KVBudget(kv_cells)
        self.scheduler = Scheduler(slots, self.budget, batch_tokens=512, max_waiting=64)
        settings = ReuseSettings(block_tokens=block_tokens, min_tokens=4, snapshot_min_tokens=8)
        holder_ids = list(range(slots, slots + holders))
        self.reuse = PrefixReuse(
            self.memory, self.budget, holder_ids, settings, fingerprint, publish
        )
        self.reuse.set_snapshot_source(snapshot_source)
        self.sessions = (
            Sessions(self.reuse, store, auto=auto_sessions) if store is not None else NoSessions()
        )
        self.live = {}

    def submit(self, request):
        from kv3d.engine.scheduler import Pending

        blocks = self.reuse.blocks_for(
            request.prompt_tokens, request.family_tokens, request.cache_salt
        )
        hot = self.reuse.hot_view().sessions
        session = self.sessions.take_for(request, blocks, hot)
        pending = Pending(request, lambda event: None, None, session, blocks)
        self.scheduler.enqueue(pending)
        return pending

    def admit(self, pending):
        """Admit one waiting request as the engine does; returns (progress, admission)."""
        self.sessions.refetch(pending)  # its session left the cache since it was submitted
        if pending.session is not None:  # the engine admits it once its session is read
            pending.session.exception(timeout=10)
        shared = self.sessions.shared_cells(pending, self.reuse.cells_already_hot(pending))
        assert self.scheduler.can_admit(pending, shared)
        progress = self.scheduler.admit(pending, shared)
        admission = self.sessions.resume(pending, progress)
        if admission is None:
            admission = self.reuse.admit(pending, progress)
        self.reuse.begin(admission, progress)
        self.live[progress.slot] = (pending, progress, admission)
        return progress, admission

    def prefill(self, progress, upto=None):
        """Compute prompt chunks as the scheduler cuts them, up to `upto` tokens."""
        _, _, admission = self.live[progress.slot]
        prompt = progress.prompt_tokens
        end = len(prompt) if upto is None else upto
        while progress.num_computed_tokens < end:
            start = progress.num_computed_tokens
            stop = end
            if progress.chunk_stop is not None and start < progress.chunk_stop:
                stop = min(stop, progress.chunk_stop)
            self.memory.write(progress.slot, prompt[start:stop], start)
            progress.num_computed_tokens = stop
            if self.reuse.after_chunk(admission, progress):
                self.sessions.after_prefix(admission, progress)

    def generate(self, progress, tokens):
        """Decode `tokens` as generated output (each one's KV lands in the cache)."""
        self.memory.write(progress.slot, tokens, progress.num_computed_tokens)
        progress.num_computed_tokens += len(tokens)
        progress.generated_tokens += len(tokens)

    def finish(self, progress, output=(), prompt_logits=None):
        pending, _, admission = self.live.pop(progress.slot)
        self.sessions.keep(pending.request, admission, progress, list(output), prompt_logits)
        self.scheduler.release(progress.slot)
        self.memory.seq_remove(progress.slot)
        self.reuse.release(admission)
        return admission

    def check(self):
        self.scheduler.check_invariants()
        self.reuse.check_invariants()
