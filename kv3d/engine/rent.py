"""Idle rent: how long an idle session may stay hot while other sequences run.

llama.cpp's unified KV cache attends, at every step and for every token in the batch, over the
whole range of used cells; other sequences' cells are masked, not skipped. An idle session kept
hot therefore slows every step of the sequences that run beside it, in proportion to its cells
and to the step's tokens. Keeping it hot pays only when it returns before that cost adds up to
what demoting it now and resuming it from the warm tier later costs.

That is ski rental: rent until the rent paid equals the price of buying, then buy, which never
costs more than twice the best choice made knowing when the session returns. Rent is charged per
cell: an idle session's rent is the attention time per cell accrued since it went idle
(`paid_s_per_cell`, a clock that moves only while steps run) times its cells. Its price is what
moving that many cells out and back in costs, a fixed part plus a part per cell (`MoveCost`), so
a short session, whose move is mostly the fixed part, stays hot for more steps per cell than a
long one. Both are measured as the engine runs, so the rule holds on a CPU, where attention over
a few thousand cells costs as much as the weights, and on a GPU, where it costs little and
sessions stay hot far longer. A quiet engine accrues nothing: every session stays hot until
memory is needed.

A family prefix that nothing uses any more (no running sequence, no idle session pinning it)
costs the steps the same way. Where its snapshot is in the catalog, buying is only the restore
of its cells (nothing to export or encode on the way out): it pays rent against that price.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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
# Weight kept by older moves (demotions, resumes) at each new one: about the last 20 count.
MOVE_DECAY = 0.95
# Moves whose sizes spread less than this fraction of their mean tell no fixed part apart.
MIN_SIZE_SPREAD = 0.05


@dataclass
class AttentionCost:
    """Seconds one used KV cell adds to a step per token in the batch, fitted on every step as
    step_s ≈ a + b·decode_tokens + c·prompt_tokens + d·tokens·cells (weighted least squares,
    recent steps weighing more; decode and prompt tokens cost differently, on a GPU by far).
    Invariant: `s_per_cell_token` (d) is None until the fit is determined (steps of different
    sizes and fills seen) and d stands out of the steps' noise (`MIN_T_STAT` standard errors
    above zero), so that rent is charged only for a cost the steps have shown; never negative.
    Once shown, it holds while later steps cannot tell (alike, or noisy) and is dropped when
    they show the cost below it.
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
        if slope > 0 and slope >= MIN_T_STAT * stderr:
            self.s_per_cell_token = slope / CELLS_SCALE
        elif (
            self.s_per_cell_token is not None
            and slope + MIN_T_STAT * stderr < self.s_per_cell_token * CELLS_SCALE
        ):
            self.s_per_cell_token = None  # the steps now show less than was charged
        # Otherwise the steps cannot tell (a lone stream's steps are all alike): keep it.


@dataclass
class MoveCost:
    """Seconds to move a session of `cells` private cells out of the KV cache or back in,
    fitted as fixed_s + s_per_cell · cells over the moves timed (least squares, the latest
    weighing more). A move has a fixed part (parsing the state, a codec call per tensor) that a
    price per cell would spread over few cells for a short session and many for a long one.

    Invariant: `seconds` is None before any move is timed and never negative; while every move
    timed had one size, it scales with cells (the only shape one size can tell)."""

    _weight: float = 0.0
    _cells: float = 0.0
    _seconds: float = 0.0
    _cells_sq: float = 0.0
    _cells_seconds: float = 0.0

    @classmethod
    def of(cls, moves: tuple[tuple[int, float], ...]) -> MoveCost | None:
        """A fit of (cells, seconds) moves timed elsewhere (the start-up self-check)."""
        if not moves:
            return None
        cost = cls()
        for cells, seconds in moves:
            cost.observe(cells, seconds)
        return cost

    def observe(self, cells: int, seconds: float) -> None:
        if cells <= 0:
            return
        d = MOVE_DECAY
        self._weight = d * self._weight + 1.0
        self._cells = d * self._cells + cells
        self._seconds = d * self._seconds + seconds
        self._cells_sq = d * self._cells_sq + cells * cells
        self._cells_seconds = d * self._cells_seconds + cells * seconds

    def seconds(self, cells: int) -> float | None:
        if self._weight == 0.0:
            return None
        w = self._weight
        mean_cells, mean_s = self._cells / w, self._seconds / w
        spread = self._cells_sq / w - mean_cells * mean_cells
        if spread <= (MIN_SIZE_SPREAD * mean_cells) ** 2:
            return max(mean_s, 0.0) * cells / mean_cells
        slope = (self._cells_seconds / w - mean_cells * mean_s) / spread
        fixed = mean_s - slope * mean_cells
        if slope < 0.0:  # bigger moves timed faster: noise; all of it scales with cells
            return max(mean_s, 0.0) * cells / mean_cells
        if fixed < 0.0:  # the line through the origin that fits best
            return max(self._cells_seconds / self._cells_sq, 0.0) * cells
        return fixed + slope * cells


