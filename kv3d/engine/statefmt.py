"""Parser and builder for llama.cpp's per-sequence state blob (`llama_state_seq_get_data`).

Layout (little-endian), as written by llama.cpp for llama-cpp-python 0.3.36:

    u32 magic (0xAF143CD8), i32 seq_id, then one cache section per KV cache of the model
    (one for most models; two for interleaved-SWA models such as Gemma 3: base, then SWA):

    section: u32 n_stream, then per stream: u32 cell_count and, when cell_count > 0,
      meta per cell: i32 pos, u32 n_seq_id, [i32 x, i32 y, i32 tok: caches with cell ext],
                     i32 seq_ids[n_seq_id]
      data: u32 v_trans, u32 n_layer,
            per layer K: i32 type, u64 row_bytes, row_bytes * cell_count bytes
            per layer V (absent for MLA caches), v_trans == 0: same layout as K;
              v_trans == 1: i32 type, u32 el_size, u32 n_embd_v_gqa,
                            n_embd_v_gqa rows of cell_count * el_size bytes

Nothing in the blob says whether cells carry ext or whether V is stored: the caller says so
(`cell_ext`, `has_v`) from the model. `build_seq_state(parse_seq_state(b)) == b` byte for byte.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

STATE_MAGIC = 0xAF143CD8

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<Ii")  # magic, seq_id
_ROW_HEAD = struct.Struct("<iQ")  # type, row_bytes
_TRANS_HEAD = struct.Struct("<iII")  # type, el_size, n_embd_v_gqa
_EXT_INTS = 3  # llama_kv_cell_ext: x, y, tok


class StateFormatError(ValueError):
    """The bytes are not a sequence state blob this module understands."""


@dataclass(frozen=True, slots=True)
class LayerTensor:
    """One layer's K or V bytes for the cells of a stream.

    Row layout (K, and V when not transposed) sets `row_bytes`: `data` is cell_count rows of
    `row_bytes`. Transposed V sets `el_size` and `n_embd_v_gqa`: `data` is n_embd_v_gqa rows
    of cell_count elements. `data` is a flat uint8 array, usually a view into the parsed blob.
    """

    type_id: int
    data: np.ndarray
    row_bytes: int | None = None
    el_size: int | None = None
    n_embd_v_gqa: int | None = None

    def __post_init__(self) -> None:
        # Flat and contiguous, so that the builder can hand it to bytes.join as it is.
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or not self.data.flags.c_contiguous:
            raise StateFormatError("layer data must be a flat, contiguous uint8 array")
        if (self.row_bytes is None) == (self.el_size is None or self.n_embd_v_gqa is None):
            raise StateFormatError("a layer has either row_bytes or el_size + n_embd_v_gqa")

    @property
    def transposed(self) -> bool:
        return self.row_bytes is None

    def nbytes_for(self, n_cells: int) -> int:
        if self.row_bytes is not None:
            return self.row_bytes * n_cells
        return self.el_size * self.n_embd_v_gqa * n_cells

    def rows(self, n_cells: int) -> np.ndarray:
        """2-D view: (cells, row_bytes), or (n_embd_v_gqa, cells * el_size) when transposed."""
        if self.row_bytes is not None:
            return self.data.reshape(n_cells, self.row_bytes)
        return self.data.reshape(self.n_embd_v_gqa, n_cells * self.el_size)

    def cell_rows(self, n_cells: int, start: int, count: int, data=None) -> np.ndarray:
        """`rows(n_cells)` of the cells [start, start + count) only, a view of `data` (another
        flat buffer laid out as this layer) or of the layer's own."""
        data = self.data if data is None else data
        if self.row_bytes is not None:
            return data.reshape(n_cells, self.row_bytes)[start : start + count]
        rows = data.reshape(self.n_embd_v_gqa, n_cells * self.el_size)
        return rows[:, start * self.el_size : (start + count) * self.el_size]


