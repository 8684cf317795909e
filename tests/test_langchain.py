"""ChatAgentSpec mechanics on a scripted engine (fast), tool-call parsing, LangChain's standard unit tests."""

from __future__ import annotations

import asyncio
import json

import pytest
from agentspec.integrations import langchain
from agentspec.integrations.common import forced_prefix, normalize_tool_choice
from agentspec.integrations.langchain import ChatAgentSpec
from agentspec.integrations.toolcalls import ToolCallSplitter
from doubles import ScriptedEngine
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import BaseModel

from agentspec.engine import Engine

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class TestChatAgentSpecUnit(ChatModelUnitTests):
    """LangChain's standard unit tests (constructor, bind_tools, structured output, ls params, init time)."""

    @property
    def chat_model_class(self) -> type[ChatAgentSpec]:
        return ChatAgentSpec

    @property
    def chat_model_params(self) -> dict:
        return {"model": None}  # the default model; constructing must load nothing

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def test_constructor_loads_nothing() -> None:
    llm = ChatAgentSpec(max_tokens=8)
    assert llm._resolved_engine is None and llm.engine is None
    assert llm.model_name == "smollm2-135m-instruct"


def test_engine_settings_reach_the_shared_engine(monkeypatch) -> None:
    built = []
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **kw: built.append(kw) or object()))
    monkeypatch.setattr(langchain, "ENGINES", {})
    engine = ChatAgentSpec(kv_dtype="float16", store="memory").get_engine()
    assert built == [{"dtype": "float32", "quantize": None, "store": "memory", "kv_dtype": "float16",
                      "matmul": "float32"}]
    assert ChatAgentSpec(kv_dtype="float16", store="memory").get_engine() is engine  # shared, not built again
    ChatAgentSpec(store="memory").get_engine()
    assert built[-1]["kv_dtype"] == "float32" and len(built) == 2
    ChatAgentSpec(matmul="int8", store="memory").get_engine()
    assert built[-1]["matmul"] == "int8" and len(built) == 3


# ------------------------------------------------------------------ streaming splitter
@pytest.mark.parametrize(
    ("deltas", "content", "names", "n_invalid"),
    [
        (["Hello", " world", "\n"], "Hello world\n", [], 0),
        (["I will call.\n<tool", "_call>\n", '{"name": "add", "arguments": {"a": 1}}', "\n</tool_call>"],
         "I will call.", ["add"], 0),
        ([CALL, "\n", CALL.replace("add", "mul")], "", ["add", "mul"], 0),
        (['<tool_call>\n{"name": "add", "arguments": {"a": 1'], "", [], 1),  # cut by max_tokens
        (['<tool_call>\n{"arguments": {}}\n</tool_call>'], "", [], 1),  # no name
        (['<tool_call>\nnot json\n</tool_call>'], "", [], 1),
        (["<tool_", "tip> is not a tag"], "<tool_tip> is not a tag", [], 0),  # a held-back partial tag
        (["Before ", CALL, " after"], "Before\nafter", ["add"], 0),
        (['<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'], "", ["add"], 0),  # string args
    ],
)
def test_splitter_content_and_calls(deltas: list[str], content: str, names: list[str], n_invalid: int) -> None:
    splitter = ToolCallSplitter()
    streamed = "".join(splitter.feed(d) for d in deltas)
    rest, calls, invalid = splitter.finish()
    assert streamed + rest == content
    assert [c["name"] for c in calls] == names
    assert len(invalid) == n_invalid
    assert "<tool_call>" not in streamed  # never leaks a half-streamed block


def test_splitter_without_tool_parsing_passes_text_through() -> None:
    splitter = ToolCallSplitter(parse_tools=False)
    assert splitter.feed(CALL) == CALL
    assert splitter.finish() == ("", [], [])


