"""Grammar-constrained decoding over draft trees (JSON schema, JSON mode, tool calls).

The grammar library is xgrammar, chosen by measurement on a 2-core CPU with SmolLM2's 49,152-token
vocabulary and tau-bench's ``book_reservation`` arguments schema (208 tokens walked one by one):

==============  =========  ==========================  ===========  ====================================
library         compile    next-token mask, median      p90 / max    rolling a matcher back
==============  =========  ==========================  ===========  ====================================
xgrammar        0.10 s     1 us                         5 / 81 us    ``rollback(n)``, any depth
llguidance      0.27 s     7 us                         18 / 1291 us ``rollback(n)``, any depth
outlines-core   0.63 s     0 us (precomputed index)     43 / 63 us   ``rollback_state(n)``, bounded at
                                                                     construction; no recursive JSON
==============  =========  ==========================  ===========  ====================================

JSON mode (any object): xgrammar 3 us median, llguidance 2 us (max 1372 us); outlines-core cannot express
it (a regex has no recursion). xgrammar is the fastest on schemas, rolls back any number of tokens (a
tree walk accepts a node's token, descends, and rolls back), and composes grammars (concatenation,
union, tag-triggered sections), which the tool-call formats need. ``scripts/grammar_libs.py`` re-measures.

A draft tree under a grammar (:func:`constrain_tree`)::

    walk the tree depth first from the root's grammar state:
      mask[slot] = tokens the grammar allows after the slot's path     # one bitmask row per slot
      child allowed by mask[slot]?  accept it, descend, roll back; else cut its whole subtree
      at a leaf: if the mask allows exactly one token, append it (drafted with certainty), repeat;
      else if the grammar forces a string (a schema's next key, a closing tag), append the string's
      usual tokenization, token by token while each one is allowed (a likely, not certain, draft)

Verification then masks row ``slot`` of the logits with ``mask[slot]`` (each node's mask from its
own ancestors), so acceptance picks exactly the token plain constrained decoding would pick.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agentspec.draft.base import DraftTree, Source
from agentspec.engine.grammar_budget import GrammarBudgetError, GrammarLimits, check_schemas
from agentspec.engine.grammar_worker import CompileWorker

JUMP_PROB = 0.9  # acceptance estimate per token of a forced string's usual tokenization


@dataclass(frozen=True)
class Grammar:
    """What the output must match, as a hashable spec (compiled grammars are cached by it).

    ``kind``: ``"json_schema"`` (``source``: the schema as JSON text), ``"json_object"`` (any JSON
    object), ``"ebnf"`` (an xgrammar EBNF grammar with a ``root`` rule), or ``"tool_calls"``
    (``source``: JSON ``{"tools", "mode", "prefix"}``, see :meth:`tool_calls`).
    """

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> Grammar:
        """Output is one JSON value matching ``schema``."""
        text = schema if isinstance(schema, str) else json.dumps(schema)  # key order is the output's order
        json.loads(text)  # a ValueError here names a bad schema before anything runs
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Grammar:
        """Output is one JSON object (OpenAI's JSON mode)."""
        return cls("json_object")

    @classmethod
    def from_response_format(cls, response_format: dict | None) -> Grammar | None:
        """The grammar of an OpenAI ``response_format`` (``None`` for ``{"type": "text"}`` or none)."""
        if not response_format:
            return None
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema", spec.get("schema_"))
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs a 'json_schema': {'name', 'schema': {...}}")
            return cls.json_schema(schema)
        raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")

    @classmethod
    def tool_calls(cls, tools: Sequence[dict], *, mode: str = "auto", prefix: str = "",
                   json_args_keys: Sequence[str] = ()) -> Grammar:
        """Hermes ``<tool_call>`` blocks whose arguments match each tool's ``parameters`` schema.

        ``mode="auto"``: free text, and every ``<tool_call>`` the model opens is constrained (a tool
        is *chosen*); ``"required"``: the answer is tool-call blocks only. ``prefix``: the part of the
        first block already in the prompt (a *forced* call, e.g. ``<tool_call>\\n{"name": "f",
        "arguments": ``); the grammar then starts right after it. ``json_args_keys`` (auto mode): bare
        JSON calls too, e.g. ``("arguments",)``: once the free text reads ``{"name": "f", "arguments": ``
        for a tool ``f``, the arguments follow its schema and the object closes.
        """
        if mode not in ("auto", "required"):
            raise ValueError(f"tool-call grammar mode must be 'auto' or 'required', got {mode!r}")
        functions = [t.get("function", t) for t in tools]
        spec = {"tools": [{"name": f["name"], "parameters": f.get("parameters") or {"type": "object"}}
                          for f in functions], "mode": mode, "prefix": prefix}
        if json_args_keys and mode == "auto" and not prefix:
            spec["json_args_keys"] = list(json_args_keys)
        return cls("tool_calls", json.dumps(spec))  # key order kept: xgrammar emits properties in schema order


# Hermes tool-call block as agentspec.chat renders it: <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
_CALL_OPEN = "<tool_call>"
_CALL_HEAD = '\n{"name": '
_CALL_ARGS = ', "arguments": '
_CALL_END = "}\n</tool_call>"


def _literal(text: str) -> str:
    """An EBNF string literal (JSON escapes are xgrammar's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _schema_grammar(xgr: Any, schema: dict) -> Any:
    # separators as json.dumps writes them (and as tool calls are rendered in prompts); no free whitespace,
    # so a small model cannot loop on blanks
    return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)


def _tool_calls_grammar(xgr: Any, spec: dict) -> Any:
    tools, prefix = spec["tools"], spec["prefix"]
    # one block, from after <tool_call>: name, arguments by that tool's schema, end
    def block_from(after: str, tool: dict) -> Any:
        head = _CALL_HEAD + json.dumps(tool["name"]) + _CALL_ARGS
        parts = [] if after == head else [xgr.Grammar.from_ebnf(f"root ::= {_literal(head[len(after):])}")]
        parts += [_schema_grammar(xgr, tool["parameters"]), xgr.Grammar.from_ebnf(f"root ::= {_literal(_CALL_END)}")]
        return xgr.Grammar.concat(*parts)

    if spec["mode"] == "auto" and not prefix:
        def tag(begin: str, tool: dict, end: str) -> dict:
            # at most one blank in a row inside the arguments: a small model cannot loop on whitespace
            content = {"type": "json_schema", "json_schema": tool["parameters"], "max_whitespace_cnt": 1}
            return {"type": "tag", "begin": begin, "content": content, "end": end}

        tags = [tag(_CALL_OPEN + _CALL_HEAD + json.dumps(t["name"]) + _CALL_ARGS, t, _CALL_END) for t in tools]
        # bare JSON calls: the whole opening up to the arguments is the trigger, so free text (a JSON
        # answer with a "name" of its own included) is untouched until it has named a tool
        json_heads = [('{"name": ' + json.dumps(t["name"]) + f', "{key}": ', t)
                      for key in spec.get("json_args_keys", ()) for t in tools]
        tags += [tag(head, t, "}") for head, t in json_heads]
        return xgr.Grammar.from_structural_tag({"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [_CALL_OPEN, *(head for head, _ in json_heads)], "tags": tags}})
    after = prefix[len(_CALL_OPEN):] if prefix.startswith(_CALL_OPEN) else None
    if prefix and after is None:
        raise ValueError(f"a forced tool-call prefix must start with {_CALL_OPEN!r}, got {prefix!r}")
    heads = {t["name"]: _CALL_HEAD + json.dumps(t["name"]) + _CALL_ARGS for t in tools}
    first = [block_from(after or "", t) for t in tools if heads[t["name"]].startswith(after or "")]
    if not first:
        raise ValueError(f"no tool's call starts with the forced prefix {prefix!r}")
    first_block = xgr.Grammar.union(*first) if len(first) > 1 else first[0]
    if prefix:  # a forced call: that one block, then the end of the answer
        return first_block
    # required: one or more blocks, separated by a newline
    any_block = xgr.Grammar.union(*(block_from("", t) for t in tools)) if len(tools) > 1 else block_from("", tools[0])
    opener = xgr.Grammar.from_ebnf(f"root ::= {_literal(_CALL_OPEN)}")
    return xgr.Grammar.concat(opener, any_block)


class GrammarCompiler:
    """Compiles :class:`Grammar` specs for one tokenizer and vocabulary, within :class:`GrammarLimits`.

    ``vocab_size`` is the model's logits width (it may exceed the tokenizer's vocabulary);
    ``stop_ids`` the tokens that end a generation (allowed once the grammar is complete). A new
    grammar is checked against the static budgets, compiled once in a worker process under the time
    and memory budgets (:class:`~agentspec.engine.grammar_worker.CompileWorker`), then here; compiled
    grammars are kept in an LRU bounded by count and by bytes. Safe to call from several threads.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int],
                 limits: GrammarLimits | None = None) -> None:
        import xgrammar as xgr  # deferred: compiled library, imported on the first constrained request

        self._xgr = xgr
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.limits = limits or GrammarLimits()
        self.limits.validate()
        self.info = _tokenizer_info(xgr, tokenizer, vocab_size, sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)  # the LRU caches
        self._cache: OrderedDict[Grammar, tuple[Any, int]] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self._worker = CompileWorker(self.info.serialize_json(), self.limits, f"{__name__}:compile_grammar")

    def compile(self, grammar: Grammar, cancel: threading.Event | None = None) -> Any:
        """The xgrammar ``CompiledGrammar`` of ``grammar``: ``ValueError`` for an invalid one,
        :class:`GrammarBudgetError` over a budget, :class:`CompileCancelled` once ``cancel`` is set."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar][0]
        if grammar.kind not in ("json_schema", "json_object", "ebnf", "tool_calls"):
            raise ValueError(f"grammar kind must be json_schema, json_object, ebnf or tool_calls, got {grammar.kind!r}")
        check_budget(grammar, self.limits)
        try:
            size = self._worker.check(grammar.kind, grammar.source, cancel)  # bounded in time and memory, killable
        except GrammarBudgetError:
            raise
        except ValueError as exc:  # xgrammar's RuntimeError for a bad schema, as the worker reports it
            raise ValueError(f"invalid {grammar.kind} grammar: {exc}") from exc
        if size > self.limits.max_compiled_bytes:
            raise GrammarBudgetError("max_compiled_bytes", f"the compiled {grammar.kind} grammar takes {size} bytes, "
                                                           f"over the limit of {self.limits.max_compiled_bytes}")
        compiled = compile_grammar(self._xgr, self._compiler, grammar.kind, grammar.source)  # proven bounded
        self._keep(grammar, compiled)
        return compiled

    def _keep(self, grammar: Grammar, compiled: Any) -> None:
        size = int(compiled.memory_size_bytes)
        with self._lock:
            if grammar in self._cache:
                return
            self._cache[grammar] = (compiled, size)
            self._cache_bytes += size
            while len(self._cache) > 1 and (len(self._cache) > self.limits.cache_entries
                                            or self._cache_bytes > self.limits.cache_bytes):
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cache_bytes -= dropped

    @property
    def cached(self) -> tuple[int, int]:
        """``(compiled grammars kept, their bytes)``."""
        with self._lock:
            return len(self._cache), self._cache_bytes

    def matcher(self, grammar: Grammar) -> TreeMatcher:
        """A fresh matcher at the start of ``grammar``."""
        return TreeMatcher(self._xgr.GrammarMatcher(self.compile(grammar)), self.vocab_size, self._encode)

    def close(self) -> None:
        """Stop the compile worker."""
        self._worker.close()

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def check_budget(grammar: Grammar, limits: GrammarLimits) -> None:
    """:class:`GrammarBudgetError` when ``grammar``'s text or schemas are over a static budget."""
    if len(grammar.source) > limits.max_schema_bytes:
        raise GrammarBudgetError("max_schema_bytes", f"the {grammar.kind} grammar is {len(grammar.source)} bytes, "
                                                     f"over the limit of {limits.max_schema_bytes}")
    if grammar.kind == "json_schema":
        check_schemas([json.loads(grammar.source)], limits, "response_format schema")
    elif grammar.kind == "tool_calls":
        check_schemas([t["parameters"] for t in json.loads(grammar.source)["tools"]], limits, "tools' parameters")


