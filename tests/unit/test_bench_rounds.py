"""Rounds of `kv3d bench --compare`: the order alternated, figures as medians, ratios as the
median of each round's ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv3d.bench import compare
from kv3d.bench.compare import CompareSettings, Contender, _ratios
from kv3d.bench.rounds import combine_entries, combine_ratios, median_of, round_orders
from kv3d.bench.workload import WorkloadSpec


def test_every_contender_goes_first_in_turn():
    assert round_orders(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert round_orders([], 2) == [[], []]


def test_median_walks_dicts_and_keeps_what_is_not_a_number():
    rounds = [
        {"rps": 2.0, "ttft_s": {"p95": 5.0}, "n": 3, "about": "x", "gone": None},
        {"rps": 3.0, "ttft_s": {"p95": 4.0}, "n": 5, "about": "y", "gone": 1.0},
        {"rps": 9.0, "ttft_s": {"p95": 6.0}, "n": 4, "about": "z"},
    ]
    assert median_of(rounds) == {
        "rps": 3.0,
        "ttft_s": {"p95": 5.0},
        "n": 4,
        "about": "x",
        "gone": 1.0,  # the rounds that have it
    }
    assert median_of([True, False, False]) is True  # a flag is not averaged
    assert median_of([None, None]) is None
    assert median_of([1, 2]) == 1.5


def test_a_failed_round_is_left_out_and_counted():
    ok = {"workload": {"requests_per_s": 2.0}, "error": None}
    failed = {"error": "not ready"}
    combined = combine_entries([failed, ok, {**ok, "workload": {"requests_per_s": 4.0}}])
    assert combined["workload"]["requests_per_s"] == 3.0
    assert combined["error"] is None and combined["rounds_ok"] == 2
    assert combine_entries([failed, failed]) == {"error": "not ready", "rounds_ok": 0}


def _entry(rps: float, first_p95: float) -> dict:
    return {
        "workload": {
            "requests_per_s": rps,
            "ttft_s": {"p95": first_p95},
            "ttft_first_turn_s": {"p95": first_p95},
            "ttft_later_turns_s": {"p95": 0.5},
        },
        "error": None,
    }


def test_ratios_are_medians_of_the_ratios_within_each_round():
    # The machine slows down between rounds: both servers alike within a round.
    rounds = [
        {"kv3d": _entry(3.0, 2.0), "llama-server": _entry(2.0, 4.0)},
        {"kv3d": _entry(1.5, 4.0), "llama-server": _entry(1.0, 8.0)},
        {"kv3d": _entry(1.0, 9.0), "llama-server": _entry(1.0, 9.0)},
    ]
    per_round = [_ratios(r)[1] for r in rounds]
    kv3d = combine_ratios(per_round)["kv3d"]
    assert kv3d["requests_per_s_vs_anchor"] == 1.5
    assert kv3d["ttft_first_turn_p95_vs_anchor"] == 0.5
    assert kv3d["ttft_later_turns_p95_vs_anchor"] == 1.0


def test_rounds_alternate_contenders_and_probe_capacity_once_each(monkeypatch, tmp_path: Path):
    calls: list[tuple[str, bool]] = []
    speeds = iter([3.0, 2.0, 1.0, 1.5, 1.2, 1.0])

    def fake_run(contender, spec, settings, log_dir, progress, *, capacity, log_suffix):
        calls.append((contender.name, capacity))
        if contender.name == "kv3d" and not calls[:-1]:
            return {"error": "first start failed"}
        entry = _entry(next(speeds), 1.0)
        return entry | ({"capacity": {"peak": 40}} if capacity else {})

    monkeypatch.setattr(compare, "_run_contender", fake_run)
    contenders = {n: Contender(n, n, ("true",)) for n in ("kv3d", "llama-server")}
    rounds = compare._run_rounds(
        contenders, WorkloadSpec(), CompareSettings(rounds=3), tmp_path, None
    )
    # kv3d failed in round 1, so its capacity is probed in round 2; llama-server's once.
    assert calls == [
        ("kv3d", True),
        ("llama-server", True),
        ("llama-server", False),
        ("kv3d", True),
        ("kv3d", False),
        ("llama-server", False),
    ]
    assert [list(r) for r in rounds] == [["kv3d", "llama-server"]] * 3


def test_comparison_table_shows_the_rounds_spread():
    rounds = [
        {"kv3d": _entry(3.0, 2.0), "llama-server": _entry(2.0, 4.0)},
        {"kv3d": _entry(1.0, 4.0), "llama-server": _entry(1.0, 8.0)},
    ]
    report = {
        "contenders": {"kv3d": {"error": None}, "llama-server": {"error": "x"}},
        "anchor": "llama-server",
        "rounds": [
            {"contenders": r, "anchor": a, "ratios": ratios}
            for r, (a, ratios) in zip(rounds, map(_ratios, rounds), strict=True)
        ],
    }
    rows = compare._round_rows(report, "kv3d")
    assert rows["requests/s vs llama-server, by round"] == "1.5, 1"
    assert rows["TTFT p95 first turns vs llama-server, by round"] == "0.5, 0.5"
    assert compare._round_rows({**report, "rounds": None}, "kv3d") == {}


@pytest.mark.parametrize("rounds", [0, -1])
def test_rounds_must_be_positive(rounds):
    with pytest.raises(ValueError, match="rounds"):
        CompareSettings(rounds=rounds)
