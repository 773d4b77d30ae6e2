#!/usr/bin/env bash
# The GPU machine's whole check in one call (scripts/README.md has the `run` invocation):
#
#   info      python, nvcc, cmake, GPU
#   wheels    build/device/wheels installed offline into a folder put on PYTHONPATH
#   build     llama-cpp-python 0.3.36 from build/device's trimmed sdist, CUDA for sm_90 (in the
#             background from the start: it is the long pole)
#   cupy      scripts/gpu_check.sh (CuPy codec byte-equality tests, codec speed), meanwhile
#   gguf      scripts/make_test_gguf.py: a SmolLM2-shaped random-weight model, meanwhile
#   probe     scripts/device_probe.py on that model, every layer on the GPU
#
# Each stage has a time limit inside one overall budget (KV3D_DEVICE_BUDGET_S, default 560 s,
# under the tool's 600 s), writes its log under $OUT and the script goes on past a failed one:
# a failed CUDA build still leaves the CuPy results. $OUT ends with at most 8 files (the tool
# returns no more): summary.json, info.log, build.log, cupy.log, gguf.log, probe.log,
# probe.json, extra.tar.gz.
#
# KV3D_DEVICE_DRY_RUN=1: the same on a machine without a GPU: a CPU build of the same source
# (GGML_CUDA off), the CuPy stage reports "no GPU" and is skipped, the probe runs on the CPU.
# Other knobs: PYTHON (python3), KV3D_DEVICE_JOBS (build jobs; all cores), KV3D_DEVICE_CARRY
# (build/device), KV3D_DEVICE_WORK (/tmp/kv3d-device, emptied first), KV3D_DEVICE_BUILD_DIR
# (CMake's build folder, $WORK/llama-build; one kept from an earlier run makes a rerun of the same
# tree incremental), KV3D_PROBE_ARGS (extra probe flags).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}
"$PY" --version 2>&1
T0=$SECONDS
OUT=${OUT:-$repo/build/device-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DRY=${KV3D_DEVICE_DRY_RUN:-0}
BUDGET=${KV3D_DEVICE_BUDGET_S:-560}
CARRY=${KV3D_DEVICE_CARRY:-$repo/build/device}
WORK=${KV3D_DEVICE_WORK:-/tmp/kv3d-device}
JOBS=${KV3D_DEVICE_JOBS:-$(nproc)}
SITE=$WORK/site
BUILD_DIR=${KV3D_DEVICE_BUILD_DIR:-$WORK/llama-build}
rm -rf "$WORK"
mkdir -p "$WORK/extra" "$SITE"
STAGES=$WORK/stages.tsv
: >"$STAGES"

elapsed() { echo $((SECONDS - T0)); }
left() { echo $((BUDGET - (SECONDS - T0))); }
# stamp: prefix each line with the seconds since the script started (where time went)
stamp() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%4d %s\n' "$((SECONDS - T0))" "$line"
  done
}
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STAGES"; }
# cap LIMIT RESERVE: LIMIT, or what the budget leaves after RESERVE seconds for later stages
cap() { local l; l=$(($(left) - $2)); ((l < $1)) && echo "$l" || echo "$1"; }
# run_stage NAME LIMIT LOG CMD...: runs CMD under `timeout`, records rc and seconds
run_stage() {
  local name=$1 limit=$2 log=$3 t rc
  shift 3
  if ((limit < 5)); then
    echo "[$name] skipped: no time left" | tee -a "$log"
    record "$name" skipped 0 0 "no time left"
    return 0
  fi
  echo "== [$name] limit ${limit}s, at $(elapsed)s"
  t=$SECONDS
  timeout -k 10 "$limit" "$@" > >(stamp >>"$log") 2>&1
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status=failed
  record "$name" "$status" "$rc" "$((SECONDS - t))"
  echo "== [$name] $status (rc $rc) in $((SECONDS - t))s"
  return 0
}

# --- info ----------------------------------------------------------------------------------
info=$OUT/info.log
{
  echo "dry_run=$DRY budget=${BUDGET}s jobs=$JOBS carry=$CARRY"
  date -u
  uname -a
  "$PY" --version
  command -v "$PY"
  nproc
  free -g 2>/dev/null | head -2
  df -h /tmp 2>/dev/null | tail -1
  command -v nvcc && nvcc --version | tail -2
  cmake --version | head -1
  ninja --version 2>/dev/null | sed 's/^/ninja /'
  timeout 20 nvidia-smi 2>&1 | head -20
  "$PY" -m pip --version
  "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("numpy", "cupy-cuda13x", "pytest", "jinja2", "pyyaml", "typing-extensions",
             "packaging", "scikit-build-core", "cmake", "ninja", "pydantic", "llama-cpp-python"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
EOF
  ls -la "$CARRY" "$CARRY/wheels"
  (cd "$CARRY" && sha256sum -c --quiet MANIFEST.sha256 && echo "carry: checksums ok")
} >"$info" 2>&1
record info ok 0 "$(elapsed)"
timeout 20 nvidia-smi -L 2>/dev/null
command -v nvcc >/dev/null && nvcc --version | grep -i release

