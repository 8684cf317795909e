"""Forced tool calls on recorded tau-bench prompts: valid share, fidelity and speed with and without constraints.

For each recorded assistant turn that called a tool, the prompt is the conversation before it with the
airline tools' schemas (``src/agentspec/samples/tau_bench_airline_tools.json``), and ``tool_choice`` forces
the tool the recording called. Three generations per prompt, greedy, with speculation unless said:

* ``free``: today's forcing (the call's opening in the prompt, stop strings, repair of the braces);
* ``constrained``: the same, plus the tool-call grammar (arguments held to the tool's JSON schema);
* ``plain``: constrained, one token per step (no speculation): must equal ``constrained`` token for token.

A call is *valid* when the answer parses into exactly one call of the forced tool whose arguments match
its schema. Run from the repo root (``pip install jsonschema-rs`` for the schema check)::

    python scripts/bench_tool_calls.py [PATH] --calls 30 --max-new-tokens 160 [--report out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from agentspec.integrations.common import prepare_prompt
from agentspec.integrations.toolcalls import ToolCallSplitter

from agentspec import Engine
from agentspec.chat import fit_messages
from agentspec.replay.trajectories import default_data_dir, load_sessions

TOOLS = Path(__file__).resolve().parents[1] / "src" / "agentspec" / "samples" / "tau_bench_airline_tools.json"


def forced_calls(path: Path, n: int, tokenizer, tools: list[dict], max_context: int) -> list[tuple[list, str]]:
    """``(messages, tool name)`` of the first ``n`` recorded tool calls, round-robin over trajectories."""
    sessions = load_sessions(path)
    out: list[tuple[list, str]] = []
    per = [[c for c in s.calls if c.completion.get("tool_calls")] for s in sessions]
    for index in range(max(map(len, per), default=0)):
        for calls in per:
            if index < len(calls) and len(out) < n:
                call = calls[index]
                name = call.completion["tool_calls"][0]["function"]["name"]
                messages = fit_messages(call.messages, lambda m, name=name: len(
                    prepare_prompt(tokenizer, m, tools=tools, tool_choice=name).prompt_ids), max_context)
                if messages is not None:
                    out.append((messages, name))
    return out


def run(engine: Engine, messages: list, name: str, tools: list[dict], mode: str, max_new: int) -> dict:
    prepared = prepare_prompt(engine.tokenizer, messages, tools=tools, tool_choice=name, constrain=mode != "free")
    t0 = time.perf_counter()
    result = engine.generate(prepared.prompt_ids, stop=prepared.stop, max_new_tokens=max_new,
                             grammar=prepared.grammar, speculate=mode != "plain")
    seconds = time.perf_counter() - t0
    splitter = ToolCallSplitter(prefix=prepared.prefix)
    splitter.feed(prepared.prefix + result.text)
    _, calls, _ = splitter.finish()
    return {"tokens": result.token_ids, "calls": calls, "text": result.text, "seconds": seconds,
            "decode_seconds": result.stats.decode_seconds, "steps": result.stats.steps,
            "output_tokens": len(result.token_ids), "finish": result.finish_reason}


def summarize(rows: list[dict]) -> dict:
    """Valid shares, identical count, decode tokens/s and tokens per step of each mode."""
    modes = ("free", "constrained", "plain")
    decoded = {m: sum(r[m]["output_tokens"] - 1 for r in rows) for m in modes}  # tokens after the first
    return {
        "calls": len(rows),
        "valid_free": sum(r["free"]["valid"] for r in rows) / len(rows),
        "valid_constrained": sum(r["constrained"]["valid"] for r in rows) / len(rows),
        "identical_to_plain": sum(r["identical"] for r in rows),
        "decode_tok_s": {m: round(decoded[m] / max(sum(r[m]["decode_seconds"] for r in rows), 1e-9), 2)
                         for m in modes},
        "tokens_per_step": {m: round(decoded[m] / max(1, sum(r[m]["steps"] for r in rows)), 2) for m in modes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", help="tau-bench JSON file (default: the data folder's, else the sample)")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--report", help="write per-call results and the summary as JSON")
    args = parser.parse_args()
    import jsonschema_rs  # deferred: only this script checks schemas

    data = default_data_dir()
    path = Path(args.path) if args.path else next(
        p for p in (data / "tau_bench" / "gpt-4o-airline.json", data / "tau_bench") if p.exists())
    print(f"data: {path}")
    tools = json.loads(TOOLS.read_text())
    validators = {t["function"]["name"]: jsonschema_rs.validator_for(t["function"]["parameters"]) for t in tools}
    engine = Engine.from_pretrained(store="memory")  # a benchmark keeps nothing in the user's cache
    prompts = forced_calls(path, args.calls, engine.tokenizer, tools, args.max_context)
    rows = []
    for i, (messages, name) in enumerate(prompts):
        order = ("free", "constrained", "plain") if i % 2 == 0 else ("constrained", "free", "plain")
        out = {mode: run(engine, messages, name, tools, mode, args.max_new_tokens) for mode in order}
        for r in out.values():
            calls = r.pop("calls")
            r["valid"] = (len(calls) == 1 and calls[0]["name"] == name
                          and validators[name].is_valid(calls[0]["arguments"]))
            if r["valid"]:
                del r["text"]  # the report keeps the answers that failed, to show why
        same = out["constrained"]["tokens"] == out["plain"]["tokens"]
        rows.append({"tool": name, **{m: {k: v for k, v in r.items() if k != "tokens"} for m, r in out.items()},
                     "identical": same})
        print(f"{i + 1:3d} {name:30s} free {'ok ' if out['free']['valid'] else 'BAD'} constrained "
              f"{'ok ' if out['constrained']['valid'] else 'BAD'} identical {same}  so far: "
              f"{json.dumps(summarize(rows))}", flush=True)
    summary = summarize(rows)

    print(json.dumps(summary, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps({"summary": summary, "calls": rows}, indent=1))


if __name__ == "__main__":
    main()
