"""The CuPy codec must produce the NumPy reference's bytes. Skips where no GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d.engine import codec
from kv3d.engine.codec_gpu import gpu_available

pytestmark = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


def cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 3, (257, 192)).astype(np.float16)
    x[5, 40:72] = 0  # an all-zero group: scale 0, q 0
    x[9, :32] = np.arange(32) - 15.5  # halves: round half to even
    x[11, 3] = 6e4  # near the f16 maximum
    return [x, rng.normal(0, 1e-3, (3, 64)).astype(np.float16)]


@pytest.mark.parametrize("group", [32, 64])
def test_cupy_quantize_and_dequantize_match_numpy_bytes(group):
    gpu, ref = codec.select_backend("cupy"), codec.NumpyCodec()
    for x in cases():
        s_ref, q_ref = ref.quantize(x, group)
        s_gpu, q_gpu = gpu.quantize(x, group)
        assert s_gpu.tobytes() == s_ref.tobytes() and q_gpu.tobytes() == q_ref.tobytes()
        assert (
            gpu.dequantize(s_ref, q_ref, group).tobytes()
            == ref.dequantize(s_ref, q_ref, group).tobytes()
        )


def test_a_delta_encoded_on_the_gpu_decodes_to_the_same_blob(monkeypatch):
    from tests.unit.test_codec import make_state

    blob = make_state(cells=50, channels=128, layers=3)
    monkeypatch.setattr(codec, "_backend", codec.NumpyCodec())
    on_cpu = codec.encode_delta(blob)
    monkeypatch.setattr(codec, "_backend", codec.select_backend("cupy"))
    on_gpu = codec.encode_delta(blob)
    assert on_gpu == on_cpu
    assert codec.decode_delta(on_gpu) == codec.decode_delta(on_cpu)
