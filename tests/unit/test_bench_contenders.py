"""How `kv3d bench --compare` starts KV3D: the workload with llama-server's KV memory, the
capacity probe in the fixed budget."""

from __future__ import annotations

from pathlib import Path

from kv3d.bench import compare
from kv3d.bench.compare import CompareSettings, build_contenders, workload_kv_mb

CELL_BYTES = 23_040  # SmolLM2-135M, f16 K and V over 30 layers


def test_workload_budget_is_llama_servers_slots_and_never_below_the_fixed_one():
    settings = CompareSettings(kv_budget_mb=128, context_tokens=4096)
    assert workload_kv_mb(settings, 8, CELL_BYTES) == 720  # 8 slots of 4,096 cells
    assert workload_kv_mb(settings, 1, CELL_BYTES) == 128
    assert workload_kv_mb(CompareSettings(kv_budget_mb=1000), 8, CELL_BYTES) == 1000


def test_capacity_server_gets_the_fixed_budget_and_the_workload_server_the_slots(tmp_path: Path):
    settings = CompareSettings(contenders=("kv3d", "kv3d-no-reuse"), kv_budget_mb=128)
    workload_mb = workload_kv_mb(settings, 8, CELL_BYTES)
    contenders, _ = build_contenders(settings, tmp_path / "m.gguf", 8, workload_mb)
    for contender in contenders.values():
        workload = compare._server_process(contender, tmp_path / "w.log")
        capacity = compare._server_process(contender, tmp_path / "c.log", for_capacity=True)
        assert workload.env["KV3D_CACHE__GPU_HOT_MB"] == "720"
        assert capacity.env["KV3D_CACHE__GPU_HOT_MB"] == "128"
        assert capacity.env["KV3D_ENGINE__MAX_SEQUENCES"] == "96"  # the rest unchanged
    assert "720 MiB" in contenders["kv3d"].about and "128 MiB" in contenders["kv3d"].about
