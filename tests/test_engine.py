"""Engine mechanics on a tiny random Llama: lossless greedy, KV compaction, errors, streaming."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from doubles import assert_step_matches_transformers, write_q4_1_blocks
from sampling_law import chisquare_pvalue, three_token_law

from agentspec.config import SpeculationConfig
from agentspec.draft.base import DraftTree, Source
from agentspec.engine import Engine


class ScriptedDrafter:
    """Drafts a noisy tree around a known continuation: right and wrong branches, random shapes."""

    def __init__(self, truth: Sequence[int], vocab: int, seed: int = 0, width: int = 3, depth: int = 6):
        self.truth, self.vocab, self.rng = list(truth), vocab, random.Random(seed)
        self.width, self.depth = width, depth
        self.context: dict[str, list[int]] = {}
        self.stopped: list[str] = []
        self.accepted_calls = 0

    def start_request(self, request_id, session_id, prompt_ids):
        self.context[request_id] = []

    def propose(self, request_id, budget):
        done = len(self.context[request_id])
        tree = DraftTree()
        frontier = [(-1, done)]  # (parent node, index into truth it should continue)
        while frontier and len(tree) < budget:
            parent, pos = frontier.pop(0)
            for b in range(self.width):
                if len(tree) >= budget:
                    break
                right = b == 0 and pos < len(self.truth) and self.rng.random() < 0.8
                tok = self.truth[pos] if right else self.rng.randrange(self.vocab)
                siblings = {tree.tokens[i] for i, p in enumerate(tree.parents) if p == parent}
                if tok in siblings:
                    continue
                tree.tokens.append(tok)
                tree.parents.append(parent)
                tree.probs.append(0.5)
                tree.sources.append(int(Source.SESSION if right else Source.GLOBAL))
                depth = tree.depths()[-1]
                if depth < self.depth:
                    frontier.append((len(tree) - 1, pos + 1 if right else 10**9))
        tree.check_integrity()
        return tree

    def accept(self, request_id, tree, accepted, new_tokens):
        self.context[request_id].extend(new_tokens)
        self.accepted_calls += 1

    def stop_request(self, request_id):
        self.stopped.append(request_id)

    def add_history(self, session_id, prompt_ids, output_ids):
        pass


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def make_engine(model, tokenizer, drafter, **spec) -> Engine:
    spec.setdefault("adaptive", False)
    return Engine(model, tokenizer, drafter=drafter, speculation=SpeculationConfig(**spec))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_equals_plain_decoding(tiny_model, default_tokenizer, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 40))]
    truth = hf_greedy(tiny_model, prompt, 40)
    drafter = ScriptedDrafter(truth, 512, seed=seed)
    engine = make_engine(tiny_model, default_tokenizer, drafter, prefix_cache_bytes=0)
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == truth
    assert result.stats.steps < 40  # the right branches were accepted
    assert 1 + result.stats.accepted_tokens + result.stats.steps in (40, 41)
    assert result.stats.accepted_by_source.get("session", 0) == result.stats.accepted_tokens


def test_prefix_cache_reuse_keeps_output(tiny_model, default_tokenizer):
    prompt = list(range(10, 60))
    truth = hf_greedy(tiny_model, prompt, 20)
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(truth, 512), prefix_cache_bytes=2**26)
    engine.eos_ids = set()
    first = engine.generate(prompt, max_new_tokens=20)
    assert first.stats.prefill_tokens == len(prompt)
    # the next agent call extends the previous prompt and completion
    prompt2 = prompt + first.token_ids + [7, 8, 9]
    truth2 = hf_greedy(tiny_model, prompt2, 15)
    engine.drafter = ScriptedDrafter(truth2, 512, seed=3)
    second = engine.generate(prompt2, max_new_tokens=15)
    assert second.token_ids == truth2
    assert second.stats.prefill_tokens == len(prompt2) - (len(prompt) + 20 - 1)


def test_speculation_off_is_plain_decoding(tiny_model, default_tokenizer):
    prompt = list(range(100, 130))
    truth = hf_greedy(tiny_model, prompt, 12)
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(truth, 512))
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=12, speculate=False)
    assert result.token_ids == truth
    assert result.stats.steps == 11 and result.stats.drafted_tokens == 0


def test_stream_deltas_join_to_text(tiny_model, default_tokenizer):
    prompt = list(range(200, 230))
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(hf_greedy(tiny_model, prompt, 25), 512))
    engine.eos_ids = set()
    stream = engine.stream(prompt, max_new_tokens=25)
    deltas = list(stream)
    assert "".join(deltas) == stream.result.text
    assert stream.result.text == default_tokenizer.decode(stream.result.token_ids, skip_special_tokens=True)


def test_bad_input_errors_and_engine_stays_usable(tiny_model, default_tokenizer):
    engine = make_engine(tiny_model, default_tokenizer, None)
    with pytest.raises(ValueError, match="empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="empty"):
        engine.generate([])
    with pytest.raises(ValueError, match=r"2000 tokens.*1024 tokens"):
        engine.generate([5] * 2000)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([5, 6], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([5, 6], max_new_tokens=-3)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([5, 6], temperature=-0.5)
    assert len(engine.generate([5, 6, 7], max_new_tokens=3).token_ids) >= 1


def test_keyboard_interrupt_leaves_engine_usable(tiny_model, default_tokenizer):
    prompt = list(range(300, 320))
    truth = hf_greedy(tiny_model, prompt, 10)
    drafter = ScriptedDrafter(truth, 512)
    engine = make_engine(tiny_model, default_tokenizer, drafter)
    engine.eos_ids = set()
    original = engine._verify
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine._verify = flaky
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompt, max_new_tokens=10)
    engine._verify = original
    assert drafter.stopped  # the interrupted request was cleaned up
    drafter.rng = random.Random(0)
    assert engine.generate(prompt, max_new_tokens=10).token_ids == truth


def test_stop_strings_cut_text(tiny_model, default_tokenizer):
    prompt = list(range(40, 70))
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(hf_greedy(tiny_model, prompt, 30), 512))
    engine.eos_ids = set()
    full = engine.generate(prompt, max_new_tokens=30).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = engine.generate(prompt, max_new_tokens=30, stop=[stop])
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


class ContextTreeDrafter:
    """After the first token ``a``, drafts the fixed tree ``trees[a]``: deterministic given the context,
    so sample-and-match acceptance must be lossless."""

    def __init__(self, trees: dict[int, DraftTree]):
        self.trees = trees

    def start_request(self, request_id, session_id, prompt_ids):
        self.out: list[int] = []

    def propose(self, request_id, budget):
        return self.trees.get(self.out[0], DraftTree()) if len(self.out) == 1 else DraftTree()

    def accept(self, request_id, tree, accepted, new_tokens):
        self.out.extend(new_tokens)

    def stop_request(self, request_id):
        pass

    def add_history(self, session_id, prompt_ids, output_ids):
        pass


def test_sampling_matches_plain_distribution(tiny_model, default_tokenizer):
    """Chi-square: three tokens sampled through draft trees follow the model's exact joint law."""

    from agentspec.config import SamplingParams
    from agentspec.engine.verify import process_logits

    params = SamplingParams(temperature=0.8, top_k=4)
    prompt = [11, 42, 99, 7, 5]

    def dist(ids):
        with torch.no_grad():
            return process_logits(tiny_model(torch.tensor([ids])).logits[0, -1], params)

    # draft 2 of 4 candidates per level: some accepted, some not
    exact, trees = three_token_law(lambda out: dist(prompt + out), drafted_ranks=(1, 2))
    engine = make_engine(tiny_model, default_tokenizer, ContextTreeDrafter(trees), prefix_cache_bytes=0)
    engine.eos_ids = set()
    n = 2000
    counts = dict.fromkeys(exact, 0)
    accepted = 0
    for seed in range(n):
        result = engine.generate(prompt, max_new_tokens=3, temperature=0.8, top_k=4, seed=seed)
        counts[tuple(result.token_ids)] += 1
        accepted += result.stats.accepted_tokens
    assert accepted > 0.1 * n
    assert chisquare_pvalue(counts, exact, n) > 1e-3


