"""Fixtures of the in-process API tests (tests/integration/httpapp.py): the bundled model's
tokenizer and an engine of the test config, one per module."""

from __future__ import annotations

import pytest

from kv3d.engine.engine import Engine
from tests.integration.httpapp import engine_config


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


@pytest.fixture(scope="module")
def engine():
    with Engine.from_config(engine_config()) as e:
        yield e
