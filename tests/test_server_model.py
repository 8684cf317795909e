"""The server on the real default model, driven by the real clients (openai, langchain-openai)."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest
from agentspec.integrations.server import create_app
from agentspec.stores import open_store
from doubles import serve_in_thread

from agentspec.lookahead import CostCurve, LookaheadPolicy
from agentspec.lookahead.cost import FP32_CPU_CURVE

pytestmark = pytest.mark.model
KEY = "sk-model-test"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(default_engine):
    app = create_app(default_engine, api_keys=KEY, max_queue=4, default_max_tokens=16)
    with serve_in_thread(app) as url:
        yield url, default_engine.model_name


def test_openai_client_multi_turn_tool_session(server) -> None:
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    hits, tool_rounds = [], 0
    for turn in range(3):
        choice = "required" if turn == 0 else "auto"
        resp = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                              max_tokens=16, temperature=0, user="openai-session")
        stats = resp.model_extra["agentspec"]["stats"]
        hits.append(stats["accepted_by_source"].get("session", 0) > 0 or stats["hit_rate"] > 0)
        message = resp.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls or []:
            tool_rounds += 1
            args = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"18 C in {args.get('city')}"})
        if not message.tool_calls:
            messages.append({"role": "user", "content": "And tomorrow?"})
    assert tool_rounds >= 1
    assert resp.usage.completion_tokens > 0
    assert any(hits[1:])  # the second and later calls draft from the session cache


def test_langchain_chat_openai_against_the_server(server) -> None:
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI

    url, model = server
    llm = ChatOpenAI(base_url=url + "/v1", api_key=KEY, model=model, temperature=0, max_tokens=16, max_retries=0,
                     default_headers={"X-Session-Id": "chatopenai"})
    history = [("user", "What is the weather in Oslo?")]
    first = llm.bind_tools(TOOLS, tool_choice="get_weather").invoke(history)
    assert first.tool_calls and first.tool_calls[0]["name"] == "get_weather"
    history += [first, ToolMessage("3 C, snow", tool_call_id=first.tool_calls[0]["id"])]
    chunks = list(llm.bind_tools(TOOLS).stream(history))
    assert chunks and all(c.type == "AIMessageChunk" for c in chunks)
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) > 0


def test_stream_and_non_stream_greedy_answers_are_identical(server) -> None:
    url, model = server
    body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 16,
            "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        full = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        text = ""
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if event["choices"]:
                        text += event["choices"][0]["delta"].get("content") or ""
    assert full and text == full


def test_200_concurrent_requests_all_answered_and_health_ok(server) -> None:
    url, model = server
    statuses: list[int] = []
    lock = threading.Lock()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                      limits=httpx.Limits(max_connections=200)) as http:
        def one(i: int) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 2,
                    "temperature": 0, "stream": i % 3 == 0}
            try:
                r = http.post("/v1/chat/completions", json=body)
                status = r.status_code
                if status == 200 and not body["stream"]:
                    assert r.json()["choices"][0]["message"] is not None
            except Exception:  # noqa: BLE001 - recorded as a failure below
                status = -1
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(statuses) == 200 and set(statuses) <= {200, 503}, sorted(set(statuses))
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["in_flight"] == 0


def test_omitted_temperature_is_greedy_like_every_entry_point(server, default_engine) -> None:
    url, model = server
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as http:
        answers = [http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12,
                                                           "seed": seed}).json()["choices"][0]["message"]["content"]
                   for seed in (1, 2)]
    greedy = default_engine.generate(messages, max_new_tokens=12).text
    assert answers == [greedy, greedy]


def test_openai_client_n_choices_from_one_search(server) -> None:
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    resp = client.chat.completions.create(model=model, messages=messages, n=3, temperature=1.0, seed=11,
                                          max_tokens=12)
    one = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=1)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in resp.choices)
    stats = resp.model_extra["agentspec"]["stats"]
    assert (stats["policy"], stats["width"]) == ("best_of_n", 3)
    assert resp.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert 3 <= resp.usage.completion_tokens == stats["generated_tokens"] <= 3 * 12  # summed over the choices
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


# ------------------------------------------------------------------ tenants through the real server
QUESTION = [{"role": "user", "content": "Write the numbers from one to twenty in words, separated by commas."}]


@pytest.mark.parametrize("share_global", [False, True])
def test_tenants_cannot_draft_from_each_other(default_engine, share_global: bool) -> None:
    """Two keys, the same session id and question: the second tenant drafts nothing from the first's
    output (unless the global tree is shared), and the store keeps their sessions apart."""
    suffix = uuid.uuid4().hex[:8]
    alice, bob = f"alice-{suffix}", f"bob-{suffix}"
    app = create_app(default_engine, api_keys={"key-a": alice, "key-b": bob}, share_global=share_global,
                     default_max_tokens=40)
    for tenant in app.state.tenants.values():  # draft by a fixed cost curve, not one measured on a busy machine
        tenant.policy = LookaheadPolicy(CostCurve(FP32_CPU_CURVE, ema=0.0))
    body = {"model": default_engine.model_name, "messages": QUESTION}
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=600) as http:
        answers = [http.post("/v1/chat/completions", json=body, headers={
            "Authorization": f"Bearer {key}", "X-Session-Id": "shared-session"}).json() for key in ("key-a", "key-b")]
    first, second = (a["agentspec"]["stats"]["accepted_by_source"] for a in answers)
    assert answers[0]["choices"][0]["message"]["content"] == answers[1]["choices"][0]["message"]["content"]
    assert "session" not in second  # bob's "shared-session" is not alice's
    if share_global:
        assert second.get("global", 0) > first.get("global", 0)  # alice's answer is in the pooled tree
    else:
        assert "global" not in second, second
    store = open_store()  # the engine's: the persistent default under AGENTSPEC_HOME
    for tenant in (alice, bob):
        if share_global:  # one drafter and store view for all; the tenant's name prefixes its session ids
            assert store.session_info(f"{tenant}/shared-session").calls == 1
        else:
            assert store.scoped(tenant).session_info("shared-session").calls == 1
    assert store.session_info("shared-session") is None


def test_session_of_another_tokenizer_is_a_clear_error(server) -> None:
    """A session id the store holds for another tokenizer: a 400 without streaming, an error event and
    [DONE] with it; nothing is mixed into the session."""
    url, model = server
    store = open_store()
    store.append("foreign-session", [1, 2, 3], [4, 5], fingerprint="another-tokenizer")
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "user": "foreign-session"}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "session_tokenizer_mismatch", r.text
        events = [line[6:] for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text
                  .splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "session_tokenizer_mismatch"
        assert http.get("/health").json()["in_flight"] == 0
    assert store.session_info("foreign-session").calls == 1


def test_logprobs_through_the_openai_client_equal_the_engines(server, default_engine) -> None:
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Name three colours."}]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    direct = default_engine.generate(messages, max_new_tokens=12, logprobs=3)
    assert [e.logprob for e in content] == pytest.approx([e.logprob for e in direct.logprobs], abs=1e-5)
    assert "".join(e.token for e in content) == direct.text == resp.choices[0].message.content
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    assert all(e.logprob <= 0 for e in content)
