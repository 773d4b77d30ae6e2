"""Sampling defaults for the fields a request leaves out: configuration, then the GGUF's
recommendation, then llama.cpp's; a request's own value (null aside) always wins."""

from __future__ import annotations

import pytest

from kv3d.config import SamplingConfig, load_config
from kv3d.server.openai_schema import ChatCompletionRequest, CompletionRequest
from kv3d.server.sampling import LLAMA_CPP, SamplingDefaults

N_VOCAB = 1000


def meta_of(values: dict[str, str]):
    return values.get


def test_without_configuration_or_gguf_values_llama_cpps_defaults_apply():
    d = SamplingDefaults.resolve(SamplingConfig(), meta_of({}))
    assert (d.temperature, d.top_p, d.top_k, d.min_p) == (0.8, 0.95, 40, 0.05)
    assert d.sources == ("llama.cpp",) * 4
    assert d == SamplingDefaults()  # the dataclass's own defaults are the same


def test_the_gguf_recommendation_beats_llama_cpp_and_the_configuration_beats_both():
    gguf = {
        "general.sampling.temp": "0.6",
        "general.sampling.top_k": "20",
        "general.sampling.top_p": "0.8",
    }
    d = SamplingDefaults.resolve(SamplingConfig(top_k=5), meta_of(gguf))
    assert (d.temperature, d.top_p, d.top_k, d.min_p) == (0.6, 0.8, 5, 0.05)
    assert d.sources == ("gguf", "gguf", "config", "llama.cpp")
    assert "top_k 5 (config)" in d.describe()


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("general.sampling.top_k", "-1", 0),  # llama.cpp: <= 0 is off
        ("general.sampling.top_k", "2.5", LLAMA_CPP["top_k"]),
        ("general.sampling.temp", "5", LLAMA_CPP["temperature"]),
        ("general.sampling.temp", "nan", LLAMA_CPP["temperature"]),
        ("general.sampling.top_p", "0", LLAMA_CPP["top_p"]),
        ("general.sampling.min_p", "words", LLAMA_CPP["min_p"]),
        ("general.sampling.min_p", "0", 0.0),
    ],
)
def test_a_gguf_value_the_api_would_refuse_is_ignored(key, text, expected):
    d = SamplingDefaults.resolve(SamplingConfig(), meta_of({key: text}))
    name = {"temp": "temperature"}.get(key.rsplit(".", 1)[1], key.rsplit(".", 1)[1])
    assert getattr(d, name) == expected


def test_the_configuration_is_checked_and_reaches_env_and_flags(monkeypatch):
    with pytest.raises(ValueError):
        SamplingConfig(temperature=3.0)
    monkeypatch.setenv("KV3D_SAMPLING__MIN_P", "0.1")
    assert load_config().sampling.min_p == 0.1


DEFAULTS = SamplingDefaults(temperature=0.7, top_p=0.9, top_k=30, min_p=0.02)


def chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body).sampling(n_vocab=N_VOCAB, defaults=DEFAULTS)


def test_fields_left_out_or_null_take_the_defaults_and_sent_ones_are_kept():
    left_out = chat()
    assert (left_out.temperature, left_out.top_p, left_out.top_k, left_out.min_p) == (
        0.7,
        0.9,
        30,
        0.02,
    )
    sent = chat(temperature=1.0, top_p=1.0, top_k=0, min_p=None)
    assert (sent.temperature, sent.top_p, sent.top_k, sent.min_p) == (1.0, 1.0, 0, 0.02)
    assert chat(temperature=0).temperature == 0.0


def test_completions_take_the_same_defaults_and_none_means_openais():
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "top_p": 0.5})
    s = req.sampling(n_vocab=N_VOCAB, defaults=DEFAULTS)
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.7, 0.5, 30, 0.02)
    openai = req.sampling(n_vocab=N_VOCAB)
    assert (openai.temperature, openai.top_p, openai.top_k, openai.min_p) == (1.0, 0.5, 0, 0.0)