def compile_grammar(xgr: Any, compiler: Any, kind: str, source: str) -> Any:
    """Compile a grammar spec with an xgrammar ``GrammarCompiler`` (here, or in the compile worker)."""
    if kind == "json_schema":
        return compiler.compile_grammar(_schema_grammar(xgr, json.loads(source)))
    if kind == "json_object":
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "ebnf":
        return compiler.compile_grammar(source)
    return compiler.compile_grammar(_tool_calls_grammar(xgr, json.loads(source)))


def _tokenizer_info(xgr: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Any:
    """xgrammar's view of the vocabulary; a model narrower than its tokenizer sees the first ids only."""
    if vocab_size >= len(tokenizer):
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
    full = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=stop_ids)
    encoded = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])][:vocab_size]
    return xgr.TokenizerInfo(encoded, full.vocab_type, vocab_size=vocab_size,
                             stop_token_ids=[i for i in stop_ids if i < vocab_size],
                             add_prefix_space=full.add_prefix_space)


class TreeMatcher:
    """One request's grammar state, walked along draft trees (xgrammar ``GrammarMatcher`` inside).

    The matcher's state is always that of the committed output; tree walks roll back what they accept.
    """

    def __init__(self, matcher: Any, vocab_size: int, encode: Callable[[str], list[int]]) -> None:
        import xgrammar as xgr  # deferred: see GrammarCompiler

        self._xgr = xgr
        self._m = matcher
        self._encode = encode
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32

    @property
    def done(self) -> bool:
        """The grammar has accepted a stop token: nothing may follow."""
        return bool(self._m.is_terminated())

    def masks(self, rows: int) -> torch.Tensor:
        """A new bitmask ``[rows, ceil(V / 32)]`` int32 (bit ``t`` of a row set = token ``t`` allowed)."""
        return torch.zeros(rows, self._words, dtype=torch.int32)

    def fill(self, masks: torch.Tensor, row: int) -> None:
        """Write the mask of the current state into ``masks[row]``."""
        if self.done:  # after a stop token nothing is emitted: leave the row unconstrained (no NaN rows)
            masks[row] = -1
        else:
            self._m.fill_next_token_bitmask(masks, row)

    def commit(self, tokens: Sequence[int]) -> None:
        """Advance the committed state; ``ValueError`` if the grammar rejects a token."""
        for tok in tokens:
            if not self._m.accept_token(int(tok)):
                raise ValueError(f"token {tok} is not allowed by the grammar here")

    def apply(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``logits: [R, V]``: disallowed tokens of row ``r`` (by ``masks[r]``) set to ``-inf``, in place."""
        self._xgr.apply_token_bitmask_inplace(logits, masks, vocab_size=self.vocab_size)
        return logits

    # ------------------------------------------------------------------ trees
    def constrain(self, tree: DraftTree, budget: int) -> tuple[DraftTree, torch.Tensor]:
        """Cut the branches the grammar rejects, extend leaves by forced tokens (up to ``budget`` nodes).

        Returns the new tree (in depth-first order) and its masks ``[1 + n, W]`` (row 0: the root).
        The committed state is unchanged on return.
        """
        children: list[list[int]] = [[] for _ in range(len(tree) + 1)]
        for i, p in enumerate(tree.parents):
            children[p + 1].append(i)
        size = [1] * len(tree)  # subtree sizes: room is kept for drafter nodes not visited yet
        for i in range(len(tree) - 1, -1, -1):
            if tree.parents[i] >= 0:
                size[tree.parents[i]] += size[i]
        out = DraftTree()
        masks = self.masks(max(budget, len(tree)) + 1)
        pending = len(tree)

        def visit(old: int | None, new: int, prob: float, plan: list[int]) -> None:
            # old: the drafter's node (-1: the root; None: a node the grammar drafted); plan: forced string's rest
            nonlocal pending
            self.fill(masks, new + 1)
            row = masks[new + 1].numpy()
            kids = children[old + 1] if old is not None else []
            if self.done:  # after a stop token nothing follows
                pending -= sum(size[c] for c in kids)
                return
            allowed = [c for c in kids if _allowed(row, tree.tokens[c])]
            pending -= sum(size[c] for c in kids if c not in allowed)
            for c in allowed:
                pending -= 1
                self._descend(out, tree.tokens[c], new, tree.probs[c], tree.sources[c])
                visit(c, len(out) - 1, tree.probs[c], [])
                self._m.rollback(1)
            if not allowed and len(out) + pending < budget:  # a leaf: follow what the grammar forces
                token, p, plan = self._forced(row, plan)
                if token is not None:
                    self._descend(out, token, new, prob * p, Source.GRAMMAR)
                    visit(None, len(out) - 1, prob * p, plan)
                    self._m.rollback(1)

        visit(-1, -1, 1.0, [])
        return out, masks[: len(out) + 1]

    def _forced(self, row: np.ndarray, plan: list[int]) -> tuple[int | None, float, list[int]]:
        """The next grammar-drafted token at this state: ``(token, its probability, rest of the plan)``."""
        single = _single(row)
        if single is not None:
            return single, 1.0, plan[1:] if plan and plan[0] == single else []
        if not plan:
            text = self._m.find_jump_forward_string()
            plan = self._encode(text) if text else []
        if plan and _allowed(row, plan[0]):
            return plan[0], JUMP_PROB, plan[1:]
        return None, 0.0, []

    def _descend(self, out: DraftTree, token: int, parent: int, prob: float, source: int) -> None:
        self._m.accept_token(token)
        out.tokens.append(token), out.parents.append(parent), out.probs.append(prob), out.sources.append(source)


def _allowed(row: np.ndarray, token: int) -> bool:
    word = row[token >> 5] if token >> 5 < len(row) else 0
    return bool((int(word) >> (token & 31)) & 1)


def _single(row: np.ndarray) -> int | None:
    """The only allowed token of a mask row, or ``None``."""
    nz = np.flatnonzero(row)
    if len(nz) != 1:
        return None
    word = int(row[nz[0]]) & 0xFFFFFFFF
    if word & (word - 1):
        return None
    return int(nz[0]) * 32 + word.bit_length() - 1
