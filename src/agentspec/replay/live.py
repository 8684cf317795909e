"""Live replay: the engine generates every recorded call, session by session, calls in order.

Each call's prompt is the recorded one (fitted to the window minus ``max_new_tokens`` by
dropping the oldest turns), with ``session`` = the trajectory id, so the session's suffix trees
grow as the agent's did. Comparison methods (``compare=["hf", "hf_pld", "llamacpp",
"agentspec_int8"]``; ``baseline=True`` is plain HF greedy alone) run the same prompt ids right
before each call, for side-by-side speedups and a token-for-token identity check against plain
greedy. ``agentspec bench`` is this loop.

Typical use::

    sessions = load_sessions("path/to/swe_agent", limit=2)
    report = replay_live(Engine.from_pretrained(store="memory"), sessions, max_new_tokens=64, baseline=True)
    Console().print(render_summary(report)); plot_report(report, "replay.png")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from agentspec import chat
from agentspec.replay.baselines import Runner, comparison_runner
from agentspec.replay.report import (
    COMPARISONS,
    REFERENCES,
    SPECULATION_OFF,
    MethodRun,
    ReplayedCall,
    ReplayReport,
    copied_share,
)
from agentspec.replay.trajectories import Call, Session, tokenize_call


def replay_live(
    engine,
    sessions: Sequence[Session],
    *,
    max_new_tokens: int = 128,
    max_context: int | None = None,
    baseline: bool = False,
    compare: Sequence[str] = (),
    calls_per_session: int | None = None,
    on_call: Callable[[ReplayedCall | None], None] | None = None,
    runners: dict[str, Runner] | None = None,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """Generate every recorded call with ``engine``, session by session, calls in order.

    The prompt of each call is the recorded one, fitted to ``min(max_context, window) -
    max_new_tokens`` tokens (oldest turns dropped; a call that cannot fit is skipped with a
    note). Each comparison in ``compare`` (names from :data:`agentspec.replay.report.COMPARISONS`;
    ``baseline=True`` adds ``"hf"``, plain HF greedy) runs the same prompt ids right before
    agentspec, call by call, so ratios compare like with like on a noisy machine. ``runners``
    replaces the runner of a comparison (tests). ``on_call`` gets each :class:`ReplayedCall`
    (``None`` for a skipped call); with ``report`` given, that report is filled in place, so
    ``on_call`` can save it as it grows.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    window = min(max_context or engine.context_window, engine.context_window)
    budget = window - max_new_tokens
    if budget <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {window}-token window")
    compare = list(dict.fromkeys((["hf"] if baseline else []) + list(compare)))
    unknown = [m for m in compare if m not in COMPARISONS]
    if unknown:
        raise ValueError(f"unknown comparison methods {unknown}; expected some of {list(COMPARISONS)}")
    runners = dict(runners or {})
    for name in compare:
        if name not in runners:
            runners[name] = comparison_runner(name, engine, window)
    report = report if report is not None else ReplayReport("live")
    report.compared = compare
    report.info.update(model=getattr(engine, "model_name", ""), max_new_tokens=max_new_tokens, window=window,
                       compared=compare)
    for session in sessions:
        for index, call in enumerate(session.calls[:calls_per_session]):
            record = _live_call(engine, session, index, call, budget, max_new_tokens, runners, report)
            if on_call:
                on_call(record)
    return report


def _fitted_prompt(engine, call: Call, budget: int) -> tuple[list[int], bool] | str:
    """``(prompt ids, fitted)``, or why the call cannot be replayed."""
    try:
        prompt_ids = chat.prompt_ids(engine.tokenizer, call.messages)
        if len(prompt_ids) <= budget:
            return prompt_ids, False
        pair = tokenize_call(engine.tokenizer, call, budget)  # drop the oldest turns (system prompt, task kept)
    except Exception as exc:  # e.g. a message the chat template rejects: skip the call, keep going
        return f"cannot render the prompt ({exc})"
    if pair is None:
        return f"prompt of {len(prompt_ids)} tokens cannot be fitted to {budget} tokens"
    return pair[0], True


def _reference(engine, outputs: dict[str, list[int]]) -> str | None:
    """The plain greedy run agentspec's output must equal: HF greedy on the same weights, unless the
    engine keeps a 16-bit KV cache or int8 matmul inputs (HF does neither) or HF did not run; then the
    same engine with speculation off, which shares its weights, KV precision and matmul mode."""
    exact = getattr(engine, "kv_dtype", None) is None and getattr(engine, "matmul", "float32") == "float32"
    if "hf" in outputs and exact:
        return "hf"
    return SPECULATION_OFF if SPECULATION_OFF in outputs else None


def _live_call(engine, session: Session, index: int, call: Call, budget: int, max_new_tokens: int,
               runners: dict[str, Runner], report: ReplayReport) -> ReplayedCall | None:
    where = f"{session.id} call {index}"
    prompt = _fitted_prompt(engine, call, budget)
    if isinstance(prompt, str):
        report.skipped.append(f"{where}: {prompt}")
        return None
    prompt_ids, fitted = prompt
    record = ReplayedCall(session.id, index, len(prompt_ids), fitted=fitted)
    outputs = {}
    for name, runner in runners.items():
        ids, decode, total, steps = runner(prompt_ids, session.id, max_new_tokens)
        outputs[name] = ids
        record.methods[name] = MethodRun(len(ids), decode, total, steps)
    t0 = time.perf_counter()
    try:
        result = engine.generate(prompt_ids, session=session.id, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        report.skipped.append(f"{where}: {exc}")
        return None
    record.total_seconds = time.perf_counter() - t0
    record.stats = result.stats
    record.copied = copied_share(result.token_ids, prompt_ids)
    reference = _reference(engine, outputs)
    if reference is not None:
        record.identical = result.token_ids == outputs[reference]
    for name, run in record.methods.items():  # each against plain greedy decoding of the same weights
        reference = REFERENCES.get(name, "hf")
        run.identical = None if reference == name or reference not in outputs else outputs[name] == outputs[reference]
    report.calls.append(record)
    return record
