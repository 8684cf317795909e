"""Grammar-constrained decoding through speculation: tree walks, greedy identity, sampling law."""

from __future__ import annotations

import json
import random

import pytest
import torch
from agentspec.integrations.toolcalls import parse_tool_calls
from pydantic import BaseModel
from test_engine import ContextTreeDrafter, ScriptedDrafter, make_engine

from agentspec import chat
from agentspec.draft.base import DraftTree
from agentspec.engine.constraints import Grammar, GrammarCompiler

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "required": ["id", "tag", "ok"], "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99},
    "tag": {"type": "string", "enum": ["al", "to"]},
    "ok": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_user_details", "parameters": {
    "type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}}},
    {"type": "function", "function": {"name": "calculate", "parameters": {
        "type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]
GRAMMARS = {
    "schema": Grammar.json_schema(SCHEMA),
    "json_object": Grammar.json_object(),
    "tools_required": Grammar.tool_calls(TOOLS, mode="required"),
    "tool_forced": Grammar.tool_calls(TOOLS, prefix='<tool_call>\n{"name": "calculate", "arguments": '),
    "tools_auto": Grammar.tool_calls(TOOLS, mode="auto", json_args_keys=("arguments",)),
}


@pytest.fixture(scope="module")
def full_vocab(default_tokenizer):
    return GrammarCompiler(default_tokenizer, len(default_tokenizer), [2])


@pytest.fixture(scope="module")
def tiny_vocab(default_tokenizer):
    """The tiny model's 512-token vocabulary: the first 512 ids of the default tokenizer."""
    return GrammarCompiler(default_tokenizer, 512, [2])


def _allowed_after(compiler, grammar, path):
    """Reference: a fresh matcher walks ``path``; its mask as a bool vector (None if the path is rejected)."""
    m = xgr.GrammarMatcher(compiler.compile(grammar))
    for tok in path:
        if not m.accept_token(tok):
            return None
    mask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
    m.fill_next_token_bitmask(mask)
    logits = torch.zeros(1, compiler.vocab_size)
    xgr.apply_token_bitmask_inplace(logits, mask)
    return torch.isfinite(logits[0])


def _random_tree(rng, good, vocab, n):
    """Draft-like tree: branches following ``good`` tokens (some drift off them) and random tokens."""
    tree = DraftTree()
    while len(tree) < n:
        parent = rng.randrange(-1, len(tree))
        depth = 0 if parent < 0 else tree.depths()[parent]
        tok = good[depth] if rng.random() < 0.6 and depth < len(good) else rng.randrange(vocab)
        if any(p == parent and t == tok for p, t in zip(tree.parents, tree.tokens)):
            continue
        tree.tokens.append(tok), tree.parents.append(parent), tree.probs.append(0.5), tree.sources.append(1)
    return tree


def _path(tree, i):
    out = []
    while i >= 0:
        out.append(tree.tokens[i])
        i = tree.parents[i]
    return out[::-1]


@pytest.mark.parametrize("seed", range(3))
def test_constrain_cuts_rejected_branches_and_masks_every_node_from_its_own_path(default_tokenizer, full_vocab, seed):
    rng = random.Random(seed)
    grammar = GRAMMARS["schema"]
    good = default_tokenizer.encode('{"id": 12, "tag": "al", "ok": true}', add_special_tokens=False)
    tree = _random_tree(rng, good, len(default_tokenizer), 40)
    matcher = full_vocab.matcher(grammar)
    out, masks = matcher.constrain(tree, budget=64)
    out.check_integrity()
    kept = {tuple(_path(out, i)) for i in range(len(out)) if out.sources[i] != 4}
    for i in range(len(tree)):  # a drafter node survives exactly when the grammar accepts its path
        path = _path(tree, i)
        assert (tuple(path) in kept) == (_allowed_after(full_vocab, grammar, path) is not None), path
    for slot in range(len(out) + 1):  # each row: the mask after that node's own path
        path = _path(out, slot - 1)
        expect = _allowed_after(full_vocab, grammar, path)
        logits = torch.zeros(1, full_vocab.vocab_size)
        matcher.apply(logits, masks[slot : slot + 1])
        assert torch.equal(torch.isfinite(logits[0]), expect), path
    # the matcher's committed state is untouched: the root mask again
    again, _ = matcher.constrain(DraftTree(), budget=0)
    assert len(again) == 0 and torch.equal(masks[0], _mask_now(matcher))


def _mask_now(matcher):
    masks = matcher.masks(1)
    matcher.fill(masks, 0)
    return masks[0]


def test_forced_tokens_are_drafted_and_leaves_extended(default_tokenizer, full_vocab):
    matcher = full_vocab.matcher(GRAMMARS["tools_required"])
    out, _ = matcher.constrain(DraftTree(), budget=12)
    # "<tool_call>" is the only legal first token: certain; then the block's fixed head
    assert default_tokenizer.decode(out.tokens).startswith('<tool_call>\n{"name": "')
    assert out.probs[0] == 1.0 and all(s == 4 for s in out.sources)
    assert out.parents == list(range(-1, len(out) - 1))  # a chain
    assert len(out) <= 12


@pytest.mark.parametrize(
    "grammar, text, ok",
    [
        ("schema", '{"id": 3, "tag": "to", "ok": false}', True),
        ("schema", '{"id": 3, "tag": "no", "ok": false}', False),  # not in the enum
        ("schema", '{"tag": "to", "id": 3, "ok": false}', False),  # keys in schema order
        ("json_object", '{"a": [1, {"b": null}]}', True),
        ("json_object", "[1, 2]", False),
        ("tools_required", chat.render_tool_call("calculate", {"expression": "2 + 2"}), True),
        ("tools_required", chat.render_tool_call("calculate", {"expr": "2 + 2"}), False),
        ("tools_required", "Sure! " + chat.render_tool_call("calculate", {"expression": "1"}), False),
        ("tool_forced", '{"expression": "2 + 2"}}\n</tool_call>', True),
        ("tool_forced", '{"user_id": "x"}}\n</tool_call>', False),
    ],
)
def test_grammars_accept_what_the_chat_format_renders(default_tokenizer, full_vocab, grammar, text, ok):
    m = xgr.GrammarMatcher(full_vocab.compile(GRAMMARS[grammar]))
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    accepted = all(m.accept_token(t) for t in ids) and m.accept_token(2)
    assert accepted == ok


@pytest.mark.parametrize("order, ok", [(("zone", "amount"), True), (("amount", "zone"), False)])
def test_tool_call_arguments_keep_the_schemas_key_order(default_tokenizer, full_vocab, order, ok):
    """A call's arguments follow the tool's own property order (as a json_schema does), not alphabetical."""
    tool = {"type": "function", "function": {"name": "pay", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}, "amount": {"type": "integer"}},
        "required": ["zone", "amount"]}}}
    m = xgr.GrammarMatcher(full_vocab.compile(Grammar.tool_calls([tool], mode="required")))
    args = {key: ("EU" if key == "zone" else 5) for key in order}
    ids = default_tokenizer.encode(chat.render_tool_call("pay", args), add_special_tokens=False)
    assert (all(m.accept_token(t) for t in ids) and m.accept_token(2)) == ok


