"""Encode/decode speed of the session delta codec per backend, on a synthetic session state shaped
like SmolLM2-135M's (30 layers, 192 K and 192 V channels, f16): `python -m
kv3d.bench.codec_speed [--tokens N] [--repeats R] [--codecs int8,int4]` prints one JSON object.
Needs only NumPy (and CuPy for the GPU backend), so it runs where neither llama.cpp nor Ray is
installed. Low-bit modes have only the NumPy backend: they are timed once, under "lowbit"."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kv3d.engine import codec
from kv3d.engine.rope import NORMAL, RopeSpec
from kv3d.engine.statefmt import CacheSection, LayerTensor, SeqState, StreamState, build_seq_state

F16 = 1
# SmolLM2-135M's RoPE (3 KV heads of 64 channels): what `int4p` turns keys back by.
SYNTHETIC_ROPE = RopeSpec(NORMAL, head_dim=64, n_rot=64, freq_scale=1.0, bases=(100000.0,))


def synthetic_state(tokens: int, layers: int = 30, channels: int = 192, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)

    def layer() -> LayerTensor:
        values = rng.normal(0, 2, (tokens, channels)).astype(np.float16)
        raw = np.ascontiguousarray(values).view(np.uint8).ravel()
        return LayerTensor(F16, raw, row_bytes=channels * 2)

    stream = StreamState(
        cell_positions=np.arange(tokens, dtype=np.int32),
        cell_seq_ids=tuple((0,) for _ in range(tokens)),
        cell_ext=None,
        v_trans=False,
        k_layers=tuple(layer() for _ in range(layers)),
        v_layers=tuple(layer() for _ in range(layers)),
    )
    return build_seq_state(SeqState(0, (CacheSection((stream,)),)))


def time_backend(name: str, blob: bytes, repeats: int, mode: str = "int8") -> dict:
    codec._backend = codec.select_backend(name)
    delta = codec.encode_delta(blob, mode, rope=SYNTHETIC_ROPE)  # warm-up (kernels, pools)
    codec.decode_delta(delta)
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        delta = codec.encode_delta(blob, mode, rope=SYNTHETIC_ROPE)
        t1 = time.perf_counter()
        codec.decode_delta(delta)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return {
        "backend": type(codec.backend()).__name__,
        "encode_ms_p50": round(1000 * float(np.median(enc)), 3),
        "decode_ms_p50": round(1000 * float(np.median(dec)), 3),
        "encode_ms_p95": round(1000 * float(np.percentile(enc, 95)), 3),
        "decode_ms_p95": round(1000 * float(np.percentile(dec, 95)), 3),
        "delta_bytes": len(delta),
        "delta": delta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default="numpy,cupy")
    parser.add_argument("--codecs", default="int8", help="int8 and/or low-bit modes (int4, ...)")
    args = parser.parse_args(argv)
    blob = synthetic_state(args.tokens)
    report: dict = {"tokens": args.tokens, "f16_bytes": len(blob), "backends": {}}
    deltas = {}
    for name in args.backends.split(","):
        try:
            result = time_backend(name, blob, args.repeats)
        except Exception as exc:  # a backend this machine lacks
            report["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        deltas[name] = result.pop("delta")
        report["backends"][name] = result
    if len(deltas) > 1:
        report["identical_deltas"] = len(set(deltas.values())) == 1
    for mode in (m for m in args.codecs.split(",") if m in codec.LOWBIT_MODES):
        result = time_backend("numpy", blob, args.repeats, mode)
        result.pop("delta")
        result["backend"] = "numpy"
        report.setdefault("lowbit", {})[mode] = result
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
