"""The engine: prefill, draft, verify, accept, compact, update.

One call of :meth:`Engine.generate` (``stream`` is the same code path)::

    prompt ids -> prefix KV from the radix cache -> prefill the rest -> first token (root)
    loop: draft = drafter.propose(...) pruned by the lookahead policy
          logits = forward([root] + draft, tree mask, positions)      # one forward
          accepted, bonus = accept(draft, logits)                     # greedy or sampling
          compact KV to prefix + root + accepted;  root = bonus
    -> the drafter learns the call; the session recorder stores it; the radix cache keeps its KV

Greedy output equals plain one-token-at-a-time greedy decoding; sampling output has exactly
the plain sampling distribution (model-free drafts, sample-and-match acceptance).

The engine is composed of typed parts, all given at construction: a
:class:`~agentspec.draft.base.Drafter`, a :class:`DraftPolicy`, a :class:`SessionRecorder` and a
:class:`~agentspec.engine.forward.ForwardBackend`. :meth:`Engine.from_pretrained` only composes them.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agentspec import chat
from agentspec.config import SamplingParams, SpeculationConfig
from agentspec.draft.base import SOURCE_NAMES, Drafter, DraftTree
from agentspec.draft.builder import SuffixDrafter
from agentspec.engine.constraints import Grammar, GrammarCompiler
from agentspec.engine.cpu_fast import narrow_matmul
from agentspec.engine.forward import ForwardBackend, LeanForward, model_device, select_forward
from agentspec.engine.grammar_budget import GrammarLimits
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.model import default_device, load_model, resolve_model
from agentspec.engine.processors import LogitsPipeline, TokenLogprob
from agentspec.engine.quantize import quantize_model
from agentspec.engine.radix import KVPool, PrefixMatch, RadixCache
from agentspec.engine.search import SearchConfig, run_search
from agentspec.engine.verify import accept_greedy, accept_sampling, ancestor_mask, sample_token
from agentspec.kernels.attention import bf16_dot_products, narrow_kv_dtype
from agentspec.lookahead import CostCurve, LookaheadPolicy
from agentspec.search import Scorer, SearchResult
from agentspec.search.selection import CLUSTER_DISTANCE
from agentspec.sessions import StoreSessions
from agentspec.stats import SpecStats
from agentspec.stores import SESSION_ID_LIMIT, StoreError, check_name, open_store
from agentspec.tokens import common_prefix

logger = logging.getLogger(__name__)


class DraftPolicy(Protocol):
    """Decides how much of a draft tree to verify (:class:`~agentspec.lookahead.LookaheadPolicy`)."""

    def select(self, tree: DraftTree) -> DraftTree:
        """The subtree (closed under parents, maybe empty) worth verifying."""

    def observe(self, k: int, seconds: float) -> None:
        """An observed verification forward over ``k`` tokens took ``seconds``."""


class SessionRecorder(Protocol):
    """Stores finished calls (:class:`~agentspec.sessions.StoreSessions`)."""

    def record(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stats: SpecStats) -> int | None:
        """Append a finished call; returns its record id (None when nothing is persisted)."""


@dataclass
class TenantParts:
    """What a tenant does not share with the other tenants of an engine (see :meth:`Engine.for_tenant`)."""

    drafter: Drafter | None
    policy: DraftPolicy | None
    sessions: SessionRecorder | None


TenantFactory = Callable[[str], TenantParts]  # tenant name -> its own parts


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

    def __init__(self, deltas: Generator[str, None, GenerationResult]) -> None:
        self._deltas = deltas
        self.result: GenerationResult | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except StopIteration as stop:  # the generator returns the result
            if stop.value is not None:
                self.result = stop.value
            raise

    def close(self) -> None:
        self._deltas.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Engine:
    """Lossless tree-speculative generation on a Hugging Face causal LM.

    Build with :meth:`from_pretrained`; the constructor takes ready parts (tests pass a tiny
    model and a scripted drafter):

    * ``drafter`` proposes token trees (None: no speculation);
    * ``policy`` prunes each tree to what is worth verifying (None: verify it whole);
    * ``sessions`` stores finished calls (None: nothing is stored);
    * ``forward`` runs the model (None: :func:`~agentspec.engine.forward.select_forward` picks the
      backend for the model's device);
    * ``tenants`` builds a tenant's own parts for :meth:`for_tenant`;
    * ``kv_dtype`` stores the KV cache in ``"float16"`` or ``"bfloat16"`` (lean CPU forward only):
      half the bytes attention reads; outputs then equal plain decoding with that KV precision;
    * ``matmul="int8"`` (where ``forward`` is None): block weights take int8-rounded inputs and integer
      dot products (CPU, AVX-512 VNNI; see :mod:`agentspec.engine.cpu_fast`); outputs then equal plain
      decoding in that mode. :attr:`matmul` is the mode the forward runs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        drafter: Drafter | None = None,
        policy: DraftPolicy | None = None,
        sessions: SessionRecorder | None = None,
        forward: ForwardBackend | None = None,
        speculation: SpeculationConfig | None = None,
        model_name: str = "model",
        model_source: str | None = None,
        quantization: str | None = None,
        tenants: TenantFactory | None = None,
        kv_dtype: str | torch.dtype | None = None,
        matmul: str = "float32",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.drafter = drafter
        self.policy = policy
        self.sessions = sessions
        self.speculation = speculation or SpeculationConfig()
        self.model_name = model_name
        self.model_source = model_source  # the path the weights came from
        self.quantization = quantization  # e.g. "int8"
        self.namespace = ""  # the tenant (see for_tenant); "" for the engine itself
        self.context_window = int(getattr(model.config, "max_position_embeddings", 8192))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.num_layers = int(model.config.num_hidden_layers)
        self.dtype = next(model.parameters()).dtype
        self.device = model_device(model)
        self.forward = forward or select_forward(model, matmul=matmul)
        self.matmul: str = getattr(self.forward, "matmul", "float32")
        self.kv_dtype = narrow_kv_dtype(kv_dtype)  # None: as the model computes it
        if self.kv_dtype is not None and not isinstance(self.forward, LeanForward):
            raise ValueError(f"kv_dtype={kv_dtype!r} needs the lean CPU forward (a Llama, Qwen2 or Qwen3 on a CPU); "
                             f"this engine runs {getattr(self.forward, 'name', type(self.forward).__name__)!r}")
        self.prefix_cache = _prefix_cache(model, self.speculation.prefix_cache_bytes, self.kv_dtype)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._tenants = tenants
        self._session_prefix = ""  # tenants sharing this engine's drafter keep their sessions apart by id
        self._lock = threading.RLock()
        self._request_ids = itertools.count()
        self._fingerprint: str | None = None
        self._grammars = _GrammarSlot()  # the compiler, built on the first constrained request; shared with tenants
        self._spare_kv = _SpareKV()  # shared with the tenants (see for_tenant)

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
        device: str | None = None,
        kv_dtype: str = "float32",
        matmul: str = "float32",
    ) -> Engine:
        """Load ``model`` (a catalog name, default SmolLM2-135M-Instruct, or a local dir / .gguf) and compose its parts.

        ``device``: ``"cuda"`` (tree steps through the Triton tree-attention kernel) or ``"cpu"`` (the
        lean CPU forward and its kernels); default: CUDA when torch sees a GPU.
        ``store``: a session store URL or store object; None (the default) is the persistent store
        ``sqlite:///$AGENTSPEC_HOME/cache.db``; ``"memory"`` keeps sessions in memory only.
        ``quantize="int8"``: Q8_0-rounded weights in the linear layers (CPU).
        ``kv_dtype``: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` KV cache (CPU, lean forward).
        ``matmul``: ``"float32"`` (default) or ``"int8"``: GGUF-block layers take int8-rounded inputs (CPU,
        AVX-512 VNNI; fp32 with a warning where the CPU lacks it).
        """
        device = device or default_device()
        if quantize and device != "cpu":
            raise ValueError(f"quantize={quantize!r} runs on the CPU only; got device={device!r}")
        matmul = narrow_matmul(matmul)  # a bad name fails here, before the model loads
        if matmul != "float32" and device != "cpu":
            raise ValueError(f"matmul={matmul!r} runs on the CPU only; got device={device!r}")
        kv = narrow_kv_dtype(kv_dtype)  # a bad name fails here, before the model loads
        if threads:
            torch.set_num_threads(threads)
        source = resolve_model(model)
        hf_model, tokenizer = load_model(model, dtype=dtype)
        if quantize:
            hf_model = quantize_model(hf_model, quantize)
        hf_model = hf_model.to(device)
        speculation = speculation or SpeculationConfig()
        backend = select_forward(hf_model, matmul=matmul)
        fingerprint = tokenizer_fingerprint(tokenizer)
        store = None if store == "memory" else open_store(store) if store is None or isinstance(store, str) else store
        curve = None
        if speculation.adaptive:
            device = model_device(hf_model)
            # v7: GGUF k-quant blocks read from the file, Qwen2/Qwen3 on the lean forward (v6: rotary, KV write and
            # RMSNorm fused); bump on forward changes
            precision = (f"{quantize or dtype}{f'-kv{kv_dtype}' if kv else ''}"
                         f"{'-bf16dot' if bf16_dot_products(kv) else ''}{'-int8act' if matmul == 'int8' else ''}")
            key = f"{source.name}-{precision}-{device}-t{torch.get_num_threads()}-v7"
            probe = cost_probe(backend, hf_model.config.num_hidden_layers, kv_dtype=kv)
            curve = CostCurve.cached(key, probe)

        def parts(namespace: str, drafter: Drafter | None = None) -> TenantParts:
            tenant_store = store.scoped(namespace) if store is not None and namespace else store
            sessions = StoreSessions(tenant_store, fingerprint) if tenant_store is not None else None
            drafter = drafter or SuffixDrafter(history=sessions)
            return TenantParts(drafter, LookaheadPolicy(curve) if curve else None, sessions)

        own = parts("", drafter)
        return cls(hf_model, tokenizer, drafter=own.drafter, policy=own.policy, sessions=own.sessions,
                   forward=backend, speculation=speculation, model_name=source.name,
                   model_source=str(source.path), quantization=quantize, tenants=parts, kv_dtype=kv)

    def for_tenant(self, name: str, *, share_global: bool = False) -> Engine:
        """An engine for tenant ``name``: the same weights, forward, lock and cost curve; its own
        drafter, session store view (``store.scoped(name)``) and prefix-cache namespace, so nothing
        one tenant generated drafts for, or speeds up, another.

        ``share_global=True`` (one team, many keys): sessions stay apart (their ids are prefixed with
        ``name/``) but all such tenants draft from this engine's drafter, so its global tree pools
        every tenant's outputs.
        """
        if not name:
            raise ValueError("a tenant needs a non-empty name")
        if self._tenants is None:
            raise ValueError("this engine has no tenant factory: build it with from_pretrained or pass tenants=")
        parts = self._tenants(name)
        tenant = copy.copy(self)  # shares the model, forward, prefix cache, lock and request ids
        tenant.namespace, tenant.policy = name, parts.policy
        if share_global:
            tenant._session_prefix = f"{self._session_prefix}{name}/"
        else:
            tenant.drafter, tenant.sessions = parts.drafter, parts.sessions
        return tenant

    def _scoped_session(self, session: str) -> str:
        """The stored id of a session of this (``share_global``) tenant: ``tenant/`` + its id.

        The tenant prefix must not eat into the id length a store keeps (:data:`SESSION_ID_LIMIT`): a
        prefixed id over it keeps its head and ends in a hash of the whole id, so it stays distinct.
        """
        check_name(session)
        scoped = self._session_prefix + session
        if len(scoped) <= SESSION_ID_LIMIT:
            return scoped
        digest = "#" + hashlib.sha256(session.encode()).hexdigest()[:32]
        return scoped[: SESSION_ID_LIMIT - len(digest)] + digest

    @property
    def fingerprint(self) -> str:
        """Stable hash of the tokenizer's vocabulary: token ids are only shared between equal ones."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
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

        ``prompt``: a string (one user message, chat template applied), OpenAI-style messages
        (roles system, user, assistant, tool; string or text-part contents), or raw prompt token
        ids. ``session`` names the agent session whose cache drafts for it. ``speculate=False``
        decodes one token per step (the baseline through the same code).
        Penalties, ``logit_bias`` and ``logprobs`` (top-k alternatives per token) are as in
        :class:`~agentspec.config.SamplingParams`. ``grammar``: a :class:`Grammar` or an OpenAI
        ``response_format`` dict the output must match (constrained decoding, drafts included).
        Raises ``ValueError`` at once for bad input; the engine stays usable.
        """
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, stop, seed, repetition_penalty,
                                presence_penalty, frequency_penalty, logit_bias, logprobs)
        params.validate(self.vocab_size)
        if isinstance(grammar, dict):
            grammar = Grammar.from_response_format(grammar)
        matcher = self.grammar_compiler().matcher(grammar) if grammar is not None else None
        prompt_ids = self.encode_prompt(prompt, tools)
        if len(prompt_ids) >= self.context_window:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens but the context window is {self.context_window} tokens"
            )
        spec = self.speculation.enabled if speculate is None else speculate
        if session is not None:
            session = self._scoped_session(session)
        pipeline = LogitsPipeline(params, prompt_ids, matcher)
        return GenerationStream(self._text_deltas(prompt_ids, session, params, spec and self.drafter is not None,
                                                  pipeline))

    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles grammars for this engine's tokenizer and vocabulary (built once, on first use)."""
        slot = self._grammars
        with slot.lock:
            if slot.compiler is None:
                slot.compiler = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_ids), slot.limits)
            return slot.compiler

    def set_grammar_limits(self, limits: GrammarLimits) -> None:
        """Bound the grammar work of constrained requests (this engine's and its tenants')."""
        limits.validate()
        slot = self._grammars
        with slot.lock:
            if slot.compiler is not None:
                slot.compiler.close()
            slot.limits, slot.compiler = limits, None

    def search(
        self,
        prompt: str | Sequence[dict] | Sequence[int],
        *,
        width: int = 4,
        policy: str = "ets",
        scorer: Scorer | None = None,
        step_stop: str = "\n\n",
        max_step_tokens: int = 256,
        max_new_tokens: int = 1024,
        temperature: float = 1.0,
        seed: int | None = None,
        session: str | None = None,
        lambda_kv: float = 1.0,
        lambda_cover: float = 1.5,
        draft: bool = True,
        tools: Sequence[dict] | None = None,
        cluster_distance: float = CLUSTER_DISTANCE,
    ) -> SearchResult:
        """Tree search over reasoning steps (ending at ``step_stop`` or EOS) with ``width`` trajectories.

        ``policy``: "ets" | "rebase" | "beam" | "best_of_n" (see :mod:`agentspec.search`). All live
        trajectories share one KV tree and advance in one forward; ``draft`` drafts each from its
        siblings. ``scorer(prompt, steps) -> float`` ranks them (default: the model's mean token
        log-probability); a scorer that raises or returns NaN drops that trajectory. ETS clusters the
        newest steps by cosine distance of their hidden states, cut at ``cluster_distance`` (the
        paper's 0.05; a larger cut merges more steps and prunes more KV). With a
        ``session``, the engine's drafter (that session's and the global trees) drafts for every
        trajectory too, and their tokens join its history. Returns the finished trajectories, best
        first, and statistics. ``ValueError`` for bad arguments.
        """
        if session is not None:
            session = self._scoped_session(session)
        config = SearchConfig(width, policy, scorer, step_stop, max_step_tokens, max_new_tokens, temperature,
                              seed, session, lambda_kv, lambda_cover, draft, cluster_distance)
        config.validate()
        prompt_ids = self.encode_prompt(prompt, tools)
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        return run_search(self, prompt_ids, text, config)

    def encode_prompt(
        self, prompt: str | Sequence[dict] | Sequence[int], tools: Sequence[dict] | None = None
    ) -> list[int]:
        """Prompt token ids for a string, a message list or ready ids; ``ValueError`` naming what is wrong."""
        if isinstance(prompt, str):
            chat.check_text(prompt, "prompt")
            if not prompt.strip():
                raise ValueError("prompt is empty")
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, Sequence):
            raise ValueError(f"expected a string, messages or token ids; got {type(prompt).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt is empty: expected a string, messages or token ids")
        if any(isinstance(t, int) for t in prompt):
            return check_token_ids(prompt, self.vocab_size)
        chat.check_messages(prompt)
        if tools is not None:
            chat.check_tools(tools)
        return chat.prompt_ids(self.tokenizer, prompt, tools)

    # ------------------------------------------------------------------ text layer
    def _text_deltas(
        self, prompt_ids: list[int], session: str | None, params: SamplingParams, speculate: bool,
        pipeline: LogitsPipeline,
    ) -> Generator[str, None, GenerationResult]:
        """Decode token steps into text deltas, cut at stop strings, hold back partial ones; returns the result."""
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
        return GenerationResult(text, output, stats.finish_reason, len(prompt_ids), stats, logprobs)

    # ------------------------------------------------------------------ token layer
    def _token_steps(
        self, prompt_ids: list[int], session: str | None, params: SamplingParams, speculate: bool,
        stats: SpecStats, pipeline: LogitsPipeline,
    ) -> Generator[list[int], None, None]:
        """Yield the tokens committed by each step, counting into ``stats``.

        ``stats.finish_reason`` ends as "stop" / "length"; it stays "" when the generation is
        cancelled or interrupted, and then nothing is recorded in the session store.
        """
        request_id = f"req-{next(self._request_ids)}"
        generator = None
        if not params.greedy and params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)  # sampling runs on the host
        max_new = min(params.max_new_tokens, self.context_window - len(prompt_ids))
        output: list[int] = []
        cache: TreeKVCache | None = None
        match: PrefixMatch | None = None
        if speculate:
            with self._lock:  # may refuse the session (another tokenizer's): nothing has started yet
                self.drafter.start_request(request_id, session, prompt_ids)
        try:
            with self._lock:
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
                        self.prefix_cache.cache_sequence(prompt_ids + output[:-1], cache, self.namespace)
                    self.prefix_cache.unlock(match.node)
                if cache is not None:
                    self._spare_kv.keep(self.namespace, prompt_ids + output[:-1], cache)
                if stats.finish_reason and self.sessions is not None and session is not None:
                    self._record(session, prompt_ids, output, stats)

    def _record(self, session: str, prompt_ids: list[int], output: list[int], stats: SpecStats) -> None:
        """Append the call to the session store; a store failure is logged, never the caller's lost output."""
        try:
            self.sessions.record(session, prompt_ids, output, stats)
        except StoreError as exc:
            logger.warning("session %r: the call was generated but not stored: %s", session, exc)

    def _match_prefix(self, prompt_ids: list[int]) -> PrefixMatch | None:
        """The prompt's longest cached prefix, locked until the request ends (None without a cache)."""
        if self.prefix_cache is None:
            return None
        match = self.prefix_cache.match_prefix(prompt_ids, self.namespace)
        self.prefix_cache.lock(match.node)
        return match

    def _request_kv(self, prompt_ids: list[int], match: PrefixMatch | None) -> tuple[TreeKVCache, int]:
        """KV buffers for a request and how many leading prompt rows they already hold.

        The last request's buffers are reused (fresh memory costs page faults). In an agent loop the
        prompt extends the last request's prompt and output, whose rows those buffers still hold:
        then they are kept as they are; otherwise the matched prefix's rows are copied from the pool.
        """
        limit = len(prompt_ids) - 1  # at least one prompt token must run, for its logits
        tokens, cache = self._spare_kv.take(self.namespace)
        cache = cache or TreeKVCache(self.num_layers, len(prompt_ids) + 256, self.kv_dtype)
        if match is None:
            cache.truncate(0)
            return cache, 0
        reused = min(match.length, limit)
        held = min(common_prefix(tokens, prompt_ids), limit)
        if held >= reused:  # the same values as the pool's rows: both are this prefix's KV
            cache.truncate(held)
            return cache, held
        cache.truncate(0)
        self.prefix_cache.pool.read_into(match.slots[:reused], cache)
        return cache, reused

    def _prefill(
        self, prompt_ids: list[int], match: PrefixMatch | None, stats: SpecStats
    ) -> tuple[TreeKVCache, torch.Tensor]:
        """Fill the KV cache for the prompt (copying a cached prefix's rows); logits of the last position."""
        cache, reused = self._request_kv(prompt_ids, match)
        stats.prefill_tokens = len(prompt_ids) - reused
        return cache, self.forward.prefill(prompt_ids[reused:], cache)

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
        ids = torch.tensor([root, *tree.tokens])
        positions = torch.tensor([past, *(past + d for d in tree.depths())])
        return self.forward.verify(ids, positions, ancestor_mask(tree.parents), cache)


