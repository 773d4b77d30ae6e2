"""`POST /tokenize` and `/detokenize` in llama-server's shapes, on the bundled model's real
vocabulary, through the in-process app (keyed like every other endpoint)."""

import pytest

from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.guard import Guard, digests_from_setting
from tests.integration.httpapp import bearer, call

pytestmark = pytest.mark.integration


def app_for(engine, tok, keys: str = ""):
    served = ServedModel(engine.model_id, tok, context_tokens=1024)
    return build_api(served, LocalBackend(engine), guard=Guard(digests_from_setting(keys)))


def post(path: str, body: dict, headers: dict | None = None):
    return ("POST", path, {"json": body, "headers": headers or {}})


def test_tokenize_and_detokenize_round_trip(engine, tok):
    text = "KV3D keeps prefixes hot. Ünïcödé and emoji 🙂 too."
    plain, pieces, marker = call(
        app_for(engine, tok),
        post("/tokenize", {"content": text}),
        post("/tokenize", {"content": text, "with_pieces": True}),
        post("/tokenize", {"content": "<|im_start|>user", "with_pieces": True}),
    )
    tokens = plain.json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert [p["id"] for p in pieces.json()["tokens"]] == tokens
    # Pieces are text, or bytes where a token holds part of a character (the emoji).
    joined = b"".join(
        p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"])
        for p in pieces.json()["tokens"]
    )
    assert joined.decode() == text
    # A chat template's marker written in the text is one special token, as llama-server parses.
    assert marker.json()["tokens"][0]["piece"] == "<|im_start|>"
    (back,) = call(app_for(engine, tok), post("/detokenize", {"tokens": tokens}))
    assert back.status_code == 200 and back.json() == {"content": text}


def test_bad_token_ids_and_bodies_get_a_400_naming_the_field(engine, tok):
    out_of_vocab, negative, missing, extra = call(
        app_for(engine, tok),
        post("/detokenize", {"tokens": [1, tok.n_vocab]}),
        post("/detokenize", {"tokens": [-1]}),
        post("/tokenize", {}),
        post("/tokenize", {"content": "x", "nonsense": 1}),
    )
    for r, param in ((out_of_vocab, "tokens"), (negative, "tokens"), (missing, "content")):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "nonsense"


def test_tokenize_is_keyed_like_every_other_endpoint(engine, tok):
    app = app_for(engine, tok, keys="key-alpha-123")
    anonymous, keyed = call(
        app,
        post("/tokenize", {"content": "hi"}),
        post("/tokenize", {"content": "hi"}, bearer("key-alpha-123")),
    )
    assert anonymous.status_code == 401 and keyed.status_code == 200