@dataclass(frozen=True, slots=True)
class StreamState:
    """The cells one KV stream holds for the sequence, and their K/V bytes per layer.

    Invariant: one seq-id tuple per position, ext (if any) is (cells, 3) int32, every layer's
    data holds exactly its size for `n_cells`; V layers match `v_trans` (or there are none:
    MLA). A stream with no cells has no layers and serialises as `cell_count = 0` alone.
    """

    cell_positions: np.ndarray
    cell_seq_ids: tuple[tuple[int, ...], ...]
    cell_ext: np.ndarray | None
    v_trans: bool
    k_layers: tuple[LayerTensor, ...]
    v_layers: tuple[LayerTensor, ...]

    def __post_init__(self) -> None:
        n = self.n_cells
        if self.cell_positions.dtype != np.int32 or self.cell_positions.ndim != 1:
            raise StateFormatError("cell positions must be a flat int32 array")
        if len(self.cell_seq_ids) != n:
            raise StateFormatError("need one seq-id tuple per cell")
        ext = self.cell_ext
        if ext is not None and (ext.dtype != np.int32 or ext.shape != (n, _EXT_INTS)):
            raise StateFormatError(f"cell ext must be int32 of shape ({n}, {_EXT_INTS})")
        if n == 0 and (self.k_layers or self.v_layers):
            raise StateFormatError("a stream without cells carries no layers")
        if self.v_layers and len(self.v_layers) != len(self.k_layers):
            raise StateFormatError("V layers must match K layers one to one (or be absent)")
        for layer in self.k_layers + self.v_layers:
            if layer.data.nbytes != layer.nbytes_for(n):
                raise StateFormatError(f"layer data is {layer.data.nbytes} bytes, not {n} cells")
        if any(layer.transposed for layer in self.k_layers):
            raise StateFormatError("K layers are never transposed")
        if any(layer.transposed != self.v_trans for layer in self.v_layers):
            raise StateFormatError("V layer layout disagrees with v_trans")

    @property
    def n_cells(self) -> int:
        return len(self.cell_positions)


@dataclass(frozen=True, slots=True)
class CacheSection:
    """What one KV cache (base or SWA) wrote: one entry per stream, in stream order."""

    streams: tuple[StreamState, ...]

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.streams)


@dataclass(frozen=True, slots=True)
class SeqState:
    """A whole sequence state blob. `seq_id` is the exporter's; llama.cpp ignores it on read."""

    seq_id: int
    sections: tuple[CacheSection, ...]

    @property
    def n_cells(self) -> int:
        """Cells of the first (base) cache: for SWA models the second section may hold fewer."""
        return self.sections[0].n_cells if self.sections else 0

    @property
    def nbytes(self) -> int:
        """Length of the blob `build_seq_state` would produce, without copying tensor data."""
        return sum(memoryview(chunk).nbytes for chunk in _state_chunks(self))


def with_seq_id(state: SeqState, seq_id: int) -> SeqState:
    """The same state stamped with another exporter seq_id (cell seq ids are left alone)."""
    return dataclasses.replace(state, seq_id=seq_id)


def with_cell_seq_ids(state: SeqState, seq_ids: tuple[int, ...]) -> SeqState:
    """The same state with every cell's seq ids set to `seq_ids` (cell data shared)."""
    return dataclasses.replace(
        state,
        sections=tuple(
            CacheSection(
                tuple(
                    dataclasses.replace(s, cell_seq_ids=(seq_ids,) * s.n_cells)
                    for s in section.streams
                )
            )
            for section in state.sections
        ),
    )


def cells_from(state: SeqState, pos_from: int, pos_to: int | None = None) -> SeqState:
    """Only the cells at positions in [pos_from, pos_to), in every section (copies the bytes).

    A session's private delta: restored into a sequence, it composes with the prefix cells
    [0, pos_from) shared back in from a hot prefix."""
    return dataclasses.replace(
        state,
        sections=tuple(
            CacheSection(tuple(_stream_from(s, pos_from, pos_to) for s in section.streams))
            for section in state.sections
        ),
    )


