import pytest

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
