"""Continuous-batching scheduler: which tokens of which sequences go into the next decode step.

It never touches llama.cpp; the engine turns its plan into a batch. Policy, in order:
1. every running sequence that is generating gets its one next token (keeps inter-token latency
   flat while others prefill);
2. sequences still prefilling get prompt chunks, first admitted first, within `batch_tokens`;
3. waiting requests are admitted first-come first-served while a slot is free and the KV cells
   they may need (prompt + max_tokens) can be reserved.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kv3d.generation import GenerationRequest, StreamEvent

Emit = Callable[[StreamEvent], None]


class QueueFullError(RuntimeError):
    """The wait queue is at its bound; the client should retry later."""


class RequestTooLargeError(ValueError):
    """The request can never fit this engine's KV cells, whatever the load."""


@dataclass(slots=True)
class Pending:
    request: GenerationRequest
    emit: Emit
    snapshot: object | None = None  # a prefix snapshot fetched for this request (bytes-like)
    session: object | None = None  # Future of a stored session being decoded for this request
    blocks: list | None = None  # the prompt's reusable blocks, hashed once at submit

    @property
    def cells_needed(self) -> int:
        return len(self.request.prompt_tokens) + self.request.max_tokens


@dataclass(slots=True)
class Chunk:
    """`tokens` of sequence `slot`, placed at positions `start_pos`…; logits wanted on the last."""

    slot: int
    tokens: list[int]
    start_pos: int
    want_logits: bool
    prefill: bool


@dataclass(slots=True)
class SeqProgress:
    """What the scheduler tracks of a running sequence (the engine keeps the rest)."""

    slot: int
    prompt_tokens: tuple[int, ...]
    cells_reserved: int
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    pending_token: int | None = None  # sampled, not yet decoded
    generated_tokens: int = 0
    chunk_stop: int | None = None  # prefill chunks must end here (a prefix to register)
    cells_discount: int = 0  # cells left out of the reservation: a hot prefix provides them

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_tokens)


