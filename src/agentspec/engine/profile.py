"""Where a verification step goes: time and bytes read per part of the lean forward, against the
machine's memory bandwidth (``agentspec bench --profile``).

For each context length ``P`` and tree size ``k`` (a chain of ``k`` tokens, as
:meth:`agentspec.engine.Engine.forward_cost` times it) the step is run two ways over the same KV:

* the engine's own verification forward (:class:`agentspec.engine.forward.LeanForward`), fastest
  of ``repeats``: the *step* time;
* the same forward's code with a clock at its laps (``LlamaStepForward._run(..., lap=...)``), so each
  part's time is wall time including its own dispatch (each part's fastest over the repeats, so that
  a run preempted on a busy machine inflates nothing; its logits equal the step's, a test pins that):

  =============  ==============================================================================
  matmul         the decoder's linear layers (q/k/v, o, gate/up, down): GGUF blocks or fp32
  head           the output projection (the largest matrix of a small model)
  attention      the attention call over ``P + k`` keys per layer (and the tree mask, where torch runs it)
  kv_write       copying the step's keys and values into the cache (where a kernel call rotates and
                 writes them at once, that call is charged to rotary)
  norm           RMSNorm, twice per layer and once at the end
  rotary         cos/sin for the positions and the rotation of q and k
  elementwise    embedding lookup, SiLU x up, residual adds
  glue           Python between the parts (views, splits, transposes, loop)
  =============  ==============================================================================

Bytes read: weights as stored (packed blocks where the kernel reads blocks, else the fp32
matrix), KV as ``(P + k) x layers x kv heads x head dim x 2 x bytes per value``, activations for
the element-wise parts. The *floor* of a step is its bytes divided by the bandwidth measured in
the same run (a streaming ``torch.sum`` over a buffer far larger than the caches, fastest of
several). ``dispatch`` estimates the framework's share: top-level torch ops per step (counted
with ``torch.profiler``) times the cost of one trivial op; it is spread over the parts above.
The KV cache is filled with random values: attention costs the same whatever they are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentspec.engine.cpu_fast import blocks_fit, fast_linears
from agentspec.engine.forward import LeanForward
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.step_forward import LlamaStepForward
from agentspec.engine.verify import ancestor_mask

PARTS = ("matmul", "head", "attention", "kv_write", "norm", "rotary", "elementwise", "glue")
DEFAULT_CONTEXTS = (1000, 3000, 6000)
DEFAULT_TREE_SIZES = (1, 4, 8, 16)
MiB = 1 << 20


@dataclass
class StepProfile:
    """One verification step of ``tree`` tokens after ``context`` cached ones."""

    context: int
    tree: int
    step_seconds: float  # the engine's forward + output head, fastest of the repeats
    parts: dict[str, float]  # seconds per part (:data:`PARTS`): each part's fastest over the timed repeats
    bytes: dict[str, int]  # bytes read per part
    ops: int  # top-level torch ops dispatched by one step
    dispatch_seconds: float  # ops x the cost of one trivial op (already inside the parts)
    floor_seconds: float  # bytes read / measured bandwidth

    @property
    def bytes_read(self) -> int:
        return sum(self.bytes.values())

    @property
    def over_floor(self) -> float:
        return self.step_seconds / self.floor_seconds if self.floor_seconds else 0.0


@dataclass
class ProfileReport:
    """Per-step profiles of one engine plus the machine figures they are measured against."""

    bandwidth: float  # bytes per second, streaming read
    op_seconds: float  # one trivial torch op, dispatch included
    threads: int
    steps: list[StepProfile] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def step(self, context: int, tree: int) -> StepProfile | None:
        return next((s for s in self.steps if s.context == context and s.tree == tree), None)

    def to_dict(self) -> dict:
        steps = [asdict(s) | {"bytes_read": s.bytes_read, "over_floor": s.over_floor} for s in self.steps]
        return {"bandwidth_bytes_per_second": self.bandwidth, "op_seconds": self.op_seconds,
                "threads": self.threads, "info": self.info, "steps": steps}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def render(self):
        """A rich table: one row per (context, tree size), milliseconds per part."""
        from rich.table import Table

        table = Table(title=f"verification step profile: {self.info.get('model', 'model')}, {self.threads} threads, "
                            f"memory bandwidth {self.bandwidth / 1e9:.1f} GB/s",
                      caption="ms per step; parts from the same forward timed at its laps (each part's "
                              "fastest of the repeats); dispatch = "
                              "torch ops x one trivial op, spread over the parts; floor = bytes read / bandwidth")
        columns = ["context", "tree", "step ms", "vs tree 1", *PARTS, "dispatch", "MB read", "floor ms", "step/floor"]
        for col in columns:
            table.add_column(col.replace("_", " "), justify="right")
        for s in self.steps:
            one = self.step(s.context, 1)
            ratio = f"{s.step_seconds / one.step_seconds:.2f}x" if one else "-"
            table.add_row(
                f"{s.context:,}", str(s.tree), f"{s.step_seconds * 1e3:.1f}", ratio,
                *(f"{s.parts[p] * 1e3:.1f}" for p in PARTS), f"{s.dispatch_seconds * 1e3:.1f}",
                f"{s.bytes_read / 1e6:.0f}", f"{s.floor_seconds * 1e3:.1f}", f"{s.over_floor:.1f}x",
            )
        return table


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a streaming read: ``torch.sum`` over ``nbytes`` of fp32, fastest of ``repeats``."""
    buf = torch.ones(max(nbytes // 4, 1))
    best = _fastest(lambda: buf.sum(), repeats)
    return buf.numel() * 4 / best


def op_seconds(repeats: int = 5, calls: int = 2000) -> float:
    """Seconds of one trivial torch op (an add of two 1-element tensors): the dispatch cost per op."""
    a, b = torch.ones(1), torch.ones(1)

    def run() -> None:
        for _ in range(calls):
            torch.add(a, b)

    return _fastest(run, repeats) / calls


def profile_steps(
    engine, contexts: Sequence[int] = DEFAULT_CONTEXTS, tree_sizes: Sequence[int] = DEFAULT_TREE_SIZES, *,
    repeats: int = 7, bandwidth: float | None = None, bandwidth_bytes: int = 1 << 30,
    on_step: Callable[[StepProfile], None] | None = None,
) -> ProfileReport:
    """Profile verification steps of ``engine`` (a CPU Llama with the lean forward) at each
    context length and tree size; ``bandwidth`` (bytes/s) skips the measurement (tests)."""
    forward = engine.forward
    if not isinstance(forward, LeanForward):
        raise ValueError(f"the step profile needs the lean CPU forward (a Llama, Qwen2 or Qwen3 on a CPU); "
                         f"this engine runs {getattr(forward, 'name', type(forward).__name__)!r}")
    report = ProfileReport(bandwidth or memory_bandwidth(bandwidth_bytes), op_seconds(), torch.get_num_threads(),
                           info={"model": getattr(engine, "model_name", "model"), "repeats": repeats,
                                 "matmul": forward.matmul, "kv_dtype": str(getattr(engine, "kv_dtype", None)),
                                 "load_before": machine_load()})
    vocab = engine.model.config.vocab_size
    for context in contexts:
        cache = _random_cache(forward.step, context, max(tree_sizes), getattr(engine, "kv_dtype", None))
        for k in tree_sizes:
            ids = torch.randint(3, vocab, (k,))
            positions = torch.arange(context, context + k)
            mask = ancestor_mask(list(range(-1, k - 2)))  # a chain: root, then k - 1 drafts
            profile = _profile_one(forward, ids, positions, mask, cache, repeats, report)
            report.steps.append(profile)
            if on_step:
                on_step(profile)
    report.info["load_after"] = machine_load()
    return report


def _profile_one(forward: LeanForward, ids, positions, mask, cache: TreeKVCache, repeats: int,
                 report: ProfileReport) -> StepProfile:
    context, k = cache.length, ids.shape[0]
    step, head = forward.step, forward.head

    def real() -> None:
        forward.verify(ids, positions, mask, cache)
        cache.truncate(context)

    real()  # warm-up
    step_seconds = _fastest(real, repeats)
    best = dict.fromkeys(PARTS, float("inf"))
    for _ in range(repeats):  # each part's fastest: a run preempted on a busy machine inflates one part only
        clock = _Clock()
        with torch.no_grad(), fast_linears(forward.matmul):
            timed_step(step, head, ids, positions, mask, cache, clock)
        cache.truncate(context)
        best = {part: min(best[part], clock.parts[part]) for part in PARTS}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        real()
    ops = sum(1 for event in prof.events() if event.cpu_parent is None)
    with fast_linears(forward.matmul):  # which layers read blocks depends on the mode
        nbytes = step_bytes(step, head, context, k, cache)
    return StepProfile(context, k, step_seconds, best, nbytes, ops, ops * report.op_seconds,
                       sum(nbytes.values()) / report.bandwidth)


class _Clock:
    """Charges the time since the previous charge to a part."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] += now - self.last
        self.last = now


def timed_step(step: LlamaStepForward, head, ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
               cache: TreeKVCache, clock: _Clock) -> torch.Tensor:
    """``head(step(ids, positions, tree_mask, cache))`` with each part charged to ``clock`` (the
    forward's own code, timed at its laps): logits ``[k, vocab]`` (fp32), the step's KV written to ``cache``."""
    attend = step.tree_attention(tree_mask, cache.length)
    clock.lap("attention")
    hidden = step._run(ids, positions, cache, attend, lap=clock.lap)
    logits = head(hidden).float()
    clock.lap("head")
    return logits


def step_bytes(step: LlamaStepForward, head, context: int, k: int, cache: TreeKVCache) -> dict[str, int]:
    """Bytes read per part by a step of ``k`` tokens after ``context`` cached ones."""
    first = step.layers[0]
    attn, mlp = first.self_attn, first.mlp
    hidden, inter = attn.q_proj.in_features, mlp.gate_proj.out_features
    heads, kv_heads = attn.q_proj.out_features // step.head_dim, attn.k_proj.out_features // step.head_dim
    n_layers, f32 = len(step.layers), 4
    fused = blocks_fit(k)
    matmul = 0
    for i, layer in enumerate(step.layers):
        a, m = layer.self_attn, layer.mlp
        qkv = step.qkv[i].nbytes() if fused and step.qkv[i] is not None else sum(
            _linear_bytes(p, k) for p in (a.q_proj, a.k_proj, a.v_proj))
        gate_up = step.gate_up[i].nbytes() if fused and step.gate_up[i] is not None else sum(
            _linear_bytes(p, k) for p in (m.gate_proj, m.up_proj))
        matmul += qkv + gate_up + _linear_bytes(a.o_proj, k) + _linear_bytes(m.down_proj, k)
    kv_value = cache.layers[0]._k.element_size() if cache.layers[0].is_initialized else f32
    kv_row = n_layers * kv_heads * step.head_dim * 2 * kv_value  # one position's keys and values, all layers
    return {
        "matmul": matmul,
        "head": _linear_bytes(head, k),
        "attention": (context + k) * kv_row + n_layers * k * heads * step.head_dim * f32,
        "kv_write": k * kv_row,
        "norm": (2 * n_layers + 1) * (k + 1) * hidden * f32,
        "rotary": n_layers * k * (heads + kv_heads) * step.head_dim * 2 * f32,
        "elementwise": k * hidden * f32 + n_layers * k * (3 * inter + 4 * hidden) * f32,
        "glue": 0,
    }


def _linear_bytes(module: torch.nn.Module, rows: int) -> int:
    """Bytes of weight a linear layer (or output head) reads for ``rows`` input rows."""
    blocks = getattr(module, "blocks", None)
    if blocks is not None and blocks_fit(rows):
        return blocks.nbytes()
    module = getattr(module, "fallback", module)  # BlockHead: the fp32 path for long inputs
    weight = getattr(module, "weight", None)
    if weight is None:  # PackedLinear: oneDNN's copy of an fp32 weight
        weight = module.inner.weight
    return weight.numel() * 4 if weight.is_mkldnn else weight.numel() * weight.element_size()


def _random_cache(
    step: LlamaStepForward, context: int, room: int, kv_dtype: torch.dtype | None = None
) -> TreeKVCache:
    """A cache of ``context`` positions of random keys and values (the cost does not depend on them)."""
    attn = step.layers[0].self_attn
    kv_heads = attn.k_proj.out_features // step.head_dim
    dtype = step.embed.weight.dtype
    cache = TreeKVCache(len(step.layers), capacity=context + room, dtype=kv_dtype)
    for layer in cache.layers:
        layer.update(torch.randn(1, kv_heads, context, step.head_dim, dtype=dtype),
                     torch.randn(1, kv_heads, context, step.head_dim, dtype=dtype))
    return cache


def _fastest(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def parse_sizes(spec: str) -> list[int]:
    """``'1000,3k,6k'`` -> ``[1000, 3000, 6000]`` (positive integers; ``k`` = thousand)."""
    sizes = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        value = int(float(item[:-1]) * 1000) if item.endswith("k") else int(item)
        if value <= 0:
            raise ValueError(f"sizes must be positive, got {item!r} in {spec!r}")
        sizes.append(value)
    if not sizes:
        raise ValueError(f"no sizes in {spec!r}")
    return sizes


def machine_load() -> str:
    """The 1-minute load average and the cores (a load above the cores makes timings noisy)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"
