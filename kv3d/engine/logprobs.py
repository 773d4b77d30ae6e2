"""Log-probabilities of a sampled token and the most likely alternatives (OpenAI `logprobs`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kv3d.engine.generation import TokenLogprob


def log_softmax_top(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities of the whole vocabulary, the ids of the k most likely, best first).
    Computed before sampling: the sampler may change the logits row."""
    shifted = logits - logits.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    top_ids = np.argpartition(-logp, k)[:k] if k > 0 else np.empty(0, dtype=np.int64)
    return logp, top_ids[np.argsort(-logp[top_ids])]


def token_logprob(
    logp: np.ndarray,
    top_ids: np.ndarray,
    token: int,
    piece: bytes,
    piece_of: Callable[[int], bytes],
) -> TokenLogprob:
    top = tuple((int(t), piece_of(int(t)), float(logp[t])) for t in top_ids)
    return TokenLogprob(token, piece, float(logp[token]), top)