@pytest.mark.parametrize("gguf_blocks", [False, True])
def test_lean_step_forward_equals_transformers_forward(tiny_model, gguf_blocks):
    """The engine's verification forward (LlamaStepForward) against transformers' own forward with
    the same tree mask, on a random tree after a cached prefix; with ``gguf_blocks`` the linear
    layers hold Q4_1 block values, so the block kernel and the fused q/k/v and gate/up calls run."""
    import copy

    from agentspec.kernels.blockq import blocks_available

    from agentspec.engine.cpu_fast import fast_linears, skinny_linears
    from agentspec.engine.step_forward import LlamaStepForward

    if gguf_blocks:
        if not blocks_available():
            pytest.skip("compiled block kernel not built, or no AVX2/FMA on this CPU")
        tiny_model = copy.deepcopy(tiny_model)
        write_q4_1_blocks(tiny_model)
        assert skinny_linears(tiny_model) == (14, 14)
    step = LlamaStepForward.for_model(tiny_model)
    assert step is not None
    assert all(w is not None for w in step.qkv + step.gate_up) == gguf_blocks
    if gguf_blocks:  # the projections read their rows of the fused blocks: held once, same results
        q_proj = tiny_model.model.layers[0].self_attn.q_proj
        assert q_proj.blocks.packed.data_ptr() == step.qkv[0].packed.data_ptr()
        h = torch.randn(3, q_proj.in_features)
        with torch.no_grad(), fast_linears():
            torch.testing.assert_close(q_proj(h), F.linear(h, q_proj.weight), atol=1e-5, rtol=1e-5)
    assert_step_matches_transformers(tiny_model, step)
    gpt2 = type("Gpt2", (), {"config": type("Config", (), {"model_type": "gpt2"})()})()
    assert LlamaStepForward.for_model(gpt2) is None


