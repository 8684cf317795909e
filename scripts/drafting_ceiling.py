"""How far the teacher-forced modelled speedup could go with the default drafter's candidates.

    python scripts/drafting_ceiling.py tau|swe [--data DIR] [--auc]

Reads the recorded trajectories of the teacher-forced benchmarks (``tau``: the first 60
trajectories of ``tau_bench/gpt-4o-airline.json``; ``swe``: every ``swe_agent`` trajectory) from
the data folder (``--data``, else ``$AGENTSPEC_DATA``, else ``../shared/data`` beside the repo) and
prints, on the same stream and cost curve as ``agentspec bench --simulate``:

  policy        the default drafter + lookahead policy (what the benchmark reports);
  first-token   the same steps, but a step whose first drafted token is wrong drafts nothing
                (a perfect "is the first token right" oracle on top of the policy; exact for
                these steps, it ignores that learning would then see fewer misses);
  oracle        re-simulated: every step drafts exactly the path of the candidate tree (budget
                32, before the policy) that the recorded completion accepts, and nothing else;
  no-candidate  steps of the oracle run whose candidate tree holds no right first token.

``--auc`` (needs scikit-learn) adds cross-validated (by session) AUCs of "this first-level node is
accepted": the calibrated estimate alone, gradient boosting on the calibration features, and on
those plus request-context features (position in the completion, recent acceptance, inside a
``` fence, characters since the last newline, call index). Then, on the policy's own steps and
trees, the lookahead re-selects with the online acceptance estimates and with those of a
gradient-boosted model refit on all earlier sessions every few sessions (a nonlinear learner
that only sees the past, as a live engine would); it prints tokens x c(1) / cost of both.
"""

import argparse
from pathlib import Path

from agentspec.draft.base import DraftTree
from agentspec.draft.builder import DrafterConfig, SuffixDrafter
from agentspec.engine.model import load_tokenizer
from agentspec.lookahead import CostCurve, LookaheadPolicy
from agentspec.replay.simulate import accepted_path
from agentspec.replay.trajectories import default_data_dir, load_sessions, tokenize_sessions

BENCHMARKS = {"tau": ("tau_bench/gpt-4o-airline.json", 60), "swe": ("swe_agent", None)}  # path, sessions

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for the rows.")
parser.add_argument("name", choices=sorted(BENCHMARKS), help="the teacher-forced benchmark")
parser.add_argument("--data", type=Path, default=None, help="data folder (default: $AGENTSPEC_DATA or ../shared/data)")
parser.add_argument("--auc", action="store_true", help="acceptance-model AUCs and a re-selection (needs scikit-learn)")
args = parser.parse_args()
name, want_auc = args.name, args.auc
relative, limit = BENCHMARKS[name]
path = (args.data or default_data_dir()) / relative
print(f"reading {path.resolve()}")
sessions = [s for s in tokenize_sessions(load_tokenizer(), load_sessions(path, limit=limit)) if s]
cost = CostCurve()
total_tokens = sum(len(c) for calls in sessions for _, c in calls)  # the tokenised completions end in EOS


def run(oracle: bool):
    """Teacher-forced replay; returns per-step records (policy) or (steps, no-candidate) (oracle)."""
    drafter, policy = SuffixDrafter(DrafterConfig()), LookaheadPolicy(cost)
    steps, no_candidate = [], 0
    for si, calls in enumerate(sessions):
        for ci, (prompt, completion) in enumerate(calls):
            target = [int(t) for t in completion]
            rid = f"{si}-{ci}"
            drafter.start_request(rid, f"s{si}", prompt)
            pos, history = 0, []
            while pos < len(target):
                full = drafter.propose(rid, 32)
                if oracle:
                    path = accepted_path(full, target[pos:])
                    no_candidate += not path
                    tree = full.subtree(path)
                    path = list(range(len(path)))
                else:
                    feats = [tuple(f) for f in drafter._requests[rid].proposal.features] if want_auc else None
                    tree = policy.select(full) if len(full) else full
                    path = accepted_path(tree, target[pos:])
                    steps.append(dict(
                        s=si, c=ci, pos=pos, drafted=len(tree), acc=len(path), history=list(history),
                        done=completion[:pos], full=full, feats=feats,
                        right=set(accepted_path(full, target[pos:])),
                    ))
                    history.append(len(path))
                new = target[pos:pos + len(path) + 1]
                pos += len(new)
                drafter.accept(rid, tree, path, new)
                if oracle:
                    steps.append((len(tree), len(path)))
            drafter.stop_request(rid)
    return (steps, no_candidate) if oracle else steps


def speedup(costs) -> float:
    return total_tokens * cost(1) / sum(costs)


