"""The OpenAI request schemas the server accepts, its error shape, and request-to-engine translation.

Requests are validated in two stages: pydantic checks types and ranges (a 422 naming the field),
then :func:`sampling_options` turns the OpenAI parameters into :meth:`Engine.stream` keyword
arguments. Parameters that the schema accepts but the engine cannot honour yet are refused there
with a 400 ``"not supported yet: ..."``; that function is the one place where new engine features
(structured output, logits processors, ``n``) plug into the HTTP surface.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from agentspec.stores import check_name
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from agentspec import chat
from agentspec.config import REPETITION_PENALTY_RANGE, TEMPERATURE_FLOOR, check_logit_bias
from agentspec.engine.constraints import Grammar


# ---------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSONResponse(self.body(), status_code=self.status, headers=self.headers)


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error that quotes a client's lone surrogate still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS = {
    400: "Bad request (malformed JSON, prompt over the context window, bad tool_choice, invalid text, "
         "a parameter not supported yet, max_tokens over the cap, a session of another tokenizer)",
    401: "Missing or wrong API key", 404: "Unknown model", 413: "Request body too large",
    422: "Invalid request fields", 503: "Queue full (see Retry-After), or the session is damaged in the store",
}


def error_responses(*statuses: int) -> dict:
    """OpenAPI documentation of the error responses a route can give."""
    return {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """pydantic's errors as one OpenAI-shaped 422 (400 for a body that is not JSON at all)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return APIError(400, f"request body is not valid JSON: {detail.get('ctx', {}).get('error', detail['msg'])}",
                        code="invalid_json").response()
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        got = f" (got {ascii(e['input']):.60})" if "input" in e else ""
        parts.append(f"{loc or 'body'}: {e.get('msg')}{got}")
    param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
    return APIError(422, "invalid request: " + "; ".join(parts), param=param or None,
                    code="invalid_request").response()


def check_text(value: Any, where: str = "body") -> None:
    """400 for a lone UTF-16 surrogate in any string of ``value`` (JSON allows ``"\\ud800"``; text does not)."""
    if isinstance(value, str):
        try:
            chat.check_text(value, where)
        except ValueError as exc:
            raise APIError(400, f"{exc}: send valid Unicode text", param=where, code="invalid_text") from exc
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_text(item, f"{where}.{i}")


def session_id(header: str | None, user: str | None) -> str | None:
    """The session named by the ``X-Session-Id`` header, else by ``user``; 400 if a store cannot keep it.

    The header arrives as Latin-1 text (HTTP's default); its bytes are read again as UTF-8, so a limit
    counts characters the client sent, not bytes.
    """
    if header:
        try:
            header = header.encode("latin-1").decode("utf-8")
        except UnicodeError as exc:
            raise APIError(400, f"X-Session-Id is not valid UTF-8: {exc}", param="X-Session-Id",
                           code="invalid_session_id") from exc
    value, param = (header, "X-Session-Id") if header else (user, "user")
    if not value:
        return None
    try:
        return check_name(value, f"session id ({param})")
    except ValueError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_session_id") from exc


