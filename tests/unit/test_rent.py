"""The idle rent rule: the attention cost fit, the rent clock and when a session is due."""

from __future__ import annotations

import random

import pytest

from kv3d.engine.rent import MIN_OBSERVATIONS, AttentionCost, IdleRent, MoveCost


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
    assert not rent.due(mark, 200)  # no price yet: neither a resume nor a round trip measured
    rent.demoted(0.002, 200)  # 10 µs per cell
    rent.resumed(0.040, 200)  # 200 µs per cell
    assert rent.price_s(200) == pytest.approx(0.042)
    steps = 0
    while not rent.due(mark, 200):
        assert steps < 1000, "never came due"  # fails, not hangs
        rent.after_step(8, 0, 3000, 0.3)
        steps += 1
    per_step = 8 * rent.cost.s_per_cell_token
    assert steps == pytest.approx(210e-6 / per_step, abs=1.5)


def test_rent_that_tokens_about_to_run_will_charge_counts_towards_the_price():
    rent = trained(IdleRent())
    mark = rent.paid_s_per_cell
    rent.resumed(0.040, 200)  # 200 µs per cell
    per_token = rent.cost.s_per_cell_token
    needed = 200e-6 / per_token  # tokens whose attention over one cell costs its price
    assert not rent.due(mark, 200)
    assert not rent.due(mark, 200, ahead_tokens=int(needed * 0.9))
    assert rent.due(mark, 200, ahead_tokens=int(needed * 1.1) + 1)
    assert rent.paid_s_per_cell == mark  # looking ahead charges nothing
    assert not IdleRent(factor=0).due(0.0, 200, ahead_tokens=10**9)


def test_the_price_is_a_measured_resume_else_the_start_up_round_trips():
    rent = trained(IdleRent())
    assert rent.price_s(100) is None
    rent.round_trip = MoveCost.of(((30, 0.012), (240, 0.021)))  # the line through both
    round_trip_1000 = 0.012 + (1000 - 30) * (0.021 - 0.012) / (240 - 30)
    assert rent.price_s(1000) == pytest.approx(round_trip_1000)
    rent.demoted(0.002, 200)
    assert rent.price_s(1000) == pytest.approx(round_trip_1000)  # a demotion is half a move
    rent.resumed(0.040, 200)
    assert rent.price_s(200) == pytest.approx(0.042)
    rent.encoded(0.006, 200)  # off the step thread, on the cores the steps use
    assert rent.price_s(200) == pytest.approx(0.048)


def test_a_family_prefix_with_a_stored_snapshot_is_priced_at_its_restore_alone():
    rent = trained(IdleRent())
    assert rent.restore_price_s(200) is None
    rent.round_trip = MoveCost.of(((30, 0.012), (240, 0.021)))
    assert rent.restore_price_s(240) == pytest.approx(0.021)  # the round trip until a resume
    rent.demoted(0.002, 200)
    rent.encoded(0.006, 200)
    rent.resumed(0.040, 200)
    assert rent.restore_price_s(200) == pytest.approx(0.040)  # nothing to export or encode
    assert rent.price_s(200) == pytest.approx(0.048)
    mark = rent.paid_s_per_cell
    steps_stored = steps_session = None
    for steps in range(1, 1000):
        rent.after_step(8, 0, 3000, 0.3)
        if steps_stored is None and rent.due(mark, 200, stored=True):
            steps_stored = steps
        if rent.due(mark, 200):
            steps_session = steps
            break
    assert steps_stored is not None and steps_session is not None
    assert steps_stored == pytest.approx(steps_session * 40 / 48, abs=1.5)


def test_a_move_has_a_fixed_part_so_a_short_session_pays_more_rent_per_cell():
    cost = MoveCost()
    for cells in (40, 400, 1200, 80, 800):
        cost.observe(cells, 0.005 + 20e-6 * cells)
    assert cost.seconds(0) == pytest.approx(0.005)
    assert cost.seconds(2000) == pytest.approx(0.045)
    rent = trained(IdleRent())
    rent.resume_cost = cost
    mark = rent.paid_s_per_cell
    # A steady rent per cell until the 1,000-cell session is due (25 µs per cell)...
    while not rent.due(mark, 1000):
        rent.after_step(8, 0, 3000, 0.3)
    assert rent.paid_s_per_cell - mark >= 25e-6
    # ...when a 50-cell session, whose move is mostly its fixed 5 ms, still owes 95 of 120 µs.
    assert not rent.due(mark, 50)


def test_moves_of_one_size_scale_with_cells_and_noise_never_makes_a_price_negative():
    one_size = MoveCost.of(((500, 0.010), (500, 0.012)))
    assert one_size.seconds(1000) == pytest.approx(0.022, rel=0.01)  # the later weighs more
    assert MoveCost().seconds(500) is None
    slower_small = MoveCost.of(((100, 0.020), (1000, 0.010)))  # bigger moves timed faster
    assert slower_small.seconds(550) == pytest.approx(0.015, rel=0.05)
    steep = MoveCost.of(((100, 0.001), (200, 0.010)))  # a line below zero at no cells
    assert steep.seconds(0) == 0.0 and steep.seconds(150) > 0
    assert MoveCost.of(()) is None


def test_an_idle_session_with_no_cells_of_its_own_is_never_due():
    rent = trained(IdleRent())
    rent.resumed(0.001, 100)
    for _ in range(100):
        rent.after_step(8, 0, 3000, 0.3)
    assert rent.due(0.0, 100) and not rent.due(0.0, 0)


def test_the_cost_of_a_cell_holds_while_steps_are_alike_and_drops_when_they_show_less():
    rent = trained(IdleRent(), per_cell_token_s=1e-7)  # about what a CPU step shows
    known = rent.cost.s_per_cell_token
    assert known == pytest.approx(1e-7, rel=0.1)
    rng = random.Random(5)
    for i in range(500):  # a lone stream: one token a step over the cells it adds, jittery
        cells = 3000 + i
        rent.after_step(1, 0, cells, step_s(1, cells, 1e-7, rng.uniform(-1e-3, 1e-3)))
    assert rent.cost.s_per_cell_token == pytest.approx(known, rel=0.1)
    for _ in range(500):  # varied steps over cells that now cost nothing
        tokens, cells = rng.randint(1, 8), rng.randint(200, 6000)
        rent.after_step(tokens, 0, cells, step_s(tokens, cells, 0.0, rng.uniform(-5e-4, 5e-4)))
    assert rent.cost.s_per_cell_token is None


def test_a_larger_factor_keeps_sessions_hot_longer_and_zero_never_demotes():
    patient, never = trained(IdleRent(factor=3.0)), trained(IdleRent(factor=0.0))
    for rent in (patient, never):
        rent.resumed(0.010, 100)
    mark = patient.paid_s_per_cell
    for _ in range(1000):
        if (patient.paid_s_per_cell - mark) * 100 >= 2.0 * patient.price_s(100):
            break
        patient.after_step(8, 0, 3000, 0.3)
        never.after_step(8, 0, 3000, 0.3)
    assert not patient.due(mark, 100) and not never.due(0.0, 100)
    for _ in range(1000):
        if (patient.paid_s_per_cell - mark) * 100 >= 3.0 * patient.price_s(100):
            break
        patient.after_step(8, 0, 3000, 0.3)
    assert patient.due(mark, 100)
