"""Store benchmark: append rate, loading and rebuilding a large session, bytes per stored token.

The calls are agent-shaped: each prompt extends the previous prompt and completion with a new
observation, as in a real agent loop; token ids follow a real trajectory when one is given.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from agentspec.draft.builder import SuffixDrafter
from agentspec.sessions import StoreSessions
from agentspec.stores import open_store


@dataclass
class StoreBenchmark:
    url: str
    append_calls: int
    appends_per_second: float
    session_calls: int
    session_tokens: int
    load_seconds: float  # read + decode every call of the large session
    rebuild_seconds: float  # a new process's drafter: load + rebuild the session tree
    global_tokens: int  # output tokens a new process loads into its global tree
    global_seconds: float  # load + rebuild of the global tree (once per process)
    bytes_per_token: float

    def to_dict(self) -> dict:
        return asdict(self)


def agent_calls(total_tokens: int, vocab_sample: Sequence[int], seed: int = 0, output_len: int = 120,
                observation_len: int = 400, window: int = 6000) -> list[tuple[list[int], list[int]]]:
    """Calls whose prompts grow by (completion + observation) until ``window`` tokens, like an agent."""
    rng = random.Random(seed)
    calls, context, stored = [], [rng.choice(vocab_sample) for _ in range(1500)], 0
    while stored < total_tokens:
        output = [rng.choice(vocab_sample) for _ in range(output_len)]
        calls.append((list(context), output))
        stored += len(context) + len(output)
        context = (context + output + [rng.choice(vocab_sample) for _ in range(observation_len)])[-window:]
    return calls


def run(url: str | None = None, append_calls: int = 2000, session_tokens: int = 1_000_000,
        vocab_sample: Sequence[int] | None = None, output_len: int = 120) -> StoreBenchmark:
    """Append ``append_calls`` small calls (rate), then an agent session of ``session_tokens`` tokens
    (``output_len`` output tokens a call), and time how a new process loads it."""

    if url is None:
        url = f"sqlite:///{tempfile.mkdtemp(prefix='agentspec-store-bench-')}/bench.db"
    vocab = list(vocab_sample or range(20, 30000))
    store = open_store(url)
    small = [([random.Random(i).choice(vocab) for _ in range(64)], list(range(32))) for i in range(100)]
    t0 = time.perf_counter()
    for i in range(append_calls):
        prompt, output = small[i % len(small)]
        store.append(f"bench-append-{i % 8}", prompt, output, {"steps": 1}, fingerprint="bench")
    append_rate = append_calls / (time.perf_counter() - t0)
    calls = agent_calls(session_tokens, vocab, output_len=output_len)
    for prompt, output in calls:
        store.append("bench-large", prompt, output, {"steps": 1}, fingerprint="bench")
    t0 = time.perf_counter()
    loaded = store.load_session("bench-large")
    load = time.perf_counter() - t0
    rebuild, global_tokens, global_seconds = rebuild_through_manager(url, "bench-large")
    size, tokens = store.stored_bytes()
    return StoreBenchmark(url, append_calls, append_rate, len(loaded.calls),
                          sum(len(p) + len(o) for p, o in calls), load, rebuild, global_tokens, global_seconds,
                          size / max(tokens, 1))


def rebuild_through_manager(url: str, session: str) -> tuple[float, int, float]:
    """What a fresh process's drafter pays on first use of a store (its first request loads the global
    history, its first request in a session that session's calls):
    ``(session load + rebuild seconds, global tokens, global load + rebuild seconds)``."""

    drafter = SuffixDrafter(history=StoreSessions(open_store(url), "bench"))
    t0 = time.perf_counter()
    drafter.start_request("bench-global", None, [])
    global_seconds = time.perf_counter() - t0
    drafter.stop_request("bench-global")
    global_tokens = drafter._global.num_tokens
    t0 = time.perf_counter()
    drafter.start_request("bench-session", session, [])
    return time.perf_counter() - t0, global_tokens, global_seconds
