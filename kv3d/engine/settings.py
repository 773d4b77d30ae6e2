"""What an engine is built with: settings derived once from `KV3DConfig`, and the KV cell plan
for a model and budget."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kv3d.config import KV3DConfig
from kv3d.engine.llama import LlamaModel, supports_gpu_offload
from kv3d.engine.modelfile import model_id_for, resolve_model_path
from kv3d.engine.reuse import ReuseSettings

MIB = 1024 * 1024
# A sequence's context where neither the config nor the GGUF gives one.
FALLBACK_CONTEXT_TOKENS = 4096


class CapacityError(ValueError):
    """The configured KV budget cannot hold even one full-context sequence."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    model_path: Path
    model_id: str
    n_gpu_layers: int
    context_tokens: int
    max_sequences: int
    batch_tokens: int
    kv_type: str
    flash_attn: bool
    kv_budget_bytes: int
    threads: int
    decode_threads: int
    max_queued_requests: int
    retry_after_s: int
    reuse: ReuseSettings
    reuse_enabled: bool
    max_hot_prefixes: int
    warm_budget_bytes: int
    cold_path: str
    auto_sessions: bool
    safe_mode: bool = False
    canary_period_s: float = 0.0
    cold_budget_bytes: int = 0  # 0: unbounded
    session_codec: str = "int8"  # warm, cold and shared tiers; hot stays exact
    session_part_tokens: int = 0  # 0: one delta per idle session, none shared
    prefill_slowdown_max: float = 0.0  # 0: prompt chunks never held back for decoding streams
    idle_session_rent: float = 0.0  # 0: idle sessions leave the cache only under pressure

    @classmethod
    def from_config(cls, config: KV3DConfig) -> EngineSettings:
        path = resolve_model_path(config.model.path)
        threads = config.server.threads or os.cpu_count() or 1
        n_gpu_layers = config.model.n_gpu_layers
        if n_gpu_layers is None:
            n_gpu_layers = -1 if supports_gpu_offload() else 0
        return cls(
            model_path=path,
            model_id=model_id_for(path, config.model.id),
            n_gpu_layers=n_gpu_layers,
            context_tokens=config.model.context_tokens,
            max_sequences=config.engine.max_sequences,
            batch_tokens=config.engine.batch_tokens,
            prefill_slowdown_max=config.engine.prefill_slowdown_max,
            kv_type=config.engine.kv_type,
            flash_attn=config.engine.flash_attn,
            kv_budget_bytes=config.cache.gpu_hot_mb * MIB,
            threads=threads,
            decode_threads=config.engine.decode_threads or threads,
            max_queued_requests=config.server.max_queued_requests,
            retry_after_s=config.server.retry_after_s,
            reuse=_reuse_settings(config),
            reuse_enabled=config.prefix.enabled,
            max_hot_prefixes=config.prefix.max_hot,
            warm_budget_bytes=config.cache.ram_warm_mb * MIB,
            cold_path=config.cache.ssd_cold_path,
            cold_budget_bytes=config.cache.ssd_cold_mb * MIB,
            session_codec=config.cache.session_codec,
            session_part_tokens=config.cache.session_part_tokens,
            auto_sessions=config.cache.auto_sessions,
            idle_session_rent=config.cache.idle_session_rent,
            safe_mode=config.server.safe_mode,
            canary_period_s=config.server.canary_period_s,
        )


def _reuse_settings(config: KV3DConfig) -> ReuseSettings:
    p = config.prefix
    return ReuseSettings(
        block_tokens=p.block_tokens,
        min_tokens=p.min_tokens,
        snapshots=p.snapshots,
        snapshot_min_tokens=p.snapshot_min_tokens,
    )


def sequence_context_tokens(configured: int, n_ctx_train: int) -> int:
    """Tokens one sequence may hold: `model.context_tokens` (0 = the model's training context),
    never past the training context; where the GGUF names none, the configured value (or
    `FALLBACK_CONTEXT_TOKENS`)."""
    if n_ctx_train <= 0:
        return configured or FALLBACK_CONTEXT_TOKENS
    return min(configured, n_ctx_train) if configured else n_ctx_train


def plan_kv_cells(settings: EngineSettings, model: LlamaModel) -> tuple[int, int]:
    """(cells in the cache, tokens one sequence may hold) for this model and budget."""
    context_tokens = sequence_context_tokens(settings.context_tokens, model.n_ctx_train)
    bytes_per_cell = model.kv_bytes_per_cell(settings.kv_type)
    budget_cells = settings.kv_budget_bytes // bytes_per_cell
    if budget_cells < context_tokens:
        whose = "" if settings.context_tokens else " (the model's training context)"
        raise CapacityError(
            f"cache.gpu_hot_mb={settings.kv_budget_bytes // MIB} holds {budget_cells} KV cells "
            f"({bytes_per_cell} bytes each) but one sequence may need {context_tokens}{whose}: "
            "raise cache.gpu_hot_mb or set a smaller model.context_tokens (-c)"
        )
    cells = min(budget_cells, settings.max_sequences * context_tokens)
    return cells, context_tokens