def shifted(state: SeqState, by_positions: int) -> SeqState:
    """The same cells at positions moved by `by_positions` (the bytes shared, not copied)."""
    return dataclasses.replace(
        state,
        sections=tuple(
            CacheSection(
                tuple(
                    dataclasses.replace(s, cell_positions=s.cell_positions + np.int32(by_positions))
                    for s in section.streams
                )
            )
            for section in state.sections
        ),
    )


def _stream_from(stream: StreamState, pos_from: int, pos_to: int | None = None) -> StreamState:
    pos = stream.cell_positions
    keep = np.flatnonzero((pos >= pos_from) & (pos < (pos_to if pos_to is not None else 2**31)))
    if len(keep) == stream.n_cells:
        return stream
    n = stream.n_cells

    def select(layer: LayerTensor) -> LayerTensor:
        rows = layer.rows(n)
        if layer.transposed:
            per_cell = rows.reshape(layer.n_embd_v_gqa, n, layer.el_size)[:, keep, :]
        else:
            per_cell = rows[keep]
        return dataclasses.replace(layer, data=np.ascontiguousarray(per_cell).reshape(-1))

    if len(keep) == 0:
        return StreamState(np.empty(0, np.int32), (), None, stream.v_trans, (), ())
    ext = None if stream.cell_ext is None else np.ascontiguousarray(stream.cell_ext[keep])
    return StreamState(
        cell_positions=np.ascontiguousarray(stream.cell_positions[keep]),
        cell_seq_ids=tuple(stream.cell_seq_ids[i] for i in keep),
        cell_ext=ext,
        v_trans=stream.v_trans,
        k_layers=tuple(select(layer) for layer in stream.k_layers),
        v_layers=tuple(select(layer) for layer in stream.v_layers),
    )


def join_cells(states: list[SeqState], *, copy_data: bool = True) -> SeqState:
    """The cells of `states` (cuts of one sequence at disjoint positions, in position order)
    as one state, stream by stream: the inverse of cutting a state with `cells_from`.

    The parts must come from the same model and cache layout (same sections, streams and layer
    types); anything else raises `StateFormatError`. `copy_data` False leaves the joined
    layers' data uninitialised: the layout of a joined blob (`layout_blob`) whose tensors the
    caller writes in place (`blockstore.decode_parts` decodes each part straight into it)."""
    if not states:
        raise StateFormatError("nothing to join")
    first = states[0]
    if any(len(s.sections) != len(first.sections) for s in states):
        raise StateFormatError("parts disagree on the number of cache sections")
    sections = []
    for i, section in enumerate(first.sections):
        streams = []
        for j in range(len(section.streams)):
            parts = [s.sections[i].streams[j] for s in states if j < len(s.sections[i].streams)]
            if len(parts) != len(states):
                raise StateFormatError("parts disagree on the number of streams")
            streams.append(_join_streams(parts, copy_data))
        sections.append(CacheSection(tuple(streams)))
    return dataclasses.replace(first, sections=tuple(sections))


