#!/usr/bin/env bash
# Packs what the GPU machine lacks into build/device/ (git-ignored), to travel as one `carry` path
# of the device tool's `run` (64 MiB per call, working tree included). Runs HERE, on a machine
# with pip's registry or cache; the GPU machine can download nothing.
#
#   build/device/llama-cpp-python-0.3.36-trimmed.tar.gz  llama-cpp-python's sdist without
#       llama.cpp's models, docs, tests, examples, media, tools (but mtmd) and the ggml backends
#       a CUDA + CPU build never reads; builds as the full sdist does (scripts/device_check.sh)
#   build/device/wheels/      what `kv3d.engine` imports that the GPU machine lacks (pydantic and
#       its parts, pydantic-settings, python-dotenv, diskcache, a recent typing-extensions) and
#       the build backend (scikit-build-core, pathspec); pydantic-core for CPython 3.11-3.14
#   build/device/smollm2-tokenizer.json.gz  the bundled SmolLM2's tokenizer (vocabulary, merges,
#       token types, special ids, chat template) for scripts/make_test_gguf.py, so that the 98 MB
#       model need not travel
#
# Usage: scripts/device_pack.sh [--sdist PATH]   (or KV3D_LLAMA_SDIST=PATH)
# Needs: the project's venv (.venv) or a python with pip and kv3d importable (for the bundled
# model's path). Prints the size of each part and the total; fails over 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

LLAMA_VERSION=0.3.36
SDIST_NAME="llama_cpp_python-${LLAMA_VERSION}.tar.gz"
# The versions the project's tests run with (pydantic pins pydantic-core exactly).
WHEELS_PURE=(
  "pydantic==2.14.4"
  "pydantic-settings==2.16.3"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
  "typing-extensions==4.16.0"
  "python-dotenv==1.2.4"
  "diskcache==5.6.3"
  "scikit-build-core==1.1.2"
  "pathspec==1.1.1"
  "packaging==26.4"
)
PYDANTIC_CORE="pydantic-core==2.50.5"
CORE_PYTHONS=(3.11 3.12 3.13 3.14)   # the GPU machine's python was 3.12.3 when last seen
LIMIT_MIB=60

sdist="${KV3D_LLAMA_SDIST:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sdist) sdist="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

py=python3
[[ -x "$repo/.venv/bin/python" ]] && py="$repo/.venv/bin/python"

out=build/device
cache=build/device-cache
work=build/device-work
rm -rf "$out" "$work"
mkdir -p "$out/wheels" "$cache" "$work"

# --- 1. the sdist ------------------------------------------------------------------------------
if [[ -z "$sdist" ]]; then
  sdist="$cache/$SDIST_NAME"
  if [[ ! -f "$sdist" ]]; then
    for d in ${PIP_FIND_LINKS:-} "$(pip cache dir 2>/dev/null || true)"; do
      found=$(find "$d" -name "$SDIST_NAME" -print -quit 2>/dev/null || true)
      if [[ -n "$found" ]]; then cp "$found" "$sdist"; break; fi
    done
  fi
  if [[ ! -f "$sdist" ]]; then
    echo "== downloading the llama-cpp-python $LLAMA_VERSION sdist"
    "$py" -m pip download -q "llama-cpp-python==$LLAMA_VERSION" --no-deps --no-binary :all: \
      -d "$cache"
  fi
fi
[[ -f "$sdist" ]] || { echo "no sdist at $sdist" >&2; exit 1; }
echo "== sdist: $sdist ($(du -m "$sdist" | cut -f1) MiB)"

# --- 2. trim it --------------------------------------------------------------------------------
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_VERSION"
lc="$src/vendor/llama.cpp"
[[ -f "$lc/CMakeLists.txt" ]] || { echo "unexpected sdist layout" >&2; exit 1; }

