"""Idle rent: how long an idle session may stay hot while other sequences run.

llama.cpp's unified KV cache attends, at every step and for every token in the batch, over the
whole range of used cells; other sequences' cells are masked, not skipped. An idle session kept
hot therefore slows every step of the sequences that run beside it, in proportion to its cells
and to the step's tokens. Keeping it hot pays only when it returns before that cost adds up to
what demoting it now and resuming it from the warm tier later costs.

That is ski rental: rent until the rent paid equals the price of buying, then buy, which never
costs more than twice the best choice made knowing when the session returns. Rent and price are
both per cell, so the rule does not depend on a session's size: an idle session is demoted once
the attention time per cell accrued since it went idle (`paid_s_per_cell`, a clock that moves
only while steps run) reaches the price per cell of a demotion plus a resume. Both are measured
as the engine runs, so the rule holds on a CPU, where attention over a few thousand cells costs
as much as the weights, and on a GPU, where it costs little and sessions stay hot far longer.
A quiet engine accrues nothing: every session stays hot until memory is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kv3d.engine.pacing import ema

# Weight kept by the older observations at each new one: about the last 100 steps count.
DECAY = 0.99
# Steps of varied size needed before the attention cost is trusted.
MIN_OBSERVATIONS = 16
# Steps between two fits: a fit (a 4x4 solve) costs tens of microseconds, a step milliseconds.
FIT_EVERY_STEPS = 8
# Cells are counted in thousands in the fit, to keep its normal equations well conditioned.
CELLS_SCALE = 1000.0
# Standard errors by which the fitted cost of a cell must exceed zero before rent is charged.
MIN_T_STAT = 3.0


@dataclass
class AttentionCost:
    """Seconds one used KV cell adds to a step per token in the batch, fitted on every step as
    step_s ≈ a + b·decode_tokens + c·prompt_tokens + d·tokens·cells (weighted least squares,
    recent steps weighing more; decode and prompt tokens cost differently, on a GPU by far).
    Invariant: `s_per_cell_token` (d) is None until the fit is determined (steps of different
    sizes and fills seen) and d stands out of the steps' noise (`MIN_T_STAT` standard errors
    above zero), so that rent is charged only for a cost the steps have shown; never negative.
    """

    _xtx: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))
    _xty: np.ndarray = field(default_factory=lambda: np.zeros(4))
    _yty: float = 0.0
    _weight: float = 0.0  # the decayed number of observations
    _observations: int = 0
    s_per_cell_token: float | None = None

    def observe(self, decode_tokens: int, prefill_tokens: int, cells: int, step_s: float):
        tokens = decode_tokens + prefill_tokens
        x = np.array([1.0, decode_tokens, prefill_tokens, tokens * cells / CELLS_SCALE])
        self._xtx = DECAY * self._xtx + np.outer(x, x)
        self._xty = DECAY * self._xty + step_s * x
        self._yty = DECAY * self._yty + step_s * step_s
        self._weight = DECAY * self._weight + 1.0
        self._observations += 1
        if self._observations >= MIN_OBSERVATIONS and self._observations % FIT_EVERY_STEPS == 0:
            self._fit()

    def _fit(self) -> None:
        seen = np.flatnonzero(np.diag(self._xtx) > 0)  # no prompt chunk yet: fit without it
        if seen[-1] != 3:
            return
        xtx, xty = self._xtx[np.ix_(seen, seen)], self._xty[seen]
        if np.linalg.cond(xtx) > 1e10:
            return  # every step alike so far: the cells' share is not determined yet
        inverse = np.linalg.inv(xtx)
        coef = inverse @ xty
        residual = max(self._yty - float(coef @ xty), 0.0)
        variance = residual / max(self._weight - len(seen), 1.0)
        stderr = float(np.sqrt(variance * inverse[-1, -1]))
        slope = float(coef[-1])
        self.s_per_cell_token = (
            slope / CELLS_SCALE if slope > 0 and slope >= MIN_T_STAT * stderr else None
        )


@dataclass
class IdleRent:
    """The rent clock and the price of demoting an idle session, both in seconds per cell.

    Invariant: `paid_s_per_cell` never decreases. Until a resume has been measured, the price
    is the start-up self-check's timed round trip of a short sequence through export, codec
    and restore (`round_trip_s_per_cell`; its fixed costs spread over few cells make it high,
    never low); until a price is known, and until the attention cost is, no session is demoted
    by rent (only by memory pressure, least recently used first)."""

    factor: float = 1.0  # rent paid before demoting, in prices; 0 = never demote by rent
    cost: AttentionCost = field(default_factory=AttentionCost)
    paid_s_per_cell: float = 0.0
    round_trip_s_per_cell: float | None = None
    _demote_s_per_cell: float | None = None
    _resume_s_per_cell: float | None = None

    def after_step(self, decode_tokens: int, prefill_tokens: int, cells: int, step_s: float):
        """Charge one step: each idle cell made every token in it attend over one more cell."""
        if self.factor <= 0:
            return  # never demoted by rent: nothing to fit or charge
        self.cost.observe(decode_tokens, prefill_tokens, cells, step_s)
        per_token = self.cost.s_per_cell_token
        if per_token:
            self.paid_s_per_cell += per_token * (decode_tokens + prefill_tokens)

    def demoted(self, seconds: float, cells: int) -> None:
        """A demotion took `seconds` of the step thread for a session owning `cells`."""
        if cells > 0:
            self._demote_s_per_cell = ema(self._demote_s_per_cell, seconds / cells)

    def resumed(self, seconds: float, cells: int) -> None:
        """A stored session of `cells` private cells was resumed in `seconds`."""
        if cells > 0:
            self._resume_s_per_cell = ema(self._resume_s_per_cell, seconds / cells)

    @property
    def price_s_per_cell(self) -> float | None:
        if self._resume_s_per_cell is not None:
            return (self._demote_s_per_cell or 0.0) + self._resume_s_per_cell
        return self.round_trip_s_per_cell

    def due(self, idle_mark_s_per_cell: float) -> bool:
        """Whether a session idle since the clock read `idle_mark_s_per_cell` has paid its
        price in rent."""
        price = self.price_s_per_cell
        if self.factor <= 0 or price is None or self.cost.s_per_cell_token is None:
            return False
        return self.paid_s_per_cell - idle_mark_s_per_cell >= self.factor * price
