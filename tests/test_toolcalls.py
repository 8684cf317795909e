"""Tool calls read from model output, per family: one parser for the server and ChatAgentSpec, streamed or not."""

from __future__ import annotations

import json
import random

import pytest
from agentspec.integrations.common import prepare_prompt
from agentspec.integrations.langchain import ChatAgentSpec
from agentspec.integrations.server import create_app
from agentspec.integrations.toolcalls import (
    CUT_OFF,
    PARSERS,
    ToolCallSplitter,
    detect_parser,
    finish_reason,
    parse_tool_calls,
)
from doubles import ScriptedEngine
from fastapi.testclient import TestClient

NAMES = ["get_weather", "add"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
W, A = ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})

# (text, content, [(name, arguments)], invalid names): what every parser reads
COMMON = [
    ("Hello there.\n", "Hello there.\n", [], []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [W], []),
    (f"Let me check. <tool_call>\n{WEATHER}\n</tool_call>", "Let me check.", [W], []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{ADD}\n</tool_call>", "", [W, A], []),
    (f"<tool_call>{WEATHER}</tool_call> then text", "then text", [W], []),
    ('<tool_call>\n{"name": "nosuch", "arguments": {}}\n</tool_call>', "", [("nosuch", {})], []),  # tags: any name
    ('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "", [("add", {"a": 1})], []),
    ("<tool_call>\nnot json\n</tool_call>", "", [], [None]),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', "", [], [None]),  # no name
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1', "", [], ["add"]),  # cut off
    (f"<tool_call>\n{ADD}\n</tool", "", [A], []),  # only the closing tag cut: the call is complete
    ("<tool_tip> is not a tag", "<tool_tip> is not a tag", [], []),
    # bare JSON naming a tool of the request
    (WEATHER, "", [W], []),
    (f"{WEATHER}\n{ADD}", "", [W, A], []),
    (f"{WEATHER}, {ADD}; ", "", [W, A], []),
    (f"[{WEATHER}, {ADD}]", "", [W, A], []),
    (f"I will look it up.\n{WEATHER}\nDone.", "I will look it up.\nDone.", [W], []),
    (f"Calling: {WEATHER}", "Calling:", [W], []),
    (f"```json\n{WEATHER}\n```", "", [W], []),
    (f"Sure!\n```json\n[{WEATHER},\n {ADD}]\n```\nAnything else?", "Sure!\nAnything else?", [W, A], []),
    (f"```\n{ADD}\n{WEATHER}\n```", "", [A, W], []),
    ('{ "name" : "add" , "parameters" : {"a": 5} }', "", [("add", {"a": 5})], []),
    ('{"name": "add"}', "", [("add", {})], []),
    ('{"type": "function", "function": {"name": "add", "arguments": "{}"}}',  # names no tool at the top: content
     '{"type": "function", "function": {"name": "add", "arguments": "{}"}}', [], []),
    ('{"name": "add", "arguments": {"a": 1,}}', "", [], ["add"]),  # malformed
    ('{"name": "add", "arguments": {"a": 1', "", [], ["add"]),  # cut off
    (f'{WEATHER}\n{{"name": "add", "arguments": {{"a"', "", [W], ["add"]),  # the second call cut off
    # JSON that names no tool of the request stays content
    ('{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', [], []),
    ('{"name": "get_weather_now", "arguments": {}}', '{"name": "get_weather_now", "arguments": {}}', [], []),
    ('{"city": "Paris", "name": "add"}', '{"city": "Paris", "name": "add"}', [], []),
    (f'{{"calls": [{WEATHER}]}}', f'{{"calls": [{WEATHER}]}}', [], []),  # nested: not a top-level call
    (f'{{"result": {WEATHER}}}', f'{{"result": {WEATHER}}}', [], []),
    (f"[1, {ADD}]", f"[1, {ADD}]", [], []),
    ('```json\n{"a": 1}\n```', '```json\n{"a": 1}\n```', [], []),
    ('{"name": "ad', '{"name": "ad', [], []),  # cut before naming a tool: content
]
FAMILY = {
    "llama3_json": [
        ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [A], []),
        ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; ' + WEATHER, "", [A, W], []),
        ('<|python_tag|>{"name": "other", "parameters": {}}', "", [("other", {})], []),  # after a marker: any name
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [A], []),
        ("<|python_tag|>{not json}", "", [], [None]),
    ],
    "mistral": [
        (f"[TOOL_CALLS][{WEATHER}, {ADD}]", "", [W, A], []),
        (f"[TOOL_CALLS] [{ADD}]", "", [A], []),
        (f"[TOOL_CALLS][{ADD}", "", [], ["add"]),  # cut off
    ],
    "hermes": [  # another family's marker is text; a bare call after it is still a call
        ('<|python_tag|>{"name": "other", "parameters": {}}', '<|python_tag|>{"name": "other", "parameters": {}}',
         [], []),
        (f"<|python_tag|>{ADD}", "<|python_tag|>", [A], []),
        (f"[TOOL_CALLS][{ADD}]", "[TOOL_CALLS]", [A], []),
    ],
}
CASES = [(name, *case) for name in PARSERS for case in COMMON]
CASES += [(name, *case) for name, cases in FAMILY.items() for case in cases]
CASES += [("json", *case) for name in ("llama3_json", "mistral") for case in FAMILY[name]]


