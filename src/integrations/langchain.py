"""``ChatAgentSpec``: a LangChain chat model on the agentspec engine.

Swap it in for any LangChain chat model (``ChatOpenAI``, ``ChatOllama`` ...)::

    from agentspec.integrations.langchain import ChatAgentSpec

    llm = ChatAgentSpec(max_tokens=128, session_id="ticket-42")
    llm_with_tools = llm.bind_tools([get_weather])
    msg = llm_with_tools.invoke("Weather in Paris?")      # msg.tool_calls, msg.usage_metadata
    msg.response_metadata["speculation"]                   # SpecStats.to_dict() of the call

One agent thread should map to one session: every call of a session drafts from the session's
earlier prompts and outputs. The session id comes from the constructor or per call from
``config={"configurable": {"session_id": ...}}``; in LangGraph, the thread's
``config={"configurable": {"thread_id": ...}}`` names the session when no ``session_id`` does.
Token counts (``get_num_tokens``, ``trim_messages(..., token_counter=llm)``) use the model's own
tokenizer.

The engine is created on first use (constructing the model loads nothing) and shared by all
instances with the same model settings; pass ``engine=`` to use one you built.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.json import parse_partial_json
from pydantic import ConfigDict, Field, PrivateAttr

from agentspec import chat
from agentspec.engine.constraints import Grammar

from .choices import sample_choices
from .common import PreparedPrompt, normalize_tool_choice, openai_logprobs, prepare_prompt
from .toolcalls import finish_reason as call_finish_reason

# engines shared by every ChatAgentSpec with the same settings: (model, dtype, quantize, store, kv_dtype, matmul)
ENGINES: dict[tuple, Any] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(model: str | None = None, dtype: str = "float32", quantize: str | None = None,
                  store: str | None = None, kv_dtype: str = "float32", matmul: str = "float32") -> Any:
    """The process-wide engine for these settings, loaded on first request."""
    key = (model, dtype, quantize, store, kv_dtype, matmul)
    with _ENGINES_LOCK:
        if key not in ENGINES:
            from agentspec.engine import Engine

            ENGINES[key] = Engine.from_pretrained(model, dtype=dtype, quantize=quantize, store=store,
                                                  kv_dtype=kv_dtype, matmul=matmul)
        return ENGINES[key]


class ChatAgentSpec(BaseChatModel):
    """LangChain chat model running a local model with lossless speculative decoding.

    Output is exactly what the model generates without speculation (greedy: token for token);
    drafts come from the session's cached prompts and outputs, so agent loops get faster
    call after call. Tools are described Hermes-style (see :mod:`agentspec.chat`); calls are read in the forms
    the model's family writes them (:mod:`.toolcalls`), as the server reads them.
    """

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model: str | None = None
    """A catalog name (``agentspec models list``), a local HF model directory or a .gguf file;
    ``None`` = SmolLM2-135M-Instruct."""
    engine: Any = Field(default=None, exclude=True)
    """A ready :class:`~agentspec.engine.Engine`; ``None`` = a shared engine built on first use."""
    dtype: str = "float32"
    """Weights dtype when the engine is built here: float32 | bfloat16."""
    quantize: str | None = None
    """``"int8"``: dynamic int8 linear layers (CPU), when the engine is built here."""
    kv_dtype: str = "float32"
    """KV cache dtype when the engine is built here: float32 | float16 | bfloat16 (16 bits: faster
    attention; output equals plain decoding with the same KV precision)."""
    matmul: str = "float32"
    """GGUF-block layers when the engine is built here: float32 | int8 (inputs rounded to 8-bit blocks,
    VNNI dot products: cheaper verification rows; output equals plain decoding in the same mode)."""
    store: str | None = None
    """Session store URL when the engine is built here; ``None`` = the persistent default
    (``sqlite:///$AGENTSPEC_HOME/cache.db``), ``"memory"`` = nothing kept."""
    session_id: str | None = None
    """Agent session whose cache drafts for the calls; per call: ``configurable.session_id``."""
    temperature: float = 0.0
    """0 = greedy decoding."""
    max_tokens: int = 256
    """Maximum number of tokens to generate."""
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    """Seeds sampling (``temperature > 0``) for reproducible outputs."""
    n: int = Field(default=1, ge=1)
    """Generations per call; ``n > 1`` samples them together over one shared prompt KV (best-of-N search;
    ``stream`` yields one)."""
    stop: list[str] | None = None
    """Stop strings; the output is cut before the first one."""
    logprobs: bool | None = None
    """Each output token's log-probability in ``response_metadata["logprobs"]`` (OpenAI's shape)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With ``logprobs``: the k most likely alternatives of each token as well."""
    tool_call_parser: str | None = None
    """How calls are read from answers: hermes | llama3_json | mistral | json; ``None`` = from the chat template."""
    speculate: bool | None = None
    """``False`` decodes one token per step (baseline); ``None`` = the engine's setting."""
    timeout: float | None = None
    """Accepted for compatibility with remote chat models; a local engine has no request timeout."""
    max_retries: int = 0
    """Accepted for compatibility with remote chat models; local generation is not retried."""

    _resolved_engine: Any = PrivateAttr(default=None)
    _tokenizer_only: Any = PrivateAttr(default=None)  # for token counts before the engine is needed

    # ------------------------------------------------------------------ LangChain identity
    @property
    def _llm_type(self) -> str:
        return "agentspec"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}

    @property
    def model_name(self) -> str:
        """The served model's name (the engine's once it exists; no loading)."""
        engine = self.engine or self._resolved_engine
        if engine is not None:
            return engine.model_name
        return self.model or "smollm2-135m-instruct"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(ls_provider="agentspec", ls_model_name=kwargs.get("model") or self.model_name,
                      ls_model_type="chat",
                      ls_temperature=kwargs.get("temperature", self.temperature),
                      ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_engine(self) -> Any:
        """The engine this model runs on (built or fetched from the shared ones on first call)."""
        if self.engine is not None:
            return self.engine
        if self._resolved_engine is None:
            self._resolved_engine = shared_engine(self.model, self.dtype, self.quantize, self.store, self.kv_dtype,
                                                  self.matmul)
        return self._resolved_engine

    # ------------------------------------------------------------------ tokens
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's own tokenizer (loads the tokenizer, not the weights)."""
        return self._tokenizer().encode(text, add_special_tokens=False)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None) -> int:
        """Prompt tokens of ``messages`` (and ``tools``) as generation would see them: chat template included."""
        rendered = [convert_to_openai_tool(t) for t in tools] if tools else None
        return len(chat.prompt_ids(self._tokenizer(), convert_to_openai_messages(messages), rendered))

    def _tokenizer(self) -> Any:
        engine = self.engine or self._resolved_engine
        if engine is not None:
            return engine.tokenizer
        if self._tokenizer_only is None:
            from agentspec.engine.model import load_tokenizer  # deferred: transformers, only when counting

            self._tokenizer_only = load_tokenizer(self.model)
        return self._tokenizer_only

    # ------------------------------------------------------------------ tools
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any form ``convert_to_openai_tool`` takes).

        ``tool_choice``: ``"auto"`` (default), ``"none"``, ``"any"``/``"required"``/``True``
        (some tool must be called), or a tool name (that tool must be called). A required call
        is forced by starting the answer with the call's opening, so the model writes arguments.
        """
        formatted = [convert_to_openai_tool(t) for t in tools]
        choice = normalize_tool_choice(tool_choice)
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: str = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        """Answers parsed into ``schema`` (a pydantic class, a TypedDict or a JSON schema), as ``ChatOpenAI`` does.

        ``method``: ``"function_calling"`` (default: a forced tool call, so the prompt shows the schema
        and the grammar holds the arguments to it; a small model writes better values when it sees the
        schema), ``"json_schema"`` (the answer is JSON constrained by the schema's grammar) or
        ``"json_mode"`` (any JSON object; say the shape in the prompt). ``include_raw=True``
        returns ``{"raw", "parsed", "parsing_error"}``; an answer that does not parse (cut by
        ``max_tokens``, say) reports its error there instead of raising.
        """
        from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser  # deferred: parsers
        from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
        from langchain_core.runnables import RunnableLambda, RunnableMap, RunnablePassthrough

        if kwargs:
            raise ValueError(f"with_structured_output got unexpected arguments: {sorted(kwargs)}")
        is_model = isinstance(schema, type) and hasattr(schema, "model_json_schema")
        if method == "function_calling":
            tool = convert_to_openai_tool(schema)
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name,
                                 ls_structured_output_format={"kwargs": {"method": method}, "schema": tool})
            tools_parser = (PydanticToolsParser(tools=[schema], first_tool_only=True) if is_model
                            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
            parser: Runnable = tools_parser | RunnableLambda(_required)
        elif method in ("json_schema", "json_mode"):
            json_schema = convert_to_json_schema(schema)
            named = {"name": json_schema.get("title", "output"), "schema": json_schema}
            response_format = {"type": "json_object"} if method == "json_mode" else {"type": "json_schema",
                                                                                      "json_schema": named}
            llm = self.bind(response_format=response_format,
                            ls_structured_output_format={"kwargs": {"method": method}, "schema": json_schema})
            parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=lambda x: parser.invoke(x["raw"]), parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")

    # ------------------------------------------------------------------ session id from the config
    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return super().invoke(input, config, **_session_kwargs(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AIMessage:
        return await super().ainvoke(input, config, **_session_kwargs(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, **_session_kwargs(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None,
                **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, **_session_kwargs(config, kwargs))

    # ------------------------------------------------------------------ generation: one code path
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        n = kwargs.pop("n", self.n)
        if n > 1:
            return self._generate_n(messages, stop, n, **kwargs)
        parsed: list[tuple[list[dict], list[dict]]] = []
        result = generate_from_stream(self._chunks(messages, stop, run_manager, parsed, **kwargs))
        message = result.generations[0].message
        if parsed and parsed[0][1]:  # the exact invalid calls (streamed ones are lenient-parsed)
            calls, invalid = parsed[0]
            message.tool_calls = [_lc_tool_call(c) for c in calls]
            message.invalid_tool_calls = [_lc_invalid_call(c) for c in invalid]
        return result

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, run_manager, None, **kwargs)

    def _chunks(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        parsed: list | None,
        *,
        tools: Sequence[dict] | None = None,
        tool_choice: Any = None,
        session_id: str | None = None,
        response_format: dict | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Content deltas as they come, then one last chunk with tool calls, usage and statistics."""
        engine, prepared, params = self._prepare(messages, stop, tools, tool_choice, kwargs)
        grammar = prepared.grammar or Grammar.from_response_format(response_format)
        if grammar is not None:
            params["grammar"] = grammar
        session = session_id or self.session_id
        splitter = prepared.splitter()
        # no lock here: the engine's own lock serialises the model (batch() calls interleave step by step)
        stream = engine.stream(prepared.prompt_ids, session=session, stop=prepared.stop, **params)
        try:
            for delta in stream:
                text = splitter.feed(delta)
                if text:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                    if run_manager:
                        run_manager.on_llm_new_token(text, chunk=chunk)
                    yield chunk
        finally:
            stream.close()
        result = stream.result
        rest, calls, invalid = splitter.finish(result.finish_reason)
        if parsed is not None:
            parsed.append((calls, invalid))
        stats = result.stats
        finish = call_finish_reason(calls, result.finish_reason)
        metadata = {"model_name": engine.model_name, "model_provider": "agentspec", "finish_reason": finish,
                    "session_id": session, "speculation": stats.to_dict()}
        if result.logprobs is not None:
            metadata["logprobs"] = openai_logprobs("chat", result.logprobs, lambda t: engine.tokenizer.decode([t]))
        message = AIMessageChunk(
            content=rest,
            chunk_position="last",
            tool_call_chunks=[_lc_call_chunk(c, i) for i, c in enumerate(calls + invalid)],
            usage_metadata={"input_tokens": result.prompt_tokens, "output_tokens": len(result.token_ids),
                            "total_tokens": result.prompt_tokens + len(result.token_ids)},
            response_metadata=metadata,
        )
        chunk = ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})
        if run_manager:
            run_manager.on_llm_new_token(rest, chunk=chunk)
        yield chunk

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None, tools: Sequence[dict] | None,
                 tool_choice: Any, kwargs: dict[str, Any]) -> tuple[Any, PreparedPrompt, dict[str, Any]]:
        """The engine, the prompt and the sampling arguments of one call."""
        kwargs.pop("ls_structured_output_format", None)
        params = self._sampling(stop, kwargs)
        engine = self.get_engine()
        if params.pop("model") not in (None, engine.model_name, self.model):
            raise ValueError(f"this ChatAgentSpec runs {engine.model_name!r}; a per-call model cannot change it")
        prepared = prepare_prompt(
            engine.tokenizer, convert_to_openai_messages(messages), tools=tools, tool_choice=tool_choice,
            stop=params.pop("stop"), context_window=engine.context_window, constrain=True,
            tool_parser=self.tool_call_parser,
        )
        return engine, prepared, params

    def _generate_n(self, messages: list[BaseMessage], stop: list[str] | None, n: int, *,
                    tools: Sequence[dict] | None = None, tool_choice: Any = None, session_id: str | None = None,
                    **kwargs: Any) -> ChatResult:
        """``n`` generations in one ChatResult, sampled together (:func:`.choices.sample_choices`)."""
        engine, prepared, params = self._prepare(messages, stop, tools, tool_choice, kwargs)
        params.pop("speculate")
        if "logprobs" in params:
            raise ValueError("logprobs with n > 1 is not supported yet")
        session = session_id or self.session_id
        result = sample_choices(engine, prepared, n, session=session, **params)
        usage = result.usage()
        generations = []
        for choice in result.choices:
            message = AIMessage(
                content=choice.content, tool_calls=[_lc_tool_call(c) for c in choice.tool_calls],
                invalid_tool_calls=[_lc_invalid_call(c) for c in choice.invalid_tool_calls],
                response_metadata={"model_name": engine.model_name, "model_provider": "agentspec",
                                   "finish_reason": choice.finish_reason, "session_id": session})
            generations.append(ChatGeneration(message=message, generation_info={"finish_reason": choice.finish_reason}))
        first = generations[0].message  # the call's usage and search statistics, once
        first.usage_metadata = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                                "total_tokens": usage["total_tokens"]}
        first.response_metadata["search"] = asdict(result.stats)
        return ChatResult(generations=generations, llm_output={"token_usage": usage, "model_name": engine.model_name})

    def _sampling(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Engine sampling arguments: the model's fields, overridden per call by ``kwargs``."""
        params = {
            "max_new_tokens": kwargs.pop("max_tokens", self.max_tokens),
            "temperature": kwargs.pop("temperature", self.temperature),
            "top_p": kwargs.pop("top_p", self.top_p),
            "top_k": kwargs.pop("top_k", self.top_k),
            "seed": kwargs.pop("seed", self.seed),
            "speculate": kwargs.pop("speculate", self.speculate),
            "stop": list(stop if stop is not None else self.stop or ()),
            "model": kwargs.pop("model", None),
        }
        top = kwargs.pop("top_logprobs", self.top_logprobs)
        if kwargs.pop("logprobs", self.logprobs):
            params["logprobs"] = top or 0
        if kwargs:
            raise TypeError(f"ChatAgentSpec got unexpected call arguments: {sorted(kwargs)}")
        return params


def _required(parsed: Any) -> Any:
    """A forced tool call that came back missing or invalid is a parse error, not ``None``."""
    if parsed is None:
        from langchain_core.exceptions import OutputParserException  # deferred with the parsers

        raise OutputParserException("the answer holds no valid call of the structured-output tool")
    return parsed


def _session_kwargs(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus ``session_id`` from ``config["configurable"]``: its ``session_id``, else LangGraph's
    ``thread_id`` (one conversation thread, one session)."""
    configurable = (config or {}).get("configurable") or {}
    session = configurable.get("session_id", configurable.get("thread_id"))
    if session is not None and "session_id" not in kwargs:
        kwargs = {**kwargs, "session_id": str(session)}
    return kwargs


def _lc_tool_call(call: dict) -> dict:
    return {"name": call["name"], "args": call["arguments"], "id": call["id"], "type": "tool_call"}


def _lc_invalid_call(call: dict) -> dict:
    return {"name": call["name"], "args": call["arguments"], "id": call["id"], "error": call["error"],
            "type": "invalid_tool_call"}


def _lc_call_chunk(call: dict, index: int) -> dict:
    """A tool-call chunk; an invalid call's raw text is kept unparseable so it stays invalid."""
    if "error" not in call:
        args = json.dumps(call["arguments"], ensure_ascii=False)
    else:
        args = call["arguments"]
        try:
            if isinstance(parse_partial_json(args), dict):
                args = json.dumps(args)  # a JSON string: never read back as arguments
        except Exception:  # noqa: BLE001 - unparseable is what we want
            pass
    return tool_call_chunk(name=call["name"], args=args, id=call["id"], index=index)


__all__ = ["ChatAgentSpec", "shared_engine", "ENGINES"]
