"""f32 <-> f16 conversion of whole tensors, through llama.cpp's CPU backend where it is loaded.

A session delta is decoded into the f16 cells of a llama.cpp state and encoded from them, so
every codec converts every value once each way. NumPy converts one value at a time (about
1.5 ns a value on the project's reference CPU: for a 1k-token SmolLM2 session, 18 ms of an
int8 decode's 29); llama.cpp's CPU backend exports row converters that use the CPU's F16C /
AVX-512 instructions, 20-30x faster. Both round to nearest even and agree bit for bit on every
finite value (tested over all 65,536 f16 values and random f32 including halfway cases); NaN
payloads may differ, and the codecs never store a NaN.

Where the library or its symbols are missing (another llama.cpp build, a backend loaded as a
plugin), NumPy converts: same values, slower.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_ROW = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
_converters: tuple | None = None  # (to_f16, to_f32) or () when unavailable


def _library_names() -> list[str]:
    if sys.platform == "darwin":
        return ["libggml-cpu.dylib"]
    if sys.platform == "win32":
        return ["ggml-cpu.dll"]
    return ["libggml-cpu.so"]


def _load() -> tuple:
    try:
        import llama_cpp

        folder = Path(llama_cpp.__file__).parent / "lib"
        for name in _library_names():
            if (folder / name).exists():
                lib = ctypes.CDLL(str(folder / name))  # CDLL: the GIL is released in calls
                break
        else:
            raise OSError(f"no {' or '.join(_library_names())} in {folder}")
        lib.ggml_cpu_init.argtypes, lib.ggml_cpu_init.restype = [], None
        lib.ggml_cpu_init()  # the scalar tail of a row uses tables this fills (idempotent)
        to_f16, to_f32 = lib.ggml_cpu_fp32_to_fp16, lib.ggml_cpu_fp16_to_fp32
        for fn in (to_f16, to_f32):
            fn.argtypes, fn.restype = _ROW, None
        return (to_f16, to_f32)
    except (ImportError, OSError, AttributeError) as exc:
        log.info("f16 conversion by NumPy (llama.cpp's CPU converters unavailable: %s)", exc)
        return ()


def _get() -> tuple:
    global _converters
    if _converters is None:
        _converters = _load()
    return _converters


def accelerated() -> bool:
    """Whether llama.cpp's converters are in use."""
    return bool(_get())


def _direct(dest: np.ndarray, src: np.ndarray) -> bool:
    return dest.shape == src.shape and dest.flags.c_contiguous and src.flags.c_contiguous


def store_f16(dest: np.ndarray, src: np.ndarray) -> None:
    """dest[...] = src for an f16 `dest` and an f32 `src` of its shape."""
    conv = _get()
    if conv and src.dtype == np.float32 and _direct(dest, src) and dest.dtype == np.float16:
        conv[0](src.ctypes.data, dest.ctypes.data, src.size)
    else:
        dest[...] = src


def as_f16(src: np.ndarray) -> np.ndarray:
    """A new f16 array of an f32 `src`'s values (rounded to nearest even)."""
    out = np.empty(src.shape, np.float16)
    store_f16(out, src)
    return out


def as_f32(src: np.ndarray) -> np.ndarray:
    """A new f32 array of an f16 `src`'s values."""
    out = np.empty(src.shape, np.float32)
    conv = _get()
    if conv and src.dtype == np.float16 and src.flags.c_contiguous:
        conv[1](src.ctypes.data, out.ctypes.data, src.size)
    else:
        out[...] = src
    return out
