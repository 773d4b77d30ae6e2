"""kv3d.engine.statefmt on blobs exported by the real llama.cpp, for SmolLM2 and Gemma 3 (iSWA)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kv3d.engine.llama import (
    ContextParams,
    KVCacheFullError,
    LlamaBatch,
    LlamaContext,
    LlamaModel,
)
from kv3d.engine.selfcheck import ROUND_TRIP_COPIES, run_self_check
from kv3d.engine.statefmt import (
    SeqState,
    build_seq_state,
    cells_from,
    join_cells,
    parse_seq_state,
    shifted,
)

pytestmark = pytest.mark.integration

PARAMS = ContextParams(
    n_ctx_cells=512,
    n_seq_max=2,
    n_batch_tokens=64,
    n_threads=2,
    n_threads_single=2,
    kv_type="f16",
    flash_attn=True,
)
PROMPT = "The lighthouse keeper counted the ships that passed the rocky cape every evening"
F16 = 1


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with LlamaModel(smollm2_path) as model:
        yield model


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    with LlamaModel(gemma3_path) as model:
        yield model


def prefill(ctx: LlamaContext, tokens: list[int], seq_id: int) -> int:
    """Decode `tokens` at positions 0.. into `seq_id`; returns the greedy next token."""
    with LlamaBatch(ctx.params.n_batch_tokens) as batch:
        for start in range(0, len(tokens), batch.capacity_tokens):
            batch.clear()
            for pos in range(start, min(start + batch.capacity_tokens, len(tokens))):
                row = batch.add(tokens[pos], pos, seq_id, pos == len(tokens) - 1)
            ctx.decode(batch)
        return int(np.argmax(ctx.logits(row)))


def step(ctx: LlamaContext, token: int, pos: int, seq_id: int) -> np.ndarray:
    """Decode one token alone in its batch; a copy of its logits."""
    with LlamaBatch(1) as batch:
        batch.add(token, pos, seq_id, True)
        ctx.decode(batch)
        return ctx.logits(0).copy()


def k_row_bytes_f16(model: LlamaModel) -> int:
    """n_embd_k_gqa * 2 from the GGUF keys (Gemma 3's head size is not n_embd / n_head)."""
    arch = model.meta("general.architecture")
    n_head = int(model.meta(f"{arch}.attention.head_count"))
    n_head_kv = int(model.meta(f"{arch}.attention.head_count_kv") or n_head)
    n_embd = int(model.meta(f"{arch}.embedding_length"))
    head = int(model.meta(f"{arch}.attention.key_length") or n_embd // n_head)
    return n_head_kv * head * 2


def expected_nbytes(state: SeqState) -> int:
    """Blob size recomputed from the parsed counts: headers + meta + rows, nothing else."""
    total = 8
    for section in state.sections:
        total += 4
        for s in section.streams:
            layers = s.k_layers + s.v_layers
            total += 4 + 12 * s.n_cells + 8 + sum(12 + t.nbytes_for(s.n_cells) for t in layers)
    return total


def assert_cells(state: SeqState, positions: range, seq_id: int) -> None:
    for section in state.sections:
        (stream,) = section.streams  # the context uses one unified KV cache: one stream
        assert stream.cell_positions.tolist() == list(positions)
        assert set(stream.cell_seq_ids) == {(seq_id,)}


def restore_gives_identical_logits(model: LlamaModel, blob: bytes) -> None:
    """A rebuilt blob restored into seq 1 continues exactly like seq 0 does.

    Bit-identity holds here because the KV holds < 512 cells: above that, llama.cpp's CPU
    flash attention splits one token's KV range into per-thread chunks whose partial sums
    depend on where the cells sit in the cache, so the same state at other cell indices
    gives slightly different logits.
    """
    state = parse_seq_state(blob)
    n = state.n_cells
    tokens = model.tokenize(PROMPT, add_special=True, parse_special=False)
    with LlamaContext(model, PARAMS) as ctx:
        next_token = prefill(ctx, tokens, 0)
        assert ctx.seq_state(0) == blob  # same model, prompt and context: same state
        ctx.set_seq_state(1, build_seq_state(state, seq_id=1))
        restored = parse_seq_state(ctx.seq_state(1))
        assert restored.seq_id == 1
        assert_cells(restored, range(n), seq_id=1)
        for mine, theirs in zip(restored.sections, state.sections, strict=True):
            layers = zip(mine.streams[0].k_layers, theirs.streams[0].k_layers, strict=True)
            assert all(np.array_equal(a.data, b.data) for a, b in layers)
        expected = step(ctx, next_token, n, 0)
        got = step(ctx, next_token, n, 1)
    assert np.array_equal(got, expected)


def export(model: LlamaModel, params: ContextParams = PARAMS) -> tuple[bytes, int]:
    tokens = model.tokenize(PROMPT, add_special=True, parse_special=False)
    assert 12 <= len(tokens) <= 40
    with LlamaContext(model, params) as ctx:
        prefill(ctx, tokens, 0)
        return ctx.seq_state(0), len(tokens)


# --- SmolLM2: one cache ------------------------------------------------------------------------
def test_smollm2_blob_layout_and_round_trip(smollm2):
    blob, n = export(smollm2)
    state = parse_seq_state(blob)
    assert state.seq_id == 0 and len(state.sections) == 1
    assert state.n_cells == n
    assert_cells(state, range(n), seq_id=0)
    (stream,) = state.sections[0].streams
    assert stream.v_trans is False  # flash attention stores V untransposed
    assert len(stream.k_layers) == len(stream.v_layers) == smollm2.n_layer == 30
    row = k_row_bytes_f16(smollm2)
    for layer in stream.k_layers + stream.v_layers:
        assert (layer.type_id, layer.row_bytes, layer.data.nbytes) == (F16, row, row * n)
    cell_bytes = sum(t.row_bytes for t in stream.k_layers + stream.v_layers)
    assert cell_bytes == smollm2.kv_bytes_per_cell("f16")
    assert expected_nbytes(state) == len(blob) == state.nbytes
    assert build_seq_state(state) == blob


def test_smollm2_rebuilt_blob_restores_into_another_sequence(smollm2):
    blob, _ = export(smollm2)
    restore_gives_identical_logits(smollm2, blob)


def test_copies_shifted_end_to_end_restore_at_their_positions(smollm2):
    blob, n = export(smollm2)
    state = parse_seq_state(blob)
    copies = join_cells([shifted(state, k * n) for k in range(3)])
    assert_cells(copies, range(3 * n), seq_id=0)
    with LlamaContext(smollm2, PARAMS) as ctx:
        ctx.set_seq_state(1, build_seq_state(copies))
        assert ctx.seq_pos_max(1) == 3 * n - 1
        again = parse_seq_state(ctx.seq_state(1))
    (original,) = state.sections[0].streams
    for k in range(3):
        (copy,) = cells_from(again, k * n, (k + 1) * n).sections[0].streams
        assert copy.cell_positions.tolist() == list(range(k * n, (k + 1) * n))
        mine, theirs = copy.k_layers + copy.v_layers, original.k_layers + original.v_layers
        layers = zip(mine, theirs, strict=True)
        assert all(np.array_equal(got.data, want.data) for got, want in layers)


def test_the_self_check_times_a_short_and_an_eightfold_round_trip_and_leaves_no_cells(smollm2):
    with LlamaContext(smollm2, PARAMS) as ctx, LlamaBatch(64) as batch:
        check = run_self_check(smollm2, ctx, batch)
        assert check.ok, check.reason
        (short_cells, short_s), (long_cells, long_s) = check.round_trips
        assert long_cells == ROUND_TRIP_COPIES * short_cells and short_s > 0 and long_s > 0
        assert ctx.seq_pos_max(0) == ctx.seq_pos_max(1) == -1


def test_smollm2_transposed_v_without_flash_attention(smollm2):
    blob, n = export(smollm2, dataclasses.replace(PARAMS, flash_attn=False))
    state = parse_seq_state(blob)
    (stream,) = state.sections[0].streams
    assert stream.v_trans is True
    el_size, n_embd_v = 2, k_row_bytes_f16(smollm2) // 2  # SmolLM2: V head size = K head size
    for layer in stream.v_layers:
        assert (layer.type_id, layer.el_size, layer.n_embd_v_gqa) == (F16, el_size, n_embd_v)
        assert layer.rows(n).shape == (n_embd_v, n * el_size)
    assert expected_nbytes(state) == len(blob)
    assert build_seq_state(state) == blob


# --- Gemma 3: interleaved SWA, a base cache and a sliding-window cache -------------------------
def test_gemma3_two_sections_round_trip(gemma3):
    blob, n = export(gemma3)
    state = parse_seq_state(blob)
    assert len(state.sections) == 2
    assert_cells(state, range(n), seq_id=0)  # short prompt: no cell is outside the window
    base, swa = (section.streams[0] for section in state.sections)
    # Gemma 3 puts a global-attention layer every 6th layer, the rest slide: 3 + 15 of 18.
    assert (len(base.k_layers), len(swa.k_layers)) == (3, 15)
    assert len(base.k_layers) + len(swa.k_layers) == gemma3.n_layer
    row = k_row_bytes_f16(gemma3)
    layers = base.k_layers + base.v_layers + swa.k_layers + swa.v_layers
    assert all(t.row_bytes == row for t in layers)
    assert sum(t.row_bytes for t in layers) == gemma3.kv_bytes_per_cell("f16")
    assert expected_nbytes(state) == len(blob) == state.nbytes
    assert build_seq_state(state) == blob
    restore_gives_identical_logits(gemma3, blob)


def test_gemma3_swa_section_omits_cells_outside_the_window(gemma3):
    """Past the window, the SWA section carries only the last n_swa positions."""
    n_swa = int(gemma3.meta("gemma3.attention.sliding_window"))
    n = n_swa + 88
    tokens = gemma3.tokenize("Once upon a time " * n, add_special=True, parse_special=False)[:n]
    params = dataclasses.replace(PARAMS, n_ctx_cells=1024)
    with LlamaContext(gemma3, params) as ctx:
        prefill(ctx, tokens, 0)
        blob = ctx.seq_state(0)
    state = parse_seq_state(blob)
    base, swa = (section.streams[0] for section in state.sections)
    assert base.cell_positions.tolist() == list(range(n))
    assert swa.cell_positions.tolist() == list(range(n - n_swa, n))
    assert state.n_cells == n
    assert build_seq_state(state) == blob
    # A fresh context takes the rebuilt blob and hands back the same state.
    with LlamaContext(gemma3, params) as ctx:
        ctx.set_seq_state(0, build_seq_state(state))
        assert ctx.seq_state(0) == blob


def test_a_cache_per_sequence_gives_each_sequence_its_share_of_the_cells(smollm2):
    """`unified=False` (the layout of `scripts/unified_cache_cost.py`) splits the cells into one
    stream per sequence: 300 tokens fit one sequence of the unified 512 cells, not its 256."""
    tokens = smollm2.tokenize(PROMPT * 30, add_special=True, parse_special=False)[:300]
    with LlamaContext(smollm2, PARAMS) as ctx:
        prefill(ctx, tokens, 0)
        assert ctx.seq_pos_max(0) == len(tokens) - 1
    with LlamaContext(smollm2, dataclasses.replace(PARAMS, unified=False)) as ctx:
        with pytest.raises(KVCacheFullError):
            prefill(ctx, tokens, 0)
