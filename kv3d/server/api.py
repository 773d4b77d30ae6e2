"""The OpenAI-compatible HTTP API, as a plain FastAPI app over any `GenerateBackend`.

This is the boundary: bodies are validated, prompts rendered and tokenized, limits checked, and
every failure becomes an OpenAI-shaped error with its status here. It does not know about Ray:
`deployments/ingress.py` serves it with a backend that calls model replicas through a
DeploymentHandle; `LocalBackend` runs it over an in-process engine.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv3d.config import KV3DConfig
from kv3d.engine.catalog import LocalSnapshots
from kv3d.engine.engine import Engine
from kv3d.engine.generation import (
    EngineStats,
    Finished,
    GenerationRequest,
    Rejected,
    RejectReason,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
    ends_stream,
)
from kv3d.engine.modelfile import model_id_for, resolve_model_path
from kv3d.engine.settings import sequence_context_tokens
from kv3d.server import dashboard
from kv3d.server.chat import TemplateError, Tokenizer
from kv3d.server.dashboard import build_stats
from kv3d.server.guard import OPEN, Guard, Tenant
from kv3d.server.metrics import CONTENT_TYPE, ServerMetrics
from kv3d.server.openai_schema import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_logprobs,
    check_vocabulary,
    completion_logprobs,
    now_s,
    parse_json_body,
    usage_dict,
)
from kv3d.server.sampling import SamplingDefaults
from kv3d.server.structured import output_grammar
from kv3d.server.tools import (
    Call,
    CallReader,
    Piece,
    ToolUse,
    call_grammar,
    prompt_input,
    split_output,
    tool_use,
)

log = logging.getLogger(__name__)

HEALTH = {"status": "ok", "service": "kv3d-engine"}
MAX_SESSION_ID_CHARS = 256


class GenerateBackend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Stream the request's events; closing the iterator early must cancel the request."""
        ...

    async def engine_stats(self) -> list[EngineStats]:
        """Engine counters of every model replica there is now: a replica missing from the
        list is gone, and its figures stop counting."""
        ...

    async def snapshot_stats(self) -> dict[str, Any] | None:
        """The snapshot registry's figures (`snapshots`, `bytes`), or None without one."""
        ...

    async def safe_mode(self) -> bool:
        """Whether any model replica serves in safe mode, true from the first answer on."""
        ...


class LocalBackend:
    """Runs requests on an engine in this process (no Ray). With `snapshots`, a prompt whose
    family prefix is no longer hot restores it from there instead of recomputing it."""

    def __init__(
        self,
        engine: Engine,
        snapshots: LocalSnapshots | None = None,
        stream_interval_s: float = 0.0,
    ):
        self.engine = engine
        self.snapshots = snapshots
        self.stream_interval_s = stream_interval_s

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        snapshot = None
        if self.snapshots is not None:
            keys = self.engine.snapshot_keys(request)
            snapshot = self.snapshots.fetch(keys) if keys else None
        return self.engine.stream(request, snapshot, min_interval_s=self.stream_interval_s)

    async def engine_stats(self) -> list[EngineStats]:
        return [self.engine.stats()]

    async def snapshot_stats(self) -> dict[str, Any] | None:
        return None if self.snapshots is None else self.snapshots.stats()

    async def safe_mode(self) -> bool:
        return self.engine.safe_mode


@dataclass(frozen=True)
class ServedModel:
    model_id: str
    tokenizer: Tokenizer
    context_tokens: int  # most prompt + completion tokens of one sequence
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    created_s: int = field(default_factory=now_s)

    @classmethod
    def load(cls, config: KV3DConfig) -> ServedModel:
        """The model `config` names, with its tokenizer (vocabulary only, no weights)."""
        path = resolve_model_path(config.model.path)
        tokenizer = Tokenizer.load(path)
        sampling = SamplingDefaults.resolve(config.sampling, tokenizer.meta)
        log.info("requests that leave sampling fields out get %s", sampling.describe())
        return cls(
            model_id=model_id_for(path, config.model.id),
            tokenizer=tokenizer,
            context_tokens=sequence_context_tokens(
                config.model.context_tokens, tokenizer.n_ctx_train
            ),
            sampling=sampling,
        )


