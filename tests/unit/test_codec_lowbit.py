"""Low-bit session deltas (format version 2) on synthetic sequence states: the arithmetic of
`kv3d.engine.lowbit`, the container in `kv3d.engine.codec`, and its refusal of bad bytes."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest

from kv3d.engine import codec, lowbit
from kv3d.engine.codec import DeltaError, LowBitSpec, decode_delta, encode_delta
from kv3d.engine.statefmt import parse_seq_state
from tests.unit.test_codec import Q8_0, make_state, tensors

SPEC = LowBitSpec(4, 4, key_group_tokens=16, value_group_channels=32, window_tokens=8)
STATE = make_state(cells=40, channels=64, v_trans=True)
DELTA = encode_delta(STATE, "int4", spec=SPEC)


def header(data: bytes) -> dict:
    names = "magic version mode flags kb vb kg vg window reserved n crc blob stored payload".split()
    return dict(zip(names, codec._HEADER_V2.unpack_from(data), strict=True))


def reseal(data: bytes, **fields) -> bytes:
    """Fix a v2 delta's crc and lengths (set any other header field by name)."""
    size = codec._HEADER_V2.size
    values = header(data)
    stored = data[size:]
    values.update(crc=zlib.crc32(stored), stored=len(stored))
    if not values["flags"]:
        values["payload"] = len(stored)
    values.update(fields)
    return codec._HEADER_V2.pack(*values.values()) + stored


def table(data: bytes) -> np.ndarray:
    n = header(data)["n"]
    return np.frombuffer(data, codec._ENTRY_V2, count=n, offset=codec._HEADER_V2.size).copy()


def with_table(data: bytes, entries: np.ndarray) -> bytes:
    size = codec._HEADER_V2.size
    return reseal(data[:size] + entries.tobytes() + data[size + entries.nbytes :])


def coded_start(data: bytes, blob: bytes) -> int:
    """Where the first tensor's coded bytes start in `data` (undeflated)."""
    entries = table(data)
    verbatim = len(blob) - sum(2 * int(t["cells"]) * int(t["channels"]) for t in entries)
    return codec._HEADER_V2.size + entries.nbytes + verbatim


