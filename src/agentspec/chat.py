"""Chat messages <-> prompt token ids, tool calls rendered (read back by :mod:`agentspec.integrations.toolcalls`).

One place for the conventions every entry point shares (the engine, the trajectory replay,
the LangChain model and the OpenAI-compatible server):

* messages are OpenAI-style dicts: ``{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?}``;
  ``content`` may be ``None`` or a list of ``{"type": "text", "text": ...}`` parts;
* an assistant's tool calls are rendered Hermes-style, one block per call::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* tool schemas (OpenAI ``tools``) are described in the system message;
* the model's own chat template then renders the normalised messages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

Message = dict[str, Any]

TOOLS_PREAMBLE = (
    "You can call functions. The available functions, as JSON schemas:\n{schemas}\n"
    "To call a function, answer with one block per call:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


ROLES = ("system", "user", "assistant", "tool")


def check_text(text: str, where: str) -> None:
    """``ValueError`` if ``text`` holds a lone surrogate (it has no UTF-8 form, so no tokens)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} holds a lone surrogate {text[exc.start]!r} at character {exc.start}") from None


def check_messages(messages: Sequence[Any]) -> None:
    """``ValueError`` naming the first message that is not OpenAI-style: a dict with a known role
    (:data:`ROLES`) and a string, ``None`` or list-of-text-parts ``content``, all valid text."""
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {message!r:.80}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        _check_content(message.get("content"), f"{where} ({role})")
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise ValueError(f"{where}: tool_calls must be a list of objects, got {calls!r:.80}")
        for key in ("name", "tool_call_id"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {value!r:.80}")
            if value is not None:
                check_text(value, f"{where} {key}")
        if calls:
            check_text(json.dumps(calls, ensure_ascii=False, default=str), f"{where} tool_calls")


def _check_content(content: Any, where: str) -> None:
    if content is None:
        return
    if isinstance(content, str):
        check_text(content, f"{where} content")
        return
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}: content part {j} must be {{'type': 'text', 'text': str}}, got {part!r:.80}")
        check_text(part["text"], f"{where} content part {j}")


def check_tools(tools: Sequence[Any]) -> None:
    """``ValueError`` unless ``tools`` is a list of OpenAI tool objects (dicts) of valid text."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tool {i} must be an object, got {tool!r:.80}")
        check_text(json.dumps(tool, ensure_ascii=False, default=str), f"tool {i}")


def content_text(content: Any) -> str:
    """Text of a message ``content``: a string, ``None`` or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def render_tool_call(name: str, arguments: Any) -> str:
    """One Hermes-style ``<tool_call>`` block; ``arguments`` may be a dict or a JSON string."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # keep the raw string: the recorded agent really sent it
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def assistant_text(message: Message) -> str:
    """The text an assistant message stands for: its content plus its rendered tool calls."""
    text = content_text(message.get("content"))
    blocks = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        blocks.append(render_tool_call(fn.get("name", ""), fn.get("arguments", {})))
    if blocks:
        text = (text + "\n" if text else "") + "\n".join(blocks)
    return text


def tools_system_text(tools: Sequence[dict]) -> str:
    """Describe OpenAI-style tool schemas for a model with no native tool template."""
    schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return TOOLS_PREAMBLE.format(schemas=schemas)


def normalize_messages(messages: Sequence[Message], tools: Sequence[dict] | None = None) -> list[Message]:
    """Messages as ``{"role", "content": str}`` only, tool calls and tool schemas rendered as text."""
    if not messages:
        raise ValueError("expected at least one message, got an empty list")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role', got {message!r:.80}")
        role = str(message["role"])
        if role == "assistant":
            text = assistant_text(message)
        else:
            text = content_text(message.get("content"))
        out.append({"role": role, "content": text})
    if tools:
        preamble = tools_system_text(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def prompt_ids(tokenizer, messages: Sequence[Message], tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of the chat prompt (generation prompt included) for ``messages``."""
    text = tokenizer.apply_chat_template(
        normalize_messages(messages, tools), tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def fit_messages(
    messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int], max_tokens: int
) -> list[Message] | None:
    """Drop the oldest turns until ``count_tokens(messages) <= max_tokens``.

    The system prompt and the first user message (the task) are always kept, and so is the
    last message. Returns ``None`` when even that minimum does not fit.
    """
    messages = list(messages)
    keep_head = 0
    if messages and messages[0].get("role") == "system":
        keep_head = 1
    if len(messages) > keep_head and messages[keep_head].get("role") == "user":
        keep_head += 1
    while count_tokens(messages) > max_tokens:
        if len(messages) <= keep_head + 1:
            return None
        del messages[keep_head]
        # never start the kept tail on an orphan tool result
        while len(messages) > keep_head + 1 and messages[keep_head].get("role") == "tool":
            del messages[keep_head]
    return messages
