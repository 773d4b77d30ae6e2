"""Low-bit session deltas, format version 2 mode 6 (`int4p`): keys coded before RoPE with their
bits allocated per channel, and the sequence's first cells exact; on synthetic states whose keys
carry a RoPE as llama.cpp's would."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from kv3d.engine import codec, lowbit, rope
from kv3d.engine.codec import DeltaError, LowBitSpec, decode_delta, encode_delta
from kv3d.engine.rope import NEOX, NORMAL, RopeSpec
from kv3d.engine.statefmt import (
    CacheSection,
    SeqState,
    StreamState,
    build_seq_state,
    parse_seq_state,
)
from tests.unit.test_codec import f16_layer, tensors
from tests.unit.test_codec_lowbit import (
    coded_start,
    fuzz_decoding,
    header,
    reseal,
    table,
    with_table,
)

HEAD = 32
ROPE = RopeSpec(NEOX, head_dim=HEAD, n_rot=HEAD, freq_scale=1.0, bases=(10000.0,))


def roped_state(cells=96, heads=4, layers=2, start=0, spec=ROPE, seed=0, v_trans=False):
    """A state whose keys are steady per channel before RoPE (a mean per channel, small noise,
    some channels far larger than others) and turned by `spec` at positions start...; its
    first cell an outlier, as an attention sink's keys and values can be."""
    rng = np.random.default_rng(seed)
    positions = np.arange(start, start + cells, dtype=np.int32)
    ks, vs = [], []
    for _ in range(layers):
        scale = np.exp(rng.normal(0, 1.2, heads * HEAD))
        pre = rng.normal(0, 1, heads * HEAD) * 3 + rng.normal(0, 0.3, (cells, heads * HEAD))
        pre *= scale
        pre[0] *= 4
        ks.append(f16_layer(rope.turn(pre, positions, spec, spec.bases[0], back=False)))
        v = rng.normal(0, 1, (cells, heads * HEAD))
        v[0] *= 6
        vs.append(f16_layer(v, transposed=v_trans))
    stream = StreamState(
        positions, tuple((0,) for _ in range(cells)), None, v_trans, tuple(ks), tuple(vs)
    )
    return build_seq_state(SeqState(0, (CacheSection((stream,)),)))


def rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


# --- RoPE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [NORMAL, NEOX])
def test_turning_back_undoes_turning_forward_and_spares_unrotated_channels(layout):
    spec = RopeSpec(layout, head_dim=16, n_rot=12, freq_scale=0.5, bases=(500.0,))
    x = np.random.default_rng(1).normal(0, 3, (40, 32)).astype(np.float32)
    positions = np.arange(100, 140)
    forward = rope.turn(x, positions, spec, 500.0, back=False)
    assert np.allclose(rope.turn(forward, positions, spec, 500.0, back=True), x, atol=1e-4)
    heads = forward.reshape(40, 2, 16)
    assert np.array_equal(heads[..., 12:], x.reshape(40, 2, 16)[..., 12:])  # past n_rot
    # The first pair turns by position * freq_scale radians, as llama.cpp's does.
    pair = (0, 1) if layout == NORMAL else (0, 6)
    angle = 100 * 0.5
    a, b = x[0, pair[0]], x[0, pair[1]]
    expect = (a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle))
    assert np.allclose(forward[0, list(pair)], expect, atol=1e-4)


def test_a_models_rope_comes_from_its_metadata():
    gemma = {
        "general.architecture": "gemma3",
        "gemma3.attention.head_count": "4",
        "gemma3.attention.key_length": "256",
        "gemma3.rope.freq_base": "1000000.0",
    }
    spec = rope.spec_for(gemma.get, 2, 1.0, 640)
    assert spec == RopeSpec(NEOX, 256, 256, 1.0, (1e6, 1e4))  # sliding-window layers: 10k
    llama = {"general.architecture": "llama", "llama.attention.head_count": "9"}
    spec = rope.spec_for(llama.get, 0, 0.25, 576)
    assert spec == RopeSpec(NORMAL, 64, 64, 0.25, (10000.0, 10000.0))
    assert rope.spec_for(llama.get, 8, 1.0, 576) is None  # multi-section RoPE: not undone
    assert rope.spec_for({"general.architecture": "x"}.get, 0, 1.0, 576) is None  # no heads


@pytest.mark.parametrize(
    "kwargs",
    [dict(layout=3), dict(n_rot=7), dict(n_rot=80), dict(bases=()), dict(freq_scale=float("nan"))],
)
def test_impossible_ropes_are_refused(kwargs):
    fields = dict(layout=NORMAL, head_dim=64, n_rot=64, freq_scale=1.0, bases=(1e4,)) | kwargs
    with pytest.raises(ValueError):
        RopeSpec(**fields)


