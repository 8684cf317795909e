"""The OpenAI-compatible server on a scripted engine: protocol, errors, auth, tenants, queue, cancellation."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from agentspec.integrations.middleware import parse_api_keys
from agentspec.integrations.server import create_app
from doubles import ScriptedEngine, serve_in_thread
from fastapi.testclient import TestClient

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CALL = 'Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def client(engine: ScriptedEngine | None = None, **kwargs) -> TestClient:
    return TestClient(create_app(engine or ScriptedEngine(), api_keys=KEY, **kwargs))


def post(c: TestClient, body: dict | str | bytes, headers: dict | None = None) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return c.post("/v1/chat/completions", content=content, headers=headers)


def sse_events(text: str) -> list[dict | str]:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models() -> None:
    c = client()
    assert c.get("/health").json()["status"] == "ok"
    models = c.get("/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "scripted"
    assert c.get("/v1/models/scripted", headers=AUTH).status_code == 200
    assert c.get("/v1/models/other", headers=AUTH).status_code == 404


def test_completion_with_tool_calls_usage_and_stats() -> None:
    r = post(client(ScriptedEngine([CALL])), {"model": "scripted", "messages": USER, "tools": TOOLS})
    assert r.status_code == 200
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me add."
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "add" and json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    assert body["usage"]["completion_tokens"] == len(CALL)
    assert body["agentspec"]["stats"]["output_tokens"] == len(CALL)


@pytest.mark.parametrize("reply", ["Hello there, friend. How are you?", CALL, "<tool_call>\n{bad json\n</tool_call>"])
def test_stream_and_non_stream_answers_are_identical(reply: str) -> None:
    c = client(ScriptedEngine([reply]))
    body = {"model": "scripted", "messages": USER, "tools": TOOLS}
    full = post(c, body).json()["choices"][0]
    events = sse_events(post(c, {**body, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    calls = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls", [])]
    assert content == (full["message"]["content"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in full["message"].get("tool_calls", [])]
    finish = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1]
    assert finish == full["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(reply)


def test_logprobs_in_openai_shape_chat_text_and_streamed() -> None:
    c = client(ScriptedEngine(["Hi!"]))
    body = {"model": "scripted", "messages": USER, "logprobs": True, "top_logprobs": 2}
    logprobs = post(c, body).json()["choices"][0]["logprobs"]
    assert [e["token"] for e in logprobs["content"]] == ["H", "i", "!"]
    first = logprobs["content"][0]
    assert first["logprob"] == -0.5 and first["bytes"] == [ord("H")]
    assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [("H", -0.5), ("I", -1.5)]
    assert post(c, {**body, "top_logprobs": None}).json()["choices"][0]["logprobs"]["content"][0][
        "top_logprobs"] == []
    assert post(c, {"model": "scripted", "messages": USER}).json()["choices"][0]["logprobs"] is None

    events = sse_events(post(c, {**body, "stream": True}).text)[:-1]
    streamed = [e for ch in events for e in ((ch["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == logprobs["content"]  # all of them, with the finish reason

    text = c.post("/v1/completions", headers=AUTH, json={"model": "scripted", "prompt": "hi", "logprobs": 1})
    choice = text.json()["choices"][0]
    assert choice["logprobs"] == {"tokens": ["H", "i", "!"], "token_logprobs": [-0.5] * 3,
                                  "top_logprobs": [{"H": -0.5}, {"i": -0.5}, {"!": -0.5}], "text_offset": [0, 1, 2]}


def test_parameters_reach_the_engine() -> None:
    engine = ScriptedEngine(["abc STOP def"])
    c = client(engine)
    r = post(c, {"model": "scripted", "messages": USER, "stop": "STOP", "max_completion_tokens": 40,
                 "temperature": 0.5, "top_p": 0.9, "seed": 7, "user": "u1"})
    assert r.json()["choices"][0]["message"]["content"] == "abc "
    call = engine.calls[0]
    assert (call["stop"], call["max_new_tokens"], call["temperature"], call["seed"], call["session"]) == (
        ["STOP"], 40, 0.5, 7, "u1")
    post(c, {"model": "scripted", "messages": USER, "max_tokens": 3, "user": "u1"}, {"X-Session-Id": "hdr"})
    assert engine.calls[1]["session"] == "hdr" and engine.calls[1]["max_new_tokens"] == 3
    assert post(c, {"model": "scripted", "messages": USER, "max_tokens": 3}).json()["choices"][0][
        "finish_reason"] == "length"


def test_tool_choice_forces_and_none_disables() -> None:
    engine = ScriptedEngine(['{"a": 1, "b": 2}}', CALL])
    c = client(engine)
    named = {"type": "function", "function": {"name": "add"}}
    r = post(c, {"model": "scripted", "messages": USER, "tools": TOOLS, "tool_choice": named})
    assert r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "add"
    r = post(c, {"model": "scripted", "messages": USER, "tools": TOOLS, "tool_choice": "none"})
    assert r.json()["choices"][0]["message"]["content"] == CALL  # plain text, no tools in the prompt
    assert "add" not in engine.calls[1]["prompt"]


def test_multi_turn_tool_session_reports_session_drafts() -> None:
    c = client(ScriptedEngine([CALL, "The sum is 3.", CALL, "The sum is 3."]))
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    hits = []
    for _ in range(4):
        body = post(c, {"model": "scripted", "messages": messages, "tools": TOOLS}, {"X-Session-Id": "t1"}).json()
        message = body["choices"][0]["message"]
        hits.append(body["agentspec"]["stats"]["accepted_by_source"].get("session", 0))
        messages.append({k: v for k, v in message.items() if v is not None})
        for call in message.get("tool_calls") or []:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "3"})
        if not message.get("tool_calls"):
            messages.append({"role": "user", "content": "Again?"})
    assert hits[0] == 0 and hits[2] > 0 and hits[3] > 0


# ------------------------------------------------------------------ bad input: the right 4xx, a clear message
@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ('{"model": "scripted", "messages": [', 400, "not valid JSON"),
        ({"model": "scripted", "messages": USER, "frequency_penalty": 3}, 422, "frequency_penalty"),
        ({"model": "scripted", "messages": USER, "response_format": {"type": "json_schema"}}, 400, "json_schema"),
        ({"model": "scripted", "messages": USER, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
        ({"model": "scripted", "messages": USER, "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
        ({"model": "scripted", "messages": USER, "n": 2, "temperature": 1, "logprobs": True}, 400, "logprobs"),
        ({"model": "scripted", "messages": USER, "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"model": "scripted", "messages": USER, "repetition_penalty": 0}, 422, "repetition_penalty"),
        ({"model": "scripted", "messages": USER, "unknown_field": 1}, 422, "unknown_field"),
        ({"model": "scripted", "messages": USER, "tool_choice": "required"}, 400, "needs tools"),
        ({"model": "scripted", "messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}},
         400, "needs tools"),
        ({"model": "scripted", "messages": [{"role": "user", "content": "hi", "extra": 1}]}, 422, "extra"),
        ({"model": "scripted", "messages": "hi"}, 422, "messages"),
        ({"model": "scripted", "messages": []}, 422, "messages"),
        ({"model": "scripted", "messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
        ({"model": "scripted", "messages": USER, "max_tokens": 0}, 422, "max_tokens"),
        ({"model": "scripted", "messages": USER, "max_tokens": "ten"}, 422, "max_tokens"),
        ({"model": "scripted", "messages": USER, "temperature": -1}, 422, "temperature"),
        ({"model": "scripted", "messages": USER, "top_p": 0}, 422, "top_p"),
        ({"model": "scripted", "messages": USER, "n": 2}, 400, "set temperature >= 1e-5"),
        ({"model": "scripted", "messages": USER, "n": 2, "temperature": 0}, 400, "set temperature >= 1e-5"),
        ({"model": "scripted", "messages": USER, "n": 2, "temperature": 1, "stream": True}, 400,
         "not supported yet: n > 1 with stream"),
        ({"model": "scripted", "messages": USER, "n": 2, "temperature": 1, "top_p": 0.5}, 400, "top_p must be"),
        ({"model": "scripted", "messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
         422, "name"),
        ({"model": "scripted", "messages": USER, "tools": TOOLS,
          "tool_choice": {"type": "function", "function": {"name": "mul"}}}, 400, "'mul'"),
        ({"messages": USER}, 422, "model"),
        ({"model": "gpt-4o", "messages": USER}, 404, "gpt-4o"),
        ({"model": "scripted", "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "context window"),
    ],
)
def test_bad_requests(body, status: int, needle: str) -> None:
    r = post(client(), body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"]
    if needle == "context window":
        assert "4096" in error["message"] and "50" in error["message"]  # both lengths


def test_n_choices_from_one_search_with_usage_and_stats() -> None:
    engine = ScriptedEngine(["one STOP two", CALL, "three"])
    c = client(engine)
    r = post(c, {"model": "scripted", "messages": USER, "tools": TOOLS, "n": 3, "temperature": 0.7, "seed": 5,
                 "stop": "STOP", "user": "u"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    first, second, third = (ch["message"] for ch in body["choices"])
    assert first["content"] == "one " and body["choices"][0]["finish_reason"] == "stop"  # cut at the stop string
    assert second["content"] == "Let me add." and second["tool_calls"][0]["function"]["name"] == "add"
    assert body["choices"][1]["finish_reason"] == "tool_calls"
    assert third == {"role": "assistant", "content": "three"}
    prompt_tokens = len(engine.calls[0]["prompt"])
    completion_tokens = len("one STOP two") + len(CALL) + len("three")  # as generated, summed over the choices
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    stats = body["agentspec"]["stats"]
    assert (stats["policy"], stats["width"], stats["generated_tokens"]) == ("best_of_n", 3, completion_tokens)
    assert [(k["temperature"], k["seed"], k["session"]) for k in engine.calls] == [(0.7, 5, "u")] * 3
    assert c.get("/health").json()["in_flight"] == 0  # the search gave its place back

    r = c.post("/v1/completions", headers=AUTH, json={"model": "scripted", "prompt": "hi", "n": 2, "temperature": 1})
    assert [(ch["index"], ch["text"]) for ch in r.json()["choices"]] == [(0, "one STOP two"), (1, CALL)]
    assert r.json()["usage"]["prompt_tokens"] == 2


def test_oversized_body_is_413() -> None:
    c = client(max_body_bytes=1000)
    big = {"model": "scripted", "messages": [{"role": "user", "content": "x" * 2000}]}
    r = post(c, big)
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit still holds on what is actually sent
        yield json.dumps(big).encode()

    r = c.post("/v1/chat/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert post(c, {"model": "scripted", "messages": USER}).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": "Basic " + KEY}])
def test_wrong_or_missing_key_is_401(headers: dict) -> None:
    c = client()
    r = c.post("/v1/chat/completions", json={"model": "scripted", "messages": USER}, headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert c.get("/v1/models", headers=headers).status_code == 401
    assert c.get("/health").status_code == 200  # health needs no key


def test_no_key_configured_means_open() -> None:
    c = TestClient(create_app(ScriptedEngine()))
    assert c.post("/v1/chat/completions", json={"model": "scripted", "messages": USER}).status_code == 200


# ------------------------------------------------------------------ queue, concurrency, cancellation (real sockets)
def test_full_queue_answers_503_with_retry_after_and_all_requests_are_answered() -> None:
    engine = ScriptedEngine(["one two three four"], delay=0.01)
    app = create_app(engine, api_keys=KEY, max_queue=2)
    results: list[int] = []
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
        def one(i: int) -> None:
            body = {"model": "scripted", "messages": USER, "stream": i % 2 == 0}
            r = http.post("/v1/chat/completions", json=body)
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]["message"]
            results.append(r.status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(results)) == [200, 503] and len(results) == 24
        health = http.get("/health").json()
        assert health["in_flight"] == 0 and health["rejected"] == results.count(503)


def test_client_disconnect_cancels_streaming_generation() -> None:
    engine = ScriptedEngine([" ".join(["word"] * 400)], delay=0.02)
    app = create_app(engine, api_keys=KEY, max_queue=4)
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            body = {"model": "scripted", "messages": USER, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                for _ in zip(range(3), r.iter_lines()):
                    pass
            # the response was abandoned after a few events: the engine stream must get closed
            deadline = time.monotonic() + 10
            while engine.cancelled == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.cancelled == 1
            engine.replies, engine.delay = ["fine"], 0.0
            r = http.post("/v1/chat/completions", json={"model": "scripted", "messages": USER})
            assert r.json()["choices"][0]["message"]["content"] == "fine"
            health = http.get("/health").json()
            assert health["in_flight"] == 0


def test_openapi_schema_forbids_unknown_fields() -> None:
    schema = client().get("/openapi.json").json()
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["additionalProperties"] is False


# ------------------------------------------------------------------ tenants, caps, defaults
TENANTS = {"key-a": "alice", "key-b": "bob"}


def tenant_post(c: TestClient, key: str, body: dict, session: str = "s1") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "X-Session-Id": session}
    return c.post("/v1/chat/completions", json=body, headers=headers)


@pytest.mark.parametrize("share_global", [False, True])
def test_tenants_keep_sessions_and_global_tree_apart(share_global: bool) -> None:
    engine = ScriptedEngine(["The capital of France is Paris."])
    c = TestClient(create_app(engine, api_keys=TENANTS, share_global=share_global))
    body = {"model": "scripted", "messages": [{"role": "user", "content": "Capital of France?"}]}
    assert tenant_post(c, "key-a", body).status_code == 200
    stats = tenant_post(c, "key-b", body).json()["agentspec"]["stats"]  # same session id, same question
    assert "session" not in stats["accepted_by_source"]  # never another tenant's session
    assert ("global" in stats["accepted_by_source"]) == share_global
    assert [call["tenant"] for call in engine.calls] == ["alice", "bob"]
    again = tenant_post(c, "key-a", body).json()["agentspec"]["stats"]
    assert again["accepted_by_source"]["session"] > 0  # alice's own session drafts


def test_hide_stats_drops_the_agentspec_key() -> None:
    c = client(hide_stats=True)
    assert "agentspec" not in post(c, {"model": "scripted", "messages": USER}).json()
    events = sse_events(post(c, {"model": "scripted", "messages": USER, "stream": True}).text)
    assert all("agentspec" not in e for e in events if isinstance(e, dict))


def test_max_tokens_cap_and_greedy_default() -> None:
    engine = ScriptedEngine(["ok"])
    c = client(engine, max_tokens_cap=32, default_max_tokens=512)
    r = post(c, {"model": "scripted", "messages": USER, "max_completion_tokens": 33})
    assert r.status_code == 400 and "cap of 32" in r.json()["error"]["message"]
    assert post(c, {"model": "scripted", "messages": USER, "max_tokens": 32}).status_code == 200
    assert post(c, {"model": "scripted", "messages": USER}).status_code == 200
    assert [call["max_new_tokens"] for call in engine.calls] == [32, 32]  # the default is capped too
    assert engine.calls[1]["temperature"] == 0.0  # omitted temperature: greedy


def test_supported_extra_body_parameters_reach_the_engine() -> None:
    engine = ScriptedEngine(["ok"])
    body = {"model": "scripted", "messages": USER, "top_k": 5, "repetition_penalty": 1.0, "n": 1,
            "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False,
            "response_format": {"type": "text"}, "temperature": 0.7}
    assert post(client(engine), body).status_code == 200
    assert (engine.calls[0]["top_k"], engine.calls[0]["temperature"]) == (5, 0.7)


def test_key_is_checked_before_the_body_is_read() -> None:
    c = client()
    r = c.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert post(c, b'{"model": ').status_code == 400  # with the key, the same body is a 400


@pytest.mark.parametrize(
    ("entries", "expected"),
    [(["sk-1"], {"sk-1": None}), (["a=k1", "# comment", "", "b = k=2"], {"k1": "a", "k=2": "b"})],
)
def test_parse_api_keys(entries: list[str], expected: dict) -> None:
    assert parse_api_keys(entries) == expected


@pytest.mark.parametrize(("entries", "needle"), [(["k1", "k2"], "bare"), (["a=k", "a=j"], "twice"),
                                                 (["a=k", "b=k"], "twice"), (["a b=k"], "tenant name"),
                                                 (["a="], "empty key")])
def test_parse_api_keys_refuses(entries: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_api_keys(entries)


# ------------------------------------------------------------------ /v1/completions and /metrics
def test_text_completions_plain_and_streamed() -> None:
    engine = ScriptedEngine(["Paris is the capital."])
    c = client(engine)
    r = c.post("/v1/completions", json={"model": "scripted", "prompt": "The capital of France:", "max_tokens": 50,
                                        "user": "u"}, headers=AUTH)
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Paris is the capital."
    assert engine.calls[0]["prompt"] == "The capital of France:"  # no chat template
    assert body["usage"]["prompt_tokens"] == len("The capital of France:")
    r = c.post("/v1/completions", json={"model": "scripted", "prompt": [1, 2, 3], "stream": True}, headers=AUTH)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Paris is the capital."
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_metrics_in_prometheus_format() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    c = client(ScriptedEngine(["same answer"]))
    for _ in range(2):
        post(c, {"model": "scripted", "messages": USER, "user": "m"})
    post(c, {"model": "other", "messages": USER})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("agentspec_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 2
    assert samples[("agentspec_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "404")))] == 1
    assert samples[("agentspec_output_tokens_total", ())] == 2 * len("same answer")
    assert samples[("agentspec_hit_rate", (("source", "session"),))] == 0.5  # the second call drafted it all
    assert samples[("agentspec_tokens_per_step_count", ())] == 2
    assert samples[("agentspec_requests_in_flight", ())] == 0
    assert ("agentspec_request_seconds_count", (("endpoint", "/v1/chat/completions"),)) in samples


# ------------------------------------------------------------------ sessions through ChatOpenAI
def test_chat_openai_passes_sessions_by_header_or_user() -> None:
    from langchain_openai import ChatOpenAI

    engine = ScriptedEngine(["hello"])
    with serve_in_thread(create_app(engine, api_keys=KEY)) as url:
        llm = ChatOpenAI(base_url=url + "/v1", api_key=KEY, model="scripted", max_retries=0,
                         default_headers={"X-Session-Id": "by-header"})
        assert llm.invoke("hi").content == "hello"
        llm = ChatOpenAI(base_url=url + "/v1", api_key=KEY, model="scripted", max_retries=0)
        llm.bind(user="by-user").invoke("hi")
        llm.invoke("hi", extra_headers={"X-Session-Id": "per-call"})
    assert [call["session"] for call in engine.calls] == ["by-header", "by-user", "per-call"]
    assert engine.calls[0]["temperature"] == 0.0


# ------------------------------------------------------------------ agentspec serve
def test_serve_checks_its_port_before_loading_the_model(monkeypatch, tmp_path) -> None:
    import socket

    from typer.testing import CliRunner

    from agentspec.cli import app
    from agentspec.cli.options import ModelOptions

    def no_loading(self):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(ModelOptions, "engine", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    keys = tmp_path / "keys.txt"
    keys.write_text("alice=k1\nalice=k2\n")
    result = CliRunner().invoke(app, ["serve", "--api-keys", str(keys)])
    assert result.exit_code == 2 and "given twice" in result.output
    result = CliRunner().invoke(app, ["serve", "--tool-call-parser", "pythonic"])
    assert result.exit_code == 2 and "hermes, llama3_json, mistral, json" in result.output
