"""The engine: model loading, forward backends, KV caches (a request's and the radix prefix cache),
verification and the generate loop."""

from agentspec.engine.engine import Engine, GenerationResult, GenerationStream
from agentspec.engine.radix import KVPool, PrefixMatch, RadixCache

__all__ = ["Engine", "GenerationResult", "GenerationStream", "KVPool", "PrefixMatch", "RadixCache"]
