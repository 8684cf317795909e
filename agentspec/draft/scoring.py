"""Merging the sources' drafts into one calibrated tree, and learning from what was accepted.

A scorer holds the :class:`~agentspec.lookahead.AcceptanceCalibrator` of one drafter. ``merge``
takes each source's draft (a suffix-tree :class:`~agentspec.draft.suffix_tree.Draft`) and
builds their union trie; each proposal of a node is described by discrete features, and the
node keeps the proposal whose calibrated conditional probability is highest. Path
probabilities are products of those. ``learn`` maps a verified tree (maybe a re-indexed
subtree of the proposal) back onto the proposal and feeds every tested node to the calibrator.

Features of a proposal, in the order of :data:`~agentspec.lookahead.CALIBRATION_FEATURES`:
the token, the token before it (the parent's, or the context's last), its depth in the draft,
its rank among its draft siblings, the match length (+ depth) bucket, the support bucket (how
many occurrences back it), how many sources propose it, whether another source proposes a
different token at the same place, and the request state (tokens accepted at the previous step).

:func:`make_scorer` returns the compiled ``_suffix_core.Scorer`` when it is built, else
:class:`PyScorer`; both compute the same trees and the same updates (tests check it).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentspec.draft.base import DraftTree
from agentspec.draft.suffix_tree import compiled_class
from agentspec.lookahead import AcceptanceCalibrator

MATCH_EDGES = (2, 4, 8, 16, 32)  # buckets of the match length (+ depth)
SUPPORT_EDGES = (2, 3, 5, 9, 17)  # ... of the number of occurrences behind a guess
STATE_EDGES = (1, 4, 12)  # ... of the tokens accepted at the previous step
MAX_DEPTH_FEATURE = 7
MAX_RANK_FEATURE = 2

_BIN_CENTRES = tuple((b + 0.5) / 10 for b in range(10))  # bins of count(child) / count(node)
_MATCH_BUCKET = tuple(bisect_right(MATCH_EDGES, v) for v in range(MATCH_EDGES[-1] + 1))
_SUPPORT_BUCKET = tuple(bisect_right(SUPPORT_EDGES, v) for v in range(SUPPORT_EDGES[-1] + 1))
_BIN_OF_TENTH = _BIN_CENTRES + (_BIN_CENTRES[-1],)  # int(r * 10) -> bin centre (r = 1.0 -> the last bin)


def state_bucket(accepted: int) -> int:
    """The request state feature: bucket of the tokens accepted at the previous step."""
    return bisect_right(STATE_EDGES, accepted)


@dataclass
class Proposal:
    """A merged tree plus each node's features ``(source, estimate, *features)``."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    features: list[tuple] = field(default_factory=list)


