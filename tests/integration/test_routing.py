"""The KV3D request router on the real Serve app with two model replicas: sessions stick to
the replica that holds them, survive that replica's death, and load spills over."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.conftest import app_args_from_yaml

pytestmark = pytest.mark.integration

APP = "route"
SYSTEM = "You are the support assistant of an inference server company; answer briefly. " * 6


@pytest.fixture(scope="module")
def route_url(server_url):
    from ray import serve

    from deployments.app import build_app

    args = app_args_from_yaml()
    config = args["config"]
    assert config.get("route", {}).get("policy", "kv3d") == "kv3d"
    config["deploy"]["replicas"] = 2
    config["route"] = {"imbalance_requests": 2, "stats_period_s": 0.5}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    yield f"{server_url}/{APP}"
    serve.delete(APP)


def chat(url: str, messages, session: str | None = None, **extra) -> dict:
    headers = {"X-Session-ID": session} if session else {}
    body = {"model": "m", "temperature": 0, "max_tokens": 8, "messages": messages, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def conversation(url: str, session: str, turns: int, family: str = SYSTEM):
    """Run `turns` turns of one conversation; returns the responses and the final history."""
    messages = [{"role": "system", "content": family}]
    out = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question {i}: how do I tune the server?"})
        r = chat(url, messages, session)
        out.append(r)
        messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
    return out, messages


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


def test_every_turn_of_a_session_goes_to_the_replica_holding_it(route_url):
    for n in range(4):
        responses, _ = conversation(route_url, f"stick-{uuid.uuid4().hex}", turns=3)
        replicas = [r["kv3d"]["replica"] for r in responses]
        assert len(set(replicas)) == 1, f"session {n} moved: {replicas}"
        assert all(r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for r in responses[1:])
    # A later turn is routed by its session once the router knows where the session is (its
    # own recent choice, for 5 s, then the replica's report); a turn that comes later than
    # that on a slow machine, before the report, follows the family prefix to the same place.
    session = metric(route_url, 'kv3d_route_total{reason="session"}')
    prefix = metric(route_url, 'kv3d_route_total{reason="prefix"}')
    assert session >= 1 and session + prefix >= 8


def test_skewed_load_spills_to_the_other_replica(route_url):
    family = f"Skew family {uuid.uuid4().hex}. " + SYSTEM
    body = {
        "model": "m",
        "max_tokens": 48,
        "ignore_eos": True,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": family},
            {"role": "user", "content": "Write about caching."},
        ],
    }

    async def one(client):
        r = await client.post(f"{route_url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["kv3d"]["replica"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            await one(client)  # the family is now hot on one replica
            return await asyncio.gather(*(one(client) for _ in range(8)))

    replicas = asyncio.run(burst())
    # Affinity sends the burst to the replica holding the prefix until it has more than
    # `imbalance_requests` requests above the other; then the other gets work.
    assert len(set(replicas)) == 2, replicas
    assert metric(route_url, 'kv3d_route_total{reason="load"}') >= 1
    assert metric(route_url, 'kv3d_route_total{reason="prefix"}') >= 1


def test_a_session_resumes_on_another_replica_when_its_replica_dies(route_url, server_url):
    import ray

    session = f"survivor-{uuid.uuid4().hex}"
    responses, messages = conversation(route_url, session, turns=2)
    home = responses[-1]["kv3d"]["replica"]
    # Each kept turn is published to the registry (write-behind); wait until it is there.
    deadline = time.monotonic() + 30
    while metric(route_url, "kv3d_shared_sessions") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the newest turn's record, not only an older one
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{home}", namespace="serve"))

    messages.append({"role": "user", "content": "And how do I check that it works?"})
    probe = {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    resumed = chat(route_url, messages, session, **probe)
    assert resumed["kv3d"]["replica"] != home
    assert resumed["kv3d"]["prefix_source"] == "session"
    assert resumed["kv3d"]["session_resumed_from"] == "shared"
    history_tokens = responses[-1]["usage"]["prompt_tokens"]
    assert resumed["usage"]["prompt_tokens_details"]["cached_tokens"] >= history_tokens - 8

    # The right answer: the same next token as a replica that recomputes the whole prompt.
    reference = chat(server_url, messages, None, **probe)
    got = resumed["choices"][0]["logprobs"]["content"][0]
    want = reference["choices"][0]["logprobs"]["content"][0]
    assert got["token"] == want["token"]
    assert abs(got["logprob"] - want["logprob"]) < 0.5

    # No client sees the dead replica: later requests all succeed.
    for _ in range(4):
        chat(route_url, messages, f"after-{uuid.uuid4().hex}")


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error(route_url):
    import ray

    session = f"mid-stream-{uuid.uuid4().hex}"
    responses, messages = conversation(route_url, session, turns=1)
    home = responses[0]["kv3d"]["replica"]
    messages.append({"role": "user", "content": "Tell me everything about caching."})
    body = {
        "model": "m",
        "stream": True,
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
        "messages": messages,
    }
    headers = {"X-Session-ID": session}  # the session's replica serves it
    events = []
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST", f"{route_url}/v1/chat/completions", json=body, headers=headers
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while len(events) < 3:
                line = next(lines)
                if line.startswith("data: "):
                    events.append(line)
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#ModelReplica#{home}", namespace="serve"))
            events.extend(line for line in lines if line.startswith("data: "))
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "server_error" in events[-2]
    # The other replica keeps serving.
    chat(route_url, [{"role": "user", "content": "Still there?"}], f"next-{uuid.uuid4().hex}")


def test_requests_keep_succeeding_when_the_registry_dies(route_url):
    import ray

    from deployments.registry import REGISTRY_NAME, REGISTRY_NAMESPACE

    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE), no_restart=False)
    family = f"After the registry died {uuid.uuid4().hex}. " + SYSTEM
    for i in range(3):
        r = chat(
            route_url,
            [{"role": "system", "content": family}, {"role": "user", "content": f"Question {i}?"}],
        )
        assert r["choices"][0]["message"]["content"] is not None
    # Ray restarts the registry (empty); new snapshots land in it again.
    deadline = time.monotonic() + 60
    while metric(route_url, "kv3d_snapshots") < 1 and time.monotonic() < deadline:
        chat(
            route_url,
            [{"role": "system", "content": family + " again"}, {"role": "user", "content": "Hi?"}],
        )
        time.sleep(1.0)
    assert metric(route_url, "kv3d_snapshots") >= 1
