import pytest

from kv3d.engine.prefix import chain_blocks
from kv3d.engine.snapshot import SnapshotError, decode_snapshot, encode_snapshot

FP = bytes(range(16))
TOKENS = tuple(range(40))
BLOCKS = tuple(chain_blocks(TOKENS, 16, FP, boundary=40))
STATE = bytes(range(256)) * 3


def blob() -> bytes:
    return encode_snapshot(BLOCKS[-1].key, FP, TOKENS, BLOCKS, STATE)


def test_round_trip_keeps_everything():
    snap = decode_snapshot(blob(), FP)
    assert snap.tokens == TOKENS and snap.blocks == BLOCKS
    assert bytes(snap.state) == STATE
    assert snap.meta.key == BLOCKS[-1].key and snap.meta.n_tokens == 40
    assert snap.meta.state_bytes == len(STATE)


def test_decodes_from_any_buffer_without_copying_the_state():
    raw = bytearray(blob())
    snap = decode_snapshot(memoryview(raw), FP)
    raw[-1] ^= 0xFF
    assert snap.state[-1] == raw[-1]  # a view, not a copy


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"XXXXXXXX" + b[8:], "magic"),
        (lambda b: b[:8] + b"\x02\x00" + b[10:], "version"),
        (lambda b: b[:-1], "header says"),
        (lambda b: b + b"\x00", "header says"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "checksum"),
        (lambda b: b[:40], "shorter than its header"),
        (lambda b: b[:10], "shorter than its header"),
    ],
)
def test_damaged_snapshots_are_refused(damage, message):
    with pytest.raises(SnapshotError, match=message):
        decode_snapshot(damage(blob()), FP)


def test_foreign_model_is_refused():
    with pytest.raises(SnapshotError, match="another model"):
        decode_snapshot(blob(), b"\x00" * 16)
