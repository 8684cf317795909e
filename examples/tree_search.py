"""Tree search with agentspec: 8 trajectories of one prompt sharing one KV tree, ranked by a checker.

    python examples/tree_search.py

The scorer here is a program (does the newest step end in a number?); any callable
``scorer(prompt, steps) -> float`` works: a process reward model, a validator, a test runner.
"""

from __future__ import annotations

import re

from agentspec import Engine


def ends_in_number(prompt: str, steps: list[str]) -> float:
    """1.0 when the newest step ends with a number, else 0.0."""
    return 1.0 if re.search(r"\d\s*\.?\s*$", steps[-1]) else 0.0


def main() -> None:
    engine = Engine.from_pretrained()
    prompt = "What is 27 + 48? Think step by step, then give the number."
    for scorer in (None, ends_in_number):  # None: the model's own mean token log-probability
        result = engine.search(prompt, width=8, policy="ets", scorer=scorer, max_new_tokens=64, max_step_tokens=32,
                               seed=0)
        s = result.stats
        name = getattr(scorer, "__name__", "mean log-probability")
        print(f"scorer {name}: best answer (score {result.best.score:.2f})")
        print(" ", result.best.text.strip().replace("\n", "\n  "))
        print(f"  KV held: peak {s.kv_peak_tokens} tokens (one copy per trajectory: {s.copy_peak_tokens}); "
              f"{s.generated_tokens} tokens in {s.forwards} forwards, {s.accepted_draft_tokens} from drafts, "
              f"{s.tokens_per_second:.1f} tokens/s\n")


if __name__ == "__main__":
    main()
