"""Pure-Python reference of the compiled suffix tree (``agentspec.draft._suffix_core.SuffixTree``).

Depth-limited suffix tree over token sequences (SuffixDecoding). Every stored sequence
contributes all its suffixes, each truncated to ``max_depth`` tokens. Edges are compressed: a
node's label is ``seqs[seq][start : start + length]``, a slice of a stored token array, so memory
is O(tokens). Invariants (checked by :meth:`PySuffixTree.check_integrity`):

* ``count(node)`` = number of stored suffixes whose path reaches the node's edge
  = ``sum(count(children)) + (suffixes ending exactly at the node's end)``;
  every suffix ends at the end of an edge, so the count is uniform along an edge;
* children of a node carry distinct first tokens; except under the root they are ordered by
  count, highest first (drafting stops scanning at the first child under ``min_prob``);
* appending one token touches at most ``max_depth`` active nodes (the ends of the live
  suffixes of that sequence), O(depth).

This is the specification the parity tests hold the compiled core to (same API, same drafts);
the package never imports it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

ROOT = 0
NONE = -1


@dataclass
class Draft:
    """A speculated token tree: ``parents[i] < i`` (-1 = after the context), path probabilities."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    supports: list[int] = field(default_factory=list)  # occurrences of context + path before each node
    score: float = 0.0  # sum of path probabilities = expected accepted tokens
    match_len: int = 0  # context tokens matched in the tree


