"""Plain Hugging Face ``generate``: the baseline every benchmark and the replay tool compare against."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


@contextmanager
def plain_attention(model, implementation: str = "sdpa"):
    """Run ``model`` with transformers' own attention (the engine may have switched it to tree attention)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield model
    finally:
        model.config._attn_implementation = previous


class _StepTimer:
    """A transformers streamer that records when each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int], **kwargs):
    """Plain HF ``generate`` (greedy): ``(new token ids, decode seconds, total seconds, steps)``."""
    timer = _StepTimer()
    t0 = time.perf_counter()
    with torch.no_grad(), plain_attention(model):
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=sorted(eos_ids),
            pad_token_id=sorted(eos_ids)[0], streamer=timer, **kwargs,
        )
    total = time.perf_counter() - t0
    ids = out[0, len(prompt_ids):].tolist()
    # put() #0 is the prompt, #1 the first token (end of prefill), then one per decode step
    decode = timer.times[-1] - timer.times[1] if len(timer.times) > 2 else 0.0
    return ids, decode, total, max(len(timer.times) - 2, 0)
