"""OpenAI-compatible HTTP server on the agentspec engine (``agentspec serve``).

Endpoints: ``POST /v1/chat/completions`` (streaming as server-sent events, or not),
``GET /v1/models``, ``GET /health``. The session whose cache drafts for a request is named by
the ``X-Session-Id`` header or else the request's ``user`` field; each response carries its
speculation statistics under the extra key ``agentspec``.

One model generates one answer at a time: requests wait in a bounded queue (full -> 503 with
``Retry-After``), the engine runs in one worker thread, and a streaming client that disconnects
cancels its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentspec.engine.constraints import Grammar

from .common import PreparedPrompt, ToolCallSplitter, prepare_prompt, raw_block

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_QUEUE = 16


# ---------------------------------------------------------------------------------------- schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (output constrained by a grammar)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema: {name, schema}")
        return self


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatCompletionRequest(_Strict):
    """The OpenAI chat-completions request fields this server supports (others are rejected)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (a JSON key) -> bias
    top_k: int | None = Field(default=None, ge=0)  # not OpenAI's: send through extra_body
    repetition_penalty: float | None = Field(default=None, gt=0)  # not OpenAI's: send through extra_body


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""

    error: ErrorDetail


def _errors(*statuses: int) -> dict:
    """OpenAPI documentation of the error responses a route can give."""
    what = {400: "Bad request (malformed JSON, prompt over the context window, bad tool_choice)",
            401: "Missing or wrong API key", 404: "Unknown model", 413: "Request body too large",
            422: "Invalid request fields", 503: "Queue full; see Retry-After"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return APIError(400, f"request body is not valid JSON: {detail.get('ctx', {}).get('error', detail['msg'])}",
                        code="invalid_json").response()
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}" + (f" (got {e['input']!r:.60})" if "input" in e else ""))
    param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
    return APIError(422, "invalid request: " + "; ".join(parts), param=param or None,
                    code="invalid_request").response()


# ---------------------------------------------------------------------------------------- queue
class QueueFull(Exception):
    pass


class Scheduler:
    """One generation at a time, at most ``max_queue`` requests waiting; engine work in one thread.

    A request first takes a :class:`Ticket` (synchronously, so a full queue is an HTTP 503 before
    any response starts), then waits for its turn with ``async with ticket:``.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.waiting = 0
        self.running = 0
        self.served = 0
        self.rejected = 0
        self._slot = asyncio.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentspec-engine")

    def reserve(self) -> Ticket:
        """A place in the queue; raises :class:`QueueFull` when ``max_queue`` requests already wait."""
        if self.waiting >= self.max_queue:
            self.rejected += 1
            raise QueueFull
        self.waiting += 1
        return Ticket(self)

    async def run(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` in the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


class Ticket:
    """A reserved place in the queue. ``async with ticket:`` waits for and holds the engine;
    ``cancel()`` gives an unused place back (idempotent)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._waiting = True

    def cancel(self) -> None:
        if self._waiting:
            self._waiting = False
            self._scheduler.waiting -= 1

    async def __aenter__(self) -> Ticket:
        s = self._scheduler
        try:
            await s._slot.acquire()
        finally:
            self.cancel()
        s.running += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        s = self._scheduler
        s.running -= 1
        s.served += 1
        s._slot.release()


# ---------------------------------------------------------------------------------------- body size
class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes`` (declared or actually sent)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body is larger than the limit of {self.max_bytes} bytes",
                             code="body_too_large").response()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
        first = {"type": "http.request", "body": b"".join(body), "more_body": False}
        await self.app(scope, _replay([first], receive), send)


def _replay(messages: list[dict], receive: Callable) -> Callable:
    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return replay


