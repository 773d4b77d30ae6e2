"""Owners of llama.cpp's native handles: model, context, batch, sampler chain.

Each class owns exactly one handle, frees it once in an idempotent `close()` and works as a
context manager. A context keeps its model open (it must be freed before its model). Native
return codes become exceptions here and nowhere else. Handles are never pickled: build them
inside the process (Ray replica) that uses them.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp
import numpy as np

from kv3d.engine.generation import SamplingParams
from kv3d.engine.rope import RopeSpec
from kv3d.engine.rope import spec_for as rope_spec_for

log = logging.getLogger(__name__)
T = TypeVar("T")

_backend_lock = threading.Lock()
_backend_ready = False

KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
KV_TYPE_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class LlamaError(RuntimeError):
    """llama.cpp refused an operation."""


class KVCacheFullError(LlamaError):
    """llama_decode found no KV cells for the batch (return code 1)."""


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its chatter below WARNING."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        # llama-cpp-python prints every native log line to stderr unless its logger says otherwise.
        if log.getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        _backend_ready = True


def on_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on a fresh thread that ends when it returns, and give back its result.

    For decoding that is not the engine's step loop (the start-up self-check). llama.cpp's CPU
    backend runs each `llama_decode` on an OpenMP team owned by the calling thread, and the
    team lives as long as that thread: a long-lived thread that decoded once (the replica's
    main thread) keeps a team whose workers contend with the step thread's for the cores. Measured
    on 2 cores: single-stream decode fell from 103 to 42 tokens/s. The team of a thread that has
    ended is freed with it.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="kv3d-decode-once")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def supports_gpu_offload() -> bool:
    init_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


def system_info() -> str:
    init_backend()
    return llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()


class _Owner:
    """Owns one native handle: `close()` frees it exactly once; usable as a context manager."""

    _handle = None

    def _free(self, handle) -> None:
        raise NotImplementedError

    @property
    def handle(self):
        if self._handle is None:
            raise LlamaError(f"{type(self).__name__} is closed")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._free(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LlamaModel(_Owner):
    """A loaded GGUF model (weights, or only the vocabulary with `vocab_only=True`)."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, vocab_only: bool = False):
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise LlamaError(f"llama.cpp could not load model {path}")
        self._handle = handle
        self.path = path
        self.vocab_only = vocab_only
        self._vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._piece_buf = ctypes.create_string_buffer(256)

    def _free(self, handle) -> None:
        llama_cpp.llama_model_free(handle)

    @property
    def vocab(self):
        """The vocabulary's native handle (lives as long as the model is open)."""
        _ = self.handle  # raises once closed: the vocab dies with the model
        return self._vocab

    # --- metadata -------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @property
    def n_ctx_train(self) -> int:
        n = llama_cpp.llama_model_n_ctx_train(self.handle)
        if n <= 0:  # a vocab-only load skips the hyper-parameters: read the GGUF key instead
            arch = self.meta("general.architecture") or ""
            n = int(self.meta(f"{arch}.context_length") or 0)
        return n

    @property
    def n_layer(self) -> int:
        return llama_cpp.llama_model_n_layer(self.handle)

    @property
    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.handle, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def size_bytes(self) -> int:
        return llama_cpp.llama_model_size(self.handle)

    @property
    def has_per_cell_kv(self) -> bool:
        """False for recurrent and hybrid models, whose state is not a set of KV cells that
        sequences can share or restore piecewise."""
        h = self.handle
        return not (llama_cpp.llama_model_is_recurrent(h) or llama_cpp.llama_model_is_hybrid(h))

    def rope_spec(self) -> RopeSpec | None:
        """The RoPE its cached keys carry (None: none KV3D can undo; vocab-only loads)."""
        if self.vocab_only:
            return None
        h = self.handle
        return rope_spec_for(
            self.meta,
            llama_cpp.llama_model_rope_type(h),
            llama_cpp.llama_model_rope_freq_scale_train(h),
            llama_cpp.llama_model_n_embd(h),
        )

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8") if raw else None

    def kv_bytes_per_cell(self, kv_type: str) -> int:
        """KV bytes one token occupies in every layer (K + V), from the GGUF hyper-parameters.

        Head sizes come from `attention.key_length`/`value_length` when present: Gemma 3's head
        size is not n_embd / n_head. Sliding-window layers are counted in full (an upper bound).
        """
        arch = self.meta("general.architecture") or ""
        n_head = int(self.meta(f"{arch}.attention.head_count") or 1)
        n_head_kv = int(self.meta(f"{arch}.attention.head_count_kv") or n_head)
        n_embd = llama_cpp.llama_model_n_embd(self.handle)
        k_len = int(self.meta(f"{arch}.attention.key_length") or n_embd // n_head)
        v_len = int(self.meta(f"{arch}.attention.value_length") or n_embd // n_head)
        elements = self.n_layer * n_head_kv * (k_len + v_len)
        return int(elements * KV_TYPE_BYTES_PER_ELEMENT[kv_type])

    # --- vocabulary -----------------------------------------------------------------------
    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    def token_bos(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab)

    def token_eos(self) -> int:
        return llama_cpp.llama_vocab_eos(self._vocab)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self._vocab, data, len(data), buf, capacity, add_special, parse_special
        )
        if n < 0:  # buffer too small: n is minus the size needed
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        if n < 0:
            raise LlamaError("tokenization failed")
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


def apply_builtin_template(
    name: str, messages: list[tuple[str, str]], add_generation_prompt: bool
) -> str:
    """Render `messages` with llama.cpp's built-in chat template `name`."""
    init_backend()
    keep = [(role.encode(), content.encode()) for role, content in messages]
    chat = (llama_cpp.llama_chat_message * len(keep))(
        *(llama_cpp.llama_chat_message(role, content) for role, content in keep)
    )
    size = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(
            name.encode(), chat, len(keep), add_generation_prompt, buf, size
        )
        if n < 0:
            raise LlamaError(f"llama.cpp has no built-in chat template {name!r}")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n
    raise LlamaError("chat template output kept growing")


@dataclass(frozen=True, slots=True)
class ContextParams:
    n_ctx_cells: int
    n_seq_max: int
    n_batch_tokens: int
    n_threads: int
    n_threads_single: int  # llama.cpp uses these when a step carries one token
    kv_type: str = "f16"
    flash_attn: bool = True
    # Keep every cell of sliding-window layers: sequences can then share and restore a prefix's
    # cells exactly (a trimmed window would make them depend on which sequence computed them).
    swa_full: bool = True
    # One pool of cells for all sequences, which lets them share a prefix's cells (seq_cp).
    # False gives each sequence a stream of its own (llama-server's layout); only
    # measurements use it, since a prefix copied across streams is copied, not shared.
    unified: bool = True


class LlamaContext(_Owner):
    """An inference context: the KV cache of `n_seq_max` sequences, one unified pool of cells
    unless `params.unified` is False."""

    def __init__(self, model: LlamaModel, params: ContextParams):
        if model.vocab_only:
            raise LlamaError("a vocab-only model cannot back a context")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = params.n_ctx_cells
        cparams.n_batch = params.n_batch_tokens
        cparams.n_ubatch = params.n_batch_tokens
        cparams.n_seq_max = params.n_seq_max
        cparams.n_threads = params.n_threads_single
        cparams.n_threads_batch = params.n_threads
        cparams.type_k = KV_TYPES[params.kv_type]
        cparams.type_v = KV_TYPES[params.kv_type]
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if params.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.kv_unified = params.unified
        cparams.swa_full = params.swa_full
        cparams.no_perf = True
        handle = llama_cpp.llama_init_from_model(model.handle, cparams)
        if not handle:
            raise LlamaError(
                f"llama.cpp could not create a context of {params.n_ctx_cells} cells; "
                "lower cache.gpu_hot_mb or engine.max_sequences"
            )
        self._handle = handle
        self.model = model
        self.params = params
        self.n_ctx_cells = llama_cpp.llama_n_ctx(handle)
        self._memory = llama_cpp.llama_get_memory(handle)

    def _free(self, handle) -> None:
        llama_cpp.llama_free(handle)

    def decode(self, batch: LlamaBatch) -> None:
        code = llama_cpp.llama_decode(self.handle, batch.native)
        if code == 1:
            raise KVCacheFullError("no free KV cells for the batch")
        if code != 0:
            raise LlamaError(f"llama_decode failed with code {code}")

    def logits(self, batch_index: int) -> np.ndarray:
        """A read-only view of the logits of batch row `batch_index`; valid until next decode."""
        ptr = llama_cpp.llama_get_logits_ith(self.handle, batch_index)
        if not ptr:
            raise LlamaError(f"no logits for batch row {batch_index}")
        view = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
        view.flags.writeable = False
        return view

    # --- sequences in the KV cache ----------------------------------------------------------
    def seq_remove(self, seq_id: int, pos_from: int = -1, pos_to: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq_id, pos_from, pos_to))

    def seq_copy(self, src: int, dst: int, pos_from: int = -1, pos_to: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, pos_from, pos_to)

    def seq_pos_max(self, seq_id: int) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    # --- sequence state (the seam for snapshots and deltas) ---------------------------------
    def seq_state(self, seq_id: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self.handle, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.handle, buf, size, seq_id)
        if written != size:
            raise LlamaError(f"state export wrote {written} of {size} bytes")
        return bytes(buf)

    def set_seq_state(self, seq_id: int, blob) -> None:
        """Load a sequence state from any bytes-like object, read in place (no copy: snapshots
        arrive as read-only Arrow buffers mapped from the object store)."""
        data = np.frombuffer(blob, dtype=np.uint8)
        ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        read = llama_cpp.llama_state_seq_set_data(self.handle, ptr, data.size, seq_id)
        if read != data.size:
            raise LlamaError(f"state import read {read} of {data.size} bytes")


