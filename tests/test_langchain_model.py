"""ChatAgentSpec on the real default model: LangChain's standard integration tests and an agent loop."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import uuid

import pytest
from agentspec.integrations import langchain as lc
from agentspec.integrations.langchain import ChatAgentSpec
from langchain_tests.integration_tests import ChatModelIntegrationTests

from agentspec.engine import Engine
from agentspec.lookahead import CostCurve, LookaheadPolicy
from agentspec.lookahead.cost import FP32_CPU_CURVE

pytestmark = pytest.mark.model
WEAK = "SmolLM2-135M cannot do this task reliably"


@pytest.fixture(autouse=True, scope="module")
def _share_default_engine(default_engine):
    """Every ChatAgentSpec built with default settings runs on the session's one engine, whatever
    key ``shared_engine`` files it under; building any other real model in this module fails at
    once (not a second model loaded in silence)."""
    signature = inspect.signature(Engine.from_pretrained)

    def from_pretrained(*args, **kwargs):
        settings = signature.bind(*args, **kwargs).arguments
        if any(value != signature.parameters[name].default for name, value in settings.items()):
            raise AssertionError(f"a second real model would load here: Engine.from_pretrained({settings})")
        return default_engine

    engines = dict(lc.ENGINES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "from_pretrained", from_pretrained)
        yield
    lc.ENGINES.clear()
    lc.ENGINES.update(engines)


def test_default_settings_run_on_the_sessions_one_engine(default_engine) -> None:
    assert ChatAgentSpec().get_engine() is default_engine
    assert ChatAgentSpec(max_tokens=16).get_engine() is default_engine


_SCHEMA_ARGUMENT_TESTS = [
    "test_structured_output",
    "test_structured_output_async", "test_structured_output_pydantic_2_v1", "test_structured_output_optional_param",
    "test_agent_loop", "test_unicode_tool_call_integration",
]


def _xfail(name: str, reason: str):
    """The base test ``name`` (its fixtures and parametrization kept), marked expected-to-fail."""
    base = getattr(ChatModelIntegrationTests, name)
    if inspect.iscoroutinefunction(base):
        async def test(self, *args, **kwargs):
            return await base(self, *args, **kwargs)
    else:
        def test(self, *args, **kwargs):
            return base(self, *args, **kwargs)
    return pytest.mark.xfail(reason=reason, strict=True)(functools.wraps(base)(test))


class TestChatAgentSpecIntegration(ChatModelIntegrationTests):
    """The standard suite; flags say what the model really supports (text in, text/tool calls out)."""

    @property
    def chat_model_class(self) -> type[ChatAgentSpec]:
        return ChatAgentSpec

    @property
    def chat_model_params(self) -> dict:
        return {"max_tokens": 16}  # short answers: CPU time

    @property
    def has_tool_choice(self) -> bool:
        return True  # forced by starting the answer with the call

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @pytest.mark.xfail(reason=f"{WEAK}: structured few-shot answers need a model that follows examples", strict=True)
    def test_structured_few_shot_examples(self, *args) -> None:
        super().test_structured_few_shot_examples(*args)

    # Tool calls (forced or chosen) now pass: their arguments are held to the tool's schema by a grammar.
    # These still fail on a 135M model (values it cannot get right, answers cut at 16 tokens). Strict:
    # the day one passes, the suite fails until its mark goes.
    for _name in _SCHEMA_ARGUMENT_TESTS:
        locals()[_name] = _xfail(_name, f"{WEAK}: arguments matching the tool schema")


@pytest.fixture
def pinned_cost_curve(default_engine, monkeypatch):
    """The engine drafts by a fixed cost curve (not one measured, nor nudged, on this busy machine)."""
    monkeypatch.setattr(default_engine, "policy", LookaheadPolicy(CostCurve(FP32_CPU_CURVE, ema=0.0)))


def _from_cache(stats: dict) -> int:
    # an accepted node is credited to the tree with the highest calibrated estimate among those that
    # proposed it; this session's earlier outputs live in its session tree and in the global tree
    return stats["accepted_by_source"].get("session", 0) + stats["accepted_by_source"].get("global", 0)


def test_agent_loop_session_drafts_from_its_cache(pinned_cost_curve) -> None:
    """The example's agent loop, two questions in one session: later calls accept session drafts."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from langchain_agent import run_agent

    llm = ChatAgentSpec(max_tokens=24)
    stats = []
    session = f"agent-test-{uuid.uuid4().hex}"
    for question in ["What is the weather in Paris?", "What is the weather in Paris?"]:
        answer, messages = run_agent(llm, question, session_id=session, max_steps=2,
                                     on_call=lambda m: stats.append(m.response_metadata["speculation"]))
        assert isinstance(answer, str)
        assert any(m.type == "tool" for m in messages)  # a tool really ran
    assert len(stats) >= 4
    assert any(_from_cache(s) > 0 for s in stats[1:]), stats[1:]


@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_react_agent_thread_is_one_session(pinned_cost_curve) -> None:
    """LangGraph's prebuilt ReAct agent with a checkpointer: the thread is the session, and it drafts from it."""
    from langchain_core.tools import tool
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.prebuilt import create_react_agent

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"18 C, light rain in {city}"

    agent = create_react_agent(ChatAgentSpec(max_tokens=24), [get_weather], checkpointer=InMemorySaver())
    thread = f"thread-{uuid.uuid4().hex}"
    config = {"configurable": {"thread_id": thread}, "recursion_limit": 6}
    for _ in range(2):
        out = agent.invoke({"messages": [("user", "What is the weather in Paris?")]}, config)
    replies = [m for m in out["messages"] if m.type == "ai"]
    assert len(replies) >= 2
    assert {m.response_metadata["session_id"] for m in replies} == {thread}
    assert any(_from_cache(m.response_metadata["speculation"]) > 0 for m in replies[1:])
