"""The layers of the tree: imports go one way, from the CLI down to the engine core.

    kv3d.cli  ->  kv3d.bench  ->  deployments  ->  kv3d.server  ->  kv3d.engine  ->  kv3d.config

Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {
    "kv3d.config": 0,
    "kv3d.engine": 1,
    "kv3d.server": 2,
    "deployments": 3,
    "kv3d.bench": 4,
    "kv3d.cli": 5,
}
# Third-party packages a layer must not import: the engine core runs without Ray and HTTP.
FORBIDDEN = {
    "kv3d.engine": {"ray", "fastapi", "starlette", "uvicorn", "httpx", "prometheus_client"},
    "kv3d.server": {"ray"},
}


def layer_of(module: str) -> str | None:
    for layer in sorted(RANK, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
            found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return found


def sources() -> list[Path]:
    files = sorted((ROOT / "kv3d").rglob("*.py")) + sorted((ROOT / "deployments").glob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts]


def test_every_module_belongs_to_a_layer():
    stray = [module_name(f) for f in sources() if layer_of(module_name(f)) is None]
    assert stray == ["kv3d"]  # only the package's own __init__ sits above the layers


@pytest.mark.parametrize("path", sources(), ids=lambda p: module_name(p))
def test_imports_go_down_the_layers(path):
    here = layer_of(module_name(path))
    if here is None:
        return
    for imported, _ in imports_of(path):
        there = layer_of(imported)
        if there is not None:
            assert RANK[there] <= RANK[here], f"{module_name(path)} imports {imported}"
        top_package = imported.split(".")[0]
        assert top_package not in FORBIDDEN.get(here, ()), f"{module_name(path)} imports {imported}"


def test_no_import_cycle_between_modules():
    known = {module_name(f): f for f in sources()}
    graph = {
        name: {m for m, top in imports_of(path) if top and m in known and m != name}
        for name, path in known.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def run_probe(code: str) -> str:
    """What `code` prints in a fresh interpreter (nothing imported before it)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.strip()


def test_the_engine_core_runs_without_ray_http_or_the_layers_above():
    probe = (
        "import sys\n"
        "import kv3d.engine.engine, kv3d.engine.sessions, kv3d.engine.codec\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('ray', 'fastapi', 'starlette', 'deployments') or m.startswith(('kv3d.server', "
        "'kv3d.bench', 'kv3d.cli'))]\n"
        "print(','.join(sorted(bad)))\n"
    )
    assert run_probe(probe) == ""


def test_leaf_modules_of_the_engine_load_no_native_library():
    # The codec and state-format code also run where llama-cpp-python is not installed (the
    # GPU check machine).
    probe = (
        "import sys\n"
        "import kv3d.engine.codec, kv3d.engine.statefmt, kv3d.engine.tiers\n"
        "print('llama_cpp' in sys.modules)\n"
    )
    assert run_probe(probe) == "False"
