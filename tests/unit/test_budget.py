import pytest

from kv3d.engine.budget import KVBudget


def test_admission_needs_free_cells_and_held_cells_count():
    b = KVBudget(100)
    assert b.can_admit(100) and not b.can_admit(101)
    b.admit(0, 60)
    b.hold(30)
    assert b.used_cells == 90 and b.free_cells == 10
    assert b.can_admit(10) and not b.can_admit(11)
    assert b.shortfall(25) == 15 and b.shortfall(5) == 0
    b.check_invariants()


def test_cells_handed_to_a_prefix_move_from_reserved_to_held():
    b = KVBudget(100)
    b.admit(3, 70)
    b.unreserve(3, 40)  # its first 40 cells become a hot prefix
    b.hold(40)
    assert (b.reserved_cells, b.held_cells, b.used_cells) == (30, 40, 70)
    assert b.release(3) == 30
    assert b.used_cells == 40
    b.check_invariants()


def test_unreserve_stops_at_zero():
    b = KVBudget(100)
    b.admit(1, 10)
    b.unreserve(1, 25)  # re-keeps cells it shared from an older turn
    assert b.reserved_by(1) == 0 and b.reserved_cells == 0
    b.check_invariants()


def test_a_slot_holds_one_reservation_and_overcommit_is_caught():
    b = KVBudget(10)
    b.admit(0, 8)
    with pytest.raises(ValueError):
        b.admit(0, 1)
    b.reserve_more(0, 5)
    with pytest.raises(AssertionError):
        b.check_invariants()
