"""Replay recorded agent sessions on vLLM in four arms and compare them (the agentspec[vllm] integration).

Arms, each a fresh engine in its own process (``python -m agentspec.integrations.vllm.arms``):

* ``none``            -- no speculation; its outputs are the reference, and are recorded to the store;
* ``suffix``          -- vLLM's own suffix decoding, cold (a new process, an empty in-memory tree);
* ``agentspec-cold``  -- the agentspec proposer over an empty store (the live session only);
* ``agentspec``       -- the agentspec proposer over the store the ``none`` arm wrote: the session's
  history persisted, as after a restart or on another replica.

Per arm: mean accepted draft tokens per step (a step yields its accepted tokens plus one), decode
tokens/s (first token to last), whether every output equals the ``none`` arm's, and the same
tokens-per-step figure over the 2nd and later calls of each session. The agentspec arms add the
proposer's own cost per step (p50/p99, timed inside ``propose``). Prompts are the recorded calls
under the model's chat template (oldest turns dropped to fit ``--max-prompt-tokens``); greedy decoding.

    python scripts/bench_vllm.py $AGENTSPEC_DATA --calls 4 --max-new-tokens 64 --out vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from agentspec.integrations.vllm.arms import export_for_vllm

from agentspec.engine.model import load_tokenizer, materialize, resolve_model
from agentspec.replay.trajectories import load_sessions, tokenize_call

ARMS = ("none", "suffix", "agentspec-cold", "agentspec")
SOURCES = (("tau", "tau_bench"), ("swe", "swe_agent"))  # the first session of each


def session_calls(data: Path, tokenizer, calls: int, max_prompt: int, max_new: int) -> list[dict]:
    """The first ``calls`` calls of the first tau-bench and the first SWE-agent session, as arm calls."""
    out = []
    for name, folder in SOURCES:
        session = load_sessions(data / folder, limit=1)[0]
        kept = 0
        for call in session.calls:
            tokens = tokenize_call(tokenizer, call, max_prompt)
            if tokens is None:
                continue
            out.append({"session": f"{name}-0", "prompt_ids": tokens[0], "max_tokens": max_new})
            kept += 1
            if kept == calls:
                break
    return out


def run(python: str, spec: dict, folder: Path) -> dict:
    path = folder / f"{spec['arm']}-{len(list(folder.iterdir()))}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([python, "-m", "agentspec.integrations.vllm.arms", str(path)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        sys.exit(f"arm {spec['arm']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(result: dict, reference: dict, sessions: list[str]) -> dict:
    """Tokens per step overall and on each session's 2nd and later calls; decode speed; equality.

    A call's decoding steps are its model steps less its prefill steps, which the ``none`` arm gives
    (same prompts, same prefix cache, one token per decoding step): accepted tokens per step =
    (output tokens - 1) / decoding steps - 1."""
    def rates(indices: list[int]) -> float:
        tokens = steps = 0
        for i in indices:
            call, plain = result["calls"][i], reference["calls"][i]
            prefill = plain["steps"] - (len(plain["output_ids"]) - 1)
            tokens += len(call["output_ids"]) - 1
            steps += call["steps"] - prefill
        return tokens / steps - 1 if steps else 0.0

    seen, later = set(), []
    for i, session in enumerate(sessions):
        if session in seen:
            later.append(i)
        seen.add(session)
    calls = result["calls"]
    decoded = sum(max(len(c["output_ids"]) - 1, 0) for c in calls)
    seconds = sum(c["decode_seconds"] for c in calls)
    summary = {
        "accepted_per_step": rates(list(range(len(calls)))),
        "accepted_per_step_later_calls": rates(later),
        "decode_tokens_per_s": decoded / seconds if seconds else 0.0,
        "output_tokens": sum(len(c["output_ids"]) for c in calls),
        "identical_to_none": [c["output_ids"] for c in calls] == [c["output_ids"] for c in reference["calls"]],
    }
    if result.get("proposer"):
        summary.update(result["proposer"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the recorded data set (AGENTSPEC_DATA)")
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: agentspec's default model)")
    parser.add_argument("--python", default=".venv-vllm/bin/python", help="the interpreter with vLLM installed")
    parser.add_argument("--calls", type=int, default=4, help="calls per session")
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--arms", default=",".join(ARMS), help="which arms (none is always run: the reference)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model_dir = materialize(resolve_model(args.model))
    tokenizer = load_tokenizer(args.model)
    calls = session_calls(args.data, tokenizer, args.calls, args.max_prompt_tokens, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        vllm_model = export_for_vllm(model_dir, folder / "model")
        specs = folder / "specs"
        specs.mkdir()
        base = {"model": str(vllm_model), "calls": calls, "num_speculative_tokens": args.num_speculative_tokens,
                "max_model_len": args.max_prompt_tokens + args.max_new_tokens + 16, "dtype": args.dtype}
        warm, cold = f"sqlite:///{folder / 'warm.db'}", f"sqlite:///{folder / 'cold.db'}"
        arm_specs = {
            "none": {**base, "arm": "none", "store_url": warm, "record": True},
            "suffix": {**base, "arm": "suffix"},
            "agentspec-cold": {**base, "arm": "agentspec", "store_url": cold},
            "agentspec": {**base, "arm": "agentspec", "store_url": warm},
        }
        results: dict[str, dict] = {}
        for arm in ["none", *(a for a in args.arms.split(",") if a != "none")]:
            results[arm] = run(args.python, arm_specs[arm], specs)
            print(arm, f"{results[arm]['seconds']:.0f} s", file=sys.stderr, flush=True)
    sessions = [c["session"] for c in calls]
    report = {"calls": len(calls), "prompt_tokens": [len(c["prompt_ids"]) for c in calls],
              "arms": {arm: summarize(r, results["none"], sessions) for arm, r in results.items()}}
    arms = report["arms"]
    for arm in ("agentspec", "agentspec-cold"):
        if "suffix" in arms and arm in arms and arms["suffix"]["accepted_per_step_later_calls"]:
            report[f"{arm}_over_suffix_later_calls"] = (arms[arm]["accepted_per_step_later_calls"]
                                                        / arms["suffix"]["accepted_per_step_later_calls"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