def _calls(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls", "invalid"), CASES)
def test_parse_per_family(parser: str, text: str, content: str, calls: list, invalid: list) -> None:
    parsed = parse_tool_calls(text, NAMES, parser)
    assert (parsed.content, _calls(parsed.calls), [c["name"] for c in parsed.invalid]) == (content, calls, invalid)
    assert all(c["id"].startswith("call_") for c in parsed.calls + parsed.invalid)
    assert len({c["id"] for c in parsed.calls + parsed.invalid}) == len(calls) + len(invalid)
    for bad in parsed.invalid:  # an invalid call keeps its source text, as the model wrote it
        assert bad["text"] in text and bad["error"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("parser", "text", "content", "calls", "invalid"), CASES)
def test_streamed_in_any_pieces_as_whole(parser: str, text: str, content: str, calls: list, invalid: list,
                                         seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 12)))) if len(text) > 1 else []
    splitter = ToolCallSplitter(tool_names=NAMES, parser=parser)
    deltas = [splitter.feed(text[a:b]) for a, b in zip([0, *cuts], [*cuts, len(text)])]
    rest, got_calls, got_invalid = splitter.finish()
    streamed = "".join(deltas)
    assert streamed + rest == content and _calls(got_calls) == calls
    assert [c["name"] for c in got_invalid] == invalid
    assert content.startswith(streamed)
    if calls or invalid:  # nothing of a call was streamed as content
        assert not any(marker in streamed for marker in ("<tool_call>", '"name"', "```"))


def test_without_tool_parsing_text_passes_through() -> None:
    splitter = ToolCallSplitter(parse_tools=False, tool_names=NAMES)
    assert splitter.feed(WEATHER) == WEATHER
    assert splitter.finish() == ("", [], [])


class _Templated:
    def __init__(self, template) -> None:
        self.chat_template = template


@pytest.mark.parametrize(
    ("template", "parser"),
    [
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
         "{{ '<tool_call>\\n' }}{{ tool_call | tojson }}{{ '\\n</tool_call>' }}", "hermes"),  # Qwen2.5
        ("{{- '<|python_tag|>' + tool_call.name }}<|eom_id|>", "llama3_json"),  # Llama 3.1
        ("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}", "mistral"),
        ({"default": "plain", "tool_use": "<tool_call>"}, "hermes"),  # named templates
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "json"),  # no tool syntax: the generic parser
        (None, "json"),
    ],
)
def test_parser_from_the_chat_template(template, parser: str) -> None:
    assert detect_parser(_Templated(template)) == parser


def test_parser_names_are_checked() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, json"):
        ToolCallSplitter(parser="pythonic")
    with pytest.raises(ValueError, match="tool-call parser"):
        prepare_prompt(ScriptedEngine().tokenizer, [{"role": "user", "content": "x"}], tools=TOOLS,
                       tool_parser="nosuch")


