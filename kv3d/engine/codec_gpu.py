"""The int8 delta codec on an NVIDIA GPU: CuPy raw kernels, byte-identical to the NumPy path.

Same arithmetic as `kv3d.engine.codec` (f32 math, f16 scales rounded to nearest even, `rintf` =
round half to even, IEEE division): a delta encoded on one backend decodes on the other. CuPy is
imported lazily, only when this backend is selected (`pip install -e '.[gpu]'`).
"""

from __future__ import annotations

import numpy as np

_SOURCE = r"""
#include <cuda_fp16.h>

extern "C" __global__ void kv3d_quantize(const __half* x, __half* scales, signed char* q,
                                         int cells, int channels, int group) {
    int groups = channels / group;
    int gid = blockIdx.x * blockDim.x + threadIdx.x;   // one thread per (cell, group)
    if (gid >= cells * groups) return;
    int cell = gid / groups, g = gid % groups;
    const __half* row = x + (long long)cell * channels + (long long)g * group;
    float amax = 0.0f;
    for (int i = 0; i < group; ++i) amax = fmaxf(amax, fabsf(__half2float(row[i])));
    __half scale16 = __float2half_rn(amax / 127.0f);
    scales[gid] = scale16;
    float s = __half2float(scale16);
    float inv = s > 0.0f ? 1.0f / s : 0.0f;
    signed char* out = q + (long long)cell * channels + (long long)g * group;
    for (int i = 0; i < group; ++i) {
        float v = rintf(__half2float(row[i]) * inv);
        v = fminf(fmaxf(v, -127.0f), 127.0f);
        out[i] = (signed char)v;
    }
}

extern "C" __global__ void kv3d_dequantize(const __half* scales, const signed char* q,
                                           __half* x, int cells, int channels, int group) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // one thread per element
    if (i >= (long long)cells * channels) return;
    int cell = (int)(i / channels), ch = (int)(i % channels);
    float s = __half2float(scales[(long long)cell * (channels / group) + ch / group]);
    x[i] = __float2half_rn((float)q[i] * s);
}
"""

_THREADS = 256


class CupyCodec:
    """Quantise / dequantise (cells, channels) f16 arrays on the current CUDA device."""

    def __init__(self):
        import cupy  # noqa: PLC0415 - optional dependency, loaded only for this backend

        self._cp = cupy
        module = cupy.RawModule(code=_SOURCE, options=("--std=c++14",))
        self._quantize = module.get_function("kv3d_quantize")
        self._dequantize = module.get_function("kv3d_dequantize")

    def quantize(self, x16: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
        cp = self._cp
        cells, channels = x16.shape
        x = cp.asarray(np.ascontiguousarray(x16, dtype=np.float16))
        scales = cp.empty((cells, channels // group), dtype=cp.float16)
        q = cp.empty((cells, channels), dtype=cp.int8)
        n = cells * (channels // group)
        self._quantize(
            ((n + _THREADS - 1) // _THREADS,),
            (_THREADS,),
            (x, scales, q, np.int32(cells), np.int32(channels), np.int32(group)),
        )
        return cp.asnumpy(scales), cp.asnumpy(q)

    def dequantize(self, scales: np.ndarray, q: np.ndarray, group: int) -> np.ndarray:
        cp = self._cp
        cells, channels = q.shape
        x = cp.empty((cells, channels), dtype=cp.float16)
        n = cells * channels
        self._dequantize(
            ((n + _THREADS - 1) // _THREADS,),
            (_THREADS,),
            (
                cp.asarray(np.ascontiguousarray(scales)),
                cp.asarray(np.ascontiguousarray(q)),
                x,
                np.int32(cells),
                np.int32(channels),
                np.int32(group),
            ),
        )
        return cp.asnumpy(x)


def gpu_available() -> bool:
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
