"""`kv3d` command line: `serve`, `doctor`, `bench` and `fidelity`.

The CLI is the top of the stack: `kv3d serve` (in its Ray runtime) and `kv3d bench --routers`
are the places in `kv3d` that reach into `deployments` (lazily), because they start Ray Serve.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import typing
from typing import Any

from kv3d.cli import flags
from kv3d.config import SESSION_CODECS, ConfigError, KV3DConfig, RouteConfig, load_config

log = logging.getLogger("kv3d")


def cmd_serve(args: argparse.Namespace) -> int:
    config = flags.config_from_args(args.config, args)
    from kv3d.engine.modelfile import resolve_model_path

    resolve_model_path(config.model.path)  # fail before Ray starts when the file is wrong
    from kv3d.server.local import resolve_runtime, serve_in_process

    if resolve_runtime(config, os.environ.get("RAY_ADDRESS")) == "process":
        log.info("serving in one process (server.runtime=ray for Ray Serve)")
        return serve_in_process(config)
    return serve_blocking(config)


def serve_blocking(config: KV3DConfig) -> int:
    started_s = time.perf_counter()
    joining = bool(os.environ.get("RAY_ADDRESS"))
    _ray_environment(joining)  # before Ray is imported: it reads these once
    import ray
    from ray import serve
    from ray.exceptions import AuthenticationError

    from deployments.app import build_from_config

    log.info("%s Ray…", "joining" if joining else "starting a local")
    try:
        ray.init(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
    except AuthenticationError as exc:
        print(f"kv3d: {exc}\n{RAY_TOKEN_ADVICE}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        # A cluster that wants a token from a driver that sends none looks like this too.
        if not joining or os.environ.get("RAY_AUTH_MODE") == "token":
            raise
        hint = f"If the cluster uses token authentication: {RAY_TOKEN_ADVICE}"
        print(f"kv3d: {exc}\n{hint}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": config.server.host, "port": config.server.port})
        serve.run(build_from_config(config), name="kv3d", route_prefix="/", blocking=False)
        url = f"http://{config.server.host}:{config.server.port}"
        print(
            f"KV3D is serving at {url}/v1 (Ray Serve; ready in "
            f"{time.perf_counter() - started_s:.1f}s; Ctrl-C to stop)",
            flush=True,
        )
        stop.wait()
        print("KV3D: shutting down…", flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0


RAY_TOKEN_ADVICE = (
    "The Ray cluster requires its token: export RAY_AUTH_MODE=token and give the cluster's token "
    "in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN (cluster/README.md, "
    '"Token authentication").'
)


def _ray_environment(joining: bool) -> None:
    if not joining:
        # Ray runs its worker processes at nice 15 unless told otherwise; the model replica's
        # decode threads then lose the cores to every other process (measured: 35 instead of
        # 52 tokens/s single-stream on 2 cores). On a cluster, `ray start` takes the same
        # variable (cluster/README.md).
        os.environ.setdefault("RAY_worker_niceness", "0")
        return
    # Ray sends its token to an address named in RAY_ADDRESS only in RAY_AUTH_MODE=token, so
    # that ~/.ray/auth_token does not go to any cluster one points at. A token handed over in
    # RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is meant for this cluster: use it.
    handed = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if handed and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def cmd_doctor(args: argparse.Namespace) -> int:
    from kv3d.cli.doctor import run_doctor

    return run_doctor(args.config)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.routers:
        return _compare_routers(args)
    if args.compare is not None:
        return _compare_servers(args)
    if args.requests is not None:
        from kv3d.bench.compare import ServerStartError, main_workload

        try:
            return main_workload(args.url, _workload_spec(args), args.json, not args.no_start)
        except ServerStartError as exc:
            print(f"kv3d: {exc}", file=sys.stderr)
            return 2
    from kv3d.bench.phases import main_bench

    max_tokens = args.max_tokens or 128
    return main_bench(args.url, args.concurrency, max_tokens, args.json, args.capacity)


def _workload_spec(args: argparse.Namespace, default_requests: int = 1000):
    from kv3d.bench.workload import WorkloadSpec

    try:
        return WorkloadSpec(
            requests=args.requests or default_requests,
            shared_ratio=args.shared_ratio,
            turns=args.turns,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens or 16,
            families=args.families,
            system_words=args.system_words,
            seed=args.seed,
            example_turns=args.example_turns,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _compare_servers(args: argparse.Namespace) -> int:
    from kv3d.bench.compare import CompareSettings, main_compare

    flags = {
        "kv_budget_mb": args.kv_budget_mb,
        "max_sequences": args.max_sequences,
        "capacity_sessions": args.capacity_sessions,
        "resume_sessions": args.resume_sessions,
        "fidelity_windows": args.fidelity_windows,
        "decode_tokens": args.decode_tokens,
        "open_ended_requests": args.open_ended,
        "rounds": args.rounds,
    }
    try:
        settings = CompareSettings(
            contenders=tuple(n.strip() for n in args.compare.split(",") if n.strip()),
            **{k: v for k, v in flags.items() if v is not None},  # unset: the default
        )
    except ValueError as exc:  # an unknown contender
        raise ConfigError(str(exc)) from exc
    command = " ".join(["kv3d", *sys.argv[1:]])
    return main_compare(_workload_spec(args, 48), settings, args.json, command)


def _compare_routers(args: argparse.Namespace) -> int:
    import json

    from kv3d.bench.routers import compare_routers

    policies = [p.strip() for p in args.routers.split(",") if p.strip()]
    overrides: dict[str, Any] = {"deploy": {"replicas": args.replicas}}
    if args.port is not None:
        overrides["server"] = {"port": args.port}
    config = load_config(args.config, overrides=overrides)
    known = typing.get_args(RouteConfig.model_fields["policy"].annotation)
    unknown = [p for p in policies if p not in known]
    if unknown or not policies:
        raise ConfigError(f"--routers takes policies among {', '.join(known)}; got {unknown}")
    report = compare_routers(
        config,
        policies,
        seed=args.seed,
        families=args.families,
        sessions_per_family=args.sessions_per_family,
        turns=args.turns,
        concurrency=args.concurrency,
    )
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from kv3d.bench.fidelity import heldout_text, measure_fidelity, measure_kv_type
    from kv3d.engine.modelfile import resolve_model_path

    text = Path(args.text).read_text() if args.text else heldout_text()
    model_path = resolve_model_path(args.model or "")
    if args.kv_type:
        report = measure_kv_type(model_path, text, kv_type=args.kv_type, max_windows=args.windows)
    else:
        report = measure_fidelity(
            model_path,
            text,
            max_windows=args.windows,
            group=args.group,
            shared_prefix_tokens=args.shared_prefix,
            codec=args.codec,
        )
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    for key, value in report.as_dict().items():
        print(f"{key:>22}: {value:.6g}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kv3d", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server (Ctrl-C stops it)",
        description=flags.SCHEME,
        usage=flags.USAGE,
        formatter_class=flags.HelpFormatter,
        # Generated flags share long prefixes; an abbreviation that works today would turn
        # ambiguous when a field is added.
        allow_abbrev=False,
    )
    serve.add_argument(
        "--config", metavar="FILE", help="JSON config file (default ~/.config/kv3d/config.json)"
    )
    flags.add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    doctor = sub.add_parser("doctor", help="check the install and write the default config")
    doctor.add_argument("--config", help="config file to check or create")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser(
        "bench",
        help="measure a server: KV3D's phases, or with --requests a shared-prefix multi-turn "
        "workload against any OpenAI-compatible server; prints a JSON report",
    )
    bench.add_argument(
        "--url",
        default=os.environ.get("KV3D_URL", "http://127.0.0.1:8080"),
        help="the server to measure (default $KV3D_URL or http://127.0.0.1:8080)",
    )
    bench.add_argument(
        "--concurrency", type=int, default=8, metavar="C", help="concurrent streams (conversations)"
    )
    bench.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="tokens per stream (default 128; with --requests/--compare: per turn, default 16)",
    )
    bench.add_argument("--json", metavar="FILE", help="also write the report to this file")
    bench.add_argument(
        "--capacity",
        type=int,
        default=0,
        metavar="N",
        help="only measure how many of N concurrent sessions (80%% sharing a prompt) run at once",
    )
    bench.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="run the shared-prefix multi-turn chat workload of N requests (progress on stderr, "
        "JSON on stdout, a table on stderr); starts kv3d serve at a local --url where nothing "
        "answers",
    )
    bench.add_argument(
        "--shared-ratio",
        type=float,
        default=0.8,
        metavar="R",
        help="with --requests/--compare: conversations opening with a shared family prompt",
    )
    bench.add_argument(
        "--system-words",
        type=int,
        default=250,
        metavar="W",
        help="with --requests/--compare: words of real text per system prompt",
    )
    bench.add_argument(
        "--example-turns",
        type=int,
        default=0,
        metavar="E",
        help="with --requests/--compare: a family's conversations open with E worked examples "
        "(question and answer, the same across the family) after the system prompt, as "
        "few-shot prompts do (default 0)",
    )
    bench.add_argument(
        "--no-start",
        action="store_true",
        help="with --requests: fail where nothing answers at --url instead of starting KV3D",
    )
    bench.add_argument(
        "--compare",
        nargs="?",
        const="",
        metavar="C,C",
        help="start each contender (kv3d, kv3d-no-reuse, llama-cpp-python, llama-server; "
        "default: all this machine has) on a free port and run the same workload and claim-"
        "table probes against each (--requests default 48; ignores --url)",
    )
    bench.add_argument(
        "--kv-budget-mb",
        type=int,
        metavar="MB",
        help="with --compare: KV3D's KV cache budget in the capacity probe, cache.gpu_hot_mb "
        "(default 128; the workload runs with llama-server's KV memory, at least this)",
    )
    bench.add_argument(
        "--max-sequences",
        type=int,
        metavar="N",
        help="with --compare: KV3D's sequence slots, engine.max_sequences (default 96)",
    )
    bench.add_argument(
        "--capacity-sessions",
        type=int,
        metavar="N",
        help="with --compare: sessions started at once to find how many run together (default 96)",
    )
    bench.add_argument(
        "--resume-sessions",
        type=int,
        metavar="N",
        help="with --compare: ~1k-token sessions evicted and resumed, more than KV3D keeps hot "
        "(default 18)",
    )
    bench.add_argument(
        "--fidelity-windows",
        type=int,
        metavar="W",
        help="with --compare: held-out windows scored for int8 logit drift (default 2; 0: skip)",
    )
    bench.add_argument(
        "--decode-tokens",
        type=int,
        metavar="T",
        help="with --compare: tokens per stream of the decode probe (1 stream, 8 streams, "
        "1-token requests), run first on each server (default 128; 0: skip)",
    )
    bench.add_argument(
        "--open-ended",
        type=int,
        metavar="N",
        help="with --compare: N short chats that set no max_tokens (sampled, 16 at once, cut "
        "after 120 s), as many clients send them (default 32; 0: skip)",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="with --compare: run every contender N times, the order alternated each round; "
        "figures are medians over the rounds and ratios the medians of each round's ratios, "
        "also shown round by round (default 1)",
    )
    bench.add_argument(
        "--routers",
        metavar="P,P",
        help="deploy the app once per routing policy (kv3d, pow2, round_robin) on a local Ray "
        "and compare them on a shared-prefix workload (ignores --url)",
    )
    bench.add_argument("--replicas", type=int, default=2, help="with --routers: model replicas")
    bench.add_argument("--port", type=int, help="with --routers: HTTP port (default 8080)")
    bench.add_argument("--config", help="with --routers: JSON config file")
    bench.add_argument(
        "--families",
        type=int,
        default=4,
        metavar="F",
        help="with --routers/--requests/--compare: shared system prompts",
    )
    bench.add_argument(
        "--sessions-per-family", type=int, default=3, help="with --routers: conversations each"
    )
    bench.add_argument(
        "--turns",
        type=int,
        default=3,
        metavar="T",
        help="with --routers/--requests/--compare: turns per conversation",
    )
    bench.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="with --routers/--requests/--compare: workload seed",
    )
    bench.set_defaults(func=cmd_bench)

    fidelity = sub.add_parser(
        "fidelity", help="a session delta codec vs the uncompressed state, on held-out text"
    )
    fidelity.add_argument("--model", help="GGUF file (default: the bundled model)")
    fidelity.add_argument("--text", help="held-out text file (default: one shipped with KV3D)")
    fidelity.add_argument("--windows", type=int, default=8, help="text windows to score")
    fidelity.add_argument(
        "--codec",
        default="int8",
        choices=SESSION_CODECS,
        help="the session delta codec to measure (cache.session_codec; default int8)",
    )
    fidelity.add_argument(
        "--kv-type",
        choices=("q8_0", "q4_0"),
        help="measure a quantised hot KV cache (engine.kv_type) against f16 instead of a codec",
    )
    fidelity.add_argument("--group", type=int, default=32, help="channels per int8 scale")
    fidelity.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="keep each window's first N tokens exact, as a shared family prefix is (default 0: "
        "the whole context goes through the codec)",
    )
    fidelity.add_argument("--json", action="store_true", help="print one JSON object last")
    fidelity.set_defaults(func=cmd_fidelity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kv3d: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"kv3d: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
