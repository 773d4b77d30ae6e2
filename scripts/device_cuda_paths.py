#!/usr/bin/env python3
"""Finds what a CUDA build of llama.cpp links against, where the toolkit beside nvcc lacks it.

The toolkit on these machines may be assembled from NVIDIA's pip wheels without cuBLAS (this
project's own CPU machine has nvcc and cudart but no cuBLAS); PyTorch's environment carries cuBLAS
as a wheel (site-packages/nvidia/cu13/{include,lib}), and the driver's libcuda may sit outside
the toolkit. Prints shell assignments for scripts/device_check.sh:

    CUDA_CMAKE_ARGS='...'   extra CMake cache entries (-DCUDA_cublas_LIBRARY=..., include flags)
    CUDA_LD_PATH='...'      folders the built library needs at run time (for LD_LIBRARY_PATH)
    CUDA_NOTES='...'        what was found where, for the log

Usage: device_cuda_paths.py NVCC_PATH
"""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path


def toolkit_dirs(nvcc: str) -> tuple[list[Path], list[Path]]:
    roots = []
    if nvcc:
        roots.append(Path(os.path.realpath(nvcc)).parent.parent)
    roots += [Path(p) for p in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if p]
    if not roots:
        roots.append(Path("/usr/local/cuda"))
    inc, lib = [], []
    for r in roots:
        inc += [r / "include", r / "targets" / "x86_64-linux" / "include"]
        lib += [r / "lib64", r / "lib", r / "targets" / "x86_64-linux" / "lib"]
    return inc, lib


def wheel_dirs() -> tuple[list[Path], list[Path]]:
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    inc, lib = [], []
    for s in sorted(p for p in sites if p and os.path.isdir(os.path.join(p, "nvidia"))):
        base = Path(s) / "nvidia"
        for sub in ("cu13", "cublas", "cu12"):
            inc.append(base / sub / "include")
            lib.append(base / sub / "lib")
    return inc, lib


def first(dirs: list[Path], pattern: str) -> Path | None:
    for d in dirs:
        hits = sorted(glob.glob(str(d / pattern)))
        if hits:
            return Path(hits[0])
    return None


def driver_lib(tk_lib: list[Path]) -> Path | None:
    found = first([d / "stubs" for d in tk_lib] + tk_lib, "libcuda.so")
    if found:
        return found
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if "libcuda.so" in line and "x86-64" in line and "=>" in line:
                return Path(line.split("=>")[1].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return first(
        [
            Path("/usr/local/nvidia/lib64"),
            Path("/usr/local/nvidia/lib"),
            Path("/usr/lib/x86_64-linux-gnu"),
            Path("/usr/lib64"),
        ],
        "libcuda.so*",
    )


def main(argv: list[str]) -> int:
    nvcc = argv[1] if len(argv) > 1 else ""
    tk_inc, tk_lib = toolkit_dirs(nvcc)
    wh_inc, wh_lib = wheel_dirs()
    args, ld, notes = [], [], []

    if first(tk_inc, "cublas_v2.h"):
        notes.append("cublas_v2.h: toolkit")
    else:
        header = first(wh_inc, "cublas_v2.h")
        if header:
            d = str(header.parent)
            args += [f"-DCMAKE_CUDA_FLAGS=-I{d}", f"-DCMAKE_CXX_FLAGS=-I{d}"]
            notes.append(f"cublas_v2.h: {d}")
        else:
            notes.append("cublas_v2.h: NOT FOUND")

    for name in ("cublas", "cublasLt"):
        if first(tk_lib, f"lib{name}.so"):
            notes.append(f"lib{name}: toolkit")
            continue
        lib = first(wh_lib, f"lib{name}.so*")
        if lib:
            args.append(f"-DCUDA_{name}_LIBRARY={lib}")
            ld.append(str(lib.parent))
            notes.append(f"lib{name}: {lib}")
        else:
            notes.append(f"lib{name}: NOT FOUND")

    drv = driver_lib(tk_lib)
    if drv is None:
        # Without libcuda to link, ggml can still build: it then skips its VMM memory pool.
        args.append("-DGGML_CUDA_NO_VMM=ON")
        notes.append("libcuda: NOT FOUND (GGML_CUDA_NO_VMM=ON)")
    elif not any(str(drv).startswith(str(d)) for d in tk_lib):
        args.append(f"-DCUDA_cuda_driver_LIBRARY={drv}")
        notes.append(f"libcuda: {drv}")
    else:
        notes.append(f"libcuda: toolkit ({drv})")

    print(f"CUDA_CMAKE_ARGS={shlex.quote(' '.join(args))}")
    print(f"CUDA_LD_PATH={shlex.quote(':'.join(dict.fromkeys(ld)))}")
    print(f"CUDA_NOTES={shlex.quote('; '.join(notes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
