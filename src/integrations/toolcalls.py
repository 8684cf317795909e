"""Tool calls in model output, as each model family writes them: one parser for the server and ChatAgentSpec.

Every parser reads the forms a family's models write, besides the Hermes blocks agentspec's prompt asks for:

=============  ===========================================================================================
parser         recognised calls
=============  ===========================================================================================
``hermes``     ``<tool_call>{...}</tool_call>`` blocks; bare JSON objects naming a tool of the request,
               alone, several, in a JSON list or a Markdown fence (Qwen2.5, Hermes)
``llama3_json`` the same, plus ``<|python_tag|>`` before the JSON (Llama 3.x; ``"parameters"`` for arguments)
``mistral``    the same, plus ``[TOOL_CALLS]`` before a JSON list of calls
``json``       the generic fallback: all of the above
=============  ===========================================================================================

The parser is chosen from the model's chat template (:func:`detect_parser`), or named (``--tool-call-parser``).
A call is ``{"name", "arguments" | "parameters"}`` (arguments an object or a JSON string of one). A bare
JSON object counts as a call only when it names a tool of the request and stands at the top level (not
inside another JSON value), so ordinary JSON answers stay content; after a tag or a marker any name counts.

Streaming (:class:`ToolCallSplitter`): content passes through as it arrives, except text that may be
the start of a call (``<tool_c``, ``{"name": "ad``, a fence opening ...) and trailing whitespace, held
back until the next delta shows what it is. From the first call on everything is buffered and parsed
once the model is done; streamed and non-streamed answers go through the same splitter, so they are identical.
A call the model did not finish (cut by ``max_tokens``) is an invalid call carrying its partial text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import regex

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
ARGS_OPEN = '"arguments": '
CUT_OFF = "unfinished call: the answer ended inside it (max_tokens?)"


@dataclass(frozen=True)
class ToolCallFormat:
    """A family's call syntax: markers that open a JSON list of calls, and the arguments keys its models write
    (the auto-mode grammar constrains bare JSON calls that start with one of them)."""

    name: str
    markers: tuple[str, ...] = ()
    args_keys: tuple[str, ...] = ("arguments",)


PARSERS = {f.name: f for f in (
    ToolCallFormat("hermes"),
    ToolCallFormat("llama3_json", ("<|python_tag|>",), ("parameters", "arguments")),
    ToolCallFormat("mistral", ("[TOOL_CALLS]",)),
    ToolCallFormat("json", ("<|python_tag|>", "[TOOL_CALLS]"), ("arguments", "parameters")),
)}


def detect_parser(tokenizer: Any) -> str:
    """The parser for a tokenizer's chat template: what the template renders calls with, else ``"json"``."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates (default, tool_use ...)
        template = "\n".join(str(t) for t in template.values())
    elif isinstance(template, list):
        template = "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in template)
    if not isinstance(template, str):
        return "json"
    if TOOL_OPEN in template:
        return "hermes"
    if "<|python_tag|>" in template:
        return "llama3_json"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    return "json"


def tool_call_format(name: str) -> ToolCallFormat:
    """The format of a parser name (``ValueError`` naming the known ones)."""
    if name not in PARSERS:
        raise ValueError(f"tool-call parser must be one of {', '.join(PARSERS)}, got {name!r}")
    return PARSERS[name]