steps = run(oracle=False)
print(f"{name}: {total_tokens:,} completion tokens")
print(f"policy       {len(steps):6,} steps  modelled speedup {speedup(cost(1 + s['drafted']) for s in steps):.3f}")
first = [cost(1 + (s["drafted"] if s["acc"] else 0)) for s in steps]
print(f"first-token  {len(steps):6,} steps  modelled speedup {speedup(first):.3f}")
oracle_steps, no_candidate = run(oracle=True)
oracle_speedup = speedup(cost(1 + d) for d, _ in oracle_steps)
print(f"oracle       {len(oracle_steps):6,} steps  modelled speedup {oracle_speedup:.3f}")
print(f"no-candidate {no_candidate:6,} of the oracle's steps hold no right first token")

if want_auc:
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    tok = load_tokenizer()
    fence = set(tok.encode("```", add_special_tokens=False))
    base, extra, y, groups = [], [], [], []
    for s in steps:
        full, h = s["full"], s["history"]
        if not len(full):
            continue
        recent = 0.0
        for a in h[-8:]:
            recent = 0.7 * recent + 0.3 * min(a, 8)
        tail = tok.decode(s["done"][-12:]) if s["pos"] else ""
        since_newline = len(tail) - tail.rfind("\n") - 1 if "\n" in tail else 99
        context = [min(s["pos"], 200), recent, sum(t in fence for t in s["done"]) % 2, since_newline, s["c"]]
        for i, parent in enumerate(full.parents):
            if parent < 0:
                row = [full.probs[i], *s["feats"][i]]
                base.append(row)
                extra.append(row + context)
                y.append(i in s["right"])
                groups.append(s["s"])
    base, extra, y, groups = np.array(base, float), np.array(extra, float), np.array(y), np.array(groups)

    def cross_validated_auc(x) -> float:
        pred = np.zeros(len(y))
        for fold in range(4):
            test = groups % 4 == fold
            model = HistGradientBoostingClassifier(max_iter=200).fit(x[~test], y[~test])
            pred[test] = model.predict_proba(x[test])[:, 1]
        return roc_auc_score(y, pred)

    print(f"first-level nodes {len(y):,}, accepted {y.mean():.1%}")
    print(f"AUC estimate alone {roc_auc_score(y, base[:, 0]):.3f}, GBDT on calibration features "
          f"{cross_validated_auc(base):.3f}, plus context features {cross_validated_auc(extra):.3f}")

    # Prequential gradient boosting: conditional acceptance of a node whose parent is accepted,
    # the model for sessions [s0, s0 + refit) trained on sessions < s0 only.
    refit = 5 if name == "tau" else 2
    rows, labels, trainable, row_groups, where = [], [], [], [], []
    for k, s in enumerate(steps):
        full = s["full"]
        for i, parent in enumerate(full.parents):
            above = full.probs[parent] if parent >= 0 else 1.0
            rows.append([full.probs[i] / above if above > 0 else 0.0, full.probs[i], *s["feats"][i]])
            labels.append(i in s["right"])  # the accepted path: its nodes' parents are on it too
            trainable.append(parent < 0 or parent in s["right"])  # tested: the parent was accepted
            row_groups.append(s["s"])
            where.append((k, i))
    rows, labels, trainable, row_groups = (np.array(rows, float), np.array(labels), np.array(trainable),
                                           np.array(row_groups))
    conditional = rows[:, 0].copy()  # the online estimate until there is enough history
    for s0 in range(0, len(sessions), refit):
        train = trainable & (row_groups < s0)
        test = (row_groups >= s0) & (row_groups < s0 + refit)
        if train.sum() > 500:
            model = HistGradientBoostingClassifier(max_iter=300).fit(rows[train], labels[train])
            conditional[test] = model.predict_proba(rows[test])[:, 1]
    by_node = dict(zip(where, conditional))

    def reselected_rate(learned: bool) -> float:
        policy, spent, tokens = LookaheadPolicy(cost), 0.0, 0
        for k, s in enumerate(steps):
            full = s["full"]
            probs = list(full.probs)
            if learned:
                for i, parent in enumerate(full.parents):
                    probs[i] = by_node[(k, i)] * (probs[parent] if parent >= 0 else 1.0)
            tree = DraftTree(list(full.tokens), list(full.parents), probs, list(full.sources))
            chosen = policy.select(tree) if len(tree) else tree
            target = sessions[s["s"]][s["c"]][1][s["pos"]:]
            spent += cost(1 + len(chosen))
            tokens += min(len(accepted_path(chosen, target)) + 1, len(target))
        return tokens * cost(1) / spent

    online, learned = reselected_rate(False), reselected_rate(True)
    print(f"re-selected on the policy's steps: online estimates {online:.3f}, prequential GBDT "
          f"(refit every {refit} sessions) {learned:.3f} ({learned / online:.3f}x)")
