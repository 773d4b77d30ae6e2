"""The tests' `free_port`: a node's Ray ports are all taken before it starts, so one port
handed out twice made `ray start` refuse to run (it happened in CI)."""

from __future__ import annotations

from tests.conftest import free_port


def test_free_port_never_hands_out_a_port_twice():
    # 500 draws from the ~12,700 ports below the ephemeral range would repeat one almost surely
    # (birthday bound) if ports were not remembered.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
