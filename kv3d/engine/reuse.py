"""Prefix reuse: what an admitted sequence takes from cache, and what a miss leaves behind.

On admission a prompt's blocks are matched against the replica's hot prefixes; on a hit the
matched cells are shared into the sequence and prefill starts after them. Otherwise a snapshot
fetched from the object store for this request (if any) is verified and restored as a new hot
prefix. On a full miss the prompt's registration prefix (its family prefix, else its whole
blocks) is prefilled as its own chunk, then kept hot and published as a snapshot. Sessions
(`kv3d.engine.sessions`) build on this: a session is a family prefix plus a private delta.

`NoReuse` is the null object for `prefix.enabled = false` and safe mode. The engine calls both
from its step thread only, except the methods marked "any thread".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kv3d.engine.budget import KVBudget
from kv3d.engine.memory import KVMemory
from kv3d.engine.prefix import (
    Block,
    HotPrefix,
    PrefixCache,
    PrefixMatch,
    block_seed,
    cut_points,
    reusable_blocks,
)
from kv3d.engine.scheduler import Pending, SeqProgress
from kv3d.engine.snapshot import SnapshotError, SnapshotMeta, decode_snapshot, encode_snapshot
from kv3d.engine.statefmt import SeqState, parse_seq_state
from kv3d.engine.view import CacheView

log = logging.getLogger(__name__)

Publish = Callable[[SnapshotMeta, bytes], None]  # (what it is, the encoded snapshot)
# The deepest stored snapshot for these block keys, or None; called on the engine thread, so it
# must answer from memory at once (never a network or object-store round trip).
SnapshotSource = Callable[[list[int]], object | None]


@dataclass(frozen=True, slots=True)
class ReuseSettings:
    block_tokens: int = 32
    min_tokens: int = 8
    snapshots: bool = True
    snapshot_min_tokens: int = 64


@dataclass(slots=True)
class Admission:
    """What reuse did for one sequence."""

    cached_tokens: int = 0
    prefix: HotPrefix | None = None  # the prefix this sequence holds a reference on
    prefix_tokens: int = 0  # cells [0, prefix_tokens) of the sequence are the prefix's
    register_blocks: tuple[Block, ...] = ()  # on a miss: the prefix to keep once prefilled
    tenant: str = ""  # whose prefix register_blocks is (GenerationRequest.tenant)
    restore_s: float | None = None
    resume_s: float | None = None  # a stored session was resumed (fetch + decode + restore)
    resume_tier: str | None = None
    # A stored session waiting for its family prefix to be recomputed (after a restart).
    deferred_session: object | None = None

    @property
    def family_key(self) -> int | None:
        """The key of the family prefix this sequence is computing (None when it computes
        none, or has finished it): what `PrefixReuse.awaited_family` names."""
        return self.register_blocks[-1].key if self.register_blocks else None


def check_prefix_state(state: SeqState, n_tokens: int) -> None:
    """A prefix's state must hold exactly positions 0…n-1 in its full-attention cache."""
    if not state.sections:
        raise SnapshotError("snapshot state holds no KV cache")
    streams = [s for s in state.sections[0].streams if s.n_cells]
    positions = np.concatenate([s.cell_positions for s in streams]) if streams else np.empty(0)
    if not np.array_equal(np.sort(positions), np.arange(n_tokens)):
        raise SnapshotError(f"snapshot state does not hold positions 0..{n_tokens - 1}")


def registration_end(
    block_ends: list[int], family_tokens: int | None, settings: ReuseSettings
) -> int | None:
    """Where a prompt's prefill breaks into two chunks, and the prefix a miss keeps hot: the
    family prefix (what other sessions share), else all whole blocks.

    The break is made with reuse on or off, on a hit or a miss, so that a prompt's numerics never
    depend on the cache (the same tokens decoded in other chunks give other logits).
    """
    ends = block_ends
    if family_tokens is not None:
        ends = [e for e in block_ends if e <= family_tokens]
    if not ends or ends[-1] < settings.min_tokens:
        return None
    return ends[-1]