# ---------------------------------------------------------------------------------------- app
def create_app(
    engine: Any,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    default_max_tokens: int = 512,
) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``model_name`` (default: the engine's name).

    ``api_key``: when set, every ``/v1`` request needs ``Authorization: Bearer <api_key>``.
    """
    served = model_name or engine.model_name
    scheduler = Scheduler(max_queue)
    tokenizer_lock = threading.Lock()
    app = FastAPI(title="agentspec", version="0.1.0",
                  description="OpenAI-compatible chat completions with lossless speculative decoding.")
    app.state.engine, app.state.scheduler, app.state.model_name = engine, scheduler, served

    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: _validation_error(exc))
    app.add_exception_handler(StarletteHTTPException, lambda request, exc: APIError(
        exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error",
    ).response())
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health", responses=_errors(413))
    async def health() -> dict:
        """Liveness and queue state."""
        return {"status": "ok", "model": served, "waiting": scheduler.waiting, "running": scheduler.running,
                "served": scheduler.served, "rejected": scheduler.rejected}

    @app.get("/v1/models", dependencies=[Depends(authorize)], responses=_errors(401, 413))
    async def models() -> dict:
        """The one served model."""
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorize)], responses=_errors(401, 404, 413, 422))
    async def model(model_id: str) -> dict:
        _check_model(model_id, served)
        return _model_card(served)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)],
              responses={200: {"description": "A chat.completion, or with stream=true chat.completion.chunk events",
                               "content": {"text/event-stream": {"schema": {
                                   "type": "object", "properties": {"data": {"type": "string"}}}}}},
                         **_errors(400, 401, 404, 413, 422, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               x_session_id: Annotated[str | None, Header()] = None) -> Any:
        """Create a chat completion (``stream: true`` for server-sent events)."""
        _check_model(body.model, served)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice

        def prepare() -> PreparedPrompt:
            with tokenizer_lock:
                return prepare_prompt(engine.tokenizer, messages, tools=tools, tool_choice=tool_choice,
                                      stop=body.stop, context_window=engine.context_window,
                                      constrain=hasattr(engine, "grammar_compiler"))

        try:
            prepared = await asyncio.to_thread(prepare)
        except ValueError as exc:
            param = "tool_choice" if "tool_choice" in str(exc) else "messages"
            raise APIError(400, str(exc), param=param, code="invalid_prompt") from exc
        params = {
            "session": x_session_id or body.user,
            "max_new_tokens": body.max_completion_tokens or body.max_tokens or default_max_tokens,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "seed": body.seed,
            "stop": prepared.stop,
            **_processing(body, prepared),
        }
        completion = _Completion(served, params["session"])
        ticket = _reserve(scheduler)
        if body.stream:
            include_usage = body.stream_options.include_usage if body.stream_options else None
            events = _sse(completion, scheduler, ticket, engine, prepared, params, include_usage)
            weakref.finalize(events, ticket.cancel)  # a response that never starts frees its place
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result, deltas = None, []
        try:
            async with ticket:
                splitter = ToolCallSplitter(prepared.parse_tools, prepared.prefix)
                async for event in _generate(scheduler, engine, prepared, params, splitter, request):
                    if isinstance(event, str):
                        deltas.append(event)
                    else:
                        result = event
        finally:
            ticket.cancel()
        if result is None:  # the client went away
            return JSONResponse({}, status_code=499)
        response = completion.full_response("".join(deltas), *result)
        response["choices"][0]["logprobs"] = _logprobs(engine.tokenizer, result[-1])
        return response

    return app


def _processing(body: ChatCompletionRequest, prepared: PreparedPrompt) -> dict:
    """Engine arguments for the logits processors and the output grammar, only those the request sets."""
    out: dict[str, Any] = {}
    for name in ("top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(body, name) is not None:
            out[name] = getattr(body, name)
    if body.logprobs:
        out["logprobs"] = body.top_logprobs or 0
    grammar = prepared.grammar  # a forced or chosen tool call's grammar comes first
    if grammar is None and body.response_format is not None and body.response_format.type != "text":
        try:
            grammar = Grammar.from_response_format(body.response_format.model_dump(by_alias=True, exclude_none=True))
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from exc
    if grammar is not None:
        out["grammar"] = grammar
    return out


def _logprobs(tokenizer: Any, result: Any) -> dict | None:
    """OpenAI's ``choice.logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    if getattr(result, "logprobs", None) is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in result.logprobs]}


def _reserve(scheduler: Scheduler) -> Ticket:
    try:
        return scheduler.reserve()
    except QueueFull as exc:
        raise APIError(503, f"the server is busy: {scheduler.max_queue} requests are already waiting, retry later",
                       "server_busy", code="queue_full", headers={"Retry-After": "1"}) from exc


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "agentspec"}


