import json
import os
import time
from pathlib import Path

import pytest

from kv3d.engine import modelfile
from kv3d.engine.modelfile import (
    ModelFileError,
    model_fingerprint,
    model_id_for,
    resolve_model_path,
)


def gguf(tmp_path, name="m.gguf", body=b"weights"):
    path = tmp_path / name
    path.write_bytes(b"GGUF" + body)
    return path


def test_fingerprint_covers_file_cache_type_and_build(tmp_path):
    a = gguf(tmp_path, "a.gguf", b"one")
    b = gguf(tmp_path, "b.gguf", b"two")
    fp = lambda p, **kw: model_fingerprint(  # noqa: E731
        p, **{"kv_type": "f16", "flash_attn": True, "engine_version": "0.3.36", **kw}
    )
    assert fp(a) == fp(a) and len(fp(a)) == 16
    assert fp(a) != fp(b)
    assert fp(a) != fp(a, kv_type="q8_0")
    assert fp(a) != fp(a, flash_attn=False)  # V layout changes with flash attention
    assert fp(a) != fp(a, engine_version="0.3.37")


def test_resolve_rejects_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        resolve_model_path(str(bad))
    assert resolve_model_path(str(gguf(tmp_path))) == (tmp_path / "m.gguf").resolve()


def test_model_id_defaults_to_the_file_stem(tmp_path):
    assert model_id_for(tmp_path / "SmolLM2.Q4_1.gguf", "") == "SmolLM2.Q4_1"
    assert model_id_for(tmp_path / "x.gguf", "custom") == "custom"


@pytest.fixture
def digest_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "digests.json"
    monkeypatch.setenv("KV3D_DIGEST_CACHE", str(cache))
    monkeypatch.setattr(modelfile, "_digests", {})
    return cache


def fp(path):
    return model_fingerprint(path, kv_type="f16", flash_attn=True, engine_version="0.3.36")


def test_fingerprint_covers_the_middle_of_a_large_file(tmp_path, digest_cache):
    # Two files of 24 MiB that differ only in one byte in the middle (the middle tensors).
    size = 24 * 1024 * 1024
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for path, byte in ((a, b"\x01"), (b, b"\x02")):
        with path.open("wb") as f:
            f.write(b"GGUF")
            f.seek(size // 2)
            f.write(byte)
            f.truncate(size)
    assert fp(a) != fp(b)


def test_file_digest_is_computed_once_and_cached_by_identity(tmp_path, digest_cache, monkeypatch):
    a = gguf(tmp_path, "a.gguf", b"one")
    first = fp(a)
    assert digest_cache.is_file()  # kept between runs
    monkeypatch.setattr(modelfile, "_digests", {})  # a new process: the file cache answers
    reads = []
    real_open = Path.open
    monkeypatch.setattr(
        Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k)
    )
    assert fp(a) == first and a not in reads
    monkeypatch.setattr(Path, "open", real_open)
    # Same size, new content (a new mtime): hashed again, never the stale digest.
    time.sleep(0.01)
    a.write_bytes(b"GGUF" + b"two")
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1_000_000))
    assert fp(a) != first


def test_a_damaged_digest_cache_is_ignored(tmp_path, digest_cache):
    a = gguf(tmp_path, "a.gguf", b"one")
    expected = fp(a)
    for junk in ("not json", '{"version": 1, "files": []}', '{"version": 99}', "[1, 2]"):
        digest_cache.write_text(junk)
        modelfile._digests.clear()
        assert fp(a) == expected
    # A digest of the wrong shape for this very file is not believed either.
    identity = modelfile._file_identity(a)
    digest_cache.write_text(json.dumps({"version": 1, "files": {identity: "zz" * 32}}))
    modelfile._digests.clear()
    assert fp(a) == expected
