"""What agentspec is compared against, call by call: plain HF greedy ``generate`` (the reference
every benchmark and the replay tool use), HF prompt lookup, llama.cpp, agentspec itself on int8
weights, and agentspec with speculation off (its own gain). :func:`comparison_runner` builds any of
them by name.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from agentspec.engine import Engine
from agentspec.engine.model import resolve_model
from agentspec.replay.report import COMPARISONS

# (prompt ids, session id, max new tokens) -> (new token ids, decode seconds, total seconds, decode steps)
Runner = Callable[[list[int], str, int], tuple[list[int], float, float, int]]


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
            torch.tensor([prompt_ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False,
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

    def __init__(self, gguf_path: str, n_ctx: int = 8192, n_threads: int | None = None,
                 prompt_lookup: int = 0) -> None:
        """``prompt_lookup`` > 0: llama-cpp-python's own prompt-lookup speculation, drafting that many
        tokens from n-gram matches in the context (``LlamaPromptLookupDecoding``)."""
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as exc:
            raise ImportError("the llama.cpp baseline needs: pip install 'agentspec[llamacpp]'") from exc
        self.steps = 0  # decode forwards of the current generate() (counted through the drafter)
        draft = None
        if prompt_lookup:
            baseline = self

            class CountingLookup(LlamaPromptLookupDecoding):
                def __call__(self, input_ids, /, **kwargs):
                    baseline.steps += 1  # llama-cpp-python asks for one draft per decode forward
                    return super().__call__(input_ids, **kwargs)

            draft = CountingLookup(num_pred_tokens=prompt_lookup)
        # with a draft model llama-cpp-python keeps logits of every position, but sizes that buffer by
        # the constructor's logits_all: without it, a prompt longer than one batch (512) fails
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                         draft_model=draft, logits_all=draft is not None, verbose=False)
        self.speculative = draft is not None

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]):
        """Greedy: ``(new token ids, decode seconds, total seconds, steps)``."""
        ids: list[int] = []
        self.steps = 0
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
        steps = max(self.steps - 1, 0) if self.speculative else max(len(ids) - 1, 0)  # after the first token
        return ids, end - first, end - t0, steps


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def comparison_runner(name: str, engine, window: int) -> Runner:
    """A runner for comparison ``name`` (a key of :data:`COMPARISONS`) beside ``engine``.

    ``hf`` and ``hf_pld`` (prompt lookup, 10 tokens) run HF ``generate`` on the engine's own
    model; ``llamacpp`` loads the engine's GGUF file into llama.cpp with a ``window``-token
    context, ``llamacpp_pld`` the same with llama-cpp-python's prompt-lookup speculation (10 tokens);
    ``agentspec_int8`` is a second engine on the same weights with int8 linear layers and
    ``hf_int8`` plain HF greedy on that int8 model (the reference agentspec_int8 must equal);
    ``agentspec_nospec`` is the engine decoding one token per step, as a tenant so that its prefix
    cache never serves agentspec's run of the same prompt.
    """
    if name == "agentspec_nospec":  # a tenant: the same weights and forward, its own prefix-cache namespace
        plain = engine.for_tenant("speculation-off")
        return lambda ids, session, n: _engine_run(plain, ids, None, n, speculate=False)
    if name == "hf":
        return lambda ids, session, n: hf_generate(engine.model, ids, n, engine.eos_ids)
    if name == "hf_pld":
        return lambda ids, session, n: hf_generate(engine.model, ids, n, engine.eos_ids, prompt_lookup_num_tokens=10)
    if name in ("llamacpp", "llamacpp_pld"):
        source = resolve_model(engine.model_source)
        if not source.is_gguf:
            raise ValueError("the llama.cpp baseline needs a GGUF model (the default one is)")
        llm = LlamaCppBaseline(str(source.path), n_ctx=window, prompt_lookup=10 if name == "llamacpp_pld" else 0)
        return lambda ids, session, n: llm.generate(ids, n, engine.eos_ids)
    if name in ("agentspec_int8", "hf_int8"):
        int8 = _int8_engine(engine)
        if name == "hf_int8":
            return lambda ids, session, n: hf_generate(int8.model, ids, n, int8.eos_ids)
        return lambda ids, session, n: _engine_run(int8, ids, session, n)
    raise ValueError(f"unknown comparison {name!r}; expected one of {sorted(COMPARISONS)}")


_INT8_ENGINES: dict[str, Any] = {}  # model source -> its int8 engine, built once per process


def _int8_engine(engine):
    """A second engine on ``engine``'s weights with int8 linear layers (sessions in memory), built once."""
    if engine.device.type != "cpu":
        raise ValueError("int8 weights run on the CPU only")
    if engine.model_source not in _INT8_ENGINES:
        _INT8_ENGINES[engine.model_source] = Engine.from_pretrained(
            engine.model_source, quantize="int8", speculation=engine.speculation, store="memory")
    return _INT8_ENGINES[engine.model_source]


def _engine_run(engine, prompt_ids: list[int], session: str | None, max_new_tokens: int, **kwargs: Any):
    t0 = time.perf_counter()
    out = engine.generate(prompt_ids, session=session, max_new_tokens=max_new_tokens, **kwargs)
    total = time.perf_counter() - t0
    return out.token_ids, out.stats.decode_seconds, total, out.stats.steps