def _check_model(model: str, served: str) -> None:
    if model != served:
        raise APIError(404, f"model {model!r} does not exist; this server serves {served!r}", "not_found_error",
                       param="model", code="model_not_found")


async def _generate(scheduler: Scheduler, engine: Any, prepared: PreparedPrompt, params: dict,
                    splitter: ToolCallSplitter, request: Request | None) -> AsyncIterator[Any]:
    """Content deltas (str), then ``(rest, tool_calls, invalid, result)`` once done.

    Runs the engine in the scheduler's thread; closing this generator (a cancelled request)
    closes the engine stream there, which cancels the generation.
    """
    try:
        stream = await scheduler.run(lambda: engine.stream(prepared.prompt_ids, **params))
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_request") from exc
    splitter.feed(prepared.prefix)
    done = object()
    try:
        while True:
            delta = await scheduler.run(next, stream, done)
            if delta is done:
                break
            if request is not None and await request.is_disconnected():
                return
            text = splitter.feed(delta)
            if text:
                yield text
    finally:
        scheduler.executor.submit(stream.close)  # after any next() still running in that thread
    rest, calls, invalid = splitter.finish()
    yield (rest, calls, invalid, stream.result)


class _Completion:
    """Builds the OpenAI response objects of one completion."""

    def __init__(self, model: str, session: str | None) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.session = session

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(result: Any) -> dict:
        out = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": out,
                "total_tokens": result.prompt_tokens + out}

    def extra(self, result: Any) -> dict:
        return {"session_id": self.session, "stats": result.stats.to_dict()}

    @staticmethod
    def content_and_calls(rest: str, calls: list[dict], invalid: list[dict]) -> tuple[str, list[dict]]:
        """Final content (invalid blocks stay text: OpenAI has no invalid tool calls) and tool calls."""
        if invalid:
            rest = "\n".join(x for x in [rest, *map(raw_block, invalid)] if x)
        tool_calls = [{"id": c["id"], "type": "function",
                       "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                      for c in calls]
        return rest, tool_calls

    @staticmethod
    def finish_reason(calls: list[dict], result: Any) -> str:
        return "tool_calls" if calls else result.finish_reason

    def full_response(self, streamed: str, rest: str, calls: list[dict], invalid: list[dict], result: Any) -> dict:
        rest, tool_calls = self.content_and_calls(rest, calls, invalid)
        message: dict[str, Any] = {"role": "assistant", "content": (streamed + rest) or (None if calls else "")}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason(calls, result)}
        return {**self._base("chat.completion"), "choices": [choice], "usage": self.usage(result),
                "agentspec": self.extra(result)}

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _event({**self._base("chat.completion.chunk"), "choices": [choice], **extra})


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(completion: _Completion, scheduler: Scheduler, ticket: Ticket, engine: Any, prepared: PreparedPrompt,
               params: dict, include_usage: bool | None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, generated when the ticket's turn comes."""
    try:
        async with ticket:
            async for event in _sse_events(completion, scheduler, engine, prepared, params, include_usage):
                yield event
    except APIError as exc:
        yield _event({"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}})
    finally:
        ticket.cancel()
    yield "data: [DONE]\n\n"


async def _sse_events(completion: _Completion, scheduler: Scheduler, engine: Any, prepared: PreparedPrompt,
                      params: dict, include_usage: bool | None) -> AsyncIterator[str]:
    yield completion.chunk({"role": "assistant", "content": ""})
    splitter = ToolCallSplitter(prepared.parse_tools, prepared.prefix)
    async for event in _generate(scheduler, engine, prepared, params, splitter, None):
        if isinstance(event, str):
            yield completion.chunk({"content": event})
            continue
        rest, calls, invalid, result = event
        rest, tool_calls = completion.content_and_calls(rest, calls, invalid)
        if rest:
            yield completion.chunk({"content": rest})
        if tool_calls:
            yield completion.chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(tool_calls)]})
        finish = completion.finish_reason(calls, result)
        if include_usage:  # OpenAI's way: one more chunk, no choices
            yield completion.chunk({}, finish, agentspec=completion.extra(result))
            yield _event({**completion._base("chat.completion.chunk"), "choices": [],
                          "usage": completion.usage(result)})
        else:
            yield completion.chunk({}, finish, usage=completion.usage(result), agentspec=completion.extra(result))
