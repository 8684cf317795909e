"""What the LangChain model and the HTTP server share: prompt preparation and tool-call streaming.

Both entry points turn OpenAI-style messages and tools into prompt token ids (through
:mod:`agentspec.chat`), force a tool call when ``tool_choice`` asks for one, and split the
model's streamed text into content deltas and parsed ``<tool_call>`` blocks.

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

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
ARGS_OPEN = '"arguments": '
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


def prepare_prompt(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    tools: Sequence[dict] | None = None,
    tool_choice: Any = None,
    stop: Sequence[str] | str | None = None,
    context_window: int | None = None,
    constrain: bool = False,
) -> PreparedPrompt:
    """Prompt ids for OpenAI-style ``messages`` and ``tools`` (``ValueError`` for bad input).

    ``constrain=True``: the answer's ``<tool_call>`` blocks are held to the tools' schemas by a grammar
    (a forced call from its forced start to ``</tool_call>``; with ``tool_choice="auto"`` every block the
    model opens), instead of stop strings and repairs after the fact.

    With ``context_window`` a prompt that does not fit raises ``ValueError`` naming both lengths.
    """
    choice = normalize_tool_choice(tool_choice)
    if not tools and (choice == "required" or isinstance(choice, dict)):
        raise ValueError(f"tool_choice {choice!r} needs tools, but the request gives none")
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
    rendered_tools = list(tools) if tools and choice != "none" else None
    ids = chat.prompt_ids(tokenizer, [_as_chat_message(m) for m in messages], rendered_tools)
    prefix = forced_prefix(rendered_tools, choice)
    grammar = None
    if constrain and rendered_tools:
        grammar = Grammar.tool_calls(rendered_tools, mode="required" if prefix else "auto", prefix=prefix)
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
    return PreparedPrompt(ids, prefix, stops, parse_tools=choice != "none", grammar=grammar)


def _as_chat_message(message: dict) -> dict:
    """OpenAI roles the chat template does not know, mapped to ones it does."""
    if message.get("role") == "developer":
        return {**message, "role": "system"}
    return message


class ToolCallSplitter:
    """Split streamed model text into content deltas and ``<tool_call>`` blocks.

    Content passes through as it arrives, except that text which may be the start of a
    ``<tool_call>`` tag, and trailing whitespace, are held back until the next delta shows what
    they are. From the first block on everything is buffered and parsed in :meth:`finish`.
    Streaming and non-streaming answers go through the same splitter, so they are identical.
    """

    def __init__(self, parse_tools: bool = True, prefix: str = "") -> None:
        self.parse_tools = parse_tools
        self.prefix = prefix  # a forced start of the answer: fed first, repaired in finish()
        self.text = ""  # everything the model produced (including a forced prefix)
        self._sent = 0  # chars of ``text`` already returned as content
        self._in_call = False

    def feed(self, delta: str) -> str:
        """Add model text; return the content that is safe to emit now (maybe "")."""
        self.text += delta
        if not self.parse_tools:
            out, self._sent = self.text[self._sent :], len(self.text)
            return out
        if self._in_call:
            return ""
        end = self.text.find(TOOL_OPEN, self._sent)
        if end >= 0:
            self._in_call = True
        else:
            end = len(self.text) - _partial_tag(self.text, TOOL_OPEN)
        while end > self._sent and self.text[end - 1].isspace():
            end -= 1
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : end], end
        return out

    def finish(self) -> tuple[str, list[dict], list[dict]]:
        """``(rest of the content, tool_calls, invalid_tool_calls)`` once the model is done.

        Tool calls are ``{"id", "name", "arguments": dict}``; invalid ones carry the raw block
        text in ``"arguments"`` and an ``"error"`` (see :func:`agentspec.chat.parse_tool_calls`).
        """
        if self.prefix.endswith(ARGS_OPEN) and self.text.startswith(self.prefix):
            args = _close_json(self.text[len(self.prefix) :])
            if args is not None:
                self.text = self.prefix + args + "}\n" + TOOL_CLOSE
        sent, self._sent = self._sent, len(self.text)
        rest = self.text[sent:]
        if not self.parse_tools or not self._in_call:
            return rest, [], []
        _, calls, invalid = chat.parse_tool_calls(rest)
        rest = chat.TOOL_CALL_RE.sub("", rest).strip()
        if rest and self.text[:sent].strip():
            rest = "\n" + rest
        return rest, calls, invalid


def _close_json(text: str, max_missing: int = 4) -> str | None:
    """The first JSON object in ``text``: as written, with up to ``max_missing`` braces closed that a
    stop string cut, or else its longest prefix of complete top-level members (a rambling small model)."""
    text = text.strip()
    candidates = [text + "}" * missing for missing in range(max_missing + 1)]
    candidates += [text[:i] + "}" for i in reversed(_top_level_commas(text))]
    for candidate in candidates:
        try:
            obj, _ = json.JSONDecoder().raw_decode(candidate)
        except ValueError:
            continue
        return json.dumps(obj, ensure_ascii=False) if isinstance(obj, dict) else None
    return None


def _top_level_commas(text: str) -> list[int]:
    """Positions of the commas between the members of the object ``text`` starts with."""
    out, depth, in_string, escaped = [], 0, False, False
    for i, c in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif c == "," and depth == 1:
            out.append(i)
    return out


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def raw_block(invalid_call: dict) -> str:
    """The ``<tool_call>`` block text of an invalid call (for APIs with no place for invalid calls)."""
    return f"{TOOL_OPEN}\n{invalid_call['arguments']}\n{TOOL_CLOSE}"


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
