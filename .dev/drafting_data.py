"""Tokenised sessions for the drafting dev scripts, through agentspec.replay.trajectories (the one parser).

Sessions = lists of (prompt_ids, completion_ids); tokenised once and cached under /tmp.
Usage: python .dev/drafting_data.py  (prints counts)
"""

from __future__ import annotations

import pickle
from pathlib import Path

from agentspec.engine.model import load_tokenizer
from agentspec.replay.trajectories import default_data_dir, load_sessions, tokenize_sessions

CACHE = Path("/tmp/agentspec_drafting_cache")
SOURCES = {"tau": "tau_bench/gpt-4o-airline.json", "swe": "swe_agent"}
BENCHMARK_LIMITS = {"tau": 60, "swe": None}  # the teacher-forced benchmarks: first 60 tau, all SWE


def load(name: str, limit: int | None = None):
    """``tau`` (first ``limit`` trajectories of gpt-4o-airline.json) or ``swe`` (all .traj)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"v2-{name}-{limit}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    sessions = tokenize_sessions(load_tokenizer(), load_sessions(default_data_dir() / SOURCES[name], limit=limit))
    sessions = [s for s in sessions if s]
    path.write_bytes(pickle.dumps(sessions))
    return sessions


def load_benchmark(name: str):
    """The sessions of the teacher-forced benchmark ``name`` (``tau`` or ``swe``)."""
    return load(name, BENCHMARK_LIMITS[name])


if __name__ == "__main__":
    for name, limit in BENCHMARK_LIMITS.items():
        s = load(name, limit)
        print(name, len(s), "sessions", sum(len(x) for x in s), "calls",
              sum(len(c) for x in s for _, c in x), "completion tokens",
              sum(len(p) for x in s for p, _ in x), "prompt tokens")
