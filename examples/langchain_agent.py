"""A small tool-using agent loop written for any LangChain chat model, run on agentspec.

The loop only uses the standard chat-model API (``bind_tools``, ``invoke``, ``AIMessage.tool_calls``,
``ToolMessage``), so the model is one line to swap::

    python examples/langchain_agent.py                       # ChatAgentSpec, offline, default model
    python examples/langchain_agent.py --base-url http://127.0.0.1:8000/v1   # ChatOpenAI -> agentspec serve

All questions run in one agent session (``configurable.session_id``): from the second model call
on, drafts come from the session's cache, and the statistics printed at the end show it.
"""

from __future__ import annotations

import argparse
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from agentspec.stats import SpecStats

CITIES = {"paris": "18 C, light rain", "tokyo": "24 C, sunny", "oslo": "3 C, snow"}


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return CITIES.get(city.strip().lower(), f"no weather data for {city}")


TOOLS = [get_weather]  # a 135M model picks among several tools poorly; larger models take more


def run_agent(llm: BaseChatModel, question: str, *, session_id: str, max_steps: int = 3,
              on_call: Any = None) -> tuple[str, list[BaseMessage]]:
    """Answer ``question``: call tools until the model answers in text (first step must call a tool)."""
    by_name = {t.name: t for t in TOOLS}
    config = {"configurable": {"session_id": session_id}}
    messages: list[BaseMessage] = [
        SystemMessage("You are a helpful assistant. Use the tools, then answer in one short sentence."),
        HumanMessage(question),
    ]
    for step in range(max_steps):
        # common agent pattern: force a tool on the first step, let the model decide afterwards
        bound = llm.bind_tools(TOOLS, tool_choice="any" if step == 0 else "auto")
        reply = bound.invoke(messages, config=config)
        if on_call:
            on_call(reply)
        messages.append(reply)
        if not reply.tool_calls:
            return str(reply.content), messages
        for call in reply.tool_calls:
            fn = by_name.get(call["name"])
            try:
                result = fn.invoke(call["args"]) if fn else f"unknown tool {call['name']!r}"
            except Exception as exc:  # noqa: BLE001 - a tool error is an observation for the model
                result = f"error: {exc}"
            messages.append(ToolMessage(str(result), tool_call_id=call["id"], name=call["name"]))
    final = llm.invoke(messages, config=config)  # out of steps: answer without tools
    if on_call:
        on_call(final)
    messages.append(final)
    return str(final.content), messages


def make_llm(base_url: str | None, max_tokens: int, session: str, api_key: str = "unused") -> BaseChatModel:
    if base_url:
        from langchain_openai import ChatOpenAI

        # the server reads the session from a header: ChatOpenAI does not see LangChain's configurable
        return ChatOpenAI(base_url=base_url, api_key=api_key, model="smollm2-135m-instruct",
                          temperature=0, max_tokens=max_tokens, default_headers={"X-Session-Id": session})
    from agentspec.integrations.langchain import ChatAgentSpec

    return ChatAgentSpec(temperature=0, max_tokens=max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="use ChatOpenAI against an `agentspec serve` at this URL")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--session", default="weather-agent")
    parser.add_argument("--api-key", default="unused", help="the server's API key, if it needs one")
    args = parser.parse_args()
    llm = make_llm(args.base_url, args.max_tokens, args.session, args.api_key)
    total = SpecStats()

    def on_call(reply: Any) -> None:
        stats = reply.response_metadata.get("speculation")
        if stats:
            total.add(SpecStats.from_dict(stats))
            print(f"  call: {stats['output_tokens']} tokens, {stats['tokens_per_step']:.2f} tokens/step, "
                  f"drafts accepted by source {stats['accepted_by_source']}")

    for question in ["What is the weather in Paris?", "What is the weather in Tokyo?"]:
        print(f"Q: {question}")
        answer, _ = run_agent(llm, question, session_id=args.session, on_call=on_call)
        print(f"A: {answer}\n")
    if total.output_tokens:
        print(f"session {args.session!r}: {total.output_tokens} tokens in {total.steps} steps "
              f"({total.tokens_per_step:.2f} tokens/step), cache hit rate {total.hit_rate:.0%}, "
              f"accepted drafts by source {total.accepted_by_source}")


if __name__ == "__main__":
    main()
