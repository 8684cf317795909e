"""agentspec as vLLM's draft source: persistent per-session suffix trees, shared by replicas through one store.

Install with the extra ``agentspec[vllm]`` and pass
``speculative_config={"method": "custom_class", "model": "agentspec.integrations.vllm.AgentSpecProposer",
"num_speculative_tokens": k}``; clients name their session with ``extra_body={"vllm_xargs":
{"agentspec_session": "..."}}``. :mod:`.proposer` drafts, :mod:`.plugin` (the ``vllm.general_plugins``
entry point) tells it which request is which, :mod:`.loader` reads and writes the store off the
critical path, :mod:`.arms` runs recorded calls through one vLLM engine (tests, ``scripts/bench_vllm.py``).
"""

from __future__ import annotations

from agentspec.integrations.vllm.plugin import register
from agentspec.integrations.vllm.proposer import SESSION_KEY, AgentSpecProposer, ProposerSettings, best_path

__all__ = ["SESSION_KEY", "AgentSpecProposer", "ProposerSettings", "best_path", "register"]
