"""Low-bit session deltas, format version 2 mode 4 (`int4r`): one-byte key group bounds and
rotated values, on synthetic sequence states; mode-3 records still decode as they were written."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from kv3d.engine import codec, lowbit
from kv3d.engine.codec import DeltaError, LowBitSpec, decode_delta, encode_delta
from kv3d.engine.statefmt import parse_seq_state
from tests.unit.test_codec import make_state, tensors
from tests.unit.test_codec_lowbit import (
    coded_start,
    edit,
    fuzz_decoding,
    header,
    reseal,
    table,
    with_table,
)

SPEC = LowBitSpec(4, 4, 16, 64, window_tokens=8, rotation=64)
STATE = make_state(cells=40, channels=128, v_trans=True)
DELTA = encode_delta(STATE, "int4r", spec=SPEC)


# --- the rotation -------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [2, 8, 64, 256])
def test_the_rotation_is_orthonormal_and_undone_by_its_transpose(block):
    m = lowbit.rotation_matrix(block)
    assert m.dtype == np.float32 and not m.flags.writeable
    assert np.allclose(m @ m.T, np.eye(block), atol=1e-6)
    assert np.allclose(np.abs(m), 1 / np.sqrt(block))
    x = np.random.default_rng(block).normal(0, 3, (5, 2 * block)).astype(np.float16)
    y = lowbit.rotate(x, block)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x.astype(np.float32), axis=1))
    assert np.allclose(lowbit.unrotate(y, block), x, atol=1e-4)


def test_the_rotation_is_pinned():
    # Deltas written with it must decode forever: its signs and scale never change.
    digest = hashlib.sha256(lowbit.rotation_matrix(64).tobytes()).hexdigest()[:16]
    assert digest == "51fe35320b3b9ba8"
    assert not lowbit.is_block(0) and not lowbit.is_block(48) and lowbit.is_block(4096)
    with pytest.raises(ValueError):
        lowbit.rotation_matrix(96)


def test_a_rotation_spreads_an_outlier_channel():
    x = np.zeros((1, 64), np.float16)
    x[0, 5] = 64.0
    y = lowbit.rotate(x, 64)
    assert np.allclose(np.abs(y), 8.0)  # one channel of 64 becomes 64 channels of 8


# --- keys with one-byte group bounds ------------------------------------------------------------
def test_key_group_bounds_cover_the_group_and_cost_at_most_two_grid_steps():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (70, 24)).astype(np.float16)  # 70 cells: a short last group of 6
    x[:, 2] *= 50
    x[:, 7] = 3.0  # a constant channel: exact
    cmin, cmax, lo, hi, codes = lowbit.quantize_keys_u8(x, 4, 32)
    assert lo.shape == hi.shape == (3, 24) and (lo <= hi).all()
    assert np.array_equal(cmin, x.min(axis=0)) and np.array_equal(cmax, x.max(axis=0))
    out = np.empty_like(x)
    lowbit.dequantize_keys_u8_into(out, cmin, cmax, lo, hi, codes, 4, 32)
    assert np.array_equal(out[:, 7], x[:, 7])
    u = (cmax.astype(np.float32) - cmin.astype(np.float32)) / 255
    x32 = x.astype(np.float32)
    for g, first in enumerate(range(0, 70, 32)):
        block = x32[first : first + 32]
        span = block.max(axis=0) - block.min(axis=0)
        step = (span + 2 * u) / lowbit.levels(4)
        bound = step * 0.5 + np.abs(block) * 1e-3 + 1e-6  # f16 rounding of the result
        assert np.all(np.abs(block - out[first : first + 32]) <= bound)
        assert lowbit.bounds_ok(cmin, cmax, lo[g : g + 1], hi[g : g + 1])


def test_key_bounds_no_encoder_writes_are_refused():
    cmin = np.array([0.0, 1.0], np.float16)
    cmax = np.array([1.0, 2.0], np.float16)
    lo = np.array([[0, 3]], np.uint8)
    hi = np.array([[255, 3]], np.uint8)
    assert lowbit.bounds_ok(cmin, cmax, lo, hi)
    assert not lowbit.bounds_ok(cmax, cmin, lo, hi)  # cmin above cmax
    assert not lowbit.bounds_ok(np.array([np.nan, 1], np.float16), cmax, lo, hi)
    assert not lowbit.bounds_ok(cmin, np.array([np.inf, 2], np.float16), lo, hi)
    assert not lowbit.bounds_ok(cmin, cmax, hi, lo)  # lo above hi


def test_extreme_keys_decode_finite():
    x = np.array([[-65504.0], [65504.0], [0.0]], np.float16)
    cmin, cmax, lo, hi, codes = lowbit.quantize_keys_u8(x, 2, 2)
    out = np.empty_like(x)
    lowbit.dequantize_keys_u8_into(out, cmin, cmax, lo, hi, codes, 2, 2)
    assert np.isfinite(out.astype(np.float32)).all() and out[0, 0] == -65504 and out[1, 0] == 65504


# --- the container ------------------------------------------------------------------------------
@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("window", [0, 8])
def test_round_trip_is_within_the_steps_and_values_are_rotated(v_trans, window):
    spec = LowBitSpec(4, 4, 16, 64, window_tokens=window, rotation=64)
    blob = make_state(cells=45, channels=128, v_trans=v_trans)  # a short last K group
    delta = encode_delta(blob, "int4r", spec=spec)
    fields = header(delta)
    assert (fields["mode"], fields["reserved"]) == (codec.ROTATED_MODE, 64)
    assert table(delta)["rotated"].tolist() == [0, 0, 1, 1]
    decoded = decode_delta(delta)
    before = parse_seq_state(blob).sections[0].streams[0]
    after = parse_seq_state(bytes(decoded)).sections[0].streams[0]
    assert np.array_equal(before.cell_positions, after.cell_positions)
    layers = len(before.k_layers)
    coded = 45 - window
    for i, (x, y) in enumerate(zip(tensors(blob), tensors(decoded), strict=True)):
        assert np.array_equal(x[coded:], y[coded:])  # the newest cells, exact
        x, y = x[:coded], y[:coded]
        if i < layers:  # K: per channel, groups of 16 cells; bounds on a 255-step grid
            u = (x.max(axis=0) - x.min(axis=0)) / 255
            starts = np.arange(0, coded, 16)
            span = np.repeat(
                np.maximum.reduceat(x, starts) - np.minimum.reduceat(x, starts),
                np.diff(np.append(starts, coded)),
                axis=0,
            )
            bound = (span + 2 * u) / 15 * 0.51 + np.abs(x) * 2e-3 + 1e-5
            assert np.all(np.abs(x - y) <= bound)
        else:  # V: rotated per cell, groups of 64; the error's norm per block is kept
            r = lowbit.rotate(x.astype(np.float16), 64).reshape(coded, -1, 64)
            steps = (r.max(axis=2) - r.min(axis=2)) / 15 * (1 + 4e-3)
            err = np.linalg.norm((x - y).reshape(coded, -1, 64), axis=2)
            assert np.all(err <= np.sqrt(64) * steps * 0.5 + np.abs(x).max() * 4e-3 + 1e-5)


def test_values_that_cannot_be_rotated_are_coded_as_they_are():
    # 96 channels: whole groups of 32 but not whole blocks of 64; and one V of huge values,
    # whose rotation would not decode within the f16 range.
    spec = LowBitSpec(4, 4, 16, 32, window_tokens=0, rotation=64)
    blob = make_state(cells=20, channels=96)
    assert table(encode_delta(blob, "int4r", spec=spec))["rotated"].tolist() == [0, 0, 0, 0]
    big = bytearray(make_state(cells=20, channels=64, layers=1, seed=3))
    v = parse_seq_state(big).sections[0].streams[0].v_layers[0].data.view(np.float16)
    v[:] = np.where(np.arange(v.size) % 3 == 0, -60000.0, 60000.0).astype(np.float16)
    big = bytes(big)  # the V bytes were edited in place through the parsed view
    delta = encode_delta(big, "int4r", spec=spec)
    assert table(delta)["rotated"].tolist() == [0, 0]
    assert np.isfinite(tensors(decode_delta(delta))[1]).all()


def test_int4r_stores_at_least_3_5x_fewer_bytes_than_f16():
    blob = make_state(cells=1024, channels=192, layers=2)
    f16 = 2 * 1024 * 192 * 4  # the K/V tensors' bytes; the rest (cell metadata) is verbatim
    coded = len(encode_delta(blob, "int4r")) - (len(blob) - f16)
    # 4 bits a value, + K: 2 bytes per 32 cells and channel (and its range); V: 4 bytes per
    # 64 channels; + the header and table
    assert coded * 8 / (f16 / 2) <= 4 + 0.5 + 0.02
    assert f16 / coded >= 3.5
    assert codec.LOWBIT_MODES["int4r"].mode == codec.ROTATED_MODE


def test_mode_3_records_decode_and_encode_as_before_mode_4():
    # The bytes `int4` wrote before mode 4 existed (same states as in test_codec_lowbit).
    for v_trans, digest in [(False, "571421d1f5161384"), (True, "151d9bf2fb0c09b3")]:
        blob = make_state(cells=45, channels=64, v_trans=v_trans)
        delta = encode_delta(blob, "int4")
        assert hashlib.sha256(delta).hexdigest()[:16] == digest
        assert len(decode_delta(delta)) == len(blob)


def test_spec_checks_the_rotation():
    with pytest.raises(ValueError, match="rotation"):
        LowBitSpec(4, 4, rotation=48)
    assert LowBitSpec(4, 4).mode == codec.LOWBIT_MODE


# --- refusal ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: reseal(b, reserved=0), "rotation block"),
        (lambda b: reseal(b, reserved=48), "rotation block"),
        (lambda b: reseal(b, reserved=8192), "rotation block"),
        (lambda b: reseal(b, mode=5), "mode"),
        (lambda b: reseal(b, kg=32), "tensor table says"),
    ],
)
def test_damaged_mode_4_headers_are_refused(damage, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(damage(DELTA))


def test_a_rotation_block_wider_than_the_rotated_tensors_is_refused():
    delta = encode_delta(make_state(cells=40, channels=64), "int4r", spec=SPEC)
    assert table(delta)["rotated"].tolist() == [0, 0, 1, 1]
    with pytest.raises(DeltaError, match="cannot be rotated"):
        decode_delta(reseal(delta, reserved=128))


@pytest.mark.parametrize(
    "change, message",
    [
        (edit(0, rotated=1), "cannot be rotated"),  # a K tensor
        (edit(2, rotated=2), "malformed"),
        (edit(2, pad=b"\x01" * 5), "malformed"),
        (edit(2, rotated=0), "min or step|disagrees"),  # a rotated V read as unrotated
    ],
)
def test_crafted_mode_4_tables_are_refused_or_decode_finite(change, message):
    data = with_table(DELTA, change(table(DELTA)))
    try:
        out = decode_delta(data)
    except DeltaError as exc:
        assert re.search(message, str(exc))
        return
    # Reading rotated codes as unrotated ones is not detectable; what decodes must be finite.
    assert message.startswith("min or step")
    assert all(np.isfinite(t).all() for t in tensors(out))


def test_a_rotated_flag_in_a_mode_3_delta_is_refused():
    delta = encode_delta(STATE, "int4", spec=LowBitSpec(4, 4, 16, 64, 8))
    entries = table(delta)
    entries[2]["rotated"] = 1
    with pytest.raises(DeltaError, match="cannot be rotated"):
        decode_delta(with_table(delta, entries))


def key_params_at(delta: bytes, blob: bytes) -> int:
    """Where the first K tensor's cmin starts (after its exact rows)."""
    first = table(delta)[0]
    return coded_start(delta, blob) + 2 * SPEC.window_tokens * int(first["channels"])


