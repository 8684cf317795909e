"""Teacher-forced drafting benchmark on the shared data.

python .dev/drafting_sim.py tau|swe [preset] [key=value ...]
presets: reference (SuffixDecoding-like: request + global trees, no policy, no calibration),
         default (SuffixDrafter defaults + LookaheadPolicy on the fp32 curve)
"""
import json
import sys

sys.path.insert(0, ".dev")
from drafting_data import load_benchmark  # noqa: E402

from agentspec.draft.builder import DrafterConfig, SuffixDrafter  # noqa: E402
from agentspec.replay.simulate import simulate_sessions  # noqa: E402

name = sys.argv[1]
preset = sys.argv[2] if len(sys.argv) > 2 else "default"
over = dict(a.split("=", 1) for a in sys.argv[3:])
sessions = load_benchmark(name)
cfg = DrafterConfig()
policy = True
if preset == "reference":
    cfg = DrafterConfig(alpha=1.0, min_prob=0.1, use_session=False, calibrate=False,
                        global_prompt_tail=0)
    policy = False
budget = int(over.pop("budget", 32))
if "rate_scale" in over:  # dev knob: scale the policy's running rate (its drafting threshold)
    from agentspec.lookahead import LookaheadPolicy

    scale = float(over.pop("rate_scale"))

    class ScaledPolicy(LookaheadPolicy):
        @property
        def rate(self) -> float:
            return scale * self._tokens / self._seconds

    policy = ScaledPolicy()
if "policy" in over:
    policy = over.pop("policy") == "1"
for k, v in over.items():
    cur = getattr(cfg, k)
    if isinstance(cur, tuple):
        setattr(cfg, k, tuple(tuple(int(x) for x in lv.split(",") if x) for lv in v.split(";") if lv))
    else:
        setattr(cfg, k, type(cur)(v) if not isinstance(cur, bool) else v == "1")
rep = simulate_sessions(sessions, lambda: SuffixDrafter(cfg), policy=policy, budget=budget)
d = rep.to_dict()
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}))