def _join_streams(parts: list[StreamState], copy_data: bool = True) -> StreamState:
    parts = [p for p in parts if p.n_cells]
    if len(parts) <= 1:
        return parts[0] if parts else StreamState(np.empty(0, np.int32), (), None, False, (), ())
    head = parts[0]
    if any(
        p.v_trans != head.v_trans
        or (p.cell_ext is None) != (head.cell_ext is None)
        or len(p.k_layers) != len(head.k_layers)
        or len(p.v_layers) != len(head.v_layers)
        for p in parts
    ):
        raise StateFormatError("parts disagree on the stream's layout")
    counts = [p.n_cells for p in parts]

    def join(layers: list[LayerTensor]) -> LayerTensor:
        one = layers[0]
        if any(
            (x.type_id, x.row_bytes, x.el_size, x.n_embd_v_gqa)
            != (one.type_id, one.row_bytes, one.el_size, one.n_embd_v_gqa)
            for x in layers
        ):
            raise StateFormatError("parts disagree on a layer's type or width")
        if not copy_data:
            total = sum(x.data.nbytes for x in layers)
            return dataclasses.replace(one, data=np.empty(total, np.uint8))
        if not one.transposed:
            return dataclasses.replace(one, data=np.concatenate([x.data for x in layers]))
        rows = [x.rows(n) for x, n in zip(layers, counts, strict=True)]  # (channels, cells x el)
        return dataclasses.replace(one, data=np.concatenate(rows, axis=1).reshape(-1))

    ext = None if head.cell_ext is None else np.concatenate([p.cell_ext for p in parts])
    return StreamState(
        cell_positions=np.concatenate([p.cell_positions for p in parts]),
        cell_seq_ids=tuple(ids for p in parts for ids in p.cell_seq_ids),
        cell_ext=ext,
        v_trans=head.v_trans,
        k_layers=tuple(join([p.k_layers[k] for p in parts]) for k in range(len(head.k_layers))),
        v_layers=tuple(join([p.v_layers[k] for p in parts]) for k in range(len(head.v_layers))),
    )


