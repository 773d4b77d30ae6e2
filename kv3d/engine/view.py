"""What one engine can serve best, for whoever routes requests to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class CacheView:
    """The sessions this engine resumes locally (hot or warm), and the block keys of its hot
    prefixes with the prompt tokens each covers. Immutable: readers on other threads take the
    current one without a lock."""

    sessions: frozenset[str] = frozenset()
    blocks: Mapping[int, int] = field(default_factory=dict)
