"""f16 conversion through llama.cpp's CPU converters: the same bits as NumPy's, any shape."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from kv3d.engine import f16


def every_finite_f16() -> np.ndarray:
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    return h[np.isfinite(h)]


def hard_f32(rng: np.random.Generator) -> np.ndarray:
    """f32 values in f16 range over every exponent, plus each exactly halfway between two f16
    neighbours (round to even decides), plus subnormals."""
    wide = rng.standard_normal(200_001).astype(np.float32)
    wide *= np.exp2(rng.integers(-30, 16, wide.size)).astype(np.float32)
    exact = every_finite_f16().astype(np.float32)
    halfway = (exact.view(np.uint32) + np.uint32(1 << 12)).view(np.float32)
    x = np.concatenate([wide, exact, halfway])
    return x[np.abs(x) < 65504]  # an odd count: the converters' scalar tails run too


@pytest.mark.skipif(sys.platform != "linux", reason="the converters' library is checked on Linux")
def test_llama_cpp_converters_are_found_next_to_the_bundled_backend():
    assert f16.accelerated()


def test_to_f16_rounds_exactly_as_numpy():
    x = hard_f32(np.random.default_rng(0))
    assert x.size % 8
    assert np.array_equal(f16.as_f16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))


def test_to_f32_is_exact_for_every_finite_f16():
    h = every_finite_f16()
    assert np.array_equal(f16.as_f32(h).view(np.uint32), h.astype(np.float32).view(np.uint32))


def test_strided_and_mismatched_arrays_still_convert():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 48)).astype(np.float32)
    dest = np.zeros((48, 64), np.float16)
    f16.store_f16(dest.T, x)  # a transposed destination
    assert np.array_equal(dest.T, x.astype(np.float16))
    h = x.astype(np.float16)
    assert np.array_equal(f16.as_f32(h[:, ::2]), h[:, ::2].astype(np.float32))
    wide = np.zeros((64, 48), np.float16)
    f16.store_f16(wide[:, :24], x[:, :24])  # a non-contiguous slice of rows
    assert np.array_equal(wide[:, :24], x[:, :24].astype(np.float16)) and not wide[:, 24:].any()
