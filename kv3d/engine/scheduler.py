"""Continuous-batching scheduler: which tokens of which sequences go into the next decode step.

It never touches llama.cpp; the engine turns its plan into a batch. Policy, in order:
1. every running sequence that is generating gets its one next token (keeps inter-token latency
   flat while others prefill);
2. sequences still prefilling get prompt chunks, fewest tokens left first, counted per
   request waiting on them (a family prefix that queued requests wait for serves all of them;
   one passed over for several steps goes first), within `batch_tokens` and the prompt-token
   budget the engine's pacer sets while others decode (`pacing.py`);
3. waiting requests are admitted first-come first-served while a slot is free and the KV budget
   can reserve their prompt's cells (less what a hot prefix provides) and the cells of their
   first `OUTPUT_CELLS_PER_GRANT` output tokens. A request whose stored session is still being
   read or decoded is not ready: it keeps its place in the queue, those behind it may go (not
   behind a parked sequence's continuation: the cells freed for it are its own), and it goes
   first once it is ready.

A sequence is granted cells for its output as it generates (`needs_output_cells`, `grant`), not
all of `max_tokens` at admission: most answers end long before `max_tokens` (a request that sets
none may write up to the whole context), and reserving it would leave cells idle that other
conversations could run in. When a grant finds no free cells, the engine parks the running
sequence that arrived last and puts its continuation at the head of the queue
(`requeue_first`), keeping its place in arrival order: the oldest requests finish first, and a
continuation comes back only with room for `PARKED_OUTPUT_CELLS` more tokens, so that it is not
parked again at the next grant.

The engine walks the wait queue (`waiting`), asks prefix reuse what each request shares and
whether it should wait, and admits with `can_admit`/`admit`; the scheduler asks the `KVBudget`
and calls nobody back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from kv3d.engine.budget import KVBudget
from kv3d.engine.generation import GenerationRequest, StreamEvent

Emit = Callable[[StreamEvent], None]

# Output cells a sequence is granted at a time: at admission, and each time it has used them.
# Small enough that a long answer's unused reservation does not keep others out; large enough
# that grants are rare (one check per 32 tokens of a stream).
OUTPUT_CELLS_PER_GRANT = 32
# Output cells a parked sequence's continuation is admitted with.
PARKED_OUTPUT_CELLS = 4 * OUTPUT_CELLS_PER_GRANT


class QueueFullError(RuntimeError):
    """The wait queue is at its bound; the client should retry later."""


class RequestTooLargeError(ValueError):
    """The request can never fit this engine's KV cells, whatever the load."""


@dataclass(slots=True)
class Pending:
    request: GenerationRequest
    emit: Emit
    snapshot: object | None = None  # a prefix snapshot fetched for this request (bytes-like)
    session: Future | None = None  # a stored session being read and decoded for this request
    blocks: list | None = None  # the prompt's reusable blocks, hashed once at submit
    # A parked sequence's continuation: what it had generated and the objects it goes on with
    # (the engine's, opaque here).
    parked: object | None = None
    arrival: int = 0  # its place in arrival order (a continuation keeps its request's)

    @property
    def output_cells_first(self) -> int:
        """Output cells granted at admission."""
        grant = OUTPUT_CELLS_PER_GRANT if self.parked is None else PARKED_OUTPUT_CELLS
        return min(self.request.max_tokens, grant)

    @property
    def cells_needed(self) -> int:
        """Cells to reserve at admission: the prompt's and the first grant of output cells."""
        return len(self.request.prompt_tokens) + self.output_cells_first

    @property
    def cells_at_most(self) -> int:
        """Cells the sequence may hold at its end (prompt + max_tokens)."""
        return len(self.request.prompt_tokens) + self.request.max_tokens

    @property
    def resuming(self) -> bool:
        """Whether a stored session was found for it (a request that names a session is looked
        up in the store, and most new conversations have nothing there)."""
        s = self.session
        if s is None:
            return False
        return not s.done() or (s.exception() is None and s.result() is not None)

    @property
    def ready(self) -> bool:
        """Whether admission can look at it without waiting: no stored session is still being
        read or decoded for it (the step thread never waits on I/O or on the codec)."""
        return self.session is None or self.session.done()


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
    max_tokens: int = 0
    arrival: int = 0  # the request's place in arrival order: the last to arrive is parked first
    output_cells: int = 0  # output tokens whose cells are reserved (granted so far)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    pending_token: int | None = None  # sampled, not yet decoded
    generated_tokens: int = 0
    chunk_stop: int | None = None  # prefill chunks must end here (a prefix to register)
    shared_cells_expected: int = 0  # left out of the reservation: a hot prefix provides them
    prefill_skips: int = 0  # steps in a row this prompt got no chunk (others came first)
    awaited_by: int = 0  # queued requests waiting for the family prefix this prompt computes

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < len(self.prompt_tokens)

    @property
    def output_cells_short(self) -> bool:
        """Whether its next decode writes an output cell beyond its grants (the pending token
        is output number `generated_tokens`, and its cell is written when it is decoded)."""
        return self.pending_token is not None and self.generated_tokens > self.output_cells


