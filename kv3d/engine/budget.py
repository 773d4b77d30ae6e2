"""The KV cell budget of one llama.cpp context: who has been promised how many cells.

A unified llama.cpp cache has `total_cells` cells shared by every sequence. KV3D promises them
in two ways, and this is the only place that counts either:

- **reserved** by a running sequence: its prompt's cells and the output cells granted to it so
  far (a grant at a time as it generates, not all of `max_tokens` at once), less the cells it
  shares from a hot prefix, which are not its own;
- **held** by a hot prefix or an idle session kept in the cache (`PrefixCache` reports every
  prefix it adds or drops, so the count never needs re-syncing).

The scheduler asks `can_admit` before it takes a request and `admit`s it; nothing here calls
back into anyone.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KVBudget:
    """Counts the promised KV cells of one context.

    Invariants (`check_invariants`, called by tests after every admission, eviction and failure
    path): `reserved_cells` is the sum of the running sequences' reservations, each of which is
    >= 0; `held_cells` >= 0; and `reserved_cells + held_cells <= total_cells`, because a request
    is admitted only when its reservation fits, and a reservation only moves to `held_cells`
    (`unreserve` then `hold`), never grows, except through `reserve_more`, which the caller
    makes only when the cells are free (a grant of output cells, a prefix that went away).

    A sequence may hand over more cells than it still reserves: a resumed session turn re-keeps
    the cells it shared from the older turn it supersedes. `unreserve` stops at zero then, and
    those cells count twice in `held_cells` until the older turn drops with its last user.
    """

    total_cells: int
    reserved_cells: int = 0
    held_cells: int = 0
    _reservations: dict[int, int] = field(default_factory=dict)

    @property
    def used_cells(self) -> int:
        return self.reserved_cells + self.held_cells

    @property
    def free_cells(self) -> int:
        return self.total_cells - self.used_cells

    # --- running sequences ------------------------------------------------------------------
    def can_admit(self, cells: int) -> bool:
        """Whether a new sequence that needs `cells` more cells fits now."""
        return self.used_cells + cells <= self.total_cells

    def admit(self, slot: int, cells: int) -> None:
        if slot in self._reservations:
            raise ValueError(f"slot {slot} already holds a reservation")
        self._reservations[slot] = max(0, cells)
        self.reserved_cells += self._reservations[slot]

    def release(self, slot: int) -> int:
        """End a sequence's reservation; returns the cells it still reserved."""
        cells = self._reservations.pop(slot)
        self.reserved_cells -= cells
        return cells

    def unreserve(self, slot: int, cells: int) -> None:
        """`cells` of the sequence's reservation are not its to fill: it shares them from a hot
        prefix, or hands them over to one (stops at zero, see the class docstring)."""
        cells = min(cells, self._reservations[slot])
        self._reservations[slot] -= cells
        self.reserved_cells -= cells

    def reserve_more(self, slot: int, cells: int) -> None:
        """The sequence shares fewer cells than it was admitted for (its prefix went away)."""
        self._reservations[slot] += cells
        self.reserved_cells += cells

    def reserved_by(self, slot: int) -> int:
        return self._reservations[slot]

    @property
    def reserving_slots(self) -> frozenset[int]:
        return frozenset(self._reservations)

    def shortfall(self, cells: int) -> int:
        """Cells that must be freed before a sequence needing `cells` fits; 0 when it does."""
        return max(0, self.used_cells + cells - self.total_cells)

    # --- hot prefixes -----------------------------------------------------------------------
    def hold(self, cells: int) -> None:
        self.held_cells += cells

    def unhold(self, cells: int) -> None:
        self.held_cells -= cells

    def check_invariants(self) -> None:
        assert all(c >= 0 for c in self._reservations.values()), "a negative reservation"
        assert self.reserved_cells == sum(self._reservations.values()), "reservations drifted"
        assert self.held_cells >= 0, "more cells released than held"
        assert self.used_cells <= self.total_cells, (
            f"{self.used_cells} cells promised of {self.total_cells}"
        )
