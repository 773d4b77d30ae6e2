"""The workload analytics dashboard: its JSON endpoint over an in-process engine, and the page
itself in a real headless Chromium against the real Serve app."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import httpx
import pytest

from kv3d.config import LimitsConfig, load_config
from kv3d.engine.engine import Engine
from kv3d.server.api import LocalBackend, ServedModel, build_api
from kv3d.server.chat import Tokenizer
from kv3d.server.guard import Guard, digests_from_setting

pytestmark = pytest.mark.integration

SYSTEM = "Dashboard family: you answer questions about inference servers in one line. " * 6


def ask(nonce: str, question: str) -> dict:
    return {
        "model": "m",
        "temperature": 0,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": nonce + " " + SYSTEM},
            {"role": "user", "content": question},
        ],
    }


@pytest.fixture(scope="module")
def local_app(smollm2_path):
    cfg = load_config(
        overrides={
            "cache": {"gpu_hot_mb": 64},
            "model": {"context_tokens": 1024},
            "server": {"threads": 2},
        }
    )
    tok = Tokenizer.load(smollm2_path)
    with Engine.from_config(cfg) as engine:
        served = ServedModel(engine.model_id, tok, context_tokens=1024)
        guard = Guard(digests_from_setting("dash-key"), LimitsConfig())
        yield build_api(served, LocalBackend(engine), guard=guard)
    tok.close()


def call(app, *requests):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kv3d") as http:
            return [await http.request(m, p, **kw) for m, p, kw in requests]

    return asyncio.run(go())


def test_stats_show_traffic_and_never_prompt_text(local_app):
    key = {"headers": {"Authorization": "Bearer dash-key"}}
    nonce = uuid.uuid4().hex
    (before,) = call(local_app, ("GET", "/v1/kv3d/stats", key))
    asks = [
        ("POST", "/v1/chat/completions", {**key, "json": ask(nonce, f"Q{i}?")}) for i in range(3)
    ]
    call(local_app, *asks)
    (after,) = call(local_app, ("GET", "/v1/kv3d/stats", key))
    b, a = before.json(), after.json()
    assert set(a) >= {"mode", "hit_rate", "sessions", "bytes", "latency_s", "families", "replicas"}
    assert (
        a["prefix_lookups"] == b["prefix_lookups"] + 3 and a["prefix_hits"] >= b["prefix_hits"] + 2
    )
    assert a["latency_s"]["ttft_p50"] > 0 and a["bytes"]["hot"] > 0
    assert [r["replica"] for r in a["replicas"]] == ["local"]
    assert nonce not in after.text and "Dashboard family" not in after.text


def test_the_page_is_open_but_its_data_needs_the_key(local_app):
    page, script, missing, stats = call(
        local_app,
        ("GET", "/dashboard", {}),
        ("GET", "/dashboard/kv3dchart.js", {}),
        ("GET", "/dashboard/../pyproject.toml", {}),
        ("GET", "/v1/kv3d/stats", {}),
    )
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<canvas" in page.text and "https://" not in page.text  # nothing from a CDN
    assert script.status_code == 200 and "KV3DChart" in script.text
    assert missing.status_code in (401, 404)
    assert stats.status_code == 401


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.os.path.exists(CHROMIUM) and shutil.os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_until(predicate, within_s: float):
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_dashboard_renders_and_moves_with_traffic_in_a_real_browser(browser, server_url):
    browser.get(f"{server_url}/dashboard?period_ms=300")
    updates = lambda: int(browser.find_element("id", "updates").text or 0)  # noqa: E731
    assert wait_until(lambda: updates() >= 2, 30), "the page never got stats"
    painted = """
        const c = document.getElementById(arguments[0]);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return [Number(c.dataset.points || 0), n];"""
    for chart in ("chart-hit-rate", "chart-sessions", "chart-bytes", "chart-latency"):
        points, pixels = browser.execute_script(painted, chart)
        assert points >= 2 and pixels > 100, chart

    hits = lambda: int(browser.find_element("id", "hits").text)  # noqa: E731
    hits_before = hits()
    nonce = uuid.uuid4().hex
    for i in range(3):
        r = httpx.post(f"{server_url}/v1/chat/completions", json=ask(nonce, f"Q{i}?"), timeout=60)
        assert r.status_code == 200
    # The 2nd and 3rd requests reuse the 1st one's prefix: the page's hit count moves.
    assert wait_until(lambda: hits() >= hits_before + 2, 30), "the page did not follow traffic"
    rows = browser.find_elements("css selector", "#replicas tr")
    assert rows and rows[0].text.strip()
