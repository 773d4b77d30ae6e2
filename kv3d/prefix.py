"""Prefix reuse: the place where a request's prompt prefix is looked up before prefill.

The engine asks its `PrefixReuse` to attach whatever KV it already holds for a prompt to a fresh
sequence slot; the returned count of tokens is skipped by prefill and reported to the client as
`cached_tokens`. Exact-prefix detection and shared snapshots implement this protocol.
"""

from __future__ import annotations

from typing import Protocol

from kv3d.llama import LlamaContext


class PrefixReuse(Protocol):
    def attach(self, ctx: LlamaContext, slot: int, prompt_tokens: tuple[int, ...]) -> int:
        """Place reusable KV for a prefix of `prompt_tokens` into `slot`; return its length.

        Must return at most `len(prompt_tokens) - 1`: the last prompt token is always decoded,
        since its logits choose the first generated token.
        """
        ...


class NoPrefixReuse:
    """Reuses nothing: every prompt is prefilled in full."""

    def attach(self, ctx: LlamaContext, slot: int, prompt_tokens: tuple[int, ...]) -> int:
        return 0
