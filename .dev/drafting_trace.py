"""Per-step trace of the default drafter + policy (teacher-forced), for offline analysis.

python .dev/drafting_trace.py tau|swe OUT.pkl [key=value ...]

Records per step: the full merged tree (before the policy) with each node's calibration features,
calibrated path probability, whether it lies on the path the recorded completion accepts, and
whether the policy kept it; plus step facts (request position, what the previous step accepted).
"""

import pickle
import sys

sys.path.insert(0, ".dev")
from drafting_data import load_benchmark  # noqa: E402

from agentspec.draft.builder import DrafterConfig, SuffixDrafter  # noqa: E402
from agentspec.lookahead import CostCurve, LookaheadPolicy  # noqa: E402
from agentspec.replay.simulate import accepted_path  # noqa: E402


def _paths(tree):
    out = []
    for t, p in zip(tree.tokens, tree.parents):
        out.append((out[p] if p >= 0 else ()) + (t,))
    return out


name, out = sys.argv[1], sys.argv[2]
over = dict(a.split("=", 1) for a in sys.argv[3:])
sessions = load_benchmark(name)
cfg = DrafterConfig()
for k, v in over.items():
    cur = getattr(cfg, k)
    if isinstance(cur, tuple):
        setattr(cfg, k, tuple(tuple(int(x) for x in lv.split(",") if x) for lv in v.split(";") if lv))
    else:
        setattr(cfg, k, type(cur)(v) if not isinstance(cur, bool) else v == "1")
drafter = SuffixDrafter(cfg)
cost = CostCurve()
policy = LookaheadPolicy(cost)
steps = []
for si, calls in enumerate(sessions):
    for ci, (prompt, completion) in enumerate(calls):
        rid = f"{si}-{ci}"
        drafter.start_request(rid, f"s{si}", prompt)
        pos, prev = 0, None
        while pos < len(completion):
            full = drafter.propose(rid, 32)
            feats = [tuple(f) for f in drafter._requests[rid].proposal.features]
            full_path = accepted_path(full, completion[pos:])
            tree = policy.select(full) if len(full) else full
            sel_path = accepted_path(tree, completion[pos:])
            kept = _paths(tree)
            full_paths = _paths(full)
            steps.append(dict(
                s=si, c=ci, pos=pos, n_full=len(full), n_sel=len(tree), acc=len(sel_path),
                full_acc=len(full_path), tokens=list(full.tokens), parents=list(full.parents),
                probs=list(full.probs), feats=list(feats), on_path=set(full_path),
                selected={i for i, q in enumerate(full_paths) if q in kept},
                prev=prev, next_tokens=completion[pos:pos + 40],
            ))
            new = completion[pos:pos + len(sel_path) + 1]
            pos += len(new)
            drafter.accept(rid, tree, sel_path, new)
            prev = (len(tree), len(sel_path))
        drafter.stop_request(rid)
with open(out, "wb") as f:
    pickle.dump(steps, f)
print(len(steps), "steps")
