"""Fidelity harness: how far a session delta codec moves the model from the uncompressed state.

For each window of a held-out text: prefill `context_tokens`, export the sequence state, then
score the next `eval_tokens` (teacher-forced, logits for every position) three ways, each alone
in an emptied cache so that cell placement is the same:
- reference: the state as computed;
- coded: the state encoded by the delta codec (`codec`: int8 or a low-bit mode), decoded and
  restored;
- noise floor: the same context prefilled again in different chunks (llama.cpp's
  numerics depend on batch composition; this is the engine's own noise).
Reported: KL(reference ‖ coded) per token (mean, max), top-1 agreement, perplexity of the text
under each, the noise floor's mean KL, and the codec's compression against f16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from kv3d.engine.codec import LowBitSpec, Mode, decode_delta, encode_delta
from kv3d.engine.llama import ContextParams, LlamaBatch, LlamaContext, LlamaModel
from kv3d.engine.statefmt import build_seq_state, cells_from, parse_seq_state

REFERENCE_CHUNK = 128
NOISE_CHUNK = 37  # a chunking unlike the reference's


@dataclass(frozen=True, slots=True)
class FidelityReport:
    codec: str
    windows: int
    eval_tokens: int
    kl_mean: float
    kl_max: float
    top1: float
    ppl_base: float
    ppl_int8: float  # the coded state's perplexity, whatever the codec (the key predates them)
    noise_floor_kl_mean: float
    noise_floor_top1: float
    compression_ratio: float  # f16 bytes / delta bytes
    bytes_vs_f16: float

    def as_dict(self) -> dict:
        return asdict(self)


def heldout_text() -> str:
    return files("kv3d.bench").joinpath("data/heldout.txt").read_text()


@dataclass(frozen=True, slots=True)
class KvTypeReport:
    """How far a quantised hot KV cache (llama.cpp's own cache types) moves the model from an
    f16 cache, next to the engine's noise floor, and what it saves per cell."""

    kv_type: str
    windows: int
    eval_tokens: int
    kl_mean: float
    kl_max: float
    top1: float
    noise_floor_kl_mean: float
    noise_floor_top1: float
    bytes_per_cell: int
    f16_bytes_per_cell: int
    cells_vs_f16: float  # cells (so sessions) a KV budget holds, against f16

    def as_dict(self) -> dict:
        return asdict(self)


class _Scorer:
    """Runs one sequence alone in a context and returns logits for chosen positions."""

    def __init__(self, model: LlamaModel, n_cells: int, threads: int, kv_type: str = "f16"):
        self.ctx = LlamaContext(
            model,
            ContextParams(
                n_ctx_cells=n_cells,
                n_seq_max=2,
                n_batch_tokens=REFERENCE_CHUNK,
                n_threads=threads,
                n_threads_single=threads,
                kv_type=kv_type,
            ),
        )
        self.batch = LlamaBatch(REFERENCE_CHUNK)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()

    def prefill(self, tokens: list[int], chunk: int, start: int = 0) -> None:
        for at in range(0, len(tokens), chunk):
            self.batch.clear()
            for i, token in enumerate(tokens[at : at + chunk]):
                self.batch.add(token, start + at + i, 0, False)
            self.ctx.decode(self.batch)

    def score(self, tokens: list[int], start: int) -> np.ndarray:
        """Teacher-forced logits (len(tokens), vocab) for positions start…"""
        out = []
        for at in range(0, len(tokens), REFERENCE_CHUNK):
            piece = tokens[at : at + REFERENCE_CHUNK]
            self.batch.clear()
            rows = [self.batch.add(t, start + at + i, 0, True) for i, t in enumerate(piece)]
            self.ctx.decode(self.batch)
            out.extend(np.array(self.ctx.logits(r), dtype=np.float64) for r in rows)
        return np.stack(out)


def _split(state: bytes, shared_tokens: int) -> tuple[bytes, bytes | None]:
    """(the session's private cells, the exact shared prefix's cells or None)."""
    if shared_tokens == 0:
        return state, None
    parsed = parse_seq_state(state)
    private = build_seq_state(cells_from(parsed, shared_tokens))
    return private, build_seq_state(cells_from(parsed, 0, shared_tokens))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _kl(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    p, q = _log_softmax(ref), _log_softmax(other)
    return (np.exp(p) * (p - q)).sum(axis=1)


def _nll(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    lp = _log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]


class _Drift:
    """How far one way of computing logits moves from the reference, window after window."""

    def __init__(self) -> None:
        self._kls: list[np.ndarray] = []
        self._agree: list[np.ndarray] = []

    def add(self, ref: np.ndarray, other: np.ndarray) -> None:
        self._kls.append(_kl(ref, other))
        self._agree.append(ref.argmax(axis=1) == other.argmax(axis=1))

    @property
    def kl(self) -> np.ndarray:
        return np.concatenate(self._kls)

    @property
    def top1(self) -> float:
        return float(np.concatenate(self._agree).mean())


def measure_fidelity(
    model_path: Path,
    text: str,
    *,
    context_tokens: int = 384,
    eval_tokens: int = 64,
    max_windows: int = 8,
    group: int = 32,
    threads: int = 2,
    shared_prefix_tokens: int = 0,
    codec: Mode = "int8",
    spec: LowBitSpec | None = None,
) -> FidelityReport:
    """Windows stay under 512 cells: past that, llama.cpp's CPU flash attention depends on
    where cells sit, which would be measured as codec error.

    `shared_prefix_tokens` > 0 models a session as KV3D keeps it: the first tokens of each
    window are a shared family prefix kept exact, the rest the session's delta. `codec`: the
    delta mode; `spec`: a low-bit mode's settings other than its preset."""
    if not 0 <= shared_prefix_tokens < context_tokens:
        raise ValueError("shared_prefix_tokens must be below context_tokens")
    with LlamaModel(model_path) as model:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        starts = _window_starts(len(tokens), context_tokens, eval_tokens, max_windows)
        span = context_tokens + eval_tokens + 1
        scorer = _Scorer(model, n_cells=max(span, 256), threads=threads)
        rope = model.rope_spec()
        coded_drift, noise_drift, nll_base, nll_q = _Drift(), _Drift(), [], []
        raw_bytes = coded_bytes = 0
        try:
            for s in starts:
                ctx_toks = tokens[s : s + context_tokens]
                ev = tokens[s + context_tokens : s + context_tokens + eval_tokens]
                targets = tokens[s + context_tokens + 1 : s + context_tokens + eval_tokens + 1]

                scorer.prefill(ctx_toks, REFERENCE_CHUNK)
                state = scorer.ctx.seq_state(0)
                ref = scorer.score(ev, context_tokens)
                scorer.ctx.clear()

                private, shared = _split(state, shared_prefix_tokens)
                coded = encode_delta(private, codec, group, spec=spec, rope=rope)
                raw_bytes += len(private)
                coded_bytes += len(coded)
                # As KV3D resumes a session: the delta into the sequence, the exact shared
                # prefix into another, then shared back (seq_cp).
                scorer.ctx.set_seq_state(0, decode_delta(coded))
                if shared is not None:
                    scorer.ctx.set_seq_state(1, shared)
                    scorer.ctx.seq_copy(1, 0, 0, shared_prefix_tokens)
                    scorer.ctx.seq_remove(1)
                quant = scorer.score(ev, context_tokens)
                scorer.ctx.clear()

                scorer.prefill(ctx_toks, NOISE_CHUNK)
                noise = scorer.score(ev, context_tokens)
                scorer.ctx.clear()

                coded_drift.add(ref, quant)
                noise_drift.add(ref, noise)
                nll_base.append(_nll(ref, targets))
                nll_q.append(_nll(quant, targets))
        finally:
            scorer.close()
    kl = coded_drift.kl
    return FidelityReport(
        codec=codec,
        windows=len(starts),
        eval_tokens=int(kl.size),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1=coded_drift.top1,
        ppl_base=float(np.exp(np.concatenate(nll_base).mean())),
        ppl_int8=float(np.exp(np.concatenate(nll_q).mean())),
        noise_floor_kl_mean=float(noise_drift.kl.mean()),
        noise_floor_top1=noise_drift.top1,
        compression_ratio=raw_bytes / coded_bytes,
        bytes_vs_f16=coded_bytes / raw_bytes,
    )


def _window_starts(n_tokens: int, context_tokens: int, eval_tokens: int, max_windows: int):
    """Where each window starts. Windows overlap (a new one every `eval_tokens`): each scores
    different tokens."""
    span = context_tokens + eval_tokens + 1
    starts = list(range(0, n_tokens - span + 1, eval_tokens))[:max_windows]
    if not starts:
        raise ValueError(f"text too short: {n_tokens} tokens, a window needs {span}")
    return starts


def measure_kv_type(
    model_path: Path,
    text: str,
    *,
    kv_type: str,
    context_tokens: int = 384,
    eval_tokens: int = 64,
    max_windows: int = 8,
    threads: int = 2,
) -> KvTypeReport:
    """The same windows as `measure_fidelity`, prefilled and scored in a context whose KV cache
    is `kv_type` (llama.cpp quantises each cell as it is written), against an f16 context."""
    with LlamaModel(model_path) as model:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        starts = _window_starts(len(tokens), context_tokens, eval_tokens, max_windows)
        n_cells = max(context_tokens + eval_tokens + 1, 256)
        reference = _Scorer(model, n_cells, threads)
        quantised = _Scorer(model, n_cells, threads, kv_type)
        quant_drift, noise_drift = _Drift(), _Drift()
        try:
            for s in starts:
                ctx_toks = tokens[s : s + context_tokens]
                ev = tokens[s + context_tokens : s + context_tokens + eval_tokens]
                runs = []
                for scorer, chunk in ((reference, REFERENCE_CHUNK), (reference, NOISE_CHUNK),
                                      (quantised, REFERENCE_CHUNK)):  # fmt: skip
                    scorer.prefill(ctx_toks, chunk)
                    runs.append(scorer.score(ev, context_tokens))
                    scorer.ctx.clear()
                ref, noise, quant = runs
                quant_drift.add(ref, quant)
                noise_drift.add(ref, noise)
        finally:
            quantised.close()
            reference.close()
        cell_bytes = model.kv_bytes_per_cell(kv_type)
        f16_bytes = model.kv_bytes_per_cell("f16")
    kl = quant_drift.kl
    return KvTypeReport(
        kv_type=kv_type,
        windows=len(starts),
        eval_tokens=int(kl.size),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1=quant_drift.top1,
        noise_floor_kl_mean=float(noise_drift.kl.mean()),
        noise_floor_top1=noise_drift.top1,
        bytes_per_cell=cell_bytes,
        f16_bytes_per_cell=f16_bytes,
        cells_vs_f16=f16_bytes / cell_bytes,
    )
