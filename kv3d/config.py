"""KV3D configuration: one pydantic model that every entry point maps onto.

Sources, lowest precedence first: defaults, the JSON file (`~/.config/kv3d/config.json` or
`--config FILE`), environment variables (`KV3D_SERVER__PORT=9000`, nested with `__`), then CLI
flags or the Serve YAML `args.config` block. The file schema is the seed's (`server`, `cache`,
`model`) plus `engine`, `prefix`, `route`, `limits` and `deploy` sections for the knobs the
seed left implicit.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("~/.config/kv3d/config.json").expanduser()
# The session delta codecs (kv3d.engine.codec modes) a tier may be configured with.
SessionCodec = Literal["int8", "int4", "k4v2", "int2", "int4r", "int4p"]
SESSION_CODECS: tuple[str, ...] = typing.get_args(SessionCodec)


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


MIN_CONTEXT_TOKENS = 64  # model.context_tokens, when set
RAY_STREAM_INTERVAL_MS = 30.0  # server.stream_interval_ms when unset, through Ray Serve


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    runtime: Literal["auto", "process", "ray"] = Field(
        "auto",
        description="How `kv3d serve` runs. process: the HTTP API and one engine in this "
        "process (no Ray: the least latency per token on one machine). ray: Ray Serve (proxy, "
        "ingress, model replicas, snapshots in the object store), needed for several replicas "
        "or a cluster. auto: process for one fixed replica with no Ray cluster named in "
        "RAY_ADDRESS, else ray. `serve run deployments/app.yaml` is always Ray.",
    )
    threads: int = Field(
        0, ge=0, description="llama.cpp compute threads per replica; 0 = all cores of the node."
    )
    api_key: str = Field(
        "",
        description="Bearer key(s) every endpoint but /health requires; several keys are "
        "separated by commas, each a tenant with its own cache namespace. Empty = open. "
        "KV3D_API_KEY sets it too.",
    )
    admin_api_key: str = Field(
        "",
        description="Admin bearer key(s), comma-separated: valid API keys (each its own tenant) "
        "that also see every tenant's prefix families in /v1/kv3d/stats and the dashboard "
        "(other keys see only their own). Setting one turns keys on. Empty = none.",
    )
    canary_period_s: float = Field(
        300.0,
        ge=0,
        description="How often an idle replica re-checks that restored state and int8 deltas "
        "give the logits of recomputation (drift trips safe mode); 0 = never.",
    )
    safe_mode: bool = Field(
        False,
        description="Plain inference only: no prefix reuse, snapshots or session deltas. A "
        "replica also enters it by itself when its start-up self-check fails.",
    )
    max_queued_requests: int = Field(
        512,
        ge=0,
        description="Requests a replica keeps waiting for a free sequence slot; beyond it: 429.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503 answers.")
    stream_interval_ms: float | None = Field(
        None,
        ge=0.0,
        le=1000.0,
        description="Hold streamed text (after the first token) until this long after the "
        "previous message, so that each message carries several tokens: less CPU per token in "
        "the replica, ingress and proxy, at up to that much added inter-token latency (the first "
        "token is never held). 0: send each step's tokens as soon as they are ready. Unset: 30 "
        "through Ray Serve, 0 in one process (no hops to save).",
    )

    def stream_interval_s(self, runtime: str) -> float:
        """The hold time in seconds for `runtime` ("ray" or "process")."""
        if self.stream_interval_ms is not None:
            return self.stream_interval_ms / 1000
        return RAY_STREAM_INTERVAL_MS / 1000 if runtime == "ray" else 0.0


class LimitsConfig(_Section):
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_messages: int = Field(512, ge=1, description="Most messages in one chat request.")
    max_prompt_tokens: int = Field(
        0, ge=0, description="Most prompt tokens per request; 0 = the model context."
    )
    max_completion_tokens: int = Field(
        0, ge=0, description="Largest max_tokens a request may ask for; 0 = the model context."
    )
    max_streams_per_key: int = Field(
        512, ge=1, description="Generation requests one API key may have in flight (429 beyond)."
    )


class CacheConfig(_Section):
    gpu_hot_mb: int = Field(
        2048, ge=1, description="KV cache budget per replica (llama.cpp cells), in MiB."
    )
    ram_warm_mb: int = Field(8192, ge=0, description="Warm tier budget (snapshots, deltas), MiB.")
    ssd_cold_path: str = Field(
        "",
        description="Folder of the cold tier (every parked session is written there behind; "
        "replicas of one node may share it); empty = off.",
    )
    ssd_cold_mb: int = Field(
        10240,
        ge=1,
        description="Disk budget of the cold folder, MiB: least recently written sessions are "
        "removed beyond it.",
    )
    session_codec: SessionCodec = Field(
        "int8",
        description="How idle sessions' private KV is stored in the warm, cold and shared tiers "
        "(hot stays exact): int8 (about 0.53x of f16, within the engine's noise), int4p (about "
        "0.28x: keys coded before RoPE with 0-8 bits a channel, 4-bit rotated values, the first "
        "cell exact), int4r (about 0.28x: 4-bit keys per channel, 4-bit rotated values), int4 / "
        "k4v2 / int2 (4- or 2-bit keys/values, KIVI-style); see README for the low-bit codecs' "
        "measured drift.",
    )
    session_part_tokens: int = Field(
        128,
        ge=0,
        le=1 << 16,
        description="Idle sessions that hold the same tokens past their family prefix (a "
        "conversation's branches, few-shot turns, a document in the first user turn) are "
        "stored in parts of this many cells, and a part they share is kept once in RAM and not "
        "encoded again (int8 and f16 codecs). 0: one delta per session.",
    )
    share_sessions: bool = Field(
        True,
        description="On a Ray cluster, publish each kept session's delta to the object "
        "store after every turn, so that any replica can resume it (one state export per turn).",
    )
    auto_sessions: bool = Field(
        True,
        description="Keep every conversation, also without X-Session-ID / user: a request whose "
        "tokens extend an earlier one's history resumes it.",
    )
    idle_session_rent: float = Field(
        1.0,
        ge=0.0,
        description="An idle session kept in the KV cache slows every step of the sequences "
        "running beside it (attention covers every used cell): it moves to the warm tier once "
        "that cost, measured as the engine runs, reaches this many times what a demotion and a "
        "resume cost (measured too). An unused family prefix whose snapshot is in the catalog "
        "leaves once its rent reaches this many times what restoring it costs. Higher keeps "
        "both hot longer; 0 = only when memory is needed.",
    )


class ModelConfig(_Section):
    path: str = Field("", description="GGUF file; empty = the bundled SmolLM2-135M-Instruct.")
    id: str = Field("", description="Model id reported by /v1/models; empty = file stem.")
    n_gpu_layers: int | None = Field(
        None, description="Layers offloaded to the GPU; unset = all with a GPU, 0 without."
    )
    context_tokens: int = Field(
        0,
        ge=0,
        description="Most tokens (prompt + completion) one sequence may hold; 0 = the model's "
        "training context (as llama-server and vLLM default).",
    )

    @field_validator("context_tokens")
    @classmethod
    def _context_floor(cls, tokens: int) -> int:
        if 0 < tokens < MIN_CONTEXT_TOKENS:
            raise ValueError(f"must be 0 (the model's) or at least {MIN_CONTEXT_TOKENS}")
        return tokens


class EngineConfig(_Section):
    max_sequences: int = Field(
        8, ge=1, le=256, description="Sequence slots decoded together (llama.cpp n_seq_max)."
    )
    batch_tokens: int = Field(
        512, ge=32, description="Most tokens in one llama_decode step (decode + prefill chunks)."
    )
    prefill_slowdown_max: float = Field(
        2.0,
        ge=0.0,
        description="While sequences generate, a step that also prefills a prompt may last at "
        "most this many times a decode-only step (measured as it runs; at least 32 prompt "
        "tokens, and 32 more for each queued request waiting for a family prefix a prompt is "
        "computing), so streams keep a flat inter-token latency while new prompts arrive; 0 = "
        "no limit (prompt chunks of up to batch_tokens).",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="Threads for steps of a single token (one lone sequence decoding); 0 = "
        "server.threads. Fewer than the cores can be faster where Ray shares them (see README).",
    )
    kv_type: Literal["f16", "q8_0"] = Field("f16", description="llama.cpp KV cache element type.")
    flash_attn: bool = Field(True, description="Use flash attention (V cache not transposed).")


class PrefixConfig(_Section):
    enabled: bool = Field(True, description="Reuse the KV of shared prompt prefixes.")
    block_tokens: int = Field(
        32, ge=4, le=1024, description="Tokens per hashed block (a family prefix may end early)."
    )
    max_hot: int = Field(
        16, ge=1, le=128, description="Prefixes a replica keeps hot in its KV cache."
    )
    min_tokens: int = Field(8, ge=1, description="Shortest prefix worth keeping hot.")
    snapshots: bool = Field(True, description="Publish family prefixes to the object store.")
    snapshot_min_tokens: int = Field(
        64, ge=1, description="Shortest family prefix published as a snapshot."
    )


class RouteConfig(_Section):
    policy: Literal["kv3d", "pow2", "round_robin"] = Field(
        "kv3d",
        description="How the ingress picks a model replica: kv3d (session, then longest hot "
        "prefix, then load), pow2 (Ray's power-of-two choices) or round_robin.",
    )
    imbalance_requests: int = Field(
        4,
        ge=0,
        description="Affinity yields to load when the preferred replica has more than this many "
        "ongoing requests above the least loaded one.",
    )
    stats_period_s: float = Field(
        1.0, gt=0, description="How often each replica reports its hot sessions and prefixes."
    )
    recent_s: float = Field(
        5.0,
        ge=0,
        description="How long the router remembers where it sent a session or prefix, "
        "bridging the lag of replica reports.",
    )


class SamplingConfig(_Section):
    """What a request that leaves a sampling field out (or sends null) gets. Unset: the model's
    recommendation in its GGUF (`general.sampling.*`), else llama.cpp's default, as
    llama-server does; OpenAI's own (temperature 1, nothing cut) make a small model wander."""

    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        description="Temperature of a request that sends none; unset = the GGUF's "
        "general.sampling.temp, else 0.8.",
    )
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="top_p of a request that sends none; unset = the GGUF's, else 0.95.",
    )
    top_k: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="top_k of a request that sends none (0 = off); unset = the GGUF's, else 40.",
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="min_p of a request that sends none (0 = off); unset = the GGUF's, else 0.05.",
    )