def test_auto_tool_calls_constrain_only_inside_a_block(default_tokenizer, full_vocab):
    m = xgr.GrammarMatcher(full_vocab.compile(Grammar.tool_calls(TOOLS, mode="auto")))
    free = default_tokenizer.encode("Let me check. ", add_special_tokens=False)
    assert all(m.accept_token(t) for t in free)
    bad = default_tokenizer.encode(chat.render_tool_call("calculate", {"x": 1}), add_special_tokens=False)
    assert not all(m.accept_token(t) for t in bad)


@pytest.mark.parametrize(
    "text, ok",
    [
        ('{"name": "Alice", "age": 30}', True),  # JSON that names no tool: free text
        ('{"name": "calculate", "arguments": {"expression": "1"}}', True),
        ('Sure:\n```json\n{"name": "calculate", "arguments": {"expression": "1"}}\n```', True),
        ('[{"name": "calculate", "arguments": {"expression": "1"}}, {"name": "get_user_details", "arguments": '
         '{"user_id": "u"}}]', True),
        ('{"name": "calculate", "arguments": {"expr": "1"}}', False),  # once a tool is named, its schema holds
        ('{"name": "calculate", "arguments": {"expression": "1"}, "id": 3}', False),  # and the object closes
    ],
)
def test_auto_tool_calls_constrain_bare_json_calls_once_a_tool_is_named(default_tokenizer, full_vocab, text, ok):
    m = xgr.GrammarMatcher(full_vocab.compile(GRAMMARS["tools_auto"]))
    ids = default_tokenizer.encode(text, add_special_tokens=False)
    assert (all(m.accept_token(t) for t in ids) and m.accept_token(2)) == ok


def test_grammar_errors_name_the_problem(full_vocab):
    with pytest.raises(ValueError, match="response_format type"):
        Grammar.from_response_format({"type": "yaml"})
    with pytest.raises(ValueError, match="json_schema"):
        Grammar.from_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert Grammar.from_response_format({"type": "text"}) is None
    with pytest.raises(ValueError, match="forced prefix"):
        full_vocab.compile(Grammar.tool_calls(TOOLS, prefix='<tool_call>\n{"name": "nosuch", "arguments": '))


