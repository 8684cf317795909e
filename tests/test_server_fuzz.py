"""No 5xx from any input, and every stream terminated: schemathesis over the OpenAPI schema, plus explicit cases.

The fuzzer's strings are poisoned with lone surrogates and NUL bytes (JSON can carry both; text
and PostgreSQL cannot). The engine is scripted, so a bounded run takes seconds.
"""

from __future__ import annotations

import json
import os

import pytest
from agentspec.integrations.server import create_app
from agentspec.stores import SessionDamagedError, TokenizerMismatchError
from doubles import ScriptedEngine
from fastapi.testclient import TestClient

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ_EXAMPLES = int(os.environ.get("AGENTSPEC_FUZZ_EXAMPLES", 40))  # per operation
POISON = ["\ud800", "\udfff", "\x00", "a\x00b\ud83d", "\ud83d\ude00"]  # the last one is a valid pair
REPLY = 'ok <tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'


def _app(engine: ScriptedEngine | None = None, **kwargs):
    return create_app(engine or ScriptedEngine([REPLY], context_window=2048), api_keys=KEY, max_queue=64, **kwargs)


def _poison(value, rnd, poison: str):
    """``value`` with ``poison`` spliced into some of its strings (keys kept: the schema names them)."""
    if isinstance(value, str):
        if rnd.random() < 0.5:
            return value
        i = rnd.randint(0, len(value))
        return value[:i] + poison + value[i:]
    if isinstance(value, dict):
        return {k: _poison(v, rnd, poison) for k, v in value.items()}
    if isinstance(value, list):
        return [_poison(v, rnd, poison) for v in value]
    return value


def _check_terminated(response) -> None:
    """A 200 stream ends with ``[DONE]``; every error is OpenAI-shaped."""
    if response.status_code >= 400 and response.status_code != 405:
        assert response.json()["error"]["message"], response.text
    elif "text/event-stream" in str(response.headers.get("content-type")):
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "data: [DONE]", response.text[-300:]


def test_schemathesis_fuzz_with_surrogates_and_nul() -> None:
    """Every operation, schema-generated bodies with poisoned strings: zero 5xx, streams terminated."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import positive_data_acceptance

    app = _app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app)
    seen: list[tuple[str, int]] = []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same examples every run: a CI failure reproduces
        @given(case=op.as_strategy(), rnd=st.randoms(use_true_random=False), poison=st.sampled_from([None, *POISON]))
        def run(case, rnd, poison: str | None) -> None:
            case.headers = {**(case.headers or {}), **AUTH}
            if isinstance(case.body, dict) and "model" in case.body and rnd.random() < 0.8:
                case.body["model"] = "scripted"  # mostly reach generation
            if poison is None or not isinstance(case.body, dict):
                # schema-valid requests may still be refused on their meaning (a 400 naming why)
                response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            else:  # schemathesis cannot validate text with lone surrogates itself: sent as JSON escapes
                response = client.request(case.method, case.formatted_path, headers=case.headers,
                                          content=json.dumps(_poison(case.body, rnd, poison)))
            assert response.status_code < 500, response.text
            _check_terminated(response)
            seen.append((case.operation.path, response.status_code, poison is not None))

        run()
    chat = [(status, poisoned) for path, status, poisoned in seen if path == "/v1/chat/completions"]
    assert any(status == 200 for status, _ in chat), chat  # generation was reached
    assert any(poisoned and 400 <= status < 500 for status, poisoned in chat), chat  # poisoned bodies were refused
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert sum(p == path for p, _, _ in seen) >= FUZZ_EXAMPLES // 2, path


# ------------------------------------------------------------------ each reproduction, explicitly
CHAT = "/v1/chat/completions"


def _chat(**fields) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "needle"),
    [
        (CHAT, _chat(messages=[{"role": "user", "content": "a\ud800b"}]), {}, 400, "lone surrogate"),
        (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), {}, 400,
         "messages.0.content.0.text"),
        (CHAT, _chat(user="u\ud800"), {}, 400, "lone surrogate"),
        (CHAT, _chat(user="u\x00v"), {}, 400, "NUL"),
        (CHAT, _chat(user="s" * 513), {}, 400, "the limit is 512"),
        (CHAT, _chat(), {"X-Session-Id": "h" * 600}, 400, "(X-Session-Id) 'hhhh"),
        (CHAT, _chat(stop=["\ud800"]), {}, 400, "stop"),
        (CHAT, _chat(tool_choice={"type": "function", "function": {"name": "f"}}), {}, 400, "needs tools"),
        (CHAT, _chat(max_tokens=10_000), {}, 400, "cap of 64"),
        (CHAT, _chat(n=3), {}, 400, "n > 1"),  # greedy, or streamed
        ("/v1/completions", {"model": "scripted", "prompt": "x\ud800"}, {}, 400, "lone surrogate"),
        ("/v1/completions", {"model": "scripted", "prompt": ["a", "b"]}, {}, 400, "one prompt"),
        ("/v1/completions", {"model": "scripted", "prompt": "x" * 3000}, {}, 400, "context window"),
    ],
)
def test_reproductions_are_clear_400s(path: str, body: dict, headers: dict, status: int, needle: str,
                                      stream: bool) -> None:
    c = TestClient(_app(max_tokens_cap=64))
    content = json.dumps({**body, "stream": stream})  # json escapes lone surrogates as \ud800: valid JSON
    r = c.post(path, content=content, headers={**AUTH, **headers, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_damaged_session_is_a_503_naming_the_repair() -> None:
    engine = ScriptedEngine([REPLY])
    engine.session_errors["hurt"] = SessionDamagedError("session 'hurt': its header fails its checksum")
    c = TestClient(_app(engine))
    r = c.post(CHAT, json=_chat(user="hurt"), headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "session_damaged"
    assert "sessions check --repair" in r.json()["error"]["message"]
    r = c.post(CHAT, json=_chat(user="hurt", stream=True), headers=AUTH)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "session_damaged"


def test_session_of_another_tokenizer_is_a_400_or_an_error_event() -> None:
    engine = ScriptedEngine([REPLY])
    engine.session_errors["old"] = TokenizerMismatchError("session 'old' was written by tokenizer abc")
    c = TestClient(_app(engine))
    r = c.post(CHAT, json=_chat(user="old"), headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "session_tokenizer_mismatch"
    r = c.post(CHAT, json=_chat(user="old", stream=True), headers=AUTH)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "session_tokenizer_mismatch"
    assert c.post(CHAT, json=_chat(user="new"), headers=AUTH).status_code == 200  # the server goes on
    assert c.get("/health").json()["in_flight"] == 0


class _Broken(ScriptedEngine):
    """Fails in the middle of a generation, as a bug would."""

    def stream(self, prompt, **kwargs):
        stream = super().stream(prompt, **kwargs)
        deltas = stream._deltas

        def failing():
            yield next(deltas)
            raise RuntimeError("boom")

        stream._deltas = failing()
        return stream


def test_engine_failure_mid_stream_ends_with_error_event_and_done() -> None:
    c = TestClient(_app(_Broken(["one two three"])), raise_server_exceptions=False)
    r = c.post(CHAT, json=_chat(stream=True), headers=AUTH)
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
    r = c.post(CHAT, json=_chat(), headers=AUTH)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"  # a bug: OpenAI-shaped
    assert c.get("/health").json()["in_flight"] == 0


@pytest.mark.parametrize("body", ['{"model": "scripted", "messages": [', '{"model": 1}', "null", "\x00"])
def test_unauthenticated_bad_body_is_401(body: str) -> None:
    r = TestClient(_app()).post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
