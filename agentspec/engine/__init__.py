"""The engine: model loading, KV caches, the verification forward and the generate loop."""

from agentspec.engine.engine import Engine, GenerationResult, GenerationStream

__all__ = ["Engine", "GenerationResult", "GenerationStream"]
