#!/usr/bin/env python3
"""The engine on one machine, in-process (no Ray, no HTTP): decode speed and snapshot exactness.

Run by scripts/device_check.sh on the GPU machine (all layers offloaded) and by its dry run on
a CPU. Phases, each on its own (a failed phase is recorded and the next one runs):

1. `anchor`: llama-cpp-python's own `Llama.generate`, one stream, greedy: the baseline the
   engine is held to (DESIGN §6).
2. `single`: one `Engine`, one request at a time, `ignore_eos`: decode tokens/s after the first
   token, and time to first token.
3. `multi`: the same engine, N concurrent requests sharing a system prompt: aggregate tokens/s.
4. `snapshot`: the exactness check of tests/integration/test_prefix_reuse.py: a miss computes
   the family prefix and publishes it as a snapshot; a hit shares its cells; a fresh engine
   restores the snapshot into a fresh sequence. The top-20 logprobs of the first token after
   the prefix must be bit-identical across the three (chunking is held fixed).

Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llama_cpp  # noqa: E402

from kv3d.config import load_config  # noqa: E402
from kv3d.engine.engine import Engine, new_request_id  # noqa: E402
from kv3d.engine.generation import (  # noqa: E402
    Finished,
    GenerationRequest,
    Rejected,
    SamplingParams,
    TextDelta,
)
from kv3d.engine.llama import on_own_thread, supports_gpu_offload, system_info  # noqa: E402
from kv3d.server.chat import ChatMessage, Tokenizer  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
# The exactness test's system prompt (~300 tokens, under 512 cells: see test_prefix_reuse.py).
SYSTEM = (
    "You are the support assistant of a company that builds inference servers. Answer briefly, "
    "cite the documentation section you rely on, and never invent configuration keys. "
) * 8
QUESTIONS = [
    "How do I change the port?",
    "Which metrics exist?",
    "How are sessions stored?",
    "What does safe mode do?",
    "How do I add an API key?",
    "Where do snapshots live?",
    "How many replicas should I run?",
    "What is the KV budget?",
    "How is the cache shared between tenants?",
    "What does the dashboard show?",
    "Can I stream responses?",
    "How do I run the benchmark?",
    "What limits apply to max_tokens?",
    "How do I enable structured output?",
    "Which models are supported?",
    "What happens when the queue is full?",
]


def engine_config(model: Path, gpu_layers: int | None, threads: int, max_sequences: int, **kw):
    overrides = {
        "cache": {"gpu_hot_mb": 256},
        "server": {"threads": threads, "max_queued_requests": 64},
        "model": {"path": str(model), "context_tokens": 2048, "n_gpu_layers": gpu_layers},
        "engine": {"max_sequences": max_sequences},
        "prefix": {"snapshot_min_tokens": 16},
    }
    for section, values in kw.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(overrides=overrides)


def chat_request(tok: Tokenizer, question: str, max_tokens: int, **kw) -> GenerationRequest:
    msgs = [ChatMessage("system", SYSTEM), ChatMessage("user", question)]
    prompt = tok.encode_chat(msgs)
    return GenerationRequest(
        new_request_id(),
        tuple(prompt),
        max_tokens,
        GREEDY,
        family_tokens=tok.family_tokens(msgs, prompt),
        **kw,
    )


def fresh(r: GenerationRequest) -> GenerationRequest:
    return GenerationRequest(
        new_request_id(),
        r.prompt_tokens,
        r.max_tokens,
        r.sampling,
        top_logprobs=r.top_logprobs,
        family_tokens=r.family_tokens,
    )


async def timed_run(engine: Engine, request: GenerationRequest, snapshot=None) -> dict:
    """Runs one request; returns its timings, text, logprobs and terminal event."""
    t0 = time.perf_counter()
    first = None
    logprobs, text, end = [], "", None
    async for event in engine.stream(request, snapshot):
        if isinstance(event, TextDelta):
            if first is None:
                first = time.perf_counter()
            text += event.text
            logprobs.extend(event.logprobs)
        else:
            end = event
    t1 = time.perf_counter()
    if isinstance(end, Rejected):
        raise RuntimeError(f"rejected: {end}")
    assert isinstance(end, Finished), end
    return {
        "t0": t0,
        "first": first or t1,
        "end": t1,
        "text": text,
        "logprobs": logprobs,
        "finished": end,
    }


def run(coro):
    return asyncio.run(coro)


# --- phases --------------------------------------------------------------------------------------
def phase_anchor(args, tok: Tokenizer) -> dict:
    prompt = chat_request(tok, QUESTIONS[0], 1).prompt_tokens
    llm = llama_cpp.Llama(
        str(args.model),
        n_gpu_layers=-1 if args.gpu_layers is None else args.gpu_layers,
        n_ctx=2048,
        n_threads=args.threads or os.cpu_count(),
        flash_attn=True,
        verbose=False,
    )
    try:
        n, t_first = 0, None
        t0 = time.perf_counter()
        for _token in llm.generate(list(prompt), top_k=1, temp=0.0):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n >= args.tokens:
                break
        t1 = time.perf_counter()
    finally:
        llm.close()
    return {
        "prompt_tokens": len(prompt),
        "tokens": n,
        "ttft_s": round(t_first - t0, 4),
        "decode_tok_s": round((n - 1) / (t1 - t_first), 1) if n > 1 else None,
    }


def phase_single_and_multi(args, tok: Tokenizer, result: dict) -> None:
    cfg = engine_config(args.model, args.gpu_layers, args.threads, max(args.streams, 1))
    t_load = time.perf_counter()
    with Engine.from_config(cfg) as engine:
        result["engine"] = {
            "load_s": round(time.perf_counter() - t_load, 2),
            "n_gpu_layers": engine.settings.n_gpu_layers,
            "kv_cells": engine.kv_cells_total,
            "threads": engine.settings.threads,
            "safe_mode": engine.safe_mode,
            "safe_mode_reason": engine.safe_mode_reason,
        }
        # single stream: a warm-up request, then the measured ones
        single = []
        for i in range(1 + args.repeats):
            r = run(
                timed_run(engine, chat_request(tok, QUESTIONS[i], args.tokens, ignore_eos=True))
            )
            n = r["finished"].usage.completion_tokens
            single.append(
                {
                    "tokens": n,
                    "ttft_s": round(r["first"] - r["t0"], 4),
                    "cached_tokens": r["finished"].usage.cached_tokens,
                    "decode_tok_s": round((n - 1) / (r["end"] - r["first"]), 1),
                }
            )
        measured = single[1:]
        result["single"] = {
            "runs": single,
            "decode_tok_s_best": max(s["decode_tok_s"] for s in measured),
            "decode_tok_s_median": sorted(s["decode_tok_s"] for s in measured)[len(measured) // 2],
        }
        result["phases_done"].append("single")

        async def many():
            reqs = [
                chat_request(
                    tok,
                    QUESTIONS[(4 + i) % len(QUESTIONS)] + f" ({i})",
                    args.tokens,
                    ignore_eos=True,
                )
                for i in range(args.streams)
            ]
            return await asyncio.gather(*(timed_run(engine, r) for r in reqs))

        stats0 = engine.stats()
        t0 = time.perf_counter()
        runs = run(many())
        t1 = time.perf_counter()
        stats1 = engine.stats()
        total = sum(r["finished"].usage.completion_tokens for r in runs)
        last_first = max(r["first"] for r in runs)
        # tokens generated after every stream had its first token, over that window
        after = sum(
            r["finished"].usage.completion_tokens - 1 - _tokens_before(r, last_first) for r in runs
        )
        result["multi"] = {
            "streams": args.streams,
            "tokens_total": total,
            "wall_s": round(t1 - t0, 3),
            "aggregate_tok_s": round(total / (t1 - t0), 1),
            "steady_aggregate_tok_s": round(after / (t1 - last_first), 1)
            if t1 > last_first
            else None,
            "ttft_s_max": round(max(r["first"] - r["t0"] for r in runs), 4),
            "max_sequences_in_step": stats1.max_sequences_in_step,
            "batched_steps": stats1.batched_steps_total - stats0.batched_steps_total,
            "prefix_hits": stats1.prefix_hits_total - stats0.prefix_hits_total,
        }
        result["phases_done"].append("multi")
        engine.check_invariants()


def _tokens_before(r: dict, when: float) -> int:
    """Estimated tokens a stream produced before `when` (uniform over its decode window)."""
    n = r["finished"].usage.completion_tokens - 1
    span = r["end"] - r["first"]
    if span <= 0 or when <= r["first"]:
        return 0
    return min(n, round(n * (when - r["first"]) / span))


def phase_snapshot(args, tok: Tokenizer) -> dict:
    published = []
    probe = chat_request(tok, QUESTIONS[0], 1, top_logprobs=20)
    cfg = engine_config(args.model, args.gpu_layers, args.threads, 4)
    with Engine.from_config(cfg, publish=lambda meta, blob: published.append((meta, blob))) as a:
        computed = run(timed_run(a, probe))
        shared = run(timed_run(a, fresh(probe)))
    if len(published) != 1:
        raise RuntimeError(f"expected one published snapshot, got {len(published)}")
    meta, blob = published[0]
    with Engine.from_config(cfg) as b:  # another replica: a cold cache, a fresh sequence
        restored = run(timed_run(b, fresh(probe), snapshot=blob))
        restores = b.stats().snapshot_restores_total

    def top(r):
        return [(t, lp) for t, _, lp in r["logprobs"][0].top]

    def max_delta(x, y):
        dx, dy = dict(top(x)), dict(top(y))
        common = set(dx) & set(dy)
        return max((abs(dx[t] - dy[t]) for t in common), default=None)

    return {
        "family_tokens": probe.family_tokens,
        "snapshot_tokens": meta.n_tokens,
        "snapshot_bytes": len(blob),
        "cached_tokens": {
            "miss": computed["finished"].usage.cached_tokens,
            "hit": shared["finished"].usage.cached_tokens,
            "restored": restored["finished"].usage.cached_tokens,
        },
        "snapshot_restores": restores,
        "snapshot_restore_s": restored["finished"].snapshot_restore_s,
        "ttft_s": {
            "miss": round(computed["first"] - computed["t0"], 4),
            "hit": round(shared["first"] - shared["t0"], 4),
            "restored": round(restored["first"] - restored["t0"], 4),
        },
        "hit_bit_identical": top(shared) == top(computed),
        "restore_bit_identical": top(restored) == top(computed),
        "hit_max_abs_dlogprob": max_delta(shared, computed),
        "restore_max_abs_dlogprob": max_delta(restored, computed),
        "top1": {
            "miss": top(computed)[0][0],
            "hit": top(shared)[0][0],
            "restored": top(restored)[0][0],
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="GGUF (scripts/make_test_gguf.py)")
    ap.add_argument("--out", type=Path, help="where to write the JSON too")
    ap.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        help="model.n_gpu_layers (default: all with a GPU, 0 without)",
    )
    ap.add_argument("--threads", type=int, default=0, help="server.threads (0: all cores)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--streams", type=int, default=8, help="concurrent requests in `multi`")
    ap.add_argument("--repeats", type=int, default=3, help="measured single-stream requests")
    ap.add_argument(
        "--phases",
        default="anchor,single,snapshot",
        help="comma list of anchor, single (runs multi too), snapshot",
    )
    args = ap.parse_args(argv)

    result: dict = {
        "model": str(args.model),
        "model_bytes": args.model.stat().st_size,
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "gpu_offload": supports_gpu_offload(),
        "system_info": system_info(),
        "cpu_count": os.cpu_count(),
        "phases_done": [],
        "errors": {},
    }
    tok = Tokenizer.load(args.model)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    try:
        for name in ("anchor", "single", "snapshot"):
            if name not in phases:
                continue
            t0 = time.perf_counter()
            try:
                if name == "anchor":
                    # On a thread that ends: the OpenMP team of a thread that decoded stays
                    # alive with it and would slow the engine's phases after this one.
                    result["anchor"] = on_own_thread(phase_anchor, args, tok)
                elif name == "single":
                    phase_single_and_multi(args, tok, result)
                else:
                    result["snapshot"] = phase_snapshot(args, tok)
                if name != "single":
                    result["phases_done"].append(name)
            except Exception as e:  # recorded; the next phase still runs
                result["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            result.setdefault("phase_s", {})[name] = round(time.perf_counter() - t0, 2)
    finally:
        tok.close()
    snap = result.get("snapshot", {})
    result["ok"] = (
        not result["errors"]
        and bool(snap.get("hit_bit_identical"))
        and bool(snap.get("restore_bit_identical"))
    )
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