# llama-cpp-python's own extras (the build reads CMakeLists.txt, pyproject.toml, README.md,
# llama_cpp/ and vendor/llama.cpp).
# .git: the sdist carries the upstream repository's packed history (39 MB); without it (and
# llama.cpp's .git link into it) llama.cpp's build info says "unknown" instead of a commit.
rm -rf "$src"/{examples,docs,docker,tests,scripts,.github,.git} "$src/vendor/llama.cpp/.git"
# llama.cpp: nothing under these is read when it is a subdirectory of another project
# (LLAMA_STANDALONE off: no tests, examples, tools, server, app).
rm -rf "$lc"/{models,docs,media,examples,tests,benches,pocs,conversion,scripts,skills,\
requirements,grammars,ci,.github,.devops,.gemini,.pi,app}
rm -f "$lc"/convert_*.py "$lc"/build-xcframework.sh "$lc"/flake.nix
# tools/: only mtmd is ever added (by llama-cpp-python's LLAVA_BUILD, on by default; the checks
# turn it off, but the tree keeps it so a default build still configures).
find "$lc/tools" -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
# ggml backends a CUDA + CPU build never adds (ggml_add_backend adds a directory only when its
# GGML_<NAME> option is on). Kept: cpu, cuda, blas, rpc.
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
  rm -rf "$lc/ggml/src/ggml-$b"
done
# llama-cpp-python forces llama.cpp's `common` library (and cpp-httplib) on, though its Python
# package never loads them: half the CPU time of a CPU build (730 of 1490 CPU-s measured here).
# Drop the FORCE so that -DLLAMA_BUILD_COMMON=OFF can turn it off; the default stays ON.
forced='set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
grep -qF "$forced" "$src/CMakeLists.txt" || { echo "CMakeLists.txt: no forced common" >&2; exit 1; }
sed -i "s|${forced}|${forced% FORCE)})|" "$src/CMakeLists.txt"
grep -qF "$forced" "$src/CMakeLists.txt" && { echo "CMakeLists.txt: patch failed" >&2; exit 1; }
for need in CMakeLists.txt pyproject.toml README.md llama_cpp/__init__.py \
  vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt vendor/llama.cpp/ggml/src/ggml-cpu/CMakeLists.txt \
  vendor/llama.cpp/common/CMakeLists.txt vendor/llama.cpp/vendor/CMakeLists.txt \
  vendor/llama.cpp/gguf-py/gguf/__init__.py; do
  [[ -e "$src/$need" ]] || { echo "trimmed tree lacks $need" >&2; exit 1; }
done
tarball="$out/llama-cpp-python-$LLAMA_VERSION-trimmed.tar.gz"
tar -C "$work" -czf "$tarball" "llama_cpp_python-$LLAMA_VERSION"
echo "== trimmed tree: $(du -sm "$src" | cut -f1) MiB unpacked, $(du -m "$tarball" | cut -f1) MiB packed"

# --- 3. wheels ---------------------------------------------------------------------------------
echo "== wheels"
"$py" -m pip download -q --no-deps --only-binary :all: -d "$out/wheels" "${WHEELS_PURE[@]}"
for v in "${CORE_PYTHONS[@]}"; do
  tag="cp${v/./}"
  "$py" -m pip download -q --no-deps --only-binary :all: -d "$out/wheels" \
    --python-version "$v" --implementation cp --abi "$tag" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 "$PYDANTIC_CORE" \
    || echo "   (no $PYDANTIC_CORE wheel for CPython $v)"
done
ls -1 "$out/wheels"

# --- 4. the tokenizer the test model borrows ---------------------------------------------------
model=$("$py" -c "from kv3d.engine.modelfile import bundled_model_path; print(bundled_model_path())")
echo "== tokenizer from $model"
"$py" scripts/make_test_gguf.py dump-tokenizer \
  --from "$model" --out "$out/smollm2-tokenizer.json.gz"

# --- 5. sizes ----------------------------------------------------------------------------------
(cd "$out" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$work/MANIFEST.sha256"
mv "$work/MANIFEST.sha256" "$out/MANIFEST.sha256"
total=$(du -sb "$out" | cut -f1)
echo "== build/device:"
du -sh "$out"/* | sed 's/^/   /'
echo "== total: $(awk -v b="$total" 'BEGIN{printf "%.1f", b/1048576}') MiB (limit ${LIMIT_MIB} MiB;" \
  "the device call carries 64 MiB with the working tree)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "build/device is over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