# ---------------------------------------------------------------------------- through the engine (tiny model)
def plain_constrained(model, compiler, grammar, prompt, n, *, temperature=0.0, generator=None, eos=2):
    """Reference: one token at a time, full forward each step, the grammar's mask, argmax or a sample."""
    m = xgr.GrammarMatcher(compiler.compile(grammar))
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1:].float()
        mask = xgr.allocate_token_bitmask(1, compiler.vocab_size)
        m.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        if temperature:
            tok = int(torch.multinomial(torch.softmax(logits[0] / temperature, -1), 1, generator=generator))
        else:
            tok = int(logits[0].argmax())
        assert m.accept_token(tok)
        ids.append(tok), out.append(tok)
        if tok == eos:
            break
    return out


@pytest.mark.parametrize("name", sorted(GRAMMARS))
@pytest.mark.parametrize("seed", range(2))
def test_constrained_greedy_equals_plain_constrained_decoding(tiny_model, default_tokenizer, tiny_vocab, name, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 30))]
    truth = plain_constrained(tiny_model, tiny_vocab, GRAMMARS[name], prompt, 40)
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(truth, 512, seed=seed), prefix_cache_bytes=0)
    engine.eos_ids = {2}
    engine._grammars.compiler = tiny_vocab
    result = engine.generate(prompt, max_new_tokens=40, grammar=GRAMMARS[name])
    assert result.token_ids == truth
    assert result.stats.steps < len(truth)  # drafts (the drafter's and the grammar's) were accepted
    plain = engine.generate(prompt, max_new_tokens=40, grammar=GRAMMARS[name], speculate=False)
    assert plain.token_ids == truth


def test_schema_output_parses_and_grammar_drafts_are_accepted(tiny_model, default_tokenizer, tiny_vocab):
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter([], 512), prefix_cache_bytes=0)
    engine.eos_ids = {2}
    engine._grammars.compiler = tiny_vocab
    result = engine.generate([5, 6, 7], max_new_tokens=200, grammar={"type": "json_schema",
                                                                     "json_schema": {"name": "x", "schema": SCHEMA}})
    assert result.finish_reason == "stop"
    value = json.loads(result.text)
    assert list(value) == ["id", "tag", "ok"] and value["tag"] in ("al", "to")
    assert result.stats.accepted_by_source.get("grammar", 0) >= 5  # the keys and quotes came as drafts


WEATHER_TOOL = [{"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "required": ["unit", "days", "alerts"], "properties": {
        "unit": {"type": "string", "enum": ["C", "F"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "alerts": {"type": "boolean"}}}}}]


@pytest.mark.parametrize("seed", range(3))
def test_auto_call_started_by_a_model_is_completed_by_the_grammar(tiny_model, tiny_vocab, seed):
    """Once a model has written ``{"name": "forecast", "arguments": `` in auto mode, the grammar takes over: the
    tiny random model's greedy continuation is a call that parses and keeps the schema; without it, it is not."""
    head = 'Checking.\n{"name": "forecast", "arguments": '
    prompt = [random.Random(seed).randrange(3, 512) for _ in range(12)]
    texts = {}
    for constrained in (True, False):
        m = xgr.GrammarMatcher(tiny_vocab.compile(Grammar.tool_calls(WEATHER_TOOL, json_args_keys=("arguments",))))
        assert m.accept_string(head)  # the model's own start of the call (its tokens need not be in the tiny vocab)
        ids, out = list(prompt), []
        for _ in range(60):
            with torch.no_grad():
                logits = tiny_model(torch.tensor([ids])).logits[0, -1:].float()
            if constrained:
                mask = xgr.allocate_token_bitmask(1, tiny_vocab.vocab_size)
                m.fill_next_token_bitmask(mask)
                xgr.apply_token_bitmask_inplace(logits, mask)
            tok = int(logits[0].argmax())
            if constrained:
                assert m.accept_token(tok)
            ids.append(tok), out.append(tok)
            if tok == 2:
                break
        texts[constrained] = head + tiny_vocab._tokenizer.decode(out, skip_special_tokens=True)
    parsed = parse_tool_calls(texts[True], ["forecast"])
    # (after the call the text is free again: the random model writes what it likes)
    assert parsed.content.startswith("Checking.") and len(parsed.calls) == 1 and not parsed.invalid, texts[True]
    args = parsed.calls[0]["arguments"]
    assert sorted(args) == ["alerts", "days", "unit"] and args["unit"] in ("C", "F") and 1 <= args["days"] <= 7
    assert isinstance(args["alerts"], bool)
    assert not parse_tool_calls(texts[False], ["forecast"]).calls  # the random model alone writes no call


