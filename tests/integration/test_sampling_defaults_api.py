"""The sampling defaults over HTTP: the in-process app over the real engine, the served model
loaded as `kv3d serve` loads it (its GGUF's metadata read for recommendations)."""

from __future__ import annotations

import pytest

from kv3d.server.api import ServedModel, build_api
from tests.integration.httpapp import RecordingBackend, call, chat, engine_config

pytestmark = pytest.mark.integration


def test_requests_that_leave_sampling_out_get_the_servers_defaults(engine):
    config = engine_config()
    config.sampling.top_k = 7  # configured; the rest: the bundled GGUF names none
    served = ServedModel.load(config)
    assert served.sampling.sources == ("llama.cpp", "llama.cpp", "config", "llama.cpp")
    backend = RecordingBackend(engine)
    app = build_api(served, backend)
    completion = ("POST", "/v1/completions", {"json": {"prompt": "Hello", "max_tokens": 2}})
    bodies = [
        chat(temperature=None),  # null: as if left out
        chat(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),  # OpenAI's, sent
        completion,
    ]
    for body in bodies:  # one at a time: the record's order is the requests'
        (response,) = call(app, body)
        assert response.status_code == 200, response.text
    left_out, sent, legacy = (r.sampling for r in backend.requests)
    assert (left_out.temperature, left_out.top_p, left_out.top_k, left_out.min_p) == (
        0.8,
        0.95,
        7,
        0.05,
    )
    assert (sent.temperature, sent.top_p, sent.top_k, sent.min_p) == (1.0, 1.0, 0, 0.0)
    assert legacy == left_out
    served.tokenizer.close()
