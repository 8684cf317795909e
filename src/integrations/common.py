"""What the LangChain model and the HTTP server share: prompt preparation and tool-call streaming.

Both entry points turn OpenAI-style messages and tools into prompt token ids (through
:mod:`agentspec.chat`), force a tool call when ``tool_choice`` asks for one, and split the
model's streamed text into content deltas and tool calls (:mod:`.toolcalls`, one parser for both).

Forcing a tool call costs nothing at decode time: the assistant answer is started with the
opening of a Hermes block, e.g. ``<tool_call>\\n{"name": "get_weather", "arguments": `` (its
token ids are appended to the prompt), so even a small model can only continue with arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Literal

from agentspec import chat
from agentspec.engine.constraints import Grammar

from .toolcalls import ARGS_OPEN, TOOL_CLOSE, TOOL_OPEN, ToolCallSplitter, detect_parser, tool_call_format

FORCED_END = "}}"


def normalize_tool_choice(tool_choice: Any) -> str | dict | None:
    """``None`` | ``"auto"`` | ``"none"`` | ``"required"`` | ``{"type": "function", "function": {"name"}}``.

    Accepts the spellings LangChain and OpenAI use: ``"any"`` and ``True`` mean required, a bare
    tool name means that function.
    """
    if tool_choice is None or tool_choice == "auto":
        return tool_choice
    if tool_choice is True or tool_choice in ("any", "required"):
        return "required"
    if tool_choice is False or tool_choice == "none":
        return "none"
    if isinstance(tool_choice, str):
        return {"type": "function", "function": {"name": tool_choice}}
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
    raise ValueError(
        f"tool_choice must be 'auto', 'none', 'required'/'any', a tool name or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}"
    )


def tool_names(tools: Sequence[dict] | None) -> list[str]:
    """Function names of OpenAI-style tool schemas."""
    return [(t.get("function") or t).get("name", "") for t in tools or ()]


def forced_prefix(tools: Sequence[dict] | None, tool_choice: str | dict | None) -> str:
    """Text the assistant answer is made to start with, so that the model must call a tool."""
    if not tools or tool_choice in (None, "auto", "none"):
        return ""
    names = tool_names(tools)
    name = None
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise ValueError(f"tool_choice names function {name!r}, but the tools are {names}")
    elif len(names) == 1:  # "required" with one tool: that tool
        name = names[0]
    if name is None:
        return TOOL_OPEN + '\n{"name": "'
    return TOOL_OPEN + '\n{"name": ' + json.dumps(name) + ", " + ARGS_OPEN


@dataclass
class PreparedPrompt:
    """A request ready for :meth:`Engine.stream`: token ids, plus how to read the answer."""

    prompt_ids: list[int]
    prefix: str = ""  # forced start of the answer (already in prompt_ids); feed it to the splitter first
    stop: list[str] = field(default_factory=list)
    parse_tools: bool = True  # False with tool_choice="none": tool-call syntax stays plain text
    grammar: Grammar | None = None  # with constrain=True: tool-call arguments must match their schemas
    tool_names: list[str] = field(default_factory=list)  # a bare JSON object naming one of them is a call
    tool_parser: str = "hermes"  # the family's call syntax (:data:`.toolcalls.PARSERS`)

    def splitter(self) -> ToolCallSplitter:
        """A splitter for this prompt's answer, the forced prefix already fed (it is not content)."""
        splitter = ToolCallSplitter(self.parse_tools, self.prefix, tool_names=self.tool_names, parser=self.tool_parser)
        splitter.feed(self.prefix)
        return splitter


def prepare_prompt(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    tool_choice: Any = None,
    stop: Sequence[str] | str | None = None,
    context_window: int | None = None,
    constrain: bool = False,
    auto_grammar: bool = True,
    tool_parser: str | None = None,
) -> PreparedPrompt:
    """Prompt ids for OpenAI-style ``messages`` and ``tools`` (``ValueError`` for bad input).

    ``constrain=True``: the answer's tool calls are held to the tools' schemas by a grammar (a forced
    call from its forced start to ``</tool_call>``; with ``tool_choice="auto"``, unless ``auto_grammar``
    is False, every call the model starts: a ``<tool_call>`` block, or a bare JSON object once it reads
    ``{"name": "<a tool>", "arguments": ``), instead of stop strings and repairs after the fact.
    ``tool_parser``: the call syntax to read (:data:`.toolcalls.PARSERS`); ``None`` = the chat template's.

    With ``context_window`` a prompt that does not fit raises ``ValueError`` naming both lengths.
    """
    choice = normalize_tool_choice(tool_choice)
    if not tools and (choice == "required" or isinstance(choice, dict)):
        raise ValueError(f"tool_choice {choice!r} needs tools, but the request gives none")
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
    rendered_tools = list(tools) if tools and choice != "none" else None
    ids = chat.prompt_ids(tokenizer, [_as_chat_message(m) for m in messages], rendered_tools)
    prefix = forced_prefix(rendered_tools, choice)
    parser = tool_call_format(tool_parser or detect_parser(tokenizer))
    grammar = None
    if constrain and rendered_tools and (prefix or auto_grammar):
        grammar = Grammar.tool_calls(rendered_tools, mode="required" if prefix else "auto", prefix=prefix,
                                     json_args_keys=() if prefix else parser.args_keys)
    if prefix:
        ids = ids + tokenizer.encode(prefix, add_special_tokens=False)
        # one forced call, then stop; a named call ends at the "}}" closing its arguments and the call
        # (the splitter closes the braces again), so a small model cannot ramble past it
        if grammar is None:  # the grammar ends the block itself (then the end of the answer)
            ends = ((FORCED_END,) if prefix.endswith(ARGS_OPEN) else ()) + (TOOL_CLOSE,)
            stops += [s for s in ends if s not in stops]
    if context_window is not None and len(ids) >= context_window:
        raise ValueError(
            f"prompt is {len(ids)} tokens but the model's context window is {context_window} tokens"
        )
    return PreparedPrompt(ids, prefix, stops, parse_tools=choice != "none", grammar=grammar,
                          tool_names=tool_names(rendered_tools), tool_parser=parser.name)


def _as_chat_message(message: dict) -> dict:
    """OpenAI roles the chat template does not know, mapped to ones it does."""
    if message.get("role") == "developer":
        return {**message, "role": "system"}
    return message


def openai_logprobs(kind: Literal["chat", "text"], entries: list | None,
                    token_text: Callable[[int], str]) -> dict | None:
    """A result's :class:`~agentspec.engine.processors.TokenLogprob` entries in OpenAI's ``logprobs``
    shape: chat ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}``, text
    ``{tokens, token_logprobs, top_logprobs, text_offset}``; None when they were not asked for."""
    if entries is None:
        return None
    if kind == "chat":
        def item(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}
        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}
    tokens = [token_text(e.token) for e in entries]
    offsets = [0, *accumulate(len(t) for t in tokens)][: len(tokens)]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}
