"""Budgets on grammar work: what a JSON schema may ask of the compiler and of constrained decoding.

A schema is checked before anything compiles it (:func:`check_schemas`, milliseconds), then compiled
in a worker process under a time and memory limit (:mod:`agentspec.engine.grammar_worker`). The
static checks catch what no compile-time limit can:

- a ``$ref`` recursion that every instance must follow (``{"properties": {"child": {"$ref": "#"}},
  "required": ["child"]}``) has no finite instance: the grammar compiles in milliseconds, but the
  string it forces is infinite, and finding it exhausts memory;
- a subschema whose smallest instance is huge (``minItems`` nested in ``minItems``) forces a huge string;
- objects with many optional properties compile in time that grows faster than their square.

Each budget is a field of :class:`GrammarLimits`; going over one raises :class:`GrammarBudgetError`
(a ``ValueError``) that names the field, its value and the limit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_SIZING_STEPS = 100_000
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames")


@dataclass(frozen=True)
class GrammarLimits:
    """How much grammar work one request may cause (``agentspec serve --grammar-*`` options)."""

    max_schema_bytes: int = 64 * 2**10  # a schema's (or all tools' schemas') JSON text
    max_depth: int = 32  # nesting of objects and arrays in a schema document
    max_nodes: int = 1024  # subschemas + enum values in one grammar (all tools together)
    max_object_properties: int = 256  # properties of one object (optional ones cost the compiler most)
    max_forced_chars: int = 16384  # the smallest instance of any subschema (a string decoding may be forced to)
    max_compiled_bytes: int = 64 * 2**20  # one compiled grammar's memory (xgrammar's count of its states' masks)
    compile_timeout_s: float = 5.0  # a compile taking longer is killed (it runs in a worker process)
    compile_memory_bytes: int = 2**30  # address space the worker may add while compiling
    cache_entries: int = 64  # compiled grammars kept (least recently used dropped first)
    cache_bytes: int = 256 * 2**20  # their memory as xgrammar reports it

    def validate(self) -> None:
        """``ValueError`` naming a field that is not positive."""
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"grammar limit {name} must be > 0, got {value!r}")


class GrammarBudgetError(ValueError):
    """A grammar is over one of the :class:`GrammarLimits`; ``budget`` names the field."""

    def __init__(self, budget: str, message: str) -> None:
        super().__init__(f"{message} (grammar budget {budget})")
        self.budget = budget


def check_schemas(schemas: list[Any], limits: GrammarLimits, what: str = "schema") -> None:
    """Raise :class:`GrammarBudgetError` if the JSON schemas of one grammar (a response format's, or every
    tool's) are over a budget of ``limits``; each schema's ``$ref`` pointers are its own."""
    size = sum(len(json.dumps(schema)) for schema in schemas)
    if size > limits.max_schema_bytes:
        raise GrammarBudgetError("max_schema_bytes", f"the {what} is {size} bytes, over the limit of "
                                                     f"{limits.max_schema_bytes}")
    nodes = sum(_count(schema, limits, what) for schema in schemas)
    if nodes > limits.max_nodes:
        raise GrammarBudgetError("max_nodes", f"the {what} has {nodes} subschemas and enum values, over the limit "
                                              f"of {limits.max_nodes}")
    for schema in schemas:
        sizes = _MinSize(schema)
        for node in _subschemas(schema):
            smallest = sizes.of(node)
            if math.isinf(smallest):
                raise GrammarBudgetError("max_forced_chars", f"the {what} has a subschema with no finite instance "
                                                             "(a $ref recursion that every instance must follow)")
            if smallest > limits.max_forced_chars:
                raise GrammarBudgetError("max_forced_chars", f"the {what} has a subschema whose smallest instance "
                                                             f"is {smallest:.0f} characters, over the limit of "
                                                             f"{limits.max_forced_chars}")


def _count(value: Any, limits: GrammarLimits, what: str, depth: int = 0) -> int:
    """Subschemas (objects) and enum values in a schema document; checks depth and object sizes."""
    if depth > limits.max_depth:
        raise GrammarBudgetError("max_depth", f"the {what} nests deeper than the limit of {limits.max_depth}")
    if isinstance(value, list):
        return sum(_count(v, limits, what, depth + 1) for v in value)
    if not isinstance(value, dict):
        return 0
    properties = value.get("properties")
    if isinstance(properties, dict) and len(properties) > limits.max_object_properties:
        raise GrammarBudgetError("max_object_properties", f"an object of the {what} has {len(properties)} "
                                 f"properties, over the limit of {limits.max_object_properties}")
    enum = value.get("enum")
    return 1 + (len(enum) if isinstance(enum, list) else 0) + sum(
        _count(v, limits, what, depth + 1) for k, v in value.items() if k not in ("enum", "const", "default",
                                                                                   "examples"))


def _subschemas(schema: Any) -> list[dict]:
    """Every subschema (dict) of a schema document reachable through schema keywords."""
    out, todo = [], [schema]
    while todo:
        node = todo.pop()
        if not isinstance(node, dict):
            continue
        out.append(node)
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                todo.extend(node[key])
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                todo.extend(node[key].values())
        todo.extend(node[key] for key in _SCHEMA_VALUES if key in node)
    return out


class _MinSize:
    """An upper estimate of the length of the smallest JSON text matching a subschema (inf: none is finite).

    ``$ref`` is followed (local ``#...`` pointers); a reference met again while it is being sized is a
    recursion every instance must follow. Results are memoised per subschema, so shared definitions
    are sized once.
    """

    def __init__(self, root: Any) -> None:
        self.root = root
        self._memo: dict[int, float] = {}
        self._open: dict[int, int] = {}  # subschemas being sized -> their depth on the stack
        self._low = math.inf  # the shallowest open subschema the current one met (its size depends on it)
        self._steps = 0

    def of(self, node: Any) -> float:
        if node is True or not isinstance(node, dict):
            return 0.0 if node is False else 1.0  # False: no instance, but only where a value must appear
        key = id(node)
        if key in self._memo:
            return self._memo[key]
        if key in self._open:
            self._low = min(self._low, self._open[key])
            return math.inf
        self._steps += 1
        if self._steps > MAX_SIZING_STEPS:
            raise GrammarBudgetError("max_nodes", "the schema's references are too tangled to size")
        depth, outer = len(self._open), self._low
        self._open[key], self._low = depth, math.inf
        try:
            size = self._size(node)
        finally:
            del self._open[key]
        if self._low >= depth:  # not sized under the assumption that an enclosing subschema is infinite
            self._memo[key] = size
        self._low = min(outer, self._low)
        return size

    def _required(self, node: Any) -> float:
        """Like :meth:`of`, where a value must appear (a ``false`` schema then admits nothing)."""
        return math.inf if node is False else self.of(node)

    def _size(self, node: dict) -> float:
        if "$ref" in node:
            target = self._resolve(node["$ref"])
            return self._required(target) if target is not None else 1.0
        if "const" in node:
            return float(len(json.dumps(node["const"])))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return float(min(len(json.dumps(v)) for v in node["enum"]))
        sizes = []
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and node[key]:
                sizes.append(min(self._required(b) for b in node[key]))
        if isinstance(node.get("allOf"), list):
            sizes.extend(self._required(b) for b in node["allOf"])
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds] if isinstance(kinds, str) else []
        if not kinds:
            kinds = ["object"] if "properties" in node or "required" in node else ["array"] if "items" in node else []
        if kinds:
            sizes.append(min(self._typed(node, kind) for kind in kinds))
        return max(sizes) if sizes else 1.0  # allOf and type together: at least the largest of them

    def _typed(self, node: dict, kind: str) -> float:
        if kind == "object":
            properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            required = node.get("required") if isinstance(node.get("required"), list) else []
            fields = [len(json.dumps(name)) + 2 + self._required(properties.get(name, True))
                      for name in required if isinstance(name, str)]
            return 2.0 + sum(fields)
        if kind == "array":
            count = node.get("minItems", 0)
            count = count if isinstance(count, int) and count > 0 else 0
            prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else []
            head = sum(self._required(item) + 1 for item in prefix[:count])
            rest = max(0, count - len(prefix))
            return 2.0 + head + (rest * (self._required(node.get("items", True)) + 1) if rest else 0.0)
        if kind == "string":
            length = node.get("minLength", 0)
            return 2.0 + (length if isinstance(length, int) and length > 0 else 0)
        return {"boolean": 4.0, "null": 4.0}.get(kind, 1.0)

    def _resolve(self, ref: Any) -> Any:
        """The subschema a local ``$ref`` (``#`` or ``#/a/b``) points at; None for one this cannot follow."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node
