"""The int8 delta codec on synthetic sequence states (built with kv3d.engine.statefmt)."""

from __future__ import annotations

import numpy as np
import pytest

from kv3d.engine.codec import DeltaError, decode_delta, encode_delta
from kv3d.engine.statefmt import (
    CacheSection,
    LayerTensor,
    SeqState,
    StreamState,
    build_seq_state,
    parse_seq_state,
)

F16, Q8_0 = 1, 8


def f16_layer(values: np.ndarray, transposed: bool = False) -> LayerTensor:
    """`values` is (cells, channels); transposed layers store it channel-major."""
    if transposed:
        raw = np.ascontiguousarray(values.T.astype(np.float16)).view(np.uint8).ravel()
        return LayerTensor(F16, raw, el_size=2, n_embd_v_gqa=values.shape[1])
    raw = np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).ravel()
    return LayerTensor(F16, raw, row_bytes=values.shape[1] * 2)


def make_state(cells=6, channels=64, layers=2, v_trans=False, seed=0, k_type=F16) -> bytes:
    rng = np.random.default_rng(seed)
    ks, vs = [], []
    for _ in range(layers):
        k = rng.normal(0, 2, (cells, channels))
        k[:, 3] *= 40  # an outlier channel, as RoPE'd keys have
        if k_type == F16:
            ks.append(f16_layer(k))
        else:
            ks.append(
                LayerTensor(k_type, rng.integers(0, 256, cells * 68, dtype=np.uint8), row_bytes=68)
            )
        vs.append(f16_layer(rng.normal(0, 1, (cells, channels)), transposed=v_trans))
    stream = StreamState(
        cell_positions=np.arange(10, 10 + cells, dtype=np.int32),
        cell_seq_ids=tuple((3,) for _ in range(cells)),
        cell_ext=None,
        v_trans=v_trans,
        k_layers=tuple(ks),
        v_layers=tuple(vs),
    )
    return build_seq_state(SeqState(3, (CacheSection((stream,)),)))


def tensors(blob) -> list[np.ndarray]:
    stream = parse_seq_state(bytes(blob)).sections[0].streams[0]
    out = []
    for layer in stream.k_layers + stream.v_layers:
        if layer.type_id != F16:
            out.append(layer.data.copy())
        elif layer.transposed:
            out.append(
                layer.data.view(np.float16).reshape(layer.n_embd_v_gqa, -1).T.astype(np.float32)
            )
        else:
            out.append(
                layer.data.view(np.float16).reshape(-1, layer.row_bytes // 2).astype(np.float32)
            )
    return out


@pytest.mark.parametrize("v_trans", [False, True])
def test_int8_round_trip_is_within_half_a_step_per_group(v_trans):
    blob = make_state(v_trans=v_trans)
    decoded = decode_delta(encode_delta(blob, "int8", group=32))
    assert len(decoded) == len(blob)
    before = parse_seq_state(blob).sections[0].streams[0]
    after = parse_seq_state(bytes(decoded)).sections[0].streams[0]
    assert np.array_equal(before.cell_positions, after.cell_positions)
    assert before.cell_seq_ids == after.cell_seq_ids
    for x, y in zip(tensors(blob), tensors(decoded), strict=True):
        groups = x.reshape(x.shape[0], -1, 32)
        step = np.abs(groups).max(axis=2, keepdims=True) / 127
        err = np.abs(groups - y.reshape(groups.shape))
        # half a quantisation step, plus f16 rounding of the scale and of the result
        assert np.all(err <= step * 0.51 + np.abs(groups) * 2e-3 + 1e-6)


def test_known_values_quantise_as_specified():
    values = np.zeros((1, 32))
    values[0, :4] = [127.0, 62.5, 0.25, -127.0]  # scale = 1: q = rint(x)
    blob = build_seq_state(
        SeqState(
            0,
            (
                CacheSection(
                    (
                        StreamState(
                            np.array([0], dtype=np.int32),
                            ((0,),),
                            None,
                            False,
                            (f16_layer(values),),
                            (f16_layer(values),),
                        ),
                    )
                ),
            ),
        )
    )
    decoded = tensors(decode_delta(encode_delta(blob, "int8", 32)))[0][0]
    assert list(decoded[:4]) == [127.0, 62.0, 0.0, -127.0]  # 62.5 rounds half to even


def test_f16_mode_is_exact_and_int8_is_about_half_of_f16():
    blob = make_state(cells=200, channels=192, layers=3)
    assert bytes(decode_delta(encode_delta(blob, "f16"))) == blob
    assert len(encode_delta(blob, "int8", 32)) / len(blob) <= 0.55


def test_tensors_that_are_not_f16_are_kept_verbatim():
    blob = make_state(k_type=Q8_0)
    decoded = decode_delta(encode_delta(blob, "int8", 32))
    for x, y in zip(tensors(blob)[:2], tensors(decoded)[:2], strict=True):
        assert np.array_equal(x, y)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"NOTADLT1" + b[8:], "magic"),
        (lambda b: b[:8] + b"\x09\x00" + b[10:], "version"),
        (lambda b: b[:-3], "payload"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x10]), "checksum"),
        (lambda b: b[:12], "header"),
    ],
)
def test_damaged_deltas_are_refused(damage, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(damage(encode_delta(make_state(), "int8", 32)))


@pytest.mark.parametrize("v_trans", [False, True])
def test_cells_from_keeps_only_later_positions_with_their_bytes(v_trans):
    from kv3d.engine.statefmt import cells_from

    blob = make_state(cells=6, v_trans=v_trans)  # positions 10..15
    full = tensors(blob)
    part = build_seq_state(cells_from(parse_seq_state(blob), 13))
    stream = parse_seq_state(part).sections[0].streams[0]
    assert list(stream.cell_positions) == [13, 14, 15]
    for x, y in zip(full, tensors(part), strict=True):
        assert np.array_equal(x[3:], y)
