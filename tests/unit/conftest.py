"""Fixtures the unit tests share: the bundled models' vocabularies and chat templates (no
weights: cheap enough for pure tests of prompt building)."""

from __future__ import annotations

import pytest

from kv3d.server.chat import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    """SmolLM2's (the bundled model's)."""
    tok = Tokenizer.load(smollm2_path)
    yield tok
    tok.close()


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    """Gemma 3 270M's."""
    tok = Tokenizer.load(gemma3_path)
    yield tok
    tok.close()
