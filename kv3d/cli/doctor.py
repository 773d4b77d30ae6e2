"""`kv3d doctor`: check the install, say what to do about each failure, write the default config."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kv3d.config import DEFAULT_CONFIG_PATH, KV3DConfig, load_config, seed_file_dict

PINNED_LLAMA_CPP = "0.3.36"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, sys.version.split()[0] + ("" if ok else ": KV3D needs >= 3.11"))


def check_llama_cpp() -> Check:
    version = _version("llama-cpp-python")
    if version is None:
        return Check("llama-cpp-python", False, "not installed: pip install -e .")
    try:
        from kv3d.engine.llama import supports_gpu_offload, system_info
    except Exception as exc:  # a broken native build fails here
        return Check("llama-cpp-python", False, f"{version} does not import: {exc}")
    backend = "GPU offload" if supports_gpu_offload() else "CPU only"
    detail = f"{version}, {backend}; {system_info()}"
    if version != PINNED_LLAMA_CPP:
        return Check(
            "llama-cpp-python",
            False,
            f"{detail} — KV3D is pinned to {PINNED_LLAMA_CPP}: pip install -e . to fix",
        )
    return Check("llama-cpp-python", True, detail)


def check_ray() -> Check:
    version = _version("ray")
    if version is None:
        return Check("ray[serve]", False, "not installed: pip install -e .")
    try:
        importlib.import_module("ray.serve")
    except Exception as exc:
        return Check("ray[serve]", False, f"ray {version} without Serve ({exc}): pip install -e .")
    return Check("ray[serve]", True, version)


def check_model(config: KV3DConfig) -> Check:
    from kv3d.engine.llama import LlamaModel
    from kv3d.engine.modelfile import resolve_model_path

    try:
        path = resolve_model_path(config.model.path)
        with LlamaModel(path) as model:
            template = "chat template" if model.chat_template() else "NO chat template (ChatML)"
            detail = f"{path} ({model.description}, n_ctx_train {model.n_ctx_train}, {template})"
    except Exception as exc:
        return Check("model", False, f"{exc}; set model.path or pass --model PATH")
    return Check("model", True, detail)


def check_gpu() -> Check:
    try:
        cupy = importlib.import_module("cupy")
        count = cupy.cuda.runtime.getDeviceCount()
        return Check("cupy/gpu", True, f"CuPy {cupy.__version__}, {count} GPU(s)", required=False)
    except Exception as exc:
        reason = type(exc).__name__
        return Check(
            "cupy/gpu", True, f"no GPU codec ({reason}); the CPU path is used", required=False
        )


def ensure_config_file(path: Path) -> Check:
    if path.exists():
        return Check("config", True, f"{path} exists", required=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seed_file_dict(KV3DConfig()), indent=2) + "\n")
    return Check("config", True, f"wrote defaults to {path}")


def run_doctor(config_path: str | None) -> int:
    path = Path(config_path).expanduser() if config_path else DEFAULT_CONFIG_PATH
    checks: list[Check] = [ensure_config_file(path)]
    try:
        config = load_config(path)
    except Exception as exc:
        checks.append(Check("config", False, f"{exc}; fix or delete {path}"))
        config = KV3DConfig()
    steps: list[Callable[[], Check]] = [
        check_python,
        check_llama_cpp,
        check_ray,
        lambda: check_model(config),
        check_gpu,
    ]
    checks.extend(step() for step in steps)
    failed = False
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        failed |= check.required and not check.ok
        print(f"[{mark}] {check.name}: {check.detail}")
    verdict = "some required checks failed" if failed else "all required checks passed"
    print(f"kv3d doctor: {verdict}")
    return 1 if failed else 0
