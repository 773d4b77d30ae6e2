"""notebooks/: every notebook runs headless on the bundled model and plots what it measured.

Each notebook is read into memory and executed there with nbclient (the file in the repository is
never written), on a kernel that runs this interpreter: the one that has kv3d installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]'")
kernelspec = pytest.importorskip("ipykernel.kernelspec", reason="pip install -e '.[test]'")

from jupyter_client import AsyncKernelManager  # noqa: E402 (after the skips)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

pytestmark = pytest.mark.integration

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
KERNEL = "python3"
# Per cell; each notebook takes about a minute on a 2-core CPU. Generous: CPUs are shared in CI.
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A "python3" kernel spec whose argv starts with this interpreter's absolute path, so that
    no other python3 kernel installed on the machine (user or system Jupyter dirs) is used."""
    kernels = tmp_path_factory.mktemp("kernels")
    kernelspec.write_kernel_spec(kernels / KERNEL)
    return [str(kernels)]


def execute(path: Path, kernel_dirs: list[str]):
    nb = nbformat.read(path, as_version=4)  # an in-memory copy: outputs never reach the repo
    km = AsyncKernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    # Raises CellExecutionError on the first cell that fails; cleanup_kc: shut the kernel down
    # afterwards (nbclient leaves a kernel manager it was handed running otherwise).
    client.execute(cleanup_kc=True)
    return nb


def outputs(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "a notebook without code cells measures nothing"
    assert all(not cell.outputs and cell.execution_count is None for cell in code), (
        "strip the outputs before committing"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_plots(path, kernel_dirs):
    nb = execute(path, kernel_dirs)
    outs = outputs(nb)
    errors = [out for out in outs if out.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    images = [out for out in outs if "image/png" in out.get("data", {})]
    assert images, "the notebook ran but plotted nothing (no image/png output)"
