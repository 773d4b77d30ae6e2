"""The idle rent rule: the attention cost fit, the rent clock and when a session is due."""

from __future__ import annotations

import random

import pytest

from kv3d.engine.rent import MIN_OBSERVATIONS, AttentionCost, IdleRent


def step_s(
    tokens: int, cells: int, per_cell_token_s: float, noise: float = 0.0, prefill: int = 0
) -> float:
    # A fixed cost, the weights (per decode / prompt token), attention (per token per cell),
    # some jitter.
    attention = per_cell_token_s * (tokens + prefill) * cells
    return 0.004 + 0.002 * tokens + 0.0005 * prefill + attention + noise


def test_the_fit_recovers_the_cost_of_a_cell_from_steps_of_varied_size_and_fill():
    rng = random.Random(7)
    cost = AttentionCost()
    for _ in range(200):
        tokens, cells = rng.randint(1, 8), rng.randint(200, 6000)
        prefill = rng.choice((0, 0, 32, 100))  # prompt chunks ride along in some steps
        noise = rng.uniform(-5e-4, 5e-4)
        cost.observe(tokens, prefill, cells, step_s(tokens, cells, 1e-6, noise, prefill))
    assert cost.s_per_cell_token == pytest.approx(1e-6, rel=0.1)


def test_the_fit_stays_unknown_until_enough_steps_and_while_steps_are_all_alike():
    cost = AttentionCost()
    for _ in range(MIN_OBSERVATIONS - 1):
        cost.observe(4, 0, 1000, step_s(4, 1000, 15e-6))
    assert cost.s_per_cell_token is None  # too few steps
    for _ in range(100):
        cost.observe(4, 0, 1000, step_s(4, 1000, 15e-6))
    assert cost.s_per_cell_token is None  # the cells' share cannot be told from the rest


def test_no_cost_is_charged_when_cells_cost_nothing_or_the_steps_are_too_noisy_to_tell():
    rng = random.Random(3)
    free, noisy = AttentionCost(), AttentionCost()
    for _ in range(200):
        tokens, cells = rng.randint(1, 8), rng.randint(200, 6000)
        free.observe(tokens, 0, cells, 0.01 * tokens - 1e-7 * tokens * cells)
        # A real cost of 1e-8 s per cell-token under jitter a thousand times the cell's share.
        noisy.observe(tokens, 0, cells, step_s(tokens, cells, 1e-8, rng.gauss(0.0, 0.02)))
    assert free.s_per_cell_token is None
    assert noisy.s_per_cell_token is None


def trained(rent: IdleRent, per_cell_token_s: float = 1e-5) -> IdleRent:
    rng = random.Random(1)
    for _ in range(50):
        tokens, cells = rng.randint(1, 8), rng.randint(200, 6000)
        rent.after_step(tokens, 0, cells, step_s(tokens, cells, per_cell_token_s))
    return rent


def test_rent_accrues_per_token_of_every_step_prefill_included():
    rent = trained(IdleRent())
    before = rent.paid_s_per_cell
    rent.after_step(3, 100, 2000, step_s(3, 2000, 1e-5, prefill=100))
    assert rent.paid_s_per_cell - before == pytest.approx(103 * rent.cost.s_per_cell_token)


def test_nothing_accrues_before_the_cost_of_a_cell_is_known():
    rent = IdleRent()
    rent.after_step(8, 0, 3000, 0.1)
    assert rent.paid_s_per_cell == 0.0


def test_a_session_is_due_once_its_rent_reaches_the_measured_price():
    rent = trained(IdleRent())
    mark = rent.paid_s_per_cell
    assert not rent.due(mark)  # no price yet: neither a resume nor a recompute measured
    rent.demoted(0.002, 200)  # 10 µs per cell
    rent.resumed(0.040, 200)  # 200 µs per cell
    assert rent.price_s_per_cell == pytest.approx(210e-6)
    steps = 0
    while not rent.due(mark):
        assert steps < 1000, "never came due"  # fails, not hangs
        rent.after_step(8, 0, 3000, 0.3)
        steps += 1
    per_step = 8 * rent.cost.s_per_cell_token
    assert steps == pytest.approx(210e-6 / per_step, abs=1.5)


def test_the_price_is_a_measured_resume_else_the_start_up_round_trip():
    rent = trained(IdleRent())
    assert rent.price_s_per_cell is None
    rent.round_trip_s_per_cell = 0.0005
    assert rent.price_s_per_cell == pytest.approx(0.0005)
    rent.demoted(0.002, 200)
    rent.resumed(0.040, 200)
    assert rent.price_s_per_cell == pytest.approx(210e-6)


def test_a_larger_factor_keeps_sessions_hot_longer_and_zero_never_demotes():
    patient, never = trained(IdleRent(factor=3.0)), trained(IdleRent(factor=0.0))
    for rent in (patient, never):
        rent.resumed(0.010, 100)
    mark = patient.paid_s_per_cell
    for _ in range(1000):
        if patient.paid_s_per_cell - mark >= 2.0 * patient.price_s_per_cell:
            break
        patient.after_step(8, 0, 3000, 0.3)
        never.after_step(8, 0, 3000, 0.3)
    assert not patient.due(mark) and not never.due(0.0)
    for _ in range(1000):
        if patient.paid_s_per_cell - mark >= 3.0 * patient.price_s_per_cell:
            break
        patient.after_step(8, 0, 3000, 0.3)
    assert patient.due(mark)