# ---------------------------------------------------------------------------------------- schemas
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


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2,
                                      description="Omitted, 0 or below 1e-5: greedy decoding.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, description="extra_body: keep the k most likely tokens (0 = off).")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(default=None, max_length=16)
    n: int | None = Field(default=None, ge=1, le=128)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, ge=REPETITION_PENALTY_RANGE[0],
                                             le=REPETITION_PENALTY_RANGE[1], description="extra_body; 1 = off.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Token id -> bias in [-100, 100].")
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    """The OpenAI chat-completions request fields this server knows (others are rejected)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    """The OpenAI (legacy) text-completions request: a plain prompt, no chat template."""

    prompt: str | list[str] | list[int] = Field(description="Text, a list of one text, or token ids.")
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)
    logprobs: int | None = Field(default=None, ge=0, le=5)


# ---------------------------------------------------------------------------------------- translation
def sampling_options(body: ChatCompletionRequest | CompletionRequest, *, default_max_tokens: int,
                     max_tokens_cap: int | None, vocab_size: int | None = None) -> dict[str, Any]:
    """:meth:`Engine.stream` keyword arguments for ``body`` (400 for what the engine cannot do yet).

    ``temperature`` omitted means greedy decoding (0), as in every other agentspec entry point, and
    so does a temperature below 1e-5 (dividing logits by it overflows); so ``n`` > 1 needs a
    ``temperature`` >= 1e-5 (and no streaming). ``logit_bias`` ids must be in ``[0, vocab_size)``.
    """
    unsupported = _not_supported_yet(body)
    if unsupported:
        raise APIError(400, "not supported yet: " + "; ".join(unsupported), param=unsupported[0].split()[0],
                       code="unsupported_parameter")
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens_cap is not None and requested is not None and requested > max_tokens_cap:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} is {requested}, over this server's cap of {max_tokens_cap} tokens",
                       param=param, code="max_tokens_over_cap")
    _check_n(body)
    default = default_max_tokens if max_tokens_cap is None else min(default_max_tokens, max_tokens_cap)
    return {
        "max_new_tokens": requested or default,
        "temperature": 0.0 if body.temperature is None or body.temperature < TEMPERATURE_FLOOR else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": body.top_k or 0,
        "seed": body.seed,
        **_processing(body, vocab_size),
        **_logprobs(body),
    }


def _logprobs(body: ChatCompletionRequest | CompletionRequest) -> dict[str, int]:
    """``{"logprobs": k}`` (each output token's logprob and its ``k`` most likely alternatives) when asked.

    Chat: ``logprobs: true`` with ``top_logprobs`` k (0 when omitted); text: ``logprobs`` k. The values
    are those of the processed distribution (after penalties, bias and the grammar, before temperature).
    """
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs",
                           code="invalid_request")
        return {"logprobs": body.top_logprobs or 0} if body.logprobs else {}
    return {} if body.logprobs is None else {"logprobs": body.logprobs}


def _processing(body: ChatCompletionRequest | CompletionRequest, vocab_size: int | None = None) -> dict[str, Any]:
    """Logits processors and the response_format grammar, only those the request sets."""
    out: dict[str, Any] = {}
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if getattr(body, name) is not None:
            out[name] = getattr(body, name)
    if body.logit_bias:
        try:
            out["logit_bias"] = check_logit_bias(body.logit_bias, vocab_size)
        except ValueError as exc:
            raise APIError(400, str(exc), param="logit_bias", code="invalid_logit_bias") from exc
    response_format = getattr(body, "response_format", None)
    if response_format is not None and response_format.type != "text":
        try:
            out["grammar"] = Grammar.from_response_format(response_format.model_dump(exclude_none=True))
        except ValueError as exc:
            raise APIError(400, str(exc), param="response_format") from exc
    return out


def _check_n(body: ChatCompletionRequest | CompletionRequest) -> None:
    """``n`` > 1 samples its choices together: it needs a temperature (greedy would repeat one answer n times)."""
    if (body.n or 1) == 1:
        return
    if not body.temperature or body.temperature < TEMPERATURE_FLOOR:
        raise APIError(400, f"n is {body.n} but temperature is {body.temperature or 0} (omitted or below 1e-5 means "
                            "greedy decoding here): n > 1 samples, set temperature >= 1e-5", param="temperature",
                       code="n_needs_temperature")
    if body.top_p not in (None, 1.0) or body.top_k:
        param = "top_k" if body.top_k else "top_p"
        raise APIError(400, f"n > 1 samples at a temperature only: {param} must be left out (top_p 1, top_k 0)",
                       param=param, code="unsupported_parameter")
    if _processing(body) or _logprobs(body):
        raise APIError(400, "n > 1 samples plain choices: penalties, logit_bias, response_format and logprobs are not "
                            "supported with it yet", param="n", code="unsupported_parameter")


def _not_supported_yet(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """Each parameter set to a value the engine cannot honour yet, with what would be accepted."""
    out = []
    if (body.n or 1) > 1 and body.stream:
        out.append("n > 1 with stream (n choices come in one non-streamed response)")
    if not isinstance(body, ChatCompletionRequest):
        if body.echo:
            out.append("echo")
        if body.suffix:
            out.append("suffix")
        if (body.best_of or 1) > 1:
            out.append("best_of > 1")
    return out
