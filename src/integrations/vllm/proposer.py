"""AgentSpecProposer: vLLM's ``custom_class`` drafter, drafting from agentspec's suffix trees.

vLLM builds it as ``AgentSpecProposer(vllm_config)`` in each worker and calls
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`` once per step, one row per
request of the batch. vLLM passes no request ids: the plugin (:mod:`.plugin`) hands the proposer its
model runner, whose ``input_batch.req_ids`` names each row and whose ``requests[id].sampling_params
.extra_args`` carries the client's ``vllm_xargs`` (the session id).

Per request, the :class:`SuffixDrafter` proposes a tree from three sources (the request itself, its
session's earlier calls, the global tree of all outputs); vLLM verifies linear drafts only, so the
proposer sends the tree's most probable path. A session the replica does not hold is read by the
:class:`StoreLoader` thread; until it is, that request gets no draft. Finished requests are recorded
to the store from the rank whose drafts vLLM uses (tensor-parallel rank 0 of the last pipeline stage).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from agentspec.integrations.vllm.loader import Failed, Increment, Loaded, StoreLoader
from agentspec.integrations.vllm.plugin import register, supported_version

from agentspec.draft.base import DraftTree
from agentspec.draft.builder import DrafterConfig, SuffixDrafter

logger = logging.getLogger(__name__)

SESSION_KEY = "agentspec_session"  # the key of vllm_xargs (sampling_params.extra_args) naming the session


@dataclass
class ProposerSettings:
    """How the proposer drafts and where it keeps history; read from the environment by :meth:`from_env`."""

    store_url: str | None = None  # AGENTSPEC_VLLM_STORE; None: agentspec's default SQLite file
    session_key: str = SESSION_KEY  # AGENTSPEC_VLLM_SESSION_KEY
    min_path_prob: float = 0.1  # AGENTSPEC_VLLM_MIN_PROB: the path stops at a node less likely than this
    tree_budget_factor: int = 3  # nodes of the tree searched for the path, per speculative token
    record: bool = True  # AGENTSPEC_VLLM_RECORD=0: read the store, never write it
    timings_kept: int = 100_000  # the newest propose() durations kept (for percentiles)
    startup_wait_s: float = 120.0  # how long vLLM's start may wait for the store thread (load_model)
    load_wait_s: float = 0.0  # AGENTSPEC_VLLM_LOAD_WAIT_S: a new request's prefill step may wait this long for
    # its session to be read (0: never wait, the request drafts once it is read; tests wait, to be deterministic)

    @classmethod
    def from_env(cls) -> ProposerSettings:
        env = os.environ
        return cls(
            store_url=env.get("AGENTSPEC_VLLM_STORE") or None,
            session_key=env.get("AGENTSPEC_VLLM_SESSION_KEY", SESSION_KEY),
            min_path_prob=float(env.get("AGENTSPEC_VLLM_MIN_PROB", "0.1")),
            record=env.get("AGENTSPEC_VLLM_RECORD", "1") != "0",
            load_wait_s=float(env.get("AGENTSPEC_VLLM_LOAD_WAIT_S", "0")),
        )


@dataclass
class _Request:
    session_id: str
    prompt: list[int]
    max_tokens: int | None  # the request's limits as the worker knows them (stop strings are the frontend's)
    min_tokens: int
    stop_ids: frozenset[int]
    output: list[int] = field(default_factory=list)
    path: DraftTree | None = None  # the linear draft sent last step (what vLLM verified)
    recorded: bool = False  # appended to the store already


def best_path(tree: DraftTree, max_tokens: int, min_prob: float) -> DraftTree:
    """The tree's most probable root-to-leaf chain: from the root, the likeliest child each time, while its
    path probability is at least ``min_prob``; at most ``max_tokens`` nodes, re-indexed as a chain."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(node)
    chain, node = [], -1
    while len(chain) < max_tokens and children.get(node):
        node = max(children[node], key=lambda c: tree.probs[c])
        if tree.probs[node] < min_prob:
            break
        chain.append(node)
    return tree.subtree(chain)


