import json

import pytest

from kv3d.config import ConfigError, KV3DConfig, load_config, seed_file_dict
from kv3d.engine.settings import (
    FALLBACK_CONTEXT_TOKENS,
    CapacityError,
    EngineSettings,
    plan_kv_cells,
    sequence_context_tokens,
)


def write(tmp_path, data) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_defaults_match_the_seed():
    cfg = KV3DConfig()
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert (cfg.cache.gpu_hot_mb, cfg.cache.ram_warm_mb) == (2048, 8192)


def test_file_then_env_then_overrides(tmp_path, monkeypatch):
    data = {"server": {"port": 9000, "host": "0.0.0.0"}, "cache": {"gpu_hot_mb": 64}}
    path = write(tmp_path, data)
    monkeypatch.setenv("KV3D_SERVER__PORT", "9100")
    cfg = load_config(path, overrides={"cache": {"gpu_hot_mb": 128}})
    assert cfg.server.port == 9100  # env beats file
    assert cfg.server.host == "0.0.0.0"  # file beats default
    assert cfg.cache.gpu_hot_mb == 128  # overrides beat file


def test_unknown_keys_and_bad_values_are_reported_by_field(tmp_path):
    with pytest.raises(ConfigError, match="server.port"):
        load_config(write(tmp_path, {"server": {"port": 0}}))
    with pytest.raises(ConfigError, match="cache.typo"):
        load_config(write(tmp_path, {"cache": {"typo": 1}}))


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_seed_file_schema_round_trips_through_load(tmp_path):
    data = seed_file_dict(KV3DConfig())
    assert set(data) == {"server", "cache", "model"}
    assert set(data["server"]) == {"host", "port", "threads", "api_key"}
    assert set(data["cache"]) == {"gpu_hot_mb", "ram_warm_mb", "ssd_cold_path"}
    assert set(data["model"]) == {"path", "id"}
    assert load_config(write(tmp_path, data)).server.port == 8080


def test_context_defaults_to_the_models_own(tmp_path):
    assert KV3DConfig().model.context_tokens == 0
    assert load_config(overrides={"model": {"context_tokens": 64}}).model.context_tokens == 64
    with pytest.raises(ConfigError, match="model.context_tokens"):
        load_config(overrides={"model": {"context_tokens": 32}})
    assert sequence_context_tokens(0, 8192) == 8192  # the model's
    assert sequence_context_tokens(2048, 8192) == 2048
    assert sequence_context_tokens(16384, 8192) == 8192  # never past what it was trained on
    assert sequence_context_tokens(0, 0) == FALLBACK_CONTEXT_TOKENS  # a GGUF that names none
    assert sequence_context_tokens(1024, 0) == 1024


class _FakeModel:
    """What plan_kv_cells reads of a model: its training context and bytes per cell."""

    n_ctx_train = 32768

    def kv_bytes_per_cell(self, kv_type: str) -> int:
        return 1 << 20  # 1 MiB a cell: a small budget is small in cells


def test_kv_plan_takes_the_models_context_and_names_it_when_the_budget_is_short():
    def plan(**model):
        cfg = load_config(overrides={"cache": {"gpu_hot_mb": 40000}, "model": model})
        return plan_kv_cells(EngineSettings.from_config(cfg), _FakeModel())

    assert plan() == (min(40000, 8 * 32768), 32768)
    assert plan(context_tokens=1024) == (8 * 1024, 1024)
    cfg = load_config(overrides={"cache": {"gpu_hot_mb": 2048}})
    with pytest.raises(CapacityError, match=r"32768 \(the model's training context\)"):
        plan_kv_cells(EngineSettings.from_config(cfg), _FakeModel())