# --- bits per channel ---------------------------------------------------------------------------
@pytest.mark.parametrize("cells", [1, 7, 33])
def test_any_mix_of_widths_round_trips_through_at_most_four_planes(cells):
    bits = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 5, 3, 8], np.uint8)
    rng = np.random.default_rng(cells)
    codes = (rng.integers(0, 256, (cells, bits.size)) & ((1 << bits.astype(int)) - 1)).astype(
        np.uint8
    )
    layout = lowbit.plane_layout(bits)
    assert [w for w, _, _ in layout] == [1, 2, 4, 8]
    # A 5-bit channel: its lowest bit in the 1-bit plane, the other four in the 4-bit plane.
    four = dict(zip(layout[2][1].tolist(), layout[2][2].tolist(), strict=True))
    assert four[5] == 1 and four[4] == 0 and four[7] == 3 and 8 not in four
    # Each plane holds its channels' codes channel by channel.
    planes = [
        lowbit.pack((codes[:, ch].T >> s[:, None]) & np.uint8((1 << w) - 1), w)
        for w, ch, s in layout
    ]
    assert sum(p.size for p in planes) == lowbit.plane_bytes(bits, cells)
    assert np.array_equal(lowbit.unpack_planes(planes, bits, cells), codes)


def test_bits_follow_each_channels_variance_and_keep_the_mean():
    variance = np.array([0.0, 1e-6, 1.0, 4.0, 16.0, 1e12])
    bits = lowbit.allocate_bits(variance, 4.0)
    assert bits.dtype == np.uint8 and bits.mean() <= 4.0
    assert bits[0] == 0 and bits[-1] == lowbit.MAX_KEY_BITS  # steady: 0; huge: capped
    assert bits[3] == bits[2] + 1 and bits[4] == bits[3] + 1  # 4x the variance: one more bit
    assert np.all(np.diff(bits.astype(int)) >= 0)


# --- the container ------------------------------------------------------------------------------
@pytest.mark.parametrize("v_trans", [False, True])
def test_keys_coded_before_rope_lose_less_and_the_sink_cell_is_exact(v_trans):
    blob = roped_state(v_trans=v_trans)
    with_rope = encode_delta(blob, "int4p", rope=ROPE)
    without = encode_delta(blob, "int4p")
    assert header(with_rope)["mode"] == codec.PREROPE_MODE
    assert table(with_rope)["rotated"].tolist() == [1, 1, 1, 1]  # keys turned, values rotated
    assert table(without)["rotated"].tolist() == [0, 0, 1, 1]
    ref = tensors(blob)
    turned, plain = tensors(decode_delta(with_rope)), tensors(decode_delta(without))
    for i in range(4):
        assert np.array_equal(turned[i][0], ref[i][0])  # position 0: exact
        assert np.array_equal(plain[i][0], ref[i][0])
    for i in range(2):  # keys
        assert rms(turned[i], ref[i]) < 0.5 * rms(plain[i], ref[i])
    for i in range(2, 4):  # values: as int4r codes them, the sink kept out of the groups
        assert rms(turned[i], ref[i]) == rms(plain[i], ref[i])
        assert rms(turned[i][1:], ref[i][1:]) < 0.1


def test_without_a_cell_below_the_sink_nothing_is_kept_exact():
    blob = roped_state(start=5)
    delta = encode_delta(blob, "int4p", rope=ROPE)
    decoded = tensors(decode_delta(delta))
    assert not np.array_equal(decoded[2][0], tensors(blob)[2][0])


def test_int4p_stores_at_least_3_5x_fewer_bytes_than_f16():
    blob = roped_state(cells=1024, heads=6, layers=2)
    f16 = 2 * 1024 * 6 * HEAD * 4
    coded = len(encode_delta(blob, "int4p", rope=ROPE)) - (len(blob) - f16)
    assert f16 / coded >= 3.5


def test_a_wrong_rope_costs_fidelity_never_exactness_of_the_format():
    # A RoPE that does not fit the keys' heads is not used; one that fits but is not the
    # model's (another base) still decodes what it encoded, only with more error.
    blob = roped_state()
    misfit = RopeSpec(NEOX, head_dim=48, n_rot=48, freq_scale=1.0, bases=(1e4,))
    assert table(encode_delta(blob, "int4p", rope=misfit))["rotated"].tolist()[:2] == [0, 0]
    wrong = RopeSpec(NEOX, head_dim=HEAD, n_rot=HEAD, freq_scale=1.0, bases=(77.0,))
    ref, right = tensors(blob), tensors(decode_delta(encode_delta(blob, "int4p", rope=ROPE)))
    off = tensors(decode_delta(encode_delta(blob, "int4p", rope=wrong)))
    assert rms(right[0], ref[0]) < rms(off[0], ref[0]) < 0.2 * np.abs(ref[0]).mean()


