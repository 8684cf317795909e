"""Suffix tree micro-benchmark on tau-bench tokens: append, rebuild, memory, speculate.

python .dev/drafting_treebench.py
"""

import statistics
import sys
import time

sys.path.insert(0, ".dev")
from drafting_data import load  # noqa: E402

from agentspec.draft.core import SuffixTree  # noqa: E402

sessions = load("tau", 60)
seqs = [p + c for s in sessions for p, c in s[-1:]] + [c for s in sessions for _, c in s]
n_tok = sum(map(len, seqs))
t = SuffixTree(64)
t0 = time.perf_counter()
for i, s in enumerate(seqs):
    t.extend(i, s)
dt = time.perf_counter() - t0
print(f"append: {n_tok} tokens, {dt / n_tok * 1e6:.2f} us/token, nodes/token {t.num_nodes / n_tok:.2f}, "
      f"bytes/token {t.estimate_memory() / n_tok:.1f}")
dt = float("inf")
for _ in range(3):  # best of 3: the machine is shared
    t0 = time.perf_counter()
    t.rebuild()
    dt = min(dt, time.perf_counter() - t0)
print(f"rebuild: {n_tok / dt / 1e3:.0f}k tokens/s, bytes/token {t.estimate_memory() / n_tok:.1f}")
times = []
for s in sessions[:20]:
    for p, c in s:
        r = SuffixTree(64)
        r.extend(0, p)
        ctx = list(p)
        for tok in c:
            t0 = time.perf_counter()
            r.speculate(ctx, 32, 1.0, 0.0, 0.1)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            t.speculate(ctx, 32, 1.0, 0.0, 0.1)
            times.append(time.perf_counter() - t0)
            r.append(0, tok)
            ctx.append(tok)
print(f"speculate (one tree): median {statistics.median(times) * 1e6:.1f} us, "
      f"p90 {sorted(times)[int(0.9 * len(times))] * 1e6:.1f} us ({len(times)} calls)")