def finish_reason(calls: Sequence[dict], engine_reason: str) -> str:
    """OpenAI's finish reason: ``"length"`` when ``max_tokens`` cut the answer (calls or not), else
    ``"tool_calls"`` when it holds calls, else the engine's."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if calls else engine_reason


# ---------------------------------------------------------------------------------------- parsing
@dataclass
class Parsed:
    """Model text split into content and calls; calls are ``{"id", "name", "arguments": dict}``, invalid ones
    ``{"id", "name", "arguments": str, "error", "text"}`` (``text``: the call's source, as the model wrote it)."""

    content: str
    calls: list[dict]
    invalid: list[dict]


class ToolCallParser:
    """Finds calls in text for one format and the request's tool names."""

    def __init__(self, parser: str = "hermes", tool_names: Sequence[str] = ()) -> None:
        self.format = tool_call_format(parser)
        self.tool_names = frozenset(n for n in tool_names if n)
        starts = [regex.escape(TOOL_OPEN), *(regex.escape(m) for m in self.format.markers)]
        if self.tool_names:
            names = "|".join(regex.escape(n) for n in sorted(self.tool_names, key=len, reverse=True))
            call = rf'\{{\s*"name"\s*:\s*"(?:{names})"'
            starts += [rf"```[A-Za-z]*[ \t]*\n?\s*\[?\s*{call}", rf"\[\s*{call}", call]
        self._start = regex.compile("|".join(f"(?:{s})" for s in starts))

    def next_start(self, text: str, pos: int, *, final: bool, after_call: int | None = None) -> tuple[int, bool]:
        """``(i, complete)``: where the first call at or after ``pos`` starts, and whether its start is complete
        (``False``: text from ``i`` on may become a call start when more comes; never with ``final``).
        ``(len(text), False)`` when there is none. ``after_call``: where the previous call ended (a bare JSON
        call may follow it after a comma or semicolon)."""
        while pos < len(text):
            m = self._start.search(text, pos, partial=not final)
            if m is None or m.start() >= len(text):  # (a partial search may match nothing at the very end)
                break
            i = m.start()
            if self._top_level(text, i, after_call):
                return i, not m.partial
            pos = i + 1
        return len(text), False

    def _top_level(self, text: str, i: int, after_call: int | None) -> bool:
        """A bare JSON start at ``i`` is not an element or value of an enclosing JSON text."""
        if text[i] not in "{[":
            return True
        if after_call is not None and not text[after_call:i].strip(" \t\r\n,;"):
            return True
        before = text[:i].rstrip()
        if not before:
            return True
        if before[-1] in '[{,"':
            return False
        return not (before[-1] == ":" and before[:-1].rstrip().endswith('"'))

    def parse(self, text: str, start: int = 0) -> Parsed:
        """Content and calls of ``text[start:]`` (``text[:start]``: what came before, for context only).

        With no call the content is the text unchanged; with calls, the pieces of text around them,
        each stripped, joined by newlines.
        """
        pieces, calls, invalid = [], [], []
        pos, after_call = start, None
        while True:
            i, _ = self.next_start(text, pos, final=True, after_call=after_call)
            if after_call is None or text[pos:i].strip(" \t\r\n,;"):  # not just separators between calls
                pieces.append(text[pos:i])
            if i >= len(text):
                break
            pos = self._read_call(text, i, calls, invalid)
            after_call = pos
        if not calls and not invalid:
            return Parsed(text[start:], [], [])
        return Parsed("\n".join(p.strip() for p in pieces if p.strip()), calls, invalid)

    def _read_call(self, text: str, i: int, calls: list[dict], invalid: list[dict]) -> int:
        """Read the call(s) starting at ``i`` into ``calls``/``invalid``; returns where they end."""
        if text.startswith(TOOL_OPEN, i):
            body_start = i + len(TOOL_OPEN)
            close = text.find(TOOL_CLOSE, body_start)
            end = len(text) if close < 0 else close + len(TOOL_CLOSE)
            body = text[body_start:] if close < 0 else text[body_start:close]
            body = body.strip()
            # a body whose closing tag alone was cut is complete: only an unfinished JSON body is cut off
            body_end = _json_end(body, 0) if close < 0 and body[:1] in ("{", "[") else None
            cut = close < 0 and body_end is None
            _collect(body if body_end is None else body[:body_end], text[i:end], calls, invalid, cut=cut)
            return end
        marker = next((m for m in self.format.markers if text.startswith(m, i)), None)
        if marker is not None:
            return self._read_values(text, i, i + len(marker), calls, invalid)
        if text.startswith("```", i):  # the start pattern saw the fence's JSON begin
            json_start = min(k for k in (text.find("{", i), text.find("[", i)) if k >= 0)
            return self._read_values(text, i, json_start, calls, invalid, fence=True)
        return self._read_values(text, i, i, calls, invalid, single=True)

    @staticmethod
    def _read_values(text: str, start: int, pos: int, calls: list[dict], invalid: list[dict], *,
                     fence: bool = False, single: bool = False) -> int:
        """JSON values from ``pos`` (separated by blanks, commas or semicolons) as calls; a fence's closing
        backticks are part of them. ``start``: where the call's source text begins."""
        first = True
        while True:
            j = pos + len(text[pos:]) - len(text[pos:].lstrip(" \t\r\n" if first else " \t\r\n,;"))
            if j >= len(text) or text[j] not in "{[" or (single and not first):
                break
            end = _json_end(text, j)
            source_start = start if first else j
            if end is None:  # the model stopped inside the value
                _collect(text[j:], text[source_start:], calls, invalid, cut=True)
                return len(text)
            _collect(text[j:end], text[source_start:end], calls, invalid, cut=False)
            pos, first = end, False
        if fence:
            m = re.match(r"\s*```", text[pos:])
            if m:
                pos += m.end()
        return pos


def _structure(text: str, start: int = 0) -> Iterator[tuple[int, str, int]]:
    """``(position, character, depth after it)`` for each character of ``text`` from ``start`` that lies
    outside JSON strings; brackets open and close levels."""
    depth, in_string, escaped = 0, False, False
    for k in range(start, len(text)):
        c = text[k]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
            continue
        if c == '"':
            in_string = True
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        yield k, c, depth


def _json_end(text: str, j: int) -> int | None:
    """The end of the bracketed JSON value starting at ``text[j]`` (string-aware), or None if it never closes."""
    return next((k + 1 for k, c, depth in _structure(text, j) if c in "}]" and depth == 0), None)


def _collect(raw: str, source: str, calls: list[dict], invalid: list[dict], *, cut: bool) -> None:
    """The call(s) of one JSON text ``raw`` (an object or a list of objects) into ``calls`` or ``invalid``."""
    try:
        if cut:
            raise ValueError(CUT_OFF)
        value = json.loads(raw)
        objects = value if isinstance(value, list) and value else [value]
        parsed = [_call(obj) for obj in objects]
    except (ValueError, TypeError) as exc:
        m = re.search(r'"name"\s*:\s*"([^"]*)"', raw)
        invalid.append({"id": _call_id(), "name": m.group(1) if m else None, "arguments": raw, "error": str(exc),
                        "text": source})
        return
    calls.extend(parsed)


def _call(obj: Any) -> dict:
    """``{"id", "name", "arguments": dict}`` of one call object (``ValueError`` if it is not one)."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI's own shape
        obj = obj["function"]
    name = obj.get("name") if isinstance(obj, dict) else None
    args = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        raise ValueError("expected {'name': str, 'arguments': object}")
    return {"id": _call_id(), "name": name, "arguments": args}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tool_names: Sequence[str] = (), parser: str = "hermes") -> Parsed:
    """Content and calls of a whole answer (as a streamed one would be split)."""
    splitter = ToolCallSplitter(tool_names=tool_names, parser=parser)
    streamed = splitter.feed(text)
    rest, calls, invalid = splitter.finish()
    return Parsed(streamed + rest, calls, invalid)


# ---------------------------------------------------------------------------------------- streaming
class ToolCallSplitter:
    """Split streamed model text into content deltas and tool calls (see the module's docstring)."""

    def __init__(self, parse_tools: bool = True, prefix: str = "", *, tool_names: Sequence[str] = (),
                 parser: str = "hermes") -> None:
        self.parse_tools = parse_tools
        self.prefix = prefix  # a forced start of the answer: fed first, repaired in finish()
        self.parser = ToolCallParser(parser, tool_names)
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
        end, self._in_call = self.parser.next_start(self.text, self._sent, final=False)
        while end > self._sent and self.text[end - 1].isspace():
            end -= 1
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : end], end
        return out

    def finish(self, engine_reason: str = "stop") -> tuple[str, list[dict], list[dict]]:
        """``(rest of the content, tool_calls, invalid_tool_calls)`` once the model is done.

        ``engine_reason``: why the model stopped; a forced call cut by a stop string is closed again
        (a small model's rambling trimmed to its complete members); one cut by ``"length"`` counts only
        when its arguments object is complete (just the call's closing was cut).
        """
        if self.prefix.endswith(ARGS_OPEN) and self.text.startswith(self.prefix):
            written = self.text[len(self.prefix) :]
            args = _close_json(written) if engine_reason != "length" else _complete_json(written)
            if args is not None:
                self.text = self.prefix + args + "}\n" + TOOL_CLOSE
        sent, self._sent = self._sent, len(self.text)
        if not self.parse_tools or not self._in_call:
            return self.text[sent:], [], []
        parsed = self.parser.parse(self.text, sent)
        rest = parsed.content
        if rest and self.text[:sent].strip():
            rest = "\n" + rest
        return rest, parsed.calls, parsed.invalid


def _complete_json(text: str) -> str | None:
    """The JSON object ``text`` starts with, if it is complete (normalised), else None."""
    text = text.lstrip()
    end = _json_end(text, 0) if text.startswith("{") else None
    try:
        return json.dumps(json.loads(text[:end]), ensure_ascii=False) if end is not None else None
    except ValueError:
        return None


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
    return [k for k, c, depth in _structure(text) if c == "," and depth == 1]
