"""The batching engine: one llama.cpp context, many sequences, one decode per step.

`Engine.step()` is three moves: the scheduler plans the step, the batch is decoded, the results
are sampled and streamed back. A single engine thread runs the steps and is the only code that
touches the native handles; other threads talk to it through `submit` and `cancel`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kv3d.config import KV3DConfig
from kv3d.generation import (
    EngineStats,
    Finished,
    FinishReason,
    GenerationRequest,
    Rejected,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from kv3d.llama import (
    ContextParams,
    KVCacheFullError,
    LlamaBatch,
    LlamaContext,
    LlamaError,
    LlamaModel,
    SamplerChain,
    supports_gpu_offload,
)
from kv3d.modelfile import model_fingerprint, model_id_for, resolve_model_path
from kv3d.reuse import (
    AUTO_SESSION_PREFIX,
    Admission,
    NoReuse,
    PrefixReuse,
    Publish,
    ReuseSettings,
)
from kv3d.routing import ReplicaView
from kv3d.scheduler import (
    Chunk,
    Emit,
    Pending,
    QueueFullError,
    RequestTooLargeError,
    Scheduler,
    SeqProgress,
)
from kv3d.selfcheck import run_self_check
from kv3d.statefmt import build_seq_state, cells_from, parse_seq_state
from kv3d.textstream import IncrementalText
from kv3d.tiers import SessionStore, SharedSessions

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Restores of checksum-valid state that llama.cpp refuses: past this many, the state format is
# not what KV3D expects and reuse stops (safe mode).
SAFE_MODE_AFTER_STATE_FAILURES = 3


class CapacityError(ValueError):
    """The configured KV budget cannot hold even one full-context sequence."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    model_path: Path
    model_id: str
    n_gpu_layers: int
    context_tokens: int
    max_sequences: int
    batch_tokens: int
    kv_type: str
    flash_attn: bool
    kv_budget_bytes: int
    threads: int
    decode_threads: int
    max_queued_requests: int
    retry_after_s: int
    reuse: ReuseSettings
    reuse_enabled: bool
    max_hot_prefixes: int
    warm_budget_bytes: int
    cold_path: str
    auto_sessions: bool
    safe_mode: bool = False
    canary_period_s: float = 0.0

    @classmethod
    def from_config(cls, config: KV3DConfig) -> EngineSettings:
        path = resolve_model_path(config.model.path)
        threads = config.server.threads or os.cpu_count() or 1
        n_gpu_layers = config.model.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = -1 if supports_gpu_offload() else 0
        return cls(
            model_path=path,
            model_id=model_id_for(path, config.model.id),
            n_gpu_layers=n_gpu_layers,
            context_tokens=config.model.context_tokens,
            max_sequences=config.engine.max_sequences,
            batch_tokens=config.engine.batch_tokens,
            kv_type=config.engine.kv_type,
            flash_attn=config.engine.flash_attn,
            kv_budget_bytes=config.cache.gpu_hot_mb * MIB,
            threads=threads,
            decode_threads=config.engine.decode_threads or threads,
            max_queued_requests=config.server.max_queued_requests,
            retry_after_s=config.server.retry_after_s,
            reuse=_reuse_settings(config),
            reuse_enabled=config.prefix.enabled,
            max_hot_prefixes=config.prefix.max_hot,
            warm_budget_bytes=config.cache.ram_warm_mb * MIB,
            cold_path=config.cache.ssd_cold_path,
            auto_sessions=config.cache.auto_sessions,
            safe_mode=config.server.safe_mode,
            canary_period_s=config.server.canary_period_s,
        )


def _reuse_settings(config: KV3DConfig) -> ReuseSettings:
    p = config.prefix
    return ReuseSettings(
        block_tokens=p.block_tokens,
        min_tokens=p.min_tokens,
        snapshots=p.snapshots,
        snapshot_min_tokens=p.snapshot_min_tokens,
    )


