"""SuffixDrafter: the default drafter, built from suffix trees.

Sources (each node of a proposed tree is tagged with one, see :class:`Source`):

* REQUEST -- a tree of the live request: its prompt and its output so far;
* SESSION -- a tree per session: what each earlier call added (the new part of its prompt, and
  its output);
* GLOBAL  -- one tree of the outputs of all requests of all sessions.

The drafter owns the session trees: it keeps the ``max_sessions`` most recently used in memory,
each with its cursor into a :class:`~agentspec.draft.base.SessionHistory` (a persistent store) when
it was given one. A session it does not hold (first use, or evicted) is loaded from the history;
one it holds, and the global tree, take what other processes recorded since, before each request.

Each suffix tree proposes its best draft for the context tail; the compiled scorer
(:mod:`agentspec.draft.core`) merges the drafts into one trie whose node probabilities are
*calibrated*: the conditional probability of each node given its parent (``count(child) /
count(node)``) and the node's features go through an acceptance model learned online from what
the target accepted, and path probabilities are products of them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentspec.draft.base import DraftTree, SessionHistory, Source
from agentspec.draft.core import Proposal, Scorer, SuffixTree, state_bucket
from agentspec.tokens import common_prefix as _common_prefix


@dataclass
class DrafterConfig:
    """Settings of :class:`SuffixDrafter`; every source can be switched off."""

    max_depth: int = 64  # suffix tree depth (tokens of context matched, tokens drafted)
    # candidates: the sources draft generously (a match of p tokens gives up to alpha * p + beta nodes,
    # grown down to path probability min_prob) and the calibrated lookahead prunes them to what pays;
    # teacher-forced, alpha 4 / min_prob 0.05 beat 2 / 0.1 by about 1% modelled on tau-bench and SWE-agent
    alpha: float = 4.0
    beta: float = 0.0
    min_prob: float = 0.05
    use_request: bool = True
    use_session: bool = True
    use_global: bool = True
    calibrate: bool = True  # map estimates and node features to observed acceptance (online)
    calibration_rate: float = 0.1  # learning rate of the acceptance model
    session_max_tokens: int = 262_144  # per session tree, oldest calls evicted first
    global_max_tokens: int = 1_048_576  # global output tree
    global_prompt_tail: int = 8  # prompt tokens stored before each output (how outputs begin)
    max_sessions: int = 128  # session trees kept in memory (least recently used dropped)


@dataclass
class _Request:
    session_id: str | None
    prompt: list[int]
    tree: SuffixTree
    output: list[int] = field(default_factory=list)
    # the last proposal (with each node's features), matched to the verified tree by token path in
    # ``accept`` (the verified tree may be a re-indexed subtree of it)
    proposal: Proposal | None = None
    state: int = 0  # bucket of the tokens accepted at the previous step

    def tail(self, n: int) -> list[int]:
        """The last ``n`` tokens of the context (prompt + output so far)."""
        if len(self.output) >= n:
            return self.output[len(self.output) - n :]
        return self.prompt[max(0, len(self.prompt) - n + len(self.output)) :] + self.output


@dataclass
class _Session:
    tree: SuffixTree
    last_prompt: list[int] = field(default_factory=list)
    cursor: int = 0  # the newest history record this tree holds


class SuffixDrafter:
    """Drafter protocol implementation over request / session / global suffix trees."""

    def __init__(self, config: DrafterConfig | None = None, history: SessionHistory | None = None) -> None:
        self.config = config or DrafterConfig()
        self.history = history
        self.scorer = Scorer(self.config.calibrate, self.config.calibration_rate)
        self._requests: dict[str, _Request] = {}
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._global = SuffixTree(self.config.max_depth)
        self._global_cursor: int | None = None  # None: the global history is not loaded yet
        self._seq_ids = itertools.count()

    # ------------------------------------------------------------------ request lifecycle
    def start_request(self, request_id: str, session_id: str | None, prompt_ids: Sequence[int]) -> None:
        """Begin a request whose context is ``prompt_ids`` (builds its request tree).

        With a history, first brings the global tree and the session's tree up to date; raises (a
        session of another tokenizer) before anything starts."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        if self.history is not None:
            self._pull(self.history, session_id)
        prompt = [int(t) for t in prompt_ids]
        tree = SuffixTree(self.config.max_depth)
        if self.config.use_request:
            tree.extend(0, prompt)
        self._requests[request_id] = _Request(session_id, prompt, tree)

    def _request(self, request_id: str) -> _Request:
        req = self._requests.get(request_id)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}; call start_request first")
        return req

    def _session(self, session_id: str | None, create: bool = False) -> _Session | None:
        if session_id is None:
            return None
        sess = self._sessions.get(session_id)
        if sess is None and create:
            sess = self._new_session(session_id)
        if sess is not None:
            self._sessions.move_to_end(session_id)
        return sess

    def _new_session(self, session_id: str) -> _Session:
        """An empty tree for ``session_id`` (replacing any), the least recently used beyond ``max_sessions`` dropped."""
        sess = self._sessions[session_id] = _Session(SuffixTree(self.config.max_depth))
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)
        return sess

    def _pull(self, history: SessionHistory, session_id: str | None) -> None:
        """Read the history into the global tree and the session's tree: what they lack (all of it
        when not held) or what was recorded since their cursors."""
        cfg = self.config
        news = history.calls(None, self._global_cursor, cfg.global_max_tokens)
        if news.replace:
            self._global = SuffixTree(cfg.max_depth)
        for prompt, output in news.calls:
            self._add_global(prompt, output)
        self._global_cursor = news.cursor
        if session_id is None:
            return
        sess = self._sessions.get(session_id)
        news = history.calls(session_id, sess.cursor if sess is not None else None, cfg.session_max_tokens)
        if sess is None or news.replace:
            sess = self._new_session(session_id)
        for prompt, output in news.calls:
            self._add_session(sess, prompt, output)
        sess.cursor = news.cursor

    def propose(self, request_id: str, budget: int) -> DraftTree:
        """A calibrated tree of at most ``budget`` nodes continuing the request's context."""
        req = self._request(request_id)
        if budget <= 0:
            return DraftTree()
        cfg = self.config
        context = req.tail(cfg.max_depth)
        sources = []
        if cfg.use_request:
            sources.append((Source.REQUEST, req.tree))
        sess = self._session(req.session_id)
        if cfg.use_session and sess is not None:
            sources.append((Source.SESSION, sess.tree))
        if cfg.use_global:
            sources.append((Source.GLOBAL, self._global))
        drafts = []
        for src, tree in sources:
            d = tree.speculate(context, budget, cfg.alpha, cfg.beta, cfg.min_prob)
            if d.score > 0:
                drafts.append((int(src), d))
        proposal = self.scorer.merge(drafts, budget, req.state, context[-1] if context else -1)
        req.proposal = proposal
        return DraftTree(proposal.tokens, proposal.parents, proposal.probs, proposal.sources)

    def accept(self, request_id: str, tree: DraftTree, accepted: Sequence[int], new_tokens: Sequence[int]) -> None:
        """Extend the request tree with ``new_tokens``; learn acceptance from the verified ``tree``."""
        req = self._request(request_id)
        new = [int(t) for t in new_tokens]
        if self.config.use_request:
            req.tree.extend(0, new)
        req.output.extend(new)
        req.state = state_bucket(len(accepted))
        if req.proposal is not None and len(tree):
            self.scorer.learn(req.proposal, tree.tokens, tree.parents, [int(i) for i in accepted])
        req.proposal = None

    def stop_request(self, request_id: str) -> None:
        """Finish a request: it joins its session tree, its output joins the global tree."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        self.add_history(req.session_id, req.prompt, req.output)

    def add_history(self, session_id: str | None, prompt_ids: Sequence[int], output_ids: Sequence[int],
                    *, to_global: bool = True) -> None:
        """Add a finished call as ``stop_request`` would: to its session's tree, and its output (after
        the prompt's last ``global_prompt_tail`` tokens) to the global tree unless ``to_global=False``."""
        sess = self._session(session_id, create=True)
        if sess is not None:
            self._add_session(sess, prompt_ids, output_ids)
        if to_global:
            self._add_global(prompt_ids, output_ids)

    def adopt(self, donor: SuffixDrafter, session_id: str | None) -> None:
        """Take ``donor``'s tree of ``session_id`` (``None``: its global tree) in place of this drafter's, in
        O(1): a caller builds trees from a slow history on another thread (``add_history`` on a donor with
        the same config) and hands them over between steps. A session the donor lacks is dropped here."""
        self._seq_ids = itertools.count(max(next(self._seq_ids), next(donor._seq_ids)))  # no id reused in a tree
        if session_id is None:
            self._global = donor._global
            return
        sess = donor._sessions.pop(session_id, None)
        if sess is None:
            self._sessions.pop(session_id, None)
            return
        self._sessions[session_id] = sess
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.config.max_sessions:
            self._sessions.popitem(last=False)

    def _add_session(self, sess: _Session, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        """The call's new part (its prompt beyond the previous call's prompt and output) and its output."""
        limit = self.config.session_max_tokens
        prompt, output = [int(t) for t in prompt_ids], [int(t) for t in output_ids]
        new_part = prompt[_common_prefix(prompt, sess.last_prompt):]
        sess.tree.extend(next(self._seq_ids), new_part + output)
        sess.last_prompt = prompt + output
        if sess.tree.num_tokens > limit:
            sess.tree.evict(limit * 3 // 4)

    def _add_global(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
        if not output_ids:
            return
        limit, tail = self.config.global_max_tokens, self.config.global_prompt_tail
        head = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - tail) :]] if tail > 0 else []
        self._global.extend(next(self._seq_ids), head + [int(t) for t in output_ids])
        if self._global.num_tokens > limit:
            self._global.evict(limit * 3 // 4)
