"""Throw-away loader for the drafting benchmark until agentspec.trajectories lands.

Sessions = lists of (prompt_ids, completion_ids); tokenised once and cached under /tmp.
Usage: python .dev/drafting_data.py  (prints counts)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from agentspec.chat import assistant_text, prompt_ids
from agentspec.model import load_tokenizer

DATA = Path("/work/shared/data")
CACHE = Path("/tmp/agentspec_drafting_cache")


def _calls(messages: list[dict]) -> list[tuple[list[dict], dict]]:
    return [(messages[:i], m) for i, m in enumerate(messages) if m.get("role") == "assistant" and i > 0]


def _encode(tok, sessions_msgs) -> list[list[tuple[list[int], list[int]]]]:
    eos = tok.eos_token_id
    out = []
    for calls in sessions_msgs:
        sess = []
        for prompt, msg in calls:
            completion = tok.encode(assistant_text(msg), add_special_tokens=False) + [eos]
            sess.append((prompt_ids(tok, prompt), completion))
        if sess:
            out.append(sess)
    return out


def load(name: str, limit: int | None = None):
    """``tau`` (first ``limit`` trajectories of gpt-4o-airline.json) or ``swe`` (all .traj)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{name}-{limit}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    tok = load_tokenizer()
    if name == "tau":
        trajs = json.loads((DATA / "tau_bench/gpt-4o-airline.json").read_text())[:limit]
        msgs = [_calls(t["traj"]) for t in trajs]
    elif name == "swe":
        msgs = []
        for f in sorted((DATA / "swe_agent").glob("*.traj")):
            hist = json.loads(f.read_text()).get("history", [])
            msgs.append(_calls(hist))
    else:
        raise ValueError(name)
    sessions = _encode(tok, msgs)
    path.write_bytes(pickle.dumps(sessions))
    return sessions


if __name__ == "__main__":
    for name, limit in (("tau", 60), ("swe", None)):
        s = load(name, limit)
        print(name, len(s), "sessions", sum(len(x) for x in s), "calls",
              sum(len(c) for x in s for _, c in x), "completion tokens",
              sum(len(p) for x in s for p, _ in x), "prompt tokens")
