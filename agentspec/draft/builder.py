"""SuffixDrafter: the default drafter, built from suffix trees and the Token Recycling table.

Sources (each node of a proposed tree is tagged with one, see :class:`Source`):

* REQUEST -- a tree of the live request: its prompt and its output so far;
* SESSION -- a tree per session: what each earlier call added (the new part of its prompt, and
  its output);
* GLOBAL  -- one tree of the outputs of all requests of all sessions;
* RECYCLED -- each token's top-k successors seen in the target's logits (anisotropic branches).

Each suffix tree proposes its best draft for the context tail; the drafts are merged into one
trie whose node probabilities are *calibrated*: the conditional probability of each node given
its parent (``count(child) / count(node)``) goes through an :class:`AcceptanceCalibrator`
learned online from what the target accepted, and path probabilities are products of them.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agentspec.draft.base import DraftTree, Source
from agentspec.draft.recycling import RecyclingTable, add_recycled_branches
from agentspec.draft.suffix_tree import make_suffix_tree
from agentspec.lookahead import AcceptanceCalibrator
from agentspec.tokens import common_prefix as _common_prefix


@dataclass
class DrafterConfig:
    """Settings of :class:`SuffixDrafter`; every source can be switched off."""

    max_depth: int = 64  # suffix tree depth (tokens of context matched, tokens drafted)
    alpha: float = 2.0  # a draft for a match of p tokens has at most alpha * p + beta nodes
    beta: float = 0.0
    min_prob: float = 0.1  # stop growing a draft under this (uncalibrated) path probability
    use_request: bool = True
    use_session: bool = True
    use_global: bool = True
    calibrate: bool = True  # map estimates to observed acceptance (per source, online)
    # Token Recycling branches: off by default. Teacher-forced on tau-bench / SWE-agent they got
    # ~0 tokens accepted (1 of 24k) for 50-80 us a step; suffix-tree drafts already cover what the
    # recycled successors would guess. Switch on to experiment (the engine then feeds top-k logits).
    recycle: bool = False
    recycle_rank_probs: tuple[float, ...] = (0.45, 0.25, 0.15, 0.05)  # prior acceptance by rank
    session_max_tokens: int = 262_144  # per session tree, oldest calls evicted first
    global_max_tokens: int = 1_048_576  # global output tree
    global_prompt_tail: int = 8  # prompt tokens stored before each output (how outputs begin)
    max_sessions: int = 128  # session trees kept in memory (least recently used dropped)
    backend: str = "auto"  # suffix tree core: auto | cpp | python
    # request state feature: "accepted" (tokens accepted at the previous step) or "outcome" (also
    # tells a step without a draft from a rejected one, and counts consecutive misses)
    state_mode: str = "accepted"
    calib_levels: tuple[tuple[int, ...], ...] = ()  # intermediate calibration levels (feature positions)


@dataclass
class _Request:
    session_id: str | None
    prompt: list[int]
    tree: object
    output: list[int] = field(default_factory=list)
    # the last proposal: (tokens, parents, calibration features) per node, matched to the verified
    # tree by token path in ``accept`` (the verified tree may be a re-indexed subtree of it)
    proposal: tuple = ((), (), ())
    state: int = 0  # bucket of the tokens accepted at the previous step (0, 1-2, 3+)
    misses: int = 0  # consecutive drafted steps whose first token was rejected

    def tail(self, n: int) -> list[int]:
        """The last ``n`` tokens of the context (prompt + output so far)."""
        if len(self.output) >= n:
            return self.output[len(self.output) - n :]
        return self.prompt[max(0, len(self.prompt) - n + len(self.output)) :] + self.output


@dataclass
class _Session:
    tree: object
    last_prompt: list[int] = field(default_factory=list)

MATCH_EDGES = (2, 4, 8, 16, 32)  # calibration buckets of the match length (+ depth)
SUPPORT_EDGES = (2, 3, 5, 9, 17)  # ... of the number of occurrences behind a guess
STATE_EDGES = (1, 4, 12)  # ... of the tokens accepted at the previous step


_BIN_CENTRES = tuple((b + 0.5) / 10 for b in range(10))  # calibration bins of count(child) / count(node)
# lookup tables of the buckets above (hot loop of the merge): value -> bucket, the last entry for larger values
_MATCH_BUCKET = tuple(bisect_right(MATCH_EDGES, v) for v in range(MATCH_EDGES[-1] + 1))
_SUPPORT_BUCKET = tuple(bisect_right(SUPPORT_EDGES, v) for v in range(SUPPORT_EDGES[-1] + 1))
_BIN_OF_TENTH = _BIN_CENTRES + (_BIN_CENTRES[-1],)  # int(r * 10) -> bin centre (r = 1.0 -> the last bin)


class SuffixDrafter:
    """Drafter protocol implementation over request / session / global suffix trees + recycling."""

    def __init__(self, config: DrafterConfig | None = None, calibrator: AcceptanceCalibrator | None = None,
                 recycler: RecyclingTable | None = None) -> None:
        self.config = config or DrafterConfig()
        self.calibrator = calibrator or AcceptanceCalibrator(levels=self.config.calib_levels)
        self.recycler = recycler if recycler is not None else (RecyclingTable() if self.config.recycle else None)
        if self.recycler is None:
            # no table to feed: hide ``observe`` so the engine skips the per-step top-k of the logits
            self.observe = None
        self._requests: dict[str, _Request] = {}
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._global = make_suffix_tree(self.config.max_depth, self.config.backend)
        self._seq_ids = itertools.count()
        self._memo: dict[tuple, float] = {}

    # ------------------------------------------------------------------ request lifecycle
    def start_request(self, request_id: str, session_id: str | None, prompt_ids: Sequence[int]) -> None:
        """Begin a request whose context is ``prompt_ids`` (builds its request tree)."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        prompt = [int(t) for t in prompt_ids]
        tree = make_suffix_tree(self.config.max_depth, self.config.backend)
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
            sess = self._sessions[session_id] = _Session(make_suffix_tree(self.config.max_depth, self.config.backend))
            while len(self._sessions) > self.config.max_sessions:
                self._sessions.popitem(last=False)
        if sess is not None:
            self._sessions.move_to_end(session_id)
        return sess

    def propose(self, request_id: str, budget: int) -> DraftTree:
        """A calibrated tree of at most ``budget`` nodes continuing the request's context."""
        req = self._request(request_id)
        if budget <= 0:
            return DraftTree()
        self._memo: dict[tuple, float] = {}  # calibrated probabilities of this proposal
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
        drafts = [
            (int(src), tree.speculate(context, budget, cfg.alpha, cfg.beta, cfg.min_prob)) for src, tree in sources
        ]
        tree, feats = self._merge([(s, d) for s, d in drafts if d.score > 0], budget, req.state)
        if self.recycler is not None and len(tree) < budget and context:
            tree, feats = self._recycle(tree, feats, context[-1], budget)
        req.proposal = (tree.tokens, tree.parents, feats)
        return tree

    def _cond(self, feat: tuple) -> float:
        """Calibrated conditional probability of a node from its features ``(source, prob, *buckets)``."""
        if not self.config.calibrate:
            return feat[1]
        q = self._memo.get(feat)
        if q is None:
            q = self._memo[feat] = self.calibrator.predict(feat[0], feat[1], feat[2:])
        return q

    def _merge(self, drafts: list, budget: int, state: int = 0) -> tuple[DraftTree, list]:
        """Union trie of the drafts with calibrated conditional probabilities.

        Each proposal of a node is described by discrete features (source, bin of
        ``count(child) / count(node)``, match length, support, how many sources agree on the
        node, whether another source proposed a different token at the same place, the state of
        the request); the node keeps the proposal with the highest calibrated probability.
        """
        tokens: list[int] = []
        parents: list[int] = []
        props: list[list[tuple]] = []  # per node: (source, prob bin centre, match bucket, support bucket)
        index: dict[tuple[int, int], int] = {}
        index_get = index.get
        proposing: dict[int, set[int]] = {}  # parent -> sources proposing some child there
        match_bucket, support_bucket, bins = _MATCH_BUCKET, _SUPPORT_BUCKET, _BIN_OF_TENTH
        for source, d in drafts:
            local: list[int] = []
            depth: list[int] = []
            dprobs = d.probs
            m0 = d.match_len
            for tok, par, pr, sup in zip(d.tokens, d.parents, dprobs, d.supports):
                if par >= 0:
                    mp, dep, r = local[par], depth[par] + 1, pr / dprobs[par]  # r = count(child) / count(node)
                else:
                    mp, dep, r = -1, 0, pr
                depth.append(dep)
                key = (mp, tok)
                j = index_get(key)
                if j is None:
                    j = index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(mp)
                    props.append([])
                    srcs_here = proposing.get(mp)
                    if srcs_here is None:
                        proposing[mp] = {source}
                    else:
                        srcs_here.add(source)
                else:
                    proposing[mp].add(source)
                # the match length once the parent is accepted is match_len + depth
                md = m0 + dep
                props[j].append((source, bins[int(r * 10)],
                                 match_bucket[md] if md < len(match_bucket) else match_bucket[-1],
                                 support_bucket[sup] if sup < len(support_bucket) else support_bucket[-1]))
                local.append(j)
        multi = len(drafts) > 1
        probs: list[float] = []
        srcs: list[int] = []
        feats: list[tuple] = []
        calibrate = self.config.calibrate
        memo = self._memo
        predict = self.calibrator.predict
        agree, conflict = 1, 0
        for j, p in enumerate(parents):
            options = props[j]
            if multi:
                # a draft proposes a (parent, token) at most once (siblings are distinct), so the
                # options of a node come from distinct sources
                agree = len(options)
                conflict = int(len(proposing[p]) > agree)
            q, feat = -1.0, ()
            for option in options:
                f = (*option, agree, conflict, state)
                if calibrate:
                    qf = memo.get(f)
                    if qf is None:
                        qf = memo[f] = predict(f[0], f[1], f[2:])
                else:
                    qf = f[1]
                if qf > q:
                    q, feat = qf, f
            probs.append((q if q < 1.0 else 1.0) * (probs[p] if p >= 0 else 1.0))
            srcs.append(feat[0])
            feats.append(feat)
        tree = DraftTree(tokens, parents, probs, srcs)
        if len(tree) > budget:
            keep = sorted(range(len(tree)), key=probs.__getitem__, reverse=True)[:budget]  # stable: ties by index
            keep.sort()
            tree = tree.subtree(keep)
            feats = [feats[i] for i in keep]
        return tree, feats

    def _recycle(self, tree: DraftTree, feats: list, root_token: int, budget: int) -> tuple[DraftTree, list]:
        base = self.config.recycle_rank_probs
        rank_probs = [self._cond((int(Source.RECYCLED), p, r)) for r, p in enumerate(base)]
        out = add_recycled_branches(tree, root_token, self.recycler, rank_probs, budget)
        feats = list(feats)
        for i in range(len(tree), len(out)):
            parent_prob = out.probs[out.parents[i]] if out.parents[i] >= 0 else 1.0
            ratio = out.probs[i] / parent_prob if parent_prob > 0 else 0.0
            rank = min(range(len(rank_probs)), key=lambda r: abs(rank_probs[r] - ratio))
            feats.append((int(Source.RECYCLED), base[rank], rank))
        return out, feats

    def accept(self, request_id: str, tree: DraftTree, accepted: Sequence[int], new_tokens: Sequence[int]) -> None:
        """Extend the request tree with ``new_tokens``; learn acceptance from the verified ``tree``."""
        req = self._request(request_id)
        new = [int(t) for t in new_tokens]
        if self.config.use_request:
            req.tree.extend(0, new)
        req.output.extend(new)
        if self.config.state_mode == "outcome":
            if len(accepted):
                req.misses = 0
                req.state = 1 + bisect_right(STATE_EDGES, len(accepted))  # 2, 3, 4
            elif len(tree):
                req.misses += 1
                req.state = 1 if req.misses == 1 else 5 if req.misses <= 3 else 6
            else:
                req.state = 0
        else:
            req.state = bisect_right(STATE_EDGES, len(accepted))
        p_tokens, p_parents, p_feats = req.proposal
        if self.config.calibrate and len(tree) and p_feats:
            # proposal node of each verified node on the accepted path (-1: the root)
            where = {(p, t): i for i, (t, p) in enumerate(zip(p_tokens, p_parents))}
            ok = set(int(i) for i in accepted)
            mapped = {-1: -1}
            update = self.calibrator.update
            for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
                if p >= 0 and p not in ok:
                    continue  # the parent was rejected: this node was never tested
                j = where.get((mapped.get(p, -2), int(tok)))
                if j is None:
                    continue  # not proposed here (an engine-side addition): no features
                if i in ok:
                    mapped[i] = j
                feat = p_feats[j]
                update(feat[0], feat[1], feat[2:], i in ok)
        req.proposal = ((), (), ())

    def observe(self, token_ids: Sequence[int], topk_successor_ids: np.ndarray) -> None:
        """Recycling feed: ``topk_successor_ids[i]`` are the top-k next tokens after ``token_ids[i]``."""
        if self.recycler is not None:
            self.recycler.observe(token_ids, topk_successor_ids)

    def stop_request(self, request_id: str) -> None:
        """Finish a request: it joins its session tree, its output joins the global tree."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"unknown request {request_id!r}")
        self.add_history(req.session_id, req.prompt, req.output)

    def add_history(self, session_id: str | None, prompt_ids: Sequence[int], output_ids: Sequence[int],
                    *, to_global: bool = True) -> None:
        """Add a finished call (from a store or another process) as ``stop_request`` would.

        ``to_global=False`` adds it to its session tree only (a store loads the global history once
        and each session's calls when the session is first used)."""
        cfg = self.config
        output = [int(t) for t in output_ids]
        sess = self._session(session_id, create=True)
        if sess is not None:
            prompt = [int(t) for t in prompt_ids]
            new_part = prompt[_common_prefix(prompt, sess.last_prompt):]
            sess.tree.extend(next(self._seq_ids), new_part + output)
            sess.last_prompt = prompt + output
            if sess.tree.num_tokens > cfg.session_max_tokens:
                sess.tree.evict(cfg.session_max_tokens * 3 // 4)
        if output and to_global:
            tail = cfg.global_prompt_tail
            head = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - tail) :]] if tail > 0 else []
            self._global.extend(next(self._seq_ids), head + output)
            if self._global.num_tokens > cfg.global_max_tokens:
                self._global.evict(cfg.global_max_tokens * 3 // 4)

    def forget_session(self, session_id: str) -> None:
        """Drop a session's tree from memory (the store keeps its history)."""
        self._sessions.pop(session_id, None)
