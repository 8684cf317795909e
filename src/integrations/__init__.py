"""Integrations: the LangChain chat model and the OpenAI-compatible server.

Both import their framework on first use: ``from agentspec.integrations import ChatAgentSpec``
needs langchain-core, ``create_app`` needs the ``server`` extra (fastapi, uvicorn, prometheus-client).
"""

from __future__ import annotations

__all__ = ["ChatAgentSpec", "create_app"]


def __getattr__(name: str):
    if name == "ChatAgentSpec":
        from agentspec.integrations.langchain import ChatAgentSpec

        return ChatAgentSpec
    if name == "create_app":
        from agentspec.integrations.server import create_app

        return create_app
    raise AttributeError(f"module 'agentspec.integrations' has no attribute {name!r}")
