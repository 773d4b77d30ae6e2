"""Which runtime `kv3d serve` picks (`server.runtime`)."""

import pytest

from kv3d.config import load_config
from kv3d.server.local import resolve_runtime


@pytest.mark.parametrize(
    ("overrides", "ray_address", "expected"),
    [
        ({}, None, "process"),  # a laptop: one replica, no cluster
        ({}, "10.0.0.1:6379", "ray"),  # joining a cluster
        ({"deploy": {"replicas": 2}}, None, "ray"),
        ({"deploy": {"max_replicas": 4}}, None, "ray"),  # autoscaling needs Serve
        ({"server": {"runtime": "ray"}}, None, "ray"),
        ({"server": {"runtime": "process"}}, "10.0.0.1:6379", "process"),  # asked for
    ],
)
def test_auto_runtime_is_one_process_only_for_one_fixed_replica_without_a_cluster(
    overrides, ray_address, expected
):
    assert resolve_runtime(load_config(overrides=overrides), ray_address) == expected


def test_an_unknown_runtime_is_a_config_error():
    from kv3d.config import ConfigError

    with pytest.raises(ConfigError, match="runtime"):
        load_config(overrides={"server": {"runtime": "threads"}})