class PySuffixTree:
    """Pure-Python suffix tree; the reference for the compiled core (same API, same drafts)."""

    def __init__(self, max_depth: int = 64) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = int(max_depth)
        self._seqs: dict[int, list[int]] = {}  # seq id -> tokens (insertion-ordered = age)
        self._reset_nodes()

    # ------------------------------------------------------------------ nodes (parallel lists)
    def _reset_nodes(self) -> None:
        self._count = [0]
        self._parent = [NONE]
        self._seq = [NONE]  # label = self._seqs[seq][start : start + length]
        self._start = [0]
        self._length = [0]
        self._token = [NONE]  # first token of the label
        self._first = [NONE]  # children: doubly linked list ordered by count (not under the root)
        self._last = [NONE]
        self._next = [NONE]
        self._prev = [NONE]
        self._children: dict[tuple[int, int], int] = {}  # (node, first token) -> child
        self._active: dict[int, deque[int]] = {}  # seq id -> nodes where its live suffixes end

    def _new_node(self, count: int, parent: int, seq: int, start: int, length: int, token: int) -> int:
        self._count.append(count)
        self._parent.append(parent)
        self._seq.append(seq)
        self._start.append(start)
        self._length.append(length)
        self._token.append(token)
        for lst in (self._first, self._last, self._next, self._prev):
            lst.append(NONE)
        return len(self._count) - 1

    def _link_last(self, parent: int, node: int) -> None:
        last = self._last[parent]
        self._prev[node], self._next[node] = last, NONE
        if last == NONE:
            self._first[parent] = node
        else:
            self._next[last] = node
        self._last[parent] = node

    def _replace_child(self, parent: int, old: int, new: int) -> None:
        """Put ``new`` at ``old``'s place in ``parent``'s child list."""
        prev, nxt = self._prev[old], self._next[old]
        self._prev[new], self._next[new] = prev, nxt
        if prev == NONE:
            self._first[parent] = new
        else:
            self._next[prev] = new
        if nxt == NONE:
            self._last[parent] = new
        else:
            self._prev[nxt] = new
        self._prev[old] = self._next[old] = NONE

    def _bubble_up(self, node: int) -> None:
        """Move ``node`` towards the head of its siblings while the previous one has a lower count."""
        parent = self._parent[node]
        if parent == ROOT:
            return
        count = self._count
        prev = self._prev[node]
        while prev != NONE and count[prev] < count[node]:
            # swap node and prev: ... pp, prev, node, nn ... -> ... pp, node, prev, nn ...
            pp, nn = self._prev[prev], self._next[node]
            if pp == NONE:
                self._first[parent] = node
            else:
                self._next[pp] = node
            if nn == NONE:
                self._last[parent] = prev
            else:
                self._prev[nn] = prev
            self._prev[node], self._next[node] = pp, prev
            self._prev[prev], self._next[prev] = node, nn
            prev = pp

    # ------------------------------------------------------------------ appending
    def extend(self, seq_id: int, tokens) -> None:
        """Append ``tokens`` to sequence ``seq_id`` (created if new)."""
        for tok in tokens:
            self.append(seq_id, int(tok))

    def append(self, seq_id: int, token: int) -> None:
        """Append one token to sequence ``seq_id`` (created if new): O(max_depth)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = []
            self._active[seq_id] = deque()
        active = self._active[seq_id]
        seq.append(token)
        n = len(seq)
        active.append(ROOT)
        if len(active) > self.max_depth:
            active.popleft()  # that suffix has reached max_depth: it ends where it is
        self._count[ROOT] += 1
        count, length = self._count, self._length
        for i in range(len(active)):
            node = active[i]
            child = self._children.get((node, token), NONE)
            if child == NONE:
                if node != ROOT and count[node] == 1:
                    # only this suffix reaches this leaf: grow its label
                    length[node] += 1
                    self._seq[node], self._start[node] = seq_id, n - length[node]
                else:
                    leaf = self._new_node(1, node, seq_id, n - 1, 1, token)
                    self._children[(node, token)] = leaf
                    self._link_last(node, leaf)
                    active[i] = leaf
            elif node != ROOT and count[node] == count[child] + 1 and length[child] > 1:
                # every other suffix through node goes on into child: shift the boundary by one
                length[node] += 1
                self._seq[node], self._start[node] = seq_id, n - length[node]
                del self._children[(node, token)]
                self._start[child] += 1
                length[child] -= 1
                self._token[child] = self._seqs[self._seq[child]][self._start[child]]
                self._children[(node, self._token[child])] = child
            elif length[child] == 1:
                count[child] += 1
                self._bubble_up(child)
                active[i] = child
            else:
                # split child after its first token
                mid = self._new_node(count[child] + 1, node, self._seq[child], self._start[child], 1, token)
                self._children[(node, token)] = mid
                self._replace_child(node, child, mid)
                self._parent[child] = mid
                self._start[child] += 1
                length[child] -= 1
                self._token[child] = self._seqs[self._seq[child]][self._start[child]]
                self._children[(mid, self._token[child])] = child
                self._first[mid] = self._last[mid] = child
                self._bubble_up(mid)
                active[i] = mid

    # ------------------------------------------------------------------ sequences and eviction
    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self._seqs.values())

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    @property
    def num_nodes(self) -> int:
        return len(self._count)

    def seq_ids(self) -> list[int]:
        """Stored sequence ids, oldest first."""
        return list(self._seqs)

    def get_sequence(self, seq_id: int) -> list[int]:
        """The stored tokens of ``seq_id``."""
        if seq_id not in self._seqs:
            raise KeyError(f"no sequence {seq_id} in this tree")
        return list(self._seqs[seq_id])

    def remove(self, seq_id: int) -> None:
        """Forget ``seq_id`` (the tree is rebuilt from the remaining stored tokens)."""
        if seq_id not in self._seqs:
            raise KeyError(f"no sequence {seq_id} in this tree")
        del self._seqs[seq_id]
        self.rebuild()

    def evict(self, max_tokens: int) -> int:
        """Drop the oldest sequences until at most ``max_tokens`` remain; returns sequences dropped."""
        total, dropped = self.num_tokens, 0
        for seq_id in list(self._seqs):
            if total <= max_tokens:
                break
            total -= len(self._seqs.pop(seq_id))
            dropped += 1
        if dropped:
            self.rebuild()
        return dropped

    def rebuild(self) -> None:
        """Rebuild every node from the stored token arrays (oldest sequence first)."""
        seqs = self._seqs
        self._seqs = {}
        self._reset_nodes()
        for seq_id, tokens in seqs.items():
            self.extend(seq_id, tokens)

    # ------------------------------------------------------------------ drafting
    def _match(self, context: list[int], p: int) -> tuple[int, int]:
        """Node and offset in its label where the last ``p`` context tokens end, or ``(-1, 0)``."""
        node, off = ROOT, 0
        for tok in context[len(context) - p :]:
            if off == self._length[node]:
                node = self._children.get((node, tok), NONE)
                if node == NONE:
                    return NONE, 0
                off = 1
            else:
                if self._seqs[self._seq[node]][self._start[node] + off] != tok:
                    return NONE, 0
                off += 1
        return node, off

    def _grow(self, node: int, off: int, limit: int, min_prob: float) -> Draft:
        """Best-first tree from a matched position: at most ``limit`` nodes, path prob >= min_prob."""
        draft = Draft()
        heap: list[tuple] = []  # (-prob, order, token, node, off, parent, support)
        order = 0

        def expand(nd: int, of: int, prob: float, parent: int) -> None:
            nonlocal order
            if of < self._length[nd]:
                tok = self._seqs[self._seq[nd]][self._start[nd] + of]
                heapq.heappush(heap, (-prob, order, tok, nd, of + 1, parent, self._count[nd]))
                order += 1
                return
            child, denom = self._first[nd], self._count[nd]
            while child != NONE:
                pr = prob * self._count[child] / denom
                if pr < min_prob:
                    break
                heapq.heappush(heap, (-pr, order, self._token[child], child, 1, parent, denom))
                order += 1
                child = self._next[child]

        expand(node, off, 1.0, -1)
        while heap and len(draft.tokens) < limit:
            neg, _, tok, nd, of, parent, support = heapq.heappop(heap)
            draft.tokens.append(tok)
            draft.parents.append(parent)
            draft.probs.append(-neg)
            draft.supports.append(support)
            draft.score += -neg
            expand(nd, of, -neg, len(draft.tokens) - 1)
        return draft

    def speculate(
        self, context, budget: int, alpha: float = 1.0, beta: float = 0.0, min_prob: float = 0.1
    ) -> Draft:
        """Best draft over match lengths ``p``: up to ``min(budget, int(alpha*p + beta))`` nodes.

        Equal scores go to the longer match (more context agrees with it).
        """
        context = [int(t) for t in context[-self.max_depth :]]
        best = Draft()
        for p in range(1, len(context) + 1):
            node, off = self._match(context, p)
            if node == NONE:
                break  # a longer suffix cannot occur if this one does not
            if self._count[node] == 1 and off == self._length[node] and self._first[node] == NONE:
                break  # a single occurrence with nothing after it: longer matches are that same occurrence
            limit = min(int(budget), int(alpha * p + beta))
            if limit <= 0:
                continue
            draft = self._grow(node, off, limit, min_prob)
            if draft.score > 0 and draft.score >= best.score:  # ties: the longer match
                draft.match_len = p
                best = draft
        return best

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Raise ``ValueError`` when an invariant of the tree does not hold."""
        ends = [0] * len(self._count)
        # recount every suffix by walking it from the root
        expected = [0] * len(self._count)
        for seq in self._seqs.values():
            for s in range(len(seq)):
                expected[ROOT] += 1
                suffix = seq[s : s + self.max_depth]
                node, off, i = ROOT, 0, 0
                while i < len(suffix):
                    if off == self._length[node]:
                        node = self._children.get((node, suffix[i]), NONE)
                        if node == NONE:
                            raise ValueError(f"suffix at {s} of a sequence is missing from the tree")
                        expected[node] += 1
                        off = 1
                    elif self._seqs[self._seq[node]][self._start[node] + off] != suffix[i]:
                        raise ValueError(f"label mismatch at node {node}")
                    else:
                        off += 1
                    i += 1
                if off != self._length[node]:
                    raise ValueError(f"a suffix ends inside the label of node {node}")
                ends[node] += 1
        for node in range(len(self._count)):
            if self._count[node] != expected[node]:
                raise ValueError(f"node {node} has count {self._count[node]}, expected {expected[node]}")
            kids, child, prev = 0, self._first[node], NONE
            while child != NONE:
                if self._parent[child] != node or self._prev[child] != prev:
                    raise ValueError(f"broken child list at node {node}")
                if self._children.get((node, self._token[child])) != child:
                    raise ValueError(f"child {child} of {node} is not indexed by its first token")
                if node != ROOT and prev != NONE and self._count[prev] < self._count[child]:
                    raise ValueError(f"children of node {node} are not ordered by count")
                kids += self._count[child]
                prev, child = child, self._next[child]
            if self._last[node] != prev:
                raise ValueError(f"last child of node {node} is wrong")
            if node != ROOT and kids + ends[node] != self._count[node]:
                raise ValueError(f"node {node}: children counts + ends != count")
        if len(self._children) != len(self._count) - 1:
            raise ValueError("child index size does not match the number of nodes")

    def estimate_memory(self) -> int:
        """Approximate bytes held (tokens + nodes + child index), as the compiled core would."""
        return 4 * self.num_tokens + 40 * len(self._count) + 24 * len(self._children)