class PyScorer:
    """Pure-Python scorer; the reference for the compiled one (same API, same numbers)."""

    def __init__(self, calibrate: bool = True, learning_rate: float = 0.1, max_sq_grad: float = 100.0) -> None:
        self.calibrate = bool(calibrate)
        self.calibrator = AcceptanceCalibrator(learning_rate, max_sq_grad)

    @property
    def updates(self) -> int:
        return self.calibrator.updates

    @property
    def accepted(self) -> int:
        return self.calibrator.accepted

    def predict(self, source: int, prob: float, features: Sequence[int] = ()) -> float:
        return self.calibrator.predict(source, prob, features)

    def update(self, source: int, prob: float, features: Sequence[int], accepted: bool) -> None:
        self.calibrator.update(source, prob, features, accepted)

    def merge(self, drafts: Sequence[tuple[int, object]], budget: int, state: int, last_token: int) -> Proposal:
        """Union trie of ``drafts`` (``(source, Draft)``, best first per source) under ``budget`` nodes."""
        tokens: list[int] = []
        parents: list[int] = []
        options: list[list[tuple]] = []  # per node: (source, bin centre, token, previous, depth, rank, match, support)
        index: dict[tuple[int, int], int] = {}
        proposing: dict[int, set[int]] = {}  # parent -> sources proposing some child there
        for source, d in drafts:
            local: list[int] = []
            depth: list[int] = []
            kids: dict[int, int] = {}
            dprobs = d.probs
            m0 = d.match_len
            for tok, par, pr, sup in zip(d.tokens, d.parents, dprobs, d.supports):
                rank = kids.get(par, 0)
                kids[par] = rank + 1
                if par >= 0:
                    mp, dep, r = local[par], depth[par] + 1, pr / dprobs[par]  # r = count(child) / count(node)
                else:
                    mp, dep, r = -1, 0, pr
                depth.append(dep)
                j = index.get((mp, tok))
                if j is None:
                    j = index[(mp, tok)] = len(tokens)
                    tokens.append(tok)
                    parents.append(mp)
                    options.append([])
                proposing.setdefault(mp, set()).add(source)
                md = m0 + dep  # the match length once the parent is accepted
                options[j].append((
                    source, _BIN_OF_TENTH[int(r * 10)], tok, tokens[mp] if mp >= 0 else last_token,
                    min(dep, MAX_DEPTH_FEATURE), min(rank, MAX_RANK_FEATURE),
                    _MATCH_BUCKET[min(md, MATCH_EDGES[-1])], _SUPPORT_BUCKET[min(sup, SUPPORT_EDGES[-1])],
                ))
                local.append(j)
        multi = len(drafts) > 1
        out = Proposal(tokens=tokens, parents=parents)
        predict = self.calibrator.predict
        agree, conflict = 1, 0
        for j, p in enumerate(parents):
            opts = options[j]
            if multi:
                # a draft proposes a (parent, token) at most once, so a node's options come from distinct sources
                agree = len(opts)
                conflict = int(len(proposing[p]) > agree)
            q, feat = -1.0, ()
            for option in opts:
                f = (*option, agree, conflict, state)
                qf = predict(f[0], f[1], f[2:]) if self.calibrate else f[1]
                if qf > q:
                    q, feat = qf, f
            out.probs.append((q if q < 1.0 else 1.0) * (out.probs[p] if p >= 0 else 1.0))
            out.sources.append(feat[0])
            out.features.append(feat)
        if len(tokens) > budget:
            keep = sorted(range(len(tokens)), key=out.probs.__getitem__, reverse=True)[:budget]  # ties: by index
            keep.sort()
            tree = DraftTree(tokens, parents, out.probs, out.sources).subtree(keep)
            out = Proposal(tree.tokens, tree.parents, tree.probs, tree.sources, [out.features[i] for i in keep])
        return out

    def learn(self, proposal: Proposal, tokens: Sequence[int], parents: Sequence[int],
              accepted: Sequence[int]) -> None:
        """Feed the calibrator every node of the verified tree (``tokens``/``parents``) that was tested.

        A node was tested when its parent was accepted (or is the root); nodes the proposal does not
        hold (added after it, e.g. by the engine) carry no features and are skipped.
        """
        if not self.calibrate or not proposal.features:
            return
        where = {(p, t): i for i, (t, p) in enumerate(zip(proposal.tokens, proposal.parents))}
        ok = set(int(i) for i in accepted)
        mapped = {-1: -1}
        update = self.calibrator.update
        for i, (tok, p) in enumerate(zip(tokens, parents)):
            if p >= 0 and p not in ok:
                continue  # the parent was rejected: this node was never tested
            j = where.get((mapped.get(p, -2), int(tok)))
            if j is None:
                continue
            if i in ok:
                mapped[i] = j
            f = proposal.features[j]
            update(f[0], f[1], f[2:], i in ok)


def make_scorer(backend: str = "auto", calibrate: bool = True, learning_rate: float = 0.1,
                max_sq_grad: float = 100.0):
    """The compiled scorer (``backend="cpp"``, or ``"auto"`` when built) or :class:`PyScorer`."""
    cls = compiled_class("Scorer", backend)
    return (cls or PyScorer)(calibrate, learning_rate, max_sq_grad)