def _prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class AgentSpecProposer:
    """vLLM ``custom_class`` proposer over agentspec's request, session and global suffix trees."""

    def __init__(self, vllm_config: Any, settings: ProposerSettings | None = None) -> None:
        self.settings = settings or ProposerSettings.from_env()
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.enabled = register()  # idempotent; False on an untested vLLM (logged once): no drafts
        self.config = DrafterConfig()
        self.drafter = SuffixDrafter(self.config)
        self.runner: Any = None  # set by the plugin before each step's state update
        self._requests: dict[str, _Request] = {}
        self._loaded: dict[str, int] = {}  # held session -> store cursor
        self._loading: dict[str, list[tuple[list[int], list[int]]]] = {}  # session -> calls finished meanwhile
        self._last_prompts: OrderedDict[str, np.ndarray] = OrderedDict()  # for the prefix-match fallback
        self.records = self.enabled and self.settings.record and _drafts_used_here()
        tokenizer = vllm_config.model_config.tokenizer
        self.loader = StoreLoader(self.settings.store_url, lambda: fingerprint_of(tokenizer), self.config)
        if self.enabled:
            self.loader.load(None)  # the global tree
        self.propose_seconds: deque[float] = deque(maxlen=self.settings.timings_kept)
        self.propose_cpu_seconds: deque[float] = deque(maxlen=self.settings.timings_kept)  # this thread's CPU time
        self.finish_seconds: deque[float] = deque(maxlen=self.settings.timings_kept)  # request ends (in observe)
        self._ended_ids: list[str] = []  # ended in propose (max_tokens, a stop token): stopped at the next observe
        self.start_seconds: deque[float] = deque(maxlen=self.settings.timings_kept)  # request starts (in observe)
        self.sessions_loaded = 0

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No model to load (drafts come from suffix trees); vLLM calls this while it starts, so wait here,
        not in the first steps, for the store thread to open the store and read the global tree."""
        if self.enabled and not self.loader.flush(self.settings.startup_wait_s):
            logger.warning("agentspec: the store is not ready after %.0f s; drafting without it until it is",
                           self.settings.startup_wait_s)

    # ------------------------------------------------------------------ called by the plugin
    def observe(self, runner: Any, finished_req_ids: Sequence[str], new_requests: Sequence[Any] = ()) -> None:
        """Before each step's state update: the runner, the requests that finished and the new ones
        (``NewRequestData``: id, prompt, sampling parameters). A new request starts here, at its prefill
        step, so its session is read from the store while its prompt is computed."""
        self.runner = runner
        for req_id in [*self._ended_ids, *finished_req_ids]:
            self._finish(req_id)
        self._ended_ids.clear()
        for new in new_requests:
            if new.prompt_token_ids is not None and new.req_id not in self._requests:
                self._start(new.req_id, np.asarray(new.prompt_token_ids), new.sampling_params)

    # ------------------------------------------------------------------ called by vLLM
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings: Any = None) -> list[list[int]]:
        """One linear draft per row of the batch (empty for rows in prefill or without a loaded session)."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        if not self.enabled or self.runner is None:
            return [[] for _ in sampled_token_ids]
        self._take_loaded()
        batch = self.runner.input_batch
        drafts = []
        for row, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[row]
            if not sampled:  # a partial prefill: nothing sampled yet
                drafts.append([])
                continue
            req = self._requests.get(req_id)
            if req is None:  # not seen at its prefill (a prompt given as embeddings)
                state = self.runner.requests.get(req_id)
                req = self._start(req_id, token_ids_cpu[row, : batch.num_prompt_tokens[row]],
                                  getattr(state, "sampling_params", None))
            self._accept(req_id, req, sampled)
            if self._ended(req, len(sampled)):  # stored now (vLLM tells the worker at its next step only, if any);
                self._record(req)  # its trees take it at the next step, off this one
                self._ended_ids.append(req_id)
                drafts.append([])
                continue
            room = min(self.num_speculative_tokens, self.max_model_len - int(num_tokens_no_spec[row]) - 1)
            drafts.append(self._draft(req_id, req, room))
        self.propose_seconds.append(time.perf_counter() - start)
        self.propose_cpu_seconds.append(time.thread_time() - cpu_start)
        return drafts

    # ------------------------------------------------------------------ the request lifecycle
    def _start(self, req_id: str, prompt_array: np.ndarray, params: Any) -> _Request:
        """Begin a request: name its session, have the store thread read it, build the request's tree."""
        start = time.perf_counter()
        prompt = prompt_array.tolist()
        extra = getattr(params, "extra_args", None) or {}
        session_id = str(extra.get(self.settings.session_key) or self._match_prefix(prompt_array) or f"vllm-{req_id}")
        if session_id in self._loaded:
            self.loader.refresh(session_id, self._loaded[session_id])
        elif session_id not in self._loading:
            self._loading[session_id] = []
            self.loader.load(session_id)
            if self.settings.load_wait_s > 0 and self.loader.flush(self.settings.load_wait_s):
                self._take_loaded()
        self._last_prompts[session_id] = prompt_array.copy()
        self._last_prompts.move_to_end(session_id)
        while len(self._last_prompts) > self.config.max_sessions:
            self._last_prompts.popitem(last=False)
        self.drafter.start_request(req_id, session_id, prompt)
        req = self._requests[req_id] = _Request(session_id, prompt, *_limits(params))
        self.start_seconds.append(time.perf_counter() - start)
        return req

    def _match_prefix(self, prompt: np.ndarray) -> str | None:
        """The held session whose newest prompt this prompt extends (an agent loop's next call), if any."""
        for session_id, last in reversed(self._last_prompts.items()):
            if len(last) < len(prompt) and _prefix_length(prompt, last) == len(last):
                return session_id
        return None

    def _accept(self, req_id: str, req: _Request, sampled: list[int]) -> None:
        """``sampled``: this step's tokens, the accepted part of the last draft plus vLLM's own token."""
        path = req.path or DraftTree()
        accepted = list(range(min(len(sampled) - 1, len(path))))
        self.drafter.accept(req_id, path, accepted, sampled)
        req.output.extend(sampled)
        req.path = None

    @staticmethod
    def _ended(req: _Request, new: int) -> bool:
        """Whether the ``new`` tokens reached max_tokens or a stop token; trims the output there (a step may
        overshoot)."""
        for i in range(max(len(req.output) - new, req.min_tokens - 1, 0), len(req.output)):
            if req.output[i] in req.stop_ids:
                del req.output[i + 1:]
                return True
        if req.max_tokens is not None and len(req.output) >= req.max_tokens:
            del req.output[req.max_tokens:]
            return True
        return False

    def _draft(self, req_id: str, req: _Request, room: int) -> list[int]:
        if room <= 0 or req.session_id in self._loading:
            return []
        tree = self.drafter.propose(req_id, room * self.settings.tree_budget_factor)
        req.path = best_path(tree, room, self.settings.min_path_prob)
        return req.path.tokens

    def _finish(self, req_id: str) -> None:
        req = self._requests.pop(req_id, None)
        if req is None:
            return
        start = time.perf_counter()
        self.drafter.stop_request(req_id)  # the call joins its session tree and the global tree
        if req.session_id in self._loading:  # the loaded tree will replace this one: add the call again then
            self._loading[req.session_id].append((req.prompt, req.output))
        self._record(req)
        self.finish_seconds.append(time.perf_counter() - start)

    def _record(self, req: _Request) -> None:
        if self.records and not req.recorded:
            self.loader.record(req.session_id, req.prompt, req.output)
        req.recorded = True

    def _take_loaded(self) -> None:
        """Adopt what the store thread finished (O(1) per session; increments are one call or a few)."""
        for done in self.loader.results():
            if isinstance(done, Loaded) and done.session_id is None:
                self.drafter.adopt(done.donor, None)
            elif isinstance(done, Loaded):
                self.drafter.adopt(done.donor, done.session_id)
                for prompt, output in self._loading.pop(done.session_id, []):
                    self.drafter.add_history(done.session_id, prompt, output, to_global=False)
                self._loaded[done.session_id] = done.cursor
                self.sessions_loaded += 1
            elif isinstance(done, Increment):
                for prompt, output in done.calls:
                    self.drafter.add_history(done.session_id, prompt, output, to_global=False)
                self._loaded[done.session_id] = done.cursor
            elif isinstance(done, Failed):
                self._loading.pop(done.session_id, None)
                self._loaded[done.session_id] = 0

    # ------------------------------------------------------------------ measurement
    def summary(self) -> dict[str, float]:
        """The cost in ms of ``propose`` (wall clock p50/p99/max per step, and the p99 of the thread's CPU time,
        which leaves out the time the OS or the GIL gave to others), of starting a request (mean/max: the
        request's tree built from its prompt, at its prefill step) and of ending one (the call added to its
        session's tree and the global tree, at the next step), and the sessions read from the store."""
        steps = np.asarray(self.propose_seconds) * 1e3
        starts = np.asarray(self.start_seconds) * 1e3

        def stat(values: np.ndarray, how: str) -> float:
            if not len(values):
                return 0.0
            return float(values.max() if how == "max" else values.mean() if how == "mean"
                         else np.percentile(values, 99))

        return {
            "propose_calls": float(len(steps)),
            "propose_ms_p50": float(np.percentile(steps, 50)) if len(steps) else 0.0,
            "propose_ms_p99": stat(steps, "p99"),
            "propose_ms_max": stat(steps, "max"),
            "propose_cpu_ms_p99": stat(np.asarray(self.propose_cpu_seconds) * 1e3, "p99"),
            "request_start_ms_mean": stat(starts, "mean"),
            "request_start_ms_max": stat(starts, "max"),
            "request_end_ms_mean": stat(np.asarray(self.finish_seconds) * 1e3, "mean"),
            "sessions_loaded": float(self.sessions_loaded),
        }