class PrefixReuse:
    """Prefix admission, snapshot restore and publish, and the families being computed.

    Invariants: a sequence holds at most one prefix reference, on `Admission.prefix`, dropped by
    `release`; `_in_flight` counts, per registration prefix, the running sequences computing it;
    every cell the cache holds is counted in the `KVBudget` by the cache itself.
    """

    def __init__(
        self,
        ctx: KVMemory,
        budget: KVBudget,
        holder_seq_ids: list[int],
        settings: ReuseSettings,
        fingerprint: bytes,
        publish: Publish | None = None,
    ):
        self.cache = PrefixCache(ctx, holder_seq_ids, budget)
        self.budget = budget
        self.settings = settings
        self.fingerprint = fingerprint
        self.publish = publish
        # A store of snapshots readable on the engine thread (a RAM catalog): see `late_snapshot`.
        self.snapshot_source: SnapshotSource | None = None
        self.counters = dict(
            prefix_lookups_total=0,
            prefix_hits_total=0,
            prefix_tokens_reused_total=0,
            snapshot_restores_total=0,
            snapshot_rejects_total=0,
            snapshots_published_total=0,
            session_restore_failures_total=0,
            state_failures_total=0,
            state_restores_without_room_total=0,
        )
        # Family prefixes being computed right now (key of their last block -> sequences).
        self._in_flight: dict[int, int] = {}
        self._retired = False

    # --- any thread -------------------------------------------------------------------------
    def blocks_for(
        self, prompt: tuple[int, ...], family_tokens: int | None, cache_salt: str = ""
    ) -> list[Block]:
        seed = block_seed(self.fingerprint, cache_salt)
        return reusable_blocks(prompt, self.settings.block_tokens, seed, family_tokens)

    def hot_tokens(self, blocks: list[Block]) -> int:
        """How many of the blocks' tokens are hot (by key alone: a hint)."""
        return self.cache.peek(blocks)

    # --- engine thread: figures -------------------------------------------------------------
    def hot_view(self) -> CacheView:
        """The hot sessions and prefix blocks, for routing."""
        blocks: dict[int, int] = {}
        sessions = set()
        for prefix in self.cache.hot():
            if prefix.session_key is not None and not prefix.superseded:
                sessions.add(prefix.session_key)
            for block in prefix.blocks:
                blocks[block.key] = block.end_tokens
        return CacheView(frozenset(sessions), blocks)

    @property
    def hot_version(self) -> int:
        return self.cache.version

    @property
    def state_failures(self) -> int:
        return self.counters["state_failures_total"]

    def count_state_failure(self, exc: Exception, cells: int) -> None:
        """Intact bytes (`cells` of them) that the parser or llama.cpp refused. The parser's
        refusal (ValueError), or llama.cpp's while at least half the cache was free, is evidence
        of a state format KV3D does not read right (toward safe mode). llama.cpp's refusal in a
        busy cache is most likely no room (it needs one contiguous run of cells): idle prefixes
        are evicted and the request recomputes."""
        busy = self.budget.used_cells + cells > self.budget.total_cells // 2
        if not isinstance(exc, ValueError) and busy:
            self.counters["state_restores_without_room_total"] += 1
            self.cache.evict_unused(cells)
            return
        self.counters["state_failures_total"] += 1

    def stats(self) -> dict[str, int]:
        hot = self.cache.hot()
        return {
            **self.counters,
            "hot_prefixes": sum(p.session_key is None for p in hot),
            "hot_idle_sessions": sum(p.session_key is not None for p in hot),
            "hot_prefix_cells": self.cache.cells_held,
        }

    # --- engine thread: admission -----------------------------------------------------------
    def blocks_of(self, pending: Pending) -> list[Block]:
        """The request's blocks, hashed once (at submit, or here)."""
        if pending.blocks is None:
            req = pending.request
            pending.blocks = self.blocks_for(req.prompt_tokens, req.family_tokens, req.cache_salt)
        return pending.blocks

    def cells_already_hot(self, pending: Pending) -> int:
        """Prompt cells a hot prefix holds for this request (token-checked), which `admit`
        shares into it: the budget need not reserve them."""
        match = self.match(pending)
        return match.n_tokens if match is not None else 0

    def make_room(self, cells: int) -> None:
        """Evict idle prefixes until a request needing `cells` more cells fits."""
        short = self.budget.shortfall(cells)
        if short > 0:
            self.cache.evict_unused(short)

    def evict_idle(self) -> bool:
        """Evict every idle prefix and session (the cache is full); whether any went."""
        return self.cache.evict_unused(self.budget.total_cells) > 0

    def awaited_family(self, pending: Pending) -> int | None:
        """The key of the family prefix (its last block) that another sequence is computing
        and that `pending` should wait for, letting that sequence finish it first (a burst of
        one new family then prefills the family once, not once per request); None when it
        need not wait."""
        if not self._in_flight or pending.snapshot is not None or pending.resuming:
            return None
        blocks = self.blocks_of(pending)
        hot = self.cache.peek(blocks)
        for b in blocks:
            if b.key in self._in_flight and b.end_tokens > hot:
                return b.key
        return None

    def late_snapshot(self, pending: Pending) -> None:
        """Look up a snapshot for `pending` at admission, when it came without one: its family
        prefix was hot when it was submitted (so nobody fetched one) and was evicted while it
        waited. Without this, a burst that overflows the cache recomputes whole families."""
        if pending.snapshot is not None or self.snapshot_source is None:
            return
        min_tokens = self.settings.snapshot_min_tokens
        keys = [b.key for b in self.blocks_of(pending) if b.end_tokens >= min_tokens]
        if keys:
            pending.snapshot = self.snapshot_source(keys)

    def match(self, pending: Pending) -> PrefixMatch | None:
        req = pending.request
        return self.cache.match(self.blocks_of(pending), req.prompt_tokens, req.session_id)

    def admit(self, pending: Pending, progress: SeqProgress) -> Admission:
        """Share a hot prefix, else restore the request's snapshot, else plan to register the
        prompt's prefix once it is computed."""
        blocks = self.blocks_of(pending)
        if not blocks:
            return Admission()
        match = self.match(pending)
        restore_s = None
        if match is None:
            self.late_snapshot(pending)
        if match is None and pending.snapshot is not None:
            match, restore_s = self.restore_snapshot(
                pending.snapshot, pending.request.prompt_tokens, pending.request.tenant
            )
        if match is not None:
            self.counters["prefix_hits_total"] += 1
            self.counters["prefix_tokens_reused_total"] += match.n_tokens
            progress.num_computed_tokens = match.n_tokens
            admission = self.share(match, progress)
            admission.restore_s = restore_s
            return admission
        return self.plan_registration(
            blocks, pending.request.family_tokens, progress, pending.request.tenant
        )

    def share(self, match: PrefixMatch, progress: SeqProgress) -> Admission:
        """Put a hot prefix's cells into the sequence (no copy) and hold a reference on it."""
        self.cache.attach(match, progress.slot)
        return Admission(match.n_tokens, match.prefix, match.n_tokens)

    def plan_registration(
        self,
        blocks: list[Block],
        family_tokens: int | None,
        progress: SeqProgress,
        tenant: str = "",
    ) -> Admission:
        end = registration_end([b.end_tokens for b in blocks], family_tokens, self.settings)
        if end is None:
            return Admission()
        progress.chunk_stop = end
        register = tuple(b for b in blocks if b.end_tokens <= end)
        return Admission(register_blocks=register, tenant=tenant)

    def begin(self, admission: Admission, progress: SeqProgress) -> None:
        """Settle a new sequence with the budget and track the family it computes (every
        admission, whether a session resume or `admit` made it)."""
        self.counters["prefix_lookups_total"] += 1
        key = admission.family_key
        if key is not None:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        # The budget left out the cells the scheduler expected a hot prefix to provide; the
        # prefix actually shared may differ (a restored snapshot: more; a resume: less).
        extra = admission.prefix_tokens - progress.shared_cells_expected
        if extra >= 0:
            self.budget.unreserve(progress.slot, extra)
            return
        short = self.budget.shortfall(-extra)
        if short > 0:
            self.cache.evict_unused(short)
        self.budget.reserve_more(progress.slot, -extra)

    def restore_snapshot(
        self, raw, prompt: tuple[int, ...], tenant: str = ""
    ) -> tuple[PrefixMatch | None, float | None]:
        """Verify a snapshot fetched for this prompt and restore it as a hot prefix (of
        `tenant`, the requester: block keys are salted per tenant); (None, None) when it does
        not apply or fails (recompute)."""
        started = time.perf_counter()
        try:
            snap = decode_snapshot(raw, self.fingerprint)
            n = snap.meta.n_tokens
            if snap.tokens != tuple(prompt[:n]) or n >= len(prompt):
                raise SnapshotError("snapshot tokens do not prefix this prompt")
        except SnapshotError as exc:  # damaged, another model's, or another prompt's
            self.counters["snapshot_rejects_total"] += 1
            log.warning("snapshot not applied, recomputing: %s", exc)
            return None, None
        try:
            check_prefix_state(parse_seq_state(snap.state), n)
            if not self.cache.free_a_holder():
                return None, None
            prefix = self.cache.restore(snap.state, snap.tokens, snap.blocks, tenant)
        except (ValueError, RuntimeError) as exc:
            self.counters["snapshot_rejects_total"] += 1
            self.count_state_failure(exc, n)
            log.warning("snapshot state not restorable, recomputing: %s", exc)
            return None, None
        self.counters["snapshot_restores_total"] += 1
        return PrefixMatch(prefix, n), time.perf_counter() - started

    # --- engine thread: progress and release ------------------------------------------------
    def after_chunk(self, admission: Admission, progress: SeqProgress) -> bool:
        """Keep the registration prefix hot once its last chunk is in the cache; True when
        that just happened (a deferred session may now go on top of it)."""
        blocks = admission.register_blocks
        if not blocks or progress.num_computed_tokens < blocks[-1].end_tokens:
            return False
        self._register(admission, progress, blocks)
        return True

    def _register(
        self, admission: Admission, progress: SeqProgress, blocks: tuple[Block, ...]
    ) -> None:
        n = blocks[-1].end_tokens
        self._done_registering(admission)
        progress.chunk_stop = None
        if not self.cache.free_a_holder():
            return  # every hot prefix is in use: this one stays private to its sequence
        # The cells move from the sequence's reservation to the prefix (order: never over).
        self.budget.unreserve(progress.slot, n)
        prefix = self.cache.register_from(
            progress.slot, progress.prompt_tokens[:n], blocks, admission.tenant
        )
        admission.prefix = prefix
        admission.prefix_tokens = n
        if self.publish and n >= self.settings.snapshot_min_tokens:
            self._publish(prefix)

    def release(self, admission: Admission) -> None:
        self._done_registering(admission)  # ended before its prefix was computed
        if admission.prefix is not None:
            self.cache.release(admission.prefix)
        if self._retired:
            self.cache.evict_unused(self.budget.total_cells)

    def set_publish(self, publish: Publish | None) -> None:
        self.publish = publish

    def set_snapshot_source(self, source: SnapshotSource | None) -> None:
        self.snapshot_source = source

    def check_invariants(self) -> None:
        self.cache.check_invariants()
        assert all(n > 0 for n in self._in_flight.values()), "a family computed by nobody"

    def retire(self) -> None:
        """Safe mode: this object admits nothing more (the engine swaps in `NoReuse`); idle
        prefixes go now, and each one still in use goes with its last sequence's release."""
        self._retired = True
        self.publish = None
        self.cache.on_evict = None  # suspect state is not kept as sessions either
        self.cache.evict_unused(self.budget.total_cells)

    def _done_registering(self, admission: Admission) -> None:
        key = admission.family_key
        if key is None:
            return
        admission.register_blocks = ()
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def _publish(self, prefix: HotPrefix) -> None:
        try:
            state = self.cache.export_state(prefix)
            blob = encode_snapshot(
                prefix.key, self.fingerprint, prefix.tokens, prefix.blocks, state
            )
            meta = SnapshotMeta(
                prefix.key,
                self.fingerprint,
                prefix.n_tokens,
                len(state),
                tuple(b.key for b in prefix.blocks),
                prefix.tenant,
            )
            self.publish(meta, blob)
            prefix.restorable = True
            self.counters["snapshots_published_total"] += 1
        except Exception:  # publishing is an optimisation: never fail the request for it
            log.exception("could not publish the snapshot of prefix %016x", prefix.key)


