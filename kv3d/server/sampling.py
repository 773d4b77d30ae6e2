"""What a request that leaves a sampling field out gets.

OpenAI's defaults (temperature 1, no token cut) are tuned for OpenAI's models; a small open model
sampled that way wanders off and now and then never stops. llama-server and llama-cpp-python's
server fill a left-out field with the value the model's GGUF recommends (`general.sampling.*`,
written by converters from the model's generation config) or else llama.cpp's default; KV3D
does the same, so that a client that sends no sampling fields gets the same kind of text from
each. A field the request sends is taken as sent; `sampling.*` in the configuration overrides
both sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kv3d.config import SamplingConfig

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "min_p")
LLAMA_CPP = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
GGUF_KEYS = {
    "temperature": "general.sampling.temp",
    "top_p": "general.sampling.top_p",
    "top_k": "general.sampling.top_k",
    "min_p": "general.sampling.min_p",
}


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Defaults for the sampling fields a request leaves out. Invariant: every value is one the
    API accepts for its field (`top_k` 0 and `min_p` 0 mean off), and `sources` names where
    each came from (`config`, `gguf` or `llama.cpp`)."""

    temperature: float = LLAMA_CPP["temperature"]
    top_p: float = LLAMA_CPP["top_p"]
    top_k: int = LLAMA_CPP["top_k"]
    min_p: float = LLAMA_CPP["min_p"]
    sources: tuple[str, ...] = ("llama.cpp",) * 4

    @classmethod
    def resolve(cls, config: SamplingConfig, meta: Callable[[str], str | None]) -> SamplingDefaults:
        """Each field from the configuration, else the GGUF's metadata (`meta(key)`: its value
        as text, or None), else llama.cpp's default."""
        values, sources = {}, []
        for name in FIELDS:
            configured = getattr(config, name)
            if configured is not None:
                values[name], source = configured, "config"
            elif (recommended := _from_gguf(name, meta(GGUF_KEYS[name]))) is not None:
                values[name], source = recommended, "gguf"
            else:
                values[name], source = LLAMA_CPP[name], "llama.cpp"
            sources.append(source)
        return cls(**values, sources=tuple(sources))

    def describe(self) -> str:
        return ", ".join(
            f"{name} {getattr(self, name)} ({source})"
            for name, source in zip(FIELDS, self.sources, strict=True)
        )


def _from_gguf(name: str, text: str | None) -> float | int | None:
    """A GGUF's recommended value, checked by the configuration's own field (a file from disk is
    a boundary); None where it has none or one KV3D cannot use (logged)."""
    if text is None:
        return None
    try:
        value = float(text)
        if name == "top_k" and value.is_integer():
            value = max(int(value), 0)  # llama.cpp reads top_k <= 0 as off
        return getattr(SamplingConfig.model_validate({name: value}), name)
    except ValueError:  # pydantic's ValidationError is one
        log.warning(
            "ignoring the GGUF's %s = %r: not a value the API accepts", GGUF_KEYS[name], text
        )
        return None
