"""Sessions: a finished conversation's KV is kept, and resumed when the conversation returns.

A session is keyed by its id (`X-Session-ID`, or OpenAI's `user`), or, with `auto_sessions`,
by its history's last whole block (`auto:<key>`), so that a request repeating an earlier
history finds it without an id; a history that goes less than a block past its family prefix
has no such block and is keyed by a hash of its tokens (`auto:tail-<hash>`), kept hot only.
Its KV is a family prefix shared with other sessions plus the cells private to it, and it
lives in one of these places:

- **hot**: kept in the KV cache as an idle child of its family prefix (`keep`), while there is
  a free holder sequence, with the logits its last prompt gave; the next turn shares its cells
  exactly, and a repeat of that prompt shares them all and computes nothing;
- **warm / cold / shared** (not `auto:tail-` sessions, which no request could look up there):
  its private cells as an int8 delta in `SessionStore` (`park`), when it could not stay hot,
  was evicted from the cache under pressure, or had cost the sequences running beside it more
  attention time than a demotion and a resume cost (`demote`; the rule is in `rent.py`).

A returning request takes its stored session off the store at submit (decoded on the store's
worker thread while it waits: the engine admits it only once that is done, so nothing here ever
waits on it), and at admission `resume` restores the private cells into its sequence and shares
the family prefix back. When the family prefix is not hot (a restart) the resume is deferred:
the prefix is prefilled as on a miss, and the delta goes on top of it (`after_prefix`). Nothing
here can make output wrong: whatever does not check out (a record that cannot be read or
decoded included) is recomputed.

`NoSessions` is the null object for reuse off and safe mode.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np

from kv3d.engine.generation import GenerationRequest
from kv3d.engine.memory import load_cells
from kv3d.engine.prefix import Block, HotPrefix, PrefixMatch, common_prefix_tokens
from kv3d.engine.rent import IdleRent
from kv3d.engine.reuse import Admission, PrefixReuse
from kv3d.engine.scheduler import Pending, SeqProgress
from kv3d.engine.statefmt import build_seq_state, cells_from, parse_seq_state
from kv3d.engine.tiers import PARTS_TIER, Resumable, SessionStore, SharedSessions

log = logging.getLogger(__name__)

AUTO_SESSION_PREFIX = "auto:"  # sessions detected from their history, keyed by its last block
# The idle mark of a session that became idle since the last step's charge.
IDLE_FROM_NEXT_STEP = math.inf
# Most idle sessions demoted for rent after one step: each costs the step thread a state export,
# and a burst of them would stall the running streams for one long step.
MAX_RENT_DEMOTIONS_PER_STEP = 2
# Sessions demoted here that a request submitted while they were hot may still come for
# (`refetch`): the newest this many are remembered.
RECENT_DEMOTIONS = 4096


# An auto session whose history goes less than a block past its family prefix: no block of a
# later prompt names it, so it is found only while hot (as a child of its family prefix) and is
# never parked, since no request could look it up in a store.
AUTO_TAIL_PREFIX = f"{AUTO_SESSION_PREFIX}tail-"


def auto_session_key(block_key: int) -> str:
    return f"{AUTO_SESSION_PREFIX}{block_key:016x}"


def auto_tail_key(family_key: int, tail: tuple[int, ...]) -> str:
    """The key of a short history: its tokens past the family prefix, under the family's key."""
    h = hashlib.blake2b(family_key.to_bytes(8, "little"), digest_size=8)
    h.update(np.asarray(tail, dtype=np.int32).tobytes())
    return f"{AUTO_TAIL_PREFIX}{h.hexdigest()}"


def parkable(session_key: str) -> bool:
    """Whether a stored copy of the session could ever be found again."""
    return not session_key.startswith(AUTO_TAIL_PREFIX)


def same_conversation(kept_key: str, new_key: str) -> bool:
    """Whether a sequence that continued session `kept_key` is the next turn of it. Auto keys
    name a history's last block, so every turn of one auto session has a new key."""
    if kept_key == new_key:
        return True
    return kept_key.startswith(AUTO_SESSION_PREFIX) and new_key.startswith(AUTO_SESSION_PREFIX)


