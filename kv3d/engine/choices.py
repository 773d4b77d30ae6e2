"""A request for n > 1 completions: n sequences on one engine, one event stream.

The n choices are queued together as ordinary requests with the same prompt. The first one
admitted computes the prompt and keeps its whole blocks hot as a prefix (prefix reuse does this
for every prompt); the others wait for it (`PrefixReuse.awaited_family`) and then take those cells
by `seq_cp` instead of computing them, so the prompt is computed once and its cells are held
once. Each choice computes only the tail of its prompt past the last whole block (fewer than
`prefix.block_tokens` tokens) and samples with its own sampler.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from kv3d.engine.generation import (
    Finished,
    GenerationRequest,
    Rejected,
    SamplingParams,
    StreamEvent,
    TextDelta,
)
from kv3d.engine.scheduler import Emit

CHOICE_ID_SEP = "#"


def choice_requests(request: GenerationRequest) -> list[GenerationRequest]:
    """The n single-choice requests of `request`. Choice i samples with seed + i (a fixed seed
    gives n reproducible, different completions); only choice 0 continues a named session, as a
    session has one history."""
    out = []
    for index in range(request.n):
        sampling = request.sampling
        if sampling.seed is not None and index:
            sampling = dataclasses.replace(sampling, seed=_nth_seed(sampling, index))
        out.append(
            dataclasses.replace(
                request,
                request_id=f"{request.request_id}{CHOICE_ID_SEP}{index}",
                n=1,
                sampling=sampling,
                session_id=request.session_id if index == 0 else None,
            )
        )
    return out


def _nth_seed(sampling: SamplingParams, index: int) -> int:
    # Seeds stay in llama.cpp's range (0xFFFFFFFF means "random").
    return (sampling.seed + index) % 0xFFFFFFFF


class ChoiceGroup:
    """Merges the event streams of n choices into one.

    Invariant: the merged stream carries each choice's text tagged with its index, each
    choice's `Finished` with `final` False except the last one to end, and then nothing more;
    or, when any choice is rejected, that `Rejected` as its one terminal event (`on_end(True)`
    then cancels the other choices; their events are dropped). Emits come from the engine
    thread; `emitter` callbacks may be called from any thread.
    """

    def __init__(self, n: int, emit: Emit, on_end: Callable[[bool], None] | None = None):
        self._emit = emit
        self._on_end = on_end
        self._open = set(range(n))
        self._ended = False
        self._lock = threading.Lock()

    def emitter(self, index: int) -> Emit:
        return lambda event: self._on_event(index, event)

    def _on_event(self, index: int, event: StreamEvent) -> None:
        with self._lock:
            if self._ended or index not in self._open:
                return
            if isinstance(event, Rejected):
                self._ended = True
            elif isinstance(event, Finished):
                self._open.discard(index)
                self._ended = not self._open
                event = dataclasses.replace(event, index=index, final=self._ended)
            elif isinstance(event, TextDelta):
                event = dataclasses.replace(event, index=index)
            self._emit(event)
            ended, rejected = self._ended, isinstance(event, Rejected)
        if ended and self._on_end is not None:
            self._on_end(rejected)  # outside the lock: it may cancel the other choices

    @property
    def ended(self) -> bool:
        with self._lock:
            return self._ended
