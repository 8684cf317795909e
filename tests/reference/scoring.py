"""Pure-Python reference of the compiled scorer (``agentspec.draft._suffix_core.Scorer``).

A scorer merges the sources' drafts into one calibrated tree and learns from what was accepted.
``merge`` takes each source's draft and builds their union trie; each proposal of a node is
described by discrete features, and the node keeps the proposal whose calibrated conditional
probability is highest. Path probabilities are products of those. ``learn`` maps a verified tree
(maybe a re-indexed subtree of the proposal) back onto the proposal and feeds every tested node
to the calibrator.

Features of a proposal, in the order of :data:`CALIBRATION_FEATURES`: the token, the token before
it (the parent's, or the context's last), its depth in the draft, its rank among its draft
siblings, the match length (+ depth) bucket, the support bucket (how many occurrences back it),
how many sources propose it, whether another source proposes a different token at the same
place, and the request state (tokens accepted at the previous step).

This is the specification the parity tests hold the compiled core to (same trees, same updates,
operation for operation); the package never imports it.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentspec.draft.base import DraftTree

MATCH_EDGES = (2, 4, 8, 16, 32)  # buckets of the match length (+ depth)
SUPPORT_EDGES = (2, 3, 5, 9, 17)  # ... of the number of occurrences behind a guess
MAX_DEPTH_FEATURE = 7
MAX_RANK_FEATURE = 2

_BIN_CENTRES = tuple((b + 0.5) / 10 for b in range(10))  # bins of count(child) / count(node)
_MATCH_BUCKET = tuple(bisect_right(MATCH_EDGES, v) for v in range(MATCH_EDGES[-1] + 1))
_SUPPORT_BUCKET = tuple(bisect_right(SUPPORT_EDGES, v) for v in range(SUPPORT_EDGES[-1] + 1))
_BIN_OF_TENTH = _BIN_CENTRES + (_BIN_CENTRES[-1],)  # int(r * 10) -> bin centre (r = 1.0 -> the last bin)


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


CALIBRATION_FEATURES = ("token", "previous", "depth", "rank", "match", "support", "agree", "conflict", "state")
_SHARED_FEATURES = 2  # the first two (token ids) get one weight per value, shared by all sources
_CROSS_STRIDE = 8  # a cross of the token with a small feature: token * 8 + min(value, cap <= 7)
_CROSS_MAX_DEPTH = 3  # token x depth tells depth 0, 1, 2 and 3+ apart


class AcceptanceCalibrator:
    """Online logistic regression from a drafter's estimate and node features to the acceptance rate.

    ``logit(q) = slope[s] * logit(p) + bias[s] + w[s, bin(p)] + sum_i w[i, value_i] + crosses``,
    with ``s`` the source, ``p`` the drafter's estimate and ``features`` small integers in the
    order of :data:`CALIBRATION_FEATURES` (a shorter tuple uses the first ones). Token-id features
    have one weight per id across sources (some tokens are guessed right far more often than
    others); the rest one per source and value. With at least five features, three crosses let a
    token's weight depend on its depth, on the match length and on the source. AdaGrad on the
    log-loss, one step per verified node; the step never shrinks below
    ``learning_rate / sqrt(max_sq_grad)``, so it keeps following a drifting workload. A fresh
    calibrator returns the estimate itself (slope 1, other weights 0).

    The compiled drafting core (``_suffix_core.Scorer``) implements the same model, operation for
    operation; this class is its specification.
    """

    def __init__(self, learning_rate: float = 0.1, max_sq_grad: float = 100.0, num_bins: int = 10) -> None:
        self.learning_rate = float(learning_rate)
        self.max_sq_grad = float(max_sq_grad)
        self.num_bins = int(num_bins)
        self._w: dict[tuple[int, int, int], float] = {}
        self._g: dict[tuple[int, int, int], float] = {}
        self.updates = 0  # verified nodes learned from
        self.accepted = 0  # ... of which accepted

    def _keys(self, source: int, prob: float, features: Sequence[int]) -> list[tuple[int, int, int]]:
        """Weight keys ``(group, source or -1, value)``; group 0 is the slope, 1 the bias, 2 the bin."""
        source = int(source)
        b = min(max(int(prob * self.num_bins), 0), self.num_bins - 1)
        keys = [(0, source, 0), (1, source, 0), (2, source, b)]
        features = features[: len(CALIBRATION_FEATURES)]
        for i, value in enumerate(features):
            keys.append((3 + i, -1 if i < _SHARED_FEATURES else source, int(value)))
        if len(features) >= 5:  # crosses: token x depth, token x match (shared), token x source
            token, depth, match = int(features[0]), int(features[2]), int(features[4])
            n = len(CALIBRATION_FEATURES)
            keys.append((3 + n, -1, token * _CROSS_STRIDE + min(depth, _CROSS_MAX_DEPTH)))
            keys.append((4 + n, source, token))
            keys.append((5 + n, -1, token * _CROSS_STRIDE + min(match, _CROSS_STRIDE - 1)))
        return keys

    @staticmethod
    def _logit(prob: float) -> float:
        p = min(max(float(prob), 1e-3), 1.0 - 1e-3)
        return math.log(p / (1.0 - p))

    def _z(self, keys: list[tuple[int, int, int]], lp: float) -> float:
        w = self._w
        z = w.get(keys[0], 1.0) * lp
        for k in keys[1:]:
            z += w.get(k, 0.0)
        return z

    @staticmethod
    def _sigmoid(z: float) -> float:
        return 0.0 if z < -700.0 else 1.0 / (1.0 + math.exp(-z))

    def predict(self, source: int, prob: float, features: Sequence[int] = ()) -> float:
        """Calibrated acceptance probability of a node estimated at ``prob`` in [0, 1]."""
        lp = self._logit(prob)
        return self._sigmoid(self._z(self._keys(source, prob, features), lp))

    def update(self, source: int, prob: float, features: Sequence[int], accepted: bool) -> None:
        """Record one verified guess (a node whose parent was accepted)."""
        keys = self._keys(source, prob, features)
        lp = self._logit(prob)
        g = self._sigmoid(self._z(keys, lp)) - (1.0 if accepted else 0.0)
        w, sq, lr, cap = self._w, self._g, self.learning_rate, self.max_sq_grad
        for j, k in enumerate(keys):
            grad = g * lp if j == 0 else g
            acc = sq.get(k, 0.01) + grad * grad
            if acc > cap:
                acc = cap
            sq[k] = acc
            w[k] = w.get(k, 1.0 if j == 0 else 0.0) - lr * grad / math.sqrt(acc)
        self.updates += 1
        self.accepted += bool(accepted)

    def to_dict(self) -> dict[str, float]:
        """``{"group/source/value": weight}`` (for inspection)."""
        return {"/".join(map(str, k)): v for k, v in self._w.items()}