def test_constrained_sampling_matches_plain_distribution(tiny_model, default_tokenizer, tiny_vocab):
    """Chi-square: 3 tokens sampled under JSON mode through draft trees follow the constrained law."""
    from scipy.stats import chisquare

    grammar = GRAMMARS["json_object"]
    prompt = [11, 42, 99, 7, 5]
    temperature = 1.5

    def dist(path):
        m = xgr.GrammarMatcher(tiny_vocab.compile(grammar))
        assert all(m.accept_token(t) for t in path)
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + path])).logits[0, -1:].float()
        mask = xgr.allocate_token_bitmask(1, 512)
        m.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        return torch.softmax(logits[0] / temperature, -1)

    def support(p, k=4):
        top = sorted(torch.nonzero(p > 0.02).flatten().tolist(), key=lambda t: -float(p[t]))
        return top[:k]

    p0 = dist([])
    first = support(p0)
    exact_first = {a: float(p0[a]) for a in first}
    trees, second = {}, {}
    for a in first:
        p1 = dist([a])
        second[a] = p1
        cands = support(p1)
        tree = DraftTree()
        for b in cands[:2]:  # draft some of the likely continuations
            tree.tokens.append(b), tree.parents.append(-1), tree.probs.append(0.3), tree.sources.append(0)
        trees[a] = tree
    engine = make_engine(tiny_model, default_tokenizer, ContextTreeDrafter(trees), prefix_cache_bytes=0)
    engine.eos_ids = {2}
    engine._grammars.compiler = tiny_vocab
    n = 600
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(n):
        result = engine.generate(prompt, max_new_tokens=2, temperature=temperature, seed=seed, grammar=grammar)
        key = tuple(result.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        accepted += result.stats.accepted_tokens
    assert accepted > 0.05 * n
    exact = {(a, b): exact_first[a] * float(second[a][b]) for a in first for b in support(second[a], 6)}
    big = [k for k in exact if exact[k] * n >= 5]
    observed = [counts.get(k, 0) for k in big]
    expected = [exact[k] * n for k in big]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3


# ---------------------------------------------------------------------------- the surface, real default model
class Person(BaseModel):
    """A person."""

    name: str
    age: int


@pytest.mark.model
def test_chat_openai_structured_output_against_the_server_returns_the_model(default_engine):
    from agentspec.integrations.server import create_app
    from doubles import serve_in_thread
    from langchain_openai import ChatOpenAI

    app = create_app(default_engine, api_keys="k", max_queue=2, default_max_tokens=64)
    with serve_in_thread(app) as url:
        llm = ChatOpenAI(base_url=url + "/v1", api_key="k", model=default_engine.model_name, temperature=0,
                         max_tokens=64, max_retries=0)
        for method in ("json_schema", "function_calling", "json_mode"):
            structured = llm.with_structured_output(Person, method=method)
            prompt = "Alice is 30 years old. Give her name and age as JSON with keys name and age."
            out = structured.invoke(prompt)
            assert isinstance(out, Person), (method, out)


@pytest.mark.model
@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_chat_agentspec_structured_output_honours_method(default_engine, method):
    from agentspec.integrations.langchain import ChatAgentSpec

    llm = ChatAgentSpec(engine=default_engine, max_tokens=64)
    prompt = "Alice is 30 years old. Give her name and age as JSON with keys name and age."
    out = llm.with_structured_output(Person, method=method).invoke(prompt)
    assert isinstance(out, Person)
    short = ChatAgentSpec(engine=default_engine, max_tokens=3)
    cut = short.with_structured_output(Person, method=method, include_raw=True).invoke(prompt)
    assert cut["parsed"] is None and cut["parsing_error"] is not None  # 3 tokens cannot hold the object


@pytest.mark.model
def test_server_response_format_and_penalties(default_engine):
    from agentspec.integrations.server import create_app
    from doubles import serve_in_thread
    from openai import OpenAI

    app = create_app(default_engine, api_keys="k", max_queue=2, default_max_tokens=32)
    with serve_in_thread(app) as url:
        client = OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        resp = client.chat.completions.create(
            model=default_engine.model_name, messages=[{"role": "user", "content": "A JSON object about Paris."}],
            temperature=0, max_tokens=32, response_format={"type": "json_object"},
            frequency_penalty=0.5, extra_body={"top_k": 5, "repetition_penalty": 1.1})
        assert resp.choices[0].message.content.startswith("{")
