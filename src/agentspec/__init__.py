"""agentspec: lossless speculative decoding for LLM agents, drafted from a persistent suffix-tree cache."""

from agentspec.config import SamplingParams, SpeculationConfig
from agentspec.stats import SpecStats

__all__ = ["Engine", "GenerationResult", "SamplingParams", "SpeculationConfig", "SpecStats"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the engine pulls in torch and transformers: import it on first use only
    if name in ("Engine", "GenerationResult"):
        from agentspec import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'agentspec' has no attribute {name!r}")
