#!/usr/bin/env python3
"""What one KV cache for every sequence costs a decode step, against a cache per sequence.

llama.cpp's unified cache (KV3D's layout, needed to share a prefix's cells) makes every token
of a step attend over every used cell, other sequences' masked but visited; with a stream per
sequence (llama-server's layout) a token visits only its own. For each `SEQUENCESxCELLS` case
this fills one sequence with `CELLS` prompt tokens, loads its state into the others (so each
holds cells of its own), then times decode steps of one token per sequence, once per layout.

    python scripts/unified_cache_cost.py 8x512 8x2048 16x1024 --steps 10

Prints one JSON object: the median and fastest step in ms per case and layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kv3d.engine.llama import (  # noqa: E402
    ContextParams,
    LlamaBatch,
    LlamaContext,
    LlamaModel,
)
from kv3d.engine.modelfile import bundled_model_path  # noqa: E402

BATCH_TOKENS = 512
WARMUP_STEPS = 2


def step_times_ms(
    model: LlamaModel, *, sequences: int, cells: int, steps: int, threads: int, unified: bool
) -> list[float]:
    params = ContextParams(
        # A cache per sequence gives each the context divided by the sequences: leave room for
        # the steps after the prompt in each.
        n_ctx_cells=(cells + BATCH_TOKENS) * sequences,
        n_seq_max=sequences,
        n_batch_tokens=BATCH_TOKENS,
        n_threads=threads,
        n_threads_single=threads,
        unified=unified,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(100, model.n_vocab - 100, size=cells).tolist()
    with LlamaContext(model, params) as ctx, LlamaBatch(BATCH_TOKENS) as batch:
        for start in range(0, cells, BATCH_TOKENS):
            batch.clear()
            for offset, token in enumerate(tokens[start : start + BATCH_TOKENS]):
                batch.add(token, start + offset, 0, False)
            ctx.decode(batch)
        state = ctx.seq_state(0)
        for seq_id in range(1, sequences):
            ctx.set_seq_state(seq_id, state)
        times_ms = []
        for step in range(WARMUP_STEPS + steps):
            batch.clear()
            for seq_id in range(sequences):
                batch.add(int(rng.integers(100, 1000)), cells + step, seq_id, True)
            started = time.perf_counter()
            ctx.decode(batch)
            times_ms.append((time.perf_counter() - started) * 1e3)
    return times_ms[WARMUP_STEPS:]


def parse_case(text: str) -> tuple[int, int]:
    sequences, _, cells = text.lower().partition("x")
    try:
        case = int(sequences), int(cells)
    except ValueError:
        case = (0, 0)
    if min(case) < 1:
        raise argparse.ArgumentTypeError(f"expected SEQUENCESxCELLS, both >= 1, got {text!r}")
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=parse_case, metavar="SEQUENCESxCELLS")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: bundled)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report = {"cases": []}
    with LlamaModel(args.model or bundled_model_path()) as model:
        for sequences, cells in args.cases:
            case = {"sequences": sequences, "cells": cells}
            for layout, unified in (("unified", True), ("per_sequence", False)):
                times_ms = step_times_ms(
                    model,
                    sequences=sequences,
                    cells=cells,
                    steps=args.steps,
                    threads=args.threads,
                    unified=unified,
                )
                case[f"{layout}_step_ms"] = {
                    "median": round(statistics.median(times_ms), 1),
                    "min": round(min(times_ms), 1),
                }
            report["cases"].append(case)
            print(json.dumps(case), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
