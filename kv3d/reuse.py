"""Prefix reuse policy: what each admitted sequence takes from cache, and what a miss leaves.

On admission a prompt's blocks are matched against the replica's hot prefixes; on a hit the
matched cells are shared into the sequence and prefill starts after them. Otherwise a snapshot
fetched from the object store for this request (if any) is verified and restored as a new hot
prefix. On a full miss the prompt's registration prefix (its family prefix, else its whole
blocks) is prefilled as its own chunk, then kept hot and published as a snapshot. The engine
calls this object from its step thread only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kv3d.llama import LlamaContext
from kv3d.prefix import (
    Block,
    HotPrefix,
    PrefixCache,
    PrefixMatch,
    block_seed,
    cut_points,
    reusable_blocks,
)
from kv3d.routing import ReplicaView
from kv3d.scheduler import Pending, Scheduler, SeqProgress
from kv3d.snapshot import SnapshotError, SnapshotMeta, decode_snapshot, encode_snapshot
from kv3d.statefmt import SeqState, parse_seq_state

log = logging.getLogger(__name__)

Publish = Callable[[SnapshotMeta, bytes], None]  # (what it is, the encoded snapshot)


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
    restore_s: float | None = None
    resume_s: float | None = None  # a stored session was resumed (fetch + decode + restore)
    resume_tier: str | None = None
    # A stored session waiting for its family prefix to be recomputed (after a restart).
    deferred_session: object | None = None


def check_prefix_state(state: SeqState, n_tokens: int) -> None:
    """A prefix's state must hold exactly positions 0…n-1 in its full-attention cache."""
    if not state.sections:
        raise SnapshotError("snapshot state holds no KV cache")
    streams = [s for s in state.sections[0].streams if s.n_cells]
    positions = np.concatenate([s.cell_positions for s in streams]) if streams else np.empty(0)
    if not np.array_equal(np.sort(positions), np.arange(n_tokens)):
        raise SnapshotError(f"snapshot state does not hold positions 0..{n_tokens - 1}")


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    n = min(len(a), len(b), limit)
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


AUTO_SESSION_PREFIX = "auto:"  # sessions detected from their history, keyed by its last block


def same_conversation(kept_key: str, new_key: str) -> bool:
    """Whether a sequence that continued session `kept_key` is the next turn of it. Auto keys
    name a history's last block, so every turn of one auto session has a new key."""
    if kept_key == new_key:
        return True
    return kept_key.startswith(AUTO_SESSION_PREFIX) and new_key.startswith(AUTO_SESSION_PREFIX)


def registration_end(
    block_ends: list[int], family_tokens: int | None, settings: ReuseSettings
) -> int | None:
    """Where a prompt's prefill breaks into two chunks, and the prefix a miss keeps hot: the
    family prefix (what other sessions share), else all whole blocks.

    The break is made with reuse on or off, on a hit or a miss, so that a prompt's numerics never
    depend on the cache (DESIGN.md §3: chunking changes logits).
    """
    ends = block_ends
    if family_tokens is not None:
        ends = [e for e in block_ends if e <= family_tokens]
    if not ends or ends[-1] < settings.min_tokens:
        return None
    return ends[-1]


