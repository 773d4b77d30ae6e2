"""The self-check: does this llama.cpp build's state format, and the int8 codec, give back the
sequence they were given? If not, the engine serves in safe mode (plain inference).

On the engine's own context (at start-up, and as a periodic canary while the engine is idle):
compute a short sequence, export its state, and check that
1. parsing and rebuilding the state gives back the same bytes (the format KV3D understands);
2. restoring the exported state into another sequence gives the same next-token logits, bit for
   bit (what prefix snapshots and shared cells rely on);
3. the state passed through the int8 codec gives next-token logits within the noise floor (what
   session deltas rely on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from kv3d.engine.codec import decode_delta, encode_delta
from kv3d.engine.llama import KVCacheFullError, LlamaBatch, LlamaContext, LlamaModel
from kv3d.engine.statefmt import SeqState, build_seq_state, join_cells, parse_seq_state, shifted

log = logging.getLogger(__name__)

PROBE_TEXT = (
    "KV3D keeps the key-value cache of a shared prompt prefix once, and every session that "
    "shares the prefix reuses it instead of computing it again."
)
# KL(exact || int8) of one next-token distribution; the engine's own noise is ~3e-3 on average.
CODEC_KL_LIMIT = 0.1
# The second timed round trip moves this many copies of the probe's cells: a move's fixed part
# (per call, per tensor) and its part per cell come apart only over two sizes.
ROUND_TRIP_COPIES = 8


@dataclass(frozen=True, slots=True)
class SelfCheck:
    ok: bool
    reason: str = ""
    # False: the check could not run to the end for lack of KV cells (a full cache is no
    # evidence about the state format): neither a pass nor a failure.
    conclusive: bool = True
    # What moving a sequence out of the cache and back cost (state export, int8 encode and
    # decode, restore), as (cells, seconds) for the probe and for copies of it end to end:
    # the price of demoting an idle session, before one is timed.
    round_trips: tuple[tuple[int, float], ...] = ()


def run_self_check(
    model: LlamaModel,
    ctx: LlamaContext,
    batch: LlamaBatch,
    seq_ids: tuple[int, int] = (0, 1),
    exact: bool = True,
) -> SelfCheck:
    """Run the checks on two free sequences of `ctx` and remove them again; other sequences'
    cells are untouched. `exact=False` (the run-time canary, with other cells in the cache
    where llama.cpp's numerics depend on placement) holds the restore to the noise floor too."""
    try:
        return _check(model, ctx, batch, seq_ids, exact)
    except KVCacheFullError:
        return SelfCheck(False, "no free KV cells to run the check", conclusive=False)
    except Exception as exc:  # any failure of the machinery is a failure of the check
        return SelfCheck(False, f"{type(exc).__name__}: {exc}")
    finally:
        for seq in seq_ids:
            ctx.seq_remove(seq)


def _check(
    model: LlamaModel,
    ctx: LlamaContext,
    batch: LlamaBatch,
    seq_ids: tuple[int, int],
    exact: bool,
) -> SelfCheck:
    computed, restored = seq_ids
    tokens = model.tokenize(PROBE_TEXT, add_special=True, parse_special=False)
    tokens = tokens[: max(2, min(len(tokens), batch.capacity_tokens))]
    *history, last = tokens
    for seq in seq_ids:
        ctx.seq_remove(seq)
    _decode(ctx, batch, history, 0, seq_id=computed)
    export_started = time.perf_counter()
    state = ctx.seq_state(computed)
    export_s = time.perf_counter() - export_started
    expected = _next_logits(ctx, batch, last, len(history), seq_id=computed)

    if build_seq_state(parse_seq_state(state)) != state:
        return SelfCheck(False, "the llama.cpp sequence state does not rebuild byte for byte")

    ctx.seq_remove(computed)
    ctx.set_seq_state(restored, state)
    got = _next_logits(ctx, batch, last, len(history), seq_id=restored)
    if exact and not np.array_equal(got, expected):
        return SelfCheck(False, "a restored sequence state gives different logits")
    if not exact and not _kl(expected, got) <= CODEC_KL_LIMIT:
        return SelfCheck(False, f"a restored state drifts (KL {_kl(expected, got):.3g})")

    ctx.seq_remove(restored)
    round_trip_started = time.perf_counter()
    ctx.set_seq_state(restored, decode_delta(encode_delta(state, "int8")))
    round_trip_s = export_s + time.perf_counter() - round_trip_started
    kl = _kl(expected, _next_logits(ctx, batch, last, len(history), seq_id=restored))
    if not kl <= CODEC_KL_LIMIT:
        return SelfCheck(False, f"the int8 codec moves the next token's distribution (KL {kl:.3g})")
    copies = ROUND_TRIP_COPIES * len(history)
    round_trips = ((len(history), round_trip_s), (copies, _round_trip_s(ctx, state, restored)))
    return SelfCheck(True, round_trips=round_trips)


def _round_trip_s(ctx: LlamaContext, state: bytes, seq_id: int) -> float:
    """Seconds to export, encode, decode and restore `ROUND_TRIP_COPIES` copies of `state`'s
    cells laid end to end in `seq_id` (their values are only moved, never attended to)."""
    ctx.seq_remove(seq_id)
    ctx.set_seq_state(seq_id, build_seq_state(_end_to_end(parse_seq_state(state))))
    started = time.perf_counter()
    delta = encode_delta(ctx.seq_state(seq_id), "int8")
    ctx.seq_remove(seq_id)
    ctx.set_seq_state(seq_id, decode_delta(delta))
    return time.perf_counter() - started


def _end_to_end(state: SeqState) -> SeqState:
    n = state.n_cells
    return join_cells([shifted(state, k * n) for k in range(ROUND_TRIP_COPIES)])


def _decode(ctx: LlamaContext, batch: LlamaBatch, tokens: list[int], start: int, seq_id: int):
    batch.clear()
    for i, token in enumerate(tokens):
        batch.add(token, start + i, seq_id, False)
    ctx.decode(batch)


def _next_logits(ctx: LlamaContext, batch: LlamaBatch, token: int, pos: int, seq_id: int):
    batch.clear()
    row = batch.add(token, pos, seq_id, True)
    ctx.decode(batch)
    return np.array(ctx.logits(row), dtype=np.float64)


def _kl(ref: np.ndarray, other: np.ndarray) -> float:
    p = ref - ref.max()
    p = p - np.log(np.exp(p).sum())
    q = other - other.max()
    q = q - np.log(np.exp(q).sum())
    return float((np.exp(p) * (p - q)).sum())
