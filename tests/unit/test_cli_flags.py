"""`kv3d serve`'s flags: generated from KV3DConfig, llama-server's names on top, same precedence.

Nothing here starts a server: argv is parsed and turned into a config, or rejected.
"""

from __future__ import annotations

import json
import os

import pytest

import kv3d.config
from kv3d.cli import flags
from kv3d.cli.main import build_parser, main
from kv3d.config import KV3DConfig


@pytest.fixture(autouse=True)
def no_outside_config(monkeypatch, tmp_path):
    """No user config file and no KV3D_* variable from the machine running the tests."""
    monkeypatch.setattr(kv3d.config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.json")
    for name in list(os.environ):
        if name.startswith("KV3D_"):
            monkeypatch.delenv(name)


def config_of(*argv: str, path: str | None = None) -> KV3DConfig:
    args = build_parser().parse_args(["serve", *argv])
    return flags.config_from_args(path, args)


def every_key():
    """The config's keys, walked here rather than through flags.py so a broken walk shows."""
    for section, section_field in KV3DConfig.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():
            yield f"{section}.{name}", field


def as_argv(key: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{key}" if value else f"--no-{key}"]
    return [f"--{key}", "none" if value is None else str(value)]


def test_every_field_of_every_section_has_a_flag_that_sets_it():
    keys = list(every_key())
    assert len(keys) > 40  # the walk saw the sections, not an empty model
    for key, field in keys:
        default = field.get_default(call_default_factory=True)
        args = build_parser().parse_args(["serve", *as_argv(key, default)])
        section, name = key.split(".")
        assert flags.overrides(args) == {section: {name: default}}, key


def test_unset_flags_leave_the_config_alone():
    assert flags.overrides(build_parser().parse_args(["serve"])) == {}
    assert config_of() == KV3DConfig()


def test_flags_of_each_kind_land_in_the_config():
    config = config_of(
        "--engine.kv_type",
        "q8_0",
        "--no-prefix.enabled",
        "--deploy.num_gpus",
        "0.5",
        "--server.admin_api_key",
        "boss",
        "--route.policy",
        "pow2",
        "--model.n_gpu_layers",
        "12",
    )
    assert config.engine.kv_type == "q8_0" and config.prefix.enabled is False
    assert config.deploy.num_gpus == 0.5 and config.server.admin_api_key == "boss"
    assert config.route.policy == "pow2" and config.model.n_gpu_layers == 12


@pytest.mark.parametrize(
    "argv, section, name, value",
    [
        (["-m", "/models/q.gguf"], "model", "path", "/models/q.gguf"),
        (["--model", "/models/q.gguf"], "model", "path", "/models/q.gguf"),
        (["-c", "8192"], "model", "context_tokens", 8192),
        (["--ctx-size", "8192"], "model", "context_tokens", 8192),
        (["-np", "16"], "engine", "max_sequences", 16),
        (["--parallel", "16"], "engine", "max_sequences", 16),
        (["-ngl", "99"], "model", "n_gpu_layers", 99),
        (["--n-gpu-layers", "-1"], "model", "n_gpu_layers", -1),
        (["-ngl", "none"], "model", "n_gpu_layers", None),
        (["-t", "3"], "server", "threads", 3),
        (["--threads", "3"], "server", "threads", 3),
        (["--api-key", "k1,k2"], "server", "api_key", "k1,k2"),
        (["--host", "0.0.0.0"], "server", "host", "0.0.0.0"),
        (["--port", "9001"], "server", "port", 9001),
        (["--kv-type", "q8_0"], "engine", "kv_type", "q8_0"),
        (["--replicas", "2"], "deploy", "replicas", 2),
        (["--safe-mode"], "server", "safe_mode", True),
    ],
)
def test_short_names_map_to_one_config_field(argv, section, name, value):
    args = build_parser().parse_args(["serve", *argv])
    assert flags.overrides(args) == {section: {name: value}}
    assert getattr(getattr(config_of(*argv), section), name) == value


def test_every_alias_names_a_real_key():
    assert set(flags.ALIASES) <= {key for key, _ in every_key()}


def test_flags_beat_env_which_beats_the_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"server": {"port": 9000, "host": "10.0.0.1"}}))
    monkeypatch.setenv("KV3D_SERVER__PORT", "9100")
    from_env = config_of(path=str(path))
    assert (from_env.server.port, from_env.server.host) == (9100, "10.0.0.1")
    from_flag = config_of("--port", "9200", path=str(path))
    assert (from_flag.server.port, from_flag.server.host) == (9200, "10.0.0.1")


def test_a_none_flag_beats_a_number_from_the_file_and_env(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": {"n_gpu_layers": 20}, "server": {"port": 9000}}))
    assert config_of(path=str(path)).model.n_gpu_layers == 20
    config = config_of("-ngl", "none", path=str(path))
    assert config.model.n_gpu_layers is None and config.server.port == 9000
    monkeypatch.setenv("KV3D_MODEL__N_GPU_LAYERS", "30")
    assert config_of("--model.n_gpu_layers", "NONE", path=str(path)).model.n_gpu_layers is None


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--kv-type", "q4_0"], "engine.kv_type"),
        (["--engine.kv_type", "bf16"], "engine.kv_type"),
        (["--port", "70000"], "server.port"),
        (["-c", "lots"], "model.context_tokens"),
        (["-ngl", "all"], "model.n_gpu_layers"),
        (["--prefix.max_hot", "0"], "prefix.max_hot"),
        (["--route.policy", "random"], "route.policy"),
        (["--deploy.num_cpus", "-1"], "deploy.num_cpus"),
    ],
)
def test_a_bad_value_exits_2_with_one_error_line_naming_the_field(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0] and repr(argv[1]) in errors[0], err
    assert "Traceback" not in err


def test_a_rule_across_fields_exits_2_naming_them(capsys):
    assert main(["serve", "--replicas", "3", "--deploy.max_replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_replicas" in err and "Traceback" not in err


def test_an_unknown_key_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--server.prot", "1"])
    assert exit_.value.code == 2 and "--server.prot" in capsys.readouterr().err


def test_abbreviations_are_refused_so_new_fields_cannot_make_them_ambiguous():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--repl", "2"])


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    keys = list(every_key())
    for key, _ in keys:
        assert f"--{key}" in text, key
    assert text.count("(default: ") == len(keys)
    assert "--port, --server.port INT HTTP port. (default: 8080)" in text
    ctx_help = text.split("-c, --ctx-size, --model.context_tokens INT", 1)[1]
    assert ctx_help.split("(default: ", 1)[1].startswith("0)")
    assert "--kv-type, --engine.kv_type {f16,q8_0} llama.cpp KV cache element type." in text
    assert "-ngl, --n-gpu-layers, --model.n_gpu_layers INT|none" in text
    assert "--prefix.enabled, --no-prefix.enabled" in text
    assert "(default: none)" in text and '(default: "")' in text and "(default: true)" in text
