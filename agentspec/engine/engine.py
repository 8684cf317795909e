"""The engine: prefill, draft, verify, accept, compact, update.

One call of :meth:`Engine.generate` (``stream`` is the same code path)::

    prompt ids -> prefix KV from the prefix cache -> prefill the rest -> first token (root)
    loop: draft = drafter.propose(...) pruned by the lookahead policy
          logits = model([root] + draft, tree mask, positions)       # one forward
          accepted, bonus = accept(draft, logits)                     # greedy or sampling
          compact KV to prefix + root + accepted;  root = bonus
    -> drafter / session store learn the call

Greedy output equals plain one-token-at-a-time greedy decoding; sampling output has exactly
the plain sampling distribution (model-free drafts, sample-and-match acceptance).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from agentspec import chat
from agentspec.config import SamplingParams, SpeculationConfig
from agentspec.draft.base import SOURCE_NAMES, Drafter, DraftTree
from agentspec.engine.constraints import Grammar, GrammarCompiler
from agentspec.engine.cpu_fast import attention, fast_linears, output_head, skinny_linears, tree_attention_name
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.processors import LogitsPipeline, TokenLogprob
from agentspec.engine.radix import KVPool, PrefixMatch, RadixCache
from agentspec.engine.step_forward import LlamaStepForward
from agentspec.engine.verify import accept_greedy, accept_sampling, ancestor_mask, sample_token, tree_inputs
from agentspec.stats import SpecStats

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward (bounds attention memory)
RECYCLE_TOP_K = 8


@dataclass
class GenerationResult:
    """What one generation produced."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None  # with ``logprobs=k``: one entry per output token