class NoReuse:
    """Reuse turned off (`prefix.enabled = false`, or safe mode): every prompt is prefilled in
    full, in the same chunks as with reuse on, and nothing is kept or published."""

    state_failures = 0
    hot_version = 0

    def __init__(self, settings: ReuseSettings):
        self.settings = settings

    def blocks_for(
        self, prompt: tuple[int, ...], family_tokens: int | None, cache_salt: str = ""
    ) -> list[Block]:
        return []

    def hot_tokens(self, blocks: list[Block]) -> int:
        return 0

    def hot_view(self) -> CacheView:
        return CacheView()

    def stats(self) -> dict[str, int]:
        return {}

    def cells_already_hot(self, pending: Pending) -> int:
        return 0

    def make_room(self, cells: int) -> None:
        pass

    def evict_idle(self) -> bool:
        return False

    def awaited_family(self, pending: Pending) -> int | None:
        return None

    def admit(self, pending: Pending, progress: SeqProgress) -> Admission:
        req = pending.request
        usable = len(req.prompt_tokens) - 1
        family = req.family_tokens if req.family_tokens and req.family_tokens <= usable else None
        ends = cut_points(usable, self.settings.block_tokens, family)
        progress.chunk_stop = registration_end(ends, family, self.settings)
        return Admission()

    def begin(self, admission: Admission, progress: SeqProgress) -> None:
        pass

    def after_chunk(self, admission: Admission, progress: SeqProgress) -> bool:
        return False

    def release(self, admission: Admission) -> None:
        pass

    def set_publish(self, publish: Publish | None) -> None:
        pass

    def set_snapshot_source(self, source: SnapshotSource | None) -> None:
        pass

    def check_invariants(self) -> None:
        pass

    def retire(self) -> None:
        pass