def build_api(
    served: ServedModel,
    backend: GenerateBackend,
    metrics: ServerMetrics | None = None,
    guard: Guard | None = None,
) -> FastAPI:
    app = FastAPI(title="KV3D", version="0.1.0")
    metrics = metrics or ServerMetrics()
    guard = guard or Guard()
    app.state.metrics = metrics
    _install_error_handlers(app)

    app.add_middleware(_Gate, guard=guard, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {**HEALTH, "mode": "safe" if await backend.safe_mode() else "normal"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.engine.refresh(await backend.engine_stats())
        snapshots = await backend.snapshot_stats()
        if snapshots is not None:
            metrics.snapshots.snapshots = snapshots["snapshots"]
            metrics.snapshots.bytes = snapshots["bytes"]
            metrics.snapshots.shared_sessions = snapshots.get("sessions", 0)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/kv3d/stats")
    async def kv3d_stats(request: Request) -> dict[str, Any]:
        engines = await backend.engine_stats()
        metrics.engine.refresh(engines)
        registry = await backend.snapshot_stats()
        # The figures are the whole server's; the families, the caller's own (all: admin key).
        return build_stats(
            engines, registry, metrics, await backend.safe_mode(), viewer=_tenant(request)
        )

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return _asset_response("dashboard.html")

    @app.get("/dashboard/{name}")
    async def dashboard_asset(name: str) -> Response:
        return _asset_response(name)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != served.model_id:
            raise APIError(404, f"model {model_id!r} not found", code="model_not_found")
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started_s = time.perf_counter()
        req = await _parse(request, ChatCompletionRequest, guard.limits.max_body_bytes)
        if len(req.messages) > guard.limits.max_messages:
            raise APIError(
                400,
                f"{len(req.messages)} messages; at most {guard.limits.max_messages} are accepted",
                param="messages",
                code="too_many_messages",
            )
        use = tool_use(req)
        messages, tools = prompt_input(served.tokenizer.chat_template, req.chat_messages(), use)
        try:
            prompt = served.tokenizer.encode_chat(messages, tools)
            family = served.tokenizer.family_tokens(messages, prompt, tools)
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        tenant = _tenant(request)
        session_header = request.headers.get("x-session-id")
        if session_header is not None and not 0 < len(session_header) <= MAX_SESSION_ID_CHARS:
            raise APIError(
                400,
                f"X-Session-ID must have 1 to {MAX_SESSION_ID_CHARS} characters",
                param="X-Session-ID",
            )
        gen = _generation_request(
            "chatcmpl",
            req,
            prompt,
            _limits(served, guard),
            req.requested_top_logprobs(),
            tenant,
            family,
            session_header,
            tokenizer=served.tokenizer,
            sampling_defaults=served.sampling,
        )
        grammar = call_grammar(use)
        if grammar is not None:
            gen = _forcing_calls(gen, grammar, served.tokenizer)
        created_s = now_s()
        view = _Choices(
            [
                _ChatView(
                    gen.request_id, served.model_id, req.include_usage_in_stream, use, created_s
                )
                for _ in range(gen.n)
            ]
        )
        return await _respond(backend, metrics, guard, tenant, gen, view, req.stream, started_s)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started_s = time.perf_counter()
        req = await _parse(request, CompletionRequest, guard.limits.max_body_bytes)
        prompt = req.prompt_tokens(served.tokenizer.encode_text, served.tokenizer.n_vocab)
        tenant = _tenant(request)
        gen = _generation_request(
            "cmpl",
            req,
            prompt,
            _limits(served, guard),
            req.logprobs,
            tenant,
            tokenizer=served.tokenizer,
            sampling_defaults=served.sampling,
        )
        created_s = now_s()
        view = _Choices(
            [
                _CompletionView(
                    gen.request_id, served.model_id, req.include_usage_in_stream, created_s
                )
                for _ in range(gen.n)
            ]
        )
        return await _respond(backend, metrics, guard, tenant, gen, view, req.stream, started_s)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await _parse(request, TokenizeRequest, guard.limits.max_body_bytes)
        tokens = served.tokenizer.tokenize(req.content, add_special=req.add_special)
        if not req.with_pieces:
            return {"tokens": tokens}
        return {"tokens": [{"id": t, "piece": _piece(served.tokenizer.piece(t))} for t in tokens]}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await _parse(request, DetokenizeRequest, guard.limits.max_body_bytes)
        check_vocabulary(req.tokens, served.tokenizer.n_vocab, "tokens")
        text = b"".join(served.tokenizer.piece(t) for t in req.tokens)
        return {"content": text.decode("utf-8", "replace")}

    return app


def _piece(data: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 (part of a character), as
    llama-server gives them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def _asset_response(name: str) -> Response:
    try:
        body = dashboard.asset(name)
    except KeyError:
        raise APIError(404, f"no dashboard file {name!r}", type="not_found_error") from None
    return Response(body, media_type=dashboard.ASSETS[name])


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {
        "id": served.model_id,
        "object": "model",
        "created": served.created_s,
        "owned_by": "kv3d",
        "context_length": served.context_tokens,
    }


# --- request handling ----------------------------------------------------------------------
# Open without a key: the health probe, and the dashboard's static files (they hold no data;
# the page asks for a key when /v1/kv3d/stats answers 401).
OPEN_PATHS = ("/health", "/dashboard", "/dashboard/kv3dchart.js")


class _Gate:
    """Before routing, checks the caller's key and the declared body size (an unauthenticated
    caller learns nothing, not even which routes exist); after, counts the response by route
    and status. Plain ASGI rather than `@app.middleware("http")`, whose wrapper pipes every
    streamed chunk through an extra task and memory stream."""

    def __init__(self, app: Any, guard: Guard, metrics: ServerMetrics):
        self.app = app
        self.guard = guard
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not _is_open(scope):
            headers = Headers(scope=scope)
            try:
                tenant = self.guard.authenticate(headers.get("authorization"))
                _check_declared_length(headers, self.guard.limits.max_body_bytes)
            except APIError as exc:
                refusal = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
                await refusal(scope, receive, send)
                self._count(scope, exc.status)
                return
            scope.setdefault("state", {})["tenant"] = tenant  # read back as request.state
        status = 500  # unless a response starts: an unhandled error is answered outside

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self._count(scope, status)

    def _count(self, scope: dict[str, Any], status: int) -> None:
        endpoint = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(endpoint, str(status)).inc()


def _is_open(scope: dict[str, Any]) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    return any(path in (p, root + p) for p in OPEN_PATHS)


def _tenant(request: Request) -> Tenant:
    return getattr(request.state, "tenant", OPEN)


def _too_large(limit_bytes: int) -> APIError:
    return APIError(413, f"request body exceeds {limit_bytes} bytes", code="request_too_large")


def _check_declared_length(headers: Headers, limit_bytes: int) -> None:
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise _too_large(limit_bytes)


@dataclass(frozen=True)
class _TokenLimits:
    context_tokens: int
    prompt_tokens: int
    completion_tokens: int


def _limits(served: ServedModel, guard: Guard) -> _TokenLimits:
    lim = guard.limits
    ctx = served.context_tokens
    return _TokenLimits(
        ctx,
        min(ctx, lim.max_prompt_tokens) if lim.max_prompt_tokens else ctx,
        min(ctx, lim.max_completion_tokens) if lim.max_completion_tokens else ctx,
    )


async def _parse(request: Request, model: type[BaseModel], limit_bytes: int) -> Any:
    raw = bytearray()
    async for chunk in request.stream():  # bounded even when no length was declared
        raw += chunk
        if len(raw) > limit_bytes:
            raise _too_large(limit_bytes)
    body = parse_json_body(raw)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param) from None


def _generation_request(
    kind: str,
    req: Any,
    prompt: list[int],
    limits: _TokenLimits,
    top_logprobs: int | None,
    tenant: Tenant,
    family_tokens: int | None = None,
    session_id: str | None = None,
    *,
    tokenizer: Tokenizer,
    sampling_defaults: SamplingDefaults,
) -> GenerationRequest:
    if not prompt:
        raise APIError(400, "the prompt is empty after tokenization", param="messages")
    if len(prompt) > limits.prompt_tokens and limits.prompt_tokens < limits.context_tokens:
        raise APIError(
            400,
            f"the prompt has {len(prompt)} tokens; this server accepts at most "
            f"{limits.prompt_tokens}",
            param="messages",
            code="prompt_too_long",
        )
    if req.max_tokens is not None and req.max_tokens > limits.completion_tokens:
        raise APIError(
            400,
            f"max_tokens is {req.max_tokens}; this server allows at most "
            f"{limits.completion_tokens}",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    context_tokens = limits.context_tokens
    room = context_tokens - len(prompt)
    if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
        asked = len(prompt) + (req.max_tokens or 1)
        raise APIError(
            400,
            f"this model's context is {context_tokens} tokens; the request needs {asked} "
            f"({len(prompt)} prompt + {req.max_tokens or 1} completion). Shorten the messages "
            "or lower max_tokens.",
            param="max_tokens" if room > 0 else "messages",
            code="context_length_exceeded",
        )
    return GenerationRequest(
        request_id=f"{kind}-{uuid.uuid4().hex}",
        prompt_tokens=tuple(prompt),
        max_tokens=req.max_tokens or min(room, limits.completion_tokens),
        sampling=req.sampling(
            n_vocab=tokenizer.n_vocab,
            grammar=output_grammar(req.response_format, req.grammar, tokenizer),
            defaults=sampling_defaults,
        ),
        stop=req.stop_strings(),
        n=req.n,
        top_logprobs=top_logprobs,
        family_tokens=family_tokens,
        session_id=tenant.session_id(session_id, req.cache_salt, req.user),
        ignore_eos=req.ignore_eos,
        cache_salt=tenant.cache_salt(req.cache_salt),
        tenant=tenant.namespace,
    )


def _forcing_calls(gen: GenerationRequest, grammar: str, tokenizer: Tokenizer) -> GenerationRequest:
    """`gen` sampled under the grammar of tool_choice "required" or a named function."""
    if gen.sampling.grammar is not None:
        raise APIError(
            400,
            "tool_choice forces a tool call; response_format or grammar cannot also shape it",
            param="tool_choice",
        )
    why = tokenizer.grammar_error(grammar)
    if why is not None:  # a vocabulary that cannot spell the tags, say
        raise APIError(400, f"no grammar for the forced tool call: {why}", param="tool_choice")
    return replace(gen, sampling=replace(gen.sampling, grammar=grammar))


async def _respond(
    backend: GenerateBackend,
    metrics: ServerMetrics,
    guard: Guard,
    tenant: Tenant,
    gen: GenerationRequest,
    view: _Choices,
    stream: bool,
    started_s: float,
) -> Response:
    guard.acquire(tenant)  # released when the event stream is closed, whatever happens
    metrics.prompt_tokens.inc(len(gen.prompt_tokens))
    events = _Observed(
        backend.generate(gen), metrics, started_s, on_close=lambda: guard.release(tenant)
    )
    if not stream:
        try:
            results = await events.collect()
        finally:
            await events.aclose()
        return JSONResponse(view.full(results))
    try:
        first = await events.first()
    except BaseException:
        await events.aclose()
        raise
    return StreamingResponse(
        _sse(view, first, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass
class _Result:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: Finished | None = None


class _Observed:
    """Wraps a backend's event stream: records metrics, turns `Rejected` into `APIError`."""

    def __init__(
        self,
        events: AsyncIterator[StreamEvent],
        metrics: ServerMetrics,
        t0: float,
        on_close: Callable[[], None] | None = None,
    ):
        self._events = events
        self._metrics = metrics
        self._t0 = t0
        self._on_close = on_close
        self._last_token_s: float | None = None
        self._active = True
        metrics.active_requests.inc()

    async def first(self) -> StreamEvent:
        try:
            return await self._next()
        except StopAsyncIteration:
            raise APIError(503, "the model replica sent nothing", type="server_error") from None

    async def rest(self) -> AsyncIterator[StreamEvent]:
        while True:
            try:
                event = await self._next()
            except StopAsyncIteration:
                return
            yield event
            if ends_stream(event):
                return

    async def collect(self) -> list[_Result]:
        """Each choice's whole answer, in choice order."""
        results: dict[int, _Result] = {}
        async for event in self.rest():
            if isinstance(event, TextDelta):
                result = results.setdefault(event.index, _Result())
                result.text += event.text
                result.logprobs.extend(event.logprobs)
            elif isinstance(event, Finished):
                result = results.setdefault(event.index, _Result())
                result.text += event.text
                result.finish = event
        ordered = [results[i] for i in sorted(results)]
        if not ordered or any(r.finish is None for r in ordered):
            raise APIError(503, "the model replica ended the stream early", type="server_error")
        return ordered

    async def _next(self) -> StreamEvent:
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            raise
        except APIError:
            raise
        except Exception as exc:  # replica died, handle failed: the client gets a clean error
            log.exception("backend stream failed")
            raise APIError(
                503, f"model replica unavailable: {type(exc).__name__}", type="server_error"
            ) from exc
        self._observe(event)
        if isinstance(event, Rejected):
            raise _rejected_error(event)
        if isinstance(event, Finished) and event.reason == "cancelled":
            # The engine stopped it (the replica is shutting down) while the client still
            # listens: an error, never a finish_reason that passes cut-off text for complete.
            raise APIError(
                503,
                "the request was cancelled before it completed (the model replica is stopping); "
                "retry it",
                type="server_error",
                code="cancelled",
            )
        return event

    def _observe(self, event: StreamEvent) -> None:
        now = time.perf_counter()
        m = self._metrics
        if isinstance(event, TextDelta):
            if self._last_token_s is None:
                m.observe_ttft(now - self._t0)
            else:
                m.itl.observe((now - self._last_token_s) / max(event.num_tokens, 1))
            self._last_token_s = now
        elif isinstance(event, Finished):
            if self._last_token_s is None:
                m.observe_ttft(now - self._t0)
            m.completion_tokens.inc(event.usage.completion_tokens)
            if event.snapshot_restore_s is not None:
                m.restore.observe(event.snapshot_restore_s)
            if event.session_resume_s is not None:
                m.observe_resume(event.session_tier or "warm", event.session_resume_s)

    async def aclose(self) -> None:
        if self._active:
            self._active = False
            self._metrics.active_requests.dec()
            if self._on_close is not None:
                self._on_close()
            closer = getattr(self._events, "aclose", None)
            if closer is not None:
                await closer()


# The one place an engine's reason for not running a request becomes HTTP:
# reason -> (status, OpenAI error type, error code).
REJECTION_HTTP: dict[RejectReason, tuple[int, str, str]] = {
    "too_large": (400, "invalid_request_error", "context_length_exceeded"),
    "queue_full": (429, "rate_limit_error", "queue_full"),
    "unavailable": (503, "server_error", "unavailable"),
    "internal": (500, "server_error", "engine_error"),
}


def _rejected_error(event: Rejected) -> APIError:
    status, kind, code = REJECTION_HTTP[event.reason]
    headers = {"Retry-After": str(event.retry_after_s)} if event.retry_after_s else None
    return APIError(status, event.message, type=kind, code=code, headers=headers)


async def _sse(view: _Choices, first: StreamEvent, events: _Observed) -> AsyncIterator[bytes]:
    def frame(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    try:
        yield frame(view.opening())
        pending: list[StreamEvent] = [first]
        async for event in _chain(pending, events.rest()):
            for payload in view.chunks(event):
                yield frame(payload)
    except APIError as exc:
        yield frame(exc.body())
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"


async def _chain(head: list[StreamEvent], tail: AsyncIterator[StreamEvent]):
    for event in head:
        yield event
        if ends_stream(event):
            return
    async for event in tail:
        yield event


# --- response shapes -------------------------------------------------------------------------
class _View(Protocol):
    """One choice's response shapes: the whole answer, and the stream's chunks."""

    def full(self, result: _Result) -> dict[str, Any]: ...
    def opening(self) -> dict[str, Any]: ...
    def chunks(self, event: StreamEvent) -> list[dict[str, Any]]: ...


class _Choices:
    """A request's n choices (n >= 1) as one response. Each choice's text goes through its own
    view (tool-call reading and logprob offsets are per choice); the response's usage counts
    the prompt once and sums the completions, and says where the prompt's KV came from as
    choice 0 found it (the other choices share what it computed)."""

    def __init__(self, views: list[_View]):
        self.views = views
        self._finishes: dict[int, Finished] = {}

    def full(self, results: list[_Result]) -> dict[str, Any]:
        for index, result in enumerate(results):
            assert result.finish is not None
            self._finishes[index] = result.finish
        bodies = [
            view.full(replace(result, finish=self._overall(result.finish)))
            for view, result in zip(self.views, results, strict=True)
        ]
        body = bodies[0]
        body["choices"] = [_indexed(b["choices"][0], i) for i, b in enumerate(bodies)]
        return body

    def opening(self) -> dict[str, Any]:
        chunk = self.views[0].opening()
        chunk["choices"] = [
            _indexed(v.opening()["choices"][0], i) for i, v in enumerate(self.views)
        ]
        return chunk

    def chunks(self, event: StreamEvent) -> list[dict[str, Any]]:
        index = event.index if isinstance(event, (TextDelta, Finished)) else 0
        view = self.views[index]
        if not isinstance(event, Finished):
            out = view.chunks(event)
        elif event.final:
            self._finishes[index] = event
            out = view.chunks(self._overall(event))
        else:  # another choice still runs: no usage chunk yet
            self._finishes[index] = event
            out = [chunk for chunk in view.chunks(event) if chunk["choices"]]
        for chunk in out:
            for choice in chunk["choices"]:
                choice["index"] = index
        return out

    def _overall(self, finish: Finished | None) -> Finished:
        """`finish` carrying the whole request's usage and prompt source."""
        assert finish is not None
        first = self._finishes.get(0, finish)
        usage = Usage(
            first.usage.prompt_tokens,
            sum(f.usage.completion_tokens for f in self._finishes.values()),
            first.usage.cached_tokens,
        )
        return replace(
            finish,
            usage=usage,
            snapshot_restore_s=first.snapshot_restore_s,
            session_resume_s=first.session_resume_s,
            session_tier=first.session_tier,
        )


def _indexed(choice: dict[str, Any], index: int) -> dict[str, Any]:
    choice["index"] = index
    return choice


@dataclass
class _ChatView:
    """Chat completion shapes. With tools offered, the text goes through a `CallReader`: calls
    leave as `tool_calls` (streamed: one delta naming the call, then one with its arguments),
    the rest as content."""

    request_id: str
    model_id: str
    include_usage: bool
    tool_use: ToolUse | None = None
    created_s: int = field(default_factory=now_s)
    _reader: CallReader | None = field(init=False, default=None)
    _calls_sent: int = field(init=False, default=0)
    _held_logprobs: list[TokenLogprob] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._reader = self.tool_use.reader() if self.tool_use is not None else None

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created_s,
            "model": self.model_id,
            "system_fingerprint": None,
        }

    def full(self, result: _Result) -> dict[str, Any]:
        finish = result.finish
        assert finish is not None
        content: str | None = result.text
        calls: list[Call] = []
        if self._reader is not None:
            content, calls = split_output(result.text, self._reader)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [_tool_call(c) for c in calls]
        return {
            **self._envelope("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": chat_logprobs(result.logprobs) if result.logprobs else None,
                    "finish_reason": _chat_finish_reason(finish, bool(calls)),
                }
            ],
            **_usage_fields(finish),
        }

    def _chunk(self, delta: dict, finish_reason: str | None, logprobs=None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def opening(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def chunks(self, event: StreamEvent) -> list[dict[str, Any]]:
        if self._reader is not None:
            return self._tool_chunks(self._reader, event)
        if isinstance(event, TextDelta):
            lp = chat_logprobs(list(event.logprobs)) if event.logprobs else None
            return [self._chunk({"content": event.text}, None, lp)]
        if not isinstance(event, Finished):
            return []
        out = []
        if event.text:
            out.append(self._chunk({"content": event.text}, None))
        return out + self._closing(event, _finish_reason(event))

    def _closing(self, finish: Finished, reason: str) -> list[dict[str, Any]]:
        out = [self._chunk({}, reason, self._take_logprobs())]
        if self.include_usage:
            out.append(
                {
                    **self._envelope("chat.completion.chunk"),
                    "choices": [],
                    **_usage_fields(finish),
                }
            )
        return out

    def _tool_chunks(self, reader: CallReader, event: StreamEvent) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            # Held with the text they belong to; they leave with the next chunk that goes out.
            self._held_logprobs.extend(event.logprobs)
            return self._piece_chunks(reader.feed(event.text))
        if not isinstance(event, Finished):
            return []
        out = self._piece_chunks(reader.feed(event.text) + reader.close())
        return out + self._closing(event, _chat_finish_reason(event, self._calls_sent > 0))

    def _piece_chunks(self, pieces: list[Piece]) -> list[dict[str, Any]]:
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(self._chunk({"content": piece}, None, self._take_logprobs()))
                continue
            index, self._calls_sent = self._calls_sent, self._calls_sent + 1
            head = {**_tool_call(piece, index), "function": {"name": piece.name, "arguments": ""}}
            out.append(self._chunk({"tool_calls": [head]}, None, self._take_logprobs()))
            arguments = {"index": index, "function": {"arguments": piece.arguments}}
            out.append(self._chunk({"tool_calls": [arguments]}, None))
        return out

    def _take_logprobs(self) -> dict[str, Any] | None:
        held, self._held_logprobs = self._held_logprobs, []
        return chat_logprobs(held) if held else None


@dataclass
class _CompletionView:
    request_id: str
    model_id: str
    include_usage: bool
    created_s: int = field(default_factory=now_s)
    _text_offset: int = 0

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created_s,
            "model": self.model_id,
            "system_fingerprint": None,
        }

    def _choice(self, text: str, finish_reason: str | None, logprobs=None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def full(self, result: _Result) -> dict[str, Any]:
        finish = result.finish
        assert finish is not None
        lp = completion_logprobs(result.logprobs) if result.logprobs else None
        return {
            **self._envelope(),
            "choices": [self._choice(result.text, _finish_reason(finish), lp)],
            **_usage_fields(finish),
        }

    def opening(self) -> dict[str, Any]:
        return {**self._envelope(), "choices": [self._choice("", None)]}

    def chunks(self, event: StreamEvent) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            lp = None
            if event.logprobs:
                lp = completion_logprobs(list(event.logprobs), self._text_offset)
            self._text_offset += len(event.text)
            return [{**self._envelope(), "choices": [self._choice(event.text, None, lp)]}]
        if not isinstance(event, Finished):
            return []
        out = [{**self._envelope(), "choices": [self._choice(event.text, _finish_reason(event))]}]
        if self.include_usage:
            out.append({**self._envelope(), "choices": [], **_usage_fields(event)})
        return out


def _usage_fields(finish: Finished) -> dict[str, Any]:
    """`usage`, plus a KV3D extension saying where the prompt's KV came from (clients that do
    not know it ignore it): `miss`, `hot` (shared cells) or `snapshot` (object store)."""
    if finish.session_resume_s is not None:
        source = "session"
    elif finish.snapshot_restore_s is not None:
        source = "snapshot"
    else:
        source = "hot" if finish.usage.cached_tokens else "miss"
    ext = {"prefix_source": source}
    if finish.session_tier is not None:
        ext["session_resumed_from"] = finish.session_tier
        ext["session_resume_ms"] = round(1000 * (finish.session_resume_s or 0.0), 3)
    if finish.replica_id is not None:
        ext["replica"] = finish.replica_id
    return {"usage": usage_dict(finish.usage), "kv3d": ext}


def _finish_reason(finish: Finished) -> str:
    return "length" if finish.reason == "length" else "stop"


def _chat_finish_reason(finish: Finished, called: bool) -> str:
    return "tool_calls" if called and finish.reason != "length" else _finish_reason(finish)


def _tool_call(call: Call, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI returns it (streamed, with its `index` among the answer's calls)."""
    out: dict[str, Any] = {} if index is None else {"index": index}
    out.update(
        id=call.id, type="function", function={"name": call.name, "arguments": call.arguments}
    )
    return out


# --- errors ------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the API")
        err = APIError(500, "internal server error", type="server_error")
        return JSONResponse(err.body(), status_code=500)