@pytest.mark.parametrize(
    "where, value",
    [("cmin", np.nan), ("cmin", np.inf), ("cmax", -np.inf), ("cmin", 30000.0), ("lo", 255)],
)
def test_key_ranges_and_bounds_no_encoder_writes_are_refused(where, value):
    channels = int(table(DELTA)[0]["channels"])
    at = key_params_at(DELTA, STATE)
    data = bytearray(DELTA)
    if where == "cmin":
        data[at : at + 2] = np.float16(value).tobytes()
    elif where == "cmax":
        data[at + 2 * channels : at + 2 * channels + 2] = np.float16(value).tobytes()
    else:  # the first group's lo above its hi
        lo_at = at + 4 * channels
        groups = lowbit.key_groups(40 - SPEC.window_tokens, SPEC.key_group_tokens)
        data[lo_at] = value
        data[lo_at + groups * channels] = 0
    with pytest.raises(DeltaError, match="key range or group bound"):
        decode_delta(reseal(bytes(data)))


def test_rotated_value_params_past_the_rotation_limit_are_refused():
    entries = table(DELTA)
    # The first V tensor's mins follow its exact rows; K tensors come first in the payload.
    at = coded_start(DELTA, STATE)
    for t in entries[:2]:
        at += codec._lowbit_tensor_bytes(
            codec._Tensor(0, int(t["cells"]), int(t["channels"]), False, int(t["role"])), SPEC
        )
    at += 2 * SPEC.window_tokens * int(entries[2]["channels"])
    data = bytearray(DELTA)
    data[at : at + 2] = np.float16(-10000.0).tobytes()  # finite, but past 65504 / 8
    with pytest.raises(DeltaError, match="min or step"):
        decode_delta(reseal(bytes(data)))


