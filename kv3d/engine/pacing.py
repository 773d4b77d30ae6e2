"""How many prompt tokens a step may carry while other sequences are decoding.

A step is one `llama_decode`: every generating sequence waits for it to end before its next
token. A prompt chunk of `batch_tokens` riding along makes that step many times longer than a
decode-only one (on this project's 2-core reference machine, 512 prompt tokens cost ~2 s where
eight sequences' decode step costs ~65 ms), so every stream stalls while anyone prefills. The
pacer keeps such steps within `slowdown_max` times a decode-only step, using the step times it
observes; a step with no sequence decoding still takes `batch_tokens` of prompt (nobody waits).

Requests queued behind a family prefix that a prompt is computing (they wait to share it) are
waiting on the step as the decoding streams are: each earns the step another minimum chunk, so
a burst on a new family gets its prefix in a few steps instead of a minimum chunk at a time.

The cost model is linear: step_ms ≈ decode_ms + prompt_tokens × prefill_ms_per_token, each an
exponential moving average of what the steps measured. It adapts to the hardware: on a GPU,
where prompt tokens are cheap beside a memory-bound decode step, the budget comes out large.
"""

from __future__ import annotations

from dataclasses import dataclass

# Smaller chunks cost more per token (llama.cpp's matrix kernels want rows to work on) and must
# still make progress: below this a prompt would crawl while others decode.
MIN_CHUNK_TOKENS = 32
# Weight of the newest measurement in the moving averages.
EMA_WEIGHT = 0.2


@dataclass
class StepPacer:
    """Invariant: `prefill_budget` is within [min(MIN_CHUNK_TOKENS, room), room] where room is
    what the batch has left after the decode tokens, and equals room when nobody decodes, when
    pacing is off (`slowdown_max` 0) or before both costs have been measured."""

    batch_tokens: int
    slowdown_max: float
    decode_ms: float | None = None  # a decode-only step
    prefill_ms_per_token: float | None = None

    def prefill_budget(self, decode_tokens: int, awaiting_requests: int = 0) -> int:
        """Prompt tokens the next step may carry beside `decode_tokens` decoding sequences,
        while `awaiting_requests` queued requests wait for a prefix a prompt is computing."""
        room = max(0, self.batch_tokens - decode_tokens)
        if decode_tokens == 0 or self.slowdown_max <= 0:
            return room
        if self.decode_ms is None or not self.prefill_ms_per_token:
            return room
        spare_ms = (self.slowdown_max - 1.0) * self.decode_ms
        tokens = int(spare_ms / self.prefill_ms_per_token)
        floor = MIN_CHUNK_TOKENS * (1 + awaiting_requests)
        return min(room, max(floor, tokens))

    def observe(self, decode_tokens: int, prefill_tokens: int, step_ms: float) -> None:
        """Learn from one finished step: its decode and prompt token counts and wall time."""
        if prefill_tokens == 0:
            if decode_tokens > 0:
                self.decode_ms = ema(self.decode_ms, step_ms)
            return
        decode_part = (self.decode_ms or 0.0) if decode_tokens else 0.0
        per_token = max(step_ms - decode_part, 0.0) / prefill_tokens
        self.prefill_ms_per_token = ema(self.prefill_ms_per_token, per_token)


def ema(current: float | None, sample: float, weight: float = EMA_WEIGHT) -> float:
    """Exponential moving average of measured costs; the first sample starts it."""
    if current is None:
        return sample
    return current + weight * (sample - current)
