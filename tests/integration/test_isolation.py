"""Isolation of sessions: a conversation is reachable only from its API key's namespace, its
`cache_salt` and its `user` (who may hold many conversations). Real engine, in-process app."""

import time

import pytest

from kv3d.server.api import ServedModel, build_api
from kv3d.server.guard import Guard, Tenant, digests_from_setting
from tests.integration.httpapp import RecordingBackend, cached, call, chat

pytestmark = pytest.mark.integration


def recording_app(engine, tok, keys: str = ""):
    backend = RecordingBackend(engine)
    served = ServedModel(engine.model_id, tok, context_tokens=1024)
    return build_api(served, backend, guard=Guard(digests_from_setting(keys))), backend


def test_session_ids_are_scoped_by_namespace_salt_and_user():
    open_api, tenant = Tenant(), Tenant("ns1")
    assert open_api.session_id(None, "salt", "alice") is None  # user names no session
    assert open_api.session_id("c1") == "c1"
    ids = {
        open_api.session_id("c1", "a", None),
        open_api.session_id("c1", "b", None),
        open_api.session_id("c1", None, "alice"),
        open_api.session_id("c1", None, "bob"),
        tenant.session_id("c1"),
        # No salt and user can spell another pair's scope.
        open_api.session_id("c1", "a|", "b"),
        open_api.session_id("c1", "a", "|b"),
    }
    assert len(ids) == 7 and "c1" not in ids
    assert open_api.session_id("c1", "a", "u") == open_api.session_id("c1", "a", "u")


def test_user_scopes_a_conversation_and_never_names_one(engine, tok):
    app, backend = recording_app(engine, tok)
    call(
        app,
        chat(session="c1", user="alice"),
        chat(session="c1", user="bob"),
        chat(session="c2", user="alice"),
        chat(user="alice"),
    )
    alice_c1, bob_c1, alice_c2, no_header = (r.session_id for r in backend.requests)
    assert len({alice_c1, bob_c1, alice_c2}) == 3
    assert no_header is None  # two conversations of one user no longer overwrite each other


def test_a_session_is_not_resumed_under_another_cache_salt(engine, tok):
    app, _ = recording_app(engine, tok)
    session = f"conv-{time.time_ns()}"
    (first,) = call(app, chat(session=session, cache_salt="tenant-a", max_tokens=8))
    answer = first.json()["choices"][0]["message"]["content"]
    turn2 = [
        *chat()[2]["json"]["messages"],
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the host?"},
    ]
    time.sleep(0.5)  # the first turn is kept or parked in the background
    (other_salt,) = call(app, chat(session=session, cache_salt="tenant-b", messages=turn2))
    # Nothing of tenant-a's conversation is visible, not even how much of it matched.
    assert cached(other_salt) == 0
    assert other_salt.json()["kv3d"]["prefix_source"] == "miss"
    (same_salt,) = call(app, chat(session=session, cache_salt="tenant-a", messages=turn2))
    history = first.json()["usage"]["prompt_tokens"] + first.json()["usage"]["completion_tokens"]
    assert cached(same_salt) >= history - 32