@pytest.mark.parametrize(
    ("choice", "expected"),
    [(None, None), ("auto", "auto"), ("none", "none"), ("any", "required"), (True, "required"),
     ("required", "required"), ("add", {"type": "function", "function": {"name": "add"}}),
     ({"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "add"}})],
)
def test_normalize_tool_choice(choice, expected) -> None:
    assert normalize_tool_choice(choice) == expected


def test_forced_prefix() -> None:
    tools = [{"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "mul"}}]
    assert forced_prefix(tools, "auto") == ""
    assert forced_prefix(tools, "required") == '<tool_call>\n{"name": "'
    assert forced_prefix(tools[:1], "required").endswith('"add", "arguments": ')
    assert forced_prefix(tools, {"type": "function", "function": {"name": "mul"}}).endswith('"mul", "arguments": ')
    with pytest.raises(ValueError, match="'sub'"):
        forced_prefix(tools, {"type": "function", "function": {"name": "sub"}})


# ------------------------------------------------------------------ the chat model on a scripted engine
def test_invoke_tool_calls_usage_and_stats() -> None:
    engine = ScriptedEngine(["Sure. " + CALL])
    msg = ChatAgentSpec(engine=engine, session_id="s1").bind_tools([add]).invoke("What is 1 + 2?")
    assert msg.content == "Sure."
    assert msg.tool_calls[0]["name"] == "add" and msg.tool_calls[0]["args"] == {"a": 1, "b": 2}
    assert msg.usage_metadata["output_tokens"] == len(engine.calls and "Sure. " + CALL)
    assert msg.response_metadata["finish_reason"] == "tool_calls"
    assert msg.response_metadata["speculation"]["output_tokens"] == len("Sure. " + CALL)
    assert '"name": "add"' in engine.calls[0]["prompt"]  # the tool schema reached the prompt
    assert engine.calls[0]["session"] == "s1"


def test_invalid_tool_call_stays_invalid_in_invoke_and_stream() -> None:
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 1'
    llm = ChatAgentSpec(engine=ScriptedEngine([bad]))
    msg = llm.invoke("x")
    assert msg.tool_calls == [] and msg.invalid_tool_calls[0]["name"] == "add"
    full = None
    for chunk in llm.stream("x"):
        full = chunk if full is None else full + chunk
    assert full.tool_calls == [] and len(full.invalid_tool_calls) == 1


def test_stream_deltas_last_chunk_and_callbacks() -> None:
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    handler = Tokens()
    llm = ChatAgentSpec(engine=ScriptedEngine(["one two three"]))
    chunks = list(llm.stream("x", config={"callbacks": [handler]}))
    assert [c.content for c in chunks] == ["one", " two", " three", ""]
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == 13
    assert "".join(handler.tokens) == "one two three"


def test_session_from_config_and_batch_and_async() -> None:
    engine = ScriptedEngine(["a reply"])
    llm = ChatAgentSpec(engine=engine, session_id="default")
    llm.invoke("x", config={"configurable": {"session_id": "thread-7"}})
    llm.invoke("x")
    llm.batch(["x", "y"], config={"configurable": {"session_id": "b"}})
    asyncio.run(llm.ainvoke("x", config={"configurable": {"session_id": "async"}}))

    async def consume() -> str:
        return "".join([c.content async for c in llm.astream("x", config={"configurable": {"session_id": "as"}})])

    assert asyncio.run(consume()) == "a reply"
    assert [c["session"] for c in engine.calls] == ["thread-7", "default", "b", "b", "async", "as"]


def test_second_call_of_session_reports_session_drafts() -> None:
    llm = ChatAgentSpec(engine=ScriptedEngine(["same answer"]), session_id="s")
    first = llm.invoke("x").response_metadata["speculation"]
    second = llm.invoke("x").response_metadata["speculation"]
    assert first["accepted_by_source"] == {} and second["accepted_by_source"]["session"] > 0


def test_stop_and_sampling_parameters_reach_the_engine() -> None:
    engine = ScriptedEngine(["abc STOP def"])
    llm = ChatAgentSpec(engine=engine, temperature=0.7, seed=3, max_tokens=50)
    assert llm.invoke("x", stop=["STOP"]).content == "abc "
    assert engine.calls[0]["stop"] == ["STOP"] and engine.calls[0]["temperature"] == 0.7
    assert engine.calls[0]["seed"] == 3 and engine.calls[0]["max_new_tokens"] == 50
    llm.invoke("x", max_tokens=5)
    assert engine.calls[1]["max_new_tokens"] == 5
    with pytest.raises(TypeError, match="frequency_penalty"):
        llm.invoke("x", frequency_penalty=1.0)


def test_logprobs_in_response_metadata_as_chat_openai_puts_them() -> None:
    llm = ChatAgentSpec(engine=ScriptedEngine(["ok"]), logprobs=True)
    assert [(e["token"], e["logprob"], e["top_logprobs"]) for e in
            llm.invoke("x").response_metadata["logprobs"]["content"]] == [("o", -0.5, []), ("k", -0.5, [])]
    bound = ChatAgentSpec(engine=ScriptedEngine(["ok"])).bind(logprobs=True, top_logprobs=1)
    first = bound.invoke("x").response_metadata["logprobs"]["content"][0]
    assert first["top_logprobs"] == [{"token": "o", "logprob": -0.5, "bytes": [ord("o")]}]
    assert "logprobs" not in ChatAgentSpec(engine=ScriptedEngine(["ok"])).invoke("x").response_metadata
    with pytest.raises(ValueError, match="logprobs with n > 1"):
        ChatAgentSpec(engine=ScriptedEngine(["ok"]), n=2, temperature=1.0, logprobs=True).invoke("x")


def test_conversation_with_tool_messages_is_rendered() -> None:
    engine = ScriptedEngine(["3"])
    llm = ChatAgentSpec(engine=engine)
    history = [
        HumanMessage("What is 1 + 2?"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
        ToolMessage("3", tool_call_id="c1"),
    ]
    llm.bind_tools([add]).invoke(history)
    prompt = engine.calls[0]["prompt"]
    assert '<|assistant|><tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}' in prompt
    assert "<|tool|>3" in prompt


def test_forced_tool_choice_and_structured_output() -> None:
    class Sum(BaseModel):
        """Two numbers to add."""

        a: int
        b: int

    engine = ScriptedEngine(['{"a": 4, "b": 5}}'])
    out = ChatAgentSpec(engine=engine).with_structured_output(Sum).invoke("four plus five")
    assert out == Sum(a=4, b=5)
    assert engine.calls[0]["prompt"].endswith('<tool_call>\n{"name": "Sum", "arguments": ')
    # the forced call's arguments are held to Sum's schema by a grammar, which also ends the call
    assert engine.calls[0]["grammar"] is not None
    assert engine.calls[0]["stop"] == []


def test_prompt_over_the_window_names_both_lengths() -> None:
    llm = ChatAgentSpec(engine=ScriptedEngine(context_window=100))
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens but the model's context window is 100"):
        llm.invoke("x" * 200)


def test_tool_schema_is_openai_style() -> None:
    engine = ScriptedEngine(["ok"])
    ChatAgentSpec(engine=engine).bind_tools([add]).invoke("x")
    schema = engine.calls[0]["prompt"].split("JSON schemas:\n")[1].split("\n")[0]
    assert json.loads(schema)["parameters"]["required"] == ["a", "b"]


@pytest.mark.parametrize(
    ("generated", "args"),
    [
        ('{"a": 1, "b": 2', {"a": 1, "b": 2}),  # cut by the "}}" stop
        ('{"a": {"b": 1', {"a": {"b": 1}}),
        ('\n{"city": "Paris"}} trailing', {"city": "Paris"}),
        ('{"a": ', None),  # hopeless: stays an invalid call
    ],
)
def test_forced_call_is_closed_after_the_stop(generated: str, args) -> None:
    prefix = forced_prefix([{"type": "function", "function": {"name": "f"}}], "required")
    splitter = ToolCallSplitter(prefix=prefix)
    splitter.feed(prefix)
    splitter.feed(generated)
    _, calls, invalid = splitter.finish()
    assert (calls[0]["arguments"] if calls else None) == args
    assert len(invalid) == (args is None)


def test_rambling_forced_call_keeps_its_complete_members() -> None:
    prefix = forced_prefix([{"type": "function", "function": {"name": "f"}}], "required")
    splitter = ToolCallSplitter(prefix=prefix)
    splitter.feed(prefix + '\n{"city": "Par,is", "unit": "C", "properties": {\n    "type": "str')
    _, calls, _ = splitter.finish()
    assert calls[0]["arguments"] == {"city": "Par,is", "unit": "C"}


# ------------------------------------------------------------------ token counts and LangGraph threads
def test_token_counts_use_the_engines_tokenizer() -> None:
    from langchain_core.messages import SystemMessage, trim_messages

    llm = ChatAgentSpec(engine=ScriptedEngine())
    assert llm.get_token_ids("hello world") == [ord(c) for c in "hello world"]  # the engine's (one per char)
    assert llm.get_num_tokens("hello world") == 11
    history = [SystemMessage("sys"), HumanMessage("a" * 50), AIMessage("b" * 50), HumanMessage("last")]
    n = llm.get_num_tokens_from_messages(history)
    assert n == len("<|system|>sys\n<|user|>" + "a" * 50 + "\n<|assistant|>" + "b" * 50 + "\n<|user|>last\n"
                    "<|assistant|>")  # the chat template's tokens included
    trimmed = trim_messages(history, token_counter=llm, max_tokens=n - 60, strategy="last", include_system=True)
    assert [m.content for m in trimmed] == ["sys", "last"]


def test_token_counts_before_the_engine_loads_nothing_but_the_tokenizer(default_tokenizer) -> None:
    llm = ChatAgentSpec()
    assert llm.get_num_tokens("hello world") == len(default_tokenizer.encode("hello world")) > 0
    assert llm._resolved_engine is None


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_thread_id_names_the_session() -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.prebuilt import create_react_agent

    engine = ScriptedEngine([CALL, "The sum is 3."])
    agent = create_react_agent(ChatAgentSpec(engine=engine), [add], checkpointer=InMemorySaver())
    out = agent.invoke({"messages": [("user", "What is 1 + 2?")]}, {"configurable": {"thread_id": "thread-9"}})
    assert out["messages"][-1].content == "The sum is 3."
    assert any(m.type == "tool" and m.content == "3" for m in out["messages"])  # the tool really ran
    assert [c["session"] for c in engine.calls] == ["thread-9", "thread-9"]
    ChatAgentSpec(engine=engine).invoke("x", config={"configurable": {"thread_id": "t", "session_id": "s"}})
    assert engine.calls[-1]["session"] == "s"  # an explicit session_id wins
