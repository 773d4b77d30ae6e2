"""Safe mode: when the engine stops trusting stored KV state and serves plain inference.

It trips when forced by config, when the start-up self-check fails, when the idle-time canary
sees drift above the noise, or when llama.cpp refuses too many checksum-valid states while the
cache had room for them (the state format is then not what KV3D expects). A full KV cache is
never evidence: a canary without room is skipped, a restore without room recomputes. The
reason is logged once and reported in the engine's stats. Once tripped it stays tripped until
restart.
"""

from __future__ import annotations

import logging
import time

from kv3d.engine.llama import LlamaBatch, LlamaContext, LlamaModel
from kv3d.engine.selfcheck import run_self_check

log = logging.getLogger(__name__)

# Restores of checksum-valid state that llama.cpp refuses: past this many, reuse stops.
MAX_STATE_FAILURES = 3


class SafeMode:
    """Why the engine is in safe mode (`reason`, empty while it is not), and when the canary
    runs next. Engine thread only; `active` and `reason` may be read from any thread."""

    def __init__(self, *, forced: bool, canary_period_s: float):
        self.reason = ""
        self.canary_period_s = canary_period_s
        self.canary_runs_total = 0
        self._last_canary_s = time.monotonic()
        if forced:
            self.trip("forced by server.safe_mode")

    @property
    def active(self) -> bool:
        return bool(self.reason)

    def trip(self, reason: str) -> bool:
        """Enter safe mode; True when this call entered it (the caller then turns reuse off)."""
        if self.active:
            return False
        self.reason = reason
        log.error(
            "SAFE MODE (%s): plain inference only, no prefix reuse, snapshots or session deltas",
            reason,
        )
        return True

    def check_state_failures(self, failures: int) -> bool:
        if failures < MAX_STATE_FAILURES:
            return False
        return self.trip(f"{failures} intact snapshots or sessions failed to restore")

    def canary_wait_s(self) -> float | None:
        """Seconds until the next canary is due (0: now); None when none will run."""
        if not self.canary_period_s or self.active:
            return None
        return max(0.0, self._last_canary_s + self.canary_period_s - time.monotonic())

    def run_canary(self, model: LlamaModel, ctx: LlamaContext, batch: LlamaBatch) -> bool:
        """While idle: restore a freshly computed state and its int8 delta on a free slot (0)
        and compare them with the computed logits; True when drift above the noise tripped
        safe mode."""
        self._last_canary_s = time.monotonic()
        check = run_self_check(model, ctx, batch, seq_ids=(0, 0), exact=False)
        if not check.conclusive:  # a full cache: try again next period, never trip for it
            log.info("canary skipped: %s", check.reason)
            return False
        self.canary_runs_total += 1
        return not check.ok and self.trip(f"canary: {check.reason}")