def _limits(params: Any) -> tuple[int | None, int, frozenset[int]]:
    """(max_tokens, min_tokens, stop token ids) of a request's sampling parameters."""
    if params is None:
        return None, 0, frozenset()
    stops = set(params.stop_token_ids or [])
    if not params.ignore_eos:
        stops |= set(params.all_stop_token_ids)
    return params.max_tokens, params.min_tokens, frozenset(stops)


def _drafts_used_here() -> bool:
    """Whether vLLM uses this worker's drafts: tensor-parallel rank 0 of the last pipeline stage."""
    from vllm.distributed import parallel_state  # the optional dependency, present wherever vLLM built us

    try:
        return parallel_state.get_tp_group().rank_in_group == 0 and parallel_state.get_pp_group().is_last_rank
    except AssertionError:  # no distributed groups: a single process
        return True


def fingerprint_of(tokenizer_path: str) -> str:
    """agentspec's tokenizer fingerprint (sessions are shared only between equal vocabularies)."""
    from transformers import AutoTokenizer  # heavy; vLLM has it loaded already, read on the store thread

    from agentspec.engine.engine import tokenizer_fingerprint  # torch and transformers: deferred with them

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer_path))


__all__ = ["AgentSpecProposer", "ProposerSettings", "best_path", "fingerprint_of", "supported_version", "SESSION_KEY"]