# --- wheels (needed by the build backend and the engine) ----------------------------------------
run_stage wheels "$(cap 90 0)" "$info" \
  "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
  --find-links "$CARRY/wheels" --target "$SITE" \
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions \
  python-dotenv diskcache scikit-build-core pathspec packaging
export PYTHONPATH="$SITE:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# --- build (background) ----------------------------------------------------------------------
build_log=$OUT/build.log
src=""
tar -xzf "$CARRY"/llama-cpp-python-*-trimmed.tar.gz -C "$WORK" 2>>"$build_log" \
  && src=$(ls -d "$WORK"/llama_cpp_python-* | head -1)
nvcc_bin=$(command -v nvcc || true)
[[ -x /usr/local/cuda/bin/nvcc ]] && nvcc_bin=/usr/local/cuda/bin/nvcc
# cuBLAS and libcuda where the toolkit beside nvcc lacks them (PyTorch's cuBLAS wheel, the driver)
CUDA_CMAKE_ARGS="" CUDA_LD_PATH="" CUDA_NOTES=""
eval "$("$PY" scripts/device_cuda_paths.py "$nvcc_bin" 2>>"$build_log")"
echo "nvcc: ${nvcc_bin:-none}; $CUDA_NOTES" >>"$build_log"
if [[ "$DRY" == 1 ]]; then
  cmake_args="-DGGML_CUDA=off"
else
  cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF"
  cmake_args+=" -DGGML_CUDA_COMPRESSION_MODE=none${nvcc_bin:+ -DCMAKE_CUDA_COMPILER=$nvcc_bin}"
  cmake_args+=" $CUDA_CMAKE_ARGS"
  tk=$(dirname "$(dirname "$(readlink -f "${nvcc_bin:-/usr/local/cuda/bin/nvcc}")")")
  export LD_LIBRARY_PATH="${CUDA_LD_PATH:+$CUDA_LD_PATH:}$tk/lib64:$tk/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# LLAVA_BUILD=OFF: no libmtmd (KV3D never loads it; llama_cpp imports it only on use).
# LLAMA_BUILD_COMMON=OFF: no common / cpp-httplib (nothing loads them; device_pack.sh patch).
cmake_args+=" -DLLAVA_BUILD=OFF -DLLAMA_BUILD_COMMON=OFF -DGGML_NATIVE=ON"
PROBE_RESERVE=75 # the gguf stage overlaps the build; the probe (~30 s on a GPU) and summary follow
build_limit=$(cap 100000 "$PROBE_RESERVE")
echo "CMAKE_ARGS=$cmake_args jobs=$JOBS limit=${build_limit}s" >>"$build_log"
build_t0=$SECONDS
if [[ -n "$src" ]]; then
  (
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
      timeout -k 10 "$build_limit" "$PY" -m pip install -v --no-index --no-deps \
      --no-build-isolation --no-compile --disable-pip-version-check --target "$SITE" \
      --config-settings=build-dir="$BUILD_DIR" "$src" 2>&1 | stamp >>"$build_log"
    echo "${PIPESTATUS[0]}" >"$WORK/build.rc"
  ) &
  build_pid=$!
  echo "== [build] started in the background, limit ${build_limit}s, at $(elapsed)s"
else
  echo "no trimmed source in $CARRY" | tee -a "$build_log"
  echo 1 >"$WORK/build.rc"
  build_pid=""
fi