class PrefixReuse:
    """Invariant: the scheduler's `kv_cells_held` always equals the prefix cache's cells."""

    def __init__(
        self,
        ctx: LlamaContext,
        scheduler: Scheduler,
        holder_seq_ids: list[int],
        settings: ReuseSettings,
        fingerprint: bytes,
        publish: Publish | None = None,
    ):
        self.cache = PrefixCache(ctx, holder_seq_ids)
        self._scheduler = scheduler
        self.settings = settings
        self.fingerprint = fingerprint
        self.publish = publish
        self.counters = dict(
            prefix_lookups_total=0,
            prefix_hits_total=0,
            prefix_tokens_reused_total=0,
            snapshot_restores_total=0,
            snapshot_rejects_total=0,
            snapshots_published_total=0,
            session_restore_failures_total=0,
            state_failures_total=0,
        )
        self.disabled = False
        # Family prefixes being computed right now (key of their last block -> sequences).
        self._in_flight: dict[int, int] = {}

    def blocks_for(
        self, prompt: tuple[int, ...], family_tokens: int | None, cache_salt: str = ""
    ) -> list[Block]:
        seed = block_seed(self.fingerprint, cache_salt)
        return reusable_blocks(prompt, self.settings.block_tokens, seed, family_tokens)

    def hot_tokens(self, blocks: list[Block]) -> int:
        return self.cache.peek(blocks)

    def _blocks(self, pending: Pending) -> list[Block]:
        if pending.blocks is None:
            req = pending.request
            pending.blocks = self.blocks_for(req.prompt_tokens, req.family_tokens, req.cache_salt)
        return pending.blocks

    def hot_view(self) -> ReplicaView:
        """The hot sessions and prefix blocks, for routing (engine thread)."""
        blocks: dict[int, int] = {}
        sessions = set()
        for prefix in self.cache.hot():
            if prefix.session_key is not None and not prefix.superseded:
                sessions.add(prefix.session_key)
            for block in prefix.blocks:
                blocks[block.key] = block.end_tokens
        return ReplicaView(frozenset(sessions), blocks)

    @property
    def hot_version(self) -> int:
        return self.cache.version

    def stats(self) -> dict[str, int]:
        hot = self.cache.hot()
        return {
            **self.counters,
            "hot_prefixes": sum(p.session_key is None for p in hot),
            "hot_idle_sessions": sum(p.session_key is not None for p in hot),
            "hot_prefix_cells": self.cache.cells_held,
        }

    # --- engine hooks -------------------------------------------------------------------------
    def make_room(self) -> None:
        """Evict idle prefixes when the next waiting request lacks cells."""
        short = self._scheduler.cells_short_for_head()
        if short > 0 and self.cache.evict_unused(short):
            self._sync()

    def cells_already_hot(self, pending: Pending) -> int:
        """Prompt cells a hot prefix will provide: the scheduler does not reserve them."""
        return self.cache.peek(self._blocks(pending))

    def should_wait(self, pending: Pending) -> bool:
        """Whether a waiting request should let another sequence finish computing its prefix
        first: a burst of one new family then prefills the family once, not once per request."""
        if self.disabled or not self._in_flight or pending.snapshot is not None:
            return False
        if pending.session is not None:
            return False
        blocks = self._blocks(pending)
        hot = self.cache.peek(blocks)
        return any(b.key in self._in_flight and b.end_tokens > hot for b in blocks)

    def admit(self, pending: Pending, progress: SeqProgress) -> Admission:
        admission = self._admit(pending, progress)
        if admission.register_blocks:
            key = admission.register_blocks[-1].key
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        # Cells shared from a hot prefix belong to it, not to this sequence; the scheduler left
        # out what it expected to share (`cells_discount`): settle the difference.
        self._scheduler.unreserve(progress, admission.prefix_tokens - progress.cells_discount)
        return admission

    def disable(self) -> None:
        """Safe mode: admit every request as plain inference, keep and publish nothing."""
        self.disabled = True
        self.publish = None

    @property
    def state_failures(self) -> int:
        return self.counters["state_failures_total"]

    def _admit(self, pending: Pending, progress: SeqProgress) -> Admission:
        req = pending.request
        if self.disabled:
            return Admission()
        self.counters["prefix_lookups_total"] += 1
        blocks = self._blocks(pending)
        if not blocks:
            return Admission()
        match = self.cache.match(blocks, req.prompt_tokens)
        # A session still hot here beats any stored copy of it (exact cells, nothing to fetch).
        if pending.session is not None and (match is None or match.prefix.session_key is None):
            resumed = self._resume(
                pending.session.result(), req.prompt_tokens, blocks, progress, pending.snapshot
            )
            if resumed is not None:
                return resumed
            match = self.cache.match(blocks, req.prompt_tokens)  # a restore may have added one
        restore_s = None
        if match is None and pending.snapshot is not None:
            match, restore_s = self._restore(pending.snapshot, req.prompt_tokens)
        if match is not None:
            self.cache.attach(match, progress.slot)
            progress.num_computed_tokens = match.n_tokens
            self.counters["prefix_hits_total"] += 1
            self.counters["prefix_tokens_reused_total"] += match.n_tokens
            return Admission(match.n_tokens, match.prefix, match.n_tokens, restore_s=restore_s)
        return self._plan_registration(blocks, req.family_tokens, progress)

    def after_chunk(self, admission: Admission, progress: SeqProgress, prompt: tuple) -> None:
        """Keep the registration prefix hot once its last chunk is in the cache (and put a
        deferred session back on top of it)."""
        blocks = admission.register_blocks
        if not blocks or progress.num_computed_tokens < blocks[-1].end_tokens:
            return
        self._register(admission, progress, prompt, blocks)
        if admission.deferred_session is not None:
            self._resume_deferred(admission, progress, prompt)

    def _register(
        self, admission: Admission, progress: SeqProgress, prompt: tuple, blocks: tuple[Block, ...]
    ) -> None:
        n = blocks[-1].end_tokens
        self._done_registering(admission)
        progress.chunk_stop = None
        if not self.cache.free_a_holder():
            return  # every hot prefix is in use: this one stays private to its sequence
        prefix = self.cache.register_from(progress.slot, prompt[:n], blocks)
        self._scheduler.unreserve(progress, n)
        self._sync()
        admission.prefix = prefix
        admission.prefix_tokens = n
        if self.publish and n >= self.settings.snapshot_min_tokens:
            self._publish(prefix)

    def release(self, admission: Admission) -> None:
        self._done_registering(admission)  # ended before its prefix was computed
        if admission.prefix is not None:
            self.cache.release(admission.prefix)
            self._sync()  # a superseded session turn may have gone with its last user

    def _done_registering(self, admission: Admission) -> None:
        if not admission.register_blocks:
            return
        key = admission.register_blocks[-1].key
        admission.register_blocks = ()
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def keep_session(
        self,
        admission: Admission,
        progress: SeqProgress,
        history: tuple[int, ...],
        family_tokens: int | None,
        key: str,
        cache_salt: str = "",
    ) -> bool:
        """Keep a finished sequence's history hot as an idle session (its whole blocks), so the
        next turn shares its cells. False when there is nothing private to keep or no room."""
        if self.disabled:
            return False
        blocks = self.blocks_for(history + (0,), family_tokens, cache_salt)
        parent, shared = admission.prefix, admission.prefix_tokens
        if parent is not None and parent.session_key is not None:
            if same_conversation(parent.session_key, key):
                # A resumed turn: the new history replaces the old one (kept hot here or
                # parked warm by the caller); the old one goes with its last user.
                parent.superseded = True
            # Either way the new session hangs off the family prefix, not off another session.
            parent, shared = parent.parent, parent.parent_tokens
        if not blocks or blocks[-1].end_tokens <= shared:
            return False
        if not self.cache.free_a_holder():
            return False
        end = blocks[-1].end_tokens
        session = self.cache.keep_session(progress.slot, history[:end], blocks, key, parent, shared)
        # The kept cells leave the sequence's reservation: the session owns them now.
        self._scheduler.unreserve(progress, session.owned_cells)
        self._sync()
        return True

    # --- internals ------------------------------------------------------------------------------
    def _plan_registration(
        self, blocks: list[Block], family_tokens: int | None, progress: SeqProgress
    ) -> Admission:
        end = registration_end([b.end_tokens for b in blocks], family_tokens, self.settings)
        if end is None:
            return Admission()
        progress.chunk_stop = end
        return Admission(register_blocks=tuple(b for b in blocks if b.end_tokens <= end))

    def _restore(self, raw, prompt: tuple[int, ...]) -> tuple[PrefixMatch | None, float | None]:
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
            prefix = self.cache.restore(snap.state, snap.tokens, snap.blocks)
        except (ValueError, RuntimeError) as exc:
            # Intact bytes that llama.cpp or the parser refuse: the state format is suspect.
            self.counters["snapshot_rejects_total"] += 1
            self.counters["state_failures_total"] += 1
            log.warning("snapshot state not restorable, recomputing: %s", exc)
            return None, None
        self._sync()
        self.counters["snapshot_restores_total"] += 1
        return PrefixMatch(prefix, n), time.perf_counter() - started

    def _resume(
        self,
        resumable,
        prompt: tuple[int, ...],
        blocks: list[Block],
        progress: SeqProgress,
        snapshot=None,
    ) -> Admission | None:
        """Put a stored session's cells back: its private delta restored into the slot, its
        family prefix shared back from the hot prefix (restored from `snapshot` first when it
        is not hot here). None when it cannot be done exactly."""
        if resumable is None:
            return None
        started = time.perf_counter()
        record = resumable.record
        common = _common_prefix(record.tokens, prompt, len(prompt) - 1)
        p = record.prefix_tokens
        if record.fingerprint != self.fingerprint or common <= p:
            return None
        match = None
        if p > 0:
            hot = self.cache.match(blocks, prompt)
            if (hot is None or hot.n_tokens < p) and snapshot is not None:
                restored, _ = self._restore(snapshot, prompt)
                hot = restored if restored is not None else hot
            if hot is None or hot.n_tokens < p:
                return self._defer(resumable, blocks, progress)
            match = PrefixMatch(hot.prefix, p)
        ctx = self.cache.ctx
        try:
            ctx.set_seq_state(progress.slot, resumable.blob)
            if ctx.seq_pos_max(progress.slot) != len(record.tokens) - 1:
                raise ValueError("restored session does not end where its history does")
        except (ValueError, RuntimeError) as exc:
            ctx.seq_remove(progress.slot)
            self.counters["session_restore_failures_total"] += 1
            self.counters["state_failures_total"] += 1
            log.warning("session not restored, recomputing: %s", exc)
            return None
        if match is not None:
            self.cache.attach(match, progress.slot)
        if common < len(record.tokens):
            ctx.seq_remove(progress.slot, common, -1)  # the history diverged: drop the rest
        progress.num_computed_tokens = common
        resume_s = resumable.decode_s + time.perf_counter() - started
        return Admission(
            common,
            match.prefix if match else None,
            p,
            resume_s=resume_s,
            resume_tier=resumable.tier,
        )

    def _defer(self, resumable, blocks: list[Block], progress: SeqProgress) -> Admission | None:
        """The session's family prefix is not hot (a restart, an eviction): prefill it as a
        miss would, then restore the session's delta on top (`after_chunk`)."""
        p = resumable.record.prefix_tokens
        register = tuple(b for b in blocks if b.end_tokens <= p)
        if not register or register[-1].end_tokens != p:
            return None
        progress.chunk_stop = p
        return Admission(register_blocks=register, deferred_session=resumable)

    def _resume_deferred(self, admission: Admission, progress: SeqProgress, prompt) -> None:
        resumable, admission.deferred_session = admission.deferred_session, None
        started = time.perf_counter()
        record = resumable.record
        p = record.prefix_tokens
        if admission.prefix is None or admission.prefix_tokens != p:
            return  # the prefix could not be kept hot: its cells stay private, no delta
        common = _common_prefix(record.tokens, prompt, len(prompt) - 1)
        ctx = self.cache.ctx
        try:
            ctx.set_seq_state(progress.slot, resumable.blob)  # replaces the slot's cells
            if ctx.seq_pos_max(progress.slot) != len(record.tokens) - 1:
                raise ValueError("restored session does not end where its history does")
        except (ValueError, RuntimeError) as exc:
            self.counters["session_restore_failures_total"] += 1
            self.counters["state_failures_total"] += 1
            log.warning("session not restored after its prefix, recomputing: %s", exc)
            ctx.seq_remove(progress.slot)
            ctx.seq_copy(admission.prefix.seq_id, progress.slot, 0, p)
            return
        ctx.seq_copy(admission.prefix.seq_id, progress.slot, 0, p)
        if common < len(record.tokens):
            ctx.seq_remove(progress.slot, common, -1)
        progress.num_computed_tokens = common
        admission.cached_tokens = common - p
        admission.resume_s = resumable.decode_s + time.perf_counter() - started
        admission.resume_tier = resumable.tier

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
            )
            self.publish(meta, blob)
            self.counters["snapshots_published_total"] += 1
        except Exception:  # publishing is an optimisation: never fail the request for it
            log.exception("could not publish the snapshot of prefix %016x", prefix.key)

    def sync(self) -> None:
        """After evicting from `cache` directly: settle the scheduler's held cells."""
        self._sync()

    def _sync(self) -> None:
        self._scheduler.kv_cells_held = self.cache.cells_held


