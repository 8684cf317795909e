"""Logits processors along a draft tree: penalties, logit bias, grammar masks and logprobs.

Each row of a verification forward's logits ``[1 + n, V]`` is processed with the history of its own
node: prompt + output so far + the tokens on the path from the root to that node. A row is then
exactly the row plain one-token-at-a-time decoding would see at that point, so greedy output is
identical and sampling keeps its distribution. Order, per row (vLLM / OpenAI semantics)::

    logits += logit_bias                                           # OpenAI logit_bias
    logits[t] /= rp if logits[t] > 0 else *= rp,  t in prompt + output + path   # repetition_penalty
    logits -= frequency_penalty * count_t + presence_penalty * [count_t > 0],    # t in output + path
    logits[t] = -inf where the grammar forbids t after the path                 # constraints
    (then temperature, top-k, top-p in verify.process_logits when sampling)

``logprobs`` are ``log_softmax`` of the processed row (after the grammar mask, before temperature).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from agentspec.config import SamplingParams
from agentspec.draft.base import DraftTree
from agentspec.engine.constraints import TreeMatcher
from agentspec.engine.verify import ancestor_mask


@dataclass
class TokenLogprob:
    """One output token's log-probability and the ``top`` alternatives (``[(token, logprob)]``)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class LogitsPipeline:
    """Per request: everything between the model's logits and the token choice, along draft trees.

    Steps the engine calls: :meth:`draft` (cut and extend a draft tree under the grammar),
    :meth:`process` (rows of a verification forward), :meth:`commit` (the tokens a step emitted).
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], matcher: TreeMatcher | None = None) -> None:
        self.params = params
        self.matcher = matcher
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._penalize = params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        self._bias = dict(params.logit_bias or {})
        self._prompt = set(prompt_ids) if params.repetition_penalty != 1.0 else set()
        self._counts: Counter[int] = Counter()  # output tokens so far
        self._masks: torch.Tensor | None = None  # grammar masks of the tree being verified

    @property
    def active(self) -> bool:
        """Whether :meth:`process` changes anything (else the engine may skip it)."""
        return bool(self._penalize or self._bias or self.matcher is not None)

    def draft(self, tree: DraftTree, budget: int) -> DraftTree:
        """The tree to verify: under a grammar, rejected branches cut and forced tokens added."""
        if self.matcher is None:
            return tree
        tree, self._masks = self.matcher.constrain(tree, budget)
        return tree

    def process(self, logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """``logits: [1 + n, V]`` of ``[root] + tree`` (fp32), processed row by row (in place)."""
        if self._bias:
            ids = torch.tensor(list(self._bias), dtype=torch.long)
            logits[:, ids] += torch.tensor(list(self._bias.values()), dtype=logits.dtype)
        if self._penalize:
            self._penalties(logits, tree)
        if self.matcher is not None:
            masks = self._masks
            if masks is None or masks.shape[0] != logits.shape[0]:  # no draft step (prefill, speculation off)
                masks = self.matcher.masks(1)
                self.matcher.fill(masks, 0)
            self.matcher.apply(logits, masks)
            self._masks = None
        return logits

    def commit(self, tokens: Sequence[int], logits: torch.Tensor, slots: Sequence[int]) -> None:
        """The step emitted ``tokens``; ``tokens[k]`` was chosen from row ``slots[k]`` of ``logits``."""
        self._counts.update(tokens)
        if self.matcher is not None:
            self.matcher.commit(tokens)
        if self.logprobs is not None:
            rows = torch.log_softmax(logits[list(slots)].float(), dim=-1)
            k = self.params.logprobs or 0
            top = rows.topk(k, dim=-1) if k else None
            for i, tok in enumerate(tokens):
                alts = list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else []
                self.logprobs.append(TokenLogprob(int(tok), float(rows[i, tok]), alts))

    # ------------------------------------------------------------------ penalties
    def _penalties(self, logits: torch.Tensor, tree: DraftTree) -> None:
        """Repetition, presence and frequency penalties, each row with its own path's counts.

        Only the columns of tokens seen anywhere (prompt, output, tree) change: those are gathered,
        penalised and scattered back. ``counts[r, c]`` = output count + path count of column ``c``.
        """
        p = self.params
        cols = sorted(set(self._counts) | self._prompt | set(tree.tokens))
        if not cols:
            return
        col_of = {tok: j for j, tok in enumerate(cols)}
        ids = torch.tensor(cols, dtype=torch.long)
        counts = torch.tensor([self._counts.get(t, 0) for t in cols], dtype=logits.dtype).repeat(logits.shape[0], 1)
        if len(tree):
            # anc[r, 1 + i]: node i is on row r's path (itself included); row 0 = the root
            anc = ancestor_mask(tree.parents)[: logits.shape[0], 1:].to(logits.dtype)
            onehot = torch.zeros(len(tree), len(cols), dtype=logits.dtype)
            onehot[torch.arange(len(tree)), torch.tensor([col_of[t] for t in tree.tokens])] = 1
            counts += anc @ onehot
        sub = logits[:, ids]
        if p.repetition_penalty != 1.0:
            seen = (counts > 0) | torch.tensor([t in self._prompt for t in cols])
            penalised = torch.where(sub > 0, sub / p.repetition_penalty, sub * p.repetition_penalty)
            sub = torch.where(seen, penalised, sub)
        sub = sub - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)
        logits[:, ids] = sub
