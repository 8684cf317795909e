"""OpenAI-compatible HTTP server on the agentspec engine (``agentspec serve``).

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as server-sent
events, or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). The session
whose cache drafts for a request is named by the ``X-Session-Id`` header or else the request's
``user`` field; each response carries its speculation statistics under the extra key
``agentspec`` (unless the server hides them). ``temperature`` omitted means greedy decoding.

``n`` > 1 (not streamed, ``temperature`` > 0): the ``n`` choices are sampled together by one
best-of-N search over the prompt's KV, held once (:func:`.choices.sample_choices`); usage counts
the prompt once and sums the choices' completion tokens; ``agentspec`` carries the search's statistics.

Tenants: each API key may name a tenant; a tenant's requests run on ``engine.for_tenant(name)``,
so its session ids, session trees and (unless ``share_global``) global tree are its own. The key
is checked before the body is read.

Admission: at most ``max_queue + 1`` generations are in flight (more get 503 with
``Retry-After``); the engine's own lock serialises the model, step by step, so admitted
generations advance in turn. A streaming client that disconnects cancels its generation.

Limits one request cannot pass: the compute cap ``n`` x (prompt tokens + ``max_tokens``)
(``max_request_tokens``; the engine serves one request at a time, so this bounds everyone's wait),
and the grammar budgets (:class:`~agentspec.engine.grammar_budget.GrammarLimits`): a grammar is
compiled before generating, in a worker process a disconnecting client stops. Each is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from agentspec.stores import SessionDamagedError, TokenizerMismatchError
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentspec.engine.grammar_budget import GrammarBudgetError, GrammarLimits
from agentspec.engine.grammar_worker import CompileCancelled

from .choices import Choices, sample_choices
from .common import PreparedPrompt, openai_logprobs, prepare_prompt
from .metrics import RequestMetrics, ServerMetrics
from .middleware import Authenticate, BodyLimit, parse_api_keys
from .openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_text,
    error_responses,
    sampling_options,
    session_id,
    validation_error,
)
from .toolcalls import finish_reason as call_finish_reason
from .toolcalls import tool_call_format

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_REQUEST_TOKENS = 16384  # n x (prompt tokens + max_tokens): the compute one request may hold
_DONE = object()


# ---------------------------------------------------------------------------------------- memory
def _glibc() -> Any:
    """glibc through ctypes (``None`` elsewhere: musl, macOS), for ``malloc_trim`` and ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.mallopt.argtypes = [ctypes.c_size_t], [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (one per thread by default, up to 8 per core): memory a burst of requests
    freed in one arena is not reused by another, so many arenas keep a burst's peak. Call at start-up."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


# ---------------------------------------------------------------------------------------- admission
class QueueFull(Exception):
    pass


class Admission:
    """At most ``max_queue + 1`` requests in flight (one generating, the rest waiting their turn).

    A request takes a :class:`Ticket` synchronously, so a full server answers 503 before any
    response starts. There is no lock here: admitted generations interleave on the engine,
    whose lock serialises each step. Engine calls run in a thread pool with one thread per place.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.limit = max_queue + 1
        self.in_flight = 0
        self.served = 0
        self.rejected = 0
        self.executor = ThreadPoolExecutor(max_workers=self.limit + 1, thread_name_prefix="agentspec-engine")

    def admit(self) -> Ticket:
        """A place; raises :class:`QueueFull` when ``max_queue + 1`` requests are already in flight."""
        if self.in_flight >= self.limit:
            self.rejected += 1
            raise QueueFull
        self.in_flight += 1
        return Ticket(self)

    async def run(self, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` in an engine thread."""
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def idle(self) -> None:
        """The last request in flight finished: hand freed heap memory back to the system (in a thread)."""
        if _LIBC is not None:
            self.executor.submit(_LIBC.malloc_trim, 0)


class Ticket:
    """A place in flight; ``release()`` gives it back (idempotent)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.in_flight -= 1
            self._admission.served += 1
            if self._admission.in_flight == 0:
                self._admission.idle()


class _EngineStream:
    """An engine stream driven from the event loop: each ``next()`` runs in an engine thread.

    ``close()`` runs after a ``next()`` still in progress, never beside it (a generator cannot be
    closed while it runs), and cancels the generation.
    """

    def __init__(self, admission: Admission, stream: Any) -> None:
        self._admission, self.stream = admission, stream
        self._pending: Future | None = None

    async def next(self) -> Any:
        self._pending = self._admission.executor.submit(next, self.stream, _DONE)
        return await asyncio.wrap_future(self._pending)

    def close(self) -> None:
        def close(_: Any = None) -> None:
            self._admission.executor.submit(self.stream.close)

        if self._pending is None or self._pending.done():
            close()
        else:
            self._pending.add_done_callback(close)


# ---------------------------------------------------------------------------------------- app
def create_app(
    engine: Any,
    *,
    model_name: str | None = None,
    api_keys: str | Mapping[str, str | None] | None = None,
    share_global: bool = False,
    hide_stats: bool = False,
    max_tokens_cap: int | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = 512,
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS,
    grammar_limits: GrammarLimits | None = None,
    tool_call_parser: str | None = None,
    auto_tool_grammar: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (default: the engine's name).

    ``api_keys``: ``None`` (open), one bare key, or ``{key: tenant name}`` (see
    :func:`~agentspec.integrations.middleware.parse_api_keys`); every ``/v1`` request then needs
    ``Authorization: Bearer <key>``. ``share_global``: tenants draft from one pooled global tree.
    ``hide_stats``: no speculation statistics in responses. ``max_tokens_cap``: a request asking
    for more tokens gets a 400 naming the cap. ``max_request_tokens``: the compute cap, ``n`` x
    (prompt tokens + max_tokens) of one request (more is a 400 naming it; ``None``: no cap).
    ``grammar_limits``: budgets on the grammar work of structured output and tool calls.
    ``tool_call_parser``: the call syntax read from answers
    (:data:`.toolcalls.PARSERS`; ``None`` = the chat template's). ``auto_tool_grammar``: with
    ``tool_choice`` "auto", a call the model starts is held to its tool's schema by the grammar.
    """
    if tool_call_parser is not None:
        tool_call_format(tool_call_parser)  # a ValueError naming the parsers, before anything is served
    keys = parse_api_keys([api_keys]) if isinstance(api_keys, str) else dict(api_keys or {})
    if grammar_limits is not None:
        engine.set_grammar_limits(grammar_limits)
    tenants = {name: engine.for_tenant(name, share_global=share_global)
               for name in sorted({n for n in keys.values() if n is not None})}
    served = model_name or engine.model_name
    admission = Admission(max_queue)
    metrics = ServerMetrics(lambda: admission.in_flight)
    tokenizer_lock = threading.Lock()  # HF fast tokenizers must not encode from two threads at once
    limits = {"default_max_tokens": default_max_tokens, "max_tokens_cap": max_tokens_cap}
    app = FastAPI(title="agentspec", version="0.1.0",
                  description="OpenAI-compatible completions with lossless speculative decoding.")
    app.state.engine, app.state.admission, app.state.model_name = engine, admission, served
    app.state.tenants = tenants  # tenant name -> its engine

    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(exc))
    app.add_exception_handler(StarletteHTTPException, lambda request, exc: APIError(
        exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error",
    ).response())
    app.add_exception_handler(Exception, lambda request, exc: APIError(
        500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error").response())
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Authenticate, keys=keys)  # outermost: no body is read before the key is checked
    routes = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=routes)

    def tenant_engine(request: Request) -> Any:
        return tenants.get(request.scope.get("state", {}).get("tenant"), engine)

    def accept(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Any:
        """The engine of the request's tenant, once the body's text and model are known to be fine."""
        check_text(body.model_dump(exclude_none=True))
        _check_model(body.model, served)
        return tenant_engine(request)

    def tokenize(fn: Callable[[], Any]) -> Callable[[], Any]:
        def locked() -> Any:
            with tokenizer_lock:
                return fn()
        return locked

    async def run(body: Any, request: Request, header_session: str | None, prepared: PreparedPrompt,
            kind: Literal["chat", "text"]) -> Any:
        target = tenant_engine(request)
        params = {**sampling_options(body, **limits, vocab_size=getattr(target, "vocab_size", None)),
                  "stop": prepared.stop, "session": session_id(header_session, body.user)}
        grammar_param = "response_format"
        if prepared.grammar is not None:  # a forced or chosen tool call's grammar comes first
            params["grammar"], grammar_param = prepared.grammar, "tools"
        _check_compute(body.n or 1, len(prepared.prompt_ids), params["max_new_tokens"], target.context_window,
                       max_request_tokens)
        if "grammar" in params and (body.n or 1) == 1:
            ticket = _reserve(admission)  # the compile holds a place: the queue bounds compiles too
            try:
                await _compile_grammar(admission, target, params["grammar"], request, grammar_param)
            finally:
                ticket.release()

        def token_text(token: int) -> str:
            with tokenizer_lock:
                return target.tokenizer.decode([token])

        response = _Responses(kind, served, params["session"], hide_stats, token_text)
        if (body.n or 1) > 1:  # not streamed (sampling_options refuses that)
            return await _sample_n(response, admission, target, prepared, params, body.n)
        generation = _Generation(admission, metrics, target, prepared, params, _reserve(admission))
        if body.stream:
            include_usage = body.stream_options.include_usage if body.stream_options else None
            events = _sse(response, generation, include_usage)
            weakref.finalize(events, generation.ticket.release)  # a response that never starts frees its place
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(response, generation, request)

    @app.get("/health", responses=error_responses(413))
    async def health() -> dict:
        """Liveness and admission state."""
        return {"status": "ok", "model": served, "in_flight": admission.in_flight, "limit": admission.limit,
                "served": admission.served, "rejected": admission.rejected}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        """Prometheus metrics (text exposition format), summed over all tenants."""
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", responses=error_responses(401, 413))
    async def models() -> dict:
        """The one served model."""
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id}", responses=error_responses(401, 404, 413, 422))
    async def model(model_id: str) -> dict:
        _check_model(model_id, served)
        return _model_card(served)

    @app.post("/v1/chat/completions", responses=_stream_responses("chat.completion"))
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               x_session_id: Annotated[str | None, Header()] = None) -> Any:
        """Create a chat completion (``stream: true`` for server-sent events)."""
        target = accept(body, request)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
        try:
            prepared = await admission.run(tokenize(lambda: prepare_prompt(
                target.tokenizer, messages, tools=tools, tool_choice=tool_choice, stop=body.stop,
                context_window=target.context_window, constrain=True, auto_grammar=auto_tool_grammar,
                tool_parser=tool_call_parser)))
        except ValueError as exc:
            param = "tool_choice" if "tool_choice" in str(exc) else "messages"
            raise APIError(400, str(exc), param=param, code="invalid_prompt") from exc
        return await run(body, request, x_session_id, prepared, "chat")

    @app.post("/v1/completions", responses=_stream_responses("text_completion"))
    async def completions(body: CompletionRequest, request: Request,
                          x_session_id: Annotated[str | None, Header()] = None) -> Any:
        """Create a text completion of a plain prompt (no chat template; ``stream: true`` for events)."""
        target = accept(body, request)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await admission.run(tokenize(lambda: target.tokenizer.encode(prompt)))
        else:
            prompt_ids = list(prompt)
        if not prompt_ids:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_prompt")
        if len(prompt_ids) >= target.context_window:
            raise APIError(400, f"prompt is {len(prompt_ids)} tokens but the model's context window is "
                                f"{target.context_window} tokens", param="prompt", code="invalid_prompt")
        stops = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or () if s]
        return await run(body, request, x_session_id, PreparedPrompt(prompt_ids, stop=stops, parse_tools=False), "text")

    return app