def test_two_sections_turn_by_their_own_bases():
    spec = RopeSpec(NEOX, HEAD, HEAD, 1.0, (1e6, 1e4))
    base = parse_seq_state(roped_state(spec=RopeSpec(NEOX, HEAD, HEAD, 1.0, (1e6,))))
    swa = parse_seq_state(roped_state(seed=1))
    both = build_seq_state(SeqState(0, (base.sections[0], swa.sections[0])))
    decoded = parse_seq_state(bytes(decode_delta(encode_delta(both, "int4p", rope=spec))))
    alone = parse_seq_state(
        bytes(decode_delta(encode_delta(roped_state(seed=1), "int4p", rope=ROPE)))
    )
    assert np.array_equal(
        decoded.sections[1].streams[0].k_layers[0].data,
        alone.sections[0].streams[0].k_layers[0].data,
    )


def test_mode_5_settings_are_checked():
    with pytest.raises(ValueError, match="rotation and no exact window"):
        LowBitSpec(4, 4, 32, 64, window_tokens=8, rotation=64, prerope=True)
    with pytest.raises(ValueError, match="mode 6"):
        LowBitSpec(4, 4, 32, 64, rotation=64, sink_tokens=1)
    assert codec.LOWBIT_MODES["int4p"].mode == codec.PREROPE_MODE


# --- damaged deltas -----------------------------------------------------------------------------
BLOB = roped_state(cells=40)
DELTA = encode_delta(BLOB, "int4p", rope=ROPE)
PREAMBLE_AT = codec._HEADER_V2.size + 4 * codec._ENTRY_V2.itemsize


def with_preamble(**fields) -> bytes:
    sink, head, n_rot, layout, n_bases, scale = codec._PREAMBLE.unpack_from(DELTA, PREAMBLE_AT)
    values = dict(sink=sink, head=head, n_rot=n_rot, layout=layout, n_bases=n_bases, scale=scale)
    values |= fields
    data = bytearray(DELTA)
    struct.pack_into("<HHHBBf", data, PREAMBLE_AT, *values.values())
    return reseal(bytes(data))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(layout=9), "impossible RoPE"),
        (dict(n_rot=HEAD + 2), "impossible RoPE"),
        (dict(scale=float("inf")), "impossible RoPE"),
        (dict(layout=0), "without RoPE has RoPE settings"),
        (dict(n_bases=200), "RoPE"),
        (dict(head=48, n_rot=48), "turned back by a RoPE it does not state"),
    ],
)
def test_damaged_preambles_are_refused(fields, message):
    with pytest.raises(DeltaError, match=message):
        decode_delta(with_preamble(**fields))


def test_a_turned_flag_on_a_mode_4_key_is_refused():
    delta = encode_delta(BLOB, "int4r")
    entries = table(delta).copy()
    entries["rotated"][0] = 1
    with pytest.raises(DeltaError, match="cannot be rotated"):
        decode_delta(with_table(delta, entries))


def test_key_widths_and_ranges_no_encoder_writes_are_refused():
    # The first key tensor's bits: past the preamble (one base) and the tensor's sink row.
    at = coded_start(DELTA, BLOB) + codec._PREAMBLE.size + 4 + 2 * HEAD * 4
    for value, message in [(9, "wider"), (0, "delta")]:
        data = bytearray(DELTA)
        data[at] = value  # a 9-bit channel; a coded channel claimed as 0 bits
        with pytest.raises(DeltaError, match=message):
            decode_delta(reseal(bytes(data)))


def test_truncated_and_padded_mode_5_payloads_are_refused():
    for data in (DELTA[:-1], DELTA + b"\0", DELTA[: PREAMBLE_AT + 3]):
        with pytest.raises(DeltaError):
            decode_delta(reseal(data))


def test_fuzzed_mode_5_deltas_raise_only_delta_errors():
    fuzz_decoding(DELTA)


def test_a_session_store_parks_and_resumes_int4p_sessions_from_every_tier(tmp_path):
    from kv3d.engine.tiers import SessionStore
    from tests.unit.test_tiers import FP

    blob = roped_state(cells=200)
    store = SessionStore(10**9, cold_dir=str(tmp_path), codec="int4p", rope=ROPE)
    store.park("s", FP, tuple(range(200)), 0, blob)
    store.flush()
    delta = store._warm["s"].delta
    assert delta[8:11] == b"\x02\x00\x06" and table(delta)["rotated"].tolist()[:2] == [1, 1]
    warm = store.take("s").result()
    assert warm.tier == "warm" and len(warm.blob) == len(blob)
    store.close()
    cold = SessionStore(10**9, cold_dir=str(tmp_path), codec="int8").take("s").result()
    assert cold.tier == "cold" and bytes(cold.blob) == bytes(warm.blob)


def test_int4ps_interim_mode_5_layout_is_refused_not_misread():
    with pytest.raises(DeltaError, match="unknown delta mode 5"):
        decode_delta(reseal(DELTA, mode=5))