@pytest.mark.parametrize(
    ("calls", "engine_reason", "expected"),
    [([], "stop", "stop"), ([{}], "stop", "tool_calls"), ([], "length", "length"), ([{}], "length", "length")],
)
def test_finish_reason(calls: list, engine_reason: str, expected: str) -> None:
    assert finish_reason(calls, engine_reason) == expected


@pytest.mark.parametrize(
    ("written", "reason", "args"),
    [
        ('{"a": 1, "b": 2', "stop", {"a": 1, "b": 2}),  # cut by the "}}" stop string: closed again
        ('{"a": 1, "b": 2', "length", None),  # cut by max_tokens inside the arguments: not a call
        ('{"a": 1, "b": 2}}\n</tool', "length", {"a": 1, "b": 2}),  # only the call's closing was cut
        ('{"a": 1, "b": 2}', "length", {"a": 1, "b": 2}),
    ],
)
def test_forced_call_cut_by_length_counts_only_with_complete_arguments(written: str, reason: str, args) -> None:
    prefix = '<tool_call>\n{"name": "add", "arguments": '
    splitter = ToolCallSplitter(prefix=prefix, tool_names=NAMES)
    splitter.feed(prefix + written)
    _, calls, invalid = splitter.finish(reason)
    assert (calls[0]["arguments"] if calls else None) == args
    if args is None:
        assert invalid[0]["error"] == CUT_OFF and invalid[0]["text"] == prefix + written


# ---------------------------------------------------------------------------------------- the server
USER = [{"role": "user", "content": "Weather in Paris?"}]
REPLIES = [
    f"I will check.\n```json\n{WEATHER}\n```",
    f"{WEATHER}\n{ADD}",
    f"<tool_call>\n{ADD}\n</tool_call>",
    '{"name": "Alice", "age": 30}',
    "It is sunny.",
]


def _server(reply: str, **kwargs) -> TestClient:
    return TestClient(create_app(ScriptedEngine([reply]), **kwargs))


def _post(c: TestClient, **body) -> dict:
    r = c.post("/v1/chat/completions", json={"model": "scripted", "messages": USER, "tools": TOOLS, **body})
    assert r.status_code == 200, r.text
    return r.json() if not body.get("stream") else _chunks(r.text)


def _chunks(text: str) -> list[dict]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _api_calls(tool_calls: list[dict] | None) -> list[tuple[str, dict]]:
    out = []
    for call in tool_calls or []:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(call["function"]["arguments"], str)  # OpenAI: arguments as a JSON string
        out.append((call["function"]["name"], json.loads(call["function"]["arguments"])))
    return out


@pytest.mark.parametrize("reply", REPLIES)
def test_server_auto_mode_reads_each_form_streamed_or_not(reply: str) -> None:
    expected = parse_tool_calls(reply, NAMES, "json")
    c = _server(reply)
    choice = _post(c, tool_choice="auto")["choices"][0]
    assert _api_calls(choice["message"].get("tool_calls")) == _calls(expected.calls)
    assert (choice["message"]["content"] or "") == expected.content
    assert choice["finish_reason"] == ("tool_calls" if expected.calls else "stop")

    chunks = _chunks(c.post("/v1/chat/completions", json={"model": "scripted", "messages": USER, "tools": TOOLS,
                                                          "stream": True}).text)
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == (choice["message"]["content"] or "")
    streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in streamed] == list(range(len(streamed)))
    assert _api_calls(streamed) == _api_calls(choice["message"].get("tool_calls"))
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == choice["finish_reason"]


