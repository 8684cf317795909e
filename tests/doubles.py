"""A scripted stand-in for :class:`~agentspec.engine.Engine`, for fast tests of code built on it.

``ScriptedEngine`` has the engine's public surface (``tokenizer``, ``model_name``,
``context_window``, ``stream``, ``generate``, ``search``) but no model: each call answers with the next
scripted reply (or a function of the prompt), one character per token, streamed word by word.
Its tokenizer is one token per character, so prompt lengths are easy to reason about.

``tiny_llama`` builds the tiny random Llama the engine's mechanics are tested on.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agentspec.engine.processors import TokenLogprob
from agentspec.search.types import SearchStats
from agentspec.stats import SpecStats


def tiny_llama(init: float = 0.02):
    """A tiny randomly initialised Llama (fp32, eval mode, SDPA, seed 0) with a 512-token vocab, eos id 2;
    a larger ``init`` (the weights' standard deviation) peaks its next-token distributions, so its
    outputs repeat and drafts get accepted."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, initializer_range=init,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


def write_q4_1_blocks(model, seed: int = 1) -> None:
    """Set every linear weight of ``model``'s decoder layers to exact Q4_1 block values (each block spans
    its whole 0..15 range, so its scale and minimum are recovered), so the block kernel and the fused
    q/k/v and gate/up calls run on it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                n, k = module.weight.shape
                d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
                m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
                q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
                q[..., 0], q[..., 1] = 0, 15
                module.weight.copy_((d * q + m).reshape(n, k))


def assert_step_matches_transformers(model, step) -> None:
    """One verification step of the lean forward ``step`` over a random 9-token tree after a cached 40-token
    prefix equals transformers' own forward of ``model`` with the same tree mask: hidden states and KV."""
    import random

    import torch

    from agentspec.draft.base import DraftTree
    from agentspec.engine.cpu_fast import fast_linears
    from agentspec.engine.kvcache import TreeKVCache
    from agentspec.engine.verify import ancestor_mask, tree_inputs

    rng = random.Random(0)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    prefix = [rng.randrange(vocab) for _ in range(40)]
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, 9)]
    tree = DraftTree(tokens=[rng.randrange(vocab) for _ in parents], parents=parents,
                     probs=[0.5] * len(parents), sources=[0] * len(parents))
    caches = []
    with torch.no_grad():
        for _ in range(2):
            cache = TreeKVCache(layers)
            model.model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
            caches.append(cache)
        inputs = tree_inputs(7, tree, len(prefix), torch.float32)
        want = model.model(input_ids=inputs.input_ids, position_ids=inputs.position_ids,
                           attention_mask=inputs.attention_mask, cache=caches[0], use_cache=True).last_hidden_state[0]
        with fast_linears():
            got = step(inputs.input_ids[0], inputs.position_ids[0], ancestor_mask(parents), caches[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert caches[1].length == caches[0].length == len(prefix) + 1 + len(parents)
    torch.testing.assert_close(caches[1].layers[-1].keys, caches[0].layers[-1].keys, atol=1e-5, rtol=1e-5)


def tiny_decoder(model_type: str = "llama", init: float = 0.02):
    """:func:`tiny_llama`'s sizes in another Llama-family architecture: ``"qwen2"`` (q/k/v biases, rope theta
    1e6) or ``"qwen3"`` (per-head q/k RMSNorm); biases random, so a forward that drops them differs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "llama":
        return tiny_llama(init)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=init, rope_theta=1e6,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    model.config._attn_implementation = "sdpa"
    return model


class CharTokenizer:
    """One token per character (code point); a ChatML-like template."""

    eos_token_id = 0

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # as a Hugging Face fast tokenizer fails
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]") \
                from exc
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@dataclass
class ScriptedResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ScriptedSearch:
    trajectories: list[ScriptedResult]  # text, token_ids, finish_reason: as a search's trajectories
    stats: SearchStats


class ScriptedStream:
    """Iterate for text deltas; ``result`` once exhausted; ``close()`` cancels (and is counted)."""

    def __init__(self, engine: ScriptedEngine, deltas: Iterator[str]) -> None:
        self._engine = engine
        self._deltas = deltas
        self.result: ScriptedResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        if self.result is None:
            self._engine.cancelled += 1
        self._deltas.close()


class ScriptedEngine:
    """Answers with ``replies`` in turn (cycling), or ``reply(prompt_text)``; ``delay`` seconds per delta."""

    def __init__(self, replies: Sequence[str] | Callable[[str], str] = ("Hello! How can I help?",), *,
                 delay: float = 0.0, context_window: int = 4096, model_name: str = "scripted") -> None:
        self.replies = replies
        self.delay = delay
        self.context_window = context_window
        self.model_name = model_name
        self.tokenizer = CharTokenizer()
        self.tenant: str | None = None
        self.calls: list[dict] = []  # the arguments of every stream() call (tenants' too)
        self.cancelled = 0  # streams closed before they finished
        self.session_errors: dict[str, Exception] = {}  # raised on a stream's first next(), as a store would
        self._sessions: dict[str, list[str]] = {}
        self._global: list[str] = []  # every reply: the "global tree"
        self._lock = threading.Lock()

    def for_tenant(self, name: str, *, share_global: bool = False) -> ScriptedEngine:
        """A view with the same script and call log, its own sessions and (unless shared) global replies."""
        view = copy.copy(self)
        view.tenant, view._sessions, view.session_errors = name, {}, {}
        view._global = self._global if share_global else []
        return view

    def generate(self, prompt: Any, **kwargs: Any) -> ScriptedResult:
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def search(self, prompt: Any, *, width: int = 4, policy: str = "ets", max_new_tokens: int = 1024,
               temperature: float = 1.0, seed: int | None = None, session: str | None = None,
               **_: Any) -> ScriptedSearch:
        """The next ``width`` replies (each one ``stream()`` call, so one ``calls`` entry) as one search's result."""
        results = [self.generate(prompt, session=session, max_new_tokens=max_new_tokens, temperature=temperature,
                                 seed=seed) for _ in range(width)]
        stats = SearchStats(width=width, policy=policy, prompt_tokens=results[0].prompt_tokens,
                            generated_tokens=sum(len(r.token_ids) for r in results))
        return ScriptedSearch(results, stats)

    def stream(self, prompt: Any, *, session: str | None = None, tools: Sequence[dict] | None = None,
               max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               stop: Sequence[str] | str = (), seed: int | None = None,
               speculate: bool | None = None, **processing: Any) -> ScriptedStream:
        """``processing``: penalties, logit_bias, grammar: accepted, not applied; ``logprobs=k``: every
        token gets logprob -0.5 and the alternatives ``(token + i, -0.5 - i)`` for i < k."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.context_window:
            raise ValueError(f"prompt is {len(ids)} tokens but the context window is {self.context_window} tokens")
        bad = [t for t in ids if not 0 <= t < 0x110000]  # the real engine checks ids against its vocabulary
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary")
        prompt_text = self.tokenizer.decode(ids)
        with self._lock:
            self.calls.append(dict(prompt=prompt_text, session=session, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed,
                                   tenant=self.tenant, grammar=processing.get("grammar")))
            n = len(self.calls) - 1
        reply = self.replies(prompt_text) if callable(self.replies) else self.replies[n % len(self.replies)]
        stream = ScriptedStream(self, iter(()))
        stream._deltas = self._deltas(stream, reply, len(ids), session, max_new_tokens,
                                      [stop] if isinstance(stop, str) else list(stop), processing.get("logprobs"))
        return stream

    def _deltas(self, stream: ScriptedStream, reply: str, prompt_tokens: int, session: str | None,
                max_new_tokens: int, stops: list[str], top_logprobs: int | None = None) -> Iterator[str]:
        finish = "stop"
        if len(reply) > max_new_tokens:
            reply, finish = reply[:max_new_tokens], "length"
        cuts = [i for s in stops if s and (i := reply.find(s)) >= 0]
        if cuts:
            reply, finish = reply[: min(cuts)], "stop"
        if session in self.session_errors:
            raise self.session_errors[session]
        seen = self._sessions.setdefault(session, []) if session else []
        # "drafts": characters of this reply that an earlier reply of the session (or of anyone: global) had
        from_session = _matching(reply, seen)
        from_global = _matching(reply, self._global) - from_session
        words = reply.split(" ")
        for i, word in enumerate(words):
            if self.delay:
                time.sleep(self.delay)
            yield word + (" " if i < len(words) - 1 else "")
        storable = session is None or (len(session) <= 512 and "\x00" not in session
                                       and session.encode(errors="ignore").decode() == session)
        if not storable:
            raise RuntimeError(f"the store cannot keep session id {session!a}")  # as SQLite / PostgreSQL fail
        seen.append(reply)
        self._global.append(reply)
        sources = {k: v for k, v in (("session", from_session), ("global", from_global)) if v}
        accepted = from_session + from_global
        stats = SpecStats(prompt_tokens=prompt_tokens, prefill_tokens=prompt_tokens, output_tokens=len(reply),
                          steps=max(1, len(reply) - accepted), drafted_tokens=accepted,
                          accepted_tokens=accepted, finish_reason=finish, accepted_by_source=sources)
        ids = self.tokenizer.encode(reply)
        logprobs = None if top_logprobs is None else [
            TokenLogprob(t, -0.5, [(t + i, -0.5 - i) for i in range(top_logprobs)]) for t in ids]
        stream.result = ScriptedResult(reply, ids, finish, prompt_tokens, stats, logprobs)


def _matching(reply: str, earlier: Sequence[str]) -> int:
    return sum(1 for i, c in enumerate(reply) if any(i < len(p) and p[i] == c for p in earlier))


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
