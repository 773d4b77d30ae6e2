"""What prefix reuse and sessions need of a llama.cpp context: sequence-level KV operations.

`kv3d.engine.llama.LlamaContext` implements it; unit tests of the reuse and session policies use
a small fake that records the operations.
"""

from __future__ import annotations

from typing import Protocol


class KVMemory(Protocol):
    def seq_copy(self, src: int, dst: int, pos_from: int = -1, pos_to: int = -1) -> None: ...

    def seq_remove(self, seq_id: int, pos_from: int = -1, pos_to: int = -1) -> bool: ...

    def seq_pos_max(self, seq_id: int) -> int: ...

    def seq_state(self, seq_id: int) -> bytes: ...

    def set_seq_state(self, seq_id: int, blob) -> None: ...


def load_cells(memory: KVMemory, seq_id: int, blob, end_tokens: int) -> None:
    """Restore a sequence-state blob into `seq_id` (replacing its cells) and check that it ends
    at position `end_tokens - 1`. On any failure the sequence is left empty and the error
    (ValueError or RuntimeError: the bytes were intact, llama.cpp or the parser refused them)
    propagates."""
    try:
        memory.set_seq_state(seq_id, blob)
        if memory.seq_pos_max(seq_id) != end_tokens - 1:
            raise ValueError(f"restored state does not end at position {end_tokens - 1}")
    except BaseException:
        memory.seq_remove(seq_id)
        raise
