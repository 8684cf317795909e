"""Run recorded calls through one vLLM engine, in one of three arms, and measure them.

Arms: ``none`` (no speculation), ``suffix`` (vLLM's own suffix decoding, a cold in-memory tree), and
``agentspec`` (:class:`AgentSpecProposer`, drafting from the store). Calls run one after another, as
an agent makes them; each gets greedy decoding and its session id in ``vllm_xargs``. The engine
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the proposer's own timings can be
read back. One engine per process: tests and ``scripts/bench_vllm.py`` start one process per arm::

    python -m agentspec.integrations.vllm.arms spec.json     # prints one JSON line (ArmResult)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentspec.integrations.vllm.proposer import SESSION_KEY, fingerprint_of
from agentspec.stores import open_store
from safetensors.torch import load_file, save_file

from agentspec.sessions import StoreSessions
from agentspec.stats import SpecStats

ARMS = ("none", "suffix", "agentspec")
PROPOSER = "agentspec.integrations.vllm.AgentSpecProposer"
ACCEPTED_METRIC = "vllm:spec_decode_num_accepted_tokens"


@dataclass
class ArmSpec:
    """One arm's run: the model folder, the calls (``{"session", "prompt_ids", "max_tokens"}``, optionally
    ``"ignore_eos"``) and the engine."""

    model: str
    arm: str
    calls: list[dict]
    num_speculative_tokens: int = 8
    max_model_len: int = 4096
    dtype: str = "float32"
    store_url: str | None = None  # the agentspec arm's store (AGENTSPEC_VLLM_STORE)
    record: bool = False  # write each finished call to ``store_url`` under its session (for the ``none`` arm)
    load_wait_s: float = 0.0  # the agentspec arm: a prefill step may wait this long for its session (tests)


@dataclass
class CallResult:
    output_ids: list[int]
    accepted: int  # draft tokens vLLM accepted for this call (also those past max_tokens, then dropped)
    steps: int  # model steps the call took, its prefill included
    decode_seconds: float  # first token to last


@dataclass
class ArmResult:
    arm: str
    calls: list[CallResult] = field(default_factory=list)
    proposer: dict[str, float] | None = None  # AgentSpecProposer.summary() (the agentspec arm)


def speculative_config(arm: str, k: int) -> dict | None:
    """vLLM's ``speculative_config`` for ``arm``."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if arm == "none":
        return None
    if arm == "suffix":
        return {"method": "suffix", "num_speculative_tokens": k}
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": k}


def run_arm(spec: ArmSpec) -> ArmResult:
    """Run ``spec.calls`` in order through a fresh engine and measure each."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker in this process (its proposer)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # pinned spinning threads crawl on a shared CPU
    if spec.store_url:
        os.environ["AGENTSPEC_VLLM_STORE"] = spec.store_url
    os.environ["AGENTSPEC_VLLM_LOAD_WAIT_S"] = str(spec.load_wait_s)
    from vllm import LLM, SamplingParams  # the optional dependency
    from vllm.inputs import TokensPrompt

    llm = LLM(spec.model, max_model_len=spec.max_model_len, dtype=spec.dtype, enforce_eager=True, seed=0,
              speculative_config=speculative_config(spec.arm, spec.num_speculative_tokens), disable_log_stats=False)
    steps = count_steps(llm)
    recorder = StoreSessions(open_store(spec.store_url), fingerprint_of(spec.model)) if spec.record else None
    result = ArmResult(spec.arm)
    for call in spec.calls:
        params = SamplingParams(temperature=0.0, max_tokens=call["max_tokens"],
                                ignore_eos=call.get("ignore_eos", False), extra_args={SESSION_KEY: call["session"]})
        before, steps_before = _accepted(llm), steps[0]
        out = llm.generate(TokensPrompt(prompt_token_ids=call["prompt_ids"]), params, use_tqdm=False)[0]
        ids = list(out.outputs[0].token_ids)
        metrics = out.metrics
        decode = (metrics.last_token_ts - metrics.first_token_ts) if metrics is not None else float("nan")
        result.calls.append(CallResult(ids, _accepted(llm) - before, steps[0] - steps_before, decode))
        if recorder is not None:
            recorder.record(call["session"], call["prompt_ids"], ids, SpecStats())
    if spec.arm == "agentspec":
        result.proposer = llm.collective_rpc(_proposer_summary)[0]
    return result


def export_for_vllm(model_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """A copy of a Hugging Face folder that vLLM loads: transformers saves tied embeddings once, under
    ``lm_head.weight``, and vLLM's Llama skips that name when tied, leaving ``embed_tokens`` unloaded."""
    source, target = Path(model_dir), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            shutil.copy(item, target / item.name)
    weights = load_file(source / "model.safetensors")
    if "model.embed_tokens.weight" not in weights and "lm_head.weight" in weights:
        weights["model.embed_tokens.weight"] = weights.pop("lm_head.weight")
    save_file(weights, target / "model.safetensors")
    return target


def _accepted(llm: Any) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == ACCEPTED_METRIC))


def count_steps(llm: Any) -> list[int]:
    """A counter (``[n]``) of the model steps the engine runs from now: its scheduler's outputs that schedule
    tokens (the engine in this process). A step yields each decoding request its accepted drafts plus one."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    schedule, counter = scheduler.schedule, [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        output = schedule(*args, **kwargs)
        counter[0] += output.total_num_scheduled_tokens > 0
        return output

    scheduler.schedule = counted
    return counter


def _proposer_summary(worker: Any) -> dict[str, float]:
    """Runs in the worker: waits for the store thread's writes, then the proposer's summary."""
    proposer = worker.model_runner.drafter
    proposer.loader.flush()
    return proposer.summary()


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        spec = ArmSpec(**json.load(f))
    started = time.perf_counter()
    result = run_arm(spec)
    print(json.dumps({**asdict(result), "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