def _stream_responses(obj: str) -> dict:
    return {200: {"description": f"A {obj}, or with stream=true {obj} chunk events",
                  "content": {"text/event-stream": {"schema": {
                      "type": "object", "properties": {"data": {"type": "string"}}}}}},
            **error_responses(400, 401, 404, 413, 422, 503)}


def _reserve(admission: Admission) -> Ticket:
    try:
        return admission.admit()
    except QueueFull as exc:
        raise APIError(503, f"the server is busy: {admission.limit} requests are already in flight, retry later",
                       "server_busy", code="queue_full", headers={"Retry-After": "1"}) from exc


def _check_compute(n: int, prompt_tokens: int, max_tokens: int, context_window: int, cap: int | None) -> None:
    """400 when ``n`` x (prompt tokens + max_tokens) is over the compute cap (the engine serves one request
    at a time, so this bounds how long one request holds every other client)."""
    generated = max(1, min(max_tokens, context_window - prompt_tokens))
    work = n * (prompt_tokens + generated)
    if cap is not None and work > cap:
        raise APIError(400, f"this request asks for {work} tokens of compute (n {n} x (prompt {prompt_tokens} + "
                            f"max_tokens {generated})), over this server's cap of {cap} (max_request_tokens)",
                       param="n" if n > 1 else "prompt" if prompt_tokens > generated else "max_tokens",
                       code="over_compute_cap")


