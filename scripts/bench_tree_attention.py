"""Time one tree-verification step's attention on this machine, backend against backend.

For each context length P and tree size T (tree tokens verified in one step), it times:

* ``agentspec``: :func:`agentspec.kernels.tree_attention`, the backend the engine runs (the Triton
  kernel on a CUDA GPU; on a CPU the compiled kernel, ``AGENTSPEC_CPU_ISA=avx2|avx512`` picking its
  instruction set, or torch's fused kernel where it does not fit);
* ``torch-split``: the torch reference (prefix and tree parts merged by their log-sum-exp);
* ``sdpa-mask``: ``scaled_dot_product_attention`` with the full ``[T, P+T]`` boolean mask, what
  transformers runs when handed a tree mask;
* ``sdpa-nomask``: the same call with no mask (every key visible): not tree attention, but the
  fastest attention torch has over the same bytes, a floor for the others.

Every backend's output is checked against the float64 reference first. Each time is the median of
repeated runs (``triton.testing.do_bench`` on CUDA); the table also gives the KV bytes read per
second. Example::

    python scripts/bench_tree_attention.py --contexts 1k,4k,16k --tree-sizes 1,4,16,64 --report attn.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from agentspec.kernels import dispatch
from agentspec.kernels.attention import kernel_fits, kernel_isa
from agentspec.kernels.reference import expand_tree_mask, masked_attention, split_tree_attention
from rich.console import Console
from rich.table import Table

from agentspec.engine.verify import ancestor_mask

HEADS = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # query heads, kv heads, head dim
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_sizes(text: str) -> list[int]:
    return [int(float(x[:-1]) * 1000) if x.endswith("k") else int(x) for x in text.split(",") if x]


def time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=max(reps, 20), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def backends(q, k, v, tree, p):
    """name -> a call computing the step's attention [B, H, T, D]."""
    b, h, t, _ = q.shape
    n_rep = h // k.shape[1]
    full = expand_tree_mask(tree, b, p)  # [B, 1, T, P+T]
    return {
        "agentspec": lambda: dispatch.tree_attention(q, k, v, tree, p),
        "torch-split": lambda: split_tree_attention(q, k, v, tree, p),
        "sdpa-mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=n_rep > 1),
        "sdpa-nomask": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=n_rep > 1),
    }


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    h, hkv, d = HEADS[args.heads]
    rng = random.Random(0)
    rows = []
    for p in parse_sizes(args.contexts):
        for t in parse_sizes(args.tree_sizes):
            g = torch.Generator().manual_seed(p + t)
            q = torch.randn(1, h, t, d, generator=g).to(device, dtype)
            k, v = (x.to(device, dtype) for x in torch.randn(2, 1, hkv, p + t, d, generator=g))
            parents = [rng.randrange(-1, i) for i in range(t - 1)]  # a random tree of t nodes under node 0
            tree = ancestor_mask(parents).to(device)
            want = masked_attention(q.double(), k.double(), v.double(), tree, p)
            kv_bytes = 2 * hkv * (p + t) * d * k.element_size()
            row = {"context": p, "tree": t, "kv_bytes": kv_bytes}
            for name, fn in backends(q, k, v, tree, p).items():
                out = fn()
                if name != "sdpa-nomask":  # the floor attends to other keys on purpose
                    row[f"{name}_err"] = float((out.double() - want).abs().max())
                ms = time_ms(fn, device, args.reps)
                row[f"{name}_ms"] = ms
                row[f"{name}_gbps"] = kv_bytes / ms / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def others(rows: list[dict]) -> list[str]:
    """The backends timed beside ``agentspec``, in the order they ran."""
    return [key[:-3] for key in rows[0] if key.endswith("_ms") and key != "agentspec_ms"]


def show(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("P", "T", "agentspec ms", *others(rows), "agentspec GB/s", "max err"):
        table.add_column(col, justify="right")
    for r in rows:
        base = r["agentspec_ms"]
        table.add_row(
            str(r["context"]), str(r["tree"]), f"{base:.4f}",
            *(f"{r[f'{n}_ms']:.4f} ({r[f'{n}_ms'] / base:.2f}x)" for n in others(rows)),
            f"{r['agentspec_gbps']:.0f}", f"{r['agentspec_err']:.1e}",
        )
    Console().print(table)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4 * len(contexts), 3.5), squeeze=False)
    for ax, p in zip(axes[0], contexts):
        sel = [r for r in rows if r["context"] == p]
        for name in ("agentspec", *others(rows)):
            ax.plot([r["tree"] for r in sel], [r[f"{name}_ms"] for r in sel], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"context {p}")
        ax.set_xlabel("tree tokens per step")
    axes[0][0].set_ylabel("ms per layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--contexts", default="1k,4k,16k", help="committed prefix lengths P (e.g. 1k,4k,16k)")
    parser.add_argument("--tree-sizes", default="1,4,16,64", help="tree tokens per step T")
    parser.add_argument("--heads", choices=sorted(HEADS), default="smollm2-135m", help="attention shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="q/k/v dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees a GPU)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per point (CPU; do_bench decides on CUDA)")
    parser.add_argument("--report", type=Path, help="write the rows as JSON here")
    parser.add_argument("--plot", type=Path, help="draw time against tree size, one panel per context")
    args = parser.parse_args()
    on_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    name = torch.cuda.get_device_name() if on_cuda else "CPU"
    if on_cuda:
        backend = "triton" if dispatch.triton_available() else "torch reference"
    else:
        probe = torch.zeros(1, 1, 1, HEADS[args.heads][2], dtype=DTYPES[args.dtype])
        backend = f"compiled kernel, {kernel_isa()}" if kernel_fits(probe, probe) else "torch"
    title = f"tree attention, {args.heads} heads, {args.dtype}, {name} (agentspec = {backend})"
    print(title, flush=True)
    rows = run(args)
    show(rows, title)
    if args.report:
        args.report.write_text(json.dumps({"title": title, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, title)
    worst = max(r["agentspec_err"] for r in rows)
    bound = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[args.dtype]
    if not math.isfinite(worst) or worst > bound:
        raise SystemExit(f"agentspec's output is off the float64 reference by {worst:.2e} (> {bound:.0e})")


if __name__ == "__main__":
    main()
