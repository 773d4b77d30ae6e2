#!/usr/bin/env bash
# The GPU checks that cannot run on a CPU-only machine, in one go: the CuPy codec's byte-for-byte
# golden tests against the NumPy reference, and the codec's speed per backend. Needs only NumPy,
# CuPy and pytest (no llama.cpp, no Ray). Writes its reports to ${OUT:-./gpu-check}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./gpu-check}"
mkdir -p "$out"
nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
python -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"
# --noconftest and an empty ini: the suite's conftest and ini need Ray and pydantic, which a
# bare GPU machine may lack; these tests need neither.
python -m pytest -q -p no:cacheprovider --noconftest -c /dev/null --rootdir . -rA \
  tests/unit/test_codec_gpu.py tests/unit/test_codec.py 2>&1 | tee "$out/pytest.txt"
status=${PIPESTATUS[0]}
python -m kv3d.bench.codec_speed --tokens 1024 --repeats 20 2>&1 | tee "$out/codec_speed.json"
python -m kv3d.bench.codec_speed --tokens 8192 --repeats 5 2>&1 | tee "$out/codec_speed_8k.json"
exit "$status"