@pytest.mark.parametrize(
    ("reply", "body", "content"),
    [
        (WEATHER, {"max_tokens": 30}, WEATHER[:30]),
        (f"<tool_call>\n{WEATHER}\n</tool_call>", {"max_tokens": 40}, f"<tool_call>\n{WEATHER}"[:40]),
        ('{"a": 1, "b": 2}}', {"max_tokens": 8, "tool_choice": {"type": "function", "function": {"name": "add"}}},
         '<tool_call>\n{"name": "add", "arguments": {"a": 1,'),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_server_call_cut_by_max_tokens_is_length_with_its_partial_text(reply: str, body: dict, content: str,
                                                                       stream: bool) -> None:
    c = _server(reply)
    if not stream:
        choice = _post(c, **body)["choices"][0]
        assert (choice["finish_reason"], choice["message"]["content"]) == ("length", content)
        assert "tool_calls" not in choice["message"]
        return
    chunks = _post(c, **body, stream=True)
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == content
    assert not any(d.get("tool_calls") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_server_n_choices_read_calls_as_one_choice_does() -> None:
    long_call = '{"name": "get_weather", "arguments": {"city": "Paris, Ile-de-France, France"}}'  # over 60 tokens
    c = TestClient(create_app(ScriptedEngine([f"```\n{ADD}\n```", long_call])))
    choices = _post(c, n=2, temperature=0.7, max_tokens=60)["choices"]
    assert _api_calls(choices[0]["message"].get("tool_calls")) == [A] and choices[0]["finish_reason"] == "tool_calls"
    assert (choices[1]["finish_reason"], choices[1]["message"]["content"]) == ("length", long_call[:60])


def test_server_parser_option_and_grammar_option() -> None:
    reply = '<|python_tag|>{"name": "lookup", "parameters": {"q": "x"}}'  # after the marker any name is a call
    engine = ScriptedEngine([reply])
    c = TestClient(create_app(engine, tool_call_parser="llama3_json"))
    assert _api_calls(_post(c)["choices"][0]["message"]["tool_calls"]) == [("lookup", {"q": "x"})]
    grammar = json.loads(engine.calls[0]["grammar"].source)
    assert grammar["mode"] == "auto" and grammar["json_args_keys"] == ["parameters", "arguments"]

    engine = ScriptedEngine([reply])
    c = TestClient(create_app(engine, tool_call_parser="hermes", auto_tool_grammar=False))
    assert _post(c)["choices"][0]["message"]["content"] == reply  # not a Hermes marker, not a tool's name
    assert engine.calls[0]["grammar"] is None  # no grammar in auto mode
    _post(c, tool_choice="required")
    assert engine.calls[1]["grammar"] is not None  # a required call keeps its grammar
    with pytest.raises(ValueError, match="tool-call parser"):
        create_app(ScriptedEngine(), tool_call_parser="nosuch")


# ---------------------------------------------------------------------------------------- ChatAgentSpec
@pytest.mark.parametrize("reply", [*REPLIES, '{"name": "add", "arguments": {"a": 1,}}'])
def test_chat_agentspec_reads_the_same_calls_as_the_server(reply: str) -> None:
    server = _post(_server(reply))["choices"][0]["message"]
    llm = ChatAgentSpec(engine=ScriptedEngine([reply])).bind_tools(TOOLS)
    message = llm.invoke(USER)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == _api_calls(server.get("tool_calls"))
    assert all(c["id"].startswith("call_") for c in message.tool_calls)
    streamed = None
    for chunk in ChatAgentSpec(engine=ScriptedEngine([reply])).bind_tools(TOOLS).stream(USER):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == _api_calls(server.get("tool_calls"))
    # the server keeps invalid calls as text (OpenAI has no invalid calls); LangChain reports them
    invalid_text = "\n".join(c["text"] for c in parse_tool_calls(reply, NAMES, "json").invalid)
    assert message.content == (server["content"] or "").removesuffix(invalid_text).rstrip("\n")
    assert len(message.invalid_tool_calls) == (1 if invalid_text else 0)


def test_chat_agentspec_parser_field() -> None:
    reply = '[TOOL_CALLS][{"name": "lookup", "arguments": {"q": "x"}}]'
    assert ChatAgentSpec(engine=ScriptedEngine([reply]), tool_call_parser="hermes").bind_tools(TOOLS).invoke(
        USER).tool_calls == []
    message = ChatAgentSpec(engine=ScriptedEngine([reply]), tool_call_parser="mistral").bind_tools(TOOLS).invoke(USER)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("lookup", {"q": "x"})]
