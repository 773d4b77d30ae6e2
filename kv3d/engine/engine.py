"""The batching engine: one llama.cpp context, many sequences, one decode per step.

`Engine.step()` is three moves: grant output cells to the sequences that used theirs and admit
what fits (the scheduler and the KV budget decide, prefix reuse and sessions place cached cells;
when the cache runs out, the sequence that arrived last is parked: see `scheduler.py`), decode
the batch the scheduler plans, then sample and stream. A single engine thread runs the steps
and is the only code that touches the native handles; other threads talk to it through
`submit` and `cancel`.

Faults stay with the request that met them: an exception while admitting or advancing one
request fails that request alone (`Rejected("internal")`), after everything it held (slot,
reserved cells, prefix references, families it was computing) is given back, so the engine stays
consistent (`check_invariants`) and serves the next request. (Each reuse or session call that
takes a reference on a hot prefix does so as its last act, and hands it to the admission it
returns: a fault can never leave a reference that nothing releases.) The step thread never waits
on I/O or on the codec: a request whose stored session is still being read waits in the queue,
and the step thread is woken when the read is done.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np

from kv3d.config import KV3DConfig
from kv3d.engine.budget import KVBudget
from kv3d.engine.choices import ChoiceGroup, choice_requests
from kv3d.engine.generation import (
    EngineStats,
    Finished,
    FinishReason,
    GenerationRequest,
    Rejected,
    StreamEvent,
    TextDelta,
    Usage,
    coalesce,
    ends_stream,
)
from kv3d.engine.llama import (
    ContextParams,
    KVCacheFullError,
    LlamaBatch,
    LlamaContext,
    LlamaError,
    LlamaModel,
    SamplerChain,
    on_own_thread,
)
from kv3d.engine.logprobs import log_softmax_top, token_logprob
from kv3d.engine.modelfile import cache_fingerprint
from kv3d.engine.pacing import StepPacer
from kv3d.engine.rent import IdleRent, MoveCost
from kv3d.engine.reuse import Admission, NoReuse, PrefixReuse, Publish, SnapshotSource
from kv3d.engine.safemode import SafeMode
from kv3d.engine.scheduler import (
    Chunk,
    Emit,
    Pending,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
    SeqProgress,
)
from kv3d.engine.selfcheck import run_self_check
from kv3d.engine.sessions import NoSessions, Sessions
from kv3d.engine.settings import MIB, CapacityError, EngineSettings, plan_kv_cells
from kv3d.engine.textstream import IncrementalText
from kv3d.engine.tiers import SessionStore, SharedSessions
from kv3d.engine.view import CacheView

__all__ = ["MIB", "CapacityError", "Engine", "EngineSettings", "new_request_id"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Live:
    """The engine-side half of a running sequence (the scheduler holds its progress)."""

    pending: Pending
    progress: SeqProgress
    sampler: SamplerChain
    text: IncrementalText
    admission: Admission
    admitted_by: PrefixReuse | NoReuse  # releases what it admitted, even after safe mode
    output_ids: list[int]
    prompt_logits: np.ndarray | None = None  # what its prompt gave: kept with its session
    parked: _Parked | None = None  # set when it continues a parked sequence


@dataclass(slots=True)
class _Parked:
    """What a sequence parked for lack of cells takes to its continuation: its sampler (which
    it owns until the continuation is admitted, or frees when it ends in the queue), its text
    stream, and what the client is told at the end (the original request's usage and where
    its prefix came from)."""

    sampler: SamplerChain
    text: IncrementalText
    prompt_tokens: int  # of the original request
    generated_tokens: int  # before this park (and every earlier one)
    first: Admission  # the first admission's cache figures

    def usage(self, generated_tokens: int = 0) -> Usage:
        """What the client is told: its own prompt, and every token of every admission."""
        return Usage(
            self.prompt_tokens,
            self.generated_tokens + generated_tokens,
            self.first.cached_tokens,
        )

    def close(self) -> None:
        self.sampler.close()


class Engine:
    """Owns one model, one context and one batch; serves many sequences by continuous batching.

    Invariant: every submitted request gets exactly one terminal event (`Finished` or
    `Rejected`), and its sequence slot and KV cells are released before that event is emitted.
    A fault in one request's admission or step ends that request alone (see the module doc).
    """

    def __init__(
        self,
        settings: EngineSettings,
        *,
        replica_id: str = "local",
        publish: Publish | None = None,
    ):
        """`publish(key, snapshot)` receives each family prefix snapshot (from the step thread;
        it must not block)."""
        self.settings = settings
        self.replica_id = replica_id
        self.model_id = settings.model_id
        t0 = time.perf_counter()
        self.model = LlamaModel(settings.model_path, n_gpu_layers=settings.n_gpu_layers)
        self.safe = SafeMode(forced=settings.safe_mode, canary_period_s=settings.canary_period_s)
        reuse_on = settings.reuse_enabled and self.model.has_per_cell_kv and not self.safe.active
        if settings.reuse_enabled and not reuse_on and not self.safe.active:
            log.warning(
                "prefix reuse is off: %s keeps no per-token KV cells to share",
                self.model.description,
            )
        num_holders = settings.max_hot_prefixes if reuse_on else 0
        try:
            self.kv_cells_total, self.context_tokens = plan_kv_cells(settings, self.model)
            self.ctx = LlamaContext(
                self.model,
                ContextParams(
                    n_ctx_cells=self.kv_cells_total,
                    n_seq_max=settings.max_sequences + num_holders,
                    n_batch_tokens=settings.batch_tokens,
                    n_threads=settings.threads,
                    n_threads_single=settings.decode_threads,
                    kv_type=settings.kv_type,
                    flash_attn=settings.flash_attn,
                ),
            )
        except BaseException:
            self.model.close()
            raise
        self.kv_cells_total = self.ctx.n_ctx_cells
        self._bytes_per_cell = self.model.kv_bytes_per_cell(settings.kv_type)
        self.batch = LlamaBatch(settings.batch_tokens)
        round_trips: tuple[tuple[int, float], ...] = ()
        if reuse_on:
            # Not on this thread: only the step thread may keep an OpenMP team (see on_own_thread).
            check = on_own_thread(run_self_check, self.model, self.ctx, self.batch)
            round_trips = check.round_trips
            if not check.ok:
                reuse_on = False
                self.safe.trip(f"start-up self-check failed: {check.reason}")
        if not reuse_on:
            self.safe.canary_period_s = 0.0  # the canary checks stored state: there is none
        self.budget = KVBudget(self.kv_cells_total)
        self.scheduler = Scheduler(
            num_slots=settings.max_sequences,
            budget=self.budget,
            batch_tokens=settings.batch_tokens,
            max_waiting=settings.max_queued_requests,
        )
        self.pacer = StepPacer(settings.batch_tokens, settings.prefill_slowdown_max)
        self.fingerprint = cache_fingerprint(
            settings.model_path, kv_type=settings.kv_type, flash_attn=settings.flash_attn
        )
        self.reuse: PrefixReuse | NoReuse = NoReuse(settings.reuse)
        self.sessions: Sessions | NoSessions = NoSessions()
        if reuse_on:
            holders = list(range(settings.max_sequences, settings.max_sequences + num_holders))
            snapshot_sink = publish if settings.reuse.snapshots else None
            self.reuse = PrefixReuse(
                self.ctx, self.budget, holders, settings.reuse, self.fingerprint, snapshot_sink
            )
            # Sessions need prefix reuse: their deltas compose with a shared family prefix.
            store = SessionStore(
                settings.warm_budget_bytes,
                settings.cold_path,
                cold_budget_bytes=settings.cold_budget_bytes,
                codec=settings.session_codec,
                rope=self.model.rope_spec(),
                part_tokens=settings.session_part_tokens,
            )
            self.sessions = Sessions(
                self.reuse,
                store,
                auto=settings.auto_sessions,
                rent=IdleRent(settings.idle_session_rent, round_trip=MoveCost.of(round_trips)),
            )
        self._live: dict[int, _Live] = {}
        self._hot_view = CacheView()
        self._hot_view_version = 0
        self._cancelled: set[str] = set()
        self._choice_ids: dict[str, list[str]] = {}  # n > 1 request -> its choices' ids
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counters = dict(
            steps_total=0,
            batched_steps_total=0,
            max_sequences_in_step=0,
            prompt_tokens_total=0,
            generated_tokens_total=0,
            prefill_tokens_total=0,
            sequences_parked_total=0,
        )
        log.info(
            "engine ready in %.2fs: %s, %d KV cells (%s), %d slots, %d tokens/sequence, "
            "%d threads, %d GPU layers",
            time.perf_counter() - t0,
            self.model.description,
            self.kv_cells_total,
            settings.kv_type,
            settings.max_sequences,
            self.context_tokens,
            settings.threads,
            settings.n_gpu_layers,
        )

    @classmethod
    def from_config(cls, config: KV3DConfig, **kwargs) -> Engine:
        return cls(EngineSettings.from_config(config), **kwargs)

    # --- safe mode --------------------------------------------------------------------------
    @property
    def safe_mode(self) -> bool:
        return self.safe.active

    @property
    def safe_mode_reason(self) -> str:
        return self.safe.reason

    def enter_safe_mode(self, reason: str) -> None:
        """Stop all reuse from now on (engine thread): requests run as plain inference."""
        if self.safe.trip(reason):
            self._reuse_off()

    def _reuse_off(self) -> None:
        self.reuse.retire()
        self.reuse = NoReuse(self.settings.reuse)
        self.sessions = NoSessions()

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv3d-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the step thread, end every request, free native handles (idempotent)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.batch is None:
            return
        for slot in list(self._live):
            self._finish(slot, "cancelled")
        for pending in self.scheduler.drain_waiting():
            _drop_parked(pending)
            pending.emit(Rejected("unavailable", "the engine is shutting down"))
        self.sessions.close()
        self.batch.close()
        self.ctx.close()
        self.model.close()
        self.batch = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- any thread -------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, emit: Emit, snapshot=None) -> None:
        """Queue a request. `emit` is called from the engine thread and must not block.

        `snapshot` is an encoded prefix snapshot fetched for this request (any bytes-like
        object); it is verified before use and ignored when it does not apply. A request for
        n > 1 completions runs as n sequences in one stream (see `choices.py`). An empty
        prompt is the caller's error (ValueError): there is no token to decode from.
        """
        if not request.prompt_tokens:
            raise ValueError(f"request {request.request_id} has an empty prompt")
        if request.n > 1:
            self._submit_choices(request, emit, snapshot)
            return
        try:
            blocks = self.prefix_blocks(request)
            # A stored session is decoded off this thread while the request waits.
            session = self.sessions.take_for(request, blocks, self._hot_view.sessions)
        except Exception:
            log.exception("request %s could not be queued", request.request_id)
            emit(Rejected("internal", "the engine could not queue this request"))
            return
        pending = Pending(request, emit, snapshot, session, blocks)
        try:
            self.scheduler.enqueue(pending)
        except RequestTooLargeError as exc:
            self.sessions.put_back(pending)
            emit(Rejected("too_large", str(exc)))
            return
        except QueueFullError as exc:
            self.sessions.put_back(pending)
            emit(
                Rejected(
                    "queue_full", f"server busy: {exc}", retry_after_s=self.settings.retry_after_s
                )
            )
            return
        if session is not None:  # the request becomes admissible when its session is read
            session.add_done_callback(self._wake_up)
        self._wake_up()

    def _submit_choices(self, request: GenerationRequest, emit: Emit, snapshot) -> None:
        choices = choice_requests(request)

        def ended(rejected: bool) -> None:
            with self._wake:
                self._choice_ids.pop(request.request_id, None)
            if rejected:  # one choice cannot run: the request fails whole, the others stop
                for choice in choices:
                    self.cancel(choice.request_id)

        group = ChoiceGroup(request.n, emit, on_end=ended)
        with self._wake:
            self._choice_ids[request.request_id] = [c.request_id for c in choices]
        for index, choice in enumerate(choices):
            if group.ended:  # an earlier choice was refused (queue full, too large)
                break
            self.submit(choice, group.emitter(index), snapshot)

    def _wake_up(self, _=None) -> None:
        with self._wake:
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its slot is freed before the next step."""
        with self._wake:
            choice_ids = self._choice_ids.pop(request_id, None)
        for choice_id in choice_ids or ():
            self.cancel(choice_id)
        if choice_ids is not None:
            return
        if self._cancel_waiting(request_id):
            return
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    def _cancel_waiting(self, request_id: str) -> bool:
        pending = self.scheduler.cancel_waiting(request_id)
        if pending is None:
            return False
        self.sessions.put_back(pending)
        usage = _usage_waiting(pending)
        _drop_parked(pending)
        pending.emit(Finished("cancelled", usage, replica_id=self.replica_id))
        return True

    def set_session_share(self, shared: SharedSessions) -> None:
        """A warm tier shared with other replicas: every kept session is published there."""
        self.sessions.set_shared(shared)

    def set_snapshot_sink(self, publish: Publish) -> None:
        """Where family prefix snapshots go (called from the step thread; must not block)."""
        if self.settings.reuse.snapshots:
            self.reuse.set_publish(publish)

    def set_snapshot_source(self, source: SnapshotSource) -> None:
        """A RAM store of snapshots the step thread reads at admission (must not block): a
        request whose family prefix was hot when it was submitted, and was evicted while it
        waited, restores the family from there instead of computing it again."""
        if self.settings.reuse.snapshots:
            self.reuse.set_snapshot_source(source)

    def routing_view(self, max_warm_sessions: int = 1024) -> CacheView:
        """What this replica can serve best: hot prefixes and sessions it can resume locally
        (hot, or the most recent warm ones). Refreshed after each engine step."""
        hot = self._hot_view
        warm = self.sessions.recent_ids(max_warm_sessions)
        if not warm:
            return hot
        return CacheView(hot.sessions | frozenset(warm), hot.blocks)

    def prefix_blocks(self, request: GenerationRequest) -> list:
        """The request's reusable blocks (pure)."""
        return self.reuse.blocks_for(
            request.prompt_tokens, request.family_tokens, request.cache_salt
        )

    def hot_prefix_tokens(self, blocks: list) -> int:
        """How many of the blocks' tokens this replica holds hot (a hint)."""
        return self.reuse.hot_tokens(blocks)

    def snapshot_keys(self, request: GenerationRequest) -> list[int]:
        """Block keys under which a stored prefix snapshot could serve `request` (any thread):
        none when this engine holds part of its prefix hot, or when it has no block of
        `snapshot_min_tokens` or more (only such prefixes are ever published), so that a short
        chat turn or a 1-token probe skips the store's round trip."""
        if not self.settings.reuse.snapshots:
            return []
        blocks = self.prefix_blocks(request)
        min_tokens = self.settings.reuse.snapshot_min_tokens
        keys = [b.key for b in blocks if b.end_tokens >= min_tokens]
        if not keys or self.hot_prefix_tokens(blocks) > 0:
            return []
        return keys

    async def stream(
        self, request: GenerationRequest, snapshot=None, *, min_interval_s: float = 0.0
    ) -> AsyncIterator[StreamEvent]:
        """Submit `request` and yield its events; closing the iterator early cancels it.

        Events that are ready together come out merged (`coalesce`). With `min_interval_s`,
        text after the first is held until that long after the previous yield, so that each
        message downstream carries several tokens (the first token is never held)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def emit(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the consumer's loop is gone: nobody is listening
                self.cancel(request.request_id)

        self.submit(request, emit, snapshot)
        ended = False
        last_yield_s: float | None = None
        try:
            while not ended:
                events = [await queue.get()]
                if last_yield_s is not None and not ends_stream(events[0]):
                    wait_s = last_yield_s + min_interval_s - loop.time()
                    if wait_s > 0:
                        await asyncio.sleep(wait_s)
                while not queue.empty():
                    events.append(queue.get_nowait())
                for event in coalesce(events):
                    ended = ends_stream(event)
                    yield event
                last_yield_s = loop.time()
        finally:
            if not ended:
                self.cancel(request.request_id)

    def stats(self) -> EngineStats:
        """The engine's figures now (a snapshot of another thread's state: for metrics, not
        for decisions)."""
        sched = self.scheduler
        reuse = self.reuse.stats()
        return EngineStats(
            replica_id=self.replica_id,
            taken_at_s=time.time(),
            running_sequences=len(sched.running),
            waiting_requests=sched.num_waiting,
            free_slots=sched.num_free_slots,
            kv_cells_total=self.kv_cells_total,
            kv_cells_reserved=self.budget.reserved_cells,
            canary_runs_total=self.safe.canary_runs_total,
            **self._counters,
            **reuse,
            **self.sessions.stats(),
            kv_bytes_used=self._cells_used() * self._bytes_per_cell,
            sessions_hot=len(sched.running) + reuse.get("hot_idle_sessions", 0),
            safe_mode=int(self.safe_mode),
            safe_mode_reason=self.safe.reason,
        )

    def _cells_used(self) -> int:
        """KV cells in use: hot prefixes and sessions, and what running sequences computed
        beyond the prefix they share."""
        return self.budget.held_cells + sum(
            live.progress.num_computed_tokens - live.admission.prefix_tokens
            for live in list(self._live.values())
        )

    def check_invariants(self) -> None:
        """Slots, the KV budget and the hot prefixes agree, and every reference on a hot prefix
        and every family being computed belongs to a running sequence or a kept session (tests
        call this between steps)."""
        self.scheduler.check_invariants()
        self.reuse.check_invariants()
        assert set(self._live) == set(self.scheduler.running), "live and running sequences differ"
        if not isinstance(self.reuse, PrefixReuse):
            return
        users: Counter[int] = Counter()
        families: Counter[int] = Counter()
        for live in self._live.values():
            if live.admission.prefix is not None:
                users[live.admission.prefix.seq_id] += 1
            if live.admission.register_blocks:
                families[live.admission.register_blocks[-1].key] += 1
        hot = self.reuse.cache.hot()
        users.update(p.parent.seq_id for p in hot if p.parent is not None)
        for prefix in hot:
            assert prefix.refs == users[prefix.seq_id], f"prefix {prefix.key:016x}: lost refs"
        assert dict(families) == self.reuse._in_flight, "families computed by nobody"

    # --- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        failed_steps = 0
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.has_work() and not self._cancelled:
                    wait_s = self._canary_wait_s()
                    if wait_s == 0.0:
                        break
                    self._wake.wait(wait_s)
                if self._stopping:
                    return
            try:  # never let anything kill the replica's only step thread
                if self._canary_wait_s() == 0.0 and not self.scheduler.running:
                    if self.safe.run_canary(self.model, self.ctx, self.batch):
                        self._reuse_off()
                try:
                    self.step()
                    failed_steps = 0
                except Exception:  # not one request's fault (those are caught in the step)
                    log.exception("engine step failed")
                    self._fail_all("engine step failed")
                    # A fault that outlives the requests it failed must not spin the step
                    # thread (and its log): back off, up to a second, until a step succeeds.
                    failed_steps += 1
                    with self._wake:
                        self._wake.wait(min(1.0, 0.01 * 2**failed_steps))
                self._refresh_hot_view()
                if self.safe.check_state_failures(self.reuse.state_failures):
                    self._reuse_off()
            except Exception:
                log.exception("engine loop failed")

    def _canary_wait_s(self) -> float | None:
        return self.safe.canary_wait_s()

    def _refresh_hot_view(self) -> None:
        version = self.reuse.hot_version
        if version != self._hot_view_version:
            self._hot_view = self.reuse.hot_view()  # one reference swap: readers need no lock
            self._hot_view_version = version

    def step(self) -> int:
        """Run one scheduler step; returns the number of sequences it decoded."""
        self._apply_cancels()
        self._grant_output_cells()
        self._admit_waiting()
        decoding = self.scheduler.num_decoding()
        awaiting = self.scheduler.num_awaiting_prefill()
        chunks = self.scheduler.plan(self.pacer.prefill_budget(decoding, awaiting))
        if not chunks:
            return 0
        rows = self._fill_batch(chunks)
        t0 = time.perf_counter()
        try:
            self._decode_making_room()
        except LlamaError as exc:
            log.error("decode of %d tokens failed: %s", self.batch.n_tokens, exc)
            for chunk in chunks:
                self._fail(chunk.slot, f"decode failed: {exc}")
            return 0
        step_ms = (time.perf_counter() - t0) * 1000.0
        prefill = self.batch.n_tokens - decoding
        cells_used = self._cells_used()  # before advancing: what this step attended over
        self.pacer.observe(decoding, prefill, step_ms)
        self._count_step(chunks)
        for chunk, row in zip(chunks, rows, strict=True):
            self._guarded(chunk.slot, self._advance, chunk, row)
        self.sessions.after_step(decoding, prefill, cells_used, step_ms / 1000.0)
        return len(chunks)

    def _guarded(self, slot: int, fn: Callable, *args) -> None:
        """Run one sequence's part of the step; a fault there fails that sequence alone."""
        try:
            fn(*args)
        except Exception:
            log.exception("the request in slot %d failed", slot)
            self._fail(slot, "internal error while running this request")

    def _fail_all(self, message: str) -> None:
        """A step failed as a whole: end every running request and give back every slot,
        including one an admission left half done."""
        for slot in list(self._live):
            self._fail(slot, message)
        for slot in list(self.scheduler.running):
            self._give_back(slot, None, self.reuse, None)

    def _admit_waiting(self) -> None:
        """Admit waiting requests first come first served while they fit. A request that should
        wait for a prefix another sequence is computing, or whose stored session is still being
        read, stays queued; those behind it may go. A request that raises is failed alone."""
        head = self.scheduler.next_to_admit()
        if head is not None:
            try:
                self.reuse.make_room(head.cells_needed - self._shared_cells(head))
            except Exception:
                self._fail_waiting(head)
        awaited: Counter[int] = Counter()  # family key -> queued requests waiting for it
        for pending in self.scheduler.waiting():
            if not pending.ready:
                if pending.parked is not None:
                    break  # the cells freed for a parked sequence are its to take back
                continue  # never wait on the read here: it is admitted once it is done
            try:
                refetch = self.sessions.refetch(pending)
                if refetch is not None:  # its session left the cache while it waited
                    refetch.add_done_callback(self._wake_up)
                    continue
                # One at a time: a request admitted now may start computing a prefix that the
                # next one should then wait for.
                family = self.reuse.awaited_family(pending)
                if family is not None:
                    awaited[family] += 1
                    continue
                shared = self._shared_cells(pending)
                if not self.scheduler.can_admit(pending, shared):
                    break
                progress = self.scheduler.admit(pending, shared)
            except Exception:
                self._fail_waiting(pending)
                continue
            if progress is not None:
                self._start(pending, progress)
        for live in self._live.values():  # each waiting request counted once
            key = live.admission.family_key
            live.progress.awaited_by = awaited.pop(key, 0) if key is not None else 0

    def _fail_waiting(self, pending: Pending) -> None:
        log.exception("request %s failed before admission", pending.request.request_id)
        if self.scheduler.remove_waiting(pending):
            _drop_parked(pending)
            pending.emit(Rejected("internal", "internal error while admitting this request"))

    def _grant_output_cells(self) -> None:
        """Give each sequence whose next token has no cell its next grant, first arrived
        first; when no cells are free, even after idle prefixes and sessions made room, park
        the running sequence that arrived last (possibly the one asking) until there are."""
        sched = self.scheduler
        for seq in sched.needs_output_cells():
            cells = sched.next_grant(seq)
            if not self.budget.can_admit(cells):
                self.reuse.make_room(cells)
            while not self.budget.can_admit(cells) and sched.running.get(seq.slot) is seq:
                self._guarded_park(sched.newest_running().slot)
            if sched.running.get(seq.slot) is seq:
                sched.grant(seq)

    def _guarded_park(self, slot: int) -> None:
        try:
            self._park(slot)
        except Exception:
            log.exception("could not park the request in slot %d", slot)
            self._fail(slot, "internal error while parking this request")

    def _park(self, slot: int) -> None:
        """Take a sequence off the cache to free its cells, and queue its continuation first:
        its prompt and what it generated become the continuation's prompt, resumed from the
        session store when it has a key there (else computed again), and it goes on with the
        same sampler and text stream, so the client sees one uninterrupted stream."""
        live = self._live[slot]
        req, progress = live.pending.request, live.progress
        self._counters["sequences_parked_total"] += 1
        if progress.generated_tokens == 0:  # nothing generated since it was admitted
            self._live.pop(slot)
            # A new request starts over (a new sampler then); a continuation takes its
            # request's sampler and text stream back to the queue.
            sampler = live.sampler if live.parked is None else None
            self._give_back(slot, live.admission, live.admitted_by, sampler)
            live.pending.parked = live.parked
            self.scheduler.requeue_first(live.pending)
            return
        before = live.parked
        parked = _Parked(
            live.sampler,
            live.text,
            before.prompt_tokens if before else len(req.prompt_tokens),
            progress.generated_tokens + (before.generated_tokens if before else 0),
            before.first if before else live.admission,
        )
        cont = replace(
            req,
            prompt_tokens=req.prompt_tokens + tuple(live.output_ids),
            max_tokens=req.max_tokens - progress.generated_tokens,
        )
        blocks = self.prefix_blocks(cont)
        session = self.sessions.park_running(req, live.admission, progress, live.output_ids)
        # Nothing below raises: the sequence is off the cache and its continuation queued.
        self._live.pop(slot)
        self._give_back(slot, live.admission, live.admitted_by, None)
        pending = Pending(cont, live.pending.emit, None, session, blocks, parked)
        pending.arrival = live.pending.arrival
        self.scheduler.requeue_first(pending)
        if session is not None:
            session.add_done_callback(self._wake_up)
        log.info(
            "KV cache full: request %s parked after %d tokens, continues when cells free up",
            req.request_id,
            parked.generated_tokens,
        )

    def _shared_cells(self, pending: Pending) -> int:
        """Cells a hot prefix will provide `pending` at admission (not reserved for it)."""
        return self.sessions.shared_cells(pending, self.reuse.cells_already_hot(pending))

    def _decode_making_room(self) -> None:
        """Decode the batch; when llama.cpp finds no KV cells for it (fragmentation, a budget
        misjudged), demote every idle prefix and session to the warm tier and try once more."""
        try:
            self.ctx.decode(self.batch)
        except KVCacheFullError:
            if not self.reuse.evict_idle():
                raise
            log.warning("KV cache full: idle prefixes and sessions demoted, decode retried")
            self.ctx.decode(self.batch)

    def _start(self, pending: Pending, progress: SeqProgress) -> None:
        """Set up an admitted request; on any fault, give back what it took and fail it."""
        req = pending.request
        parked: _Parked | None = pending.parked
        pending.parked = None  # the sampler is this admission's to free from here on
        sampler = parked.sampler if parked is not None else None
        admission = None
        try:
            if sampler is None:
                seed = req.sampling.seed
                sampler = SamplerChain(
                    model=self.model,
                    params=req.sampling,
                    seed=seed if seed is not None else random.getrandbits(32),
                    prompt=req.prompt_tokens,
                    max_tokens=req.max_tokens,
                )
            # Tokens whose KV reuse places into the slot need no prefill.
            admission = self.sessions.resume(pending, progress)
            if admission is None:
                admission = self.reuse.admit(pending, progress)
            self.reuse.begin(admission, progress)
            text = parked.text if parked is not None else IncrementalText(req.stop)
        except Exception:
            log.exception("admitting request %s failed", req.request_id)
            self._give_back(progress.slot, admission, self.reuse, sampler)
            pending.emit(Rejected("internal", "internal error while admitting this request"))
            return
        live = _Live(pending, progress, sampler, text, admission, self.reuse, [], parked=parked)
        self._live[progress.slot] = live
        try:
            self.sessions.before_prefill(len(req.prompt_tokens) - progress.num_computed_tokens)
        except Exception:  # the request does not depend on it: it runs beside them
            log.exception("demoting idle sessions ahead of request %s failed", req.request_id)
        if parked is None:
            self._counters["prompt_tokens_total"] += len(req.prompt_tokens)
        if progress.num_computed_tokens == len(req.prompt_tokens):
            # A repeat of a prompt kept hot with its logits: nothing to compute, and the
            # first token is drawn from the logits the first request had.
            live.prompt_logits = admission.prefix.logits
            self._guarded(progress.slot, self._next_token, progress.slot, live, None)

    def _fill_batch(self, chunks: list[Chunk]) -> list[int]:
        """Write the chunks into the batch; returns each chunk's logits row (or -1)."""
        self.batch.clear()
        rows = []
        for chunk in chunks:
            row = -1
            last = len(chunk.tokens) - 1
            for i, token in enumerate(chunk.tokens):
                want = chunk.want_logits and i == last
                r = self.batch.add(token, chunk.start_pos + i, chunk.slot, want)
                if want:
                    row = r
            rows.append(row)
        return rows

    def _count_step(self, chunks: list[Chunk]) -> None:
        c = self._counters
        c["steps_total"] += 1
        n_seqs = len({chunk.slot for chunk in chunks})
        if n_seqs > 1:
            c["batched_steps_total"] += 1
        c["max_sequences_in_step"] = max(c["max_sequences_in_step"], n_seqs)
        c["prefill_tokens_total"] += sum(len(ch.tokens) for ch in chunks if ch.prefill)

    def _advance(self, chunk: Chunk, row: int) -> None:
        live = self._live[chunk.slot]
        progress = live.progress
        progress.num_computed_tokens = chunk.start_pos + len(chunk.tokens)
        progress.pending_token = None
        if chunk.prefill and self.reuse.after_chunk(live.admission, progress):
            self.sessions.after_prefix(live.admission, progress)
        if row < 0:
            return  # a prefill chunk that is not the prompt's last
        if chunk.prefill:
            # ~4 bytes a vocabulary entry, kept only while its session is hot.
            live.prompt_logits = self.ctx.logits(row).copy()
        self._next_token(chunk.slot, live, row)

    def _next_token(self, slot: int, live: _Live, row: int | None) -> None:
        """Draw the next token from batch row `row`'s logits (None: the kept prompt logits)
        and emit it, or end the sequence."""
        progress = live.progress
        req = live.pending.request
        top = None
        if req.top_logprobs is not None:
            logits = self.ctx.logits(row) if row is not None else live.prompt_logits
            top = log_softmax_top(logits, req.top_logprobs)
        if row is not None:
            token = live.sampler.sample(self.ctx, row)
        else:
            token = live.sampler.sample_logits(live.prompt_logits)
        if self.model.is_eog(token) and not req.ignore_eos:
            self._finish(slot, "stop")
            return
        progress.generated_tokens += 1
        live.output_ids.append(token)
        self._counters["generated_tokens_total"] += 1
        piece = self.model.token_to_piece(token)
        text = live.text.push(piece)
        logprobs = ()
        if top is not None:
            logprobs = (token_logprob(*top, token, piece, self.model.token_to_piece),)
        if text or logprobs:
            live.pending.emit(TextDelta(text, 1, logprobs))
        if live.text.stopped:
            self._finish(slot, "stop")
        elif progress.generated_tokens >= req.max_tokens:
            self._finish(slot, "length")
        else:
            progress.pending_token = token

    def _apply_cancels(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for slot, live in list(self._live.items()):
            if live.pending.request.request_id in cancelled:
                cancelled.discard(live.pending.request.request_id)
                self._guarded(slot, self._finish, slot, "cancelled")
        for request_id in cancelled:  # parked back into the queue since it was cancelled
            self._cancel_waiting(request_id)

    def _release(self, slot: int) -> _Live:
        live = self._live.pop(slot)
        self._give_back(slot, live.admission, live.admitted_by, live.sampler)
        return live

    def _give_back(
        self,
        slot: int,
        admission: Admission | None,
        admitted_by: PrefixReuse | NoReuse,
        sampler: SamplerChain | None,
    ) -> None:
        """Free a sequence's slot, cells, reservation, prefix reference and sampler: each part
        even when another fails (that is logged), so that a fault never leaks the rest."""
        parts: list[Callable[[], object]] = []
        if slot in self.scheduler.running:
            parts.append(lambda: self.scheduler.release(slot))
        parts.append(lambda: self.ctx.seq_remove(slot))
        if admission is not None:
            parts.append(lambda: admitted_by.release(admission))
        if sampler is not None:
            parts.append(sampler.close)
        for part in parts:
            try:
                part()
            except Exception:
                log.exception("could not free all of slot %d", slot)

    def _finish(self, slot: int, reason: FinishReason) -> None:
        live = self._live[slot]
        if reason != "cancelled":
            try:
                req = live.pending.request
                self.sessions.keep(
                    req, live.admission, live.progress, live.output_ids, live.prompt_logits
                )
            except Exception:  # keeping a session is an optimisation, never a failure
                log.exception("could not keep the session of slot %d", slot)
        progress = live.progress
        adm = live.admission
        usage = Usage(len(progress.prompt_tokens), progress.generated_tokens, adm.cached_tokens)
        if live.parked is not None:  # the client asked for the original request
            adm = live.parked.first
            usage = live.parked.usage(progress.generated_tokens)
        tail = live.text.finish() if reason != "cancelled" else ""  # may fail: still live here
        self._release(slot)
        if reason == "cancelled":
            self.sessions.put_back(live.pending)  # no newer turn kept: the stored one stays
        live.pending.emit(
            Finished(
                reason,
                usage,
                tail,
                self.replica_id,
                adm.restore_s,
                adm.resume_s,
                adm.resume_tier,
            )
        )

    def _fail(self, slot: int, message: str) -> None:
        if slot not in self._live:
            return
        # The stored session it took is not given back: it may be what failed.
        live = self._release(slot)
        live.pending.emit(Rejected("internal", message))


def _drop_parked(pending: Pending) -> None:
    """Free what a parked sequence's continuation holds when it ends before admission."""
    parked, pending.parked = pending.parked, None
    if parked is not None:
        parked.close()


def _usage_waiting(pending: Pending) -> Usage:
    """A request that ends in the queue: what it had generated before it was parked."""
    parked = pending.parked
    if parked is None:
        return Usage(len(pending.request.prompt_tokens), 0)
    return parked.usage()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