async def _compile_grammar(admission: Admission, engine: Any, grammar: Any, request: Request, param: str) -> None:
    """Compile ``grammar`` before generating (the engine then finds it cached): over a budget or invalid,
    a 400 naming it; a client that goes away stops the compile (its worker process is killed)."""
    compiler_of = getattr(engine, "grammar_compiler", None)
    if compiler_of is None:  # an engine without grammars (test doubles) checks nothing here
        return
    cancel = threading.Event()
    done = asyncio.wrap_future(admission.executor.submit(lambda: compiler_of().compile(grammar, cancel)))
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=0.1)
            if not done.done() and await request.is_disconnected():
                cancel.set()
        done.result()
    except asyncio.CancelledError:
        cancel.set()
        raise
    except CompileCancelled:
        raise APIError(499, "the client went away while its grammar compiled", code="cancelled") from None
    except GrammarBudgetError as exc:
        raise APIError(400, str(exc), param=param, code="grammar_over_budget") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_grammar") from exc


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "agentspec"}


def _check_model(model: str, served: str) -> None:
    if model != served:
        raise APIError(404, f"model {model!r} does not exist; this server serves {served!r}", "not_found_error",
                       param="model", code="model_not_found")


# ---------------------------------------------------------------------------------------- generation
class _Generation:
    """One admitted generation: the engine stream behind a ticket, and what it reports."""

    def __init__(self, admission: Admission, metrics: ServerMetrics, engine: Any, prepared: PreparedPrompt,
                 params: dict, ticket: Ticket) -> None:
        self.admission, self.metrics, self.engine = admission, metrics, engine
        self.prepared, self.params, self.ticket = prepared, params, ticket

    async def events(self, request: Request | None) -> AsyncIterator[Any]:
        """Content deltas (str), then ``(rest, tool_calls, invalid, result)`` once done.

        Engine errors caused by the request become :class:`APIError`; closing this generator (a
        cancelled request) cancels the generation.
        """
        t0 = time.perf_counter()
        stream: _EngineStream | None = None
        splitter = self.prepared.splitter()
        try:
            with _request_errors(self.params["session"]):
                stream = _EngineStream(self.admission, await self.admission.run(
                    lambda: self.engine.stream(self.prepared.prompt_ids, **self.params)))
                while True:
                    delta = await stream.next()
                    if delta is _DONE:
                        break
                    if t0:
                        self.metrics.first_token.observe(time.perf_counter() - t0)
                        t0 = 0.0
                    if request is not None and await request.is_disconnected():
                        return
                    text = splitter.feed(delta)
                    if text:
                        yield text
        finally:
            if stream is not None:
                stream.close()
        result = stream.stream.result
        self.metrics.finished(result.stats)
        yield (*splitter.finish(result.finish_reason), result)