class NoReuse:
    """Reuse turned off (`prefix.enabled = false`): every prompt is prefilled in full, in the
    same chunks as with reuse on."""

    def __init__(self, settings: ReuseSettings):
        self.settings = settings

    def blocks_for(
        self, prompt: tuple[int, ...], family_tokens: int | None, cache_salt: str = ""
    ) -> list[Block]:
        return []

    def hot_tokens(self, blocks: list[Block]) -> int:
        return 0

    def hot_view(self) -> ReplicaView:
        return ReplicaView()

    state_failures = 0

    def disable(self) -> None:
        pass

    hot_version = 0

    def stats(self) -> dict[str, int]:
        return {}

    def make_room(self) -> None:
        pass

    def should_wait(self, pending: Pending) -> bool:
        return False

    def admit(self, pending: Pending, progress: SeqProgress) -> Admission:
        req = pending.request
        usable = len(req.prompt_tokens) - 1
        family = req.family_tokens if req.family_tokens and req.family_tokens <= usable else None
        ends = cut_points(usable, self.settings.block_tokens, family)
        progress.chunk_stop = registration_end(ends, family, self.settings)
        return Admission()

    def after_chunk(self, admission: Admission, progress: SeqProgress, prompt: tuple) -> None:
        pass

    def release(self, admission: Admission) -> None:
        pass

    def keep_session(self, *args) -> bool:
        return False
