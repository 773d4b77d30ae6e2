"""Two model replicas behind the real Serve app: a prefix one computed is restored by the other."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.conftest import app_args_from_yaml
from tests.integration.httpapp import family_body

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair_url(server_url):
    """A second application with two model replicas, on the same Serve instance."""
    from ray import serve

    from deployments.app import build_app

    args = app_args_from_yaml()
    args["config"]["deploy"]["replicas"] = 2
    args["config"]["prefix"] = {"snapshot_min_tokens": 32}
    # Round robin: the second request lands on the replica that did not compute the prefix
    # (the KV3D router would send it back to the one holding it hot).
    args["config"]["route"] = {"policy": "round_robin"}
    serve.run(build_app(args), name="pair", route_prefix="/pair")
    yield f"{server_url}/pair"
    serve.delete("pair")


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def test_a_prefix_computed_on_one_replica_is_restored_on_the_other(pair_url):
    system = f"Session family {uuid.uuid4().hex}. " + (
        "You are the support assistant of an inference server company; answer in one line. " * 6
    )
    body = family_body(system)
    answers = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = httpx.post(f"{pair_url}/v1/chat/completions", json=body, timeout=60).json()
        answers.append(r)
        if len(answers) >= 3 and metric(pair_url, "kv3d_snapshot_restores_total") >= 1:
            break
        time.sleep(0.3)  # lets the first replica's snapshot reach the registry
    assert metric(pair_url, "kv3d_snapshot_restores_total") >= 1
    assert metric(pair_url, "kv3d_snapshots") >= 1
    assert metric(pair_url, "kv3d_snapshot_restore_seconds_count") >= 1
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers]
    assert cached[0] == 0 and all(c > 100 for c in cached[1:])
    # Hot on the first replica or restored on the second: the same bits (chunking is fixed).
    tops = [
        [
            (t["token"], t["logprob"])
            for t in a["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        ]
        for a in answers
    ]
    assert all(top == tops[0] for top in tops)