def test_bits_after_the_last_key_code_are_refused():
    blob = make_state(cells=9, channels=33, layers=1)  # 33 codes: a padding nibble
    spec = LowBitSpec(4, 4, 4, 32, window_tokens=8, rotation=64)
    delta = encode_delta(blob, "int4r", spec=spec)
    assert table(delta)["role"].tolist() == [0]
    last = len(delta) - 1
    assert decode_delta(delta) and delta[last] >> 4 == 0
    data = bytearray(delta)
    data[last] |= 0x10
    with pytest.raises(DeltaError, match="after its last code"):
        decode_delta(reseal(bytes(data)))


def test_fuzzed_mode_4_deltas_raise_only_delta_errors():
    fuzz_decoding(DELTA)


def test_a_session_store_parks_and_resumes_int4r_sessions_from_every_tier(tmp_path):
    from kv3d.engine.tiers import SessionStore
    from tests.unit.test_tiers import FP

    blob = make_state(cells=200, channels=128)
    store = SessionStore(10**9, cold_dir=str(tmp_path), codec="int4r")
    store.park("s", FP, tuple(range(200)), 0, blob)
    store.flush()
    assert store._warm["s"].delta[8:11] == b"\x02\x00\x04"  # format version 2, mode 4
    assert store.stats()["delta_compression_ratio"] > 3.0  # 2 small layers: metadata weighs
    warm = store.take("s").result()
    assert warm.tier == "warm" and len(warm.blob) == len(blob)
    store.close()
    cold = SessionStore(10**9, cold_dir=str(tmp_path), codec="int8").take("s").result()
    assert cold.tier == "cold" and bytes(cold.blob) == bytes(warm.blob)