@dataclass
class Scheduler:
    """Owns the sequence slots and the wait queue.

    Invariants (checked by `check_invariants`): a slot is free or held by exactly one running
    sequence, and every running sequence has a reservation in `budget`. `enqueue`,
    `cancel_waiting` and the figures may be called from any thread; everything else only from
    the engine thread.
    """

    num_slots: int
    budget: KVBudget
    batch_tokens: int
    max_waiting: int
    running: dict[int, SeqProgress] = field(default_factory=dict)
    _waiting: deque[Pending] = field(default_factory=deque)
    _free_slots: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _arrivals: int = 0

    def __post_init__(self) -> None:
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    # --- any thread -------------------------------------------------------------------------
    def enqueue(self, pending: Pending) -> None:
        if pending.cells_at_most > self.budget.total_cells:
            raise RequestTooLargeError(
                f"prompt + max_tokens = {pending.cells_at_most} tokens exceeds this replica's "
                f"{self.budget.total_cells} KV cells"
            )
        with self._lock:
            # Requests that a free slot will take at the next step do not count as queued.
            if len(self._waiting) >= self.max_waiting + len(self._free_slots):
                raise QueueFullError(f"{len(self._waiting)} requests already waiting")
            self._arrivals += 1
            pending.arrival = self._arrivals
            self._waiting.append(pending)

    def requeue_first(self, pending: Pending) -> None:
        """Put a parked sequence's continuation back at the head of the queue, behind only the
        continuations of requests that arrived before it (no bound: it was admitted once)."""
        with self._lock:
            at = next(
                (i for i, p in enumerate(self._waiting) if p.arrival > pending.arrival),
                len(self._waiting),
            )
            self._waiting.insert(at, pending)

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

    def remove_waiting(self, pending: Pending) -> bool:
        """Take `pending` out of the queue (it failed before admission); False when it left."""
        with self._lock:
            try:
                self._waiting.remove(pending)
            except ValueError:
                return False
        return True

    def drain_waiting(self) -> list[Pending]:
        with self._lock:
            drained = list(self._waiting)
            self._waiting.clear()
        return drained

    def has_work(self) -> bool:
        """Running sequences, or a waiting request that is ready to be looked at."""
        if self.running:
            return True
        with self._lock:
            return any(p.ready for p in self._waiting)

    # --- engine thread ----------------------------------------------------------------------
    def waiting(self) -> list[Pending]:
        """The wait queue, first come first."""
        with self._lock:
            return list(self._waiting)

    def next_to_admit(self) -> Pending | None:
        """The first ready request of the queue while a slot is free for it; else None."""
        with self._lock:
            if self._free_slots:
                return next((p for p in self._waiting if p.ready), None)
        return None

    def can_admit(self, pending: Pending, shared_cells: int = 0) -> bool:
        """Whether `pending` fits now: a free slot, and cells for all it needs but the
        `shared_cells` a hot prefix provides."""
        need = pending.cells_needed - shared_cells
        return bool(self._free_slots) and self.budget.can_admit(need)

    def admit(self, pending: Pending, shared_cells: int = 0) -> SeqProgress | None:
        """Move `pending` from the queue into a slot and reserve its cells (call `can_admit`
        first); None when it left the queue meanwhile (cancelled). All or nothing: when the
        budget refuses, the request is still queued and the slot still free."""
        with self._lock:
            if pending not in self._waiting:
                return None
            slot = self._free_slots[-1]
            self.budget.admit(slot, pending.cells_needed - shared_cells)
            self._free_slots.pop()
            self._waiting.remove(pending)
        progress = SeqProgress(
            slot=slot,
            prompt_tokens=pending.request.prompt_tokens,
            max_tokens=pending.request.max_tokens,
            arrival=pending.arrival,
            output_cells=pending.output_cells_first,
            shared_cells_expected=shared_cells,
        )
        self.running[slot] = progress
        return progress

    def needs_output_cells(self) -> list[SeqProgress]:
        """Running sequences whose next token has no granted cell, first arrived first."""
        short = [seq for seq in self.running.values() if seq.output_cells_short]
        return sorted(short, key=lambda seq: seq.arrival)

    def next_grant(self, seq: SeqProgress) -> int:
        """Cells the sequence's next grant reserves."""
        return min(OUTPUT_CELLS_PER_GRANT, seq.max_tokens - seq.output_cells)

    def grant(self, seq: SeqProgress) -> None:
        """Reserve the sequence's next grant of output cells (the caller checked they fit)."""
        cells = self.next_grant(seq)
        self.budget.reserve_more(seq.slot, cells)
        seq.output_cells += cells

    def newest_running(self) -> SeqProgress:
        """The running sequence that arrived last: the one parked when the cache runs out."""
        return max(self.running.values(), key=lambda seq: seq.arrival)

    def num_decoding(self) -> int:
        """Running sequences that have a generated token to feed back in the next step."""
        return sum(1 for seq in self.running.values() if seq.pending_token is not None)

    def num_awaiting_prefill(self) -> int:
        """Queued requests waiting for a family prefix that a running prompt is computing."""
        return sum(seq.awaited_by for seq in self.running.values() if seq.prefilling)

    def plan(self, prefill_tokens: int | None = None) -> list[Chunk]:
        """The chunks of the next step; empty when nothing can run. At most `prefill_tokens`
        prompt tokens ride along with the decode tokens (None: what the batch has room for)."""
        budget = self.batch_tokens
        chunks: list[Chunk] = []
        for seq in self.running.values():
            if seq.pending_token is not None and budget > 0:
                chunks.append(
                    Chunk(seq.slot, [seq.pending_token], seq.num_computed_tokens, True, False)
                )
                budget -= 1
        if prefill_tokens is not None:
            budget = min(budget, prefill_tokens)
        for seq in _prefill_order(self.running.values()):
            if budget <= 0:
                seq.prefill_skips += 1
                continue
            seq.prefill_skips = 0
            start = seq.num_computed_tokens
            take = min(len(seq.prompt_tokens) - start, budget)
            if seq.chunk_stop is not None and start < seq.chunk_stop:
                take = min(take, seq.chunk_stop - start)
            last = start + take == len(seq.prompt_tokens)
            tokens = list(seq.prompt_tokens[start : start + take])
            chunks.append(Chunk(seq.slot, tokens, start, want_logits=last, prefill=True))
            budget -= take
        return chunks

    def release(self, slot: int) -> SeqProgress:
        progress = self.running.pop(slot)
        self.budget.release(slot)
        self._free_slots.append(slot)
        return progress

    def check_invariants(self) -> None:
        held = set(self.running)
        free = set(self._free_slots)
        assert not held & free, f"slots both held and free: {held & free}"
        assert held | free == set(range(self.num_slots)), "a slot is lost"
        assert len(self._free_slots) == len(free), "a slot is free twice"
        assert self.budget.reserving_slots == held, "reservations and running sequences differ"
        self.budget.check_invariants()


# A prompt passed over this many steps in a row goes first, whatever its length.
STARVED_AFTER_STEPS = 8


def _prefill_order(running) -> list[SeqProgress]:
    """Prompts still prefilling, the one with the fewest tokens left per request waiting on
    them first: a short prompt (a session's next turn, a hit on a hot prefix) starts streaming
    in one step instead of waiting behind a long one that the step budget feeds a chunk at a
    time; a prompt computing a family prefix that queued requests wait for counts its tokens
    once for all of them (they are the first tokens of each). A prompt passed over for
    `STARVED_AFTER_STEPS` steps goes first, so a stream of short ones never starves it."""
    prefilling = [seq for seq in running if seq.prefilling]
    return sorted(
        prefilling,
        key=lambda seq: (
            seq.prefill_skips < STARVED_AFTER_STEPS,
            (len(seq.prompt_tokens) - seq.num_computed_tokens) / (1 + seq.awaited_by),
        ),
    )