class LlamaBatch(_Owner):
    """A reusable token batch of fixed capacity; rows are filled with `add` after `clear`."""

    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self._handle = llama_cpp.llama_batch_init(capacity_tokens, 0, 1)
        self._handle.n_tokens = 0

    def _free(self, handle) -> None:
        llama_cpp.llama_batch_free(handle)

    @property
    def native(self):
        return self.handle

    @property
    def n_tokens(self) -> int:
        return self.native.n_tokens

    def clear(self) -> None:
        self.native.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, want_logits: bool) -> int:
        """Append one row; returns its index (the index to read logits at)."""
        b = self.native
        i = b.n_tokens
        if i >= self.capacity_tokens:
            raise LlamaError("batch is full")
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = want_logits
        b.n_tokens = i + 1
        return i


class SamplerChain(_Owner):
    """One sequence's sampler, llama.cpp's chain in its common order: logit bias → penalties →
    greedy at temperature 0, else top-k → top-p → min-p → temperature → dist; a grammar, when
    there is one, gates each pick (see `Grammar`).

    Only non-neutral stages are added: a plain request pays for none of the others on the
    decode step. The chain owns its stages and the grammar; a stage llama.cpp refuses frees
    everything built so far and raises `LlamaError`.

    Penalties: llama.cpp's penalty stage counts the tokens it was `accept`ed, and sampling
    accepts each sampled token. Presence and frequency penalties follow OpenAI: their stage
    sees only generated tokens (its window holds all `max_tokens` of them). The repetition
    penalty follows llama-server's repeat penalty: its own stage is first fed the prompt's
    last `penalty_last_n` tokens, so it sees prompt and generated tokens in one window.
    """

    def __init__(
        self,
        *,
        model: LlamaModel,
        params: SamplingParams,
        seed: int,
        prompt: Sequence[int] = (),
        max_tokens: int = 0,
    ):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise LlamaError("could not create a sampler chain")
        self._handle = chain
        self._grammar: Grammar | None = None
        self._n_vocab = model.n_vocab
        self._candidates: np.ndarray | None = None  # made on the first pick from an array
        try:
            self._build(model, params, seed, prompt, max_tokens)
            if params.grammar is not None:
                self._grammar = Grammar(model, params.grammar)
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        model: LlamaModel,
        p: SamplingParams,
        seed: int,
        prompt: Sequence[int],
        max_tokens: int,
    ) -> None:
        n_vocab = model.n_vocab
        if p.logit_bias:
            pairs = [llama_cpp.llama_logit_bias(token, bias) for token, bias in p.logit_bias]
            array = (llama_cpp.llama_logit_bias * len(pairs))(*pairs)  # copied by llama.cpp
            self._add(
                "logit bias", llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(pairs), array)
            )
        if p.repetition_penalty != 1.0 and p.penalty_last_n > 0:
            stage = self._add(
                "repetition penalty",
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, p.penalty_last_n, p.repetition_penalty, 0.0, 0.0
                ),
            )
            for token in prompt[-p.penalty_last_n :]:
                llama_cpp.llama_sampler_accept(stage, token)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            window = max(max_tokens, 1)
            self._add(
                "presence/frequency penalty",
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, window, 1.0, p.frequency_penalty, p.presence_penalty
                ),
            )
        if p.temperature <= 0.0:
            self._add("greedy", llama_cpp.llama_sampler_init_greedy())
            return
        if p.top_k > 0:
            self._add("top-k", llama_cpp.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            self._add("top-p", llama_cpp.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            self._add("min-p", llama_cpp.llama_sampler_init_min_p(p.min_p, 1))
        self._add("temperature", llama_cpp.llama_sampler_init_temp(p.temperature))
        self._add("dist", llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, what: str, stage):
        if not stage:
            raise LlamaError(f"llama.cpp could not create the {what} sampler")
        # The chain takes ownership of the stage and frees it with itself.
        llama_cpp.llama_sampler_chain_add(self._handle, stage)
        return stage

    def _free(self, handle) -> None:
        llama_cpp.llama_sampler_free(handle)

    def close(self) -> None:
        grammar, self._grammar = self._grammar, None
        if grammar is not None:
            grammar.close()
        super().close()

    def sample(self, ctx: LlamaContext, batch_index: int) -> int:
        if self._grammar is None:
            return llama_cpp.llama_sampler_sample(self.handle, ctx.handle, batch_index)
        return self.sample_logits(ctx.logits(batch_index))

    def sample_logits(self, logits: np.ndarray) -> int:
        """The chain's choice from a row of logits (the context's, or one kept from an
        earlier step); the same draw `sample` makes from the same logits."""
        grammar = self._grammar
        token = self._pick(logits, None)
        if grammar is not None:
            if not grammar.allows(token):
                token = self._pick(logits, grammar)
                if not grammar.allows(token):  # every token masked: nothing may follow
                    raise LlamaError("the grammar allows no token at this point")
            grammar.accept(token)
        llama_cpp.llama_sampler_accept(self.handle, token)
        return token

    def _pick(self, logits: np.ndarray, grammar: Grammar | None) -> int:
        """The chain's choice among all tokens (first masked by `grammar`, if given)."""
        if self._candidates is None:
            self._candidates = np.empty(self._n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(self._n_vocab, dtype=np.int32)
        cands = self._candidates
        cands["id"] = self._ids  # stages reorder the array in place
        cands["logit"] = logits
        cands["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            cands.ctypes.data_as(llama_cpp.llama_token_data_p), len(cands), -1, False
        )
        if grammar is not None:
            grammar.mask(array)
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(array))
        return int(array.data[array.selected].id)


# llama_token_data as numpy lays it out: {int32 id; float logit; float p}.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class Grammar(_Owner):
    """A GBNF grammar's llama.cpp sampler, kept out of the chain. Applying it to the whole
    vocabulary costs as much as a decode step, so, as llama.cpp's common sampler does, the
    chain picks first and the grammar only checks that one token; the whole vocabulary is
    masked only when the pick breaks the grammar.

    It is only ever told (`accept`) tokens it allows: llama.cpp aborts the process on others.
    """

    def __init__(self, model: LlamaModel, gbnf: str):
        handle = _init_grammar(model, gbnf)
        if not handle:
            raise LlamaError("llama.cpp could not create the grammar sampler")
        self._handle = handle
        self._one = (llama_cpp.llama_token_data * 1)()

    def _free(self, handle) -> None:
        llama_cpp.llama_sampler_free(handle)

    def allows(self, token: int) -> bool:
        one = self._one
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        array = llama_cpp.llama_token_data_array(one, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(array))
        return one[0].logit != float("-inf")

    def mask(self, array) -> None:
        """Set the logit of every token the grammar forbids here to -inf."""
        llama_cpp.llama_sampler_apply(self.handle, ctypes.byref(array))

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.handle, token)


def _init_grammar(model: LlamaModel, gbnf: str):
    # NULL when the text is not GBNF, has no `root` rule, or is left-recursive.
    return llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")


def grammar_compiles(model: LlamaModel, gbnf: str) -> bool:
    """Whether llama.cpp accepts `gbnf` (start rule `root`) as a grammar over this vocabulary."""
    stage = _init_grammar(model, gbnf)
    if not stage:
        return False
    llama_cpp.llama_sampler_free(stage)
    return True