class DeployConfig(_Section):
    replicas: int = Field(1, ge=1, description="Model replicas (one per GPU in production).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per model replica.")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas.")
    max_replicas: int = Field(
        0,
        ge=0,
        description="Autoscaling ceiling; 0 = a fixed `replicas`. With a ceiling, `replicas` is "
        "the floor and Serve scales on ongoing requests per replica.",
    )
    target_ongoing_requests: float = Field(
        0.0,
        ge=0,
        description="Autoscaling target per replica; 0 = engine.max_sequences (every slot busy).",
    )
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        description="How long load must stay low before a replica is removed (its hot sessions "
        "are demoted to the warm tier first).",
    )
    shutdown_timeout_s: float = Field(
        60.0, gt=0, description="Time a stopping replica gets to finish requests and demote."
    )

    @model_validator(mode="after")
    def _ceiling_above_floor(self) -> DeployConfig:
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})"
            )
        return self


class KV3DConfig(BaseSettings):
    """The whole configuration. Invariant: every field is validated once, here."""

    model_config = SettingsConfigDict(
        env_prefix="KV3D_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)

    @field_validator(
        "server",
        "cache",
        "model",
        "engine",
        "prefix",
        "route",
        "limits",
        "deploy",
        "sampling",
        mode="before",
    )
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, *args, **kw):
        # CLI/YAML (init) beat env, env beats the file (merged into init by `load`), then defaults.
        return (init_settings, env_settings)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return data


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> KV3DConfig:
    """Build the configuration: defaults < file < env `KV3D_*` < `overrides` (CLI / Serve YAML).

    `path=None` reads the default file when it exists. Env vars override the file, so they are
    applied here by hand: pydantic-settings would rank the file (passed as init kwargs) above them.
    """
    file_data: dict[str, Any] = {}
    if path is not None:
        file_data = read_config_file(Path(path).expanduser())
    elif DEFAULT_CONFIG_PATH.is_file():
        file_data = read_config_file(DEFAULT_CONFIG_PATH)
    try:
        env_only = KV3DConfig().model_dump(exclude_defaults=True)
        if os.environ.get("KV3D_API_KEY") and "api_key" not in env_only.get("server", {}):
            env_only.setdefault("server", {})["api_key"] = os.environ["KV3D_API_KEY"]
        merged = _deep_merge(_deep_merge(file_data, env_only), overrides or {})
        return KV3DConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)


def seed_file_dict(config: KV3DConfig) -> dict[str, Any]:
    """The seed's config.json schema, as `kv3d doctor` writes it."""
    return {
        "server": {
            "host": config.server.host,
            "port": config.server.port,
            "threads": config.server.threads or (os.cpu_count() or 1),
            "api_key": config.server.api_key,
        },
        "cache": config.cache.model_dump(include={"gpu_hot_mb", "ram_warm_mb", "ssd_cold_path"}),
        "model": {"path": config.model.path, "id": config.model.id},
    }