# --- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", lowbit.BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_pack_unpack_round_trip_and_zero_padding(bits, n):
    codes = np.random.default_rng(n).integers(0, 1 << bits, n, dtype=np.uint8)
    packed = lowbit.pack(codes, bits)
    assert packed.size == lowbit.packed_bytes(n, bits) == -(-n * bits // 8)
    assert np.array_equal(lowbit.unpack(packed, n, bits), codes)
    assert lowbit.padding_is_zero(packed, n, bits)


def test_packing_puts_the_first_code_in_the_lowest_bits():
    assert lowbit.pack(np.array([1, 2, 15], np.uint8), 4).tolist() == [0x21, 0x0F]
    assert lowbit.pack(np.array([1, 2, 3, 0, 3], np.uint8), 2).tolist() == [0b00111001, 0b11]


# --- arithmetic ----------------------------------------------------------------------------------
def test_keys_are_quantised_per_channel_and_values_per_cell():
    x = np.zeros((16, 32), np.float16)
    x[:, 0] = np.arange(16)  # one channel spanning 0..15: step 1, exact at 4 bits
    x[:, 1] = 1000.0  # a constant outlier channel: step 0, exact
    mins, steps, codes = lowbit.quantize_keys(x, 4, 16)
    assert mins.shape == steps.shape == (1, 32)
    assert steps[0, 0] == 1 and steps[0, 1] == 0 and mins[0, 1] == 1000
    out = np.empty_like(x)
    lowbit.dequantize_keys_into(out, mins, steps, codes, 16)
    assert np.array_equal(out, x)
    mins, steps, codes = lowbit.quantize_values(x, 4, 32)
    assert mins.shape == (16, 1)


def test_a_step_that_would_overflow_f16_is_lowered():
    x = np.array([[-65504.0], [65504.0]], np.float16)
    mins, steps, codes = lowbit.quantize_keys(x, 2, 2)
    assert lowbit.params_ok(mins, steps, 2)
    out = np.empty_like(x)
    lowbit.dequantize_keys_into(out, mins, steps, codes, 2)
    assert np.isfinite(out.astype(np.float32)).all()


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("mode", ["int4", "k4v2", "int2"])
def test_round_trip_is_within_half_a_step_and_the_window_is_exact(mode, v_trans):
    base = codec.LOWBIT_MODES[mode]
    spec = LowBitSpec(base.key_bits, base.value_bits, 16, 32, 8)
    blob = make_state(cells=45, channels=64, v_trans=v_trans)  # 37 coded: a short last K group
    decoded = decode_delta(encode_delta(blob, mode, spec=spec))
    before = parse_seq_state(blob).sections[0].streams[0]
    after = parse_seq_state(bytes(decoded)).sections[0].streams[0]
    assert np.array_equal(before.cell_positions, after.cell_positions)
    layers = len(before.k_layers)
    for i, (x, y) in enumerate(zip(tensors(blob), tensors(decoded), strict=True)):
        assert np.array_equal(x[-8:], y[-8:])  # the newest cells, exact
        x, y = x[:-8], y[:-8]
        if i < layers:  # K: groups of 16 cells per channel
            bits = spec.key_bits
            starts = np.arange(0, len(x), 16)
            span = np.repeat(
                np.maximum.reduceat(x, starts) - np.minimum.reduceat(x, starts),
                np.diff(np.append(starts, len(x))),
                axis=0,
            )
        else:  # V: groups of 32 channels per cell
            bits = spec.value_bits
            g = x.reshape(len(x), -1, 32)
            span = np.repeat(g.max(axis=2) - g.min(axis=2), 32, axis=1)
        step = span / lowbit.levels(bits)
        # half a step, plus f16 rounding of the step (x levels), of the min and of the result
        bound = step * (0.5 + 2e-3 * lowbit.levels(bits)) + np.abs(x) * 2e-3 + 1e-6
        assert np.all(np.abs(x - y) <= bound)


def test_sizes_approach_the_bits_per_element():
    blob = make_state(cells=1024, channels=256, layers=2)
    f16 = 2 * 1024 * 256 * 4  # bytes of the K/V tensors
    int4 = len(encode_delta(blob, "int4", spec=LowBitSpec(4, 4, 32, 64, window_tokens=0)))
    k4v2 = len(encode_delta(blob, "k4v2", spec=LowBitSpec(4, 2, 32, 64, window_tokens=0)))
    # 4 bits of 16, plus 4 bytes (min, step) per 32 K or 64 V elements, plus cell metadata
    assert int4 < f16 * (0.25 + (4 / 32 + 4 / 64) / 4 + 0.01)
    assert k4v2 < int4 * 0.8


def test_roles_come_from_the_state_and_odd_tensors_stay_verbatim():
    roles = table(DELTA)["role"].tolist()
    assert roles == [0, 0, 1, 1]  # K layers, then V layers, as llama.cpp writes them
    blob = make_state(cells=20, channels=48, k_type=Q8_0)  # q8_0 K; V of 48 channels
    delta = encode_delta(blob, "int4", spec=LowBitSpec(4, 4, 16, 32, 4))
    assert header(delta)["n"] == 0
    assert bytes(decode_delta(delta)) == blob


def test_a_delta_shorter_than_its_window_is_exact():
    blob = make_state(cells=5)
    assert bytes(decode_delta(encode_delta(blob, "int2", spec=LowBitSpec(2, 2, 8, 32, 8)))) == blob


def test_deflate_is_kept_only_when_it_pays_and_decodes_the_same():
    spec = LowBitSpec(4, 4, 16, 32, 8, deflate=True)
    deflated = encode_delta(STATE, "int4", spec=spec)
    plain = encode_delta(STATE, "int4", spec=LowBitSpec(4, 4, 16, 32, 8))
    assert header(deflated)["flags"] in (0, 1) and len(deflated) <= len(plain)
    assert decode_delta(deflated) == decode_delta(plain)


def test_version_1_records_still_decode_and_encode_unchanged():
    v1 = encode_delta(make_state(), "int8", 32)
    assert struct.unpack_from("<H", v1, 8)[0] == 1
    # The bytes version 1 wrote before format version 2 existed.
    assert hashlib.sha256(v1).hexdigest()[:16] == "d2d29b64d61211cf"
    assert len(decode_delta(v1)) == len(make_state())


# --- refusal -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:40], "header"),
        (lambda b: b[:-3], "payload"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x10]), "checksum"),
        (lambda b: reseal(b, mode=9), "mode"),
        (lambda b: reseal(b, flags=2), "flags"),
        (lambda b: reseal(b, reserved=1), "reserved"),
        (lambda b: reseal(b, kb=3), "settings"),
        (lambda b: reseal(b, kg=0), "settings"),
        (lambda b: reseal(b, window=9), "tensor table says"),
        (lambda b: reseal(b, kg=32), "tensor table says"),
        (lambda b: reseal(b, n=10**6), "exceeds"),
        (lambda b: reseal(b, blob=2**60), "tensor table says"),
        (lambda b: reseal(b, payload=1), "stored as it is"),
    ],
)
def test_damaged_headers_are_refused(damage, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(damage(DELTA))


def edit(i, **fields):
    def apply(entries):
        for name, value in fields.items():
            entries[i][name] = value
        return entries

    return apply


@pytest.mark.parametrize(
    "change, message",
    [
        (edit(0, role=2), "malformed"),
        (edit(0, pad=b"\x01" * 5), "malformed"),
        (edit(0, role=1), "disagrees|table says"),  # a K layer claimed as V
        (edit(2, channels=48), "whole groups"),
        (edit(1, offset=0), "overlaps"),
        (edit(0, offset=2**62), "outside"),
        (lambda t: t[::-1].copy(), "overlaps"),
    ],
)
def test_crafted_tables_are_refused(change, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(with_table(DELTA, change(table(DELTA))))


@pytest.mark.parametrize(
    "value, at_step",
    [(np.nan, False), (np.inf, False), (np.nan, True), (-1.0, True), (60000.0, True)],
)
def test_mins_and_steps_no_encoder_writes_are_refused(value, at_step):
    first = table(DELTA)[0]
    at = coded_start(DELTA, STATE) + 2 * SPEC.window_tokens * int(first["channels"])
    if at_step:  # steps follow the mins: groups x channels of them
        coded = int(first["cells"]) - SPEC.window_tokens
        at += 2 * lowbit.key_groups(coded, SPEC.key_group_tokens) * int(first["channels"])
    data = bytearray(DELTA)
    data[at : at + 2] = np.float16(value).tobytes()
    with pytest.raises(DeltaError, match="min or step"):
        decode_delta(reseal(bytes(data)))


def test_bits_after_the_last_code_are_refused():
    # One coded cell of a 33-channel K: 33 codes at 4 bits leave a padding nibble (V of 33
    # channels is not whole groups, so it stays verbatim).
    blob = make_state(cells=9, channels=33, layers=1)
    spec = LowBitSpec(4, 4, 4, 32, window_tokens=8)
    delta = encode_delta(blob, "int4", spec=spec)
    assert table(delta)["role"].tolist() == [0]
    last = coded_start(delta, blob) + 2 * 8 * 33 + 4 * 33 + 16
    assert decode_delta(delta) and delta[last] >> 4 == 0
    data = bytearray(delta)
    data[last] |= 0x10
    with pytest.raises(DeltaError, match="after its last code"):
        decode_delta(reseal(bytes(data)))


def test_a_deflated_payload_that_lies_about_its_size_is_refused():
    spec = LowBitSpec(4, 4, 16, 32, 8, deflate=True)
    deflated = encode_delta(make_state(cells=40, channels=64), "int4", spec=spec)
    if not header(deflated)["flags"]:
        pytest.skip("deflate did not pay on this state")
    size = header(deflated)["payload"]
    for claim, message in [(size + 1, "inflate"), (size - 1, "inflate"), (2**60, "cannot hold")]:
        with pytest.raises(DeltaError, match=message):
            decode_delta(reseal(deflated, payload=claim))
    garbage = deflated[: codec._HEADER_V2.size] + b"\x00" * 32
    with pytest.raises(DeltaError, match="inflate"):
        decode_delta(reseal(garbage))


def test_verbatim_bytes_that_are_not_a_state_are_refused():
    at = codec._HEADER_V2.size + table(DELTA).nbytes
    broken = DELTA[:at] + b"\x00\x00\x00\x00" + DELTA[at + 4 :]
    with pytest.raises(DeltaError, match="sequence state"):
        decode_delta(reseal(broken))


def test_every_configurable_session_codec_is_a_codec_mode():
    from kv3d.config import SESSION_CODECS, load_config

    assert set(SESSION_CODECS) == {"int8", *codec.LOWBIT_MODES}
    assert load_config(overrides={"cache": {"session_codec": "int4"}}).cache.session_codec == "int4"
    assert load_config().cache.session_codec == "int8"


DEFLATED = encode_delta(STATE, "int4", spec=LowBitSpec(4, 4, 16, 32, 8, deflate=True))


def fuzz_decoding(delta: bytes) -> None:
    """Decode 200 mutations of a v2 delta (resealed, so that they reach the parsers behind the
    checksum): each must raise DeltaError or rebuild a state the parser reads."""
    from hypothesis import HealthCheck, given, settings

    from tests.unit.test_stored_bytes import mutate, mutations

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(edits=mutations(delta, start=8))
    def fuzz(edits):
        data = mutate(delta, edits)
        if len(data) >= codec._HEADER_V2.size and data[8:10] == b"\x02\x00":
            data = reseal(data)
        try:
            out = decode_delta(data)
        except DeltaError:
            return
        parse_seq_state(bytes(out))  # (exact rows are kept verbatim: they may hold anything)

    fuzz()


@pytest.mark.parametrize("delta", [DELTA, DEFLATED], ids=["plain", "deflated"])
def test_fuzzed_low_bit_deltas_raise_only_delta_errors(delta):
    fuzz_decoding(delta)
