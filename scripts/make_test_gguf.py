#!/usr/bin/env python3
"""Writes a random-weight llama-architecture GGUF with a real tokenizer, for machines the
bundled 98 MB SmolLM2 cannot travel to (the GPU machine, scripts/device_check.sh).

Two steps, so that only the tokenizer (about 0.4 MB packed) has to travel:

    make_test_gguf.py dump-tokenizer --from SmolLM2.gguf --out tok.json.gz
    make_test_gguf.py write --tokenizer tok.json.gz --shape smollm2 --out model.gguf

`--tokenizer` also takes a GGUF directly. The tokenizer is copied key for key (every
`tokenizer.*` value: vocabulary, merges, token types, special ids, flags, chat template), so the
model tokenizes and renders chats exactly as the source model does. The weights are random
(normal, std 0.02, fixed seed; norms 1): the text is nonsense, the arithmetic is the real one.

Shapes: `smollm2` is SmolLM2-135M's (30 layers, 576 wide, 9 query / 3 KV heads, FFN 1536, tied
embeddings) with its quantization mix (token embedding Q8_0, matrices Q4_1, norms F32), so a
speed measured on it stands for the real model's; `tiny` (4 layers, 64 wide) is for tests.

Needs only NumPy: GGUF (version 3) is read and written here, with the Q8_0 and Q4_1 block
layouts of ggml (ggml-common.h).
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
QUANT_VERSION = 2

# GGUF metadata value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
TYPE_NAMES = {
    U8: "UINT8",
    I8: "INT8",
    U16: "UINT16",
    I16: "INT16",
    U32: "UINT32",
    I32: "INT32",
    F32: "FLOAT32",
    BOOL: "BOOL",
    STRING: "STRING",
    ARRAY: "ARRAY",
    U64: "UINT64",
    I64: "INT64",
    F64: "FLOAT64",
}
TYPE_IDS = {v: k for k, v in TYPE_NAMES.items()}
SCALAR = {
    U8: "<B",
    I8: "<b",
    U16: "<H",
    I16: "<h",
    U32: "<I",
    I32: "<i",
    F32: "<f",
    BOOL: "<?",
    U64: "<Q",
    I64: "<q",
    F64: "<d",
}

# ggml tensor types and llama.cpp file types used here
GGML_F32, GGML_F16, GGML_Q4_1, GGML_Q8_0 = 0, 1, 3, 8
TENSOR_TYPES = {"F32": GGML_F32, "F16": GGML_F16, "Q4_1": GGML_Q4_1, "Q8_0": GGML_Q8_0}
FILE_TYPE = {GGML_F32: 0, GGML_F16: 1, GGML_Q4_1: 3, GGML_Q8_0: 7}
QK = 32  # values per Q4_1 / Q8_0 block


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int = 8192
    rope_base: float = 100000.0
    rms_eps: float = 1e-5


SHAPES = {
    "smollm2": Shape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536),
    "tiny": Shape(n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=128),
}
# name -> (token embedding type, matrix type); norms are always F32.
WEIGHTS = {
    "smollm2": ("Q8_0", "Q4_1"),
    "q8_0": ("Q8_0", "Q8_0"),
    "f16": ("F16", "F16"),
    "f32": ("F32", "F32"),
}


# --- reading metadata ----------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            sub, n = self.take("<I"), self.take("<Q")
            if sub in SCALAR and sub != BOOL:
                arr = np.frombuffer(
                    self.data, dtype=np.dtype(SCALAR[sub]), count=n, offset=self.pos
                )
                self.pos += arr.nbytes
                return sub, arr.tolist()
            return sub, [self.value(sub) for _ in range(n)]
        return self.take(SCALAR[vtype])


def read_metadata(path: Path) -> list[dict]:
    """Every metadata key of a GGUF file as [{key, type, sub_type, value}] (JSON-ready)."""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    r = _Reader(data)
    if bytes(data[:4]) != GGUF_MAGIC:
        raise SystemExit(f"{path} is not a GGUF file")
    r.pos = 4
    version, _n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    if version not in (2, 3):
        raise SystemExit(f"{path}: GGUF version {version} is not supported")
    entries = []
    for _ in range(n_kv):
        key = r.string()
        vtype = r.take("<I")
        value = r.value(vtype)
        sub = None
        if vtype == ARRAY:
            sub, value = value
        entries.append(
            {
                "key": key,
                "type": TYPE_NAMES[vtype],
                "sub_type": TYPE_NAMES[sub] if sub is not None else None,
                "value": value,
            }
        )
    return entries


def read_tokenizer(path: Path) -> list[dict]:
    entries = [e for e in read_metadata(path) if e["key"].startswith("tokenizer.")]
    if not any(e["key"] == "tokenizer.ggml.tokens" for e in entries):
        raise SystemExit(f"{path} holds no tokenizer.ggml.tokens")
    return entries


def load_tokenizer(source: Path) -> list[dict]:
    if source.suffix == ".gguf":
        return read_tokenizer(source)
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as f:
        return json.load(f)["entries"]


# --- writing -------------------------------------------------------------------------------------
def _pack_string(s: str | bytes) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: int, value, sub: int | None = None) -> bytes:
    if vtype == STRING:
        return _pack_string(value)
    if vtype == ARRAY:
        assert sub is not None
        head = struct.pack("<IQ", sub, len(value))
        if sub == STRING:
            return head + b"".join(_pack_string(v) for v in value)
        if sub == ARRAY:
            raise ValueError("nested arrays are not supported")
        return head + np.asarray(value, dtype=np.dtype(SCALAR[sub])).tobytes()
    return struct.pack(SCALAR[vtype], value)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml block_q8_0 rows: per 32 values an f16 scale d = max|x| / 127, then 32 int8."""
    rows, cols = x.shape
    b = x.reshape(rows, cols // QK, QK)
    d = np.abs(b).max(axis=-1, keepdims=True) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    v = b * inv
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)  # roundf
    out = np.empty((rows, cols // QK, 2 + QK), dtype=np.uint8)
    out[..., :2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(rows, -1)


def quantize_q4_1(x: np.ndarray) -> np.ndarray:
    """ggml block_q4_1 rows: per 32 values f16 d = (max - min) / 15, f16 m = min, then 16 bytes:
    byte j holds value j in its low nibble and value j + 16 in its high nibble."""
    rows, cols = x.shape
    b = x.reshape(rows, cols // QK, QK)
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / 15.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.floor((b - lo) * inv + 0.5), 0, 15).astype(np.uint8)
    out = np.empty((rows, cols // QK, 4 + QK // 2), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16).view(np.uint8)
    out[..., 2:4] = lo.astype(np.float16).view(np.uint8)
    out[..., 4:] = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return out.reshape(rows, -1)


def encode(x: np.ndarray, ggml_type: int) -> bytes:
    if ggml_type == GGML_F32:
        return x.astype(np.float32).tobytes()
    if ggml_type == GGML_F16:
        return x.astype(np.float16).tobytes()
    if ggml_type == GGML_Q8_0:
        return quantize_q8_0(x).tobytes()
    if ggml_type == GGML_Q4_1:
        return quantize_q4_1(x).tobytes()
    raise ValueError(ggml_type)


class GGUFFile:
    """Collects metadata and tensors, then writes one GGUF v3 file."""

    def __init__(self):
        self.kv: list[tuple[str, int, object, int | None]] = []
        self.tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []

    def add(self, key: str, vtype: int, value, sub: int | None = None) -> None:
        self.kv.append((key, vtype, value, sub))

    def add_tensor(self, name: str, x: np.ndarray, ggml_type: int) -> None:
        # GGUF lists dimensions innermost first: a numpy (rows, cols) matrix is [cols, rows].
        self.tensors.append((name, tuple(reversed(x.shape)), ggml_type, encode(x, ggml_type)))

    def write(self, path: Path) -> None:
        head = bytearray(GGUF_MAGIC)
        head += struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.kv))
        for key, vtype, value, sub in self.kv:
            head += _pack_string(key) + struct.pack("<I", vtype) + _pack_value(vtype, value, sub)
        offset = 0
        for name, dims, ggml_type, data in self.tensors:
            head += _pack_string(name) + struct.pack("<I", len(dims))
            head += struct.pack(f"<{len(dims)}Q", *dims)
            head += struct.pack("<IQ", ggml_type, offset)
            offset += -(-len(data) // ALIGNMENT) * ALIGNMENT
        head += bytes(-len(head) % ALIGNMENT)
        with open(path, "wb") as f:
            f.write(head)
            for _name, _dims, _type, data in self.tensors:
                f.write(data)
                f.write(bytes(-len(data) % ALIGNMENT))


def build(entries: list[dict], shape: Shape, weights: str, seed: int, out: Path) -> dict:
    t0 = time.perf_counter()
    embd_type, mat_type = (TENSOR_TYPES[name] for name in WEIGHTS[weights])
    n_vocab = len(next(e["value"] for e in entries if e["key"] == "tokenizer.ggml.tokens"))
    head_dim = shape.n_embd // shape.n_head
    rng = np.random.default_rng(seed)

    g = GGUFFile()
    g.add("general.architecture", STRING, "llama")
    g.add("general.type", STRING, "model")
    g.add("general.name", STRING, f"kv3d-test-{weights}-{shape.n_layer}x{shape.n_embd}")
    g.add("general.file_type", U32, FILE_TYPE[mat_type])
    g.add("general.quantization_version", U32, QUANT_VERSION)
    g.add("llama.vocab_size", U32, n_vocab)
    g.add("llama.context_length", U32, shape.n_ctx_train)
    g.add("llama.embedding_length", U32, shape.n_embd)
    g.add("llama.block_count", U32, shape.n_layer)
    g.add("llama.feed_forward_length", U32, shape.n_ff)
    g.add("llama.attention.head_count", U32, shape.n_head)
    g.add("llama.attention.head_count_kv", U32, shape.n_head_kv)
    g.add("llama.rope.freq_base", F32, shape.rope_base)
    g.add("llama.rope.dimension_count", U32, head_dim)
    g.add("llama.attention.layer_norm_rms_epsilon", F32, shape.rms_eps)
    for e in entries:
        sub = TYPE_IDS[e["sub_type"]] if e["sub_type"] else None
        g.add(e["key"], TYPE_IDS[e["type"]], e["value"], sub)

    def matrix(name: str, rows: int, cols: int, ggml_type: int) -> None:
        data = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        g.add_tensor(name, data, ggml_type)

    def norm(name: str) -> None:
        g.add_tensor(name, np.ones(shape.n_embd, dtype=np.float32), GGML_F32)

    matrix("token_embd.weight", n_vocab, shape.n_embd, embd_type)  # tied: also the output
    norm("output_norm.weight")
    kv_width = shape.n_head_kv * head_dim
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", shape.n_embd, shape.n_embd, mat_type)
        matrix(p + "attn_k.weight", kv_width, shape.n_embd, mat_type)
        matrix(p + "attn_v.weight", kv_width, shape.n_embd, mat_type)
        matrix(p + "attn_output.weight", shape.n_embd, shape.n_embd, mat_type)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", shape.n_ff, shape.n_embd, mat_type)
        matrix(p + "ffn_up.weight", shape.n_ff, shape.n_embd, mat_type)
        matrix(p + "ffn_down.weight", shape.n_embd, shape.n_ff, mat_type)

    out.parent.mkdir(parents=True, exist_ok=True)
    g.write(out)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "n_vocab": n_vocab,
        "shape": asdict(shape),
        "weights": weights,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# --- the command line ----------------------------------------------------------------------------
def dump_tokenizer(args) -> int:
    entries = read_tokenizer(Path(args.source))
    doc = {"source": Path(args.source).name, "entries": entries}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wt", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"))
    n_vocab = len(next(e["value"] for e in entries if e["key"] == "tokenizer.ggml.tokens"))
    print(f"{out}: {len(entries)} tokenizer keys, {n_vocab} tokens, {out.stat().st_size} bytes")
    return 0


def write_model(args) -> int:
    entries = load_tokenizer(Path(args.tokenizer))
    info = build(entries, SHAPES[args.shape], args.weights, args.seed, Path(args.out))
    print(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump-tokenizer", help="copy a GGUF's tokenizer.* keys to JSON (.gz)")
    d.add_argument("--from", dest="source", required=True, help="GGUF to read")
    d.add_argument("--out", required=True, help="JSON file (.json or .json.gz)")
    d.set_defaults(run=dump_tokenizer)
    m = sub.add_parser("write", help="write a random-weight llama GGUF")
    m.add_argument("--tokenizer", required=True, help="a GGUF, or dump-tokenizer's JSON (.gz)")
    m.add_argument("--out", required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    m.add_argument("--weights", choices=sorted(WEIGHTS), default="smollm2")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(run=write_model)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
