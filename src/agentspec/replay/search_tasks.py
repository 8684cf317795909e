"""Machine-checkable tasks for the tree-search benchmark, and their checker.

A task is one short chat prompt and an answer a program can check. Kinds:

* ``number``: the last integer in the output equals ``answer``;
* ``word``: ``answer`` appears in the output as a whole word (case-insensitive);
* ``regex``: the stripped output (without a final period) fully matches the pattern ``answer``;
* ``tool_call``: the first JSON object in the output is ``{"name": ..., "arguments": {...}}`` with
  the recorded function name and arguments (``answer`` = ``{"name", "arguments"}``).

A task may name a scorer (``SCORERS``) that ranks its trajectories step by step, e.g. ``arithmetic``
(:func:`arithmetic_score`, which recomputes the arithmetic written in each step); without one the
default score is the model's mean token log-probability.

The bundled set (``agentspec/samples/search_tasks.jsonl``) was kept from generated candidates by
measuring the default model's pass@1 and pass@16 (see ``scripts/build_search_tasks.py``); each line
carries the figures it was kept on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TASKS = Path(__file__).resolve().parents[1] / "samples" / "search_tasks.jsonl"
KINDS = ("number", "word", "regex", "tool_call")

_INT_RE = re.compile(r"-?\d[\d,]*")


@dataclass
class SearchTask:
    """One prompt and how to check an answer to it."""

    id: str
    messages: list[dict]  # OpenAI-style chat messages
    kind: str  # one of KINDS
    answer: Any
    source: str = "generated"  # where the prompt came from (a recorded data set, or "generated")
    measured: dict = field(default_factory=dict)  # e.g. {"samples": 16, "correct": 5, "pass@1": 0.31, ...}
    scorer: str | None = None  # a name in SCORERS ranks the trajectories; None: the model's mean log-probability

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.id!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"task {self.id!r}: scorer {self.scorer!r} is not one of {sorted(SCORERS)}")

    def check(self, text: str) -> bool:
        """True when ``text`` answers this task correctly."""
        return check(self.kind, self.answer, text)


def check(kind: str, answer: Any, text: str) -> bool:
    """Whether ``text`` is a correct answer of ``kind`` (see the module docstring)."""
    if kind == "number":
        numbers = _INT_RE.findall(text)
        return bool(numbers) and numbers[-1].replace(",", "") == str(answer)
    if kind == "word":
        return re.search(rf"(?<!\w){re.escape(str(answer))}(?!\w)", text, re.IGNORECASE) is not None
    if kind == "regex":
        return re.fullmatch(answer, text.strip().removesuffix(".").strip()) is not None
    if kind == "tool_call":
        call = first_json_object(text)
        return (isinstance(call, dict) and call.get("name") == answer["name"]
                and _normal(call.get("arguments")) == _normal(answer["arguments"]))
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


_EQUATION_RE = re.compile(r"(?<![\d.,])(\d+(?:\.\d+)?)\s*([-+*/x×÷])\s*(\d+(?:\.\d+)?)\s*=\s*\$?(-?\d[\d,]*(?:\.\d+)?)")
_OPS = {"+": float.__add__, "-": float.__sub__, "*": float.__mul__, "x": float.__mul__, "×": float.__mul__,
        "/": float.__truediv__, "÷": float.__truediv__}


def arithmetic_score(prompt: str, steps: Sequence[str]) -> float:
    """A cheap process verifier: every ``a op b = c`` written in the steps so far is recomputed;
    the score is (right - wrong) / written, in [-1, 1], and 0 while no step writes one."""
    right = wrong = 0
    for a, op, b, c in _EQUATION_RE.findall("\n".join(steps)):
        try:
            value = _OPS[op](float(a), float(b))
        except ZeroDivisionError:
            wrong += 1
            continue
        if abs(value - float(c.replace(",", ""))) < 1e-6 * max(1.0, abs(value)):
            right += 1
        else:
            wrong += 1
    return (right - wrong) / (right + wrong) if right + wrong else 0.0


SCORERS = {"arithmetic": arithmetic_score}


def first_json_object(text: str) -> Any:
    """The first JSON object that parses in ``text``, or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _normal(value: Any) -> Any:
    """Arguments compared up to surrounding whitespace of strings."""
    if isinstance(value, dict):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value.strip() if isinstance(value, str) else value


def load_tasks(path: str | Path | None = None, limit: int | None = None) -> list[SearchTask]:
    """Read a task file (JSON lines; default: the bundled set); ``ValueError`` names a bad line."""
    path = Path(path) if path is not None else DEFAULT_TASKS
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(SearchTask(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not a search task ({exc})") from exc
    return tasks[:limit] if limit else tasks


def save_tasks(tasks: Iterable[SearchTask], path: str | Path) -> None:
    """Write tasks as JSON lines."""
    Path(path).write_text("".join(json.dumps(asdict(t)) + "\n" for t in tasks))


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``correct`` right answers among ``samples`` (Chen et al. 2021)."""
    if samples - correct < k:
        return 1.0
    miss = 1.0
    for i in range(samples - correct + 1, samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest  # scipy is heavy; only reports need it

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def score_outputs(task: SearchTask, texts: Sequence[str]) -> list[bool]:
    """The checker over many outputs of one task."""
    return [task.check(t) for t in texts]