def cost_probe(
    backend: ForwardBackend, num_layers: int, past: int = 1000, kv_dtype: torch.dtype | None = None
) -> Callable[[int], float]:
    """``c(k)`` for :meth:`~agentspec.lookahead.CostCurve.measure`: seconds of one verification forward
    of ``backend`` over a chain of ``k`` tokens after ``past`` cached ones (prefilled once, on first use)."""
    cache = TreeKVCache(num_layers, capacity=past + 256, dtype=kv_dtype)

    def seconds(k: int) -> float:
        if cache.length < past:
            cache.truncate(0)
            backend.prefill(list(range(1, past + 1)), cache)
        cache.truncate(past)
        ids, positions = torch.arange(1, k + 1), torch.arange(past, past + k)
        t0 = time.perf_counter()
        backend.verify(ids, positions, torch.ones(k, k, dtype=torch.bool).tril(), cache)
        return time.perf_counter() - t0

    return seconds


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Stable hash of a tokenizer's vocabulary: token ids are only shared between equal ones."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha1(repr(vocab).encode()).hexdigest()[:16]


def check_token_ids(ids: list, vocab_size: int) -> list[int]:
    """``ids`` if every one is an integer in ``[0, vocab_size)``, else ``ValueError`` naming the first bad one."""
    for i, tok in enumerate(ids):
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise ValueError(f"token id {i} must be an integer, got {tok!r:.80}")
        if not 0 <= tok < vocab_size:
            raise ValueError(f"token id {i} is {tok}, outside the vocabulary [0, {vocab_size})")
    return ids


