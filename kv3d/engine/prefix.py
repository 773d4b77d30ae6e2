"""Exact-prefix detection and the replica's hot prefixes.

Identity: a prompt is cut into blocks of `block_tokens`; a block also ends exactly at the
family boundary (the end of the system/developer messages) so that a family's prefix is one chain
whatever its length. Each block's key is a chained 64-bit hash over (parent key, block tokens),
seeded by the model fingerprint, so a key never matches across models or cache layouts. A hit is
confirmed by comparing tokens: a hash collision costs a miss, never wrong KV.

Reuse: a hot prefix's KV cells belong to a holder sequence of the llama.cpp context; a session
that shares it gets the cells added to its own sequence (`seq_cp` in a unified cache: no copy).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kv3d.engine.budget import KVBudget
from kv3d.engine.memory import KVMemory, load_cells

log = logging.getLogger(__name__)

KEY_BYTES = 8


@dataclass(frozen=True, slots=True)
class Block:
    key: int  # chained hash of every token up to `end_tokens`
    end_tokens: int


def cut_points(n_tokens: int, block_tokens: int, boundary: int | None = None) -> list[int]:
    """Block ends for `n_tokens` tokens: every `block_tokens`, restarting at `boundary`.

    Only whole blocks are listed (a tail shorter than a block has no key: it is never found by
    itself, only shared token by token beyond a prefix its blocks or session id found), except
    that the block ending at `boundary` may be short.
    """
    ends: list[int] = []
    start = 0
    if boundary is not None and 0 < boundary <= n_tokens:
        ends.extend(range(block_tokens, boundary, block_tokens))
        ends.append(boundary)
        start = boundary
    ends.extend(range(start + block_tokens, n_tokens + 1, block_tokens))
    return ends


def chain_blocks(
    tokens: Sequence[int], block_tokens: int, seed: bytes, boundary: int | None = None
) -> list[Block]:
    """The chained block keys of `tokens` (see `cut_points`)."""
    data = np.asarray(tokens, dtype="<i4").tobytes()
    parent = hashlib.blake2b(seed, digest_size=KEY_BYTES).digest()
    blocks, start = [], 0
    for end in cut_points(len(tokens), block_tokens, boundary):
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
        h.update(data[4 * start : 4 * end])
        parent = h.digest()
        blocks.append(Block(int.from_bytes(parent, "little"), end))
        start = end
    return blocks


def common_prefix_tokens(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def block_seed(fingerprint: bytes, cache_salt: str = "") -> bytes:
    """The chain's seed: the model fingerprint, mixed with a cache salt when there is one, so
    that requests under different salts (tenants) never share a block key."""
    if not cache_salt:
        return fingerprint
    return hashlib.blake2b(
        fingerprint + b"|salt|" + cache_salt.encode("utf-8"), digest_size=16
    ).digest()


def reusable_blocks(
    prompt: Sequence[int], block_tokens: int, seed: bytes, boundary: int | None
) -> list[Block]:
    """Blocks of the part of `prompt` that may come from cache: all but its last token, whose
    logits pick the first generated token."""
    usable = prompt[: len(prompt) - 1]
    if boundary is not None and boundary > len(usable):
        boundary = None
    return chain_blocks(usable, block_tokens, seed, boundary)


@dataclass(slots=True, eq=False)  # identity: two hot prefixes are never the same one
class HotPrefix:
    key: int  # key of its last block: the family id
    tokens: tuple[int, ...]
    seq_id: int  # the holder sequence that owns its cells
    blocks: tuple[Block, ...]
    refs: int = 0  # running sequences whose cells include it, and child prefixes it pins
    hits: int = 0
    last_used_s: float = field(default_factory=time.monotonic)
    # An idle session kept hot is a child of the family prefix it shares [0, parent_tokens)
    # with: it owns only the cells after, and pins its parent while it lives.
    parent: HotPrefix | None = None
    parent_tokens: int = 0
    session_key: str | None = None
    superseded: bool = False  # a newer turn of the same session replaced it
    # A family prefix whose snapshot is in the catalog (published, or restored from it): once
    # evicted, its next request restores it instead of computing it again.
    restorable: bool = False
    tenant: str = ""  # who the prefix belongs to (GenerationRequest.tenant), for figures only
    idle_mark: float = 0.0  # the idle clock's reading when it last became unreferenced
    # An idle session also keeps the logits its request got at the end of its prompt (the
    # first `logits_at` tokens): a repeat of that prompt shares every cell and samples from
    # them, computing nothing, and so starts from the very logits the first request had.
    logits: np.ndarray | None = None
    logits_at: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def owned_cells(self) -> int:
        return self.n_tokens - self.parent_tokens


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    prefix: HotPrefix
    n_tokens: int  # how much of the prefix the prompt shares (token-checked)


class PrefixCache:
    """The hot prefixes of one llama.cpp context.

    Invariants (`check_invariants`): each hot prefix owns one holder sequence id and exactly
    `owned_cells` cells (a child shares the rest with the parent it pins), and the `KVBudget`'s
    held cells are the sum of them (every prefix added or dropped is reported there); a prefix
    with `refs > 0` is never evicted; every key in the block index lists only live prefixes
    that have that block. Eviction order is least recently used among
    prefixes with no references; `on_evict` sees each one before it goes (sessions are demoted
    to the warm tier there). Engine thread only, except `peek`.
    """

    def __init__(self, ctx: KVMemory, holder_seq_ids: Sequence[int], budget: KVBudget):
        self.ctx = ctx
        self.budget = budget
        self._free_holders = list(reversed(holder_seq_ids))
        self._num_holders = len(holder_seq_ids)
        self._by_block: dict[int, list[HotPrefix]] = {}
        self._prefixes: dict[int, HotPrefix] = {}  # by holder seq id
        self._sessions: dict[str, HotPrefix] = {}  # the current hot turn of each session
        self.on_evict: Callable[[HotPrefix], None] | None = None
        # Read when a prefix becomes idle (`HotPrefix.idle_mark`): the idle rent clock.
        self.idle_clock: Callable[[], float] = lambda: 0.0
        self.version = 0  # bumped whenever the set of hot prefixes changes

    # --- lookups --------------------------------------------------------------------------------
    def match(
        self, blocks: Sequence[Block], prompt: Sequence[int], session_key: str | None = None
    ) -> PrefixMatch | None:
        """The hot prefix that shares the most of the prompt, and how much: found by its
        deepest block (or, for an idle session, by `session_key`), then taken token by token
        as far as its cells and the prompt agree, not to the prompt's last token (whose logits
        pick the first generated token) unless the prefix kept the logits of exactly this
        prompt. Past the last whole block counts too: an idle session keeps its whole history,
        so the next turn recomputes only what is new."""
        limit = len(prompt) - 1
        candidates: list[HotPrefix] = []
        for block in blocks:
            end = block.end_tokens
            want = tuple(prompt[:end])
            # Different tokens under the same key would be a hash collision: never reused. An
            # idle session matches only past its family prefix (the cells it owns); sharing just
            # the family is a match of the family prefix itself, so the request does not
            # attach to, and later supersede, an unrelated session.
            found = [
                p
                for p in self._by_block.get(block.key, ())
                if p.tokens[:end] == want and (p.parent is None or end > p.parent_tokens)
            ]
            if not found:
                break
            candidates = found
        session = self._sessions.get(session_key) if session_key else None
        if session is not None and session not in candidates:
            candidates = [*candidates, session]
        # An idle session whose own cells are a tail shorter than a block has no block of its
        # own to be found by: it is found as a child of the prefix the blocks matched, when the
        # prompt goes on past all of its history (its next turn), or repeats the prompt whose
        # logits it kept. Not another conversation that only opens the same way (it would pin
        # the session, and for auto sessions replace it), nor a prompt that stops inside its
        # history: recomputing the rest as the first request did gives the same logits, where
        # sharing cells up to a point the first request computed in one chunk would not.
        continued = [
            p
            for p in self._sessions.values()
            if p.parent in candidates and not p.superseded and p not in candidates
        ]
        best = None
        for prefix in [*candidates, *continued]:
            n = common_prefix_tokens(prefix.tokens, prompt, limit)
            repeat = (
                n == limit
                and prefix.logits is not None
                and prefix.logits_at == len(prompt)
                and prefix.tokens[limit] == prompt[limit]
            )
            if repeat:
                n = len(prompt)  # its first token comes from the kept logits
            if prefix.parent is not None and n <= prefix.parent_tokens:
                continue  # shares no cell the session owns: that is a family prefix hit
            if prefix in continued and n < prefix.n_tokens and not repeat:
                continue
            if n > 0 and (best is None or n > best.n_tokens):
                best = PrefixMatch(prefix, n)
        return best

    def session(self, key: str) -> HotPrefix | None:
        """The current hot turn of session `key`, if it is hot here."""
        prefix = self._sessions.get(key)
        return prefix if prefix is not None and not prefix.superseded else None

    def peek(self, blocks: Sequence[Block]) -> int:
        """Tokens hot for `blocks` by key alone (no token check); safe from any thread."""
        n = 0
        for block in blocks:
            if block.key not in self._by_block:
                break
            n = block.end_tokens
        return n

    # --- references -----------------------------------------------------------------------------
    def attach(self, match: PrefixMatch, slot: int) -> None:
        """Share the matched cells into sequence `slot` and hold a reference for it."""
        self.ctx.seq_copy(match.prefix.seq_id, slot, 0, match.n_tokens)
        self._ref(match.prefix)
        match.prefix.hits += 1

    def release(self, prefix: HotPrefix) -> None:
        prefix.refs -= 1
        prefix.last_used_s = time.monotonic()
        if prefix.refs == 0:
            prefix.idle_mark = self.idle_clock()
            if prefix.superseded:
                self._drop(prefix)  # its cells live on in the newer turn that replaced it

    # --- admission of new prefixes -------------------------------------------------------------
    def register_from(
        self, slot: int, tokens: Sequence[int], blocks: Sequence[Block], tenant: str = ""
    ) -> HotPrefix:
        """Make the first `len(tokens)` cells of `slot` a hot prefix (shared, not copied)."""
        prefix = self._new_prefix(tokens, blocks)
        prefix.tenant = tenant
        self.ctx.seq_copy(slot, prefix.seq_id, 0, len(tokens))
        self._ref(prefix)  # the creating sequence shares its cells
        return prefix

    def keep_session(
        self,
        slot: int,
        tokens: Sequence[int],
        blocks: Sequence[Block],
        key: str,
        parent: HotPrefix | None,
        parent_tokens: int,
        logits: np.ndarray | None = None,
        logits_at: int = 0,
    ) -> HotPrefix:
        """Keep a finished sequence's history hot as an idle session (a child of `parent`),
        with the logits of its request's prompt (`logits_at` tokens) when given."""
        if logits is not None and not 0 < logits_at <= len(tokens):
            raise ValueError(f"logits at token {logits_at} of a {len(tokens)}-token history")
        prefix = self._new_prefix(tokens, blocks, parent, parent_tokens)
        prefix.session_key = key
        if logits is not None:
            prefix.logits, prefix.logits_at = logits, logits_at
        prefix.idle_mark = self.idle_clock()
        self._sessions[key] = prefix  # a newer turn of the conversation replaces the older
        self.ctx.seq_copy(slot, prefix.seq_id, 0, len(tokens))
        if parent is not None:
            self._ref(parent)  # pinned: the child's first cells are the parent's
        return prefix

    def restore(
        self, state, tokens: Sequence[int], blocks: Sequence[Block], tenant: str = ""
    ) -> HotPrefix:
        """Load a snapshot's sequence state as a new hot prefix."""
        prefix = self._new_prefix(tokens, blocks)
        prefix.tenant = tenant
        try:
            load_cells(self.ctx, prefix.seq_id, state, len(tokens))
        except Exception:
            self._drop(prefix)
            raise
        prefix.restorable = True
        return prefix

    def export_state(self, prefix: HotPrefix) -> bytes:
        return self.ctx.seq_state(prefix.seq_id)

    def evict_unused(self, cells_needed: int) -> int:
        """Evict least recently used unreferenced prefixes until `cells_needed` cells are freed
        (or none is left); returns the cells freed. A family prefix that only its evicted idle
        sessions pinned becomes unreferenced on the way, and is considered too."""
        freed = 0
        while freed < cells_needed:
            idle = sorted(
                (p for p in self._prefixes.values() if p.refs == 0), key=lambda p: p.last_used_s
            )
            if not idle:
                break
            for prefix in idle:
                if freed >= cells_needed:
                    break
                if self._prefixes.get(prefix.seq_id) is not prefix:
                    continue  # already gone (a superseded turn dropped with its last user)
                freed += prefix.owned_cells
                self._evict(prefix)
        return freed

    def idle_for_rent(self) -> list[HotPrefix]:
        """What pays idle rent: idle sessions (hot, unreferenced, not superseded) and family
        prefixes that nothing uses or pins and that a snapshot can bring back. Unordered: the
        caller orders them by idle mark once it has read the clock for those idle since the
        last step."""
        sessions = [p for p in self._sessions.values() if p.refs == 0 and not p.superseded]
        families = [
            p
            for p in self._prefixes.values()
            if p.refs == 0 and p.session_key is None and p.restorable
        ]
        return sessions + families

    def evict(self, prefix: HotPrefix) -> None:
        """Evict one unreferenced prefix now (`on_evict` sees it first)."""
        if prefix.refs != 0:
            raise ValueError(f"prefix {prefix.key:016x} is in use: {prefix.refs} references")
        self._evict(prefix)

    def free_a_holder(self) -> bool:
        """Make sure a holder sequence is free, evicting the least recently used idle prefix."""
        if not self._free_holders:
            idle = [p for p in self._prefixes.values() if p.refs == 0]
            if idle:
                self._evict(min(idle, key=lambda p: p.last_used_s))
        return bool(self._free_holders)

    @property
    def cells_held(self) -> int:
        return sum(p.owned_cells for p in self._prefixes.values())

    @property
    def num_hot(self) -> int:
        return len(self._prefixes)

    def hot(self) -> list[HotPrefix]:
        return list(self._prefixes.values())

    # --- internals ------------------------------------------------------------------------------
    def _new_prefix(
        self,
        tokens: Sequence[int],
        blocks: Sequence[Block],
        parent: HotPrefix | None = None,
        parent_tokens: int = 0,
    ) -> HotPrefix:
        if not self._free_holders:
            raise RuntimeError("no free holder sequence for a new prefix")
        prefix = HotPrefix(
            blocks[-1].key,
            tuple(tokens),
            self._free_holders.pop(),
            tuple(blocks),
            parent=parent,
            parent_tokens=parent_tokens if parent is not None else 0,
        )
        self._prefixes[prefix.seq_id] = prefix
        self.version += 1
        for block in blocks:
            self._by_block.setdefault(block.key, []).append(prefix)
        self.budget.hold(prefix.owned_cells)
        return prefix

    def _evict(self, prefix: HotPrefix) -> None:
        if self.on_evict is not None:
            try:
                self.on_evict(prefix)
            except Exception:  # demotion is an optimisation: eviction must still happen
                log.exception("on_evict failed for prefix %016x", prefix.key)
        self._drop(prefix)

    def _ref(self, prefix: HotPrefix) -> None:
        prefix.refs += 1
        prefix.last_used_s = time.monotonic()

    def _drop(self, prefix: HotPrefix) -> None:
        self.ctx.seq_remove(prefix.seq_id)
        del self._prefixes[prefix.seq_id]
        if prefix.session_key is not None and self._sessions.get(prefix.session_key) is prefix:
            del self._sessions[prefix.session_key]
        self.version += 1
        for block in prefix.blocks:
            holders = self._by_block.get(block.key, [])
            if prefix in holders:
                holders.remove(prefix)
            if not holders:
                self._by_block.pop(block.key, None)
        self._free_holders.append(prefix.seq_id)
        self.budget.unhold(prefix.owned_cells)
        if prefix.parent is not None:
            self.release(prefix.parent)

    def check_invariants(self) -> None:
        """Also checks the budget's held cells: nothing but this cache holds cells there."""
        assert self.budget.held_cells == self.cells_held, "budget and hot prefixes disagree"
        assert len(self._prefixes) + len(self._free_holders) == self._num_holders
        assert all(p.refs >= 0 for p in self._prefixes.values())
        for key, holders in self._by_block.items():
            for prefix in holders:
                assert prefix.seq_id in self._prefixes, "index points at an evicted prefix"
                assert any(b.key == key for b in prefix.blocks)
        for key, session in self._sessions.items():
            assert self._prefixes.get(session.seq_id) is session, "a session index entry is stale"
            assert session.session_key == key
        for prefix in self._prefixes.values():
            if prefix.parent is not None:
                assert prefix.parent.seq_id in self._prefixes, "a child outlived its parent"