def test_int8_rounds_weights_to_q8_0_blocks_the_block_kernel_reads_exactly():
    from agentspec.kernels.blockq import pack_blocks

    from agentspec.engine.quantize import q8_0_round

    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-2, 0, 48)[:, None]  # rows of different scales
    q = q8_0_round(w)
    assert not torch.equal(q, w)
    assert ((q - w).abs().amax(dim=1) <= w.abs().amax(dim=1) / 250).all()  # half a step of 1/127 of the max
    packed = pack_blocks(q)
    assert packed is not None and packed.bits == 8 and torch.equal(packed.dequantize(), q)
    assert torch.equal(q8_0_round(q), q)  # already blocks: rounding again changes nothing


@pytest.mark.parametrize("seed", range(2))
def test_int8_greedy_equals_plain_decoding_of_the_int8_model(tiny_model, default_tokenizer, seed):
    import copy

    from agentspec.kernels.blockq import blocks_available

    from agentspec.engine.quantize import quantize_model

    model = quantize_model(copy.deepcopy(tiny_model), "int8")
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 40))]
    truth = hf_greedy(model, prompt, 40)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_model.model.layers[0].mlp.up_proj.weight)
    engine = make_engine(model, default_tokenizer, ScriptedDrafter(truth, 512, seed=seed), prefix_cache_bytes=0)
    if blocks_available():  # the engine reads the int8 blocks in its kernel
        assert model.model.layers[0].mlp.up_proj.blocks.bits == 8
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == truth
    assert result.stats.accepted_tokens > 0