class _GrammarSlot:
    """An engine's grammar compiler and its limits, shared with its tenants (``copy.copy`` keeps the slot)."""

    def __init__(self) -> None:
        self.limits = GrammarLimits()
        self.compiler: GrammarCompiler | None = None
        self.lock = threading.Lock()


class _SpareKV:
    """The KV buffers of the last finished request, reused by the next request of any tenant of an
    engine (fresh memory costs page faults; one spare bounds the memory outside the radix budget).
    Its rows count as a cached prefix only for the tenant that computed them."""

    def __init__(self) -> None:
        self._namespace, self._tokens, self._cache = "", [], None

    def keep(self, namespace: str, tokens: list[int], cache: TreeKVCache) -> None:
        """Keep ``cache``, whose first ``len(tokens)`` rows are the KV of ``tokens`` under ``namespace``."""
        self._namespace, self._tokens, self._cache = namespace, tokens, cache

    def take(self, namespace: str) -> tuple[list[int], TreeKVCache | None]:
        """The spare buffers (None if there are none) and the tokens whose KV they hold for ``namespace``."""
        tokens = self._tokens if self._namespace == namespace else []
        cache, self._tokens, self._cache = self._cache, [], None
        return tokens, cache


def _prefix_cache(model: Any, max_bytes: int, kv_dtype: torch.dtype | None) -> RadixCache | None:
    """A radix cache of ``max_bytes`` of KV for ``model`` (None when ``max_bytes`` is 0), rows in
    ``kv_dtype`` (None: the model's dtype)."""
    if max_bytes <= 0:
        return None
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    pool = KVPool.for_budget(config.num_hidden_layers, config.num_key_value_heads, head_dim, max_bytes,
                             dtype=kv_dtype or param.dtype, device=param.device)
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