@contextmanager
def _request_errors(session: str | None) -> Iterator[None]:
    """Engine errors caused by the request, as :class:`APIError` (400)."""
    try:
        yield
    except TokenizerMismatchError as exc:
        raise APIError(400, f"session {session!a} was written by another tokenizer: {exc}",
                       param="user", code="session_tokenizer_mismatch") from exc
    except SessionDamagedError as exc:  # the store's fault, not the request's: the operator repairs it
        raise APIError(503, f"session {session!a} is damaged in the session store ({exc}); the server's operator "
                       "can rebuild it with `agentspec sessions check --repair`", param="user",
                       code="session_damaged") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_request") from exc


async def _sample_n(response: _Responses, admission: Admission, engine: Any, prepared: PreparedPrompt,
                    params: dict, n: int) -> dict:
    """``n`` choices from one best-of-N search, run behind a ticket like any generation (not cancellable)."""
    ticket = _reserve(admission)
    options = {k: params[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    try:
        with _request_errors(params["session"]):
            result = await admission.run(lambda: sample_choices(engine, prepared, n, session=params["session"],
                                                                **options))
    finally:
        ticket.release()
    return response.many(result)


async def _complete(response: _Responses, generation: _Generation, request: Request) -> Any:
    deltas, final = [], None
    try:
        async for event in generation.events(request):
            if isinstance(event, str):
                deltas.append(event)
            else:
                final = event
    finally:
        generation.ticket.release()
    if final is None:  # the client went away
        return JSONResponse({}, status_code=499)
    return response.full("".join(deltas), *final)


async def _sse(response: _Responses, generation: _Generation, include_usage: bool | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; always ends with ``[DONE]`` (after an error event if one)."""
    try:
        if response.kind == "chat":
            yield response.chunk({"role": "assistant", "content": ""})
        async for event in generation.events(None):
            if isinstance(event, str):
                yield response.chunk({"content": event})
            else:
                for chunk in response.last_chunks(*event, include_usage=include_usage):
                    yield chunk
    except APIError as exc:
        yield _event(exc.body(), ensure_ascii=True)
    except Exception as exc:  # noqa: BLE001 - a stream must still end with an error event and [DONE]
        yield _event(APIError(500, f"internal error: {type(exc).__name__}", "server_error",
                              code="internal_error").body(), ensure_ascii=True)
    finally:
        generation.ticket.release()
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------- responses
class _Responses:
    """Builds the OpenAI response objects of one completion: chat (``chat.completion``) or text."""

    def __init__(self, kind: Literal["chat", "text"], model: str, session: str | None, hide_stats: bool,
                 token_text: Callable[[int], str]) -> None:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.kind, self.model, self.session, self.hide_stats = kind, model, session, hide_stats
        self.token_text = token_text
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, chunk: bool) -> dict:
        obj = "text_completion" if self.kind == "text" else "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(result: Any) -> dict:
        out = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": out,
                "total_tokens": result.prompt_tokens + out}

    def extra(self, result: Any) -> dict:
        """The ``agentspec`` key: session and speculation statistics (nothing when they are hidden)."""
        return {} if self.hide_stats else {"agentspec": {"session_id": self.session, "stats": result.stats.to_dict()}}

    @staticmethod
    def content_and_calls(rest: str, calls: list[dict], invalid: list[dict]) -> tuple[str, list[dict]]:
        """Final content (invalid calls stay text as the model wrote them: OpenAI has no invalid tool calls;
        a call cut by max_tokens is its partial text) and tool calls."""
        if invalid:
            rest = "\n".join(x for x in [rest, *(c["text"] for c in invalid)] if x)
        tool_calls = [{"id": c["id"], "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in calls]
        return rest, tool_calls

    @staticmethod
    def finish_reason(calls: list[dict], result: Any) -> str:
        return call_finish_reason(calls, result.finish_reason)

    def full(self, streamed: str, rest: str, calls: list[dict], invalid: list[dict], result: Any) -> dict:
        rest, tool_calls = self.content_and_calls(rest, calls, invalid)
        choice = self.choice(0, streamed + rest, tool_calls, self.finish_reason(calls, result), self.logprobs(result))
        return {**self._base(False), "choices": [choice], "usage": self.usage(result), **self.extra(result)}

    def many(self, result: Choices) -> dict:
        """The response of ``n`` > 1: the choices indexed 0..n-1, their summed usage, the search's statistics."""
        choices = [self.choice(i, *self.content_and_calls(c.content, c.tool_calls, c.invalid_tool_calls),
                               c.finish_reason) for i, c in enumerate(result.choices)]
        return {**self._base(False), "choices": choices, "usage": result.usage(), **self.extra(result)}

    def logprobs(self, result: Any) -> dict | None:
        """The result's token logprobs in this response kind's shape (None unless the request asked)."""
        return openai_logprobs(self.kind, getattr(result, "logprobs", None), self.token_text)

    def choice(self, index: int, content: str, tool_calls: list[dict], finish: str,
               logprobs: dict | None = None) -> dict:
        if self.kind == "text":
            return {"text": content, "index": index, "logprobs": logprobs, "finish_reason": finish}
        message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None,
              **extra: Any) -> str:
        if self.kind == "text":
            choice = {"text": delta.get("content", ""), "index": 0, "logprobs": logprobs,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return _event({**self._base(True), "choices": [choice], **extra})

    def last_chunks(self, rest: str, calls: list[dict], invalid: list[dict], result: Any,
                    include_usage: bool | None) -> list[str]:
        """The events after the streamed deltas: the rest, tool calls, finish reason, usage."""
        rest, tool_calls = self.content_and_calls(rest, calls, invalid)
        out = []
        if rest:
            out.append(self.chunk({"content": rest}))
        if tool_calls:
            out.append(self.chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(tool_calls)]}))
        finish = self.finish_reason(calls, result)
        logprobs = self.logprobs(result)  # every token's, with the finish reason (clients concatenate them)
        if include_usage:  # OpenAI's way: one more chunk, no choices
            out.append(self.chunk({}, finish, logprobs, **self.extra(result)))
            out.append(_event({**self._base(True), "choices": [], "usage": self.usage(result)}))
        else:
            out.append(self.chunk({}, finish, logprobs, usage=self.usage(result), **self.extra(result)))
        return out


def _event(obj: dict, ensure_ascii: bool = False) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii)}\n\n"
