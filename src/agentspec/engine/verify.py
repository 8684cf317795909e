"""Tree verification: inputs for one forward over a draft tree, and lossless acceptance.

Layout of one verification forward (``n`` draft nodes)::

    input_ids   = [root, t_0, ..., t_{n-1}]           # root: last committed token, not yet in KV
    position_ids = past + [0, depth_0, ..., depth_{n-1}]
    mask[i, j]  = 1 if j < past (committed prefix) or node j is i itself or an ancestor of i

Logits at row 0 predict the token after the root; at row ``1 + i`` the token after node ``i``.
Terms: *accepted* = draft nodes on the path the target agrees with; *bonus* = the token the
target picks after the last accepted node (always emitted, so every step emits >= 1 token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agentspec.config import SamplingParams
from agentspec.draft.base import DraftTree, acceptance_walk


@dataclass
class TreeInputs:
    input_ids: torch.Tensor  # [1, 1 + n]
    position_ids: torch.Tensor  # [1, 1 + n]
    attention_mask: torch.Tensor  # [1, 1, 1 + n, past + 1 + n], float: 0 attend, dtype-min masked


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``[1+n, 1+n]`` bool: row i may attend column j (j is i or an ancestor; row/col 0 = root)."""
    n = len(parents)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 0] = True
    for i, p in enumerate(parents):
        row = i + 1
        if p >= 0:
            mask[row] = mask[p + 1]
        mask[row, row] = True
    return mask


def tree_mask_4d(tree_mask: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' additive mask ``[1, 1, T, past + T]`` (0 attend, dtype min masked) for a ``[T, T]``
    bool tree mask after ``past`` committed positions, which every token sees."""
    t = tree_mask.shape[-1]
    allowed = torch.ones(t, past + t, dtype=torch.bool)
    allowed[:, past:] = tree_mask.cpu()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def tree_inputs(root: int, tree: DraftTree, past: int, dtype: torch.dtype) -> TreeInputs:
    """Build the forward inputs for verifying ``tree`` after ``past`` cached positions."""
    ids = torch.tensor([[root, *tree.tokens]], dtype=torch.long)
    positions = (past + torch.tensor([0, *tree.depths()], dtype=torch.long)).unsqueeze(0)
    return TreeInputs(ids, positions, tree_mask_4d(ancestor_mask(tree.parents), past, dtype))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target distribution for sampling: temperature, then top-k, then top-p. ``logits: [..., V]``."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy acceptance. ``logits: [1 + n, V]``. Returns (accepted node indices, bonus token).

    From the root, follow the child equal to the argmax of the parent's logits; the argmax at
    the last accepted node is the bonus token. Identical to one-token-at-a-time greedy decoding.
    """
    argmax = logits.argmax(dim=-1).tolist()
    accepted, bonus = acceptance_walk(tree, argmax.__getitem__)
    assert bonus is not None
    return accepted, bonus


def accept_sampling(
    tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Lossless acceptance of a model-free (deterministic) draft tree under sampling.

    At each node sample ``y ~ p(. | path)`` from the target's processed distribution; if a child
    holds ``y`` move there, else emit ``y`` as the bonus and stop. Every emitted token is an
    exact sample of the target, so the output distribution equals plain sampling.
    """

    def sample(slot: int) -> int:
        return int(torch.multinomial(process_logits(logits[slot], params), 1, generator=generator))

    accepted, bonus = acceptance_walk(tree, sample)
    assert bonus is not None
    return accepted, bonus


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from ``logits: [V]``: argmax when greedy, else a sample of the processed distribution."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(process_logits(logits, params), 1, generator=generator))