# --- cupy (meanwhile) --------------------------------------------------------------------------
cupy_log=$OUT/cupy.log
if [[ "$DRY" != 1 ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  # The codec speed it prints is measured while the build keeps the cores busy.
  run_stage cupy "$(cap 150 "$PROBE_RESERVE")" "$cupy_log" \
    env OUT="$WORK/extra/gpu-check" bash scripts/gpu_check.sh
else
  echo "no GPU: the CuPy stage is skipped" | tee "$cupy_log"
  record cupy skipped 0 0 "no GPU"
fi

# --- gguf (meanwhile): the test model, SmolLM2's tokenizer and shape, random weights ----------
gguf_log=$OUT/gguf.log
model=$WORK/kv3d-test-smollm2.gguf
run_stage gguf "$(cap 90 "$PROBE_RESERVE")" "$gguf_log" \
  "$PY" scripts/make_test_gguf.py write \
  --tokenizer "$CARRY/smollm2-tokenizer.json.gz" --shape smollm2 --out "$model"

# --- the build's end ---------------------------------------------------------------------------
if [[ -n "$build_pid" ]]; then
  echo "== [build] waiting, at $(elapsed)s"
  wait "$build_pid"
fi
rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
status=ok
((rc == 124 || rc == 137)) && status=timeout
((rc != 0 && rc != 124 && rc != 137)) && status=failed
record build "$status" "$rc" "$((SECONDS - build_t0))" "$cmake_args"
echo "== [build] $status (rc $rc) in $((SECONDS - build_t0))s"
ls -la "$SITE/llama_cpp/lib" >>"$build_log" 2>&1

# --- probe -------------------------------------------------------------------------------------
probe_log=$OUT/probe.log
if [[ "$status" == ok && -f "$model" ]]; then
  gpu_layers=-1
  [[ "$DRY" == 1 ]] && gpu_layers=0
  # shellcheck disable=SC2086
  run_stage probe "$(cap 240 10)" "$probe_log" \
    "$PY" scripts/device_probe.py --model "$model" --out "$OUT/probe.json" \
    --gpu-layers "$gpu_layers" ${KV3D_PROBE_ARGS:-}
else
  echo "probe skipped: build $status, model $([[ -f $model ]] && echo present || echo missing)" \
    | tee "$probe_log"
  record probe skipped 0 0 "build $status"
fi

# --- extra files and the summary -----------------------------------------------------------
b=$BUILD_DIR
for f in CMakeCache.txt CMakeFiles/CMakeConfigureLog.yaml CMakeFiles/CMakeError.log \
  .ninja_log; do
  [[ -f "$b/$f" ]] && cp "$b/$f" "$WORK/extra/$(basename "$f")"
done
cp "$STAGES" "$WORK/extra/stages.tsv"
tar -C "$WORK" -czf "$OUT/extra.tar.gz" extra 2>/dev/null
if [[ $(stat -c %s "$build_log" 2>/dev/null || echo 0) -gt 12000000 ]]; then
  gzip -f "$build_log"
fi

"$PY" - "$STAGES" "$OUT" "$WORK" "$DRY" "$(elapsed)" <<'EOF'
import json, re, sys
from pathlib import Path
stages_path, out, work, dry, total = sys.argv[1:]
out, work = Path(out), Path(work)
summary = {"dry_run": dry == "1", "total_s": int(total), "stages": {}}
for line in Path(stages_path).read_text().splitlines():
    name, status, rc, secs, note = (line.split("\t") + [""] * 5)[:5]
    summary["stages"][name] = {"status": status, "rc": int(rc), "s": int(secs), "note": note}
gc = work / "extra" / "gpu-check"
pt = gc / "pytest.txt"
if pt.is_file():
    tail = [l for l in pt.read_text(errors="replace").splitlines() if re.search(r"passed|failed|error", l)]
    summary["cupy_pytest"] = tail[-1] if tail else None
for name in ("codec_speed.json", "codec_speed_8k.json"):
    f = gc / name
    if f.is_file():
        try:
            summary[name.removesuffix(".json")] = json.loads(f.read_text())
        except ValueError:
            summary[name.removesuffix(".json")] = f.read_text()[-2000:]
if (gc / "gpu.txt").is_file():
    summary["gpu"] = (gc / "gpu.txt").read_text().strip()
probe = out / "probe.json"
if probe.is_file():
    p = json.loads(probe.read_text())
    keep = ("ok", "gpu_offload", "python", "errors", "engine", "anchor", "multi", "snapshot", "phase_s")
    summary["probe"] = {k: p.get(k) for k in keep}
    s = p.get("single") or {}
    summary["probe"]["single_decode_tok_s"] = s.get("decode_tok_s_best")
    summary["probe"]["single_decode_tok_s_median"] = s.get("decode_tok_s_median")
summary["ok"] = all(v["status"] in ("ok", "skipped") for v in summary["stages"].values()) and bool(
    summary.get("probe", {}).get("ok"))
text = json.dumps(summary, indent=2)
(out / "summary.json").write_text(text + "\n")
print(text)
EOF
echo "== done in $(elapsed)s; \$OUT holds: $(ls "$OUT" | tr '\n' ' ')"
"$PY" -c "import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" \
  "$OUT/summary.json"
