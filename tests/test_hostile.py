"""Requests one client can send to stop the server for everyone, against a real ``agentspec serve``.

The server runs the default model in a subprocess under an 8 GiB address-space limit. Every hostile
input must get its answer (a 4xx naming the budget, or the documented meaning) within 2 s, leave
``/health`` OK, and grow the server's RSS by less than 200 MB. The library-level checks (a
``ValueError`` naming the field, never an IndexError or NaN) run without a server.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

from agentspec.config import SamplingParams
from agentspec.engine import Engine
from agentspec.engine.constraints import Grammar, GrammarCompiler
from agentspec.engine.grammar_budget import GrammarBudgetError, GrammarLimits, check_schemas
from agentspec.engine.grammar_worker import CompileCancelled

ADDRESS_SPACE = 8 * 2**30
KEY = "sk-hostile"
MAX_REQUEST_TOKENS = 4096
RECURSIVE = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}


def properties(n: int, required: bool = False) -> dict:
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(n)}}
    return {**schema, "required": list(schema["properties"])} if required else schema


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


# ------------------------------------------------------------------ budgets, without a server
@pytest.mark.parametrize(("schema", "budget"), [
    (RECURSIVE, "max_forced_chars"),
    ({"$defs": {"a": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/b"}},
                "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "max_forced_chars"),
    ({"type": "array", "minItems": 200, "items": {"type": "string", "minLength": 200}}, "max_forced_chars"),
    (properties(5000), "max_schema_bytes"),
    (properties(300), "max_object_properties"),
    ({"type": "array", "items": json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40)}, "max_depth"),
    ({"type": "string", "enum": [str(i) for i in range(2000)]}, "max_nodes"),
])
def test_schemas_over_a_budget_name_it(schema: dict, budget: str) -> None:
    with pytest.raises(GrammarBudgetError) as caught:
        check_schemas([schema], GrammarLimits())
    assert caught.value.budget == budget
    assert budget in str(caught.value)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"child": {"$ref": "#"}}},  # recursion that may stop
    {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["next"]},
    properties(200, required=True),
])
def test_schemas_within_budget_pass(schema: dict) -> None:
    check_schemas([schema], GrammarLimits())


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("logit_bias", {-1: 100}, "outside the vocabulary"),
    ("logit_bias", {512: 100}, "outside the vocabulary [0, 512)"),
    ("logit_bias", {"x": 1}, "token ids"),
    ("logit_bias", {3: float("nan")}, "[-100, 100]"),
    ("repetition_penalty", 1e6, "repetition_penalty must be in"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("presence_penalty", float("inf"), "presence_penalty must be a finite number"),
])
def test_engine_sampling_inputs_are_value_errors_naming_the_field(field: str, value, needle: str) -> None:
    with pytest.raises(ValueError, match=r".*") as caught:
        SamplingParams(**{field: value}).validate(vocab_size=512)
    assert needle in str(caught.value)


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, 9.9e-6, 0.0])
def test_temperature_below_the_floor_is_greedy(temperature: float) -> None:
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_engine_refuses_out_of_vocabulary_bias_before_it_runs(tiny_model, default_tokenizer) -> None:
    engine = Engine(tiny_model, default_tokenizer, drafter=None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 2, 3], max_new_tokens=2, logit_bias={engine.vocab_size: 5.0})
    assert engine.generate([1, 2, 3], max_new_tokens=2, temperature=1e-38).finish_reason == "length"


# ------------------------------------------------------------------ the compile worker
@pytest.fixture(scope="module")
def slow_compiler(default_tokenizer):
    """A compiler whose time budget a 250-optional-property object is over (it takes about 1 s here)."""
    compiler = GrammarCompiler(default_tokenizer, len(default_tokenizer), [2], GrammarLimits(compile_timeout_s=0.05))
    yield compiler
    compiler.close()


def test_compile_over_its_time_is_killed_and_named(slow_compiler) -> None:
    restarts = slow_compiler._worker.restarts
    with pytest.raises(GrammarBudgetError, match="compile_timeout_s"):
        slow_compiler.compile(Grammar.json_schema(properties(250)))
    assert slow_compiler._worker.restarts == restarts + 1  # the worker was killed, not left running
    assert slow_compiler.cached == (0, 0)
    slow_compiler.compile(Grammar.json_schema({"type": "integer"}))  # a fresh worker serves the next one
    assert slow_compiler.cached[0] == 1


def test_cancelled_compile_stops_its_worker(slow_compiler) -> None:
    slow_compiler.compile(Grammar.json_schema({"type": "boolean"}))  # the worker is up
    cancel = threading.Event()
    cancel.set()  # the request is gone: checked before the time budget at every poll
    restarts = slow_compiler._worker.restarts
    with pytest.raises(CompileCancelled):
        slow_compiler.compile(Grammar.json_schema(properties(251)), cancel=cancel)
    assert slow_compiler._worker.restarts == restarts + 1


def test_compiled_grammar_over_its_bytes_is_refused(default_tokenizer) -> None:
    compiler = GrammarCompiler(default_tokenizer, len(default_tokenizer), [2], GrammarLimits(max_compiled_bytes=10**5))
    try:
        compiler.compile(Grammar.json_schema(properties(3)))  # tens of kB
        with pytest.raises(GrammarBudgetError, match="max_compiled_bytes"):
            compiler.compile(Grammar.json_schema(properties(100)))  # about 300 kB
        assert compiler.cached[0] == 1
    finally:
        compiler.close()


def test_compiled_grammar_cache_is_bounded(default_tokenizer) -> None:
    limits = GrammarLimits(cache_entries=3, cache_bytes=2**30)
    compiler = GrammarCompiler(default_tokenizer, len(default_tokenizer), [2], limits)
    try:
        for i in range(5):
            compiler.compile(Grammar.json_schema({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
        assert compiler.cached[0] == 3
        small = GrammarLimits(cache_bytes=1)
        compiler.limits = small
        compiler.compile(Grammar.json_schema({"type": "string"}))
        assert compiler.cached[0] == 1  # over the bytes: only the newest stays
    finally:
        compiler.close()


# ------------------------------------------------------------------ the real server
def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "agentspec.cli", "serve", "--port", str(port), "--served-model-name", "m",
               "--api-key", f"team={KEY}", "--share-global", "--max-request-tokens", str(MAX_REQUEST_TOKENS),
               "--max-queue", "8", "--max-tokens", "4"]
    log = tempfile.TemporaryFile()  # a pipe nobody reads could fill and block the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_address_space,
                               env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    try:
        for _ in range(600):
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited: {log.read().decode()[-2000:]}")
            try:
                client.get("/health")
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        # warm: the first generation, and the grammar worker's start
        assert client.post("/v1/chat/completions", json=_chat(response_format=response_format(
            {"type": "integer"}))).status_code == 200
        yield client, process.pid
    finally:
        client.close()
        process.terminate()
        process.wait(30)
        log.close()


def _chat(content: str = "Say hi.", **fields) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


HOSTILE = {
    "recursive required $ref": ("/v1/chat/completions", _chat(response_format=response_format(RECURSIVE)), {},
                                400, "no finite instance"),
    "5,000 properties": ("/v1/chat/completions", _chat(response_format=response_format(properties(5000))), {},
                         400, "max_schema_bytes"),
    "20,000 properties": ("/v1/chat/completions", _chat(response_format=response_format(properties(20000))), {},
                          400, "max_schema_bytes"),
    "1,000 properties": ("/v1/chat/completions", _chat(response_format=response_format(properties(1000))), {},
                         400, "max_object_properties"),
    "tool with a recursive schema": ("/v1/chat/completions", _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": RECURSIVE}}]), {}, 400, "no finite instance"),
    "logit_bias 999999": ("/v1/chat/completions", _chat(logit_bias={"999999": 100}), {}, 400, "outside the vocabulary"),
    "logit_bias = vocabulary": ("/v1/chat/completions", _chat(logit_bias={"49152": 100}), {}, 400,
                                "outside the vocabulary [0, 49152)"),
    "logit_bias -1": ("/v1/chat/completions", _chat(logit_bias={"-1": 100}), {}, 400, "outside the vocabulary"),
    "repetition_penalty 1e6": ("/v1/chat/completions", _chat(repetition_penalty=1e6), {}, 422, "repetition_penalty"),
    "n = 128": ("/v1/chat/completions", _chat(n=128, temperature=1.0), {}, 400, "max_request_tokens"),
    "8,191-token prompt": ("/v1/completions", {"model": "m", "prompt": [1] * 8191, "max_tokens": 1}, {}, 400,
                           "max_request_tokens"),
    "513-character session id": ("/v1/chat/completions", _chat(user="s" * 513), {}, 400, "the limit is 512"),
    "X-Session-Id not UTF-8": ("/v1/chat/completions", _chat(), {"X-Session-Id": b"\xff\xfe"}, 400, "UTF-8"),
}


@pytest.mark.model
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_a_quick_4xx_and_costs_nothing(server, case: str, stream: bool) -> None:
    client, pid = server
    path, body, headers, status, needle = HOSTILE[case]
    before = _rss(pid)
    t0 = time.monotonic()
    response = client.post(path, json={**body, "stream": stream} if body.get("n") is None else body, headers=headers)
    elapsed = time.monotonic() - t0
    assert response.status_code == status, response.text[:500]
    assert needle in response.json()["error"]["message"]
    assert elapsed < 2.0, f"{case}: {elapsed:.1f} s"
    assert client.get("/health").json()["status"] == "ok"
    assert _rss(pid) - before < 200 * 2**20


@pytest.mark.model
@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-300])
def test_tiny_temperatures_are_greedy(server, temperature: float) -> None:
    client, _ = server
    greedy = client.post("/v1/chat/completions", json=_chat(max_tokens=4)).json()["choices"][0]["message"]
    tiny = client.post("/v1/chat/completions", json=_chat(max_tokens=4, temperature=temperature))
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"] == greedy


@pytest.mark.model
def test_share_global_session_ids_keep_512_characters_counted_in_utf8(server) -> None:
    client, _ = server
    for length in (511, 512):
        response = client.post("/v1/chat/completions", json=_chat(user="u" * length))
        assert response.status_code == 200, response.text[:300]
    header = ("é" * 300).encode()  # 300 characters, 600 bytes
    response = client.post("/v1/chat/completions", json=_chat(), headers={"X-Session-Id": header})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["agentspec"]["session_id"] == "é" * 300


@pytest.mark.model
def test_distinct_schemas_do_not_grow_memory_without_bound(server) -> None:
    client, pid = server
    before = _rss(pid)
    for i in range(24):
        schema = {"type": "object", "properties": {f"k{i}_{j}": {"type": "integer"} for j in range(40)}}
        body = _chat(max_tokens=1, response_format=response_format(schema))
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text[:300]
    assert client.get("/health").json()["status"] == "ok"
    assert _rss(pid) - before < 200 * 2**20


def _children(pid: int) -> set[int]:
    """Child processes of ``pid``, started by any of its threads."""
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            out |= {int(p) for p in children.read().split()}
    return out


@pytest.mark.model
def test_client_that_leaves_stops_its_grammar_compile(server) -> None:
    client, pid = server
    workers = _children(pid)
    assert len(workers) == 1  # the grammar compile worker
    slow_schema = {"type": "object", "properties": {k: properties(250) for k in "abc"}}  # seconds to compile here
    slow = _chat(response_format=response_format(slow_schema))
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=slow, timeout=0.3)
    for _ in range(100):  # the server notices the disconnect within its 0.1 s poll
        if not workers & _children(pid):
            break
        time.sleep(0.1)
    assert not workers & _children(pid), "the compile worker of the cancelled request still runs"
    assert client.get("/health").json()["in_flight"] == 0
