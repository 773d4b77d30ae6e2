"""Comparing two generations through a server whose KV cache holds other sessions.

The sampler gives the same token for the same logits (greedy) and the same draws for the same
logits and seed (tested on the sampler chain directly). Through a busy server the logits of a
repeated request can still move within the engine's own noise: with flash attention on the
CPU, attention over 512 or more cells is split by cell position, so where a sequence's cells
sit in the cache changes the rounding. Two generations are therefore compared token by token
for as long as the model's logits (seen through the top log-probabilities, which are those of
the raw logits, before any penalty or bias) are bit-identical; from the first position where
they differ the two texts may part. A token that differs while the logits did not is a
failure: that is the sampler or a request parameter, not noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    token: str
    top: dict[str, float]  # the top log-probabilities at this position, by token text


def completion_steps(choice) -> list[Step]:
    """Steps of a `/v1/completions` choice requested with `logprobs=k`."""
    lp = choice.logprobs
    return [Step(t, dict(top)) for t, top in zip(lp.tokens, lp.top_logprobs, strict=True)]


def chat_steps(choice) -> list[Step]:
    """Steps of a chat choice requested with `logprobs=True, top_logprobs=k`."""
    return [
        Step(c.token, {t.token: t.logprob for t in c.top_logprobs}) for c in choice.logprobs.content
    ]


def assert_same_while_logits_are(a: Sequence[Step], b: Sequence[Step]) -> int:
    """Assert that `a` and `b` choose the same tokens wherever every logit before and at that
    position was the same in both; returns the number of positions compared that way."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x.top != y.top:
            return i  # the logits moved (engine noise): the texts may part from here
        assert x.token == y.token, (
            f"position {i}: {x.token!r} != {y.token!r} with the same logits "
            f"(top log-probabilities {x.top})"
        )
    assert len(a) == len(b), f"same logits throughout, yet {len(a)} != {len(b)} tokens"
    return len(a)