class GenerationStream:
    """Iterate for text deltas; ``result`` holds the :class:`GenerationResult` once done.

    ``close()`` cancels the generation (e.g. when an HTTP client disconnects).
    """

    def __init__(self, deltas: Iterator[str]) -> None:
        self._deltas = deltas
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        self._deltas.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Engine:
    """Lossless tree-speculative generation on a Hugging Face causal LM.

    Build with :meth:`from_pretrained`; the constructor takes ready objects (tests pass a tiny
    model and a scripted drafter).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        drafter: Drafter | None = None,
        policy: Any | None = None,
        sessions: Any | None = None,
        speculation: SpeculationConfig | None = None,
        model_name: str = "model",
        fast_cpu: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.policy = policy  # LookaheadPolicy: select(tree) -> tree, observe(k, seconds)
        self.sessions = sessions  # SessionManager: ensure_loaded(id), record(id, prompt, output, stats)
        self.speculation = speculation or SpeculationConfig()
        self.model_name = model_name
        self.model_source: str | None = None  # the path the weights came from (from_pretrained sets it)
        self.quantization: str | None = None  # e.g. "int8" (from_pretrained sets it)
        self.context_window = int(getattr(model.config, "max_position_embeddings", 8192))
        self.num_layers = int(model.config.num_hidden_layers)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.prefix_cache = _prefix_cache(model, self.speculation.prefix_cache_bytes)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._lock = threading.RLock()
        self._request_ids = itertools.count()
        self._observe = getattr(drafter, "observe", None)  # recycling table feed, if the drafter has one
        self._fingerprint: str | None = None
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._tree_attention: str | None = None  # attention implementation for verification forwards
        self._step_forward: LlamaStepForward | None = None  # lean verification forward, where it applies
        if fast_cpu:
            skinny_linears(model)
            self._head = output_head(model)
            self._tree_attention = tree_attention_name(model)
            if self._tree_attention is not None:
                self._step_forward = LlamaStepForward.for_model(model)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        dtype: str = "float32",
        quantize: str | None = None,
        store: Any | None = None,
        speculation: SpeculationConfig | None = None,
        threads: int | None = None,
        drafter: Drafter | None = None,
    ) -> Engine:
        """Load ``model`` (default SmolLM2-135M-Instruct, or a local dir / .gguf) and its drafters.

        ``store``: a session store URL, a store object, or ``None`` for in-memory sessions.
        ``quantize="int8"``: dynamic int8 weights in the linear layers (CPU).
        """
        from agentspec.engine.model import load_model, resolve_model

        if threads:
            torch.set_num_threads(threads)
        source = resolve_model(model)
        hf_model, tokenizer = load_model(model, dtype=dtype)
        if quantize:
            from agentspec.engine.quantize import quantize_model

            hf_model = quantize_model(hf_model, quantize)
        speculation = speculation or SpeculationConfig()
        if drafter is None:
            from agentspec.draft.builder import SuffixDrafter

            drafter = SuffixDrafter()
        engine = cls(hf_model, tokenizer, drafter=drafter, speculation=speculation, model_name=source.name)
        engine.model_source = str(source.path)
        engine.quantization = quantize
        if speculation.adaptive:
            from agentspec.lookahead import LookaheadPolicy

            engine.policy = LookaheadPolicy.for_engine(engine)
        if store is not None:  # without a store the drafter keeps sessions in memory by itself
            from agentspec.sessions import SessionManager

            engine.sessions = SessionManager.open(store, drafter, engine.fingerprint)
        return engine

    @property
    def fingerprint(self) -> str:
        """Stable hash of the tokenizer's vocabulary: token ids are only shared between equal ones."""
        if self._fingerprint is None:
            vocab = sorted(self.tokenizer.get_vocab().items())
            self._fingerprint = hashlib.sha1(repr(vocab).encode()).hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: str | Sequence[dict] | Sequence[int], **kwargs: Any) -> GenerationResult:
        """Generate a completion. See :meth:`stream` for the arguments."""
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def stream(
        self,
        prompt: str | Sequence[dict] | Sequence[int],
        *,
        session: str | None = None,
        tools: Sequence[dict] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: Sequence[str] | str = (),
        seed: int | None = None,
        speculate: bool | None = None,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        grammar: Grammar | dict | None = None,
    ) -> GenerationStream:
        """Stream text deltas of a completion.

        ``prompt``: a string (one user message, chat template applied), OpenAI-style messages,
        or raw prompt token ids. ``session`` names the agent session whose cache drafts for it.
        ``speculate=False`` decodes one token per step (the baseline through the same code).
        Penalties, ``logit_bias`` and ``logprobs`` (top-k alternatives per token) are as in
        :class:`~agentspec.config.SamplingParams`. ``grammar``: a :class:`Grammar` or an OpenAI
        ``response_format`` dict the output must match (constrained decoding, drafts included).
        Raises ``ValueError`` at once for bad input; the engine stays usable.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, stop, seed, repetition_penalty,
                                presence_penalty, frequency_penalty, logit_bias, logprobs)
        params.validate()
        if isinstance(grammar, dict):
            grammar = Grammar.from_response_format(grammar)
        matcher = self.grammar_compiler().matcher(grammar) if grammar is not None else None
        prompt_ids = self.encode_prompt(prompt, tools)
        if len(prompt_ids) >= self.context_window:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens but the context window is {self.context_window} tokens"
            )
        spec = self.speculation.enabled if speculate is None else speculate
        stream = GenerationStream(iter(()))
        pipeline = LogitsPipeline(params, prompt_ids, matcher)
        stream._deltas = self._text_deltas(stream, prompt_ids, session, params, spec and self.drafter is not None,
                                           pipeline)
        return stream

    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles grammars for this engine's tokenizer and vocabulary (built once, on first use)."""
        if self._grammars is None:
            vocab = int(self.model.config.vocab_size)
            self._grammars = GrammarCompiler(self.tokenizer, vocab, sorted(self.eos_ids))
        return self._grammars

    def encode_prompt(
        self, prompt: str | Sequence[dict] | Sequence[int], tools: Sequence[dict] | None = None
    ) -> list[int]:
        """Prompt token ids for a string, a message list or ready ids; ``ValueError`` if empty."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt is empty: expected a string, messages or token ids")
        if all(isinstance(t, int) for t in prompt):
            return prompt
        return chat.prompt_ids(self.tokenizer, prompt, tools)

    def count_tokens(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> int:
        return len(chat.prompt_ids(self.tokenizer, messages, tools))

    # ------------------------------------------------------------------ text layer
    def _text_deltas(
        self, stream: GenerationStream, prompt_ids: list[int], session: str | None,
        params: SamplingParams, speculate: bool, pipeline: LogitsPipeline,
    ) -> Iterator[str]:
        """Decode token steps into text deltas, cut at stop strings, hold back partial ones."""
        stops = [s for s in params.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        output: list[int] = []
        sent = 0
        text = ""
        stats = SpecStats(prompt_tokens=len(prompt_ids))
        steps = self._token_steps(prompt_ids, session, params, speculate, stats, pipeline)
        try:
            for new_tokens in steps:
                output.extend(new_tokens)
                text = self.tokenizer.decode(output, skip_special_tokens=True)
                cut = _first_stop(text, stops)
                if cut is not None:
                    text = text[:cut]
                    stats.finish_reason = "stop"
                    break
                safe = len(text) - hold if stops else len(text)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its rest
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
        finally:
            steps.close()
        if len(text) > sent:
            yield text[sent:]
        logprobs = pipeline.logprobs[: len(output)] if pipeline.logprobs is not None else None
        stream.result = GenerationResult(text, output, stats.finish_reason, len(prompt_ids), stats, logprobs)

    # ------------------------------------------------------------------ token layer
    def _token_steps(
        self, prompt_ids: list[int], session: str | None, params: SamplingParams, speculate: bool,
        stats: SpecStats, pipeline: LogitsPipeline,
    ) -> Iterator[list[int]]:
        """Yield the tokens committed by each step, counting into ``stats``.

        ``stats.finish_reason`` ends as "stop" / "length"; it stays "" when the generation is
        cancelled or interrupted, and then nothing is recorded in the session store.
        """
        request_id = f"req-{next(self._request_ids)}"
        generator = None
        if not params.greedy and params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        max_new = min(params.max_new_tokens, self.context_window - len(prompt_ids))
        output: list[int] = []
        cache: TreeKVCache | None = None
        match: PrefixMatch | None = None
        if self.sessions is not None and session is not None:
            with self._lock:  # may refuse the session (another tokenizer's): nothing has started yet
                self.sessions.ensure_loaded(session)
        try:
            with self._lock:
                if speculate:
                    self.drafter.start_request(request_id, session, prompt_ids)
                t0 = time.perf_counter()
                match = self._match_prefix(prompt_ids)
                cache, logits = self._prefill(prompt_ids, match, stats)
                logits = pipeline.process(logits[None], DraftTree())[0]
                root = sample_token(logits, params, generator)
                pipeline.commit([root], logits[None], [0])
                stats.prefill_seconds = time.perf_counter() - t0
                if speculate:
                    self.drafter.accept(request_id, DraftTree(), [], [root])
            output.append(root)
            stats.output_tokens = 1
            yield [root]
            done = root in self.eos_ids or len(output) >= max_new
            while not done:
                with self._lock:
                    t0 = time.perf_counter()
                    new_tokens = self._step(request_id, cache, root, params, generator, stats, speculate,
                                            room=max_new - len(output), pipeline=pipeline)
                    stats.decode_seconds += time.perf_counter() - t0
                done = new_tokens[-1] in self.eos_ids
                output.extend(new_tokens)
                stats.output_tokens = len(output)
                root = new_tokens[-1]
                done = done or len(output) >= max_new
                yield new_tokens
            stats.finish_reason = "stop" if output[-1] in self.eos_ids else "length"
        finally:
            with self._lock:
                if speculate:
                    self.drafter.stop_request(request_id)
                if match is not None:
                    if cache is not None:  # valid rows: prompt + output[:-1] (the last root is not computed yet)
                        self.prefix_cache.cache_sequence(prompt_ids + output[:-1], cache)
                    self.prefix_cache.unlock(match.node)
                if stats.finish_reason and self.sessions is not None and session is not None:
                    self._record(session, prompt_ids, output, stats)

    def _record(self, session: str, prompt_ids: list[int], output: list[int], stats: SpecStats) -> None:
        """Append the call to the session store; a store failure is logged, never the caller's lost output."""
        from agentspec.stores import StoreError

        try:
            self.sessions.record(session, prompt_ids, output, stats)
        except StoreError as exc:
            logger.warning("session %r: the call was generated but not stored: %s", session, exc)

    def _match_prefix(self, prompt_ids: list[int]) -> PrefixMatch | None:
        """The prompt's longest cached prefix, locked until the request ends (None without a cache)."""
        if self.prefix_cache is None:
            return None
        match = self.prefix_cache.match_prefix(prompt_ids)
        self.prefix_cache.lock(match.node)
        return match

    def _prefill(
        self, prompt_ids: list[int], match: PrefixMatch | None, stats: SpecStats
    ) -> tuple[TreeKVCache, torch.Tensor]:
        """Fill the KV cache for the prompt (copying a cached prefix's rows); logits of the last position."""
        cache = TreeKVCache(self.num_layers, capacity=len(prompt_ids) + 256)
        reused = 0
        if match is not None:
            reused = min(match.length, len(prompt_ids) - 1)  # at least one token must run for its logits
            self.prefix_cache.pool.read_into(match.slots[:reused], cache)
        stats.prefill_tokens = len(prompt_ids) - reused
        with torch.no_grad(), fast_linears():
            for start in range(reused, len(prompt_ids), PREFILL_CHUNK):
                chunk = prompt_ids[start : start + PREFILL_CHUNK]
                if self._step_forward is not None:
                    hidden = self._step_forward.prefill(torch.tensor(chunk, device=self.device), cache)[None]
                    continue
                hidden = self._decoder(
                    input_ids=torch.tensor([chunk], device=self.device),
                    position_ids=torch.arange(start, start + len(chunk), device=self.device)[None],
                    past_key_values=cache, use_cache=True,
                ).last_hidden_state
            logits = self._head(hidden[0, -1:])[0]
        return cache, logits

    def _step(
        self, request_id: str, cache: TreeKVCache, root: int, params: SamplingParams,
        generator: torch.Generator | None, stats: SpecStats, speculate: bool, room: int,
        pipeline: LogitsPipeline,
    ) -> list[int]:
        """One verification step: draft, verify, accept, compact, update. Returns committed tokens."""
        past = cache.length
        tree = self._draft(request_id, past, room, pipeline) if speculate else DraftTree()
        t0 = time.perf_counter()
        logits = self._verify(cache, root, tree, past)
        if pipeline.active:
            logits = pipeline.process(logits, tree)
        if self.policy is not None and speculate:
            self.policy.observe(1 + len(tree), time.perf_counter() - t0)
        if params.greedy:
            accepted, bonus = accept_greedy(tree, logits)
        else:
            accepted, bonus = accept_sampling(tree, logits, params, generator)
        cache.compact(past, [0] + [1 + i for i in accepted])
        new_tokens = _truncate([tree.tokens[i] for i in accepted] + [bonus], room, self.eos_ids)
        accepted = accepted[: len(new_tokens)]
        pipeline.commit(new_tokens, logits, [0] + [1 + i for i in accepted])
        stats.steps += 1
        stats.drafted_tokens += len(tree)
        stats.accepted_tokens += len(accepted)
        for i in accepted:
            name = SOURCE_NAMES.get(tree.sources[i], str(tree.sources[i]))
            stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + 1
        if speculate:
            self.drafter.accept(request_id, tree, accepted, new_tokens)
            if self._observe is not None and len(tree):
                top = logits.topk(RECYCLE_TOP_K, dim=-1).indices
                self._observe([root, *tree.tokens], top.cpu().numpy())
        return new_tokens

    def _draft(self, request_id: str, past: int, room: int, pipeline: LogitsPipeline) -> DraftTree:
        # the tree must fit the window: deepest node at position past + depth < context_window
        budget = min(self.speculation.max_draft_tokens, room, self.context_window - past - 2)
        if budget <= 0:
            return DraftTree()
        tree = self.drafter.propose(request_id, budget)
        if self.policy is not None and len(tree):
            tree = self.policy.select(tree)
        return pipeline.draft(tree, budget)  # under a grammar: rejected branches cut, forced tokens added

    def _verify(self, cache: TreeKVCache, root: int, tree: DraftTree, past: int) -> torch.Tensor:
        """One forward over ``[root] + tree``: logits ``[1 + n, V]`` (fp32)."""
        with torch.no_grad(), fast_linears():
            if self._step_forward is not None:
                ids = torch.tensor([root, *tree.tokens], device=self.device)
                positions = torch.tensor([past, *(past + d for d in tree.depths())], device=self.device)
                hidden = self._step_forward(ids, positions, ancestor_mask(tree.parents).to(self.device), cache)
                return self._head(hidden).float()
            if not len(tree):
                out = self._decoder(
                    input_ids=torch.tensor([[root]], device=self.device),
                    position_ids=torch.tensor([[past]], device=self.device),
                    past_key_values=cache, use_cache=True,
                )
            else:
                inputs = tree_inputs(root, tree, past, self.dtype)
                with attention(self.model, self._tree_attention):
                    out = self._decoder(
                        input_ids=inputs.input_ids.to(self.device),
                        position_ids=inputs.position_ids.to(self.device),
                        attention_mask=inputs.attention_mask.to(self.device),
                        past_key_values=cache, use_cache=True,
                    )
            return self._head(out.last_hidden_state[0]).float()

    def forward_cost(self, k: int, past: int = 1000) -> float:
        """Seconds of one verification forward over ``k`` tree tokens (a chain) after ``past`` cached tokens."""
        if getattr(self, "_cost_cache", None) is None or self._cost_cache[0] != past:
            cache, _ = self._prefill(list(range(1, past + 1)), None, SpecStats())
            self._cost_cache = (past, cache)
        cache = self._cost_cache[1]
        cache.truncate(past)
        tree = DraftTree(tokens=list(range(3, 2 + k)), parents=list(range(-1, k - 2)),
                         probs=[1.0] * (k - 1), sources=[0] * (k - 1))
        t0 = time.perf_counter()
        self._verify(cache, 1, tree, past)
        return time.perf_counter() - t0


def _prefix_cache(model: Any, max_bytes: int) -> RadixCache | None:
    """A radix cache of ``max_bytes`` of KV for ``model`` (None when ``max_bytes`` is 0)."""
    if max_bytes <= 0:
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    pool = KVPool.for_budget(config.num_hidden_layers, config.num_key_value_heads, head_dim, max_bytes,
                             dtype=param.dtype, device=param.device)
    return RadixCache(pool)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, getattr(tokenizer, "eos_token_id", None), model.config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _truncate(tokens: list[int], room: int, eos_ids: set[int]) -> list[int]:
    """At most ``room`` tokens, ending at the first EOS if there is one."""
    tokens = tokens[:room]
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
