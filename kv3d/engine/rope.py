"""Rotary position embedding (RoPE) as llama.cpp applies it to the keys it caches.

The cache holds keys after RoPE: each pair of channels of a head is turned by an angle that
grows with the cell's position, fast for the first pairs and slowly for the last. Over the cells
of a session a channel's values therefore swing between plus and minus its pair's magnitude,
while before RoPE the same channel is nearly steady. A codec that quantises keys per channel
(`kv3d.engine.lowbit`) loses less before RoPE: it turns the keys back by their positions'
angles, codes them, and turns the decoded keys forward again.

llama.cpp's angle for pair i (0 <= i < n_rot / 2) of a cell at position p is
    theta = p * freq_scale * base ** (-2 i / n_rot)
and the pair is (2i, 2i + 1) in the "normal" layout or (i, i + n_rot / 2) in the "neox" one;
channels of a head past n_rot are not rotated. A codec never needs llama.cpp's exact angles:
it turns forward by the same angles it turned back by (both stored with the delta), so a model
whose RoPE differs in detail (YaRN's corrections) only loses some of the gain, never exactness.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from kv3d.engine import f16

NORMAL, NEOX = 1, 2
# llama.cpp's `llama_model_rope_type` values that KV3D knows how to undo.
_LLAMA_ROPE_TYPES = {0: NORMAL, 2: NEOX}
# Gemma 3's sliding-window layers use this base whatever the GGUF says for the global ones.
_SWA_BASES = {"gemma3": 10000.0}


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """The RoPE a model's cached keys carry. Invariant: `layout` NORMAL or NEOX, `n_rot` even
    and within `head_dim`, `freq_scale` and every base finite and > 0; one base per KV cache
    section of a sequence state (the base cache, then the sliding-window one, if any)."""

    layout: int
    head_dim: int
    n_rot: int
    freq_scale: float
    bases: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.layout not in (NORMAL, NEOX):
            raise ValueError(f"unknown RoPE layout {self.layout}")
        if not 0 < self.n_rot <= self.head_dim or self.n_rot % 2 or self.head_dim >= 1 << 16:
            raise ValueError(f"RoPE over {self.n_rot} of {self.head_dim} channels")
        values = (self.freq_scale, *self.bases)
        if not self.bases or len(self.bases) > 255 or not all(_positive(v) for v in values):
            raise ValueError("RoPE bases and scale must be finite and positive (1-255 bases)")

    def base_for(self, section: int) -> float:
        return self.bases[min(section, len(self.bases) - 1)]


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def spec_for(meta, rope_type: int, freq_scale: float, n_embd: int) -> RopeSpec | None:
    """The RoPE of a model from its GGUF metadata (`meta(key) -> str | None`), llama.cpp's rope
    type and training frequency scale; None where its keys carry no RoPE KV3D can undo."""
    layout = _LLAMA_ROPE_TYPES.get(rope_type)
    arch = meta("general.architecture") or ""
    try:
        n_head = int(meta(f"{arch}.attention.head_count") or 0)
        head_dim = int(meta(f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0))
        n_rot = int(meta(f"{arch}.rope.dimension_count") or head_dim)
        base = float(meta(f"{arch}.rope.freq_base") or 10000.0)
        swa_base = float(meta(f"{arch}.rope.freq_base_swa") or _SWA_BASES.get(arch, base))
        return RopeSpec(layout, head_dim, n_rot, float(freq_scale), (base, swa_base))
    except (TypeError, ValueError):  # no layout, or metadata that makes no RoPE
        return None


def turn(
    x: np.ndarray,
    positions: np.ndarray,
    spec: RopeSpec,
    base: float,
    *,
    back: bool,
    in_place: bool = False,
) -> np.ndarray:
    """(cells, channels) keys, channels whole heads of `spec.head_dim` -> f32 turned forward
    (as llama.cpp does) or back by each cell's angles. `in_place`: a contiguous f32 `x` is
    turned itself (and returned)."""
    cells, channels = x.shape
    half = spec.n_rot // 2
    turns = _turns(positions.astype(np.int64).tobytes(), spec, base, back)  # (cells, 1, half)
    if x.dtype == np.float16:
        flat = f16.as_f32(x)  # a new array either way
    else:
        flat = np.ascontiguousarray(x, dtype=np.float32) if in_place else np.array(x, np.float32)
    heads = flat.reshape(cells, channels // spec.head_dim, spec.head_dim)
    if spec.layout == NORMAL and spec.n_rot == spec.head_dim:
        pairs = heads.view(np.complex64)  # (2i, 2i + 1) as one complex number
        pairs *= turns
        return heads.reshape(cells, channels)
    cos, sin = turns.real, turns.imag
    if spec.layout == NEOX:
        a, b = heads[..., :half], heads[..., half : spec.n_rot]
    else:
        a, b = heads[..., 0 : spec.n_rot : 2], heads[..., 1 : spec.n_rot : 2]
    a_turned = a * cos - b * sin
    b *= cos
    b += a * sin
    a[...] = a_turned
    return heads.reshape(cells, channels)


@functools.lru_cache(maxsize=16)
def _turns(positions: bytes, spec: RopeSpec, base: float, back: bool) -> np.ndarray:
    """exp(+-i theta) per cell and pair, (cells, 1, n_rot / 2) complex64, read-only: the layers
    of a section share their cells' positions, so each session computes these once."""
    pos = np.frombuffer(positions, dtype=np.int64).astype(np.float64)
    half = spec.n_rot // 2
    inv_freq = spec.freq_scale * base ** (-2.0 * np.arange(half, dtype=np.float64) / spec.n_rot)
    theta = pos[:, None] * inv_freq[None, :]
    turns = np.exp((-1j if back else 1j) * theta).astype(np.complex64)[:, None, :]
    turns.setflags(write=False)
    return turns
