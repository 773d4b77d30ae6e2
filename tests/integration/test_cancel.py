"""A request the engine cancels while its client still listens (a replica stopping) ends in an
error, never in a finish_reason that passes the cut-off text for a complete answer."""

import json

import pytest

from kv3d.engine.generation import TextDelta
from kv3d.server.api import LocalBackend, ServedModel, build_api
from tests.integration.httpapp import call, chat

pytestmark = pytest.mark.integration


class CancelAfterFirstToken(LocalBackend):
    """The real engine; the engine itself cancels each request after its first text."""

    async def generate(self, request):
        async for event in self.engine.stream(request):
            yield event
            if isinstance(event, TextDelta):
                self.engine.cancel(request.request_id)


def app_for(engine, tok):
    served = ServedModel(engine.model_id, tok, context_tokens=1024)
    return build_api(served, CancelAfterFirstToken(engine))


def test_a_cancelled_stream_ends_with_an_error_not_a_finish_reason(engine, tok):
    (r,) = call(app_for(engine, tok), chat(max_tokens=200, ignore_eos=True, stream=True))
    assert r.status_code == 200
    frames = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    payloads = [json.loads(f) for f in frames[:-1]]
    finishes = [c["finish_reason"] for p in payloads for c in p.get("choices", [])]
    assert not any(finishes)  # no "stop" or "length" for a cut-off answer
    assert payloads[-1]["error"]["code"] == "cancelled"


def test_a_cancelled_request_is_a_503_not_a_short_answer(engine, tok):
    (r,) = call(app_for(engine, tok), chat(max_tokens=200, ignore_eos=True))
    assert r.status_code == 503 and r.json()["error"]["code"] == "cancelled"