@dataclass
class IdleRent:
    """The rent clock (seconds per cell) and the price of demoting an idle session (seconds,
    a `MoveCost` of its cells): a session is due once its rent, per cell times its cells,
    reaches the price of moving that many cells out (export, encode) and back in (decode,
    restore).

    Invariant: `paid_s_per_cell` never decreases. Until a resume has been timed, the price is
    the start-up self-check's round trips through export, codec and restore of a short and a
    longer sequence (`round_trip`); until a price is known, and until the attention cost is,
    no session is demoted by rent (only by memory pressure, least recently used first)."""

    factor: float = 1.0  # rent paid before demoting, in prices; 0 = never demote by rent
    cost: AttentionCost = field(default_factory=AttentionCost)
    paid_s_per_cell: float = 0.0
    round_trip: MoveCost | None = None
    demote_cost: MoveCost = field(default_factory=MoveCost)
    encode_cost: MoveCost = field(default_factory=MoveCost)
    resume_cost: MoveCost = field(default_factory=MoveCost)

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
        self.demote_cost.observe(cells, seconds)

    def encoded(self, seconds: float, cells: int) -> None:
        """A parked session of `cells` private cells took `seconds` to encode, off the step
        thread but on the same cores (where llama.cpp computes on the CPU, every core)."""
        self.encode_cost.observe(cells, seconds)

    def resumed(self, seconds: float, cells: int) -> None:
        """A stored session of `cells` private cells was resumed in `seconds`."""
        self.resume_cost.observe(cells, seconds)

    def price_s(self, cells: int) -> float | None:
        """What demoting a session of `cells` private cells and resuming it later costs."""
        resume_s = self.resume_cost.seconds(cells)
        if resume_s is None:
            return self.round_trip.seconds(cells) if self.round_trip is not None else None
        out_s = [cost.seconds(cells) or 0.0 for cost in (self.demote_cost, self.encode_cost)]
        return sum(out_s) + resume_s

    def restore_price_s(self, cells: int) -> float | None:
        """What bringing back `cells` cells already stored elsewhere costs (a family prefix
        whose snapshot is in the catalog: nothing to export or encode on the way out)."""
        resume_s = self.resume_cost.seconds(cells)
        if resume_s is None and self.round_trip is not None:
            return self.round_trip.seconds(cells)
        return resume_s

    def due(
        self,
        idle_mark_s_per_cell: float,
        cells: int,
        ahead_tokens: int = 0,
        *,
        stored: bool = False,
    ) -> bool:
        """Whether a session of `cells` private cells (a family prefix whose snapshot is
        `stored`), idle since the clock read `idle_mark_s_per_cell`, has paid its price in rent,
        counting the rent that `ahead_tokens` tokens about to be computed will charge it (a
        prompt just admitted: its cells are placed by its first step, above the session's while
        it stays, so that every one of its tokens attends over them even if it leaves
        halfway)."""
        per_token = self.cost.s_per_cell_token
        if self.factor <= 0 or per_token is None or cells <= 0:
            return False
        price = self.restore_price_s(cells) if stored else self.price_s(cells)
        if price is None:
            return False
        paid = self.paid_s_per_cell + ahead_tokens * per_token - idle_mark_s_per_cell
        return paid * cells >= self.factor * price