class PrivateCells:
    """The part of a sequence state that is the session's own: cells at or after the family
    prefix. Cutting them out is deferred to the store's worker thread (`bytes(...)`)."""

    def __init__(self, blob: bytes, prefix_tokens: int):
        self.blob, self.prefix_tokens = blob, prefix_tokens

    def __bytes__(self) -> bytes:
        if self.prefix_tokens == 0:
            return self.blob
        return build_seq_state(cells_from(parse_seq_state(self.blob), self.prefix_tokens))


class Sessions:
    """Keeps, parks, demotes and resumes the sessions of one engine.

    Invariants: a kept hot session is an idle child prefix of its family prefix, which it pins;
    at most one hot turn of a conversation is current (a newer turn marks the older one
    `superseded`, and it drops with its last user); a stored session is resumed only when its
    fingerprint is this engine's and its history agrees with the prompt beyond the family
    prefix. Engine thread, except the methods marked "any thread".
    """

    def __init__(
        self,
        reuse: PrefixReuse,
        store: SessionStore,
        *,
        auto: bool,
        rent: IdleRent | None = None,
    ):
        self.reuse = reuse
        self.store = store
        self.auto = auto
        self.fingerprint = reuse.fingerprint
        self.rent = rent if rent is not None else IdleRent()
        self.rent_demotions = 0
        self.prefix_rent_evictions = 0
        self.part_resumes = 0  # new conversations started on other sessions' parts
        self.refetches = 0  # requests whose session left the cache while they waited
        self._demoted: OrderedDict[str, None] = OrderedDict()  # newest last
        self._memory = reuse.cache.ctx
        reuse.cache.on_evict = self.demote
        # A session that goes idle during a step starts paying rent after that step's charge
        # (it was running, not idle, while the step ran): `after_step` reads the clock for it.
        reuse.cache.idle_clock = lambda: IDLE_FROM_NEXT_STEP

    # --- any thread -------------------------------------------------------------------------
    def take_for(
        self, request: GenerationRequest, blocks: list[Block], hot: frozenset[str]
    ) -> Future | None:
        """Start fetching and decoding the stored session `request` continues (None when there
        is none, or it is still hot here: the hot cells are exact and need no fetch)."""
        key = self._key_to_resume(request, blocks)
        if key is not None and key in hot:
            return None
        if key is not None and (self.store.shared is not None or self.store.holds(key)):
            return self.store.take(key)
        if request.family_tokens is None:
            return None  # where its cells would start is not known before admission
        # A new conversation: as much of its prompt as warm sessions hold in parts.
        return self.store.take_parts(
            self.fingerprint, _block_scope(blocks), request.prompt_tokens, request.family_tokens
        )

    def refetch(self, pending: Pending) -> Future | None:
        """A waiting request whose session was hot when it was submitted (so nothing was
        fetched for it) and has since been demoted to the store (evicted for room, or its rent
        paid): start fetching it now, and return the Future the request must wait for. None
        when there is nothing to fetch. Engine thread."""
        if pending.session is not None or not self._demoted:
            return None
        # Every step, for every waiting request: look only at what was demoted (a dict), not
        # at the store (a lock, and a file per block for auto sessions with a cold folder).
        demoted = self._demoted.__contains__
        key = self._key_to_resume(pending.request, pending.blocks or [], demoted)
        if key is None or not demoted(key) or self.reuse.cache.session(key) is not None:
            return None
        del self._demoted[key]  # one fetch: whatever it finds, the request then goes
        self.refetches += 1
        pending.session = self.store.take(key)
        return pending.session

    def put_back(self, pending: Pending) -> None:
        """`pending` ends without keeping a newer turn (cancelled, rejected, failed): the
        stored session it took goes back to the store, now or once its read is done, so that
        the conversation is not lost with the request."""
        future, pending.session = pending.session, None
        if future is not None:
            future.add_done_callback(self._store_again)

    def _store_again(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        resumable: Resumable | None = future.result()
        if resumable is not None and resumable.tier != PARTS_TIER:  # parts never left
            self.store.put_back(resumable.record)

    def recent_ids(self, limit: int) -> list[str]:
        return self.store.recent_ids(limit)

    def stats(self) -> dict[str, float]:
        return {
            **self.store.stats(),
            "session_rent_demotions_total": self.rent_demotions,
            "prefix_rent_evictions_total": self.prefix_rent_evictions,
            "session_part_resumes_total": self.part_resumes,
            "session_refetches_total": self.refetches,
        }

    def set_shared(self, shared: SharedSessions) -> None:
        self.store.shared = shared

    def flush(self) -> None:
        self.store.flush()

    def _key_to_resume(
        self, request: GenerationRequest, blocks: list[Block], held=None
    ) -> str | None:
        """By its id, else (auto sessions) the deepest of its blocks that ended an earlier
        conversation's history (`held(key)`: by default, whether the store holds it)."""
        held = held or self.store.holds
        if request.session_id:
            return request.session_id
        if not self.auto:
            return None
        family = request.family_tokens or 0
        for block in reversed(blocks):
            if block.end_tokens <= family:
                break  # what only the family prefix shares is a prefix hit, not a session
            key = auto_session_key(block.key)
            if held(key):
                return key
        return None

    # --- admission --------------------------------------------------------------------------
    def shared_cells(self, pending: Pending, hot_tokens: int) -> int:
        """Cells of the prompt a hot prefix will provide at admission, given that `hot_tokens`
        of it are hot. A stored session to resume shares its family prefix when that is hot,
        and nothing when its resume is deferred; never more than admission then shares."""
        resumable = self._resumable(pending)
        if resumable is None or self._hot_is_better(resumable, hot_tokens):
            return hot_tokens
        family = resumable.record.prefix_tokens
        return family if hot_tokens >= family else 0

    @staticmethod
    def _hot_is_better(resumable: Resumable, hot_tokens: int) -> bool:
        """Parts of other sessions are taken only where the hot cache holds less of the
        prompt (its cells are exact and need no restore)."""
        return resumable.tier == PARTS_TIER and hot_tokens >= len(resumable.record.tokens)

    def resume(self, pending: Pending, progress: SeqProgress) -> Admission | None:
        """Put the request's stored session back into its sequence; None when there is none
        to resume here, or it cannot be done exactly (the request is admitted as any other)."""
        if pending.session is None:
            return None
        hot = self.reuse.match(pending)
        if hot is not None and hot.prefix.session_key is not None:
            return None  # still hot here: exact cells beat any stored copy
        resumable = self._resumable(pending)
        if resumable is None or self._hot_is_better(resumable, hot.n_tokens if hot else 0):
            return None
        started = time.perf_counter()
        record = resumable.record
        prompt = pending.request.prompt_tokens
        common = common_prefix_tokens(record.tokens, prompt, len(prompt) - 1)
        p = record.prefix_tokens
        if record.fingerprint != self.fingerprint or common <= p:
            return None
        family = None
        if p > 0:
            if hot is None or hot.n_tokens < p:
                self.reuse.late_snapshot(pending)
            if (hot is None or hot.n_tokens < p) and pending.snapshot is not None:
                restored, _ = self.reuse.restore_snapshot(
                    pending.snapshot, prompt, pending.request.tenant
                )
                hot = restored if restored is not None else hot
            if hot is None or hot.n_tokens < p:
                return self._defer(
                    resumable, self.reuse.blocks_of(pending), progress, pending.request.tenant
                )
            family = PrefixMatch(hot.prefix, p)
        if not self._load(progress.slot, resumable, "session not restored, recomputing"):
            return None
        self._trim(progress, record.tokens, common)
        # Sharing takes a reference on the prefix: last, so that nothing after it can fail and
        # leave a reference no admission holds.
        admission = self.reuse.share(family, progress) if family is not None else Admission()
        admission.cached_tokens = common
        admission.resume_s = resumable.decode_s + time.perf_counter() - started
        admission.resume_tier = resumable.tier
        self.rent.resumed(admission.resume_s, common - p)
        if resumable.tier == PARTS_TIER:
            self.part_resumes += 1
        return admission

    def _resumable(self, pending: Pending) -> Resumable | None:
        """The stored session fetched for `pending`, without waiting: None when there is none,
        or it could not be read (a miss: the request recomputes)."""
        future = pending.session
        if future is None:
            return None
        if not future.done():  # the engine admits only ready requests: never block on it
            log.warning("session of %s looked at before it was read", pending.request.request_id)
            return None
        if future.exception() is not None:
            log.warning("stored session not read, recomputing: %s", future.exception())
            pending.session = None  # said once: from now on the request has no stored session
            return None
        return future.result()

    def after_prefix(self, admission: Admission, progress: SeqProgress) -> None:
        """The sequence's registration prefix just became hot: put a deferred session's
        private cells on top of it."""
        resumable = admission.deferred_session
        if resumable is None:
            return
        admission.deferred_session = None
        started = time.perf_counter()
        record = resumable.record
        p = record.prefix_tokens
        if admission.prefix is None or admission.prefix_tokens != p:
            return  # the prefix could not be kept hot: its cells stay private, no delta
        prompt = progress.prompt_tokens
        common = common_prefix_tokens(record.tokens, prompt, len(prompt) - 1)
        loaded = self._load(progress.slot, resumable, "session not restored after its prefix")
        # The load replaced the slot's cells (or emptied them): share the prefix back either way.
        self._memory.seq_copy(admission.prefix.seq_id, progress.slot, 0, p)
        if not loaded:
            return
        self._trim(progress, record.tokens, common)
        admission.cached_tokens = common - p
        admission.resume_s = resumable.decode_s + time.perf_counter() - started
        admission.resume_tier = resumable.tier
        self.rent.resumed(admission.resume_s, common - p)
        if resumable.tier == PARTS_TIER:
            self.part_resumes += 1

    def _defer(
        self, resumable: Resumable, blocks: list[Block], progress: SeqProgress, tenant: str
    ) -> Admission | None:
        """The family prefix is not hot (a restart, an eviction): prefill it as a miss would,
        then restore the session's delta on top (`after_prefix`)."""
        p = resumable.record.prefix_tokens
        register = tuple(b for b in blocks if b.end_tokens <= p)
        if not register or register[-1].end_tokens != p:
            return None
        progress.chunk_stop = p
        return Admission(register_blocks=register, deferred_session=resumable, tenant=tenant)

    def _load(self, slot: int, resumable: Resumable, what: str) -> bool:
        try:
            load_cells(self._memory, slot, resumable.blob, len(resumable.record.tokens))
        except (ValueError, RuntimeError) as exc:
            self.reuse.counters["session_restore_failures_total"] += 1
            self.reuse.count_state_failure(exc, len(resumable.record.tokens))
            log.warning("%s: %s", what, exc)
            return False
        return True

    def _trim(self, progress: SeqProgress, history: tuple[int, ...], common: int) -> None:
        """Drop what the stored history holds past where the prompt diverges from it."""
        if common < len(history):
            self._memory.seq_remove(progress.slot, common, -1)
        progress.num_computed_tokens = common

    # --- keeping ------------------------------------------------------------------------------
    def keep(
        self,
        request: GenerationRequest,
        admission: Admission,
        progress: SeqProgress,
        output_ids: list[int],
        prompt_logits: np.ndarray | None = None,
    ) -> None:
        """Keep a finished conversation: hot while there is room (with `prompt_logits`, the
        logits its prompt gave, when known), else as a warm int8 delta."""
        history, key = self._history_and_key(request, admission, progress, output_ids)
        if key is None:
            return
        if self._keep_hot(admission, progress, history, request, key, prompt_logits):
            if self.store.writes_behind and parkable(key):  # to the shared tier, disk
                self._park(key, history, request, admission, progress, local=False)
            return
        if parkable(key):
            self._park(key, history, request, admission, progress)

    def park_running(
        self,
        request: GenerationRequest,
        admission: Admission,
        progress: SeqProgress,
        output_ids: list[int],
    ) -> Future | None:
        """A running sequence gives its cells up (the cache ran out while it generated): store
        what it computed, as an idle session would be, and return the Future its continuation
        resumes from (the store's one worker encodes, then reads it back, in that order). None
        when it has no key to be stored under: the continuation then computes it again."""
        history, key = self._history_and_key(request, admission, progress, output_ids)
        if key is None or not parkable(key):
            return None
        self._park(key, history, request, admission, progress)
        return self.store.take(key)

    def _history_and_key(
        self,
        request: GenerationRequest,
        admission: Admission,
        progress: SeqProgress,
        output_ids: list[int],
    ) -> tuple[tuple[int, ...], str | None]:
        """The tokens whose KV the sequence holds, and the key to keep them under (None when
        there is none, or nothing of them is its own)."""
        n = progress.num_computed_tokens
        history = (request.prompt_tokens + tuple(output_ids))[:n]
        if n <= admission.prefix_tokens:
            return history, None
        return history, self._key_to_keep(request, history)

    def _park(
        self,
        key: str,
        history: tuple[int, ...],
        request: GenerationRequest,
        admission: Admission,
        progress: SeqProgress,
        *,
        local: bool = True,
    ) -> None:
        """Hand the sequence's private cells to the store (encoded off the step thread)."""
        shared, blob = self._private_state(progress.slot, admission)
        scope = self._scope(history, request)
        self.store.park(key, self.fingerprint, history, shared, blob, local=local, scope=scope)

    def _scope(self, history: tuple[int, ...], request: GenerationRequest) -> bytes:
        """What a session's stored parts are keyed under: its first block's key, salted with
        the request's `cache_salt` as every block key is, so that sessions under different
        salts never share a part (nor learn, from timing, that another holds their tokens)."""
        # Only the first block's key is needed: hash no more of the history than that block.
        first = history[: self.reuse.settings.block_tokens] + (0,)
        return _block_scope(self.reuse.blocks_for(first, request.family_tokens, request.cache_salt))

    def _key_to_keep(self, request: GenerationRequest, history: tuple[int, ...]) -> str | None:
        if request.session_id:
            return request.session_id
        if not self.auto:
            return None
        # Keyed by the history's last whole block: the next turn's prompt repeats the history,
        # so its blocks include this one.
        blocks = self.reuse.blocks_for(history + (0,), request.family_tokens, request.cache_salt)
        family = request.family_tokens or 0
        if not blocks:
            return None
        if blocks[-1].end_tokens <= family:
            # Less than a block past the family prefix (a short first turn): kept hot only.
            return auto_tail_key(blocks[-1].key, history[family:])
        return auto_session_key(blocks[-1].key)

    def _keep_hot(
        self,
        admission: Admission,
        progress: SeqProgress,
        history: tuple[int, ...],
        request: GenerationRequest,
        key: str,
        prompt_logits: np.ndarray | None,
    ) -> bool:
        """Keep the whole history hot as an idle session, so the next turn shares its cells
        and computes only what is new (its blocks index it for auto sessions and routing; a
        tail shorter than a block is found by the session's key). False when there is nothing
        private to keep or no free holder."""
        blocks = self.reuse.blocks_for(history + (0,), request.family_tokens, request.cache_salt)
        parent, shared = admission.prefix, admission.prefix_tokens
        if parent is not None and parent.session_key is not None:
            if same_conversation(parent.session_key, key):
                # A resumed turn: the new history replaces the old one (kept hot here or
                # parked warm by the caller); the old one goes with its last user.
                parent.superseded = True
            # Either way the new session hangs off the family prefix, not off another session.
            parent, shared = parent.parent, parent.parent_tokens
        if parent is None and not parkable(key):
            return False  # indexed by the family's blocks alone, it would match any opening
        cache = self.reuse.cache
        if not blocks or len(history) <= shared or not cache.free_a_holder():
            return False
        n_prompt = len(request.prompt_tokens)
        if len(history) < n_prompt:
            prompt_logits = None  # ended before its prompt was computed: nothing to repeat
        session = cache.keep_session(
            progress.slot, history, blocks, key, parent, shared, prompt_logits, n_prompt
        )
        # The kept cells leave the sequence's reservation: the session holds them now.
        self.reuse.budget.unreserve(progress.slot, session.owned_cells)
        return True

    def _private_state(self, slot: int, admission: Admission) -> tuple[int, PrivateCells]:
        """(family prefix tokens, a lazy cut of the slot's state past them)."""
        shared, prefix = admission.prefix_tokens, admission.prefix
        if prefix is not None and prefix.session_key is not None:
            shared = prefix.parent_tokens  # a resumed turn: keep all that is not the family's
        return shared, PrivateCells(self._memory.seq_state(slot), shared)

    def after_step(
        self,
        decode_tokens: int,
        prefill_tokens: int,
        cells_used: int,
        step_s: float,
    ) -> None:
        """Charge the step's rent to the idle sessions, and demote those that have paid their
        price (the longest idle first, a few per step)."""
        self.rent.after_step(decode_tokens, prefill_tokens, cells_used, step_s)
        for cells, seconds in self.store.take_encode_times():
            self.rent.encoded(seconds, cells)
        self._demote_due(ahead_tokens=0)

    def before_prefill(self, prompt_tokens: int) -> None:
        """A prompt of `prompt_tokens` tokens to compute was just admitted: demote the idle
        sessions whose rent, with what those tokens will charge them, reaches their price, now,
        before its first step places its cells. Charged after the fact, a session leaving
        halfway through a long prompt would have saved it nothing: the prompt's cells sit
        above the session's, and attention spans the whole used range until it ends."""
        if prompt_tokens > 0:
            self._demote_due(ahead_tokens=prompt_tokens)

    def _demote_due(self, ahead_tokens: int) -> None:
        """Demote the idle sessions, and evict the unused family prefixes that a snapshot can
        bring back, that have paid their price (the longest idle first, a few at a time)."""
        cache = self.reuse.cache
        idle = cache.idle_for_rent()
        for prefix in idle:
            if prefix.idle_mark == IDLE_FROM_NEXT_STEP:
                prefix.idle_mark = self.rent.paid_s_per_cell
        demoted = 0
        for prefix in sorted(idle, key=lambda p: p.idle_mark):
            if demoted == MAX_RENT_DEMOTIONS_PER_STEP:
                break
            family = prefix.session_key is None
            if not self.rent.due(prefix.idle_mark, prefix.owned_cells, ahead_tokens, stored=family):
                # Not yet; a longer one idle for less time may be (its fixed price weighs less).
                continue
            cache.evict(prefix)
            if family:
                self.prefix_rent_evictions += 1
            else:
                self.rent_demotions += 1
            demoted += 1

    def demote(self, prefix: HotPrefix) -> None:
        """An idle session leaves the KV cache (LRU under pressure, or its rent paid): into
        the warm tier."""
        if prefix.session_key is None or not parkable(prefix.session_key):
            return
        started = time.perf_counter()
        blob = PrivateCells(self._memory.seq_state(prefix.seq_id), prefix.parent_tokens)
        self._demoted[prefix.session_key] = None
        self._demoted.move_to_end(prefix.session_key)
        if len(self._demoted) > RECENT_DEMOTIONS:
            self._demoted.popitem(last=False)
        self.store.park(
            prefix.session_key,
            self.fingerprint,
            prefix.tokens,
            prefix.parent_tokens,
            blob,
            scope=_block_scope(prefix.blocks),  # the same blocks `_scope` computes, kept
        )
        self.rent.demoted(time.perf_counter() - started, prefix.owned_cells)

    def close(self) -> None:
        """Park every idle session kept hot (shutdown, scale-down), then store what is pending:
        nothing hot is lost."""
        for prefix in self.reuse.cache.hot():
            if prefix.session_key is not None and not prefix.superseded:
                try:
                    self.demote(prefix)
                except Exception:
                    log.exception("could not demote session %s", prefix.session_key)
        self.store.close()


def _block_scope(blocks) -> bytes:
    return blocks[0].key.to_bytes(8, "little") if blocks else b""


class NoSessions:
    """Sessions off (reuse off, or safe mode): nothing is kept, parked or resumed."""

    def take_for(self, request, blocks, hot) -> None:
        return None

    def refetch(self, pending: Pending) -> None:
        return None

    def put_back(self, pending: Pending) -> None:
        pass

    def recent_ids(self, limit: int) -> list[str]:
        return []

    def stats(self) -> dict[str, float]:
        return {}

    def set_shared(self, shared: SharedSessions) -> None:
        pass

    def flush(self) -> None:
        pass

    def shared_cells(self, pending: Pending, hot_tokens: int) -> int:
        return hot_tokens

    def resume(self, pending: Pending, progress: SeqProgress) -> None:
        return None

    def after_prefix(self, admission: Admission, progress: SeqProgress) -> None:
        pass

    def keep(self, request, admission, progress, output_ids, prompt_logits=None) -> None:
        pass

    def park_running(self, request, admission, progress, output_ids) -> None:
        return None

    def after_step(self, *step) -> None:
        pass

    def before_prefill(self, prompt_tokens: int) -> None:
        pass

    def close(self) -> None:
        pass
