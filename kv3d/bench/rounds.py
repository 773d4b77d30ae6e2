"""Repeated rounds of `kv3d bench --compare`: contenders alternated, figures taken as medians.

One run of each contender, one after the other, measures the machine's drift as much as the
servers on a small shared box: a neighbour's load or a slow minute moves a figure by more than
the differences being measured. Rounds alternate the order (A B, B A, A B, ...) so that drift
falls on each contender alike; a figure is the median over the rounds a contender ran, and a
ratio is the median of the ratios taken within each round, where both servers met the same
machine.
"""

from __future__ import annotations

import statistics
from typing import Any


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The contenders' order in each round: rotated by one each round, so that every contender
    runs first (and last) about as often as the others."""
    if not names:
        return [[] for _ in range(rounds)]
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(rounds)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def median_of(values: list[Any]) -> Any:
    """The median of a figure across rounds, recursively through dicts, over the rounds where it
    is not None; a figure that is not a number (a text, a list) is the first round's."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, dict) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: median_of([v[k] for v in present if k in v]) for k in keys}
    if all(_is_number(v) for v in present):
        middle = statistics.median(present)
        if all(isinstance(v, int) for v in present) and float(middle).is_integer():
            return int(middle)
        return round(middle, 6) if isinstance(middle, float) else middle
    return present[0]


def combine_entries(entries: list[dict]) -> dict:
    """One contender's rounds as one entry: medians over the rounds that ran without an error;
    the first error where none did. `rounds_ok` counts the rounds in the medians."""
    ran = [e for e in entries if not e.get("error")]
    if not ran:
        return {**entries[0], "rounds_ok": 0}
    return {**median_of(ran), "error": None, "rounds_ok": len(ran)}


def combine_ratios(per_round: list[dict[str, dict]]) -> dict[str, dict]:
    """Each contender's ratios against the anchor: per figure, the median of the ratios taken
    within each round."""
    names = list(dict.fromkeys(n for ratios in per_round for n in ratios))
    return {n: median_of([r[n] for r in per_round if n in r]) for n in names}


def ratio_series(per_round: list[dict[str, dict]], name: str, key: str) -> list[float | None]:
    """One ratio of one contender, round by round (None where that round lacks it)."""
    return [ratios.get(name, {}).get(key) for ratios in per_round]