def plan_kv_cells(settings: EngineSettings, model: LlamaModel) -> tuple[int, int]:
    """(cells in the cache, tokens one sequence may hold) for this model and budget."""
    context_tokens = min(settings.context_tokens, model.n_ctx_train)
    bytes_per_cell = model.kv_bytes_per_cell(settings.kv_type)
    budget_cells = settings.kv_budget_bytes // bytes_per_cell
    if budget_cells < context_tokens:
        raise CapacityError(
            f"cache.gpu_hot_mb={settings.kv_budget_bytes // MIB} holds {budget_cells} KV cells "
            f"({bytes_per_cell} bytes each) but one sequence may need {context_tokens}: raise "
            "cache.gpu_hot_mb or lower model.context_tokens"
        )
    cells = min(budget_cells, settings.max_sequences * context_tokens)
    return cells, context_tokens


@dataclass(slots=True)
class _Live:
    """The engine-side half of a running sequence (the scheduler holds its progress)."""

    pending: Pending
    progress: SeqProgress
    sampler: SamplerChain
    text: IncrementalText
    reuse: Admission
    output_ids: list[int]


class Engine:
    """Owns one model, one context and one batch; serves many sequences by continuous batching.

    Invariant: every submitted request gets exactly one terminal event (`Finished` or
    `Rejected`), and its sequence slot and KV cells are released before that event is emitted.
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
        self.safe_mode_reason = "forced by server.safe_mode" if settings.safe_mode else ""
        reuse_on = settings.reuse_enabled and self.model.has_per_cell_kv and not settings.safe_mode
        if settings.reuse_enabled and not reuse_on:
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
        if reuse_on:
            check = run_self_check(self.model, self.ctx, self.batch)
            if not check.ok:
                reuse_on = False
                self.safe_mode_reason = f"start-up self-check failed: {check.reason}"
        self.scheduler = Scheduler(
            num_slots=settings.max_sequences,
            kv_cells_total=self.kv_cells_total,
            batch_tokens=settings.batch_tokens,
            max_waiting=settings.max_queued_requests,
        )
        self.fingerprint = model_fingerprint(
            settings.model_path,
            kv_type=settings.kv_type,
            flash_attn=settings.flash_attn,
            engine_version=llama_cpp_version(),
        )
        self.reuse: PrefixReuse | NoReuse = NoReuse(settings.reuse)
        if reuse_on:
            holders = list(range(settings.max_sequences, settings.max_sequences + num_holders))
            snapshot_sink = publish if settings.reuse.snapshots else None
            self.reuse = PrefixReuse(
                self.ctx, self.scheduler, holders, settings.reuse, self.fingerprint, snapshot_sink
            )
            self.scheduler.cells_hot = self.reuse.cells_already_hot
            self.scheduler.hold = self.reuse.should_wait
            self.reuse.cache.on_evict = self._demote
        # Sessions need prefix reuse: their deltas compose with a shared family prefix.
        self.sessions: SessionStore | None = None
        if reuse_on:
            self.sessions = SessionStore(settings.warm_budget_bytes, settings.cold_path)
        self._live: dict[int, _Live] = {}
        self._hot_view = ReplicaView()
        self._hot_view_version = 0
        self._cancelled: set[str] = set()
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
            canary_runs_total=0,
        )
        self._last_canary_s = time.monotonic()
        if self.safe_mode_reason:
            log.error(
                "SAFE MODE (%s): plain inference only, no prefix reuse, snapshots or session "
                "deltas",
                self.safe_mode_reason,
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

    @property
    def safe_mode(self) -> bool:
        return bool(self.safe_mode_reason)

    def enter_safe_mode(self, reason: str) -> None:
        """Stop all reuse from now on (engine thread): requests run as plain inference."""
        if self.safe_mode:
            return
        self.safe_mode_reason = reason
        log.error("SAFE MODE (%s): prefix reuse, snapshots and session deltas are off", reason)
        self.reuse.disable()
        self.sessions = None

    @classmethod
    def from_config(cls, config: KV3DConfig, **kwargs) -> Engine:
        return cls(EngineSettings.from_config(config), **kwargs)

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
            pending.emit(Rejected(503, "shutting_down", "the engine is shutting down"))
        if self.sessions is not None:
            self._demote_hot_sessions()
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
        object); it is verified before use and ignored when it does not apply.
        """
        blocks = self.prefix_blocks(request)
        session = None
        sessions = self.sessions  # one read: safe mode may drop the store meanwhile
        key = self._session_key_to_resume(request, blocks, sessions)
        if key is not None and key not in self._hot_view.sessions:
            session = sessions.take(key)  # decodes while the request waits
        try:
            self.scheduler.enqueue(Pending(request, emit, snapshot, session, blocks))
        except RequestTooLargeError as exc:
            emit(Rejected(400, "context_length_exceeded", str(exc), stats=self.stats()))
            return
        except QueueFullError as exc:
            emit(
                Rejected(
                    429,
                    "queue_full",
                    f"server busy: {exc}",
                    retry_after_s=self.settings.retry_after_s,
                    stats=self.stats(),
                )
            )
            return
        with self._wake:
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its slot is freed before the next step."""
        pending = self.scheduler.cancel_waiting(request_id)
        if pending is not None:
            usage = Usage(len(pending.request.prompt_tokens), 0)
            pending.emit(Finished("cancelled", usage, stats=self.stats()))
            return
        with self._wake:
            self._cancelled.add(request_id)
            self._wake.notify()

    def set_session_share(self, shared: SharedSessions) -> None:
        """A warm tier shared with other replicas: every kept session is published there."""
        if self.sessions is not None:
            self.sessions.shared = shared

    def routing_view(self, max_warm_sessions: int = 1024) -> ReplicaView:
        """What this replica can serve best: hot prefixes and sessions it can resume locally
        (hot, or the most recent warm ones). Any thread; refreshed after each engine step."""
        hot = self._hot_view
        if self.sessions is None:
            return hot
        warm = self.sessions.recent_ids(max_warm_sessions)
        return ReplicaView(hot.sessions | frozenset(warm), hot.blocks)

    def set_snapshot_sink(self, publish: Publish) -> None:
        """Where family prefix snapshots go (called from the step thread; must not block)."""
        if isinstance(self.reuse, PrefixReuse) and self.reuse.settings.snapshots:
            self.reuse.publish = publish

    def prefix_blocks(self, request: GenerationRequest) -> list:
        """The request's reusable blocks (pure; any thread)."""
        return self.reuse.blocks_for(
            request.prompt_tokens, request.family_tokens, request.cache_salt
        )

    def hot_prefix_tokens(self, blocks: list) -> int:
        """How many of the blocks' tokens this replica holds hot (a hint; any thread)."""
        return self.reuse.hot_tokens(blocks)

    async def stream(self, request: GenerationRequest, snapshot=None) -> AsyncIterator[StreamEvent]:
        """Submit `request` and yield its events; closing the iterator early cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def emit(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the consumer's loop is gone: nobody is listening
                self.cancel(request.request_id)

        self.submit(request, emit, snapshot)
        ended = False
        try:
            while True:
                event = await queue.get()
                ended = isinstance(event, (Finished, Rejected))
                yield event
                if ended:
                    return
        finally:
            if not ended:
                self.cancel(request.request_id)

    def stats(self) -> EngineStats:
        sched = self.scheduler
        reuse = self.reuse.stats()
        return EngineStats(
            replica_id=self.replica_id,
            taken_at_s=time.time(),
            running_sequences=len(sched.running),
            waiting_requests=sched.num_waiting,
            free_slots=sched.num_free_slots,
            kv_cells_total=self.kv_cells_total,
            kv_cells_reserved=sched.kv_cells_reserved,
            **self._counters,
            **reuse,
            **(self.sessions.stats() if self.sessions is not None else {}),
            kv_bytes_used=self._kv_bytes_used(reuse.get("hot_prefix_cells", 0)),
            sessions_hot=len(sched.running) + reuse.get("hot_idle_sessions", 0),
            safe_mode=int(self.safe_mode),
        )

    def _kv_bytes_used(self, hot_prefix_cells: int) -> int:
        # A snapshot of another thread's dicts: figures for metrics, not for decisions.
        cells = hot_prefix_cells
        cells += sum(
            live.progress.num_computed_tokens - live.reuse.prefix_tokens
            for live in list(self._live.values())
        )
        return cells * self._bytes_per_cell

    # --- engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.has_work() and not self._cancelled:
                    wait_s = self._canary_wait_s()
                    if wait_s == 0.0:
                        break
                    self._wake.wait(wait_s)
                if self._stopping:
                    return
            if self._canary_wait_s() == 0.0 and not self.scheduler.running:
                self._run_canary()
            try:
                self.step()
            except Exception:  # never let one bad step kill the replica's only thread
                log.exception("engine step failed")
                for slot in list(self._live):
                    self._fail(slot, "engine step failed")
            self._refresh_hot_view()
            if self.reuse.state_failures >= SAFE_MODE_AFTER_STATE_FAILURES:
                self.enter_safe_mode(
                    f"{self.reuse.state_failures} intact snapshots or sessions failed to restore"
                )

    def _canary_wait_s(self) -> float | None:
        """Seconds until the next canary is due (0: now), None when there is none."""
        period = self.settings.canary_period_s
        if not period or self.safe_mode or not isinstance(self.reuse, PrefixReuse):
            return None
        return max(0.0, self._last_canary_s + period - time.monotonic())

    def _run_canary(self) -> None:
        """While idle: restore a freshly computed state and its int8 delta on a free slot (0)
        and compare them with the computed logits; drift above the noise trips safe mode."""
        self._last_canary_s = time.monotonic()
        check = run_self_check(self.model, self.ctx, self.batch, seq_ids=(0, 0), exact=False)
        self._counters["canary_runs_total"] += 1
        if not check.ok:
            self.enter_safe_mode(f"canary: {check.reason}")

    def _refresh_hot_view(self) -> None:
        version = self.reuse.hot_version
        if version != self._hot_view_version:
            self._hot_view = self.reuse.hot_view()  # one reference swap: readers need no lock
            self._hot_view_version = version

    def step(self) -> int:
        """Run one scheduler step; returns the number of sequences it decoded."""
        self._apply_cancels()
        self.reuse.make_room()
        # One at a time: a request admitted now may start computing a prefix that the next
        # waiting one should then wait for (`PrefixReuse.should_wait`).
        while (admitted := self.scheduler.admit_next()) is not None:
            self._start(*admitted)
        chunks = self.scheduler.plan()
        if not chunks:
            return 0
        rows = self._fill_batch(chunks)
        try:
            self._decode_making_room()
        except LlamaError as exc:
            log.error("decode of %d tokens failed: %s", self.batch.n_tokens, exc)
            for chunk in chunks:
                self._fail(chunk.slot, f"decode failed: {exc}")
            return 0
        self._count_step(chunks)
        for chunk, row in zip(chunks, rows, strict=True):
            self._advance(chunk, row)
        return len(chunks)

    def _decode_making_room(self) -> None:
        """Decode the batch; when llama.cpp finds no KV cells for it (fragmentation, a budget
        misjudged), demote every idle prefix and session to the warm tier and try once more."""
        try:
            self.ctx.decode(self.batch)
        except KVCacheFullError:
            if not isinstance(self.reuse, PrefixReuse) or not self.reuse.cache.evict_unused(
                self.kv_cells_total
            ):
                raise
            self.reuse.sync()
            log.warning("KV cache full: idle prefixes and sessions demoted, decode retried")
            self.ctx.decode(self.batch)

    def _start(self, pending: Pending, progress: SeqProgress) -> None:
        req = pending.request
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(32)
        sampler = SamplerChain(
            temperature=req.sampling.temperature,
            top_p=req.sampling.top_p,
            top_k=req.sampling.top_k,
            seed=seed,
        )
        # Tokens whose KV reuse places into the slot need no prefill.
        admission = self.reuse.admit(pending, progress)
        text = IncrementalText(req.stop)
        self._live[progress.slot] = _Live(pending, progress, sampler, text, admission, [])
        self._counters["prompt_tokens_total"] += len(req.prompt_tokens)

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
        if chunk.prefill:
            self.reuse.after_chunk(live.reuse, progress, progress.prompt_tokens)
        if row < 0:
            return  # a prefill chunk that is not the prompt's last
        req = live.pending.request
        logprob = None
        if req.top_logprobs is not None:
            logprob = self._logprob(row, req.top_logprobs)
        token = live.sampler.sample(self.ctx, row)
        if self.model.is_eog(token) and not req.ignore_eos:
            self._finish(chunk.slot, "stop")
            return
        progress.generated_tokens += 1
        live.output_ids.append(token)
        self._counters["generated_tokens_total"] += 1
        piece = self.model.token_to_piece(token)
        text = live.text.push(piece)
        logprobs = ()
        if logprob is not None:
            logprobs = (self._with_token(logprob, token, piece),)
        if text or logprobs:
            live.pending.emit(TextDelta(text, 1, logprobs))
        if live.text.stopped:
            self._finish(chunk.slot, "stop")
        elif progress.generated_tokens >= req.max_tokens:
            self._finish(chunk.slot, "length")
        else:
            progress.pending_token = token

    def _logprob(self, row: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = self.ctx.logits(row)
        shifted = logits - logits.max()
        logp = shifted - np.log(np.exp(shifted).sum())
        top_ids = np.argpartition(-logp, k)[:k] if k > 0 else np.empty(0, dtype=np.int64)
        top_ids = top_ids[np.argsort(-logp[top_ids])]
        return logp, top_ids, logp[top_ids]

    def _with_token(self, computed, token: int, piece: bytes) -> TokenLogprob:
        logp, top_ids, top_lps = computed
        top = tuple(
            (int(t), self.model.token_to_piece(int(t)), float(lp))
            for t, lp in zip(top_ids, top_lps, strict=True)
        )
        return TokenLogprob(token, piece, float(logp[token]), top)

    def _apply_cancels(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for slot, live in list(self._live.items()):
            if live.pending.request.request_id in cancelled:
                self._finish(slot, "cancelled")

    def _release(self, slot: int) -> _Live:
        live = self._live.pop(slot)
        self.scheduler.release(slot)
        self.ctx.seq_remove(slot)
        self.reuse.release(live.reuse)
        live.sampler.close()
        return live

    def _session_key_to_resume(
        self, request: GenerationRequest, blocks: list, sessions: SessionStore | None
    ) -> str | None:
        """The stored session this request continues: by its id, else (auto sessions) the
        deepest of its blocks that ended an earlier conversation's history."""
        if sessions is None:
            return None
        if request.session_id:
            return request.session_id
        if not self.settings.auto_sessions:
            return None
        family = request.family_tokens or 0
        for block in reversed(blocks):
            if block.end_tokens <= family:
                break  # what only the family prefix shares is a prefix hit, not a session
            key = _auto_key(block.key)
            if sessions.holds(key):
                return key
        return None

    def _session_key_to_keep(self, req: GenerationRequest, history: tuple[int, ...]) -> str | None:
        if req.session_id:
            return req.session_id
        if not self.settings.auto_sessions:
            return None
        # Keyed by the history's last whole block: the next turn's prompt repeats the history,
        # so its blocks include this one.
        blocks = self.reuse.blocks_for(history + (0,), req.family_tokens, req.cache_salt)
        if not blocks or blocks[-1].end_tokens <= (req.family_tokens or 0):
            return None  # nothing private beyond the family prefix: not worth keeping
        return _auto_key(blocks[-1].key)

    def _keep(self, slot: int) -> None:
        """Keep a finished conversation: hot while there is room, else as a warm int8 delta."""
        live = self._live[slot]
        req = live.pending.request
        n = live.progress.num_computed_tokens
        history = (req.prompt_tokens + tuple(live.output_ids))[:n]
        key = self._session_key_to_keep(req, history)
        if key is None or n <= live.reuse.prefix_tokens:
            return
        kept = self.reuse.keep_session(
            live.reuse, live.progress, history, req.family_tokens, key, req.cache_salt
        )
        if kept:
            if self.sessions.shared is not None:
                shared, blob = self._private_state(slot)
                self.sessions.park(key, self.fingerprint, history, shared, blob, local=False)
            return
        self._park(slot, key, history)

    def _demote(self, prefix) -> None:
        """An idle session leaves the KV cache (LRU, under pressure): into the warm tier."""
        if prefix.session_key is None or self.sessions is None:
            return
        blob = self.ctx.seq_state(prefix.seq_id)
        self.sessions.park(
            prefix.session_key,
            self.fingerprint,
            prefix.tokens,
            prefix.parent_tokens,
            _private_cells(blob, prefix.parent_tokens),
        )

    def _park(self, slot: int, key: str, history: tuple[int, ...]) -> None:
        shared, blob = self._private_state(slot)
        self.sessions.park(key, self.fingerprint, history, shared, blob)

    def _private_state(self, slot: int) -> tuple[int, _LazyPrivate]:
        """(family prefix tokens, a lazy cut of the slot's state past them)."""
        live = self._live[slot]
        shared, prefix = live.reuse.prefix_tokens, live.reuse.prefix
        if prefix is not None and prefix.session_key is not None:
            shared = prefix.parent_tokens  # a resumed turn: keep all that is not the family's
        return shared, _private_cells(self.ctx.seq_state(slot), shared)

    def _demote_hot_sessions(self) -> None:
        """Park every idle session kept hot (shutdown, scale-down): nothing hot is lost."""
        if self.sessions is None:
            return
        for prefix in self.reuse.cache.hot() if isinstance(self.reuse, PrefixReuse) else ():
            if prefix.session_key is not None and not prefix.superseded:
                try:
                    self._demote(prefix)
                except Exception:
                    log.exception("could not demote session %s", prefix.session_key)

    def _finish(self, slot: int, reason: FinishReason) -> None:
        if reason != "cancelled" and self.sessions is not None:
            try:
                self._keep(slot)
            except Exception:  # keeping a session is an optimisation, never a failure
                log.exception("could not keep the session of slot %d", slot)
        live = self._release(slot)
        progress = live.progress
        usage = Usage(
            len(progress.prompt_tokens), progress.generated_tokens, live.reuse.cached_tokens
        )
        tail = live.text.finish() if reason != "cancelled" else ""
        adm = live.reuse
        live.pending.emit(
            Finished(
                reason, usage, tail, self.stats(), adm.restore_s, adm.resume_s, adm.resume_tier
            )
        )

    def _fail(self, slot: int, message: str) -> None:
        if slot not in self._live:
            return
        live = self._release(slot)
        live.pending.emit(Rejected(500, "engine_error", message, stats=self.stats()))


def _auto_key(block_key: int) -> str:
    return f"{AUTO_SESSION_PREFIX}{block_key:016x}"


def _private_cells(blob: bytes, prefix_tokens: int):
    """The part of a sequence state that is the session's own: cells at or after the prefix."""
    if prefix_tokens == 0:
        return blob
    return _LazyPrivate(blob, prefix_tokens)


class _LazyPrivate:
    """Defers cutting the prefix cells out to the session store's worker thread."""

    def __init__(self, blob: bytes, prefix_tokens: int):
        self.blob, self.prefix_tokens = blob, prefix_tokens

    def __bytes__(self) -> bytes:
        return build_seq_state(cells_from(parse_seq_state(self.blob), self.prefix_tokens))


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
