"""The cold tier on the real model: a session outlives a replica killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from kv3d.engine.engine import Engine
from tests.integration.test_sessions import config, request, run

pytestmark = pytest.mark.integration

TURN1 = [("user", "How do I change the port of the server?")]

# The first turn in a process that is then killed: no close(), no atexit, no flush.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    from kv3d.engine.engine import Engine
    from kv3d.server.chat import Tokenizer
    from tests.integration.test_sessions import config, request, run

    cold, model = Path(sys.argv[1]), sys.argv[2]
    tok = Tokenizer.load(Path(model))
    engine = Engine.from_config(config(cold_dir=cold, max_hot=2)).start()
    turn1 = [("user", "How do I change the port of the server?")]
    answer, _, end = run(engine, request(tok, turn1, "survivor"))
    assert end.reason in ('stop', 'length'), end
    deadline = time.monotonic() + 60
    while not any(cold.glob("*.kv3d")) and time.monotonic() < deadline:
        time.sleep(0.05)  # written behind by the store's worker
    print(json.dumps({"answer": answer, "hot": engine.stats().hot_idle_sessions}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_session_survives_a_kill_9_of_its_replica(tok, tmp_path, smollm2_path):
    cold = tmp_path / "cold"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(cold), str(smollm2_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    first = json.loads(child.stdout.strip().splitlines()[-1])
    assert first["hot"] == 1  # it was still hot (in the KV cache) when the process died
    turn2 = TURN1 + [("assistant", first["answer"]), ("user", "And then?")]
    with Engine.from_config(config(cold_dir=cold, max_hot=2)) as restarted:
        _, _, resumed = run(restarted, request(tok, turn2, "survivor", 4))
    assert resumed.session_tier == "cold" and resumed.usage.cached_tokens > 30
