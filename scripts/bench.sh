#!/usr/bin/env bash
# The seed's benchmark: the shared-prefix multi-turn chat workload against the server at
# KV3D_URL, or against a `kv3d serve` the bench starts there when nothing answers.
#
#   REQUESTS=1000 SHARED_RATIO=0.8 ./scripts/bench.sh [more `kv3d bench` flags]
#
# JSON report on stdout (add --json FILE to keep it), progress and a table on stderr.
# Runs `kv3d` from PATH, else `$KV3D_PYTHON -m kv3d.cli` (default python3, when it has kv3d).
set -euo pipefail

REQUESTS="${REQUESTS:-1000}"
SHARED_RATIO="${SHARED_RATIO:-0.8}"
KV3D_URL="${KV3D_URL:-http://127.0.0.1:8080}"

if command -v kv3d >/dev/null 2>&1; then
    kv3d=(kv3d)
else
    python="${KV3D_PYTHON:-python3}"
    if ! "$python" -c "import kv3d.cli, httpx" >/dev/null 2>&1; then
        echo "bench.sh: no kv3d on PATH and $python cannot import it; activate the" \
            "virtualenv KV3D is installed in, or set KV3D_PYTHON=/path/to/its/python" >&2
        exit 2
    fi
    kv3d=("$python" -m kv3d.cli)
fi

exec "${kv3d[@]}" bench --requests "$REQUESTS" --shared-ratio "$SHARED_RATIO" --url "$KV3D_URL" "$@"