@dataclass
class Scheduler:
    """Owns slots, KV-cell reservations and the wait queue.

    Invariants (checked by `check_invariants`): a slot is free or held by exactly one running
    sequence; reserved cells are the sum of the running sequences' reservations and never exceed
    `kv_cells_total`. `enqueue` and `cancel_waiting` may be called from any thread; everything
    else only from the engine thread.
    """

    num_slots: int
    kv_cells_total: int
    batch_tokens: int
    max_waiting: int
    running: dict[int, SeqProgress] = field(default_factory=dict)
    kv_cells_reserved: int = 0
    kv_cells_held: int = 0  # cells owned by hot prefixes (the engine keeps this in sync)
    _waiting: deque[Pending] = field(default_factory=deque)
    _free_slots: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Cells of a waiting request that are already in the cache (a hot prefix); engine-supplied.
    cells_hot: Callable[[Pending], int] | None = None
    # Whether a waiting request should stay queued for now (its prefix is being computed by a
    # running sequence); engine-supplied. Requests behind it may be admitted meanwhile.
    hold: Callable[[Pending], bool] | None = None

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    # --- any thread -------------------------------------------------------------------------
    def enqueue(self, pending: Pending) -> None:
        if pending.cells_needed > self.kv_cells_total:
            raise RequestTooLargeError(
                f"prompt + max_tokens = {pending.cells_needed} tokens exceeds this replica's "
                f"{self.kv_cells_total} KV cells"
            )
        with self._lock:
            # Requests that a free slot will take at the next step do not count as queued.
            if len(self._waiting) >= self.max_waiting + len(self._free_slots):
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            self._waiting.append(pending)

    def cancel_waiting(self, request_id: str) -> Pending | None:
        with self._lock:
            for pending in self._waiting:
                if pending.request.request_id == request_id:
                    self._waiting.remove(pending)
                    return pending
        return None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def drain_waiting(self) -> list[Pending]:
        with self._lock:
            drained = list(self._waiting)
            self._waiting.clear()
        return drained

    def has_work(self) -> bool:
        return bool(self.running) or bool(self._waiting)

    # --- engine thread ----------------------------------------------------------------------
    def admit(self) -> list[tuple[Pending, SeqProgress]]:
        """Move every waiting request that fits now into a slot (see `admit_next`)."""
        admitted = []
        while (item := self.admit_next()) is not None:
            admitted.append(item)
        return admitted

    def admit_next(self) -> tuple[Pending, SeqProgress] | None:
        """Admit the first waiting request that is not held and fits now, reserving its cells;
        None when there is none. First come, first served among requests not held."""
        with self._lock:
            for i, pending in enumerate(self._waiting):
                if self.hold is not None and self.hold(pending):
                    continue
                if not self._can_admit_now(pending):
                    return None
                del self._waiting[i]
                discount = self._hot(pending)
                progress = SeqProgress(
                    slot=self._free_slots.pop(),
                    prompt_tokens=pending.request.prompt_tokens,
                    cells_reserved=pending.cells_needed - discount,
                    cells_discount=discount,
                )
                self.kv_cells_reserved += progress.cells_reserved
                self.running[progress.slot] = progress
                return pending, progress
        return None

    def plan(self) -> list[Chunk]:
        """The chunks of the next step; empty when nothing can run."""
        budget = self.batch_tokens
        chunks: list[Chunk] = []
        for seq in self.running.values():
            if seq.pending_token is not None and budget > 0:
                chunks.append(
                    Chunk(seq.slot, [seq.pending_token], seq.num_computed_tokens, True, False)
                )
                budget -= 1
        for seq in self.running.values():
            if not seq.prefilling or budget <= 0:
                continue
            start = seq.num_computed_tokens
            take = min(len(seq.prompt_tokens) - start, budget)
            if seq.chunk_stop is not None and start < seq.chunk_stop:
                take = min(take, seq.chunk_stop - start)
            last = start + take == len(seq.prompt_tokens)
            tokens = list(seq.prompt_tokens[start : start + take])
            chunks.append(Chunk(seq.slot, tokens, start, want_logits=last, prefill=True))
            budget -= take
        return chunks

    def unreserve(self, progress: SeqProgress, cells: int) -> None:
        """`cells` of a running sequence's reservation are not its own (a shared prefix)."""
        progress.cells_reserved -= cells
        self.kv_cells_reserved -= cells

    def cells_short_for_head(self) -> int:
        """Cells the first waiting request lacks while a slot is free; 0 when none."""
        with self._lock:
            if not self._waiting or not self._free_slots:
                return 0
            head = self._waiting[0]
        need = head.cells_needed - self._hot(head)
        return max(0, self.kv_cells_reserved + self.kv_cells_held + need - self.kv_cells_total)

    def release(self, slot: int) -> SeqProgress:
        progress = self.running.pop(slot)
        self.kv_cells_reserved -= progress.cells_reserved
        self._free_slots.append(slot)
        return progress

    def _can_admit_now(self, pending: Pending) -> bool:
        used = self.kv_cells_reserved + self.kv_cells_held
        need = pending.cells_needed - self._hot(pending)
        return bool(self._free_slots) and used + need <= self.kv_cells_total

    def _hot(self, pending: Pending) -> int:
        return self.cells_hot(pending) if self.cells_hot is not None else 0

    def check_invariants(self) -> None:
        held = set(self.running)
        free = set(self._free_slots)
        assert not held & free, f"slots both held and free: {held & free}"
        assert held | free == set(range(self.num_slots)), "a slot is lost"
        assert len(self._free_slots) == len(free), "a slot is free twice"
        reserved = sum(s.cells_reserved for s in self.running.values())
        assert reserved == self.kv_cells_reserved, "reservation count drifted"
        used = self.kv_cells_reserved + self.kv_cells_held
        assert used <= self.kv_cells_total, "cells over-reserved"
