"""Plain Hugging Face ``generate``: the baseline every benchmark and the replay tool compare against."""

from __future__ import annotations

import time

import torch


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
    with torch.no_grad():
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


class LlamaCppBaseline:
    """llama.cpp (``llama-cpp-python``, an optional extra) on a GGUF file: the CPU peer a user would
    otherwise pick. It keeps the previous call's KV and re-evaluates only the tokens after the
    longest common prefix (its automatic prefix reuse)."""

    def __init__(self, gguf_path: str, n_ctx: int = 8192, n_threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ImportError("the llama.cpp baseline needs: pip install 'agentspec[llamacpp]'") from exc
        import os

        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                         verbose=False)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]):
        """Greedy: ``(new token ids, decode seconds, total seconds, steps)``."""
        ids: list[int] = []
        t0 = time.perf_counter()
        first = t0
        # generate() re-evaluates only the tokens after the longest prefix shared with its current state
        for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if not ids:
                first = time.perf_counter()
            ids.append(int(token))
            if token in eos_ids or len(ids) >= max_new_tokens:
                break
        end = time.perf_counter()
        return ids, end - first, end - t0, max(len(ids) - 1, 0)


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