# --- parsing -----------------------------------------------------------------------------------
def byte_view(data, error: type[Exception], what: str) -> memoryview:
    """Stored or received bytes (any contiguous bytes-like object) as a flat byte view; anything
    else raises `error`, the reading format's own error type, so that decoders raise only it."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise error(f"{what} must be a contiguous byte buffer: {exc}") from None


class _Reader:
    """A cursor over the blob that checks every length against what remains before reading."""

    def __init__(self, blob: bytes | bytearray | memoryview):
        self.buf = byte_view(blob, StateFormatError, "a state blob")
        self.offset = 0

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.offset

    def need(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.remaining:
            raise StateFormatError(
                f"truncated at byte {self.offset}: {what} needs {n_bytes} bytes, "
                f"{self.remaining} remain"
            )

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.buf, self.offset)
        self.offset += fmt.size
        return values

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        """A view (no copy) of `count` items at the cursor."""
        size = np.dtype(dtype).itemsize * count
        self.need(size, what)
        view = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.offset)
        self.offset += size
        return view


def parse_seq_state(
    blob: bytes | bytearray | memoryview,
    *,
    cell_ext: bool = False,
    has_v: bool = True,
    n_sections: int | None = None,
) -> SeqState:
    """Parse a sequence state blob; tensor data are views into `blob` (keep it alive, unchanged).

    `cell_ext`: the cache stores per-cell ext (M-RoPE or PLE models). `has_v`: False for MLA
    caches, which store no V. `n_sections`: expect exactly this many cache sections, so that
    bytes after them are reported as trailing; by default sections are read until the end.
    """
    r = _Reader(blob)
    magic, seq_id = r.unpack(_HEAD, "header")
    if magic != STATE_MAGIC:
        raise StateFormatError(f"bad magic 0x{magic:08X} at byte 0, expected 0x{STATE_MAGIC:08X}")
    sections: list[CacheSection] = []
    while r.remaining and (n_sections is None or len(sections) < n_sections):
        start = r.offset
        try:
            sections.append(_parse_section(r, cell_ext, has_v))
        except StateFormatError as err:
            raise StateFormatError(f"cache section {len(sections)} (byte {start}): {err}") from None
    if r.remaining:
        raise StateFormatError(f"{r.remaining} trailing bytes at byte {r.offset}")
    if not sections or (n_sections is not None and len(sections) != n_sections):
        raise StateFormatError(f"blob ends at byte {r.offset} after {len(sections)} sections")
    return SeqState(seq_id=seq_id, sections=tuple(sections))


def _parse_section(r: _Reader, cell_ext: bool, has_v: bool) -> CacheSection:
    start = r.offset
    n_stream = r.u32("n_stream")
    # A cache has at least one stream and each costs a 4-byte cell_count.
    if n_stream == 0 or n_stream * _U32.size > r.remaining:
        raise StateFormatError(f"impossible n_stream {n_stream} at byte {start}")
    return CacheSection(tuple(_parse_stream(r, cell_ext, has_v) for _ in range(n_stream)))


def _parse_stream(r: _Reader, cell_ext: bool, has_v: bool) -> StreamState:
    at = r.offset
    n_cells = r.u32("cell_count")
    if n_cells == 0:
        empty = np.zeros(0, np.int32)
        ext = np.zeros((0, _EXT_INTS), np.int32) if cell_ext else None
        return StreamState(empty, (), ext, False, (), ())
    # Each cell costs at least pos + n_seq_id (+ ext): reject counts the blob cannot hold
    # before allocating anything for them.
    if n_cells * 4 * (2 + (_EXT_INTS if cell_ext else 0)) > r.remaining:
        raise StateFormatError(f"impossible cell_count {n_cells} at byte {at}")
    positions, seq_ids, ext = _parse_meta(r, n_cells, cell_ext)
    v_trans, k_layers, v_layers = _parse_data(r, n_cells, has_v)
    return StreamState(positions, seq_ids, ext, v_trans, k_layers, v_layers)


def _parse_meta(r: _Reader, n_cells: int, cell_ext: bool):
    head = 2 + (_EXT_INTS if cell_ext else 0)  # int32s before the seq ids
    stride = head + 1
    # Fast path: a single-sequence export gives every cell exactly one seq id, so the meta is a
    # fixed-stride int32 table that numpy reads in one go.
    if n_cells * stride * 4 <= r.remaining:
        table = np.frombuffer(r.buf, "<i4", n_cells * stride, r.offset).reshape(n_cells, stride)
        if (table[:, 1] == 1).all():
            r.offset += table.nbytes
            ext = table[:, 2:head].astype(np.int32) if cell_ext else None
            ids = tuple((int(s),) for s in table[:, head])
            return table[:, 0].astype(np.int32), ids, ext
    positions = np.empty(n_cells, np.int32)
    exts = np.empty((n_cells, _EXT_INTS), np.int32) if cell_ext else None
    seq_ids = []
    for i in range(n_cells):
        positions[i] = r.array("<i4", 1, f"cell {i} pos")[0]
        n_ids = r.u32(f"cell {i} n_seq_id")
        if exts is not None:
            exts[i] = r.array("<i4", _EXT_INTS, f"cell {i} ext")
        seq_ids.append(tuple(int(s) for s in r.array("<i4", n_ids, f"cell {i} seq ids")))
    return positions, tuple(seq_ids), exts


def _parse_data(r: _Reader, n_cells: int, has_v: bool):
    at = r.offset
    v_trans = r.u32("v_trans")
    if v_trans > 1:
        raise StateFormatError(f"v_trans is {v_trans} at byte {at}, expected 0 or 1")
    at = r.offset
    n_layer = r.u32("n_layer")
    # Every layer costs at least a 12-byte K header (and a 12-byte V header).
    if n_layer * _ROW_HEAD.size * (2 if has_v else 1) > r.remaining:
        raise StateFormatError(f"impossible n_layer {n_layer} at byte {at}")
    k_layers = tuple(_parse_rows(r, n_cells, f"K layer {il}") for il in range(n_layer))
    v_layers: tuple[LayerTensor, ...] = ()
    if has_v:
        parse_v = _parse_transposed if v_trans else _parse_rows
        v_layers = tuple(parse_v(r, n_cells, f"V layer {il}") for il in range(n_layer))
    return bool(v_trans), k_layers, v_layers


def _parse_rows(r: _Reader, n_cells: int, what: str) -> LayerTensor:
    type_id, row_bytes = r.unpack(_ROW_HEAD, f"{what} header")
    data = r.array("u1", row_bytes * n_cells, f"{what} ({n_cells} rows of {row_bytes} bytes)")
    return LayerTensor(type_id, data, row_bytes=row_bytes)


def _parse_transposed(r: _Reader, n_cells: int, what: str) -> LayerTensor:
    type_id, el_size, n_embd = r.unpack(_TRANS_HEAD, f"{what} header")
    size = el_size * n_embd * n_cells
    data = r.array("u1", size, f"{what} ({n_embd} x {n_cells} elements of {el_size} bytes)")
    return LayerTensor(type_id, data, el_size=el_size, n_embd_v_gqa=n_embd)


# --- building ----------------------------------------------------------------------------------
def build_seq_state(state: SeqState, *, seq_id: int | None = None) -> bytes:
    """Serialise `state` (stamped with `seq_id` when given); the inverse of `parse_seq_state`."""
    if seq_id is not None:
        state = with_seq_id(state, seq_id)
    try:
        return b"".join(_state_chunks(state))
    except (struct.error, OverflowError) as err:  # a value that does not fit its field
        raise StateFormatError(f"cannot encode state: {err}") from err


def layout_blob(state: SeqState) -> tuple[bytearray, dict[int, np.ndarray]]:
    """The blob `build_seq_state(state)` would give, with every layer's data left zero, and
    for each layer (by `id` of its `data`) a flat view of where its data lie in that blob."""
    chunks = list(_state_chunks(state))
    blob = bytearray(sum(memoryview(c).nbytes for c in chunks))
    raw = np.frombuffer(blob, np.uint8)
    places, at = {}, 0
    for chunk in chunks:
        view = memoryview(chunk)
        if isinstance(chunk, memoryview):  # a layer's data: left for the caller
            places[id(chunk.obj)] = raw[at : at + view.nbytes]
        else:
            raw[at : at + view.nbytes] = np.frombuffer(chunk, np.uint8)
        at += view.nbytes
    return blob, places


def _state_chunks(state: SeqState) -> Iterator[bytes | memoryview]:
    """The blob as a sequence of pieces; tensor data are yielded as memoryviews of the layers'
    arrays, not copied, and nothing else is a memoryview (`layout_blob` relies on both)."""
    yield _HEAD.pack(STATE_MAGIC, state.seq_id)
    for section in state.sections:
        yield _U32.pack(len(section.streams))
        for stream in section.streams:
            yield from _stream_chunks(stream)


def _stream_chunks(s: StreamState) -> Iterator[bytes | memoryview]:
    yield _U32.pack(s.n_cells)
    if s.n_cells == 0:
        return
    yield _meta_bytes(s)
    yield struct.pack("<II", int(s.v_trans), len(s.k_layers))
    for layer in s.k_layers + s.v_layers:
        if layer.transposed:
            yield _TRANS_HEAD.pack(layer.type_id, layer.el_size, layer.n_embd_v_gqa)
        else:
            yield _ROW_HEAD.pack(layer.type_id, layer.row_bytes)
        yield memoryview(layer.data)


def _meta_bytes(s: StreamState) -> bytes:
    if all(len(ids) == 1 for ids in s.cell_seq_ids):  # the common case, as one int32 table
        columns = [s.cell_positions, np.ones(s.n_cells, np.int32)]
        if s.cell_ext is not None:
            columns += list(s.cell_ext.T)
        columns.append(np.fromiter((ids[0] for ids in s.cell_seq_ids), np.int32, s.n_cells))
        return np.column_stack(columns).astype("<i4", copy=False).tobytes()
    parts = []
    for i, ids in enumerate(s.cell_seq_ids):
        parts.append(struct.pack("<iI", s.cell_positions[i], len(ids)))
        if s.cell_ext is not None:
            parts.append(s.cell_ext[i].astype("<i4").tobytes())
        parts.append(struct.pack(f"<{len(ids)}i", *ids))
    return b"".join(parts)