class RecordingDrafter(ScriptedDrafter):
    """A scripted drafter that remembers the session ids it was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sessions: list[str | None] = []

    def start_request(self, request_id, session_id, prompt_ids):
        super().start_request(request_id, session_id, prompt_ids)
        self.sessions.append(session_id)


class ListRecorder:
    """A session recorder keeping calls in a list."""

    def __init__(self):
        self.calls: list[tuple[str, list[int], list[int]]] = []

    def ensure_loaded(self, session_id):
        pass

    def record(self, session_id, prompt_ids, output_ids, stats):
        self.calls.append((session_id, list(prompt_ids), list(output_ids)))
        return len(self.calls)


def test_tenants_keep_drafters_sessions_and_prefix_cache_apart(tiny_model, default_tokenizer):
    from agentspec.engine.engine import TenantParts

    prompt = list(range(20, 50))
    truth = hf_greedy(tiny_model, prompt, 8)
    made: dict[str, TenantParts] = {}

    def tenants(name):
        made[name] = TenantParts(RecordingDrafter(truth, 512), None, ListRecorder())
        return made[name]

    root = Engine(tiny_model, default_tokenizer, drafter=RecordingDrafter(truth, 512), sessions=ListRecorder(),
                  speculation=SpeculationConfig(adaptive=False), tenants=tenants)
    root.eos_ids = set()
    a, b = root.for_tenant("a"), root.for_tenant("b")
    assert a.forward is root.forward and a.model is root.model and a._lock is root._lock
    assert a.drafter is made["a"].drafter and b.sessions is made["b"].sessions
    first = a.generate(prompt, session="s", max_new_tokens=8)
    again = a.generate(prompt, session="s", max_new_tokens=8)
    other = b.generate(prompt, session="s", max_new_tokens=8)
    assert first.token_ids == again.token_ids == other.token_ids == truth
    assert again.stats.prefill_tokens == 1  # a's own prefix cache
    assert other.stats.prefill_tokens == len(prompt)  # b never reuses a's KV
    assert [c[0] for c in made["a"].sessions.calls] == ["s", "s"] and len(made["b"].sessions.calls) == 1
    assert root.sessions.calls == [] and root.drafter.sessions == []
    shared = root.for_tenant("c", share_global=True)  # the root's drafter and store; sessions apart by id
    shared.generate(prompt, session="s", max_new_tokens=8)
    assert root.drafter.sessions == ["c/s"] and root.sessions.calls[0][0] == "c/s"
    with pytest.raises(ValueError, match="tenant factory"):
        Engine(tiny_model, default_tokenizer).for_tenant("a")


@pytest.fixture
def tiny_from_pretrained(monkeypatch, tiny_model, default_tokenizer):
    """``Engine.from_pretrained`` composing the tiny model (no weights loaded)."""
    from agentspec.engine import engine as engine_module
    from agentspec.engine.model import ModelSource

    monkeypatch.setattr(engine_module, "resolve_model", lambda model: ModelSource("tiny", Path("tiny.gguf")))
    monkeypatch.setattr(engine_module, "load_model", lambda model, dtype, device=None: (tiny_model, default_tokenizer))


def test_from_pretrained_is_persistent_by_default(tiny_from_pretrained, tmp_path, monkeypatch):
    from agentspec.stores import open_store

    monkeypatch.setenv("AGENTSPEC_HOME", str(tmp_path))
    engine = Engine.from_pretrained(speculation=SpeculationConfig(adaptive=False))
    assert engine.model_source == "tiny.gguf" and engine.policy is None
    engine.generate([5, 6, 7], session="kept", max_new_tokens=3)
    calls = open_store(f"sqlite:///{tmp_path / 'cache.db'}").load_session("kept").calls
    assert len(calls) == 1 and calls[0].prompt_ids == [5, 6, 7]
    memory = Engine.from_pretrained(store="memory", speculation=SpeculationConfig(adaptive=False))
    assert memory.sessions is None and memory.drafter is not None


def test_from_pretrained_tenants_use_scoped_store_views(tiny_from_pretrained, tmp_path):
    class ScopedStore:  # what from_pretrained needs of a store for tenants: scoped(namespace)
        def __init__(self, namespace=""):
            self.namespace, self.views = namespace, {}

        def scoped(self, namespace):
            return self.views.setdefault(namespace, ScopedStore(namespace))

    store = ScopedStore()
    engine = Engine.from_pretrained(store=store, speculation=SpeculationConfig(adaptive=False))
    tenant = engine.for_tenant("acme")
    assert engine.sessions.store is store and tenant.sessions.store is store.views["acme"]
    assert tenant.drafter is not engine.drafter and tenant.namespace == "acme"


def test_cuda_device_selects_the_triton_tree_attention(monkeypatch, tiny_model):
    """On CUDA the verification forward is transformers' decoder with agentspec's tree attention, which
    sends CUDA tensors to the Triton kernel (the device check is mocked: no GPU here; the kernel itself
    runs through the engine in the interpreter, tests/test_kernels.py)."""
    from types import SimpleNamespace

    from agentspec.kernels import ATTN_NAME, dispatch

    from agentspec.engine import forward

    monkeypatch.setattr(forward, "model_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(forward, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    backend = forward.select_forward(tiny_model)
    assert isinstance(backend, forward.HFForward) and backend.attention == ATTN_NAME and backend.name == "hf+triton"
    assert dispatch.use_triton(SimpleNamespace(is_cuda=True))
    assert not dispatch.use_triton(SimpleNamespace(is_cuda=False))
    monkeypatch.undo()
    assert isinstance(forward.select_forward(tiny_model), forward.LeanForward)  # a CPU Llama: the lean forward
    assert forward.select_forward(tiny_model, fast_cpu=False).name == "hf"


@pytest.mark.parametrize("fast_cpu", [True, False])
def test_forward_backends_give_the_same_greedy_output(tiny_model, default_tokenizer, fast_cpu):
    from agentspec.engine.forward import select_forward

    prompt = list(range(60, 90))
    truth = hf_greedy(tiny_model, prompt, 20)
    backend = select_forward(tiny_model, fast_cpu=fast_cpu)
    engine = Engine(tiny_model, default_tokenizer, drafter=ScriptedDrafter(truth, 512), forward=backend,
                    speculation=SpeculationConfig(adaptive=False))
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=20)
    assert result.token_ids == truth and result.stats.accepted_tokens > 0


@pytest.mark.parametrize("prompt, tools, problem", [
    ([{"role": "wizard", "content": "hi"}], None, "message 0 has role 'wizard'; expected one of system, user"),
    ([{"role": "user", "content": "hi"}, {"role": None, "content": "x"}], None, "message 1 has role None"),
    ([{"content": "hi"}], None, "message 0 has role None"),
    (["hello"], None, "message 0 must be a dict"),
    ([{"role": "user", "content": 5}], None, "content must be a string or a list of text parts, got int"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None, "content part 0 must be"),
    ([{"role": "user", "content": "a\ud800b"}], None, r"message 0 \(user\) content holds a lone surrogate"),
    ("a\ud800b", None, "prompt holds a lone surrogate '\\\\ud800' at character 1"),
    ([{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}], None, "part 0 holds a lone surrogate"),
    ([{"role": "tool", "content": "ok", "tool_call_id": 7}], None, "tool_call_id must be a string"),
    ([{"role": "assistant", "content": None, "tool_calls": "f()"}], None, "tool_calls must be a list"),
    ([{"role": "user", "content": "hi"}], "get_weather", "tools must be a list"),
    ([{"role": "user", "content": "hi"}], [{"name": "f\ud800"}], "tool 0 holds a lone surrogate"),
    ([5, 600], None, r"token id 1 is 600, outside the vocabulary \[0, 512\)"),
    ([5, -1], None, "token id 1 is -1, outside"),
    ([5, "6"], None, "token id 1 must be an integer"),
    ([5, 2.0], None, "token id 1 must be an integer"),
    ([True, 5], None, "token id 0 must be an integer"),
    (42, None, "expected a string, messages or token ids; got int"),
])
def test_invalid_input_is_a_value_error_before_anything_starts(tiny_model, default_tokenizer, prompt, tools, problem):
    drafter = ScriptedDrafter([], 512)
    engine = make_engine(tiny_model, default_tokenizer, drafter)
    with pytest.raises(ValueError, match=problem):
        engine.stream(prompt, tools=tools)
    assert not drafter.context  # no request started


def test_valid_messages_of_every_role_are_accepted(tiny_model, default_tokenizer):
    engine = make_engine(tiny_model, default_tokenizer, None)
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ids = engine.encode_prompt([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "ok", "tool_call_id": "1", "name": "f"},
    ], tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert ids and all(isinstance(t, int) for t in ids)
