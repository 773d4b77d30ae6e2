"""The GPU machine's scripts that can be checked here: the test-model generator's GGUF and
quantizers (scripts/make_test_gguf.py), the cuBLAS finder (scripts/device_cuda_paths.py), and
that the shell scripts parse."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


gen = load_script("make_test_gguf")


def dequantize(raw: np.ndarray, rows: int, cols: int, kind: str) -> np.ndarray:
    """ggml's block layouts read back (the reverse of the generator's quantizers)."""
    nb = cols // 32
    if kind == "q8_0":
        blocks = raw.reshape(rows, nb, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(rows, cols)
    blocks = raw.reshape(rows, nb, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


@pytest.mark.parametrize("kind, step", [("q8_0", 1 / 127), ("q4_1", 1 / 15)])
def test_quantizers_follow_ggml_block_layouts(kind, step):
    x = np.random.default_rng(1).standard_normal((8, 96), dtype=np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    quantize = gen.quantize_q8_0 if kind == "q8_0" else gen.quantize_q4_1
    raw = quantize(x)
    assert raw.shape == (8, 3 * (34 if kind == "q8_0" else 20))
    back = dequantize(raw, 8, 96, kind)
    blocks = x.reshape(8, 3, 32)
    span = np.abs(blocks).max(-1) * 2 if kind == "q8_0" else np.ptp(blocks, axis=-1)
    err = np.abs(back - x).reshape(8, 3, 32).max(-1)
    assert np.all(err <= span * step * 0.51 + 1e-3)
    assert np.all(back[0, :32] == 0.0)


def test_gguf_metadata_round_trips(tmp_path):
    g = gen.GGUFFile()
    g.add("general.architecture", gen.STRING, "llama")
    g.add("tokenizer.ggml.tokens", gen.ARRAY, ["a", "b", "ü", "<|im_end|>"], gen.STRING)
    g.add("tokenizer.ggml.token_type", gen.ARRAY, [1, 1, 1, 3], gen.I32)
    g.add("tokenizer.ggml.eos_token_id", gen.U32, 3)
    g.add("tokenizer.ggml.add_bos_token", gen.BOOL, False)
    g.add("llama.rope.freq_base", gen.F32, 100000.0)
    g.add_tensor("t.weight", np.ones((2, 32), dtype=np.float32), gen.GGML_F32)
    path = tmp_path / "m.gguf"
    g.write(path)
    meta = {e["key"]: e for e in gen.read_metadata(path)}
    assert meta["tokenizer.ggml.tokens"]["value"] == ["a", "b", "ü", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"] == {
        "key": "tokenizer.ggml.token_type",
        "type": "ARRAY",
        "sub_type": "INT32",
        "value": [1, 1, 1, 3],
    }
    assert meta["tokenizer.ggml.eos_token_id"]["value"] == 3
    assert meta["tokenizer.ggml.add_bos_token"]["value"] is False
    assert meta["llama.rope.freq_base"]["value"] == 100000.0
    assert path.stat().st_size % 32 == 0


@pytest.mark.integration
def test_tiny_model_loads_and_tokenizes_like_the_bundled_model(tmp_path):
    """The generated model borrows SmolLM2's tokenizer through the JSON dump: llama.cpp loads
    it, and a chat prompt becomes the same tokens as with SmolLM2 itself."""
    from kv3d.engine.llama import LlamaModel
    from kv3d.engine.modelfile import bundled_model_path
    from kv3d.server.chat import ChatMessage, Tokenizer

    source = bundled_model_path()
    tok_json = tmp_path / "tok.json.gz"
    assert gen.main(["dump-tokenizer", "--from", str(source), "--out", str(tok_json)]) == 0
    model = tmp_path / "tiny.gguf"
    assert (
        gen.main(["write", "--tokenizer", str(tok_json), "--shape", "tiny", "--out", str(model)])
        == 0
    )
    msgs = [ChatMessage("system", "You are terse. Ünïcödé, 日本語 🙂"), ChatMessage("user", "2+2?")]
    ours, theirs = Tokenizer.load(model), Tokenizer.load(source)
    try:
        assert ours.n_vocab == theirs.n_vocab == 49152
        assert ours.encode_chat(msgs) == theirs.encode_chat(msgs)
    finally:
        ours.close()
        theirs.close()
    weights = LlamaModel(model)  # the weights load too (4 layers, tied embeddings)
    original = LlamaModel(source, vocab_only=True)
    try:
        assert weights.n_vocab == 49152
        assert weights.chat_template() == original.chat_template()
        assert weights.meta("llama.block_count") == "4"
    finally:
        weights.close()
        original.close()


def test_cuda_paths_fall_back_to_the_cublas_wheel(tmp_path):
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "lib").mkdir()
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    site = tmp_path / "site"
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    (site / "nvidia" / "cu13" / "lib").mkdir()
    (site / "nvidia" / "cu13" / "include" / "cublas_v2.h").write_text("")
    for lib in ("libcublas.so.13", "libcublasLt.so.13"):
        (site / "nvidia" / "cu13" / "lib" / lib).write_text("")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "CUDA_HOME": str(toolkit)}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "device_cuda_paths.py"), str(nvcc)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    lib_dir = site / "nvidia" / "cu13" / "lib"
    assert f"-DCUDA_cublas_LIBRARY={lib_dir / 'libcublas.so.13'}" in out
    assert f"-DCUDA_cublasLt_LIBRARY={lib_dir / 'libcublasLt.so.13'}" in out
    assert f"-DCMAKE_CUDA_FLAGS=-I{site / 'nvidia' / 'cu13' / 'include'}" in out
    assert f"CUDA_LD_PATH={lib_dir}" in out


def test_cuda_paths_leave_a_complete_toolkit_alone(tmp_path):
    toolkit = tmp_path / "cuda"
    for d in ("bin", "include", "lib64/stubs"):
        (toolkit / d).mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cublas_v2.h").write_text("")
    for lib in ("libcublas.so", "libcublasLt.so", "stubs/libcuda.so"):
        (toolkit / "lib64" / lib).write_text("")
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": str(toolkit)}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "device_cuda_paths.py"), str(toolkit / "bin" / "nvcc")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "CUDA_CMAKE_ARGS=''" in out


@pytest.mark.parametrize("script", ["device_pack.sh", "device_check.sh", "gpu_check.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
