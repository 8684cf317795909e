"""Shared fixtures: a tiny random Llama for mechanics, the real default model for integration."""

from __future__ import annotations

import os

import pytest

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny randomly initialised Llama (fp32, eval mode, SDPA) with a 512-token vocab."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct), from the local cache."""
    from agentspec.engine.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def default_engine():
    """One Engine on the real default model, shared by the integration tests."""
    from agentspec.engine import Engine

    return Engine.from_pretrained()
